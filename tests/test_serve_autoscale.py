"""Autoscaling of a stage (``serve --autoscale diffusion=1:2``): the policy and the router's bookkeeping without
Ray, then diffusion going 1 -> 2 -> 1 replicas while sessions come and go, every frame exactly once: on a
two-node cluster without moves (no GAP), on local Ray with ``--rebalance-interval`` (sessions move onto the new
replica and off the drained one), and on the Serve engine (Serve's autoscaler; one session moves)."""
import asyncio
import contextlib
import time

import numpy as np

import pytest

from echo_stream import cli
from echo_stream.serve.autoscale import ScaleSpec, StageScaler, parse_autoscale
from echo_stream.serve.routing import Router

from . import mediagen, replicated
from .served import ray_backend, server_thread, two_node_cluster


# ---------------------------------------------------------------------------------------------- no Ray
def test_autoscale_is_parsed_and_bad_values_named(capsys):
    assert parse_autoscale("diffusion=1:4, render=2:2", target=8) == {
        "diffusion": ScaleSpec(1, 4, 8.0, 2.0, 10.0), "render": ScaleSpec(2, 2, 8.0, 2.0, 10.0)}
    assert parse_autoscale("") == {}
    for bad, says in [("diffusion=4", "is not STAGE=MIN:MAX"), ("difusion=1:2", "unknown stage 'difusion'"),
                      ("diffusion=2:1", "need 1 <= MIN <= MAX"), ("diffusion=0:2", "need 1 <= MIN <= MAX"),
                      ("diffusion=a:2", "whole numbers"), ("render=1:2,render=1:3", "named twice")]:
        with pytest.raises(Exception) as e:
            parse_autoscale(bad)
        assert str(e.value).startswith("--autoscale: ") and says in str(e.value), str(e.value)
    with pytest.raises(Exception, match="--scale-target: 0.0: sessions per replica"):
        parse_autoscale("diffusion=1:2", target=0.0)
    assert cli.main(["serve", "--port", "0", "--replicas", "diffusion=2", "--autoscale", "diffusion=1:3"]) == 1
    assert "--autoscale: diffusion is named in --replicas too" in capsys.readouterr().err


def test_scaler_waits_its_delays_and_does_not_flap():
    sc = StageScaler(ScaleSpec(1, 3, target=2, up_delay_s=1.0, down_delay_s=5.0))
    assert [sc.wanted(n) for n in (0, 2, 3, 5, 9)] == [1, 1, 2, 3, 3]
    assert sc.decide(0.0, 5, 1) == 0 and sc.decide(0.5, 5, 1) == 0 and sc.decide(1.0, 5, 1) == +1
    assert sc.decide(1.1, 3, 2) == 0                        # as wanted: nothing
    assert sc.decide(2.0, 0, 2) == 0 and sc.decide(4.0, 4, 2) == 0   # a dip shorter than the delay is forgotten
    assert sc.decide(5.0, 0, 2) == 0 and sc.decide(9.9, 0, 2) == 0 and sc.decide(10.0, 0, 2) == -1
    assert sc.decide(11.0, 0, 1) == 0                       # at MIN


def test_router_drains_and_removes_only_an_empty_last_replica():
    r = Router({"diffusion": 1})
    a = r.assign("a")
    assert r.add("diffusion") == 1 and r.counts["diffusion"] == 2
    b = r.assign("b")
    assert (a["diffusion"], b["diffusion"]) == (0, 1)       # a new replica takes the next sessions
    r.drain("diffusion", 1)
    assert r.assign("c")["diffusion"] == 0 and r.by_load("diffusion")[-1] == 1   # no new session on a draining one
    with pytest.raises(ValueError, match="serves sessions"):
        r.remove_last("diffusion")
    r.release(b)
    assert r.remove_last("diffusion") == 1 and r.counts["diffusion"] == 1 and r.load["diffusion"] == [2]
    with pytest.raises(ValueError, match="the only one"):
        r.remove_last("diffusion")


