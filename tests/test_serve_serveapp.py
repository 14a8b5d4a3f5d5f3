"""The stages as a Ray Serve application (``serve --engine serve``, :mod:`echo_stream.serve.serve_engine`).

Without Ray: the call order a replica keeps per session, a call's several results, the request router's choice. With a real
local Ray Serve (no mocks): GPU shares on fake GPUs, and ``echo-stream serve --engine serve`` serving a session
in its own process. (Sessions spread over two diffusion replicas and a replica killed mid-session run on both
engines in ``test_serve_replicas.py``; the deployable application in ``test_serve_deploy.py``.)
"""
import asyncio
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from echo_stream import cli, config
from echo_stream.errors import InputError
from echo_stream.pipeline import PipelineOptions
from echo_stream.serve.pinning import PIN_KW, CallOrder, Pin, ReplicaGone, StuckCheck, rebind_slots

from . import mediagen

ray = pytest.importorskip("ray")


# ---------------------------------------------------------------------------------------------- no Ray
def test_serve_help_names_both_engines_where_it_matters(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "replicas per stage (actors, or Serve replicas with --engine serve)" in text
    assert "run the stages (actors, or the Serve application) on this Ray cluster" in text
    assert "deleted again when this process exits" in text and "serve deploy deploy/serve_config.yaml" in text



def test_call_order_runs_each_callers_calls_in_sequence():
    async def main():
        order, ran = CallOrder(skip_after_s=5.0), []

        async def one(caller, seq, delay):
            await asyncio.sleep(delay)                 # arrival order: reversed
            await order.turn(caller, seq)
            ran.append((caller, seq))
            await order.done(caller, seq)
        await asyncio.gather(*(one("a", k, 0.05 * (3 - k)) for k in range(4)), one("b", 0, 0.0))
        return ran, order.skipped
    ran, skipped = asyncio.run(main())
    assert [s for c, s in ran if c == "a"] == [0, 1, 2, 3] and ran[0] == ("b", 0) and skipped == 0


def test_call_order_moves_past_a_call_that_never_comes(caplog):
    async def main():
        order = CallOrder(skip_after_s=0.2)
        waiting = asyncio.create_task(order.turn("a", 1))   # seq 0 was refused elsewhere: never arrives
        await asyncio.sleep(0)
        held = not waiting.done()                      # it waits for seq 0 first ...
        await asyncio.wait_for(waiting, 10.0)          # ... then gives up on it
        await order.done("a", 1)
        nxt = asyncio.create_task(order.turn("a", 2))  # and the order goes on from there: no second wait
        await asyncio.sleep(0)
        return held, nxt.done(), order.skipped
    with caplog.at_level("WARNING", logger="echo_stream.serve.pinning"):
        held, went_on, skipped = asyncio.run(main())
    assert held and went_on and skipped == 1
    assert "waited 0.2 s for its calls 0..0 on this replica; running call 1 without them" in caplog.text


def test_call_order_a_call_given_up_before_its_turn_lets_no_later_call_overtake():
    async def main():
        order, ran = CallOrder(skip_after_s=30.0), []

        async def one(seq):
            try:
                await order.turn("a", seq)
                ran.append(seq)
            finally:                                   # as the replica does: done also when cancelled
                await order.done("a", seq)
        first, third = asyncio.create_task(one(1)), asyncio.create_task(one(2))
        await asyncio.sleep(0.01)                      # both wait for seq 0
        first.cancel()                                 # seq 1 gives up (its request was cancelled)
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert ran == [] and not third.done()          # seq 2 still waits for seq 0
        await one(0)
        await asyncio.wait_for(third, 10.0)            # and runs right after it, without a skip
        return ran, order.skipped
    ran, skipped = asyncio.run(main())
    assert ran == [0, 2] and skipped == 0


class _EchoHost:
    def __init__(self):
        from types import SimpleNamespace

        self.stage = SimpleNamespace(name="echo")
        self.ran = []

    def call(self, method, *args):
        self.ran.append(args[0])
        return args[0]


def test_replica_call_cancelled_while_waiting_its_turn_leaves_no_hole_in_the_order():
    """A pinned call cancelled while it waits for its predecessor (the caller gave up on it) still counts as done
    in the replica's call order: the caller's later calls do not stall behind it for ``skip_after_s``."""
    import concurrent.futures as cf

    from echo_stream.serve.serve_engine import StageReplica

    async def main():
        rep = object.__new__(StageReplica)              # no Serve: the replica's call path on a stand-in host
        rep.host, rep.replica_id = _EchoHost(), "r"
        rep.order, rep.stuck = CallOrder(skip_after_s=30.0), StuckCheck(60.0)
        rep.worker = cf.ThreadPoolExecutor(1)
        try:
            one = asyncio.create_task(rep.call("process", 1, _pin=Pin("c", "r", 1)))
            await asyncio.sleep(0.01)
            one.cancel()
            await asyncio.gather(one, return_exceptions=True)
            two = asyncio.create_task(rep.call("process", 2, _pin=Pin("c", "r", 2)))
            assert await rep.call("process", 0, _pin=Pin("c", "r", 0)) == 0
            assert await asyncio.wait_for(two, 10.0) == 2
            return rep.host.ran, rep.order.skipped
        finally:
            rep.worker.shutdown()
    ran, skipped = asyncio.run(main())
    assert ran == [0, 2] and skipped == 0


def test_call_order_release_moves_past_numbers_that_never_come_without_waiting():
    """The ingress releases numbers whose calls failed before they reached the replica (an upstream replica
    crashed): the stream's next call runs at once, counted as released, not as skipped after the wait."""
    async def main():
        order = CallOrder(skip_after_s=30.0)
        waiting = asyncio.create_task(order.turn("s", 2))   # calls 0 and 1 of the stream failed upstream
        await asyncio.sleep(0.01)
        held = not waiting.done()
        assert await order.release([("s", 0), ("s", 1), ("other", 5)]) == 3
        await asyncio.wait_for(waiting, 10.0)
        await order.done("s", 2)
        assert await order.release([("s", 1)]) == 0         # already past: nothing left to release
        return held, order.released, order.skipped
    assert asyncio.run(main()) == (True, 3, 0)


def _replica(rid: str, host=None):
    """A StageReplica without Serve: its call path on a stand-in host (the caller shuts its worker down)."""
    import concurrent.futures as cf

    from echo_stream.serve.serve_engine import StageReplica

    rep = object.__new__(StageReplica)
    rep.host, rep.replica_id, rep.parts = host or _EchoHost(), rid, {}
    rep.order, rep.stuck = CallOrder(skip_after_s=30.0), StuckCheck(60.0)
    rep.worker = cf.ThreadPoolExecutor(1)
    return rep


class _Answer:
    """A stand-in Serve response: awaitable, ``result()``, a value or an error."""

    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def result(self, timeout_s=None):
        if self.error is not None:
            raise self.error
        return self.value

    def __await__(self):
        async def get():
            return self.result()
        return get().__await__()


class _Deployment:
    """A stand-in deployment handle (``.call.remote``) that records what it was sent. A call whose method is in
    ``fails``, or that takes a failed answer as argument (Ray fails it before the replica sees it), fails; the
    first ``release_fails`` releases are refused as by a replica other than their target."""

    def __init__(self, fails=(), release_fails: int = 0):
        self.call, self.sent, self.fails, self.release_fails = self, [], set(fails), release_fails

    def remote(self, method, *args, **kwargs):
        self.sent.append((method, args, kwargs[PIN_KW]))
        if method == "release":
            if self.release_fails > 0:
                self.release_fails -= 1
                return _Answer(error=ReplicaGone(f"replica {kwargs[PIN_KW].target} is gone (this is another)"))
            return _Answer(len(args[0]))
        if method in self.fails or any(isinstance(a, _Answer) and a.error is not None for a in args):
            return _Answer(error=RuntimeError(f"{method}: the actor died"))
        return _Answer(args[0] if args else None)


def _backend(stages, replicas: int = 1, fails: dict | None = None):
    """A ServeBackend without Serve: its numbering and release over stand-in deployment handles."""
    from echo_stream.serve.serve_engine import ServeBackend

    b = object.__new__(ServeBackend)
    b._start_order()
    b.handles = {s: _Deployment((fails or {}).get(s, ())) for s in stages}
    b.slots = {s: [f"{s}-{i}" for i in range(replicas)] for s in stages}
    return b


def test_one_sessions_calls_do_not_wait_behind_anothers_on_a_replica():
    """Calls are numbered per (session, replica): session b's call runs while session a's earlier call on the
    same replica is still on its way; a's next call waits for it (its own order is kept)."""
    b = _backend(["memory"])
    a0 = b.call("memory", "process", "a0", session="a")     # on its way (its argument still being computed)
    b0 = b.call("memory", "process", "b0", session="b")
    a1 = b.call("memory", "process", "a1", session="a")
    assert a0.pin.stream == a1.pin.stream != b0.pin.stream and a0.pin.stream.startswith(f"{b.caller}/a.")
    assert (a0.pin.seq, b0.pin.seq, a1.pin.seq) == (0, 0, 1)

    async def main():
        rep = _replica("memory-0")
        try:
            later = asyncio.create_task(rep.call("process", "a1", _pin=a1.pin))
            assert await asyncio.wait_for(rep.call("process", "b0", _pin=b0.pin), 10.0) == "b0"
            await asyncio.sleep(0.01)
            assert not later.done()                          # a1 waits for a0, not for b's calls
            assert await rep.call("process", "a0", _pin=a0.pin) == "a0"
            assert await asyncio.wait_for(later, 10.0) == "a1"
            return rep.host.ran, rep.order.skipped
        finally:
            rep.worker.shutdown()
    ran, skipped = asyncio.run(main())
    assert ran == ["b0", "a0", "a1"] and skipped == 0


def test_a_batched_call_runs_in_turn_in_the_stream_of_every_session_it_carries():
    """A diffusion call carries windows of several sessions: it takes a number in each one's stream, so it runs
    after each session's earlier calls there (set_seed / import_state) and before its later ones (close_session),
    whatever order the requests arrive in."""
    b = _backend(["diffusion"])
    seed_a = b.call("diffusion", "set_seed", "seed a", session="a")
    seed_b = b.call("diffusion", "set_seed", "seed b", session="b")
    batch = b.call("diffusion", "process", "batch", session=("a", "b", "a"))
    close_a = b.call("diffusion", "close_session", "close a", session="a")
    assert batch.pin.turns() == ((seed_a.pin.stream, 1), (seed_b.pin.stream, 1)) and close_a.pin.seq == 2

    async def main():
        rep = _replica("diffusion-0")
        try:
            sent = {pin: (method, args) for method, args, pin in b.handles["diffusion"].sent}
            tasks = []
            for h in (close_a, batch, seed_b, seed_a):           # arriving in the worst order
                method, args = sent[h.pin]
                tasks.append(asyncio.create_task(rep.call(method, *args, _pin=h.pin)))
                await asyncio.sleep(0.01)
            await asyncio.wait_for(asyncio.gather(*tasks), 10.0)
            return rep.host.ran, rep.order.skipped
        finally:
            rep.worker.shutdown()
    ran, skipped = asyncio.run(main())
    assert ran == ["seed b", "seed a", "batch", "close a"] and skipped == 0


def test_a_closed_sessions_streams_end_on_every_replica_it_called():
    """Closing a session ends its stream on every replica it called (one it moved off too): a last sequenced
    ``forget`` after its calls there, and the replica drops the stream's order; the ingress drops its numbers. The
    same session id back on this ingress (resumed) starts a new stream."""
    from echo_stream.serve.routing import Router

    b = _backend(["memory", "render"], replicas=2)
    b.router = Router({"memory": 2, "render": 2})
    x = b.call("memory", "process", "x", session="a", replica=0)
    b.call("memory", "process", "y", session="a", replica=1)       # the session moved to replica 1
    b.call("render", "process", "z", session="a")
    w = b.call("memory", "process", "w", session="b")
    b.release({"memory": 1, "render": 0}, "a")
    forgets = {(p.target, p.stream, p.seq) for d in b.handles.values() for m, _, p in d.sent if m == "forget"}
    stream = x.pin.stream
    assert forgets == {("memory-0", stream, 1), ("memory-1", stream, 1), ("render-0", stream, 1)}
    assert list(b._seq) == [w.pin.stream]
    again = b.call("memory", "process", "x", session="a", replica=0)
    assert again.pin.stream not in (stream, w.pin.stream) and again.pin.seq == 0

    async def main():
        rep = _replica("memory-0")
        try:
            await rep.call("process", "x", _pin=x.pin)
            assert rep.order.streams == 1
            await rep.call("forget", _pin=next(p for _, _, p in b.handles["memory"].sent
                                                if p.target == "memory-0" and p.seq == 1))
            return rep.order.streams, rep.host.ran
        finally:
            rep.worker.shutdown()
    assert asyncio.run(main()) == (0, ["x"])


def test_a_failed_chain_releases_its_calls_turns_on_their_replicas():
    """A crashed decode replica fails the chain's later calls before they reach their replicas (Ray fails a call
    whose argument is an error): reading the chain's result, the ingress releases the turns of every call of the
    chain that failed, each on its replica, so the session's next calls there do not wait for them. A call that
    ran (the memory checkpoint) is not released."""
    b = _backend(["decode", "features", "memory"], fails={"decode": {"push"}})
    pk, info = b.call("decode", "push", "sid/0", ["chunk"], False, num_returns=2, session="sid")
    wins = b.call("memory", "process", b.call("features", "process", pk, session="sid"), session="sid")
    ck = b.call("memory", "export_state", "sid/0", session="sid")
    with pytest.raises(RuntimeError, match="the actor died"):
        asyncio.run(b.get(wins))
    assert asyncio.run(b.get(ck)) == "sid/0"
    b._releasing.shutdown(wait=True)                            # the releases run in the background
    released = {s: [a[0] for m, a, _ in d.sent if m == "release"] for s, d in b.handles.items()}
    stream = pk.pin.stream
    assert released == {"decode": [((stream, 0),)], "features": [((stream, 0),)], "memory": [((stream, 0),)]}
    assert all(p.seq is None for d in b.handles.values() for m, _, p in d.sent if m == "release")
    assert pk.released and not info.released and not ck.released


def test_a_release_that_reaches_no_replica_is_sent_again_while_its_replica_lives(monkeypatch):
    """A release Serve routed to another replica (its target not routable for a moment) is refused there; it is
    sent again, after a pause, while the target is still a live replica of the stage, until it gets there. One
    whose target is gone is not (its order went with it), nor one whose stream ended meanwhile."""
    from echo_stream.serve import serve_engine

    monkeypatch.setattr(serve_engine, "RELEASE_RETRY_S", (0.0, 0.0, 0.0, 0.0))
    b = _backend(["decode"], fails={"decode": {"push"}})
    live = {"decode": {"decode-0"}}
    b._live = lambda: live
    asked = []

    def fail(session, release_fails):
        b.handles["decode"].sent.clear()
        b.handles["decode"].release_fails = release_fails
        call = b.call("decode", "push", f"{session}/0", [], session=session)
        with pytest.raises(RuntimeError, match="the actor died"):
            b.result(call)
        b._releasing.shutdown(wait=True)                        # the releases run in the background
        b._releasing = None
        return [p.target for m, _, p in b.handles["decode"].sent if m == "release"], call.pin.stream

    real_is_live = b._is_live

    def is_live(stage, target):
        asked.append((stage, target))
        return real_is_live(stage, target)
    b._is_live = is_live
    sent, stream = fail("a", release_fails=2)                   # refused twice, then it reaches its replica
    assert sent == ["decode-0"] * 3 and asked == [("decode", "decode-0")] * 2
    assert b._send_release("decode", "decode-0", ((stream, 0),)) is True
    live["decode"] = set()                                      # the replica is gone: one try, no retry
    sent, _ = fail("b", release_fails=1)
    assert sent == ["decode-0"]
    live["decode"] = {"decode-0"}                               # a replica that never takes it: bounded tries
    sent, stream = fail("c", release_fails=100)
    assert sent == ["decode-0"] * (len(serve_engine.RELEASE_RETRY_S) + 1)
    b.end_stream("c")                                           # the session closed: nothing left to release
    b.handles["decode"].sent.clear()
    assert b._send_release("decode", "decode-0", ((stream, 0),)) is False
    assert not [m for m, _, _ in b.handles["decode"].sent if m == "release"]


def test_a_call_whose_upstream_replica_died_is_a_fault():
    """Serve fails a call whose argument's replica crashed with a RayServeException caused by Ray's
    ActorDiedError: a fault (the session recovers), as the crash itself is; a Serve error of another cause is
    not."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import RayServeException

    from echo_stream.serve.serve_engine import ServeBackend

    b = object.__new__(ServeBackend)
    upstream = RayServeException("Request to deployment 'memory' failed because an upstream actor died")
    upstream.__cause__ = ActorDiedError()
    assert b.is_fault(upstream) and b.is_fault(ActorDiedError())
    assert not b.is_fault(RayServeException("something else")) and not b.is_fault(InputError("x", "bad"))


def test_serve_wait_ready_asks_every_stage_at_once_and_moves_off_silent_replicas():
    """A lost node silences a replica of several stages at once: ``wait_ready`` asks the stages together (their
    ping timeouts overlap instead of adding up, stage after stage) and moves the session off each silent one."""
    from echo_stream.pipeline import STAGES
    from echo_stream.serve.routing import Router
    from echo_stream.serve.serve_engine import ServeBackend

    async def main():
        b = object.__new__(ServeBackend)               # no Serve: the routing logic over stand-in pings
        b.router = Router({s: 2 for s in STAGES})
        route = b.router.assign("sid")
        silent = {(s, route[s]) for s in ("features", "diffusion", "render")}   # on the lost node
        asking, most = set(), [0]

        async def answers(stage, i, timeout):
            asking.add(stage)
            most[0] = max(most[0], len(asking))
            await asyncio.sleep(0.02)
            asking.discard(stage)
            return (stage, i) not in silent

        async def refresh(timeout=1.0, wait=True):
            pass
        b._answers, b.refresh = answers, refresh
        before = dict(route)
        await b.wait_ready(timeout=30, route=route, move_after_s=0.05)
        return before, route, most[0]
    before, after, most = asyncio.run(main())
    assert most == 5                                   # all five stages asked together
    for s in ("features", "diffusion", "render"):
        assert after[s] == 1 - before[s]
    for s in ("decode", "memory"):
        assert after[s] == before[s]


@pytest.mark.parametrize("engine", ["serve", "actors"])
def test_a_resumed_session_avoids_the_node_of_its_lost_ingress(engine):
    """A whole node lost: its replicas may still answer for a moment. A session resumed from an ingress on
    that node moves off the replicas there that answered; one whose stage has no other answering replica keeps
    its own; without a node to avoid, nothing moves. The nodes come from the replicas' own ping answers."""
    from echo_stream.pipeline import STAGES
    from echo_stream.serve.backend import RayBackend, answers
    from echo_stream.serve.routing import Router
    from echo_stream.serve.serve_engine import ServeBackend

    lost = {("decode", 0), ("memory", 0), ("diffusion", 0), ("render", 0), ("render", 1)}   # on node "lost"
    silent = {("features", 1)}                                                            # dead already

    class Pings:                                     # the stage hosts' pings: each answers with its node
        def call(self, stage, method, replica=0, **_):
            assert method == "ping"
            return stage, replica

        async def get(self, handle):
            if handle in silent:
                await asyncio.sleep(10)
            return "lost" if handle in lost else "kept"

    async def main(avoid):
        b = object.__new__(ServeBackend if engine == "serve" else RayBackend)
        b.router, b.replica_nodes, pings = Router({s: 2 for s in STAGES}), {}, Pings()
        b.call, b.get = pings.call, pings.get

        async def ask(stage, i, timeout):
            return await answers(b, stage, i, timeout)

        async def refresh(timeout=1.0, wait=True):
            pass
        b._answers, b.refresh = ask, refresh
        route = {s: 0 for s in STAGES}
        await b.wait_ready(timeout=30, route=route, move_after_s=0.05, **({"avoid_node": avoid} if avoid else {}))
        return route, b.replica_nodes
    route, nodes = asyncio.run(main("lost"))
    assert route == {"decode": 1, "features": 0, "memory": 1, "diffusion": 1, "render": 0}
    assert nodes[("decode", 0)] == "lost" and nodes[("decode", 1)] == "kept" and ("features", 1) not in nodes
    assert asyncio.run(main(None))[0] == {s: 0 for s in STAGES}


def test_rebind_forgets_the_call_numbers_of_replaced_replicas():
    """A long-running ingress keeps one call counter per (stream, stage, replica); a replica Serve replaced is
    re-bound and its counters dropped, so replacements over days do not pile counters up."""
    import itertools
    import threading

    from echo_stream.pipeline import STAGES
    from echo_stream.serve.routing import Router
    from echo_stream.serve.serve_engine import ServeBackend

    b = object.__new__(ServeBackend)
    b._start_order()
    b.replica_nodes = {}
    b.slots = {s: [f"{s}-1"] for s in STAGES}
    b.slots["diffusion"] = ["d-1", "d-2"]
    b.router, b._rebinding = Router({s: len(v) for s, v in b.slots.items()}), threading.Lock()
    b.grow = {}                                        # no autoscaled stage
    b._seq = {"c/a": {("diffusion", "d-1"): itertools.count(7), ("diffusion", "d-2"): itertools.count(3)},
              "c/b": {("diffusion", "d-1"): itertools.count(2)}}
    live = {s: set(v) for s, v in b.slots.items()}
    live["diffusion"] = {"d-2", "d-3"}                 # d-1 died; Serve started d-3
    b._live = lambda: live
    assert b.rebind() == [("diffusion", 0)]
    assert b.slots["diffusion"] == ["d-3", "d-2"]
    assert b._seq["c/a"].keys() == {("diffusion", "d-2")} and next(b._seq["c/a"][("diffusion", "d-2")]) == 3
    assert b._seq["c/b"] == {}


def test_a_call_with_two_results_answers_with_the_first_and_its_part_call_with_the_second():
    """``decode.push`` returns (packet, info): on Serve its call answers with the packet alone and a ``part`` call
    after it in the session's stream with the info alone, so reading the info does not fetch the packet. The
    replica keeps the info only until its part call takes it; a push that raised fails its part as well."""
    from echo_stream.serve.pinning import Failed
    from echo_stream.serve.serve_engine import ServeBackend

    class Push(_EchoHost):
        def call(self, method, *args):
            if args[0] == "bad":
                raise InputError("chunk 1", "not audio")
            return f"packet of {args[0]}", {"frames": 8}

    b = _backend(["decode"])
    pk, info = b.call("decode", "push", "chunk", num_returns=2, session="s")
    bad_pk, bad_info = b.call("decode", "push", "bad", num_returns=2, session="s")
    sent = {pin: (method, args) for method, args, pin in b.handles["decode"].sent}
    assert (pk.pin.seq, pk.pin.parts, info.pin.seq) == (0, 2, 1) and sent[info.pin] == ("part", (0, 1))

    async def main():
        rep = _replica("decode-0", Push())
        try:
            early = asyncio.create_task(rep.call("part", *sent[info.pin][1], _pin=info.pin))   # arrives first
            await asyncio.sleep(0.01)
            first = await rep.call("push", "chunk", _pin=pk.pin)
            second = await asyncio.wait_for(early, 10.0)
            failed = [await rep.call(*sent[h.pin][:1], *sent[h.pin][1], _pin=h.pin) for h in (bad_pk, bad_info)]
            return first, second, failed, rep.parts
        finally:
            rep.worker.shutdown()
    first, second, failed, kept = asyncio.run(main())
    assert first == "packet of chunk" and second == {"frames": 8} and kept == {}
    assert all(isinstance(f, Failed) for f in failed)
    with pytest.raises(InputError, match="chunk 1: not audio"):
        ServeBackend._unpack(failed[1])
    with pytest.raises(ValueError, match="ordered"):
        b.call("decode", "push", "chunk", num_returns=2, ordered=False)


def test_lost_replicas_slots_are_rebound_to_their_replacements():
    slots = {"diffusion": ["a", "b", "c"], "render": ["r"]}
    # b died and Serve started d in its place; c died and has no replacement yet; render untouched
    assert rebind_slots(slots, {"diffusion": {"a", "d"}, "render": {"r"}}) == ([("diffusion", 1)], [])
    assert slots == {"diffusion": ["a", "d", "c"], "render": ["r"]}         # a keeps its slot: its sessions stay
    assert rebind_slots(slots, {"diffusion": {"a", "d", "e"}, "render": {"r"}}) == ([("diffusion", 2)], [])
    assert slots["diffusion"] == ["a", "d", "e"] and rebind_slots(slots, {"diffusion": {"a", "d", "e"}}) == ([], [])
    # a fixed stage never grows: a replacement listed while the replica it replaces still is waits unbound
    assert rebind_slots(slots, {"diffusion": {"a", "d", "e", "f"}}) == ([], []) and len(slots["diffusion"]) == 3
    # Serve's autoscaler (an autoscaled stage, at most 4): one more replica -> a new slot at the end; one
    # removed -> its slot stays, empty, until a later replica takes it (the others keep their numbers)
    assert rebind_slots(slots, {"diffusion": {"a", "d", "e", "f"}}, {"diffusion": 4}) == ([], [("diffusion", 3)])
    assert slots["diffusion"] == ["a", "d", "e", "f"]
    assert rebind_slots(slots, {"diffusion": {"a", "d", "e", "f", "x"}}, {"diffusion": 4}) == ([], [])  # at most 4
    assert rebind_slots(slots, {"diffusion": {"a", "e", "f"}}, {"diffusion": 4}) == ([], []) \
        and slots["diffusion"][1] == "d"
    assert rebind_slots(slots, {"diffusion": {"a", "e", "f", "g"}}, {"diffusion": 4}) == ([("diffusion", 1)], [])


def test_a_call_running_too_long_fails_the_health_check():
    now = [100.0]
    check = StuckCheck(after_s=120, clock=lambda: now[0])
    check.check("diffusion")                                 # idle: healthy

    def long_call():
        now[0] += 60
        check.check("diffusion")                             # 60 s in: still healthy
        now[0] += 61
        with pytest.raises(RuntimeError, match=r"^diffusion: a call has been running for 121 s .* stuck"):
            check.check("diffusion")
        return "done"
    assert check.run(long_call) == "done"
    check.check("diffusion")                                 # the call ended: healthy again


def test_serve_config_args_become_serve_options():
    from echo_stream.serve.serve_engine import app_arguments, parse_app_arguments

    argv = app_arguments({"port": 50051, "replicas": "diffusion=2", "avatar": ["a=x.jpg", "b=y.jpg"],
                          "tls_cert": None, "ingress_replicas": 3, "max_sessions": 4})
    assert argv == ["--port", "50051", "--replicas", "diffusion=2", "--avatar", "a=x.jpg", "--avatar", "b=y.jpg",
                    "--max-sessions", "4"]
    ns = parse_app_arguments(argv)
    assert (ns.port, ns.replicas, ns.avatar, ns.max_sessions, ns.engine) == (50051, "diffusion=2",
                                                                               ["a=x.jpg", "b=y.jpg"], 4, "serve")


def test_pinned_router_sends_a_call_to_its_replica_or_anywhere_when_that_one_is_gone():
    from echo_stream.serve.serve_engine import PinnedRouter

    reps = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in ("r0", "r1", "r2")]
    choose = PinnedRouter.choose_replicas      # uses no state of the router: called unbound

    def ask(kwargs):
        return asyncio.run(choose(None, reps, SimpleNamespace(kwargs=kwargs)))
    assert ask({PIN_KW: Pin("c", "r1", 4)}) == [[reps[1]]]
    assert ask({PIN_KW: Pin("c", "gone", 4)}) == [reps]          # refused there: the session recovers
    assert ask({}) == [reps]
    assert asyncio.run(choose(None, [], None)) == []


