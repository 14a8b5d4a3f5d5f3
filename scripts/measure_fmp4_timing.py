"""Timing of the served fragmented MP4 (``FragmentedMp4Encoder`` with the server's settings).

    .venv/bin/python scripts/measure_fmp4_timing.py [OUT.mp4]

For a real speech clip and a click train: each track's timescale and edit list, the video samples'
durations and first pts, the frame rate the stream reads as, and how far the decoded audio (placed by
its timestamps) lags the source, by cross-correlation. ``tests/test_media.py`` asserts the same facts.
"""
from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echo_stream import media  # noqa: E402
from tests import mediagen as mg  # noqa: E402
from tests.fmp4_timing import audio_offset_s, parse_fmp4, presented_audio, served_stream  # noqa: E402

SR, N, LEAD = 16000, 75, 3


def main(out: str) -> None:
    frames = mg.face_frames(N, 64, 48, motion="nod")
    speech = media.decode_audio(REPO / "tests" / "data" / "tts" / "tts0.ogg")[:(N + LEAD) * 640]
    clicks = np.zeros((N + LEAD) * 640, np.float32)
    clicks[::4000] = 0.9
    for name, audio in (("speech tts0.ogg", speech), ("click train 4 Hz", clicks)):
        data = served_stream(frames, audio, lead=LEAD)
        Path(out).write_bytes(data)
        for t in parse_fmp4(data).values():
            durs = [d for _, d, _ in t.samples]
            print(f"[{name}] track {t.track_id} {t.handler}: timescale {t.timescale}, edit list {t.edits}, "
                  f"{len(durs)} samples, first pts {t.pts[0]}, first durations {durs[:3]}, "
                  f"distinct durations {sorted(set(durs))}")
        with av.open(out) as c:
            v = c.streams.video[0]
            print(f"[{name}] video reads {float(v.average_rate):.3f} fps over {float(v.duration * v.time_base):.4f} s")
        lag = audio_offset_s(audio, presented_audio(out, SR), SR)
        print(f"[{name}] decoded audio lags the source by {lag * 1000:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/served_fmp4_timing.mp4")
