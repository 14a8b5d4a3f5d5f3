"""Error types whose message is one line a user can act on."""
from __future__ import annotations

import os


class EchoStreamError(Exception):
    """Base class of every error echo-stream raises on purpose."""


class InputError(EchoStreamError):
    """A user-supplied input (file, message, argument) is unusable.

    ``str(err)`` is one line: ``<what>: <problem>`` so that the CLI can print it
    as is.
    """

    def __init__(self, what: str | os.PathLike, problem: str):
        self.what = str(what)
        self.problem = problem.strip().replace("\n", " ")
        super().__init__(f"{self.what}: {self.problem}")

    def __reduce__(self):
        # pickled as its own arguments: an error raised inside a Ray actor crosses intact
        return (type(self), (self.what, self.problem))


class SchemaError(EchoStreamError):
    """An Arrow batch crossing a stage boundary does not match its contract."""

    def __init__(self, message_type: str, field: str, problem: str):
        self.message_type = message_type
        self.field = field
        self.problem = problem
        super().__init__(f"{message_type} batch: field '{field}': {problem}")

    def __reduce__(self):
        return (type(self), (self.message_type, self.field, self.problem))


class CheckpointError(EchoStreamError):
    """A checkpoint cannot be loaded (missing, corrupt, or config mismatch)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as an exception so that cleanup runs (no partial output).

    A subclass of KeyboardInterrupt: every path that cleans up after Ctrl-C cleans up after SIGTERM.
    """


def raise_on_sigterm():
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the previous handler (or None).

    Call it after ``ray.init``: Ray's own handler (a native stack dump and exit status -6) is replaced.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()
    return signal.signal(signal.SIGTERM, handler)


def unwrap_remote_error(e: BaseException) -> BaseException:
    """The error raised inside a Ray task (Ray wraps what an actor raises; ``cause`` is the original).

    The one place that looks inside Ray's wrappers: ``generate`` and the server both use it. Returns ``e``
    itself when it wraps nothing.
    """
    seen = 0
    while seen < 16:                      # a wrapper of a wrapper ...; never loop forever on a cycle
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException) or cause is e:
            return e
        e, seen = cause, seen + 1
    return e


def one_line(text: str, limit: int = 400) -> str:
    """``text`` as one line of at most ``limit`` characters (whitespace runs collapsed, cut with '...')."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3].rstrip() + "..."
