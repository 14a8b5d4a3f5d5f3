"""Serving end to end: a real gRPC server on loopback over the Ray actor pipeline, real gRPC clients.

One local Ray instance and one set of stage actors (restartable) for the module;
``generate`` runs on the same actors, so the served motion is compared with the
offline path on identical weights.
"""
import asyncio
import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from echo_stream import cli, config, media, motion
from echo_stream.generate import GenerateRequest, generate
from echo_stream.protos import echo_stream_pb2 as pb

from . import mediagen
from .served import ray_backend, server_thread, stream_around

ray = pytest.importorskip("ray")

from echo_stream.serve.client import AvatarClient, Inputs, stream_inputs  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PORTRAIT = str(cli.ASSETS / "portrait.jpg")
SIZE = 96


@pytest.fixture(scope="module")
def backend():
    with ray_backend(SIZE) as b:
        yield b


@pytest.fixture(scope="module")
def server(backend):
    with server_thread(backend, max_sessions=6) as (st, target):
        yield st, target


def _portrait() -> bytes:
    with open(PORTRAIT, "rb") as f:
        return f.read()


def _check_exactly_once(res, total_frames, gaps=()):
    frames = res.motion_frames
    assert frames == sorted(frames) and len(frames) == len(set(frames)), "frames out of order or duplicated"
    missing = set(range(total_frames)) - set(frames)
    gap_frames = {f for e in gaps for f in range(e.first_frame, e.first_frame + e.frames)}
    assert missing == gap_frames, f"frames missing without a gap event: {sorted(missing - gap_frames)[:10]}"
    assert not (set(frames) & gap_frames), "a frame announced as a gap was delivered"


def test_concurrent_sessions_exactly_once_and_video_decodes(server, tmp_path):
    _, target = server
    durations = [1.3, 2.1, 1.7]
    inputs = [Inputs(mediagen.speech_like(d, 16000, seed=i)) for i, d in enumerate(durations)]

    async def main():
        async with AvatarClient(target) as c:
            return await asyncio.gather(*(stream_inputs(c, inp, portrait=_portrait(), size=SIZE, seed=i,
                                                        realtime=False)
                                          for i, inp in enumerate(inputs)))
    results = asyncio.run(main())
    assert len({r.session_id for r in results}) == 3
    for res, d in zip(results, durations):
        n = int(np.ceil(d * config.FPS - 1e-6))
        _check_exactly_once(res, n)
        assert len(res.motion_frames) == n
        assert res.events[-1].kind == pb.Event.ENDED and res.stats.frames == n
        assert all(len(v) == motion.NUM_CHANNELS and np.all(np.isfinite(v)) for v in res.motion)
        out = tmp_path / f"{res.session_id[:6]}.mp4"
        res.save(str(out))
        info = media.probe(out)
        assert info.video_codec == "h264" and info.audio_codec == "aac" and (info.width, info.height) == (SIZE, SIZE)
        with av.open(str(out)) as c:
            decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(decoded) == n and decoded[0].shape == (SIZE, SIZE, 3)
    # different seeds / inputs -> different motion (the sessions did not get each other's frames)
    assert not np.allclose(np.stack(results[0].motion)[:30], np.stack(results[1].motion)[:30])


