"""Serving protocol: a real gRPC server on loopback and real gRPC clients over the in-process pipeline.

The stages run in this process (:class:`InlineBackend`, the same stage code the
Ray actors host) so that these tests stay light; ``test_serve_ray.py`` runs the
Ray actor pipeline end to end.
"""
import asyncio
import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc import aio

from echo_stream import cli, config
from echo_stream.errors import InputError
from echo_stream.pipeline import PipelineOptions
from echo_stream.protos import echo_stream_pb2 as pb
from echo_stream.serve import auth, metrics
from echo_stream.serve.backend import InlineBackend
from echo_stream.serve.client import AvatarClient, Inputs, stream_inputs
from echo_stream.serve.server import SESSION_METHOD, ServeOptions, ServerThread
from echo_stream.serve.wire import Limits

from . import mediagen

PORTRAIT = str(cli.ASSETS / "portrait.jpg")
SIZE = 64
ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"


@pytest.fixture(scope="module")
def backend():
    b = InlineBackend(PipelineOptions(size=(SIZE, SIZE)))
    yield b
    b.shutdown()


@pytest.fixture
def make_server(backend):
    started = []

    def make(**kw):
        st = ServerThread(backend, ServeOptions(port=0, **kw))
        port = st.start()
        started.append(st)
        return st, f"127.0.0.1:{port}"
    yield make
    for st in started:
        st.stop()


def run(coro):
    return asyncio.run(coro)


def _audio(seconds, seed=0):
    return mediagen.speech_like(seconds, 16000, seed=seed)


async def _status_of(coro) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as e:
        await coro
    return e.value.code(), e.value.details()


def test_committed_pb2_matches_the_proto():
    """The committed module is build.py's rendering of protoc's output for the current .proto."""
    from google.protobuf import descriptor_pb2

    from echo_stream.protos import build

    pytest.importorskip("grpc_tools")
    generated = build.protoc_output()
    committed = (build.HERE / build.MODULE).read_text()

    def descriptor(text):
        return descriptor_pb2.FileDescriptorProto.FromString(build.serialized_descriptor(text))
    # the schema: compared as descriptors, so a protoc that serializes differently still agrees
    assert descriptor(generated) == descriptor(committed), \
        "echo_stream_pb2.py is out of date: run `python -m echo_stream.protos.build`"
    # the code around it: protoc's output minus the version check (whichever protoc 29..35 wrote it)
    assert build.without_generator_line(build.render(generated)) == build.without_generator_line(committed), \
        "echo_stream_pb2.py is not what `python -m echo_stream.protos.build` writes from this protoc's output"
    assert "_runtime_version" not in committed


def test_pb2_renders_only_known_protoc_output():
    from echo_stream.protos import build

    committed = (build.HERE / build.MODULE).read_text()
    stamp = ("from google.protobuf import runtime_version as _runtime_version\n"
             "_runtime_version.ValidateProtobufRuntimeVersion(\n    _runtime_version.Domain.PUBLIC,\n"
             "    {},\n    {},\n    {},\n    '{}',\n    'echo_stream.proto'\n)\n")
    body = committed.replace(build.NOTE, "")
    i = body.index("# @@protoc_insertion_point(imports)")
    generated = lambda *v: body[:i] + stamp.format(*v) + body[i:]  # noqa: E731
    for version in [(5, 29, 0, ""), (6, 31, 1, ""), (7, 35, 1, "")]:
        assert build.render(generated(*version)) == committed
    for version in [(5, 28, 3, ""), (8, 36, 0, ""), (7, 36, 0, "-dev")]:
        with pytest.raises(ValueError, match="checked for 5.29 .. 7.x"):
            build.render(generated(*version))
    with pytest.raises(ValueError, match="no runtime-version check"):
        build.render(body)


