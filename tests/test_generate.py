"""End-to-end ``generate`` through the Ray actor pipeline, on media the tests make, and bad inputs."""
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from echo_stream import cli, config, media, motion
from echo_stream.generate import GenerateRequest, generate
from echo_stream.pipeline import PipelineOptions

from . import mediagen

PORTRAIT = str(cli.ASSETS / "portrait.jpg")
SIZE = 96


@pytest.fixture(scope="module")
def ray_runner():
    ray = pytest.importorskip("ray")
    from echo_stream.pipeline import RayRunner

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    runner = RayRunner(PipelineOptions(size=(SIZE, SIZE)))
    runner.setup()
    yield runner
    runner.shutdown()
    ray.shutdown()


def _outputs_ok(out, motion_out, audio_s):
    info = media.probe(out)
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert (info.width, info.height) == (SIZE, SIZE) and abs(info.fps - 25) < 1e-6
    n = math.ceil(audio_s * config.FPS - 1e-6)
    frames = sum(1 for _ in media.iter_video_frames(out))
    assert abs(frames - n) <= 1
    assert abs(info.duration - audio_s) <= 1 / config.FPS + 0.03  # AAC priming/padding tolerance
    t = pq.read_table(motion_out)
    assert t.column_names[:2] == ["frame", "pts"] and tuple(t.column_names[2:]) == motion.CHANNELS
    assert {"jawOpen", "eyeBlinkLeft", "headPitch", "headYaw", "headRoll", "headTx"} <= set(t.column_names)
    assert t.num_rows == n and t.column("frame").to_pylist() == list(range(n))
    assert np.allclose(t.column("pts").to_numpy(), np.arange(n) / 25)
    return t


CASES = [
    # avatar audio: ext, rate, channels;  user: video ext (None = no user), VFR
    ("mp3", 44100, 2, "webm", True),
    ("m4a", 22050, 1, "mp4", False),
    ("ogg", 48000, 2, None, False),
    ("flac", 8000, 1, "mkv", False),
]


@pytest.mark.ray
@pytest.mark.parametrize("ext,rate,channels,user_ext,vfr", CASES)
def test_generate_through_ray(tmp_path, ray_runner, ext, rate, channels, user_ext, vfr):
    dur = 1.37
    avatar = mediagen.write_audio(tmp_path / f"avatar.{ext}", mediagen.speech_like(dur, rate, seed=3), rate,
                                  channels=channels)
    user_video = None
    if user_ext:
        n = 40
        pts = np.cumsum(np.r_[0, np.random.default_rng(0).uniform(0.02, 0.07, n - 1)]) if vfr else None
        user_video = str(mediagen.write_video(tmp_path / f"user.{user_ext}", mediagen.face_frames(n, 160, 120, motion="nod"),
                                              pts=pts, audio=mediagen.speech_like(1.6, 48000, seed=4), audio_rate=48000))
    out, mo = tmp_path / "out.mp4", tmp_path / "m.parquet"
    req = GenerateRequest(portrait=PORTRAIT, avatar_audio=str(avatar), user_video=user_video,
                          transcript="[0-1] user: I got the job!", out=str(out), motion_out=str(mo), size=SIZE)
    stats = generate(req, progress=False, runner=ray_runner)
    real = len(media.decode_audio(avatar)) / config.SAMPLE_RATE
    _outputs_ok(str(out), str(mo), real)
    assert stats["frames"] == math.ceil(real * 25 - 1e-6)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.ray
def test_same_seed_same_motion_and_user_changes_it(tmp_path, ray_runner):
    avatar = mediagen.write_audio(tmp_path / "a.wav", mediagen.speech_like(1.2, 16000, seed=5), 16000)
    user = mediagen.write_video(tmp_path / "u.mp4", mediagen.face_frames(30, 160, 120, motion="shake"),
                                audio=mediagen.speech_like(1.2, 16000, seed=6), audio_rate=16000)
    tables = []
    for i, uv in enumerate([None, None, str(user)]):
        mo = tmp_path / f"m{i}.parquet"
        generate(GenerateRequest(portrait=PORTRAIT, avatar_audio=str(avatar), user_video=uv, motion_out=str(mo),
                                 size=SIZE, seed=11), progress=False, runner=ray_runner)
        t = pq.read_table(mo)
        tables.append(np.stack([t.column(c).to_numpy() for c in motion.CHANNELS], 1))
    assert np.array_equal(tables[0], tables[1])
    assert not np.allclose(tables[0], tables[2])


