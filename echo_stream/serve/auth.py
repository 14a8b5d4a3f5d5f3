"""Bearer-token authentication: tokens map to principals; session ids are bound to a principal.

Token sources (any combination): ``--tokens-file PATH`` (one ``principal:token``
per line; ``#`` comments; a bare token gets the principal ``token-<n>``) and the
environment variable ``ECHO_STREAM_TOKENS`` (``principal:token`` entries
separated by commas). Clients send ``authorization: Bearer <token>`` metadata.
Without tokens the server only binds to loopback and every caller is the
principal ``local``.
"""
from __future__ import annotations

import hmac
import ipaddress
import os

from ..errors import InputError

ENV = "ECHO_STREAM_TOKENS"
MIN_TOKEN_CHARS = 16


def _parse_entries(entries, source: str, unit: str = "line") -> dict[str, str]:
    """token -> principal of ``principal:token`` entries; a bad one raises one line naming the source and
    the entry (``unit`` ``i``): the server refuses to start rather than hold a token no client could send."""
    out: dict[str, str] = {}
    for i, raw in enumerate(entries, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        principal, sep, token = line.partition(":")
        if not sep:
            principal, token = f"token-{len(out) + 1}", line
        principal, token = principal.strip(), token.strip()
        if not principal or not principal.isprintable():
            raise InputError(source, f"{unit} {i}: the principal (before ':') must be a non-empty printable name")
        if len(token) < MIN_TOKEN_CHARS:
            raise InputError(source, f"{unit} {i}: token shorter than {MIN_TOKEN_CHARS} characters; "
                                     "use e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if not all("!" <= ch <= "~" for ch in token):
            raise InputError(source, f"{unit} {i}: the token must be printable ASCII without spaces (a gRPC "
                                     "metadata value); no client could send this one")
        if token in out:
            raise InputError(source, f"{unit} {i}: the same token is given twice")
        out[token] = principal
    return out


def load_tokens(path: str | None = None, env: dict | None = None) -> dict[str, str]:
    """token -> principal from a tokens file and/or ``$ECHO_STREAM_TOKENS``."""
    env = os.environ if env is None else env
    tokens: dict[str, str] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise InputError(path, f"cannot read the tokens file ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            line = text_line_of(path, e.start)
            raise InputError(path, f"line {line}: not UTF-8 text") from None
        tokens.update(_parse_entries(text.splitlines(), path))
    if env.get(ENV):
        tokens.update(_parse_entries(env[ENV].split(","), f"${ENV}", unit="entry"))
    return tokens


def text_line_of(path: str, offset: int) -> int:
    """The 1-based line of byte ``offset`` in the file ``path``."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Authenticator:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def principal(self, metadata) -> str | None:
        """The caller's principal, or None when the token is missing or unknown."""
        if not self.tokens:
            return "local"
        value = None
        for key, v in metadata or ():
            if key.lower() == "authorization":
                value = v if isinstance(v, str) else v.decode("latin-1")
        if not value or not value.lower().startswith("bearer "):
            return None
        given = value[7:].strip().encode()
        found = None
        for token, principal in self.tokens.items():   # compare with every token: constant time per entry
            if hmac.compare_digest(given, token.encode()):
                found = principal
        return found
