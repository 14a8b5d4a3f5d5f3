"""``echo-stream web``: the browser demo's process (the arguments: :mod:`echo_stream.arguments.web`).

By default it starts local Ray, the stage actors and an :class:`~echo_stream.serve.server.AvatarServer` on a
loopback port of its own (as ``echo-stream serve`` does), then serves the page; with ``--server HOST:PORT`` it
uses a running ``echo-stream serve`` instead. Beyond loopback it needs bearer tokens, like ``serve``: the
page asks for one, the web server checks it and passes it to the gRPC server with the browser's session.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
import threading

from ..errors import InputError
from ..serve.cli import read_input_file

log = logging.getLogger(__name__)


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if bool(cert) != bool(key):
        raise InputError("--tls-cert/--tls-key", "give both the certificate and the key")
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise InputError(f"{cert} / {key}", f"cannot load the TLS certificate and key ({e})") from None
    return ctx


async def serve_app(webapp, host: str, port: int, ssl_context=None):
    """Start ``webapp``'s aiohttp site; returns ``(runner, port)``."""
    from aiohttp import web

    runner = web.AppRunner(webapp.make_app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if port == 0 else port
    return runner, bound


def run(args) -> int:
    from ..serve.auth import is_loopback, load_tokens

    tokens = load_tokens(args.tokens_file)
    if not is_loopback(args.host) and not tokens:
        raise InputError("--host", f"serving the page on {args.host} (beyond loopback) needs bearer tokens: give "
                                   "--tokens-file PATH or set $ECHO_STREAM_TOKENS='principal:token'")
    if args.token and not is_loopback(args.host):
        raise InputError("--token", "beyond loopback every browser gives its own token; --token is for loopback")
    if args.size % 2 or not 32 <= args.size <= 1024:
        raise InputError("--size", f"expected an even number of pixels from 32 to 1024, got {args.size}")
    if args.max_sessions < 1:
        raise InputError("--max-sessions", f"must be at least 1, got {args.max_sessions}")
    if args.server:
        host, sep, port = args.server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InputError("--server", f"expected HOST:PORT, got {args.server!r}")
    ssl_context = _tls_context(args.tls_cert, args.tls_key)
    portrait = read_input_file(args.portrait, "portrait")
    token = args.token or os.environ.get("ECHO_STREAM_TOKEN") or None
    return asyncio.run(_main(args, tokens, token, portrait, ssl_context))


async def _main(args, tokens, token, portrait, ssl_context) -> int:
    from .app import WebApp

    loop = asyncio.get_running_loop()
    backend = server = None
    target = args.server
    try:
        if target is None:
            from ..cluster import start_ray
            from ..pipeline import PipelineOptions
            from ..serve.backend import RayBackend
            from ..serve.server import AvatarServer, ServeOptions

            opts = ServeOptions.for_model(None, stride=args.stride or None, host="127.0.0.1", port=0,
                                          max_sessions=args.max_sessions, tokens=tokens)
            popts = PipelineOptions(checkpoint=args.checkpoint, device=args.device, size=(args.size, args.size),
                                    stride=args.stride or None)
            start_ray(None, args.num_cpus)
            print("echo-stream web: starting the stage actors (loading models) ...", file=sys.stderr, flush=True)
            backend = await loop.run_in_executor(None, lambda: RayBackend.start(popts, num_cpus=args.num_cpus))
            server = AvatarServer(backend, opts)
            target = f"127.0.0.1:{await server.start()}"
        webapp = WebApp(target, tokens=tokens, token=token, size=args.size, portrait=portrait,
                        stride=args.stride or None, max_sessions=args.max_sessions)
        runner, port = await serve_app(webapp, args.host, args.port, ssl_context)
        scheme = "https" if ssl_context else "http"
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"echo-stream web: open {scheme}://{shown}:{port}/ (avatar server {target}; "
              f"{'token auth' if tokens else 'no auth: loopback'}; text-to-speech: "
              f"{webapp.tts or 'none (apt-get install espeak-ng)'})", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("echo-stream web: closing the sessions ...", file=sys.stderr)
        await runner.cleanup()
    finally:
        if server is not None:
            await server.stop(2.0)
        if backend is not None:
            backend.shutdown()
    return 0


class WebThread:
    """A :class:`~echo_stream.web.app.WebApp` served on its own event loop in a background thread (tests,
    ``bench web``)."""

    def __init__(self, webapp, host: str = "127.0.0.1", port: int = 0):
        self.webapp, self.host, self.port = webapp, host, port
        self.loop = asyncio.new_event_loop()
        self._runner = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="echo-stream-web", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._runner, self.port = self.loop.run_until_complete(serve_app(self.webapp, self.host, self.port))
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> str:
        """Start serving; returns the page's URL."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return f"http://{self.host}:{self.port}/"

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._runner is not None and self._thread.is_alive():
            try:
                self.run(self._runner.cleanup(), timeout=30)
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.debug("web thread: cleanup: %s", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
