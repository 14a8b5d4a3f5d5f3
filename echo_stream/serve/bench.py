"""``echo-stream bench serve``: N concurrent real-time client sessions against a server; JSON out.

Per session: frame latency (avatar-audio chunk arrival at the ingress -> the
frame with that pts leaving the egress; measured by the server, p50 / p99),
first-frame latency, and on the client side the latency trend. A session is
*real time* when its output keeps pace with its input: the client-side frame
latency does not grow over the session (last-second median minus the
second-second median below ``--max-growth``) and its p99 stays under
``--rt-p99``. The highest N up to which every N of the sweep had all its sessions
in real time is reported, and sessions the server refused (RESOURCE_EXHAUSTED).

Without ``--target`` a server is started in this process on local Ray
(``--num-cpus``), with ``--max-sessions`` capacity.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np

from ..arguments.bench import add_serve_bench_arguments as add_arguments  # noqa: F401 (the command's arguments)


def _client_latency(res, t_start: float) -> np.ndarray:
    """Client-side latency per frame: arrival - the time its audio was sent (real-time sending from t_start)."""
    frames = sorted(res.frame_arrival)
    return np.array([res.frame_arrival[f] - (t_start + f / 25.0) for f in frames])


async def _one(client, inp, args, seed: int, delay: float):
    from .client import stream_inputs
    import grpc

    await asyncio.sleep(delay)
    t = time.monotonic()
    try:
        res = await stream_inputs(client, inp, portrait=args._portrait, output=args.mode, codec=args.codec,
                                  size=args.size, seed=seed, realtime=True)
    except grpc.aio.AioRpcError as e:
        return {"rejected": e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "error": f"{e.code().name}: {e.details()}"}
    start = res.first_send or t
    lat = _client_latency(res, start)
    n = len(lat)
    second = lat[25:50] if n >= 50 else lat[: max(1, n // 2)]
    growth = float(np.median(lat[-25:]) - np.median(second)) if n else float("nan")
    st = res.stats
    return {"rejected": False, "frames": int(st.frames) if st else n, "gap_frames": int(st.gap_frames) if st else 0,
            "server_latency_p50_s": st.latency_p50_s if st else None,
            "server_latency_p99_s": st.latency_p99_s if st else None,
            "first_frame_latency_s": st.first_frame_latency_s if st else None,
            "client_latency_p50_s": float(np.percentile(lat, 50)) if n else None,
            "client_latency_p99_s": float(np.percentile(lat, 99)) if n else None,
            "latency_growth_s": growth, "wall_s": res.wall_s, "audio_s": res.sent_audio_s}


async def _run_n(target, token, n, args, inputs):
    from .client import AvatarClient

    async with AvatarClient(target, token=token) as c:
        jobs = [_one(c, inputs[i % len(inputs)], args, seed=i, delay=0.37 * i / max(n, 1)) for i in range(n)]
        return await asyncio.gather(*jobs)


def run(args) -> int:
    from ..samples import SAMPLE_PORTRAIT
    from ..machine import environment
    from .client import Inputs, test_signal

    counts = [int(x) for x in str(args.sessions).split(",") if x.strip()]
    engine = getattr(args, "engine", "actors")
    args._portrait = SAMPLE_PORTRAIT.read_bytes() if args.mode != "motion" else None
    inputs = [Inputs(test_signal(args.duration, seed=s)) for s in range(4)]
    server = backend = None
    target = args.target
    if target is None:
        from ..pipeline import PipelineOptions, parse_replicas
        from .serve_engine import engine_backend
        from ..cluster import start_ray
        from .server import ServeOptions, ServerThread

        replicas = parse_replicas(getattr(args, "replicas", ""))
        start_ray(None, args.num_cpus)
        backend = engine_backend(engine).start(PipelineOptions(checkpoint=args.checkpoint, config=args.config,
                                                   device=args.device, size=(args.size, args.size),
                                                   stride=args.stride or None, replicas=replicas),
                                   num_cpus=args.num_cpus)
        try:       # a server that fails to start must not leave the stages (a Serve application) deployed
            server = ServerThread(backend, ServeOptions.for_model(args.config, stride=args.stride or None,
                                                                  motion_stride=args.motion_stride or None, port=0,
                                                                  max_sessions=args.max_sessions or max(counts)))
            target = f"127.0.0.1:{server.start()}"
        except BaseException:
            backend.shutdown()
            raise
    rows = []
    try:
        for n in counts:
            t = time.monotonic()
            b0 = (sum(b.batches for b in server.server.batchers),
                  sum(b.windows for b in server.server.batchers)) if server else None
            sessions = asyncio.run(_run_n(target, args.token, n, args, inputs))
            ok = [s for s in sessions if not s.get("rejected") and "error" not in s]
            rt = [s for s in ok if s["client_latency_p99_s"] is not None and s["client_latency_p99_s"] <= args.rt_p99
                  and s["latency_growth_s"] <= args.max_growth]
            row = {"sessions": n, "completed": len(ok), "rejected": sum(1 for s in sessions if s.get("rejected")),
                   "errors": [s["error"] for s in sessions if "error" in s and not s.get("rejected")],
                   "realtime_sessions": len(rt), "all_realtime": len(rt) == n,
                   "server_latency_p50_s_median": _med(ok, "server_latency_p50_s"),
                   "server_latency_p99_s_max": _max(ok, "server_latency_p99_s"),
                   "first_frame_latency_s_max": _max(ok, "first_frame_latency_s"),
                   "client_latency_p99_s_max": _max(ok, "client_latency_p99_s"),
                   "wall_s": time.monotonic() - t, "per_session": sessions}
            if server:
                bts = server.server.batchers
                nb = sum(b.batches for b in bts) - b0[0]
                nw = sum(b.windows for b in bts) - b0[1]
                row["diffusion_batches"] = nb
                row["diffusion_mean_batch"] = nw / nb if nb else None
            rows.append(row)
            print(f"N={n}: {row['completed']} completed, {row['rejected']} rejected, {len(rt)} real time; "
                  f"server p50 {row['server_latency_p50_s_median']}, p99 max {row['server_latency_p99_s_max']}, "
                  f"first frame max {row['first_frame_latency_s_max']}", flush=True)
            if args.stop_after_miss and not row["all_realtime"]:
                break
    finally:
        if server:
            server.stop()
        if backend:
            backend.shutdown()
    best = 0                                   # highest N with every N' <= N of the sweep in real time
    for r in sorted(rows, key=lambda r: r["sessions"]):
        if not r["all_realtime"]:
            break
        best = r["sessions"]
    cpus = args.num_cpus or os.cpu_count()
    result = {
        "benchmark": "serve", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
        "config": {"mode": args.mode, "codec": args.codec, "size": args.size, "duration_s": args.duration,
                   "target": args.target or "local server (in process, local Ray)", "num_cpus": cpus,
                   "model_config": args.config or "tiny", "device": args.device, "rt_p99_s": args.rt_p99,
                   "max_growth_s": args.max_growth, "sending": "real time, 80 ms avatar-audio chunks",
                   "stride_video_sessions": args.stride or "config new_frames",
                   "stride_motion_sessions": args.motion_stride or "config new_frames",
                   "replicas": getattr(args, "replicas", "") or "1 per stage",
                   "engine": engine if args.target is None else "the server's"},
        "definitions": {
            "server_latency": "avatar-audio chunk arrival at the ingress -> the frame with that pts leaving the "
                              "egress (server clock)",
            "first_frame_latency": "first avatar-audio arrival -> first frame leaving the egress",
            "client_latency": "frame received by the client - the time its audio was sent",
            "realtime": "client p99 <= rt_p99_s and latency growth over the session <= max_growth_s",
            "structural_latency_note": f"a window of S new frames (S = the session's stride: {_stride_text(args)}) "
                                       "needs L=2 lookahead frames of audio: with audio arriving in real time, frame "
                                       "t0+k waits (S+2-k) frames for its window's audio before any compute (tiny: "
                                       "S=6 -> at most 0.32 s, S=16 -> 0.72 s); the fMP4 muxer then keeps each "
                                       "window's last frame until the next window is encoded"},
        "highest_realtime_sessions": best, "results": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    name = args.name or f"serve_{args.mode}_{args.size}_{cpus}cpu{'_serve-engine' if engine == 'serve' else ''}.json"
    from .. import atomic
    atomic.write_text(os.path.join(args.out, name), json.dumps(result, indent=2, default=str))
    print(f"highest N in real time: {best}; wrote {os.path.join(args.out, name)}")
    return 0


def _stride_text(args) -> str:
    video = args.stride or "the config's new_frames"
    motion = args.motion_stride or "the config's new_frames"
    return f"{video} for video sessions, {motion} for motion-only ones"


def _med(rows, key):
    v = [r[key] for r in rows if r.get(key) is not None]
    return float(np.median(v)) if v else None


def _max(rows, key):
    v = [r[key] for r in rows if r.get(key) is not None]
    return float(np.max(v)) if v else None
