"""Arguments of ``echo-stream generate`` and ``echo-stream demo`` (and the model options they share)."""
from __future__ import annotations

import argparse

EPILOG_GENERATE = """\
examples:
  echo-stream generate --portrait me.jpg --avatar-audio reply.wav -o out.mp4
  echo-stream generate --portrait me.jpg --avatar-audio reply.mp3 \\
      --user-video webcam.mp4 --transcript chat.srt -o out.mp4 --motion-out motion.parquet

Inputs may be any audio/video PyAV opens (wav, mp3, m4a, ogg/opus, flac, mp4,
mkv, webm, mov; any sample rate, mono or stereo, variable frame rate). The
portrait is a png/jpeg photo; the face is found automatically, or placed from a
landmarks sidecar (PORTRAIT.landmarks.json beside it, or --landmarks).
Outputs appear only when complete: nothing partial is left on failure.
"""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--config``, ``--device``."""
    p.add_argument("--checkpoint", metavar="PATH",
                   help="model checkpoint (directory with model.safetensors + config.json); "
                        "default: the bundled tiny checkpoint")
    p.add_argument("--config", metavar="NAME|PATH",
                   help="model config: tiny (CPU default), base (GPU reference) or a JSON file")
    p.add_argument("--device", default="cpu", help="torch device for diffusion and render (cpu, cuda)")


def add_input_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The inputs and run options of ``generate`` (portrait, audio, user media, transcript, ...)."""
    p.add_argument("--portrait", metavar="IMAGE", required=required, help="the avatar's reference photo (png/jpeg)")
    p.add_argument("--avatar-audio", metavar="AUDIO", required=required,
                   help="the avatar's own speech (drives the lips); defines the output duration")
    p.add_argument("--user-video", metavar="VIDEO", help="the human user's webcam video (drives reactions); "
                   "its audio track is the user audio unless --user-audio is given")
    p.add_argument("--user-audio", metavar="AUDIO", help="the human user's microphone audio")
    p.add_argument("--transcript", metavar="TEXT",
                   help="conversation transcript: a .txt/.srt/.vtt/.json file, or the text itself")
    p.add_argument("--landmarks", metavar="JSON", help="landmarks sidecar for the portrait (precise placement)")
    p.add_argument("--size", type=int, default=256, help="output resolution in pixels (square, even; default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same inputs + seed = same motion)")
    p.add_argument("--motion-out", metavar="MOTION.parquet",
                   help="also write the motion: frame, pts and one column per ARKit blendshape / head pose channel")
    p.add_argument("--no-ray", action="store_true",
                   help="run the stages in this process instead of Ray actors (debugging)")
    p.add_argument("--address", metavar="RAY_ADDRESS", help="connect to a running Ray cluster instead of local Ray")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(p)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream generate``."""
    p.epilog = EPILOG_GENERATE
    add_input_arguments(p)
    p.add_argument("-o", "--out", metavar="OUT.mp4", help="output video: H.264 25 fps + the avatar audio as AAC")
    p.add_argument("--json", action="store_true", help="print timing figures as JSON when done")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``echo-stream demo``."""
    p.add_argument("-o", "--out", metavar="OUT.mp4", default="out/demo.mp4", help="output video (default out/demo.mp4)")
    p.add_argument("--motion-out", metavar="MOTION.parquet", default="out/demo_motion.parquet")
    p.add_argument("--no-ray", action="store_true", help="run the stages in-process instead of Ray actors")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(p)
