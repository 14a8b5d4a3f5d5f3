"""Import a committed ``echo_stream_pb2.py`` by path and round-trip messages through it.

``python tests/protobuf_roundtrip.py PATH`` prints one JSON line: the protobuf
runtime version and implementation, every warning raised while importing the
module and using it, and ``"ok": true`` when every check passed (an exception
is reported as ``"error"``). It needs nothing but ``protobuf`` so that
``tests/test_protobuf_matrix.py`` can run it in a venv per protobuf release;
``tests/test_serve_protocol.py`` runs it under the project's own interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import traceback
import warnings


def load(path: str):
    spec = importlib.util.spec_from_file_location("echo_stream_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def roundtrip(pb) -> None:
    cfg = pb.ClientMessage(seq=0, pts=0.0, config=pb.SessionConfig(
        portrait_image=b"\x89PNG\r\n\x1a\n" + bytes(range(256)), output_mode=pb.OUTPUT_MODE_MOTION,
        width=256, height=256, fps=25, codec=pb.VIDEO_CODEC_RAW_RGB, seed=-7, has_seed=True, stride_frames=4))
    audio = pb.ClientMessage(seq=1, pts=0.04, avatar_audio=pb.AudioChunk(
        pcm_s16le=b"\x01\x00\xff\x7f" * 160, sample_rate=16000, channels=1))
    shapes = pb.ClientMessage(seq=2, pts=0.08, user_blendshapes=pb.Blendshapes(values={"jawOpen": 0.25, "headYaw": -0.5}))
    control = pb.ClientMessage(seq=3, pts=0.12, control=pb.Control(kind=pb.Control.INTERRUPT))
    for msg in (cfg, audio, shapes, control):
        back = pb.ClientMessage.FromString(msg.SerializeToString())
        assert back == msg, (msg, back)
    assert pb.ClientMessage.FromString(cfg.SerializeToString()).WhichOneof("body") == "config"
    assert pb.ClientMessage.FromString(cfg.SerializeToString()).config.WhichOneof("avatar") == "portrait_image"
    assert dict(pb.ClientMessage.FromString(shapes.SerializeToString()).user_blendshapes.values) == \
        {"jawOpen": 0.25, "headYaw": -0.5}

    opened = pb.ServerMessage(seq=0, opened=pb.SessionOpened(
        session_id="s" * 32, width=256, height=256, fps=25, motion_channels=["jawOpen", "headYaw"]))
    motion = pb.ServerMessage(seq=1, pts=0.04, motion=pb.MotionFrame(frame=1, values=[0.5, -0.25]))
    video = pb.ServerMessage(seq=2, pts=0.08, video=pb.VideoChunk(data=b"\x00\x00\x00\x18ftyp", first_frame=2, frames=1))
    event = pb.ServerMessage(seq=3, pts=0.12, event=pb.Event(
        kind=pb.Event.ENDED, message="done", first_frame=0, frames=3,
        stats=pb.SessionStats(frames=3, gap_frames=0, first_frame_latency_s=0.5, latency_p50_s=0.1,
                              latency_p99_s=0.2, interrupts=1, recoveries=0)))
    for msg in (opened, motion, video, event):
        back = pb.ServerMessage.FromString(msg.SerializeToString())
        assert back == msg, (msg, back)
    assert list(pb.ServerMessage.FromString(motion.SerializeToString()).motion.values) == [0.5, -0.25]
    assert pb.ServerMessage.FromString(event.SerializeToString()).event.stats.interrupts == 1

    reply = pb.SessionControlReply(playback_frame=12, playback_pts=0.48)
    assert pb.SessionControlReply.FromString(reply.SerializeToString()) == reply
    assert pb.OutputMode.Name(pb.OUTPUT_MODE_BOTH) == "OUTPUT_MODE_BOTH"
    assert pb.VideoCodec.Value("VIDEO_CODEC_H264_FMP4") == pb.VIDEO_CODEC_H264_FMP4 == 1
    assert pb.Event.Kind.Name(pb.Event.GAP) == "GAP"
    assert pb.DESCRIPTOR.package == "echo_stream.v1"
    service = pb.DESCRIPTOR.services_by_name["AvatarStream"]
    assert [m.name for m in service.methods] == ["Session", "Control"]
    # unknown fields (a newer client) survive a round trip
    newer = cfg.SerializeToString() + b"\xf8\x06\x01"   # field 111, varint 1
    assert pb.ClientMessage.FromString(newer).SerializeToString() == newer


def main(path: str) -> dict:
    report = {"python": sys.version.split()[0]}
    try:  # beside grpcio, as the server runs it (imported before the warnings are recorded: not ours)
        import grpc
        report["grpcio"] = grpc.__version__
    except ImportError:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            from google.protobuf import __version__ as protobuf_version
            from google.protobuf.internal import api_implementation
            report.update(protobuf=protobuf_version, implementation=api_implementation.Type())
            roundtrip(load(path))
            report["ok"] = True
        except BaseException as e:  # noqa: BLE001 - reported, the caller decides
            report.update(ok=False, error="".join(traceback.format_exception_only(type(e), e)).strip(),
                          traceback=traceback.format_exc())
    report["warnings"] = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