def test_committed_pb2_imports_without_warnings_and_round_trips():
    """Under the installed protobuf runtime, in a fresh interpreter (both implementations)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from echo_stream.protos import build

    script = Path(__file__).with_name("protobuf_roundtrip.py")
    for impl in ("default", "python"):
        env = dict(os.environ)
        if impl == "python":
            env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
        out = subprocess.run([sys.executable, str(script), str(build.HERE / build.MODULE)], env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        report = json.loads(out)
        assert report["ok"], report.get("traceback")
        assert report["warnings"] == [], report["warnings"]


def test_auth_required_and_sessions_bound_to_their_principal(make_server):
    st, target = make_server(tokens={ALICE: "alice", BOB: "böb"})   # a non-ASCII principal name too

    async def main():
        for token in (None, "not-a-known-token-xxxxxxxx"):
            async with AvatarClient(target, token=token) as c:
                code, details = await _status_of(c.open(output="motion"))
                assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details, (token, details)
        async with AvatarClient(target, token=ALICE) as alice, AvatarClient(target, token=BOB) as bob:
            s = await alice.open(output="motion")
            assert len(s.session_id) >= 32 and st.server.sessions[s.session_id].principal == "alice"
            code, details = await _status_of(bob.control(s.session_id, "interrupt"))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "another principal" in details
            code, _ = await _status_of(bob.control("no-such-session", "interrupt"))
            assert code == grpc.StatusCode.NOT_FOUND
            reply = await alice.control(s.session_id, "interrupt")
            assert reply.playback_frame == 0
            await s.end()
            kinds = [m.event.kind async for m in s.messages() if m.WhichOneof("body") == "event"]
            assert kinds[-1] == pb.Event.ENDED and pb.Event.INTERRUPTED in kinds
    run(main())


def test_tokens_file_and_loopback_rules(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# principal:token\nalice:" + ALICE + "\n" + BOB + "\n")
    assert auth.load_tokens(str(f), env={}) == {ALICE: "alice", BOB: "token-2"}
    assert auth.load_tokens(None, env={auth.ENV: f"carol:{ALICE}"}) == {ALICE: "carol"}
    f.write_text("alice:short\n")
    with pytest.raises(InputError, match="shorter than"):
        auth.load_tokens(str(f), env={})
    # a token no client can send in gRPC metadata is refused at load; any principal name is fine
    f.write_text("alice:" + "é" * 40 + "\n")
    with pytest.raises(InputError, match="printable ASCII"):
        auth.load_tokens(str(f), env={})
    assert auth.load_tokens(None, env={auth.ENV: f"zoë:{ALICE}"}) == {ALICE: "zoë"}
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("10.1.2.3")


def test_bad_messages_are_invalid_argument_and_other_sessions_continue(make_server):
    st, target = make_server()
    n_good = int(np.ceil(1.6 * config.FPS))

    async def bad(messages, raw: bytes | None = None):
        async with aio.insecure_channel(target) as ch:
            call = ch.stream_stream(SESSION_METHOD, request_serializer=lambda m: m if isinstance(m, bytes)
                                    else m.SerializeToString(), response_deserializer=pb.ServerMessage.FromString)(
                )
            for m in messages:
                await call.write(m)
            if raw is not None:
                await call.write(raw)
            await call.done_writing()
            return await _status_of(_drain(call))

    async def _drain(call):
        async for _ in call:
            pass

    cfg = pb.ClientMessage(seq=0, config=pb.SessionConfig(output_mode=pb.OUTPUT_MODE_MOTION))
    audio = pb.AudioChunk(pcm_f32le=_audio(0.1).tobytes(), sample_rate=16000)
    cases = {
        "oversize": ([cfg, pb.ClientMessage(seq=1, avatar_audio=pb.AudioChunk(
            pcm_s16le=b"\0" * 300_000, sample_rate=48000, channels=2))], None, "avatar_audio.pcm_s16le"),
        "malformed": ([cfg], b"\xff\xff\xff\xff garbage", "not a valid protobuf"),
        "malformed first": ([], b"\x0a\xff\xff", "not a valid protobuf"),
        "not config first": ([pb.ClientMessage(seq=0, avatar_audio=audio)], None, "must be a SessionConfig"),
        "out of order": ([cfg, pb.ClientMessage(seq=2, avatar_audio=audio)], None, "out of order"),
        "pts backwards": ([cfg, pb.ClientMessage(seq=1, pts=1.0, avatar_audio=audio),
                           pb.ClientMessage(seq=2, pts=0.5, avatar_audio=audio)], None, "before the previous"),
        "bad raw frame": ([cfg, pb.ClientMessage(seq=1, user_video=pb.VideoFrame(raw_rgb=b"\0" * 100, width=8,
                                                                                  height=8))], None, "raw_rgb"),
        "bad blendshape": ([cfg, pb.ClientMessage(seq=1, user_blendshapes=pb.Blendshapes(values={"noseWiggle": 1}))],
                           None, "noseWiggle"),
        "bad stride": ([pb.ClientMessage(seq=0, config=pb.SessionConfig(output_mode=pb.OUTPUT_MODE_MOTION,
                                                                          stride_frames=17))], None, "stride_frames"),
        "odd size": ([pb.ClientMessage(seq=0, config=pb.SessionConfig(output_mode=pb.OUTPUT_MODE_MOTION,
                                                                       width=101))], None, "config.width"),
        "no portrait": ([pb.ClientMessage(seq=0, config=pb.SessionConfig(output_mode=pb.OUTPUT_MODE_VIDEO))],
                        None, "portrait"),
        "bad portrait": ([pb.ClientMessage(seq=0, config=pb.SessionConfig(output_mode=pb.OUTPUT_MODE_BOTH,
                                                                           portrait_image=b"not an image"))],
                         None, "portrait"),
    }

    async def main():
        async with AvatarClient(target) as c:
            good = asyncio.get_running_loop().create_task(
                stream_inputs(c, Inputs(_audio(1.6, seed=2)), output="motion", realtime=True))
            results = {name: await bad(msgs, raw) for name, (msgs, raw, _) in cases.items()}
            return results, await good
    results, good = run(main())
    for name, (_, _, needle) in cases.items():
        code, details = results[name]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert needle in details, (name, details)
    assert good.motion_frames == list(range(n_good)) and good.events[-1].kind == pb.Event.ENDED
    assert not st.server.sessions


def test_capacity_resource_exhausted(make_server):
    st, target = make_server(max_sessions=2)

    async def main():
        async with AvatarClient(target) as c:
            a = await c.open(output="motion")
            b = await c.open(output="motion")
            code, details = await _status_of(c.open(output="motion"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity (2 sessions)" in details
            await b.send_avatar_audio(_audio(0.5))       # the admitted sessions keep working
            await b.end()
            frames = [m.motion.frame async for m in b.messages() if m.WhichOneof("body") == "motion"]
            assert frames == list(range(int(np.ceil(0.5 * config.FPS))))
            while len(st.server.sessions) > 1:
                await asyncio.sleep(0.02)
            d = await c.open(output="motion")             # capacity is free again
            for s in (a, d):
                await s.end()
                async for _ in s.messages():
                    pass
    run(main())


def test_interrupt_drops_buffered_work_and_reports_playback(make_server):
    st, target = make_server(limits=Limits(max_lead_s=30.0))

    async def main():
        async with AvatarClient(target) as c:
            s = await c.open(output="motion", seed=3)
            old = _audio(4.0, seed=4)
            for i in range(0, len(old), 1280):
                await s.send_avatar_audio(old[i:i + 1280])
            msgs = []
            async for m in s.messages():
                msgs.append(m)
                if sum(x.WhichOneof("body") == "motion" for x in msgs) >= 8:
                    break
            await s.interrupt()
            new = np.zeros(16000, np.float32)
            await s.send_avatar_audio(new)
            await s.end()
            async for m in s.messages():
                msgs.append(m)
            return msgs
    msgs = run(main())
    frames = [m.motion.frame for m in msgs if m.WhichOneof("body") == "motion"]
    ev = [m.event for m in msgs if m.WhichOneof("body") == "event" and m.event.kind == pb.Event.INTERRUPTED]
    assert len(ev) == 1
    playback = ev[0].first_frame
    assert 8 <= playback < 100, "the interrupt did not drop the buffered audio"
    # every frame once, in order: the old audio up to the playback position, then the new second
    assert frames == list(range(playback + 25))
    i_event = next(i for i, m in enumerate(msgs) if m.WhichOneof("body") == "event")
    assert all(m.motion.frame < playback for m in msgs[:i_event] if m.WhichOneof("body") == "motion")


def test_drain_refuses_new_sessions_and_finishes_running_ones(make_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    st, target = make_server(drain_timeout_s=60)
    n = int(np.ceil(1.2 * config.FPS))
    seen = {}

    async def main():
        async with AvatarClient(target) as c:
            running = asyncio.get_running_loop().create_task(
                stream_inputs(c, Inputs(_audio(1.2, seed=5)), output="motion", realtime=True))
            while not st.server.sessions:
                await asyncio.sleep(0.02)
            seen["stopped_before"] = st.server.stopped
            drainer = threading.Thread(target=st.drain, daemon=True)
            drainer.start()
            while not st.server.draining:
                await asyncio.sleep(0.01)
            health = health_pb2_grpc.HealthStub(c.channel)
            seen["health"] = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
            seen["new"] = await _status_of(c.open(output="motion"))
            res = await running
            drainer.join(30)
            seen["stopped"] = not drainer.is_alive()
            return res
    res = run(main())
    assert seen["health"] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert seen["new"][0] == grpc.StatusCode.UNAVAILABLE and "draining" in seen["new"][1]
    assert res.motion_frames == list(range(n)) and res.events[-1].kind == pb.Event.ENDED
    assert seen["stopped"]
    assert seen["stopped_before"] is False and st.server.stopped     # what a Serve ingress's health check reads


def test_health_reflection_and_metrics(make_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    st, target = make_server()
    mserver = metrics.serve_metrics(0, addr="127.0.0.1")
    try:
        async def main():
            async with AvatarClient(target) as c:
                h = health_pb2_grpc.HealthStub(c.channel)
                ok = (await h.Check(health_pb2.HealthCheckRequest(service="echo_stream.v1.AvatarStream"))).status
                r = reflection_pb2_grpc.ServerReflectionStub(c.channel)
                call = r.ServerReflectionInfo()
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                services = [s.name for s in (await call.read()).list_services_response.service]
                await call.done_writing()
                res = await stream_inputs(c, Inputs(_audio(0.8)), portrait=open(PORTRAIT, "rb").read(),
                                          size=SIZE, realtime=False)
                return ok, services, res
        ok, services, res = run(main())
        assert ok == health_pb2.HealthCheckResponse.SERVING
        assert {"echo_stream.v1.AvatarStream", "grpc.health.v1.Health"} <= set(services)
        assert len(res.video) > 0 and res.stats.frames == 20
        text = urllib.request.urlopen(f"http://127.0.0.1:{mserver.server_port}/metrics", timeout=10).read().decode()
        for name in ("echo_stream_sessions_active", "echo_stream_frames_total", "echo_stream_errors_total",
                     "echo_stream_stage_latency_seconds_bucket", "echo_stream_frame_latency_seconds_bucket",
                     "echo_stream_queue_depth", "echo_stream_diffusion_batch_size_bucket",
                     "echo_stream_sessions_total"):
            assert name in text, name
        assert re.search(r'echo_stream_frames_total\{kind="motion"\} [1-9]', text)
        assert "session_id" not in text and res.session_id not in text   # no per-session labels
    finally:
        mserver.shutdown()


def test_push_decode_bounds_what_one_session_can_buffer():
    """Pushed input a shared decode actor must not hold without bound: extreme frame shapes are squeezed,
    user media far ahead of the avatar audio and one message decoding to minutes of audio are refused."""
    from echo_stream.errors import InputError
    from echo_stream.serve.wire import InputChecker, Limits
    from echo_stream.stages.decode import MAX_USER_VIDEO_ASPECT, DecodeStage, working_size

    assert working_size(640, 480) == (192, 144)
    assert working_size(16, 69000) == (192, MAX_USER_VIDEO_ASPECT * 192)
    tall = pb.ClientMessage(seq=1, pts=0.0, user_video=pb.VideoFrame(raw_rgb=bytes(16 * 6000 * 3), width=16,
                                                                      height=6000))
    with pytest.raises(InputError, match="aspect ratio"):
        InputChecker(Limits()).check(tall)

    d = DecodeStage()
    d.open_stream("s")
    frame = np.zeros((24, 32, 3), np.uint8)
    item = ("user_video", {"raw": frame.tobytes(), "width": 32, "height": 24})
    d.push("s", [item] * 200)                       # 8 s of video ahead of no avatar audio: accepted
    with pytest.raises(InputError, match="user_video.*ahead of the avatar audio"):
        d.push("s", [item] * 100)
    d.open_stream("b")
    with pytest.raises(InputError, match="user_blendshapes.*ahead"):
        d.push("b", [("blendshapes", {"values": {"jawOpen": 0.1}})] * 300)
    d.open_stream("m")
    with pytest.raises(InputError, match="avatar_audio.encoded.*real-time-sized pieces"):
        d.push("m", [("avatar_audio", {"encoded": _mp3_bytes(_audio(6.0, seed=2)), "codec": "mp3"})])


def test_push_decode_paths():
    """The decode stage's pushed input: PCM at other rates / stereo, encoded mp3 pieces, raw frames resized."""
    from echo_stream.stages.decode import DecodeStage
    from echo_stream import schemas

    d = DecodeStage()
    d.open_stream("s")
    x = _audio(1.0, seed=1)
    stereo48 = np.repeat(np.interp(np.arange(48000) / 3, np.arange(16000), x)[:, None], 2, 1)
    pcm = (np.clip(stereo48, -1, 1) * 32767).astype("<i2").tobytes()
    frame = np.full((120, 160, 3), 128, np.uint8)
    p, info = d.push("s", [("avatar_audio", {"pcm": pcm, "format": "s16le", "rate": 48000, "channels": 2}),
                           ("user_video", {"raw": frame.tobytes(), "width": 160, "height": 120}),
                           ("blendshapes", {"values": {"jawOpen": 0.5}})])
    assert info["first_frame"] == 0 and 23 <= info["frames"] <= 25
    v = p.get(schemas.VIDEO_FRAMES)
    assert schemas.column(v, "image").shape[1:] == (144, 192, 3)       # the working size, aspect kept
    assert p.rows(schemas.USER_BLENDSHAPES) == 1
    p2, info2 = d.push("s", [], end=True)
    assert info2["first_frame"] == info["frames"] and p2.end

    data = _mp3_bytes(x)
    d.open_stream("m")
    total = 0
    for i in range(0, len(data), 500):
        _, inf = d.push("m", [("avatar_audio", {"encoded": data[i:i + 500], "codec": "mp3"})])
        total += inf["frames"]
    assert 20 <= total <= 28      # encoder delay / padding
    with pytest.raises(InputError, match="unknown audio decoder"):
        d.open_stream("z")
        d.push("z", [("avatar_audio", {"encoded": b"abc", "codec": "no-such-codec"})])