# ---------------------------------------------------------------------------------------------- real Ray
@contextlib.contextmanager
def _autoscaled_backend(where: str):
    """Stage actors at 96 px, diffusion allowed 2 replicas: on local Ray, or on a two-node cluster (head 3 CPUs,
    worker 2) -- yields ``(backend, the worker node's id or None)``."""
    if where == "local":
        with ray_backend(96, max_replicas={"diffusion": 2}) as backend:
            yield backend, None
        return
    from echo_stream.pipeline import PipelineOptions
    from echo_stream.serve.backend import RayBackend

    with two_node_cluster(head_cpus=3, worker_cpus=2) as (_, worker):
        backend = RayBackend.start(PipelineOptions(size=(96, 96), max_replicas={"diffusion": 2}), max_restarts=-1)
        try:
            yield backend, worker.node_id
        finally:
            backend.shutdown()


async def _watch(stop: asyncio.Event, replicas, seen: list, st, routes: dict) -> None:
    """Every 0.1 s until ``stop``: the diffusion replica count (``replicas()``) into ``seen``, and each running
    session's diffusion replica into ``routes``."""
    while not stop.is_set():
        seen.append(replicas())
        routes.update({sid: s.route["diffusion"] for sid, s in list(st.server.sessions.items())})
        await asyncio.sleep(0.1)


async def _realtime_session(c, i: int, until: asyncio.Event, seed: int, opened: dict | None = None):
    """A motion session of client ``c`` sending audio in real time until ``until`` is set (and at least 1 s);
    returns (its result, seconds sent). ``opened``: gets ``{session id: i}``."""
    from echo_stream.serve.client import SessionResult

    audio = mediagen.speech_like(120.0, 16000, seed=seed)
    s = await c.open(output="motion", seed=i)
    if opened is not None:
        opened[s.session_id] = i
    res = SessionResult(session_id=s.session_id)

    async def read():
        async for m in s.messages():
            res.add(m)
    reader = asyncio.get_running_loop().create_task(read())
    k, t0 = 0, time.monotonic()
    while not (until.is_set() and k >= 16000) and k < len(audio):
        await s.send_avatar_audio(audio[k:k + 1280])
        k += 1280
        await asyncio.sleep(max(0.0, t0 + k / 16000 - time.monotonic()))
    await s.end()
    await reader
    return res, k / 16000


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("where", ["cluster"])
def test_diffusion_scales_up_under_load_and_back_down(where):
    """Two sessions on one diffusion replica (target 1 session per replica) -> a second replica starts (on the
    two-node cluster: spread to the other node); a third session opened then lands
    on it; all end -> the second replica drains and goes. Every session gets every frame exactly once, in order,
    without a GAP."""
    spec = ScaleSpec(1, 2, target=1.0, up_delay_s=0.3, down_delay_s=1.0)
    nodes = []
    with _autoscaled_backend(where) as (backend, worker_node), \
            server_thread(backend, max_sessions=4, autoscale={"diffusion": spec}, autoscale_interval_s=0.2) as (st, target):
        router = backend.router
        counts, routes = [], {}

        def probe(stop):
            return _watch(stop, lambda: router.counts["diffusion"], counts, st, routes)

        def session(c, i, until):
            return _realtime_session(c, i, until, seed=40 + i)

        async def main():
            from echo_stream.serve.client import AvatarClient

            stop, done = asyncio.Event(), asyncio.Event()
            watcher = asyncio.get_running_loop().create_task(probe(stop))
            async with AvatarClient(target) as c:
                first = [asyncio.get_running_loop().create_task(session(c, i, done)) for i in range(2)]
                t_load = time.monotonic()
                deadline = t_load + 150
                while router.counts["diffusion"] < 2:           # the new actor loads and warms its models
                    assert time.monotonic() < deadline, "diffusion did not scale up within 150 s"
                    assert not any(t.done() for t in first), [t.result() for t in first if t.done()]
                    await asyncio.sleep(0.2)
                print(f"diffusion scaled up {time.monotonic() - t_load:.1f} s after the second session opened")
                if worker_node is not None:
                    nodes.extend(p["node_id"] for p in backend.placements()["diffusion"])
                third = asyncio.get_running_loop().create_task(session(c, 2, done))
                await asyncio.sleep(2.0)
                done.set()
                results = await asyncio.gather(*first, third)
            deadline = time.monotonic() + 60
            while router.counts["diffusion"] > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            print(f"diffusion back to {router.counts['diffusion']} replica {time.monotonic() - deadline + 60:.1f} s "
                  "after the sessions ended")
            stop.set()
            await watcher
            return results

        results = asyncio.run(main())
        assert max(counts) == 2 and counts[0] == 1 and router.counts["diffusion"] == 1, counts
        assert len(st.server.batchers) == 1 and len(backend.runner.replicas["diffusion"]) == 1
        assert [routes[r.session_id] for r, _ in results] == [0, 0, 1]
        for res, seconds in results:
            replicated.check_exactly_once(res, replicated.frames_of(seconds))
            assert not replicated.gaps(res) and res.stats.recoveries == 0
        assert router.load["diffusion"] == [0]
        if worker_node is not None:            # the new replica spread to the node the first one is not on
            assert len(nodes) == 2 and worker_node in nodes and len(set(nodes)) == 2, nodes


