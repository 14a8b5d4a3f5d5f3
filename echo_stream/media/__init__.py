"""Media I/O with PyAV: decode audio/video, load images, write H.264+AAC MP4.

Everything goes through PyAV (libav* in-process; no ffmpeg command line).

Reading
-------
* :func:`decode_audio` / :func:`iter_audio_chunks`: any audio PyAV reads (wav,
  mp3, m4a/aac, ogg/opus/vorbis, flac, the audio track of a video, ...), any
  sample rate, mono/stereo/multichannel, resampled with ``av.AudioResampler`` to
  16 kHz mono float32 in [-1, 1] (stereo is averaged, more channels are first
  downmixed to stereo by libswresample).
* :func:`iter_video_frames`: RGB frames resampled onto a constant frame-rate
  grid by timestamp (variable frame rate input is handled).
* :func:`probe` / :func:`read_mp4_info`: stream facts without decoding.
* :func:`load_image`: a portrait image through Pillow.

Timestamps: each stream's own start is t = 0. A file whose audio (or video)
starts at a non-zero time (an mkv cut from a longer recording, an mp4 with an
edit list, a webcam recording that began late) is decoded as if its first
decoded frame were at 0 s: nothing is prepended and nothing is dropped.
Encoder delay that the container marks for skipping (mp3 LAME/Info gapless
data, mp4 AAC priming edit lists, Opus pre-skip) is skipped by the decoder.
After the start, audio timestamps are honoured: a jump of more than
``AUDIO_GAP_FILL_S`` between a frame's timestamp and the samples decoded so far
(a recording with a dropout) is filled with silence so that later audio stays
in place; smaller jitter and overlaps are ignored (samples stay contiguous). A
single jump longer than ``MAX_AUDIO_GAP_S`` is not a dropout but broken timing
(a few KB claiming an hour): it raises :class:`~echo_stream.errors.InputError`
instead of allocating the silence.

Errors: every problem with an input raises :class:`~echo_stream.errors.InputError`
``(path, problem)`` with a one-line, actionable message; no ``av`` exception
escapes these functions.

Modules
-------
``inputs`` (opening and checking files), ``probe``, ``audio``, ``video``, ``images``, ``mp4`` (the
writer), ``fmp4`` (the streaming encoder); every public name is importable from ``echo_stream.media``.

Writing
-------
:class:`Mp4Writer` writes H.264 (libx264, yuv420p) + AAC MP4 atomically (temp
file + ``os.replace``), or fragmented MP4 into any writable file-like object
for streaming; :class:`FragmentedMp4Encoder` wraps the latter and hands back
``bytes`` chunks.
"""
from __future__ import annotations

from .checks import check_audio, check_float_audio, check_ogg_complete
from .audio import AUDIO_GAP_FILL_S, MAX_AUDIO_GAP_S, AudioChunker, decode_audio, iter_audio_chunks
from .fmp4 import FragmentedMp4Encoder
from .images import load_image
from .inputs import set_decode_threads
from .mp4 import Mp4Writer
from .probe import MediaInfo, probe, read_mp4_info
from .video import iter_video_frames

__all__ = [
    "MediaInfo", "probe", "read_mp4_info", "set_decode_threads",
    "check_audio", "check_float_audio", "check_ogg_complete",
    "decode_audio", "iter_audio_chunks", "AudioChunker",
    "iter_video_frames", "load_image",
    "Mp4Writer", "FragmentedMp4Encoder",
    "AUDIO_GAP_FILL_S", "MAX_AUDIO_GAP_S",
]
