"""What a session's client is told when something goes wrong: the one error mapping, and the logged error id.

Owns no state. :func:`failure_from` is the only place an exception becomes a client-visible status;
:func:`redactions` says which server-side strings of a session must never reach its client.
"""
from __future__ import annotations

import logging
import secrets

from ...errors import EchoStreamError, one_line, unwrap_remote_error

log = logging.getLogger(__name__)


class SessionFailed(Exception):
    """The session cannot continue; ``code`` is the gRPC status for the client, ``message`` its one line."""

    def __init__(self, code, message: str):
        self.code = code
        self.message = one_line(message)
        self.input_error: EchoStreamError | None = None    # the input's own error, when that is what it was
        super().__init__(self.message)


def failure_from(exc: BaseException, during: str, redact: dict[str, str] | None = None) -> SessionFailed:
    """What the client is told about an exception: the ONE mapping every error of a session goes through.

    * :class:`SessionFailed` stays as it is;
    * an :class:`~echo_stream.errors.EchoStreamError` (raised here or inside a stage actor; Ray's wrapper is
      looked through) is the client's input problem: INVALID_ARGUMENT with its one-line message
      (``redact`` replaces server-side strings in it, e.g. a registered avatar's path by its id);
    * anything else is a server fault: INTERNAL with a generic line and an error id; the full exception
      (Ray's, with the remote traceback) goes to the server's log under that id, never to the client.
    """
    if isinstance(exc, SessionFailed):
        return exc
    inner = unwrap_remote_error(exc)
    if isinstance(inner, EchoStreamError):
        text = str(inner)
        for secret, label in (redact or {}).items():
            text = text.replace(secret, label)
        failed = SessionFailed("INVALID_ARGUMENT", text)
        failed.input_error = inner
        return failed
    return SessionFailed("INTERNAL", f"internal server error during {during} (error id {log_error(exc, during)}; "
                                     "the server's log has the details)")


def log_error(exc: BaseException, during: str) -> str:
    """Log ``exc`` with its traceback under a new error id; returns the id (what the client is told)."""
    eid = secrets.token_hex(6)
    log.error("error id %s during %s: %s: %s", eid, during, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return eid


def redactions(spec) -> dict[str, str]:
    """A session's server-side strings never shown to its client -> what is shown instead (a registered
    avatar's portrait path -> its id)."""
    if isinstance(spec.portrait, str) and spec.avatar_id is not None:
        return {spec.portrait: f"avatar {spec.avatar_id!r}"}
    return {}
