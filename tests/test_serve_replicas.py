"""Replicated stages (``--replicas``): parsing and its refusals, session affinity, GPU shares per replica on fake
GPU resources, and a diffusion replica killed mid-session with two replicas (only its sessions recover) — the
served tests on both engines (stage actors, and the Ray Serve application).

Real Ray throughout (no mocks): placement on ``ray.init(num_gpus=3)`` (fake GPUs; the actors compute on the
CPU, ``PipelineOptions.reserve_gpus``), and a local Ray with the served pipeline for the fault.
"""
import asyncio

import pytest

from echo_stream import cli
from echo_stream.chain import STAGES, parse_replicas, replica_counts
from echo_stream.errors import InputError
from echo_stream.pipeline import PipelineOptions, check_gpu_capacity
from echo_stream.serve.routing import Router

from . import replicated
from .served import ray_backend, server_thread

ray = pytest.importorskip("ray")


# ---------------------------------------------------------------------------------------------- no Ray
def test_replicas_are_parsed_and_bad_values_named():
    assert parse_replicas("diffusion=2,render=2") == {"diffusion": 2, "render": 2}
    assert parse_replicas(" memory = 3 ,") == {"memory": 3}
    assert parse_replicas("") == {} and parse_replicas(None) == {}
    assert replica_counts({"diffusion": 2}) == {s: (2 if s == "diffusion" else 1) for s in STAGES}
    for bad, says in [("difusion=2", "unknown stage 'difusion': the stages are decode, features, memory"),
                      ("diffusion=0", "at least 1 replica"), ("diffusion=-1", "at least 1 replica"),
                      ("diffusion=two", "whole number"), ("diffusion=1.5", "whole number"),
                      ("diffusion", "is not STAGE=N"), ("=2", "is not STAGE=N"), ("diffusion:2", "is not STAGE=N"),
                      ("render=2,render=3", "named twice")]:
        with pytest.raises(InputError) as e:
            parse_replicas(bad)
        assert str(e.value).startswith("--replicas: ") and says in str(e.value), str(e.value)


def test_serve_refuses_bad_replicas_before_starting(capsys):
    assert cli.main(["serve", "--port", "0", "--replicas", "diffusion=2,rendr=2"]) == 1
    err = capsys.readouterr().err
    assert "--replicas: unknown stage 'rendr'" in err and "Traceback" not in err


def test_router_keeps_sessions_balanced_and_stable():
    r = Router({"diffusion": 2, "render": 3})
    routes = [r.assign(f"s{i}") for i in range(6)]
    assert sorted(rt["diffusion"] for rt in routes) == [0, 0, 0, 1, 1, 1]
    assert sorted(rt["render"] for rt in routes) == [0, 0, 1, 1, 2, 2]
    assert all(rt["memory"] == 0 for rt in routes)
    r.release(routes[0])
    again = r.assign("late")
    assert again["diffusion"] == routes[0]["diffusion"]           # the freed slot is the least loaded
    assert r.load["diffusion"] == [3, 3]
    other = 1 - again["diffusion"]
    r.move(again, "diffusion", other)                                  # after a fault: to a replica that answers
    assert again["diffusion"] == other and r.load["diffusion"][other] == 4 and sum(r.load["diffusion"]) == 6
    # ties are broken by the session id, the same way every time
    assert Router({"diffusion": 4}).assign("abc") == Router({"diffusion": 4}).assign("abc")


def test_router_sends_a_portrait_to_the_render_replica_that_prepared_it():
    from echo_stream.serve.routing import WARM_SLACK

    r = Router({"render": 2})
    first = r.assign("a", warm={"render": "face1"})["render"]
    # the same portrait goes where it is warm until that replica holds WARM_SLACK more sessions than the other
    same = [r.assign(f"b{i}", warm={"render": "face1"})["render"] for i in range(WARM_SLACK + 2)]
    assert same[:WARM_SLACK] == [first] * WARM_SLACK and same[WARM_SLACK] != first
    other = Router({"render": 2})
    assert [other.assign(f"m{i}")["render"] for i in range(4)].count(0) == 2   # no portrait: least loaded


