"""Edge decoding: a session's encoded avatar / user audio decoded at the ingress into PCM items.

Encoded audio (mp3, aac, opus, flac ... pieces) is decoded here, before it is queued, to 16 kHz PCM: its
duration is then known, so it is paced by ``max_lead`` exactly like PCM, it can be replayed after a stage
fault, and bytes that are not what their codec says fail this session (INVALID_ARGUMENT) before a shared
stage sees them. Decoding runs in a small thread pool, off the event loop; the pacing bounds how much of
it a session can ask for.

:class:`EdgeDecoders` owns one decoder per track of the current reply (a new reply after an interrupt is
a new encoded stream: :meth:`EdgeDecoders.reset`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf

import numpy as np

from ... import config
from ...errors import EchoStreamError, InputError
from ...stages.decode import PushedAudio

#: encoded client audio is decoded here, off the event loop
_DECODE_POOL = cf.ThreadPoolExecutor(2, thread_name_prefix="edge-decode")


def pcm_item(y: np.ndarray, pts: float) -> dict:
    """A decoded piece of audio as the PCM item the decode stage takes (16 kHz mono float32)."""
    return {"pcm": np.asarray(y, "<f4").tobytes(), "format": "f32le", "rate": config.SAMPLE_RATE, "channels": 1,
            "seconds": len(y) / config.SAMPLE_RATE, "pts": float(pts)}


class EdgeDecoders:
    """The session's ingress decoders, by track (``avatar_audio`` / ``user_audio``)."""

    def __init__(self):
        self._by_track: dict[str, PushedAudio] = {}

    async def decode(self, kind: str, item: dict) -> dict | None:
        """An encoded piece as a PCM item, or None while its decoder has produced nothing yet."""
        dec = self._by_track.get(kind)
        if dec is None:
            dec = self._by_track[kind] = PushedAudio(kind)
        y = await self._run(kind, dec.convert, item)
        return pcm_item(y, item.get("pts", 0.0)) if len(y) else None

    async def finish(self) -> list[tuple[str, dict]]:
        """At END: what the decoders still hold, as (kind, PCM item) (raises InputError for a track whose
        bytes decoded to no audio at all)."""
        out = []
        for kind, dec in list(self._by_track.items()):
            y = await self._run(kind, dec.finish)
            if len(y):
                out.append((kind, pcm_item(y, 0.0)))
        self._by_track = {}
        return out

    def reset(self) -> None:
        """Forget the decoders (a new reply is a new encoded stream)."""
        self._by_track = {}

    @staticmethod
    async def _run(kind: str, fn, *args):
        """``fn(*args)`` of a decoder in the decode pool; what FFmpeg raises is the input's problem."""
        import av

        try:
            return await asyncio.get_running_loop().run_in_executor(_DECODE_POOL, fn, *args)
        except EchoStreamError:
            raise
        except av.FFmpegError as e:
            raise InputError(f"{kind}.encoded", f"not decodable ({type(e).__name__})") from None
