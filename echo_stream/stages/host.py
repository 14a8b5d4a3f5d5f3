"""StageHost: runs one stage, by method name, with time accounting.

Kept free of heavy imports (no torch, no librosa): an actor process imports
only what its own stage needs when the stage object is unpickled there.
"""
from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from typing import Callable

from . import Stage


class StageHost:
    """Hosts one stage: calls its methods by name and accounts the time spent in each.

    A Ray actor is this class made remote (``echo_stream.actors``); the inline
    runner uses it directly, so both paths share the accounting.
    """

    def __init__(self, factory: Callable[[], Stage]):
        self.stage = factory()
        self.busy: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        #: seconds of each method's first call (cold-start costs the stage's setup did not absorb)
        self.first_s: dict[str, float] = {}
        self.setup_s = 0.0
        #: differs after every (re)start of the process hosting the stage: a restarted actor lost its sessions
        self.incarnation = uuid.uuid4().hex

    def incarnation_id(self) -> str:
        return self.incarnation

    def setup(self) -> float:
        t = time.perf_counter()
        self.stage.setup()
        self.setup_s = time.perf_counter() - t
        return self.setup_s

    def call(self, method: str, *args, **kwargs):
        t = time.perf_counter()
        try:
            return getattr(self.stage, method)(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t
            self.busy[method] += dt
            self.calls[method] += 1
            self.first_s.setdefault(method, dt)

    def stats(self) -> dict:
        import resource

        return {"stage": self.stage.name, "setup_s": self.setup_s, "busy_s": dict(self.busy),
                "calls": dict(self.calls), "first_call_s": dict(self.first_s), "pid": os.getpid(),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
