"""Running sessions moved between replicas (``serve --rebalance-interval``): the plan (``serve.rebalance``)
without Ray, and moves of real sessions through the in-process pipeline (real TTS speech): every frame once,
in order, one GAP event that says why, the router's loads evened out."""
from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from echo_stream import config, media
from echo_stream.chain import STAGES
from echo_stream.pipeline import PipelineOptions
from echo_stream.protos import echo_stream_pb2 as pb
from echo_stream.serve import metrics
from echo_stream.serve.backend import InlineBackend
from echo_stream.serve.client import AvatarClient, Inputs, stream_inputs
from echo_stream.serve.rebalance import plan_moves
from echo_stream.serve.routing import Router
from echo_stream.serve.server import ServeOptions, ServerThread

TTS = os.path.join(os.path.dirname(__file__), "data", "tts")


def _router(counts: dict, sessions: dict[str, dict]) -> Router:
    r = Router({s: counts.get(s, 1) for s in STAGES})
    for route in sessions.values():
        for s, i in route.items():
            r.load[s][i] += 1
    return r


def _routes(diffusion: list[int]) -> dict[str, dict]:
    return {f"s{k}": {s: (i if s == "diffusion" else 0) for s in STAGES} for k, i in enumerate(diffusion)}


# ------------------------------------------------------------------------------------------------ the plan
def test_a_new_empty_replica_takes_a_session_from_the_most_loaded_one():
    routes = _routes([0, 0, 0, 0, 1, 1])
    router = _router({"diffusion": 3}, routes)      # replica 2 just added: [4, 2, 0]
    moves = plan_moves(router, routes, lambda sid: True, per_stage=3)
    # [4, 2, 0] -> [3, 2, 1] -> [2, 2, 2]: then nothing is left to even out
    assert [(m.stage, m.source, m.target) for m in moves] == [("diffusion", 0, 2), ("diffusion", 0, 2)]
    assert moves[0].why.startswith("balance: diffusion replica 0 held 4 sessions, replica 2 0")
    assert len({m.session for m in moves}) == 2
    assert all(routes[m.session]["diffusion"] == m.source for m in moves)
    assert router.load["diffusion"] == [4, 2, 0]    # planning changes nothing
    routes = _routes([0, 0, 0, 1, 1])               # [3, 2, 0] -> [2, 2, 1]: one move
    assert len(plan_moves(_router({"diffusion": 3}, routes), routes, lambda sid: True, per_stage=3)) == 1


def test_a_difference_of_one_is_left_alone():
    routes = _routes([0, 0, 1])
    assert plan_moves(_router({"diffusion": 2}, routes), routes, lambda sid: True) == []


def test_sessions_that_may_not_move_stay():
    routes = _routes([0, 0, 0])
    router = _router({"diffusion": 2}, routes)
    assert plan_moves(router, routes, lambda sid: False) == []
    moves = plan_moves(router, routes, lambda sid: sid == "s2")
    assert [(m.session, m.target) for m in moves] == [("s2", 1)]


def test_a_drained_replica_is_emptied_even_when_that_unbalances_the_others():
    routes = _routes([0, 1, 1])
    router = _router({"diffusion": 2}, routes)
    router.drain("diffusion", 1)
    moves = plan_moves(router, routes, lambda sid: True, per_stage=3)
    assert [(m.source, m.target) for m in moves] == [(1, 0), (1, 0)]
    assert all(m.why.startswith("drain: diffusion replica 1") for m in moves)


def test_no_move_for_balance_while_the_autoscaler_wants_fewer_replicas():
    routes = _routes([0, 0, 0, 1])
    router = _router({"diffusion": 3}, routes)
    assert plan_moves(router, routes, lambda sid: True, surplus=lambda stage, sessions, n: True) == []
    router.drain("diffusion", 1)                    # ... but a drained replica is still emptied
    moves = plan_moves(router, routes, lambda sid: True, surplus=lambda stage, sessions, n: True)
    assert [(m.source, m.target) for m in moves] == [(1, 2)]


def test_a_session_moves_on_one_stage_per_round_and_stages_with_one_replica_are_skipped():
    routes = {f"s{k}": {s: 0 for s in STAGES} for k in range(3)}
    router = _router({"diffusion": 2, "render": 2}, routes)
    moves = plan_moves(router, routes, lambda sid: True)
    assert sorted(m.stage for m in moves) == ["diffusion", "render"]
    assert len({m.session for m in moves}) == 2
    assert plan_moves(_router({}, routes), routes, lambda sid: True) == []


# ------------------------------------------------------------------------------------- real sessions
class TwoReplicaInline(InlineBackend):
    """The in-process pipeline behind a router with ``counts`` replicas per stage: every replica is the same
    in-process stage (state is per epoch id, so a move still opens the session anew from its checkpoint)."""

    def __init__(self, inner: InlineBackend, counts: dict, silent: set = frozenset()):
        self.runner, self._pools = inner.runner, inner._pools
        self.router = Router({s: counts.get(s, 1) for s in STAGES})
        self.silent = silent                        # (stage, replica) whose pings never answer
        self.transcripts: list[tuple[str, str, float]] = []   # (stage id, text, start) of add_transcript calls
        self.opened: list[tuple[str, int]] = []     # (stage id, replica) of each diffusion set_seed (an epoch open)

    def call(self, stage, method, *args, num_returns=1, replica=0, session=None):
        assert replica < self.router.counts[stage], (stage, replica)
        if method == "ping" and (stage, replica) in self.silent:
            import concurrent.futures as cf

            from echo_stream.serve.backend import _Handle
            return _Handle(cf.Future())
        if stage == "diffusion" and method == "set_seed":
            self.opened.append((args[0], replica))
        if method == "add_transcript":
            from echo_stream import schemas
            b = args[0]
            self.transcripts += zip(schemas.column(b, "session_id"), schemas.column(b, "text").tolist(),
                                    schemas.column(b, "pts").tolist())
        return super().call(stage, method, *args, num_returns=num_returns, replica=0, session=session)

    def assign(self, session_id, warm=None):
        return self.router.assign(session_id, warm)

    def release(self, route, session=None):
        self.router.release(route)

    async def wait_ready(self, timeout=60.0, route=None, move_after_s=1.0, avoid_node=None):
        return None                                 # (every replica is the in-process stage: it answers)