def _write_bad(tmp_path):
    good = mediagen.write_audio(tmp_path / "good.wav", mediagen.speech_like(2.0, 16000, seed=1), 16000)
    bad = {
        "missing": str(tmp_path / "nope.wav"),
        "not media": str(mediagen.write_text(tmp_path / "notes.wav")),
        "truncated": str(mediagen.write_truncated(mediagen.write_audio(
            tmp_path / "long.mp3", mediagen.speech_like(2.0, 44100), 44100), tmp_path / "trunc.mp3", 0.02)),
        "no audio": str(mediagen.write_video(tmp_path / "silent.mp4", mediagen.face_frames(10, 64, 64))),
        "zero-length": str(mediagen.write_audio(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)),
    }
    return str(good), bad


@pytest.mark.parametrize("case,needle", [
    ("missing", "not found"), ("not media", "not"), ("truncated", ""), ("no audio", "no audio stream"),
    ("zero-length", "zero length"),
])
def test_bad_avatar_audio_one_line_error_and_no_output(tmp_path, capsys, case, needle):
    _, bad = _write_bad(tmp_path)
    out = tmp_path / "out.mp4"
    rc = cli.main(["generate", "--portrait", PORTRAIT, "--avatar-audio", bad[case], "-o", str(out),
                   "--motion-out", str(tmp_path / "m.parquet"), "--no-ray", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("echo-stream: error: ") and os.path.basename(bad[case]) in err[0]
    assert needle.lower() in err[0].lower()
    assert not out.exists() and not (tmp_path / "m.parquet").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_bad_portrait(tmp_path, capsys):
    good, _ = _write_bad(tmp_path)
    for name, writer in [("portrait.png", lambda p: mediagen.write_text(p)),
                         ("portrait.gif", lambda p: p.write_bytes(b"GIF89a" + b"\0" * 10))]:
        p = tmp_path / name
        writer(p)
        rc = cli.main(["generate", "--portrait", str(p), "--avatar-audio", good, "-o", str(tmp_path / "o.mp4"),
                       "--no-ray", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and name in err[0]
        assert not (tmp_path / "o.mp4").exists()


def test_corrupt_in_the_middle_leaves_nothing(tmp_path, capsys):
    """Media that opens fine but breaks mid-stream: the error surfaces from the decode stage."""
    src = mediagen.write_audio(tmp_path / "src.mp3", mediagen.speech_like(3.0, 44100), 44100)
    bad = mediagen.write_corrupted(src, tmp_path / "mid.mp3", start_fraction=0.5)
    out = tmp_path / "o.mp4"
    rc = cli.main(["generate", "--portrait", PORTRAIT, "--avatar-audio", str(bad), "-o", str(out), "--no-ray",
                   "--quiet", "--size", "64"])
    err = capsys.readouterr().err
    if rc == 0:  # the decoder concealed the damage: then the output must be complete and valid
        assert media.probe(out).video_codec == "h264"
    else:
        assert "mid.mp3" in err and not out.exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_cli_exit_status_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "echo_stream.cli", "generate", "--portrait", PORTRAIT,
                        "--avatar-audio", str(tmp_path / "missing.wav"), "-o", str(tmp_path / "o.mp4")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "missing.wav" in r.stderr and "Traceback" not in r.stderr


def test_help_explains():
    for argv in (["--help"], ["generate", "--help"], ["demo", "--help"], ["bench", "pipeline", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0


@pytest.mark.ray
def test_sigterm_mid_run_exits_143_and_leaves_nothing(tmp_path):
    """SIGTERM while the stages run: one line, exit 143, no partial output (not Ray's native stack dump)."""
    import signal
    import time

    wav = mediagen.write_audio(tmp_path / "long.wav", mediagen.speech_like(120.0, 16000), 16000)
    out, mo = tmp_path / "o.mp4", tmp_path / "m.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "echo_stream.cli", "generate", "--portrait", PORTRAIT,
                             "--avatar-audio", str(wav), "-o", str(out), "--motion-out", str(mo), "--size", "64"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = ""
    deadline = time.monotonic() + 400     # Ray's start-up on a loaded machine
    while "s audio" not in seen and time.monotonic() < deadline:   # the progress bar: the stages run
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
    assert "s audio" in seen, seen[-2000:]
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    rc = proc.wait(timeout=120)
    text = (seen + rest).replace("\r", "\n")
    assert rc == 143, (rc, text[-2000:])
    # the last line (the progress bar may end on the same line: it is drawn with carriage returns)
    assert text.rstrip().endswith("echo-stream: terminated (SIGTERM); no partial output was kept"), text[-2000:]
    assert "SIGTERM received" not in rest and "Traceback" not in rest
    assert not out.exists() and not mo.exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
