#!/usr/bin/env python
"""Generate the real-speech lip-sync test clips in tests/data/tts/ (run once; the clips are committed).

espeak-ng (``apt-get install espeak-ng``) speaks a few sentences in different
voices; each is saved as 16 kHz mono Ogg/Opus.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_assets import tts, write_audio_ogg  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tts"
CLIPS = [
    ("en-us", 160, "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."),
    ("en-gb+f3", 145, "Please remember to bring your umbrella tomorrow, because the weather will be awful."),
    ("en-us+m3", 170, "Thank you so much for calling. How can I help you with your account today?"),
    ("en-gb", 150, "My mother made a marvellous pie, but Bob ate it before lunch."),
]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (voice, speed, text) in enumerate(CLIPS):
        write_audio_ogg(OUT / f"tts{i}.ogg", tts(text, voice, speed))
    (OUT / "README.md").write_text("Real synthetic speech (espeak-ng) for the lip-sync evaluation; made by "
                                   "scripts/make_tts_testdata.py.\n\n" +
                                   "\n".join(f"- tts{i}.ogg ({v}): {t}" for i, (v, _, t) in enumerate(CLIPS)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