def test_gpu_capacity_counts_every_replica():
    check_gpu_capacity("cpu", 0.0, {"diffusion": 8})                      # no GPU asked for
    check_gpu_capacity("cuda", 1.0)                                       # 0.5 diffusion + 0.5 render
    check_gpu_capacity("cuda", 3.0, {"diffusion": 4, "render": 2})
    with pytest.raises(InputError) as e:
        check_gpu_capacity("cuda", 2.0, {"diffusion": 4, "render": 2})
    msg = str(e.value)
    assert msg.startswith("--device: cuda asks for 3 GPU") and "diffusion 4 x 0.5" in msg and "render 2 x 0.5" in msg
    assert "has 2" in msg and "--replicas" in msg
    with pytest.raises(InputError):
        check_gpu_capacity("cpu", 0.0, reserve=True)                      # the test seam counts like cuda


def test_cpu_capacity_counts_every_replica():
    from echo_stream.pipeline import build_stages, check_cpu_capacity

    stages = build_stages(PipelineOptions())
    check_cpu_capacity(stages, 2.0)                                       # 0.25 + 0.5 + 0.25 + 0.5 + 0.5
    check_cpu_capacity(stages, 3.0, {"diffusion": 2, "render": 2})
    with pytest.raises(InputError) as e:
        check_cpu_capacity(stages, 2.0, {"diffusion": 2})
    msg = str(e.value)
    assert msg.startswith("--replicas: the stage actors reserve 2.5 CPUs") and "diffusion 2 x 0.5" in msg
    assert "cluster has 2" in msg and "--num-cpus" in msg
    with pytest.raises(InputError, match=r"^--num-cpus: the stage actors reserve 2 CPUs"):
        check_cpu_capacity(stages, 1.0)


# ------------------------------------------------------------------------------------- Ray, fake GPUs
@pytest.mark.ray
def test_gpu_shares_put_two_replicas_on_each_fake_gpu():
    """3 fake GPUs, 4 diffusion + 2 render replicas of 0.5 GPU each: every GPU id holds exactly two replicas,
    each replica got one GPU id from Ray and sees it as its CUDA_VISIBLE_DEVICES. More replicas than the GPUs
    hold: refused before any actor starts, naming --device and the count."""
    from echo_stream.pipeline import RayRunner

    ray.init(address="local", num_cpus=8, num_gpus=3, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, object_store_memory=96 * 1024 * 1024)
    try:
        with pytest.raises(InputError) as e:
            RayRunner(PipelineOptions(replicas={"diffusion": 6, "render": 2}, reserve_gpus=True))
        assert "asks for 4 GPU" in str(e.value) and "has 3" in str(e.value)
        runner = RayRunner(PipelineOptions(size=(128, 128), replicas={"diffusion": 4, "render": 2},
                                           reserve_gpus=True))
        try:
            where = runner.placements()
        finally:
            runner.shutdown()
        assert [len(where[s]) for s in STAGES] == [1, 1, 1, 4, 2]
        per_gpu: dict = {}
        for stage in ("diffusion", "render"):
            for p in where[stage]:
                assert len(p["gpu_ids"]) == 1, p
                assert p["cuda_visible_devices"] == p["gpu_ids"][0], p
                per_gpu.setdefault(p["gpu_ids"][0], []).append(stage)
        assert sorted(per_gpu) == ["0", "1", "2"] and all(len(v) == 2 for v in per_gpu.values()), per_gpu
        assert len({p["pid"] for p in where["diffusion"]}) == 4
        for stage in ("decode", "features", "memory"):                    # CPU stages reserve no GPU
            assert where[stage][0]["gpu_ids"] == []
    finally:
        ray.shutdown()


