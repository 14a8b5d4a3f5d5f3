"""Resume records, resume points and the cut of re-sent input, without Ray (the served resume across two
ingresses is in tests/test_serve_ray.py)."""
import asyncio

import numpy as np
import pytest

from echo_stream import config
from echo_stream.errors import InputError
from echo_stream.protos import echo_stream_pb2 as pb
from echo_stream.serve import wire
from echo_stream.serve.resume import InputCut, ResumeRecords, ResumeRefused, Update, resume_point

FPS = config.FPS


class Clock:
    """A clock that stands still until a test sets ``t`` (also used by tests/test_stage_host.py)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _rows(frames):
    return [(f, np.full(4, f, np.float32)) for f in frames]


def test_records_are_owned_by_one_generation_and_refuse_clearly():
    clock = Clock()
    r = ResumeRecords(ttl_s=10, max_records=2, keep=16, clock=clock)
    assert r.create("s1", "alice", "d1") == 0
    assert r.update("s1", 0, Update(5, _rows(range(5)), checkpoint=b"ck", t_first_wall=100.0))
    refusals = {"NOT_FOUND": ("nope", "alice", "d1"), "PERMISSION_DENIED": ("s1", "bob", "d1"),
                "INVALID_ARGUMENT": ("s1", "alice", "other config")}
    for code, args in refusals.items():
        with pytest.raises(ResumeRefused) as e:
            r.claim(*args)
        assert e.value.code == code and e.value.message
    gen, rec = r.claim("s1", "alice", "d1")
    assert gen == 1 and rec.produced == 5 and rec.checkpoint == b"ck" and rec.t_first_wall == 100.0
    assert [f for f, _ in rec.rows] == list(range(5))
    # the old writer (generation 0) no longer owns the session: refused, and told so by touch
    assert not r.update("s1", 0, Update(9, _rows(range(5, 9))))
    assert r.touch([("s1", 0), ("s1", 1)]) == ["s1"]
    assert r.update("s1", 1, Update(9, _rows(range(3, 9))))          # overlapping rows are kept once
    assert [f for f, _ in rec.rows] == list(range(9)) and rec.checkpoint == b"ck"
    r.drop("s1", 0)                                                   # not its writer's any more: kept
    assert len(r) == 1
    r.drop("s1", 1)
    assert len(r) == 0
    # capacity, and expiry ttl after the last update
    r.create("a", "p", "d")
    r.create("b", "p", "d")
    with pytest.raises(ResumeRefused) as e:
        r.create("c", "p", "d")
    assert e.value.code == "RESOURCE_EXHAUSTED"
    clock.t = 8.0
    r.touch([("a", 0)])
    clock.t = 12.0
    assert r.expire() == 1 and len(r) == 1                            # b expired, a was touched at 8 s
    with pytest.raises(ResumeRefused) as e:
        r.claim("b", "p", "d")
    assert e.value.code == "NOT_FOUND" and "expired" in e.value.message


def test_a_claim_hands_back_the_node_of_the_ingress_that_held_the_session():
    """The record knows which node's ingress holds the session: a claim gives the new ingress the previous
    holder's node (to avoid its replicas) and records its own, for the next resume."""
    r = ResumeRecords(ttl_s=10)
    r.create("s1", "alice", "d1", node="node-a")
    gen, rec = r.claim("s1", "alice", "d1", node="node-b")
    assert (gen, rec.node) == (1, "node-a")
    gen, rec = r.claim("s1", "alice", "d1", node="node-b")        # a second resume: from node-b's ingress
    assert (gen, rec.node) == (2, "node-b")
    r.create("s2", "alice", "d1")                                  # an ingress that does not know its node
    assert r.claim("s2", "alice", "d1", node="node-c")[1].node == ""


