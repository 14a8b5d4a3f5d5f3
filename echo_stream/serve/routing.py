"""Session affinity: which replica of each stage serves a session.

A session's state lives inside the stage actors (decoder, feature look-back, LCU memory, previous motion,
the portrait's renderer), so every call of one session must reach the same replica of a stage. The
:class:`Router` picks one replica per stage when a session opens — the one serving the fewest sessions,
ties broken by a stable hash of the session id — and the session records it (``Session.route``) and
addresses every call with it. It changes only when a replica stops answering: after a fault the session
re-opens under a new epoch from its checkpoint, possibly on another replica (:meth:`Router.move`).

The renderer's source-side work (placing a portrait, its flow bases) is cached per portrait in each render
replica: a session whose portrait a render replica has already prepared goes there (``warm``), unless that
replica already serves more than ``WARM_SLACK`` sessions beyond the least loaded one.

Diffusion windows are batched per diffusion replica (one ``WindowBatcher`` each), so a batch only ever
holds sessions whose state is on the replica that runs it.
"""
from __future__ import annotations

import hashlib

from ..chain import STAGES, replica_counts

#: a session's replica of each stage
Route = dict
#: how many more sessions than the least loaded replica a warm replica may hold and still be preferred
WARM_SLACK = 2
#: warm keys remembered per stage (the render replicas cache 32 portraits each)
WARM_KEYS = 4096


class Router:
    def __init__(self, counts: dict[str, int]):
        self.counts = replica_counts(counts)      # every stage, checked as --replicas is
        #: sessions routed to each replica
        self.load = {s: [0] * n for s, n in self.counts.items()}
        #: (stage, warm key) -> the replica that last prepared it (e.g. a portrait's digest -> render replica)
        self.warm: dict[tuple, int] = {}
        #: replicas being drained for removal (autoscaling down): no new sessions go there
        self.draining: dict[str, set] = {s: set() for s in STAGES}

    def _open(self, stage: str) -> list[int]:
        """The stage's replicas that take new sessions (all of them if every one is draining)."""
        n = self.counts[stage]
        return [i for i in range(n) if i not in self.draining[stage]] or list(range(n))

    def _pick(self, stage: str, key: str) -> int:
        n = self.counts[stage]
        h = int.from_bytes(hashlib.blake2b(f"{stage}/{key}".encode(), digest_size=8).digest(), "big")
        start = h % n
        # least loaded first; among equals the first one at or after the hash's position (stable per session)
        return min(self._open(stage), key=lambda i: (self.load[stage][i], (i - start) % n))

    def assign(self, key: str, warm: dict | None = None) -> Route:
        """A new session's replica of each stage (counted until :meth:`release`). ``warm``: ``{stage: key}`` of
        state a replica may already hold (a portrait's digest for render): the replica that prepared it last is
        taken while it holds at most ``WARM_SLACK`` sessions more than the least loaded one."""
        route = {}
        for s in STAGES:
            route[s] = self._pick(s, key)
            wk = (warm or {}).get(s)
            if wk is not None:
                hot = self.warm.get((s, wk))
                if hot is not None and hot < self.counts[s] and hot not in self.draining[s] and \
                        self.load[s][hot] <= min(self.load[s]) + WARM_SLACK:
                    route[s] = hot
                self.warm.pop((s, wk), None)        # re-inserted last: the oldest keys are forgotten first
                self.warm[(s, wk)] = route[s]
                while len(self.warm) > WARM_KEYS:
                    self.warm.pop(next(iter(self.warm)))
        for s, i in route.items():
            self.load[s][i] += 1
        return route

    def release(self, route: Route) -> None:
        for s, i in route.items():
            if self.load[s][i] > 0:
                self.load[s][i] -= 1

    def move(self, route: Route, stage: str, to: int) -> None:
        """Re-route ``route``'s ``stage`` to replica ``to`` (in place)."""
        self.load[stage][route[stage]] = max(0, self.load[stage][route[stage]] - 1)
        self.load[stage][to] += 1
        route[stage] = to

    def by_load(self, stage: str) -> list[int]:
        """The stage's replicas, least loaded first (those being drained last)."""
        return sorted(range(self.counts[stage]), key=lambda i: (i in self.draining[stage], self.load[stage][i], i))

    # -- autoscaling (``serve.autoscale``): replicas come and go at the end of the list
    def add(self, stage: str) -> int:
        """A new replica of ``stage`` (the last); returns its number."""
        self.counts[stage] += 1
        self.load[stage].append(0)
        return self.counts[stage] - 1

    def drain(self, stage: str, replica: int, on: bool = True) -> None:
        """Stop (``on``) or resume routing new sessions to ``replica``."""
        (self.draining[stage].add if on else self.draining[stage].discard)(replica)

    def remove_last(self, stage: str) -> int:
        """Forget the stage's last replica, which must serve no session; returns its number."""
        i = self.counts[stage] - 1
        if i < 1 or self.load[stage][i]:
            raise ValueError(f"{stage} replica {i} cannot be removed: it is the only one or serves sessions")
        self.counts[stage] -= 1
        self.load[stage].pop()
        self.draining[stage].discard(i)
        for k in [k for k, v in self.warm.items() if k[0] == stage and v == i]:
            del self.warm[k]
        return i