@pytest.mark.ray
@pytest.mark.slow
def test_serve_engine_scales_diffusion_on_the_sessions_its_replicas_hold():
    """``--engine serve --autoscale diffusion=1:2`` (target 1 session per replica): Serve's autoscaler, reading
    the sessions each diffusion replica holds, starts a second replica while two sessions run; the ingress gives
    it a slot and a batcher, and with ``--rebalance-interval`` one of the two sessions moves there (a GAP event
    naming the move, no frame lost); a third session opens; after they end Serve goes back to one replica.
    Every frame of every session exactly once."""
    from echo_stream.serve.client import AvatarClient

    spec = ScaleSpec(1, 2, target=1.0, up_delay_s=0.3, down_delay_s=1.0)
    with ray_backend(96, engine="serve", replicas={"diffusion": 1}, autoscale={"diffusion": spec}) as backend, \
            server_thread(backend, max_sessions=4, autoscale={"diffusion": spec},
                          rebalance_interval_s=0.3) as (st, target):
        running, routes = [], {}

        def probe(stop):
            return _watch(stop, lambda: backend.running["diffusion"], running, st, routes)

        def session(c, i, until):
            return _realtime_session(c, i, until, seed=60 + i)

        async def main():
            stop, done = asyncio.Event(), asyncio.Event()
            watcher = asyncio.get_running_loop().create_task(probe(stop))
            async with AvatarClient(target) as c:
                first = [asyncio.get_running_loop().create_task(session(c, i, done)) for i in range(2)]
                t_load = time.monotonic()
                while not (backend.replica_count("diffusion") == 2 and 1 not in backend.router.draining["diffusion"]):
                    assert time.monotonic() < t_load + 150, f"Serve did not scale diffusion up within 150 s: {running}"
                    assert not any(t.done() for t in first), [t.result() for t in first if t.done()]
                    await asyncio.sleep(0.2)
                print(f"Serve scaled diffusion up; its slot takes sessions {time.monotonic() - t_load:.1f} s after the "
                      "second session opened")
                t_up = time.monotonic()
                while sorted(backend.router.load["diffusion"]) != [1, 1]:
                    assert time.monotonic() < t_up + 30, f"no session moved to the new slot: {backend.router.load}"
                    await asyncio.sleep(0.1)
                third = asyncio.get_running_loop().create_task(session(c, 2, done))
                await asyncio.sleep(2.0)
                done.set()
                results = await asyncio.gather(*first, third)
            t_end = time.monotonic()
            while backend.running["diffusion"] > 1:
                assert time.monotonic() < t_end + 60, f"Serve did not scale diffusion down within 60 s: {running[-20:]}"
                await asyncio.sleep(0.2)
            print(f"Serve back to 1 diffusion replica {time.monotonic() - t_end:.1f} s after the sessions ended")
            stop.set()
            await watcher
            return results

        results = asyncio.run(main())
        assert running[0] == 1 and max(running) == 2 and backend.running["diffusion"] == 1, running
        assert len(st.server.batchers) == 2                     # the new slot got its batcher
        moved = []
        for res, seconds in results:
            replicated.check_exactly_once(res, replicated.frames_of(seconds))
            gaps = replicated.gaps(res)
            assert res.stats.recoveries == 0 and all(e.frames == 0 for e in gaps)
            if gaps:
                assert len(gaps) == 1 and "moved to another replica (balance: diffusion replica 0" in gaps[0].message
                moved.append(res.session_id)
        assert len(moved) == 1 and moved[0] in {r.session_id for r, _ in results[:2]}, moved