def test_resume_point_restarts_where_the_previous_motion_is_known():
    recs = ResumeRecords(keep=64)
    recs.create("s", "p", "d")
    recs.update("s", 0, Update(50, _rows(range(50)), checkpoint=b"ck"))
    _, rec = recs.claim("s", "p", "d")
    # the client has every frame the store knows: restart there, with the 8 frames before it
    p = resume_point(rec, 50, overlap=8)
    assert (p.frame, p.next_frame) == (50, 50) and p.checkpoint == b"ck"
    np.testing.assert_array_equal(p.prev_motion[:, 0], np.arange(42, 50))
    # the client got frames the store had not heard of yet: restart at the store's newest, later frames dropped
    p = resume_point(rec, 57, overlap=8)
    assert (p.frame, p.next_frame) == (50, 57) and p.prev_motion[-1, 0] == 49
    # the client is behind the store: restart at the client's frame (the store's later frames come again)
    p = resume_point(rec, 30, overlap=8)
    assert p.frame == 30 and p.prev_motion[0, 0] == 22
    # too young to have the previous motion: restart at the client's frame without it
    p = resume_point(rec, 3, overlap=8)
    assert (p.frame, p.prev_motion) == (3, None)
    assert resume_point(rec, 0, overlap=8).frame == 0
    assert p.pts == pytest.approx(3 / FPS)


def _pcm(seconds, pts, rate=16000, value=0.25):
    x = np.full(int(round(seconds * rate)), value, "<f4")
    return {"pcm": x.tobytes(), "format": "f32le", "rate": rate, "channels": 1, "seconds": seconds, "pts": pts}


def test_input_sent_again_is_cut_at_the_resume_time():
    cut = InputCut(1.2)
    # avatar audio re-sent from 1.0 s in 0.1 s pieces: 0.2 s are cut (two pieces), then everything passes
    pieces = [cut.cut("avatar_audio", _pcm(0.1, 1.0 + 0.1 * k)) for k in range(4)]
    assert pieces[0] == [] and pieces[1] == []
    assert len(pieces[2]) == 1 and pieces[2][0]["pts"] == pytest.approx(1.2) and pieces[3][0]["pts"] == pytest.approx(1.3)
    # a piece straddling the resume time keeps its part after it (by samples)
    c2 = InputCut(1.25)
    (rest,) = c2.cut("avatar_audio", _pcm(0.1, 1.2))
    assert len(rest["pcm"]) == 800 * 4 and rest["seconds"] == pytest.approx(0.05) and rest["pts"] == pytest.approx(1.25)
    # user audio is cut on its own clock
    assert c2.cut("user_audio", _pcm(0.1, 1.0)) == [] and c2.cut("user_audio", _pcm(0.2, 1.1))[0]["pts"] == \
        pytest.approx(1.25)
    # a track that starts again late is padded with silence up to its first piece
    c3 = InputCut(2.0)
    silence, piece = c3.cut("avatar_audio", _pcm(0.1, 2.3))
    assert silence["seconds"] == pytest.approx(0.3) and not np.frombuffer(silence["pcm"], "<f4").any()
    assert piece["pts"] == 2.3 and c3.padded_s == pytest.approx(0.3)
    # video frames, blendshapes, transcript before the resume time are dropped; control passes
    assert c3.cut("user_video", {"raw": b"", "pts": 1.9}) == [] and c3.cut("user_video", {"raw": b"", "pts": 2.0})
    assert c3.cut("blendshapes", {"values": {}, "pts": 1.5}) == []
    assert c3.cut("transcript", {"pts": 1.0, "end_pts": 2.5, "text": "x", "speaker": "user"}) == []
    assert c3.cut("control", {"kind": "end"}) == [{"kind": "end"}]
    # encoded video has no pts to cut by: passes
    assert c3.cut("user_video", {"encoded": b"x", "codec": "h264"})


