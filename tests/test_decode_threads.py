"""FFmpeg thread settings (`media.set_decode_threads`, `preprocess.one_thread_per_library`) change how files
are decoded, never what comes out: frames, audio and conversation features are the same bit for bit."""
import cv2
import numpy as np
import pytest

from echo_stream import media, preprocess

from . import mediagen as mg
from .preprocess_helpers import write_conversation


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    media.set_decode_threads(None)
    cv2.setNumThreads(-1)


@pytest.mark.parametrize("ext", [".mp4", ".webm"])
def test_frames_and_audio_do_not_depend_on_decode_threads(tmp_path, ext):
    frames = mg.face_frames(30, 200, 150, motion="talk")
    path = mg.write_video(tmp_path / f"v{ext}", frames, fps=30, audio=mg.speech_like(1.0))
    got = {}
    for threads in (None, 1, 3):
        media.set_decode_threads(threads)
        for size in (None, (96, 72), (64, 64)):
            got[threads, size] = np.stack([f for _, _, f in media.iter_video_frames(path, fps=25, size=size)])
        got[threads, "audio"] = media.decode_audio(path)
    for (threads, what), value in got.items():
        assert np.array_equal(value, got[None, what]), (threads, what)
    assert got[None, (96, 72)].shape[1:] == (72, 96, 3)


def test_decode_threads_must_be_positive():
    with pytest.raises(ValueError):
        media.set_decode_threads(0)


def test_one_thread_per_library_gives_the_same_conversation_rows(tmp_path):
    row = write_conversation(tmp_path / "c", 0, 1.6, user="video")
    item = preprocess.make_items([row], tmp_path)[0][0]
    default = preprocess.process_input(item, preprocess.Settings())
    preprocess.one_thread_per_library()
    pinned = preprocess.process_input(item, preprocess.Settings())
    assert default["status"] == pinned["status"] == "done"
    assert default["table"].equals(pinned["table"])
    assert default["moments"] == pinned["moments"]