# ------------------------------------------------------------------- Ray, a replica killed mid-session
@pytest.fixture(scope="module", params=["actors", "serve"])
def two_diffusion(request):
    """Two diffusion replicas served by either engine (actors; or Ray Serve, ``serve --engine serve``)."""
    with ray_backend(96, replicas={"diffusion": 2}, engine=request.param) as backend, \
            server_thread(backend, max_sessions=6) as (st, target):
        yield st, target, backend


@pytest.mark.ray
@pytest.mark.slow
def test_sessions_spread_over_diffusion_replicas_and_batch_per_replica(two_diffusion):
    st, target, backend = two_diffusion
    assert backend.replica_count("diffusion") == 2 and len(st.server.batchers) == 2
    before = [b.windows for b in st.server.batchers]
    routes = {}

    async def note(ids):
        routes.update({sid: dict(st.server.sessions[sid].route) for sid in ids})
    results = asyncio.run(replicated.sessions_with_fault(target, 4, 1.6, note))
    n = replicated.frames_of(1.6)
    for res in results:
        replicated.check_exactly_once(res, n)
        # no recovery: every call reached the replica the session was routed to (on Serve a call that lands
        # on another replica is refused there, and the session would recover with a GAP event)
        assert res.motion_frames == list(range(n)) and not replicated.gaps(res) and res.stats.recoveries == 0
    assert sorted(r["diffusion"] for r in routes.values()) == [0, 0, 1, 1]
    got = [b.windows - w for b, w in zip(st.server.batchers, before)]
    assert all(g > 0 for g in got), f"a diffusion replica's batcher got no window: {got}"
    assert all(v == 0 for v in backend.router.load["diffusion"])       # closed sessions were released


@pytest.mark.ray
@pytest.mark.slow
def test_killed_diffusion_replica_recovers_only_its_sessions(two_diffusion):
    """Three sessions over two diffusion replicas; replica 1's process dies mid-stream. The sessions routed to
    it recover (GAP event, every frame exactly once, in order, to the end); the others never notice."""
    st, target, backend = two_diffusion
    routes = {}
    dead = backend.actor("diffusion", 1)

    async def kill(ids):
        routes.update({sid: dict(st.server.sessions[sid].route) for sid in ids})
        ray.kill(dead, no_restart=False)                  # Ray restarts it; its sessions' state there is gone
    results = asyncio.run(replicated.sessions_with_fault(target, 3, 4.0, kill, before_s=2.0))
    n = replicated.frames_of(4.0)
    hit = [r for r in results if routes[r.session_id]["diffusion"] == 1]
    spared = [r for r in results if routes[r.session_id]["diffusion"] == 0]
    assert hit and spared, routes
    for res in results:
        replicated.check_exactly_once(res, n)
        assert sum(f >= 50 for f in res.motion_frames) >= 40            # the audio sent after the kill
    for res in hit:
        print("GAP:", [e.message for e in replicated.gaps(res)])
        assert replicated.gaps(res) and res.stats.recoveries >= 1, [(e.kind, e.message) for e in res.events]
        assert res.stats.gap_frames == sum(e.frames for e in replicated.gaps(res))
    for res in spared:
        assert not replicated.gaps(res) and res.stats.recoveries == 0 and res.motion_frames == list(range(n))


@pytest.mark.ray
@pytest.mark.slow
def test_interrupt_on_replicated_stages(two_diffusion):
    """The protocol test's interrupt (buffered work dropped, playback reported, every frame once), served by
    either engine (on Serve nothing queued is cancelled: the dropped epoch's work runs and is discarded). It runs
    right after the kill above: a new session must not be routed to the killed replica's slot before its
    replacement answers (the Serve engine drains that slot until then)."""
    import contextlib

    from .test_serve_protocol import test_interrupt_drops_buffered_work_and_reports_playback as interrupt_test

    _, _, backend = two_diffusion
    with contextlib.ExitStack() as stack:
        interrupt_test(lambda **kw: stack.enter_context(server_thread(backend, **kw)))