def test_resume_request_is_validated_and_the_config_must_be_the_same():
    cfg = pb.SessionConfig(output_mode=pb.OUTPUT_MODE_MOTION, seed=3, has_seed=True)
    plain = pb.ClientMessage(seq=0, config=cfg)
    assert wire.resume_request(plain) is None
    msg = pb.ClientMessage(seq=0, config=cfg)
    msg.config.resume.session_id = "abc_DEF-123"
    msg.config.resume.next_frame = 40
    req = wire.resume_request(msg)
    assert (req.session_id, req.next_frame) == ("abc_DEF-123", 40)
    assert req.digest == wire.config_fingerprint(plain)               # the resume field itself is not compared
    other = pb.ClientMessage(seq=0, config=pb.SessionConfig(output_mode=pb.OUTPUT_MODE_MOTION, seed=4,
                                                            has_seed=True))
    assert wire.config_fingerprint(other) != req.digest
    for field, value, what in (("session_id", "no spaces allowed", "session_id"), ("session_id", "", "session_id"),
                               ("next_frame", 1 << 41, "next_frame")):
        bad = pb.ClientMessage(seq=0, config=cfg)
        bad.config.resume.session_id = "abc"
        setattr(bad.config.resume, field, value)
        with pytest.raises(InputError) as e:
            wire.resume_request(bad)
        assert f"config.resume.{what}" in str(e.value)


def test_resume_flags_are_checked_before_anything_starts(capsys, tmp_path):
    from echo_stream import cli

    assert cli.main(["serve", "--port", "0", "--resume-ttl", "-5"]) == 1
    err = capsys.readouterr().err
    assert "--resume-ttl: -5.0: seconds >= 0" in err and "Traceback" not in err
    assert cli.main(["client", "--test-signal", "1", "--motion-out", str(tmp_path / "m.parquet"),
                     "--resume-through", "localhost"]) == 1
    err = capsys.readouterr().err
    assert "--resume-through: 'localhost': give HOST:PORT" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


class _FakeStore:
    """Stands in for the store actor's handle in the writer's unit test: each ``update.remote`` is a future the
    test answers (a narrow unit test of the writer's coalescing, not of Ray)."""

    def __init__(self):
        self.calls, self.pending = [], []
        store = self

        class _Method:
            def remote(self, sid, gen, u):
                fut = asyncio.get_running_loop().create_future()
                store.calls.append((sid, gen, u))
                store.pending.append(fut)
                return fut
        self.update = _Method()


def test_record_writer_keeps_one_update_in_flight_and_notices_a_takeover():
    import asyncio as aio

    from echo_stream.serve.resume import RecordWriter, Shards

    async def main():
        store, taken = _FakeStore(), []
        w = RecordWriter(store, "s", 2, keep=8, on_taken_over=lambda: taken.append(True), min_interval_s=0.0)
        w.frames_out(4, _rows(range(4)))
        await aio.sleep(0)
        w.checkpoint(b"ck1")
        w.frames_out(8, _rows(range(4, 8)))
        w.checkpoint(b"ck2")
        await aio.sleep(0)
        assert len(store.calls) == 1                      # one in flight: the rest waits for it
        store.pending[0].set_result(True)
        for _ in range(3):
            await aio.sleep(0)
        assert len(store.calls) == 2                      # everything noted meanwhile, in one update
        _, gen, u = store.calls[1]
        assert gen == 2 and u.produced == 8 and u.checkpoint == b"ck2" and [f for f, _ in u.rows] == [4, 5, 6, 7]
        store.pending[1].set_result(False)                # refused: a resume elsewhere took the session over
        for _ in range(3):
            await aio.sleep(0)
        assert taken == [True]
        # rate limit: a second update within min_interval_s waits
        store2 = _FakeStore()
        w2 = RecordWriter(store2, "t", 0, min_interval_s=1.0)
        w2.frames_out(1, _rows([0]))
        await aio.sleep(0)
        store2.pending[0].set_result(True)
        w2.frames_out(2, _rows([1]))
        await aio.sleep(0.05)
        assert len(store2.calls) == 1
        await aio.sleep(1.5)
        assert len(store2.calls) == 2
        store2.pending[1].set_result(True)
        await aio.sleep(0)
    aio.run(main())
    shards = Shards(["a", "b", "c"])
    picks = [shards.of(f"session-{i}") for i in range(60)]
    assert picks == [shards.of(f"session-{i}") for i in range(60)] and set(picks) == {"a", "b", "c"}