def test_serve_engine_choice_is_checked(capsys):
    with pytest.raises(SystemExit) as e:                                       # not one of the choices
        cli.main(["serve", "--port", "0", "--engine", "serv"])
    assert e.value.code == 2 and "--engine: invalid choice: 'serv'" in capsys.readouterr().err


def test_a_failed_upstream_call_still_takes_its_turn_downstream_and_raises_at_the_caller():
    """A stage error travels as a value (``Failed``): the next stage's call of the chain, which takes it as its
    argument, still reaches its replica in its turn (no hole in the caller's order there) and hands it on;
    reading the value raises the stage's own error (the client's input error stays an input error)."""
    import concurrent.futures as cf

    from echo_stream.serve.pinning import Failed
    from echo_stream.serve.serve_engine import ServeBackend, StageReplica

    class Picky(_EchoHost):
        def call(self, method, *args):
            if args[0] == "bad":
                raise InputError("chunk 3", "not audio")
            return super().call(method, *args)

    def replica(rid):
        rep = object.__new__(StageReplica)
        rep.host, rep.replica_id = Picky(), rid
        rep.order, rep.stuck = CallOrder(skip_after_s=30.0), StuckCheck(60.0)
        rep.worker = cf.ThreadPoolExecutor(1)
        return rep

    async def main():
        a, b = replica("a"), replica("b")
        try:
            up = await a.call("process", "bad", _pin=Pin("c", "a", 0))
            assert isinstance(up, Failed)
            assert await b.call("process", up, _pin=Pin("c", "b", 0)) is up   # handed on, not run
            assert await asyncio.wait_for(b.call("process", "ok", _pin=Pin("c", "b", 1)), 10.0) == "ok"
            return b.host.ran, b.order.skipped, up
        finally:
            a.worker.shutdown()
            b.worker.shutdown()
    ran, skipped, up = asyncio.run(main())
    assert ran == ["ok"] and skipped == 0
    with pytest.raises(InputError, match="chunk 3: not audio"):
        ServeBackend._unpack(up)


