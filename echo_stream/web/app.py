"""The aiohttp application of ``echo-stream web``: the page, the SDP offer/answer, speech and interrupt.

Endpoints (JSON unless said otherwise; errors are ``{"error": "...", "code": "..."}`` with an HTTP status):

* ``GET /`` the page, ``GET /static/...`` its script and style;
* ``GET /config``: ``{"tts": bool, "tts_hint": str, "token_required": bool, "size": int}``;
* ``POST /offer`` ``{"sdp", "type", "token"?}`` -> ``{"sdp", "type", "session"}``: opens one avatar session
  (a :class:`~echo_stream.live.LiveAvatar` on the gRPC server) per browser peer. 401 ``bad_token``,
  503 ``server_full`` (the gRPC server's RESOURCE_EXHAUSTED), 502 ``unavailable``;
* ``POST /session/{id}/say`` ``{"text"}``: the sentence spoken by the offline TTS (503 ``no_tts`` without one);
* ``POST /session/{id}/speak``: the request body is an audio file (any format PyAV reads), spoken as it is;
* ``POST /session/{id}/interrupt``, ``POST /session/{id}/close``;
* ``GET /stats``: every session's counters (user frames and audio received and sent, frames played, speech
  after the last interrupt, server-side latency).
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import urllib.parse
from importlib import resources

from aiohttp import web

from ..errors import InputError
from ..live import LiveAvatar
from . import tts as tts_mod
from .session import AUDIO_RATE, WebSession

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_SPEECH_S = 120.0
MAX_OFFER_BYTES = 256 * 1024


def _static_dir():
    return resources.files("echo_stream.web") / "static"


def _error(status: int, code: str, msg: str) -> web.Response:
    return web.json_response({"error": msg, "code": code}, status=status)


@web.middleware
async def _same_origin(request, handler):
    """POSTs come from this page only: another site open in the same browser cannot open sessions here."""
    origin = request.headers.get("Origin")
    if request.method == "POST" and origin not in (None, "null"):
        if urllib.parse.urlsplit(origin).netloc != request.host:
            return _error(403, "cross_origin", f"requests from {origin} are not accepted: use this server's own page")
    return await handler(request)


class WebApp:
    """The demo's state: the gRPC target, the sessions of the browsers connected now.

    ``target``: ``host:port`` of an ``echo-stream serve``. ``tokens`` (token -> principal): when given, the
    page must send one of them; it is also what the web server passes to the gRPC server for that browser.
    ``token``: the token used when the page sends none (only without ``tokens``). ``tts``: the TTS program
    (default: found on PATH; ``False``: none).
    """

    def __init__(self, target: str, *, tokens: dict | None = None, token: str | None = None, size: int = 256,
                 portrait: bytes | None = None, tts=None, stride: int | None = None, seed: int | None = None,
                 max_sessions: int = 64):
        if size % 2 or not 32 <= size <= 1024:
            raise InputError("--size", f"expected an even number of pixels from 32 to 1024, got {size}")
        self.target, self.tokens, self.token = target, dict(tokens or {}), token
        self.size, self.stride, self.seed = size, stride, seed
        if portrait is None:
            from ..samples import SAMPLE_PORTRAIT
            portrait = SAMPLE_PORTRAIT.read_bytes()
        self.portrait = portrait
        self.tts = tts_mod.find_tts() if tts is None else (tts or None)
        self.max_sessions = max_sessions
        self.sessions: dict[str, WebSession] = {}
        self.opened = 0
        self.refused: dict[str, int] = {}

    # ------------------------------------------------------------------ the app
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_UPLOAD_BYTES, middlewares=[_same_origin])
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/config", self.config)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/offer", self.offer)
        app.router.add_post("/session/{sid}/say", self.say)
        app.router.add_post("/session/{sid}/speak", self.speak)
        app.router.add_post("/session/{sid}/interrupt", self.interrupt)
        app.router.add_post("/session/{sid}/close", self.close_session)
        app.on_shutdown.append(lambda _app: self.close_all())
        return app

    async def close_all(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())), return_exceptions=True)

    # ------------------------------------------------------------------ page
    async def index(self, request) -> web.Response:
        return web.Response(text=(_static_dir() / "index.html").read_text("utf-8"), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def static(self, request) -> web.Response:
        name = request.match_info["name"]
        types = {".js": "application/javascript", ".css": "text/css"}
        ext = os.path.splitext(name)[1]
        f = _static_dir() / name
        if ext not in types or "/" in name or name.startswith(".") or not f.is_file():
            return _error(404, "not_found", f"no such file: {name}")
        return web.Response(text=f.read_text("utf-8"), content_type=types[ext], headers={"Cache-Control": "no-store"})

    async def config(self, request) -> web.Response:
        hint = (f"spoken by {os.path.basename(self.tts)}" if self.tts else
                "no offline text-to-speech is installed on the server (apt-get install espeak-ng): typed "
                "sentences cannot be spoken; upload an audio file instead")
        return web.json_response({"tts": bool(self.tts), "tts_hint": hint, "token_required": bool(self.tokens),
                                  "size": self.size})

    async def stats(self, request) -> web.Response:
        return web.json_response({"sessions": [s.stats() for s in self.sessions.values()], "opened": self.opened,
                                  "refused": self.refused})

    # ------------------------------------------------------------------ sessions
    async def offer(self, request) -> web.Response:
        try:
            body = await request.json()
            sdp, kind = body["sdp"], body["type"]
            if not isinstance(sdp, str) or kind != "offer" or len(sdp) > MAX_OFFER_BYTES:
                raise ValueError
        except Exception:  # noqa: BLE001 - any malformed body
            return _error(400, "bad_offer", "expected JSON {\"sdp\": \"...\", \"type\": \"offer\"}")
        given = body.get("token") or None
        if given is not None and not isinstance(given, str):
            return _error(400, "bad_offer", "the token must be a string")
        if self.tokens:
            from ..serve.auth import Authenticator
            if given is None or Authenticator(self.tokens).principal([("authorization", f"Bearer {given}")]) is None:
                self.refused["bad_token"] = self.refused.get("bad_token", 0) + 1
                return _error(401, "bad_token", "the token was refused: enter a token this server knows "
                                                "(--tokens-file / $ECHO_STREAM_TOKENS)")
            token = given
        else:
            token = given or self.token
        if len(self.sessions) >= self.max_sessions:
            return self._refuse(503, "server_full", f"the web server is full ({self.max_sessions} sessions); "
                                                     "close another tab or try again later")
        avatar = LiveAvatar(self.target, token=token, portrait=self.portrait, size=self.size, seed=self.seed,
                            stride=self.stride, sample_rate=AUDIO_RATE)
        try:
            await asyncio.wait_for(avatar.start(), 30)
        except Exception as e:  # noqa: BLE001 - the server's answer, named for the page
            return self._grpc_error(e)
        session = WebSession(avatar, on_closed=lambda s: self.sessions.pop(s.id, None))
        self.sessions[session.id] = session
        self.opened += 1
        try:
            sdp, kind = await session.answer(sdp, kind)
        except Exception as e:  # noqa: BLE001 - a bad offer harms only its own session
            await session.close()
            log.info("web: offer refused: %s", e)
            return _error(400, "bad_offer", f"the browser's offer could not be answered: {e}")
        log.info("web: session %s open (%d now)", session.id[:8], len(self.sessions))
        return web.json_response({"sdp": sdp, "type": kind, "session": session.id})

    def _refuse(self, status: int, code: str, msg: str) -> web.Response:
        self.refused[code] = self.refused.get(code, 0) + 1
        return _error(status, code, msg)

    def _grpc_error(self, e: BaseException) -> web.Response:
        import grpc

        if isinstance(e, asyncio.TimeoutError):
            return self._refuse(504, "timeout", f"the avatar server at {self.target} did not open a session "
                                                "within 30 s")
        if isinstance(e, grpc.aio.AioRpcError):
            c, details = e.code(), e.details() or ""
            if c == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return self._refuse(503, "server_full", f"the avatar server is full: {details}. Close another tab "
                                                        "or try again later")
            if c == grpc.StatusCode.UNAUTHENTICATED:
                return self._refuse(401, "bad_token", f"the avatar server refused the token: {details}")
            if c == grpc.StatusCode.UNAVAILABLE:
                return self._refuse(502, "unavailable", f"cannot reach the avatar server at {self.target}: "
                                                        f"{details}")
            return self._refuse(502, c.name.lower(), f"the avatar server answered {c.name}: {details}")
        log.exception("web: opening a session failed")
        return self._refuse(500, "internal", f"opening the avatar session failed: {type(e).__name__}: {e}")

    def _session(self, request) -> WebSession | None:
        return self.sessions.get(request.match_info["sid"])

    async def say(self, request) -> web.Response:
        s = self._session(request)
        if s is None:
            return _error(404, "no_session", "no such session (it has ended): press Start again")
        if not self.tts:
            return _error(503, "no_tts", "no offline text-to-speech is installed on the server (apt-get install "
                                         "espeak-ng); upload an audio file instead")
        try:
            text = (await request.json())["text"]
            if not isinstance(text, str):
                raise TypeError
        except Exception:  # noqa: BLE001
            return _error(400, "bad_request", "expected JSON {\"text\": \"...\"}")
        loop = asyncio.get_running_loop()
        try:
            pcm = await loop.run_in_executor(None, lambda: tts_mod.synthesize(text, AUDIO_RATE, exe=self.tts))
        except InputError as e:
            return _error(400, "bad_text", str(e))
        return self._queue(s, pcm)

    async def speak(self, request) -> web.Response:
        s = self._session(request)
        if s is None:
            return _error(404, "no_session", "no such session (it has ended): press Start again")
        data = await request.read()
        if not data:
            return _error(400, "bad_audio", "the request body is empty: send an audio file")
        fd, path = tempfile.mkstemp(prefix="echo-upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            from ..media import decode_audio
            loop = asyncio.get_running_loop()
            pcm = await loop.run_in_executor(None, lambda: decode_audio(path, sample_rate=AUDIO_RATE))
        except Exception as e:  # noqa: BLE001 - InputError names the problem; anything else is still the file's
            name = urllib.parse.unquote(request.headers.get("X-File-Name", "")) or "the upload"
            msg = str(e) if isinstance(e, InputError) else f"{name}: cannot decode its audio ({type(e).__name__}: {e})"
            return _error(400, "bad_audio", msg.replace(path, name))
        finally:
            os.unlink(path)
        return self._queue(s, pcm)

    def _queue(self, s: WebSession, pcm) -> web.Response:
        seconds = len(pcm) / AUDIO_RATE
        if seconds > MAX_SPEECH_S:
            return _error(400, "too_long", f"the speech is {seconds:.1f} s long; at most {MAX_SPEECH_S:.0f} s")
        s.speak(pcm)
        return web.json_response({"queued_s": round(seconds, 3),
                                  "queued_total_s": round(s.avatar.queued_speech_s(), 3)})

    async def interrupt(self, request) -> web.Response:
        s = self._session(request)
        if s is None:
            return _error(404, "no_session", "no such session (it has ended): press Start again")
        await s.interrupt()
        return web.json_response({"interrupted": True})

    async def close_session(self, request) -> web.Response:
        s = self._session(request)
        if s is not None:
            await s.close()
        return web.json_response({"closed": s is not None})