@pytest.fixture(scope="module")
def inline():
    b = InlineBackend(PipelineOptions(size=(64, 64)))
    yield b
    b.shutdown()


def _speech(*names):
    return np.concatenate([media.decode_audio(os.path.join(TTS, n)) for n in names])


def _serve_sessions(backend, opts, audios, during=None, transcript=()):
    """Sessions of ``audios`` (real time) through a server on ``backend``; ``during(server)`` runs 1 s after
    they opened. Returns their results."""
    st = ServerThread(backend, opts)
    target = f"127.0.0.1:{st.start()}"

    async def main():
        clients = [AvatarClient(target) for _ in audios]
        runs = [asyncio.get_running_loop().create_task(stream_inputs(
            c, Inputs(a, transcript=list(transcript)), output="motion", seed=i, realtime=True))
            for i, (c, a) in enumerate(zip(clients, audios))]
        await asyncio.sleep(1.0)
        if during is not None:                       # on the server's loop, as the autoscaler would
            async def step():
                during(st.server)
            await asyncio.get_running_loop().run_in_executor(None, lambda: st.run(step(), timeout=10))
        results = await asyncio.gather(*runs)
        for c in clients:
            await c.close()
        return results
    try:
        return asyncio.run(main()), st
    finally:
        st.stop()


def test_sessions_move_onto_an_added_replica_with_every_frame_once(inline):
    """Two sessions on the only diffusion replica; a second one is added (as the autoscaler would): one session
    moves there — every frame once, in order, one GAP event naming the move and no frame lost — and the
    router's loads are [1, 1]. The transcript segments its old epoch still held are sent into the new one."""
    from echo_stream.transcript import Segment

    backend = TwoReplicaInline(inline, {})
    audio = _speech("tts0.ogg")
    n = int(np.ceil(len(audio) / config.SAMPLES_PER_FRAME - 1e-6))
    words = [Segment(k * 0.2, k * 0.2 + 0.2, "user", f"w{k}") for k in range(25)]
    before = metrics.MOVES.labels("balance")._value.get()
    results, st = _serve_sessions(backend, ServeOptions(port=0, rebalance_interval_s=0.2), [audio, audio],
                                  during=lambda server: backend.router.add("diffusion"), transcript=words)
    moved = []
    for res in results:
        assert res.motion_frames == list(range(n)), [(e.kind, e.message) for e in res.events]
        assert res.events[-1].kind == pb.Event.ENDED
        gaps = [e for e in res.events if e.kind == pb.Event.GAP]
        assert all(e.frames == 0 for e in gaps)
        if gaps:
            moved.append(res.session_id)
            assert len(gaps) == 1 and "moved to another replica (balance: diffusion replica 0 held 2 sessions" \
                in gaps[0].message and "diffusion replica 0 -> 1" in gaps[0].message, gaps[0].message
            assert "no frame was lost" in gaps[0].message
    assert len(moved) == 1                          # one move evens 2:0 out; the other session stays
    sent = {}                                        # epoch -> [(text, start)] of the moved session
    for iid, text, start in backend.transcripts:
        if iid.startswith(moved[0] + "/"):
            sent.setdefault(int(iid.rsplit("/", 1)[1]), []).append(text)
    again = [w for w in sent[1] if w in sent[0]]    # sent into epoch 0, then again into epoch 1
    assert again and sent[0] + sent[1][len(again):] == [w.text for w in words], sent
    assert sent[0][-len(again):] == again           # the latest ones: those from the epoch's first frame on
    assert metrics.MOVES.labels("balance")._value.get() == before + 1
    assert backend.router.load["diffusion"] == [0, 0]     # both released at their end
    assert (moved[0] + "/1", 1) in backend.opened  # the new epoch opened on replica 1


def test_without_the_interval_nobody_moves(inline):
    backend = TwoReplicaInline(inline, {})
    audio = _speech("tts3.ogg")
    results, _ = _serve_sessions(backend, ServeOptions(port=0), [audio, audio],
                                 during=lambda server: backend.router.add("diffusion"))
    assert all(not [e for e in r.events if e.kind == pb.Event.GAP] for r in results)
    assert all(iid.endswith("/0") for iid, _ in backend.opened)


def test_a_move_to_a_replica_that_does_not_answer_is_not_made(inline):
    """The new replica is silent: its session is not moved (nothing dropped, no GAP), and it stays counted
    where it is."""
    backend = TwoReplicaInline(inline, {}, silent={("diffusion", 1)})
    audio = _speech("tts3.ogg")
    results, _ = _serve_sessions(backend, ServeOptions(port=0, rebalance_interval_s=0.3), [audio, audio],
                                 during=lambda server: backend.router.add("diffusion"))
    n = int(np.ceil(len(audio) / config.SAMPLES_PER_FRAME - 1e-6))
    for res in results:
        assert res.motion_frames == list(range(n)) and not [e for e in res.events if e.kind == pb.Event.GAP]
    assert all(iid.endswith("/0") for iid, _ in backend.opened)   # no epoch switch began