def test_served_motion_equals_generate(server, backend, tmp_path):
    _, target = server
    avatar = mediagen.write_audio(tmp_path / "a.wav", mediagen.speech_like(2.3, 22050, seed=7), 22050)
    user = mediagen.write_video(tmp_path / "u.mp4", mediagen.face_frames(40, 160, 120, motion="nod"),
                                audio=mediagen.speech_like(1.8, 16000, seed=8), audio_rate=16000)
    text = "[0-1] user: I got the job!\n[1-2] avatar: That is wonderful news."
    mo = tmp_path / "gen.parquet"
    generate(GenerateRequest(portrait=PORTRAIT, avatar_audio=str(avatar), user_video=str(user), transcript=text,
                             motion_out=str(mo), size=SIZE, seed=5), progress=False, runner=backend.runner)
    t = pq.read_table(mo)
    want = np.stack([t.column(c).to_numpy() for c in motion.CHANNELS], 1)

    inp = Inputs.from_files(str(avatar), user_video=str(user), transcript=text)

    async def main():
        async with AvatarClient(target) as c:
            return await stream_inputs(c, inp, output="motion", seed=5, realtime=False, tick_frames=3)
    res = asyncio.run(main())
    frames, got = res.motion_array()
    assert frames.tolist() == t.column("frame").to_pylist()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_stage_actor_killed_mid_session(server, backend):
    """The memory (LCU) actor's process dies mid-session: Ray restarts it, the session goes on from its
    checkpoint, frames stay exactly-once and the lost ones are announced by a GAP event."""
    from echo_stream.serve.client import SessionResult

    st, target = server
    audio = mediagen.speech_like(4.0, 16000, seed=3)
    before, after = audio[:32000], audio[32000:]          # 2 s sent before the kill, 2 s after it
    n = int(np.ceil(4.0 * config.FPS - 1e-6))

    async def main():
        async with AvatarClient(target) as c:
            s = await c.open(output="motion", seed=1)
            async def kill():       # the LCU memory's process dies
                ray.kill(backend.actor("memory"), no_restart=False)
            return await stream_around(s, SessionResult(session_id=s.session_id), before, after, kill)
    res = asyncio.run(main())
    gaps = [e for e in res.events if e.kind == pb.Event.GAP]
    assert gaps, "no GAP event after the stage failure"
    assert res.stats.recoveries >= 1 and res.stats.gap_frames == sum(e.frames for e in gaps)
    _check_exactly_once(res, n, gaps)
    assert res.motion_frames[-1] == n - 1, ("the session did not continue to its end",
                                            [(e.kind, e.first_frame, e.frames) for e in res.events])
    assert sum(f >= 50 for f in res.motion_frames) >= 40     # the audio sent after the kill was animated
    assert res.events[-1].kind == pb.Event.ENDED


def test_client_cli_saves_video_and_motion(server, tmp_path):
    _, target = server
    out, mo = tmp_path / "c.mp4", tmp_path / "c.parquet"
    rc = cli.main(["client", "--target", target, "--test-signal", "1.2", "--fast", "--size", str(SIZE),
                   "-o", str(out), "--motion-out", str(mo), "--seed", "2"])
    assert rc == 0
    assert media.probe(out).video_codec == "h264"
    assert pq.read_table(mo).column("frame").to_pylist() == list(range(30))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_serve_process_drains_on_sigterm(backend, tmp_path):
    """`echo-stream serve` in its own process (stage actors on this test's Ray cluster): SIGTERM drains."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    import grpc

    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "echo_stream.cli", "serve", "--port", "0", "--address", address,
                             "--size", str(SIZE), "--drain-timeout", "60"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.time() + 240
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve exited early"
            if "listening on" in line:
                port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        assert port, "serve did not start"
        target = f"127.0.0.1:{port}"
        n = int(np.ceil(2.0 * config.FPS))

        async def main():
            async with AvatarClient(target) as c:
                running = asyncio.get_running_loop().create_task(
                    stream_inputs(c, Inputs(mediagen.speech_like(2.0, 16000, seed=9)), output="motion",
                                  realtime=True))
                health = health_pb2_grpc.HealthStub(c.channel)
                while not running.done():
                    await asyncio.sleep(0.1)
                    if (await health.Check(health_pb2.HealthCheckRequest())).status == 1:
                        break
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                status = None
                for _ in range(50):
                    status = (await health.Check(health_pb2.HealthCheckRequest())).status
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    await asyncio.sleep(0.05)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await c.open(output="motion")
                return status, refused.value.code(), await running
        status, code, res = asyncio.run(main())
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert code == grpc.StatusCode.UNAVAILABLE
        assert res.motion_frames == list(range(n)) and res.events[-1].kind == pb.Event.ENDED
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