async def _until(cond, what: str):
    """Let the writer's task run until ``cond()`` holds (a bound for a broken writer, not a timing check)."""
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_record_writer_puts_a_failed_update_back_and_the_record_gets_it():
    from echo_stream.serve.resume import RecordWriter

    async def main():
        records, store = ResumeRecords(keep=6), _FakeStore()
        records.create("s", "p", "d")
        w = RecordWriter(store, "s", 0, keep=6, retry_after_s=0.01)
        w.checkpoint(b"ck1")
        w.audio_clock(12.5)
        w.frames_out(4, _rows(range(4)))
        await asyncio.sleep(0)
        assert len(store.calls) == 1 and store.calls[0][2].checkpoint == b"ck1"
        w.frames_out(7, _rows(range(4, 7)))              # noted while the first update is in flight
        w.checkpoint(b"ck2")
        store.pending[0].set_exception(RuntimeError("the store is restarting"))
        await _until(lambda: len(store.calls) == 2, "the failed update is sent again")   # no new change needed
        _, _, u = store.calls[1]
        # the failed rows go before the newer ones, the newest 6 kept; the newer checkpoint wins, the clock stays
        assert [f for f, _ in u.rows] == [1, 2, 3, 4, 5, 6]
        assert u.produced == 7 and u.checkpoint == b"ck2" and u.t_first_wall == 12.5
        store.pending[1].set_result(records.update(*store.calls[1]))
        await _until(lambda: w.sent == 1, "the retried update is accepted")
        r = records._records["s"]
        assert [f for f, _ in r.rows] == [1, 2, 3, 4, 5, 6] and r.checkpoint == b"ck2" and r.t_first_wall == 12.5
        assert w.failures == 1 and len(store.calls) == 2    # nothing left to send
        # a later failure of an update with no checkpoint keeps the one noted after it
        w.frames_out(8, _rows([7]))
        await asyncio.sleep(0)
        w.checkpoint(b"ck3")
        store.pending[2].set_exception(RuntimeError("again"))
        await _until(lambda: len(store.calls) == 4, "the second failed update is sent again")
        _, _, u = store.calls[3]
        assert [f for f, _ in u.rows] == [7] and u.checkpoint == b"ck3" and u.t_first_wall is None
        store.pending[3].set_result(records.update(*store.calls[3]))
        await _until(lambda: w.sent == 2, "the second retry is accepted")
        assert [f for f, _ in records._records["s"].rows][-2:] == [6, 7]
    asyncio.run(main())


def test_record_writer_waits_before_retrying_and_close_sends_what_failed_at_once():
    from echo_stream.serve.resume import RecordWriter

    async def main():
        store = _FakeStore()
        w = RecordWriter(store, "s", 3, retry_after_s=60.0, retry_max_s=60.0)
        w.frames_out(2, _rows(range(2)))
        await asyncio.sleep(0)
        store.pending[0].set_exception(ConnectionError("store gone"))
        for _ in range(20):
            await asyncio.sleep(0)
        w.frames_out(3, _rows([2]))                      # a change while the retry waits: it joins the retry
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(store.calls) == 1 and w.failures == 1   # no call to a failing store before the backoff
        closing = asyncio.get_running_loop().create_task(w.close(drop=False))
        await _until(lambda: len(store.calls) == 2, "close sends what is left at once")
        _, gen, u = store.calls[1]
        assert gen == 3 and u.produced == 3 and [f for f, _ in u.rows] == [0, 1, 2]
        store.pending[1].set_result(True)
        await closing
        assert w.sent == 1
    asyncio.run(main())
    with pytest.raises(ValueError, match="retry_after_s"):
        RecordWriter(None, "s", 0, retry_after_s=0.0)
