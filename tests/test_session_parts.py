"""The parts of a served session (echo_stream/serve/session/), each on its own, without Ray or a model:
the pacing rule, when input is handed to the pipeline, latency origins, the replay ledger after a fault,
the resume state, exactly-once egress, and the stage calls that open and switch epochs."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from echo_stream import config
from echo_stream.geometry import FEATURE_LOOKAHEAD_S, WindowGeometry
from echo_stream.serve.session import SessionFailed
from echo_stream.serve.session.failures import redactions
from echo_stream.serve.session.ingest import Arrivals, Chunker, Pacer
from echo_stream.serve.session.ledger import ReplayLedger, ResumeState
from echo_stream.serve.session.output import Egress, SessionStats
from echo_stream.serve.session.stages import StageLink

FPS = config.FPS
RATE = 16000


def _pcm(seconds: float, start: int = 0) -> dict:
    """An s16le PCM item whose samples count up from ``start`` (so a cut can be located)."""
    n = int(round(seconds * RATE))
    pcm = (np.arange(start, start + n) % 30000).astype("<i2").tobytes()
    return {"pcm": pcm, "format": "s16le", "rate": RATE, "channels": 1, "seconds": n / RATE, "pts": 0.0}


# ---------------------------------------------------------------------------------------------- pacing
def test_pacer_holds_avatar_audio_to_its_lead_over_real_time():
    p = Pacer(max_lead_s=2.0)
    waits = []
    for _ in range(4):                      # 4 s of audio sent at once, at t = 100
        waits.append(p.wait_s(100.0))
        p.received(1.0)
    assert waits == [0.0, 0.0, 0.0, pytest.approx(1.0)]   # the 4th second may only come 1 s later
    assert p.wait_s(101.5) == pytest.approx(0.5)          # 4 s in, 1.5 s passed: lead 2.5 s
    assert p.wait_s(102.0) == 0.0
    p.restart(110.0)                        # an interrupt: the lead starts again from zero
    assert p.received_s == pytest.approx(10.0) and p.wait_s(110.0) == 0.0


def test_pacer_restart_before_any_audio_changes_nothing():
    p = Pacer(max_lead_s=2.0)
    p.restart(5.0)
    assert p.t_first is None and p.received_s == 0.0


# ---------------------------------------------------------------------------------------------- chunking
GEOM = WindowGeometry(window_frames=24, max_stride=16, lookahead_frames=4)
EXTRA = 4 / FPS + FEATURE_LOOKAHEAD_S      # audio past a window's last new frame needed to cut it


def _feed_until_due(ch: Chunker, pushed_s: float, piece_s: float) -> float:
    """Add avatar audio pieces until the chunk is due; returns the epoch audio then in."""
    for _ in range(1000):
        ch.add("avatar_audio", {"seconds": piece_s})
        if ch.due(pushed_s):
            return pushed_s + ch.seconds
    raise AssertionError("never due")


def test_chunk_is_handed_over_as_soon_as_the_next_window_can_be_cut():
    ch = Chunker(GEOM, stride=16, chunk_s=10.0)     # chunk_s out of the way: only the window rule
    piece = 0.01
    first = _feed_until_due(ch, 0.0, piece)
    assert EXTRA <= first < EXTRA + piece + 1e-9            # the first window: S' frames need only the lookahead
    _, sec = ch.take()
    second = _feed_until_due(ch, sec, piece)
    assert 16 / FPS + EXTRA <= second < 16 / FPS + EXTRA + piece + 1e-9   # then every S' / fps seconds


def test_smaller_stride_hands_over_sooner():
    ch = Chunker(GEOM, stride=4, chunk_s=10.0)
    first = _feed_until_due(ch, 0.0, 0.01)
    _, sec = ch.take()
    assert 4 / FPS + EXTRA <= _feed_until_due(ch, sec, 0.01) < 4 / FPS + EXTRA + 0.01 + 1e-9
    assert first < 16 / FPS


def test_chunk_is_handed_over_at_chunk_s_or_max_items():
    ch = Chunker(GEOM, stride=16, chunk_s=8 / FPS)
    pushed = EXTRA + 16 / FPS + 0.04                # just past a window boundary: the next is 0.6 s away
    ch.add("avatar_audio", {"seconds": 0.0})        # nothing yet: not due
    assert not ch.due(pushed)
    ch.add("avatar_audio", {"seconds": 8 / FPS})    # a whole chunk, no window boundary crossed
    assert ch.due(pushed)
    ch.clear()
    for _ in range(Chunker.MAX_ITEMS - 1):          # user media carry no avatar audio seconds
        ch.add("user_audio", {"seconds": 0.04})
    assert ch.seconds == 0.0 and not ch.due(0.5)
    ch.add("user_audio", {"seconds": 0.04})
    assert ch.due(0.5)


def test_chunker_prepends_replayed_input():
    ch = Chunker(GEOM, stride=16, chunk_s=1.0)
    ch.add("avatar_audio", {"seconds": 0.1, "n": "new"})
    ch.prepend([("avatar_audio", {"seconds": 0.2, "n": "old"})], 0.2)
    items, sec = ch.take()
    assert [it["n"] for _, it in items] == ["old", "new"] and sec == pytest.approx(0.3)
    assert ch.take() == ([], 0.0)


# ---------------------------------------------------------------------------------------------- latency origins
def test_arrivals_give_each_frame_the_arrival_of_its_audio():
    a = Arrivals()
    a.add(0.0, 1.0, t=100.0)
    a.add(1.0, 1.0, t=101.0)
    assert a.origin(0) == 100.0 and a.origin(24) == 100.0
    assert a.origin(25) == 101.0 and len(a) == 1      # the first second is forgotten once passed
    assert a.origin(75) == 101.0                      # the newest is kept
    b = Arrivals()
    b.add(1.0, 1.0, t=5.0)
    assert b.origin(0) is None                        # audio of frame 0 never arrived here
    b.add(2.0, 1.0, t=6.0)
    b.keep_after(2.0)
    assert len(b) == 1 and b.origin(50) == 6.0


# ---------------------------------------------------------------------------------------------- replay ledger
def _three_chains() -> ReplayLedger:
    """Chains of 0.1 s avatar audio each (with a transcript in the second): 0-0.1, 0.1-0.2, 0.2-0.3 s."""
    led = ReplayLedger()
    led.record([("avatar_audio", _pcm(0.1, 0))], 0.1)
    led.record([("transcript", {"text": "hi"}), ("avatar_audio", _pcm(0.1, 1600))], 0.1)
    led.record([("avatar_audio", _pcm(0.1, 3200)), ("user_audio", _pcm(0.1, 0))], 0.1)
    return led


def _first_sample(item: dict) -> int:
    return int(np.frombuffer(item["pcm"], "<i2")[0])


def test_replay_after_a_fault_mid_chain_starts_at_the_frame_boundary():
    led = _three_chains()
    led.release(3)                                   # frames 0..2 out (0.12 s): the first chain is done
    assert len(led) == 2
    r = led.replay(3)
    assert r.first_frame == 3                        # the second chain starts at 0.1 s = frame 2.5: from frame 3
    kinds = [k for k, _ in r.items]
    assert kinds == ["transcript", "avatar_audio", "avatar_audio", "user_audio"]
    cut = r.items[1][1]
    assert _first_sample(cut) == 1600 + 320          # 20 ms cut: the audio of frame 3 on
    assert cut["seconds"] == pytest.approx(0.08) and len(cut["pcm"]) == 1280 * 2
    assert r.items[3][1]["pcm"] == _pcm(0.1, 0)["pcm"]   # user media are replayed whole
    assert r.seconds == pytest.approx(0.18)
    assert r.first_frame / FPS + r.seconds == pytest.approx(led.pushed_s)   # up to the end of what was pushed


def test_replay_at_a_chain_boundary_cuts_nothing():
    led = _three_chains()
    led.release(5)                                   # 0.2 s out: two chains done
    r = led.replay(5)
    assert r.first_frame == 5 and len(r.items) == 2
    assert _first_sample(r.items[0][1]) == 3200 and r.seconds == pytest.approx(0.1)


def test_replay_of_frames_already_out_is_left_to_the_egress():
    """Frames out but their chain not yet released (release follows the egress): replay from the chain's
    first frame; the egress drops the frames that come out again."""
    led = _three_chains()
    r = led.replay(4)                                # nothing released: the oldest chain in flight is the first
    assert r.first_frame == 3 and _first_sample(r.items[1][1]) == 1600 + 320


def test_nothing_to_replay():
    led = _three_chains()
    led.release(8)                                   # everything out
    assert led.replay(8) is None and len(led) == 0
    led = ReplayLedger()
    led.restart(10)                                  # a new epoch starting at frame 10
    assert led.epoch_t0 == pytest.approx(0.4) and led.epoch_pushed_s == 0.0
    led.record([("avatar_audio", _pcm(0.1))], 0.1)
    assert led.epoch_pushed_s == pytest.approx(0.1)
    assert led.replay(5) is None                     # frames 5..9 are not covered by the input kept


def test_restart_forgets_the_chains():
    led = _three_chains()
    led.restart(3)
    assert len(led) == 0 and led.frame_offset == 3 and led.pushed_s == pytest.approx(3 / FPS)
    assert led.replay(3) is None


# ---------------------------------------------------------------------------------------------- resume state
def test_resume_state_gives_the_previous_motion_only_when_complete():
    rs = ResumeState(keep=8)
    for f in range(10):
        rs.sent(f, np.full(3, f, np.float32))
    rs.checkpoint = b"lcu"
    r = rs.restore(produced=8, overlap=4)
    assert r.checkpoint == b"lcu" and r.prev_motion[:, 0].tolist() == [4, 5, 6, 7]
    assert rs.restore(produced=3, overlap=4).prev_motion is None      # frames 0, 1 no longer kept


# ---------------------------------------------------------------------------------------------- egress
def _egress(**spec):
    spec = SimpleNamespace(**{"wants_motion": True, "wants_video": False, "codec": "raw", "width": 8,
                              "height": 8, **spec})
    outbox: asyncio.Queue = asyncio.Queue()
    arrivals, ledger = Arrivals(), ReplayLedger()
    arrivals.add(0.0, 1.0, t=50.0)
    ledger.record([("avatar_audio", _pcm(0.2))], 0.2)
    ledger.record([("avatar_audio", _pcm(0.2))], 0.2)
    return Egress(spec, outbox, SessionStats(), arrivals, ResumeState(), ledger), outbox


def _drain(q: asyncio.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_egress_sends_every_frame_once_in_order():
    async def main():
        eg, outbox = _egress()
        rows = np.arange(12, dtype=np.float32).reshape(6, 2)
        await eg.emit(np.arange(0, 4), rows[:4], None)
        await eg.emit(np.arange(2, 6), rows[2:], None)        # a replay: frames 2, 3 again
        await eg.emit(np.arange(1, 3), rows[1:3], None)       # all of it already out
        sent = _drain(outbox)
        assert [o.msg.motion.frame for o in sent] == [0, 1, 2, 3, 4, 5]
        assert [o.upto for o in sent] == [1, 2, 3, 4, 5, 6] and all(o.origins == [50.0] for o in sent)
        assert list(sent[5].msg.motion.values) == [10.0, 11.0]
        assert eg.produced == 6 and len(eg.ledger) == 1        # the first chain (frames 0..4) is released
        assert eg.resume.restore(6, 2).prev_motion.tolist() == [[8.0, 9.0], [10.0, 11.0]]
        await eg.finish()
        end = _drain(outbox)
        assert end[0].msg.event.first_frame == 6 and end[-1] is None
    asyncio.run(main())


def test_egress_raw_video_is_counted_by_the_motion_when_both_are_sent():
    async def main():
        eg, outbox = _egress(wants_video=True, codec="raw")
        images = np.zeros((2, 8, 8, 3), np.uint8)
        await eg.emit(np.arange(0, 2), np.zeros((2, 2), np.float32), images)
        sent = _drain(outbox)
        assert [o.kind for o in sent] == ["motion", "video", "motion", "video"]
        assert [o.upto for o in sent] == [1, None, 2, None]
        eg, outbox = _egress(wants_motion=False, wants_video=True, codec="raw", output_mode="video")
        await eg.emit(np.arange(0, 2), np.zeros((2, 2), np.float32), images)
        assert [o.upto for o in _drain(outbox)] == [1, 2]
    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- stage link
class _Backend:
    """Records calls; each call's handle is its result, fetched as is (an exception is raised)."""

    def __init__(self, fail: dict | None = None):
        self.calls, self.fail, self.released, self.ended = [], fail or {}, [], []

    def assign(self, session_id, warm=None):
        return {"decode": 0, "features": 1, "memory": 0, "diffusion": 1, "render": 0}

    def release(self, route, session=None):
        self.released.append((dict(route), session))

    def end_stream(self, session):
        self.ended.append(session)

    def call(self, stage, method, *args, num_returns=1, replica=0, session=None):
        assert session.startswith("sid/")             # every call names its epoch's stream (Serve orders by it)
        self.calls.append((stage, method, replica) + args + (session,))
        return self.fail.get((stage, method))

    def put(self, value):
        return ("ref", value)

    async def get(self, handle):
        if isinstance(handle, BaseException):
            raise handle
        return handle

    def is_fault(self, e):
        return isinstance(e, ConnectionError)

    async def incarnations(self, route=None):
        return {("memory", route["memory"]): "inc-1"}