@pytest.mark.ray
@pytest.mark.slow
def test_serve_chain_whose_first_call_fails_leaves_no_hole_in_the_next_replicas_order():
    """Real Serve: a chain's first call raises (bad input); the call after it on another replica (which takes
    its result) still counts in that replica's call order, so the caller's next call there is not held back
    behind a call that never came (``order_skipped`` stays 0)."""
    from ray import cloudpickle, serve
    from ray.serve.config import RequestRouterConfig

    from echo_stream.serve.serve_engine import QUIET, PinnedRouter, ServeBackend, StageReplica
    from echo_stream.stages import Stage

    class Flaky(Stage):                                # local: pickled by value for the replicas
        name = "flaky"
        resources = {"num_cpus": 0.1}

        def process(self, x):
            if x == "bad":
                raise InputError("chunk 3", "not audio")
            return x

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=96 * 1024 * 1024)
    try:
        serve.start(proxy_location="Disabled")
        opts = dict(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=100,
                    logging_config=QUIET, request_router_config=RequestRouterConfig(request_router_class=PinnedRouter))
        blob = cloudpickle.dumps(Flaky())
        up = serve.run(serve.deployment(StageReplica).options(name="up", **opts).bind(blob), name="t-up",
                       route_prefix=None)
        down = serve.run(serve.deployment(StageReplica).options(name="down", **opts).bind(blob), name="t-down",
                         route_prefix=None)

        def rid(app):
            (name,) = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                       if n["name"].startswith(f"SERVE_REPLICA::{app}#")]
            return name.rsplit("#", 1)[1]
        a, b = rid("t-up"), rid("t-down")

        async def main():
            first = down.call.remote("process", up.call.remote("process", "bad", _pin=Pin("c", a, 0)),
                                     _pin=Pin("c", b, 0))
            with pytest.raises(InputError, match="not audio"):
                ServeBackend._unpack(await first)
            assert ServeBackend._unpack(await down.call.remote("process", "ok", _pin=Pin("c", b, 1))) == "ok"
            return await down.call.remote("stats")
        stats = asyncio.run(main())
        assert stats["order_skipped"] == 0, stats
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _serve_pair(stage_blob: bytes):
    """On the Ray this process started: two one-replica deployments ``up`` and ``down`` of ``StageReplica`` over
    the pickled stage, pinned as the engine pins, and a ServeBackend over them (its calls, numbering, release)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from echo_stream.serve.serve_engine import QUIET, PinnedRouter, ServeBackend, StageReplica

    serve.start(proxy_location="Disabled")
    opts = dict(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=100,
                logging_config=QUIET, request_router_config=RequestRouterConfig(request_router_class=PinnedRouter))
    b = object.__new__(ServeBackend)
    b._start_order()
    b.ray, b.handles, b.slots = ray, {}, {}
    for name in ("up", "down"):
        b.handles[name] = serve.run(serve.deployment(StageReplica).options(name=name, **opts).bind(stage_blob),
                                    name=f"t-{name}", route_prefix=None)
        (actor,) = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                    if n["name"].startswith(f"SERVE_REPLICA::t-{name}#")]
        b.slots[name] = [actor.rsplit("#", 1)[1]]
    return b


@pytest.mark.ray
@pytest.mark.slow
def test_serve_a_crashed_upstream_replica_leaves_no_hole_in_the_next_replicas_order():
    """Real Serve: a chain's first replica crashes mid-call (its process exits, nothing is raised); the chain's
    next call fails before it reaches its replica (its argument is lost), a hole in the session's order there.
    The ingress, reading the chain's result, releases that number on that replica: the session's next call
    there runs without waiting for it — released, not skipped after ``CallOrder.skip_after_s`` (10 s). With
    ``-s`` it prints how long that next call took."""
    import os

    from ray import cloudpickle, serve

    from echo_stream.stages import Stage

    class Crashy(Stage):                               # local: pickled by value for the replicas
        name = "crashy"
        resources = {"num_cpus": 0.1}

        def process(self, x):
            if x == "crash":
                os._exit(1)
            return x

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=96 * 1024 * 1024)
    try:
        b = _serve_pair(cloudpickle.dumps(Crashy()))

        async def main():
            assert await b.get(b.call("down", "process", "warm", session="s")) == "warm"
            chain = b.call("down", "process", b.call("up", "process", "crash", session="s"), session="s")
            with pytest.raises(Exception) as e:
                await b.get(chain)
            t = time.perf_counter()
            assert await b.get(b.call("down", "process", "next", session="s")) == "next"
            took = time.perf_counter() - t
            return e.value, took, await b.get(b.call("down", "stats", ordered=False))
        error, took, stats = asyncio.run(main())
        print(f"\nafter the upstream crash ({type(error).__name__}), the session's next call on the downstream "
              f"replica took {took * 1000:.0f} ms (order_released {stats['order_released']}, "
              f"order_skipped {stats['order_skipped']})")
        assert b.is_fault(error), error                  # the session recovers (here: no session)
        assert stats["order_released"] == 1 and stats["order_skipped"] == 0, stats
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_serve_reading_a_calls_small_result_does_not_fetch_its_packet():
    """Real Serve: a method with two results (as ``decode.push``: packet, info) is answered in two responses, so
    the ingress, reading the small info, receives the info alone, not the packet's 4 MB; the next replica,
    taking the packet, gets all of it, and so does the ingress when it asks; the replica keeps nothing after."""
    from ray import cloudpickle, serve

    from echo_stream.stages import Packet, Stage

    class Split(Stage):
        name = "split"
        resources = {"num_cpus": 0.1}

        def push(self, sid, n):
            return Packet(sid, meta={"blob": np.ones(n, np.uint8)}), {"frames": 8}

        def process(self, packet):
            return int(packet.meta["blob"].sum())

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=96 * 1024 * 1024)
    try:
        b = _serve_pair(cloudpickle.dumps(Split()))

        async def main():
            pk, info = b.call("up", "push", "s/0", 4 << 20, num_returns=2, session="s")
            assert await b.get(info) == {"frames": 8}
            answer = await info.response                 # all that reading the info fetched
            total = await b.get(b.call("down", "process", pk, session="s"))
            fetched = (await b.get(pk)).meta["blob"].nbytes
            return answer, total, fetched, await b.get(b.call("up", "stats", ordered=False))
        answer, total, fetched, stats = asyncio.run(main())
        assert answer == {"frames": 8}                   # the info alone: no packet came with it
        assert total == 4 << 20 and fetched == 4 << 20 and stats["parts_kept"] == 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_bench_serve_takes_its_stages_down_when_its_server_fails_to_start(monkeypatch):
    """``bench serve`` with a local server: the stages (on Serve, an application of their own) are shut down when
    the server then fails to start, not left deployed."""
    import argparse

    from echo_stream import cluster
    from echo_stream.arguments.bench import add_serve_bench_arguments
    from echo_stream.serve import bench, serve_engine, server

    shut = []

    class Stages:
        @classmethod
        def start(cls, opts, **_):
            return cls()

        def shutdown(self):
            shut.append(True)

    def no_server(*a, **k):
        raise RuntimeError("cannot bind")
    monkeypatch.setattr(cluster, "start_ray", lambda *a, **k: None)
    monkeypatch.setattr(serve_engine, "engine_backend", lambda engine: Stages)
    monkeypatch.setattr(server, "ServerThread", no_server)
    p = argparse.ArgumentParser()
    add_serve_bench_arguments(p)
    with pytest.raises(RuntimeError, match="cannot bind"):
        bench.run(p.parse_args(["--sessions", "1", "--mode", "motion", "--engine", "serve", "--duration", "0.5"]))
    assert shut == [True]


# ------------------------------------------------------------------------------------- Ray, fake GPUs
@pytest.mark.ray
def test_serve_gpu_shares_put_two_replicas_on_each_fake_gpu():
    """3 fake GPUs; 4 diffusion + 2 render replicas of 0.5 GPU: two replicas per GPU id, each seeing the id Ray
    gave it as its CUDA_VISIBLE_DEVICES; asking for more GPUs than the cluster has is refused before deploying."""
    from echo_stream.serve.serve_engine import ServeBackend

    ray.init(address="local", num_cpus=8, num_gpus=3, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, object_store_memory=96 * 1024 * 1024)
    try:
        with pytest.raises(InputError) as e:
            ServeBackend.start(PipelineOptions(replicas={"diffusion": 6, "render": 2}, reserve_gpus=True))
        assert "asks for 4 GPU" in str(e.value) and "has 3" in str(e.value)
        backend = ServeBackend.start(PipelineOptions(size=(64, 64), replicas={"diffusion": 4, "render": 2},
                                                     reserve_gpus=True), warm=False)
        try:
            where = backend.placements()
        finally:
            backend.shutdown()
    finally:
        ray.shutdown()
    assert [len(where[s]) for s in ("decode", "features", "memory", "diffusion", "render")] == [1, 1, 1, 4, 2]
    per_gpu: dict = {}
    for stage in ("diffusion", "render"):
        for p in where[stage]:
            assert len(p["gpu_ids"]) == 1 and p["cuda_visible_devices"] == p["gpu_ids"][0], p
            per_gpu.setdefault(p["gpu_ids"][0], []).append(stage)
    assert sorted(per_gpu) == ["0", "1", "2"] and all(len(v) == 2 for v in per_gpu.values()), per_gpu
    assert len({p["replica_id"] for p in where["diffusion"]}) == 4
    assert all(where[s][0]["gpu_ids"] == [] for s in ("decode", "features", "memory"))


# ------------------------------------------------------------------ the CLI, its own process and Ray
@pytest.mark.ray
@pytest.mark.slow
def test_serve_engine_cli_serves_a_session_and_drains(tmp_path):
    """``echo-stream serve --engine serve`` (its own local Ray and Serve application) serves a motion session,
    every frame once, in order; SIGTERM drains it and it exits 0."""
    import signal

    from echo_stream.protos import echo_stream_pb2 as pb
    from echo_stream.serve.client import AvatarClient, Inputs, stream_inputs

    proc = subprocess.Popen([sys.executable, "-m", "echo_stream.cli", "serve", "--engine", "serve", "--port", "0",
                             "--num-cpus", "4", "--size", "96", "--replicas", "render=1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port, seen = None, []
        deadline = time.time() + 300
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            assert line or proc.poll() is None, "serve exited early:\n" + "".join(seen[-20:])
            if "listening on" in line:
                port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                assert "serve engine" in line, line
        assert port, "serve did not start"

        async def main():
            async with AvatarClient(f"127.0.0.1:{port}") as c:
                return await stream_inputs(c, Inputs(mediagen.speech_like(1.6, 16000, seed=3)), output="motion",
                                           realtime=False)
        res = asyncio.run(main())
        n = int(np.ceil(1.6 * config.FPS))
        assert res.motion_frames == list(range(n)) and res.events[-1].kind == pb.Event.ENDED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