@pytest.mark.ray
@pytest.mark.slow
def test_with_rebalancing_sessions_move_onto_a_new_replica_and_off_a_drained_one():
    """``--rebalance-interval`` on local Ray (target 1 session per replica): two sessions on one diffusion
    replica -> a second replica starts and one session moves onto it (GAP "balance", no frame lost); the session
    on replica 0 ends -> replica 1 drains, its session moves back to 0 (GAP "drain") and replica 1 is removed
    while that session still runs. Every frame of both sessions exactly once, in order."""
    from echo_stream.serve.client import AvatarClient

    spec = ScaleSpec(1, 2, target=1.0, up_delay_s=0.3, down_delay_s=1.0)
    with _autoscaled_backend("local") as (backend, _), \
            server_thread(backend, max_sessions=4, autoscale={"diffusion": spec}, autoscale_interval_s=0.2,
                          rebalance_interval_s=0.3, rebalance_cooldown_s=1.0) as (st, target):
        router = backend.router

        def on(replica):
            return [sid for sid, s in list(st.server.sessions.items()) if s.route["diffusion"] == replica]

        async def wait_for(what, ok, within):
            t = time.monotonic()
            while not ok():
                assert time.monotonic() < t + within, f"{what} not within {within} s: loads {router.load}"
                await asyncio.sleep(0.1)
            print(f"{what}: {time.monotonic() - t:.1f} s")

        async def main():
            ends, index = [asyncio.Event(), asyncio.Event()], {}
            async with AvatarClient(target) as c:
                runs = [asyncio.get_running_loop().create_task(_realtime_session(c, i, ends[i], 80 + i, index))
                        for i in range(2)]
                await wait_for("diffusion scaled up", lambda: router.counts["diffusion"] == 2, 150)
                await wait_for("a session moved onto the new replica", lambda: len(on(1)) == 1 and len(on(0)) == 1,
                               30)
                stay, go = on(1)[0], on(0)[0]
                ends[index[go]].set()                                  # the session on replica 0 ends
                await wait_for("replica 1 drained, its session moved off and the replica removed",
                               lambda: router.counts["diffusion"] == 1, 60)
                assert stay in st.server.sessions and st.server.sessions[stay].route["diffusion"] == 0
                ends[index[stay]].set()
                return await asyncio.gather(*runs)

        results = asyncio.run(main())
    whys = []
    for res, seconds in results:
        replicated.check_exactly_once(res, replicated.frames_of(seconds))
        assert all(e.frames == 0 and "no frame was lost" in e.message for e in replicated.gaps(res))
        assert res.stats.recoveries == 0
        whys.append(sorted(e.message.split("(")[1].split(":")[0] for e in replicated.gaps(res)))
        t = res.frame_arrival
        d = np.diff(sorted(t.values()))                          # a window's frames arrive together
        usual = float(np.median(d[d > 0.05]))                    # between windows
        for e in replicated.gaps(res):                           # what a move costs the session's output
            before = max(t[f] for f in t if f < e.first_frame)
            after = min(t[f] for f in t if f >= e.first_frame)
            print(f"move at frame {e.first_frame}: its frame {after - before:.2f} s after the frame before "
                  f"(between windows: {usual:.2f} s median); {e.message}")
    # one session moved for balance (0 -> 1), and that one moved back when replica 1 drained (1 -> 0)
    assert sorted(whys) == [[], ["balance", "drain"]], whys
