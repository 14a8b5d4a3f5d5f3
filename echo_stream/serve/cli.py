"""``echo-stream serve`` and ``echo-stream client``: entry points (the arguments: :mod:`echo_stream.arguments.serve`)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from ..arguments.serve import (CLIENT_EPILOG, SERVE_EPILOG, add_client_arguments,  # noqa: F401 (re-exported)
                               add_serve_arguments, add_stride_arguments)
from ..cluster import start_ray
from ..errors import InputError
from .options import read_input_file, serve_options  # noqa: F401 (read_input_file: re-exported)

log = logging.getLogger(__name__)


def run_serve(args) -> int:
    opts, popts = serve_options(args)
    return asyncio.run(_serve_main(opts, popts, args.address, args.num_cpus, args.metrics_port, args.engine))


async def _serve_main(opts, popts, address, num_cpus, metrics_port, engine: str = "actors") -> int:
    from . import metrics
    from .server import AvatarServer

    loop = asyncio.get_running_loop()
    start_ray(address, num_cpus)
    print(f"echo-stream serve: starting the stage {'actors' if engine == 'actors' else 'Serve deployments'} "
          "(loading models) ...", file=sys.stderr)
    from .serve_engine import engine_backend

    backend_cls = engine_backend(engine)
    backend = await loop.run_in_executor(None, lambda: backend_cls.start(popts, address=address, num_cpus=num_cpus))
    server = AvatarServer(backend, opts)
    try:
        port = await server.start()
        if metrics_port is not None:
            metrics.serve_metrics(metrics_port, opts.host)  # /metrics only where the service itself listens
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(server.drain()))
        print(f"echo-stream serve: listening on {opts.host}:{port} "
              f"({'TLS' if opts.tls_cert else 'plaintext'}, {'token auth' if opts.tokens else 'no auth: loopback'}, "
              f"max {opts.max_sessions} sessions, {engine} engine"
              + "".join(f", {n} {name} replicas" for name, n in popts.replicas.items()
                        if n > 1 and name not in opts.autoscale)
              + "".join(f", {name} autoscaled {s.min}..{s.max}" for name, s in opts.autoscale.items()) + ")"
              + (f"; metrics on :{metrics_port}/metrics" if metrics_port is not None else ""),
              file=sys.stderr, flush=True)
        await server.wait()
        print("echo-stream serve: drained, exiting", file=sys.stderr)
    finally:
        backend.shutdown()
    return 0


def run_client(args) -> int:
    from ..samples import SAMPLE_PORTRAIT
    from .client import AvatarClient, Inputs, stream_inputs, test_signal

    token = args.token or (read_input_file(args.token_file, "token file") or b"").decode().strip() or \
        os.environ.get("ECHO_STREAM_TOKEN")
    output = args.output or ("both" if args.out else "motion")
    if output in ("video", "both") and not args.avatar_id:
        portrait = read_input_file(args.portrait or str(SAMPLE_PORTRAIT), "portrait")
    else:
        portrait = None
    if args.out is None and args.motion_out is None:
        raise InputError("-o/--motion-out", "nothing to save: give -o OUT.mp4 and/or --motion-out MOTION.parquet")
    if args.test_signal is not None:
        inp = Inputs(test_signal(args.test_signal))
    else:
        inp = Inputs.from_files(args.avatar_audio, user_video=args.user_video, user_audio=args.user_audio,
                                transcript=args.transcript)

    others = [t.strip() for t in args.resume_through.split(",") if t.strip()]
    if any(":" not in t for t in others):
        raise InputError("--resume-through", f"{args.resume_through!r}: give HOST:PORT[,HOST:PORT...]")
    tls_ca = read_input_file(args.tls_ca, "CA certificate")

    async def main():
        async with AvatarClient(args.target, token=token, tls_ca=tls_ca, tls=args.tls) as c:
            spare = [AvatarClient(t, token=token, tls_ca=tls_ca, tls=args.tls) for t in others]
            try:
                return await stream_inputs(c, inp, portrait=portrait, avatar_id=args.avatar_id, output=output,
                                           size=args.size, seed=args.seed, realtime=not args.fast,
                                           stride=args.stride, resume_through=spare or ([c] if others else []))
            finally:
                for x in spare:
                    await x.close()
    import grpc
    try:
        res = asyncio.run(main())
    except grpc.aio.AioRpcError as e:
        print(f"echo-stream: error: the server answered {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    wrote = res.save(args.out, args.motion_out)
    st = res.stats
    gaps = sum(1 for e in res.events if e.kind == 2)
    resumed = f"; resumed on {len(res.resumes)} new stream(s)" if res.resumes else ""
    print(f"session {res.session_id[:8]}…: {st.frames if st else len(res.motion_frames)} frames for "
          f"{res.sent_audio_s:.2f} s of audio in {res.wall_s:.2f} s; first frame "
          f"{(st.first_frame_latency_s if st else 0):.2f} s, frame latency p50 {(st.latency_p50_s if st else 0):.2f} s "
          f"p99 {(st.latency_p99_s if st else 0):.2f} s; {gaps} gap event(s){resumed}; wrote {' and '.join(wrote)}",
          file=sys.stderr)
    return 0