def _spec(**kw):
    return SimpleNamespace(**{"seed": 7, "wants_video": False, "portrait": None, "avatar_id": None,
                              "width": 8, "height": 8, **kw})


def test_stage_link_switches_epochs_and_restores_there():
    b = _Backend()
    link = StageLink("sid", _spec(), b, ["batcher0", "batcher1"], {})
    assert link.batcher == "batcher1"                 # the diffusion replica's batcher
    asyncio.run(link.open_epoch(16, None))
    assert [c[:2] for c in b.calls] == [("memory", "set_stride"), ("decode", "open_stream"),
                                        ("diffusion", "set_seed")]
    assert all(c[3] == "sid/0" for c in b.calls) and link.incarnations == {("memory", 0): "inc-1"}
    b.calls.clear()
    link.new_epoch()
    assert link.iid == "sid/1" and {c[1] for c in b.calls} == {"close_session"}
    assert {(c[0], c[2], c[3]) for c in b.calls} == {(s, r, "sid/0") for s, r in link.route.items()}
    assert {c[-1] for c in b.calls} == {"sid/0"} and b.ended == ["sid/0"]   # closed in the old epoch's stream
    b.calls.clear()
    rs = ResumeState()
    rs.checkpoint = b"ck"
    for f in range(8):
        rs.sent(f, np.zeros(2, np.float32))
    asyncio.run(link.open_epoch(4, rs.restore(8, 8)))
    methods = [c[:2] for c in b.calls]
    assert methods.index(("memory", "set_stride")) < methods.index(("memory", "import_state"))
    assert ("diffusion", "import_state") in methods and all(c[3] == "sid/1" == c[-1] for c in b.calls)
    link.close()
    link.close()
    assert b.released == [(link.route, "sid/1")]      # once, naming the epoch (its call order ends)


def test_stage_link_open_maps_input_errors_and_passes_faults_through():
    from echo_stream.errors import InputError

    spec = _spec(wants_video=True, portrait="/srv/avatars/a.png", avatar_id="anna")
    bad = StageLink("sid", spec, _Backend({("render", "open_session"): InputError("portrait", "no face in "
                                                                                  "/srv/avatars/a.png")}),
                    [None], redactions(spec))
    with pytest.raises(SessionFailed) as e:
        asyncio.run(bad.open_epoch(16, None))
    assert e.value.code == "INVALID_ARGUMENT" and "/srv" not in e.value.message and "'anna'" in e.value.message
    down = StageLink("sid", _spec(), _Backend({("decode", "open_stream"): ConnectionError("gone")}), [None], {})
    with pytest.raises(ConnectionError):            # a stage fault: the caller recovers
        asyncio.run(down.open_epoch(16, None))
