"""Shared by the replica tests: several sessions streamed at once, with a fault injected while all of them are
mid-stream, and the exactly-once check."""
from __future__ import annotations

import asyncio

import numpy as np

from echo_stream import cli, config
from echo_stream.protos import echo_stream_pb2 as pb

from . import mediagen
from .served import stream_around

PORTRAIT = str(cli.ASSETS / "portrait.jpg")


def frames_of(seconds: float) -> int:
    return int(np.ceil(seconds * config.FPS - 1e-6))


def gaps(res) -> list:
    return [e for e in res.events if e.kind == pb.Event.GAP]


def check_exactly_once(res, total_frames: int) -> None:
    """Every frame of the session at most once, in order; every missing one inside a GAP event; the session
    reached its end."""
    frames = res.motion_frames
    assert frames == sorted(frames) and len(frames) == len(set(frames)), "frames out of order or duplicated"
    lost = {f for e in gaps(res) for f in range(e.first_frame, e.first_frame + e.frames)}
    missing = set(range(total_frames)) - set(frames)
    assert missing == lost, f"frames missing without a gap event: {sorted(missing - lost)[:10]}"
    assert not (set(frames) & lost), "a frame announced as lost was delivered"
    assert res.events[-1].kind == pb.Event.ENDED, [(e.kind, e.message) for e in res.events]
    assert max(frames + sorted(lost)) == total_frames - 1, "the session did not continue to its end"


async def sessions_with_fault(target: str, n: int, seconds: float, fault, outputs=None, size: int = 96,
                              before_s: float | None = None) -> list:
    """``n`` sessions streamed at once (``outputs[i]``: "motion" or "both"); when every one of them has
    received 10 frames, ``await fault(session_ids)`` runs (None: no fault), then they send the rest of their
    audio and end. Returns their ``SessionResult`` s."""
    from echo_stream.serve.client import AvatarClient, SessionResult

    outputs = outputs or ["motion"] * n
    before_s = seconds / 2 if before_s is None else before_s
    portrait = open(PORTRAIT, "rb").read()
    mid = [asyncio.Event() for _ in range(n)]
    go = asyncio.Event()
    ids: list = [None] * n

    async def one(c, i):
        audio = mediagen.speech_like(seconds, 16000, seed=20 + i)
        cut = int(before_s * 16000)
        kw = {"portrait": portrait, "size": size} if outputs[i] == "both" else {}
        s = await c.open(output=outputs[i], seed=i, **kw)
        ids[i] = s.session_id
        async def rendezvous():      # every session mid-stream, then the fault, then on
            mid[i].set()
            await go.wait()
        return await stream_around(s, SessionResult(session_id=s.session_id), audio[:cut], audio[cut:], rendezvous)

    async with AvatarClient(target) as c:
        tasks = [asyncio.get_running_loop().create_task(one(c, i)) for i in range(n)]
        waiting = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in mid)))
        # until every session is mid-stream (or one of them ended early: its error is the one to see)
        await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED, timeout=180)
        for t in tasks:
            if t.done():
                t.result()
                raise AssertionError("a session ended before the fault")
        assert waiting.done(), "the sessions did not all start within 180 s"
        if fault is not None:
            await fault(list(ids))
        go.set()
        return await asyncio.gather(*tasks)