def test_cli_help_explains():
    for argv in (["serve", "--help"], ["client", "--help"], ["bench", "serve", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0


def _self_signed(tmp_path):
    x509 = pytest.importorskip("cryptography.x509")
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_tls_with_token(make_server, tmp_path):
    cert, key = _self_signed(tmp_path)
    st, target = make_server(tokens={ALICE: "alice"}, tls_cert=cert, tls_key=key)
    port = target.rsplit(":", 1)[1]

    async def main():
        async with AvatarClient(f"localhost:{port}", token=ALICE, tls_ca=cert) as c:
            res = await stream_inputs(c, Inputs(_audio(0.4)), output="motion", realtime=False)
        async with AvatarClient(f"localhost:{port}", token=ALICE) as plain:     # plaintext to a TLS port fails
            code, _ = await _status_of(plain.open(output="motion"))
        return res, code
    res, code = run(main())
    assert res.motion_frames == list(range(10))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_serve_refuses_public_bind_without_tokens(monkeypatch, capsys):
    monkeypatch.delenv(auth.ENV, raising=False)
    rc = cli.main(["serve", "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "needs bearer tokens" in err and "--tokens-file" in err


def test_grafana_dashboard_uses_real_metrics():
    import json
    from pathlib import Path

    import prometheus_client

    dash = json.loads((Path(__file__).parent.parent / "dashboards" / "grafana_echo_stream.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"(?:ray_)?echo_stream_\w+", e)}
    known = {m.name for m in prometheus_client.REGISTRY.collect() if m.name.startswith("echo_stream_")}
    known |= {"ray_echo_stream_actor_call_seconds", "ray_echo_stream_actor_errors"}
    known = {k[:-6] if k.endswith("_total") else k for k in known}
    used = {u[:-6] if u.endswith("_total") else u for u in used}
    assert used and used <= known, sorted(used - known)


def test_batcher_stacks_windows_of_concurrent_sessions(backend):
    """Windows of three sessions ready together go to diffusion as ONE model call, with the same motion
    as when each session runs alone (the diffusion stage keeps per-session seeds and previous motion)."""
    from echo_stream.serve.batching import WindowBatcher

    def windows(sid, seed):
        backend.runner.hosts["decode"].call("open_stream", sid)
        backend.runner.hosts["diffusion"].call("set_seed", sid, seed)
        a = _audio(0.8, seed=seed)
        pk, _ = backend.runner.hosts["decode"].call("push", sid, [("avatar_audio", {
            "pcm": a.astype("<f4").tobytes(), "format": "f32le", "rate": 16000, "channels": 1})], True)
        feats = backend.runner.hosts["features"].call("process", pk)
        return backend.runner.hosts["memory"].call("process", feats)

    async def batched(tag):
        b = WindowBatcher(backend, max_batch=8, max_wait_s=0.2)
        b.start()
        wins = [windows(f"{tag}{i}", i) for i in range(3)]
        outs = []
        for step in range(max(map(len, wins))):   # one window per session at a time, all sessions together
            outs.append(await asyncio.gather(*(b.submit(w[step]) for w in wins if step < len(w))))
        await b.stop()
        return b, outs

    async def alone(tag):
        b = WindowBatcher(backend, max_batch=1, max_wait_s=0.0)
        b.start()
        outs = []
        for i in range(3):
            outs.append([await b.submit(w) for w in windows(f"{tag}{i}", i)])
        await b.stop()
        return b, outs

    from echo_stream import schemas
    bb, together = run(batched("t"))
    ba, single = run(alone("s"))
    assert bb.max_seen == 3 and ba.max_seen == 1 and bb.batches < ba.batches

    def motion(p):
        mw = p.get(schemas.MOTION_WINDOW)
        return None if mw is None else schemas.column(mw, "motion")
    for i in range(3):
        got = [motion(step[i]) for step in together]
        want = [motion(p) for p in single[i]]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                np.testing.assert_allclose(g, w, atol=1e-5)


class _FailOnce(InlineBackend):
    """The in-process pipeline, whose memory stage 'dies' (StageFault) on its n-th process call."""

    def __init__(self, inner: InlineBackend, n: int):
        self.runner, self._pools = inner.runner, inner._pools
        self.n = n
        self.calls = 0

    def _run(self, stage, method, args, num_returns):
        if stage == "memory" and method == "process":
            self.calls += 1
            if self.calls == self.n:
                from echo_stream.serve.backend import StageFault
                raise StageFault("memory process died (test)")
        return super()._run(stage, method, args, num_returns)


class _HangOnce(InlineBackend):
    """The in-process pipeline, whose memory stage never answers its n-th process call (as a call Serve's
    router re-routes without end after a node loss): the handle it returns never resolves."""

    def __init__(self, inner: InlineBackend, n: int):
        self.runner, self._pools = inner.runner, inner._pools
        self.n = n
        self.calls = 0

    def call(self, stage, method, *args, num_returns=1, replica=0, session=None):
        if stage == "memory" and method == "process":
            self.calls += 1
            if self.calls == self.n:
                import concurrent.futures as cf

                from echo_stream.serve.backend import _Handle
                return _Handle(cf.Future())
        return super().call(stage, method, *args, num_returns=num_returns, replica=replica, session=session)


def _one_session(backend, opts, audio, encoded: bool = False):
    """One motion session of ``audio`` (PCM chunks, or mp3 when ``encoded``) through a server on ``backend``:
    (every message, the motion frames, the GAP events)."""
    st = ServerThread(backend, opts)
    target = f"127.0.0.1:{st.start()}"

    async def main():
        async with AvatarClient(target) as c:
            s = await c.open(output="motion")
            if encoded:
                data, seconds = _mp3_bytes(audio), len(audio) / 16000
                for i in range(0, len(data), 400):
                    await s._write(pb.ClientMessage(pts=seconds * i / len(data), avatar_audio=pb.AudioChunk(
                        encoded=data[i:i + 400], codec="mp3")))
            else:
                for i in range(0, len(audio), 1280):
                    await s.send_avatar_audio(audio[i:i + 1280])
            await s.end()
            return [m async for m in s.messages()]
    try:
        msgs = run(main())
    finally:
        st.stop()
    frames = [m.motion.frame for m in msgs if m.WhichOneof("body") == "motion"]
    gaps = [m.event for m in msgs if m.WhichOneof("body") == "event" and m.event.kind == pb.Event.GAP]
    return msgs, frames, gaps


def test_a_stage_call_that_never_answers_is_a_fault_the_session_recovers_from(backend):
    """A result that never comes back (no error either) would hold the session for ever: after the deadline the
    session takes it as a fault, re-opens its stages and replays the input in flight — every frame once, one GAP
    event, the session ends."""
    hang = _HangOnce(backend, n=3)
    msgs, frames, gaps = _one_session(hang, ServeOptions(port=0, stage_call_deadline_s=1.0), _audio(3.0, seed=7))
    assert hang.calls > 3                        # the session went on past the call that never answered
    assert len(gaps) == 1 and gaps[0].frames == 0 and "replayed" in gaps[0].message
    assert msgs[-1].event.kind == pb.Event.ENDED and frames == list(range(75))


def _mp3_bytes(x):
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as c:
        s = c.add_stream("libmp3lame", rate=16000, layout="mono")
        for i in range(0, len(x), 1152):
            f = av.AudioFrame.from_ndarray(x[None, i:i + 1152].astype(np.float32), format="fltp", layout="mono")
            f.sample_rate = 16000
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)
    return buf.getvalue()


@pytest.mark.parametrize("encoded", [False, True])
def test_stage_fault_replays_or_announces_the_gap(backend, encoded):
    """A stage failure mid-session: the input in flight is replayed (nothing lost), PCM and encoded audio alike
    (encoded audio is decoded at the ingress: what is in flight is PCM, which can be cut at a frame). Each frame
    leaves at most once, in order, and every missing frame would be inside a GAP event."""
    msgs, frames, gaps = _one_session(_FailOnce(backend, n=3), ServeOptions(port=0), _audio(3.0, seed=6), encoded)
    assert len(gaps) == 1 and msgs[-1].event.kind == pb.Event.ENDED
    assert frames == sorted(set(frames))
    lost = set(range(gaps[0].first_frame, gaps[0].first_frame + gaps[0].frames))
    top = max(frames + sorted(lost), default=-1)
    assert not lost & set(frames) and set(range(top + 1)) - set(frames) <= lost
    assert gaps[0].frames == 0 and "replayed" in gaps[0].message
    # mp3 adds its encoder delay and padding (a frame or two) to the 3 s
    assert frames == list(range(len(frames))) and (75 <= len(frames) <= 78 if encoded else len(frames) == 75)


def test_client_vanishing_mid_session_frees_everything(make_server, backend):
    st, target = make_server()

    async def main():
        c = AvatarClient(target)
        s = await c.open(output="both", portrait=open(PORTRAIT, "rb").read(), size=SIZE)
        await s.send_avatar_audio(_audio(1.0))
        async for m in s.messages():
            if m.WhichOneof("body") == "motion":
                break
        await c.close()                                  # no END: the connection just goes away
        for _ in range(200):
            if not st.server.sessions:
                break
            await asyncio.sleep(0.05)
        return s.session_id
    sid = run(main())
    assert not st.server.sessions
    time.sleep(0.5)                                      # the stages' close_session calls are queued FIFO
    for name, host in backend.runner.hosts.items():
        held = [k for k in getattr(host.stage, "_sessions", {}) if k.startswith(sid)]
        assert not held, f"stage {name} still holds {held}"


def test_sessions_with_different_strides_share_the_pipeline(make_server):
    """A low-latency session (6 new frames per window) next to a default one (16 new frames) on the same audio:
    both get every frame once, in order; the low-latency session's motion is the same as when it runs alone
    (windows of different strides never mix up their previous motion), and the stride changed the generation."""
    st, target = make_server(motion_stride=16)
    n = int(np.ceil(1.6 * config.FPS))
    a = _audio(1.6, seed=4)

    async def main():
        async with AvatarClient(target) as c:
            both = await asyncio.gather(
                stream_inputs(c, Inputs(a), output="motion", realtime=True, seed=3, stride=6),
                stream_inputs(c, Inputs(a), output="motion", realtime=True, seed=3))
            alone = await stream_inputs(c, Inputs(a), output="motion", realtime=False, seed=3, stride=6)
            return both, alone
    (r6, r16), alone = run(main())
    assert r6.motion_frames == r16.motion_frames == alone.motion_frames == list(range(n))
    np.testing.assert_allclose(np.stack(r6.motion), np.stack(alone.motion), rtol=0, atol=1e-5)
    assert not np.allclose(np.stack(r6.motion), np.stack(r16.motion), atol=1e-3)


def test_streams_waiting_for_their_config_are_capped_and_strangers_wait_briefly(make_server):
    """Connections that never send a SessionConfig cannot pile up, and strangers never take what authenticated
    callers need: streams without a known token hold slots of their own, a few per peer address (beyond: refused
    at once), each dropped after ~1 s (UNAUTHENTICATED); authenticated streams still waiting for their config are
    capped by max_pending_streams, which strangers do not count towards."""
    st, target = make_server(tokens={ALICE: "alice"}, limits=Limits(
        max_pending_streams=1, max_unauthenticated_per_peer=2, unauthenticated_config_timeout_s=0.5))

    async def main():
        async with aio.insecure_channel(target) as ch:
            rpc = ch.stream_stream(SESSION_METHOD, request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=pb.ServerMessage.FromString)
            t = time.monotonic()
            silent = [rpc() for _ in range(2)]                # no token, no first message: held ~0.5 s
            while sum(st.server._strangers.values()) < 2:
                await asyncio.sleep(0.01)
            third = await _status_of(rpc().read())             # the peer's third: refused at once
            async with AvatarClient(target, token=ALICE) as alice:   # strangers hold nothing alice needs
                s = await alice.open(output="motion")
                held = rpc(metadata=(("authorization", f"Bearer {ALICE}"),))   # alice's pending stream ...
                while st.server._pending < 1:
                    await asyncio.sleep(0.01)
                # ... fills her one pending slot: a second one is refused before its first message is read (a raw
                # stream that writes nothing: a client still writing its config could see its write fail first)
                second = await _status_of(rpc(metadata=(("authorization", f"Bearer {ALICE}"),)).read())
                held.cancel()
                await s.end()
                async for _ in s.messages():
                    pass
            codes = [await _status_of(c.read()) for c in silent]
            return third, second, codes, time.monotonic() - t
    third, second, codes, waited = run(main())
    assert third[0] == grpc.StatusCode.UNAUTHENTICATED and "too many streams" in third[1]
    assert second[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "SessionConfig" in second[1]
    assert all(c == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in d for c, d in codes) and waited < 10
    for _ in range(100):
        if not st.server._pending and not st.server._strangers:
            break
        time.sleep(0.02)
    assert st.server._pending == 0 and not st.server._strangers
