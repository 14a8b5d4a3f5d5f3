"""The stage replicas close what a lost ingress left (sessions nobody calls or keeps), on both engines, on a
local Ray (the host's own rules, with a test clock: tests/test_stage_host.py)."""
import asyncio
import time

import pytest

from .served import ray_backend


@pytest.mark.parametrize("engine", ["actors", "serve"])
def test_replicas_close_the_sessions_no_ingress_keeps(engine):
    with ray_backend(engine=engine, stage_idle_s=2.0) as b:
        async def main():
            for sid in ("lost/0", "kept/0"):          # "lost": its ingress is gone; "kept": a silent session
                await b.get(b.call("decode", "open_stream", sid, session=sid))
            deadline = time.monotonic() + 60
            held = 2
            while held > 1:                           # any stage call sweeps (here at most every second)
                assert time.monotonic() < deadline, "the lost session's state was never closed"
                await b.keep_sessions({("decode", 0): ["kept/0"]})
                await asyncio.sleep(0.3)
                held = await b.get(b.call("decode", "sessions"))
            await b.keep_sessions({("decode", 0): ["kept/0"]})
            await b.get(b.call("decode", "push", "kept/0", [], session="kept/0"))   # its state is there
            with pytest.raises(Exception, match="unknown pushed session 'lost/0'"):
                await b.get(b.call("decode", "push", "lost/0", [], session="lost/0"))
        asyncio.run(main())
