"""The stage host's reclaim of sessions left idle (the state an abruptly lost ingress leaves in a stage), on the
plain host and a real stage, without Ray: a test clock stands in for time; and the ingress's ``keep`` of its
running sessions."""
import logging

import pytest

from echo_stream.pipeline import transcript_batch
from echo_stream.stages import Packet
from echo_stream.stages.decode import DecodeStage
from echo_stream.stages.host import StageHost, session_ids_of
from echo_stream.stages.warmup import pushed_inputs
from echo_stream.transcript import Segment

from .test_serve_resume import Clock


def test_host_closes_only_sessions_with_no_call_for_the_idle_time(caplog):
    clock = Clock()
    host = StageHost(DecodeStage, idle_close_s=100.0, clock=clock)
    assert host.sweep_every_s == 10.0
    for sid in ("a", "b", "c"):
        host.call("open_stream", sid)
    clock.t = 8
    host.call("open_stream", "e")
    clock.t = 50
    host.call("push", "a", pushed_inputs(1))          # a running session's call
    clock.t = 60
    host.keep(["b"])                                  # a silent session its ingress keeps
    clock.t = 105
    with caplog.at_level(logging.WARNING, logger="echo_stream.stages.host"):
        host.call("open_stream", "d")                 # any call sweeps (at most every sweep_every_s)
    assert sorted(host.stage.session_ids()) == ["a", "b", "d", "e"]     # c: no call for 105 s
    assert host.reclaimed == 1 and host.stats()["reclaimed_sessions"] == 1
    assert "closed the state of 1 session(s)" in caplog.text and ": c" in caplog.text
    clock.t = 110                                     # e is idle now, but the last sweep was 5 s ago
    assert host.sweep() == [] and "e" in host.stage.session_ids()
    clock.t = 115
    assert host.sweep() == ["e"]
    clock.t = 200
    assert sorted(host.sweep()) == ["a", "b"]         # d's last call was 95 s ago
    assert host.stage.session_ids() == ["d"] and host.reclaimed == 4
    host.call("close_session", "d")                   # closed by its ingress: nothing left to reclaim
    host.stage.open_stream("x")                       # state made by no call this host saw
    clock.t = 250
    assert host.sweep() == [] and host.stage.session_ids() == ["x"]    # counted from the first sweep finding it
    clock.t = 349                                     # a sweep: x has had 99 s
    assert host.sweep() == []
    clock.t = 359
    assert host.sweep() == ["x"] and host.stage.session_ids() == [] and host.reclaimed == 5
    with pytest.raises(KeyError, match="unknown pushed session 'a'"):  # a reclaimed session's state is gone
        host.call("push", "a", pushed_inputs(1))


def test_host_without_idle_time_never_closes_and_bad_idle_times_are_refused():
    clock = Clock()
    host = StageHost(DecodeStage, clock=clock)
    host.call("open_stream", "a")
    clock.t = 1e9
    host.call("open_stream", "b")
    assert host.sweep() == [] and sorted(host.stage.session_ids()) == ["a", "b"] and host.reclaimed == 0
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="idle_close_s"):
            StageHost(DecodeStage, idle_close_s=bad)


def test_a_calls_sessions_are_read_from_its_arguments():
    p, q = Packet("s/0"), Packet("t/2")
    assert session_ids_of(("s/0", 16)) == ["s/0"]
    assert session_ids_of((p,)) == ["s/0"]
    assert session_ids_of(([p, q],)) == ["s/0", "t/2"]                 # a batched diffusion / render call
    assert session_ids_of((transcript_batch("u/1", [Segment(0.0, 0.5, "avatar", "hi")]),)) == ["u/1"]
    assert session_ids_of(()) == [] and session_ids_of((3,)) == []


def test_stage_idle_timeout_is_checked_before_anything_starts(capsys):
    from echo_stream import cli

    assert cli.main(["serve", "--port", "0", "--stage-idle-timeout", "60"]) == 1
    err = capsys.readouterr().err
    assert "--stage-idle-timeout: 60.0: seconds, at least 1 and at least --resume-ttl (120)" in err
    assert "Traceback" not in err
    assert cli.main(["serve", "--port", "0", "--resume-ttl", "0", "--stage-idle-timeout", "0"]) == 1
    assert "--stage-idle-timeout: 0.0" in capsys.readouterr().err


def test_server_keeps_its_running_sessions_state_on_their_replicas():
    """The ingress tells each replica, every quarter of the idle time, which sessions it runs there (their
    current epoch's stage id), so a session whose client is silent is not closed as idle."""
    import asyncio
    from types import SimpleNamespace

    from echo_stream.serve.server import AvatarServer, ServeOptions

    kept = []

    class Backend:
        async def keep_sessions(self, held):
            kept.append(held)

    server = AvatarServer(Backend(), ServeOptions(port=0, stage_idle_s=0.04))
    server.sessions = {"a": SimpleNamespace(route={"decode": 0, "memory": 1}, iid="a/2"),
                       "b": SimpleNamespace(route={"decode": 0, "memory": 0}, iid="b.1/0")}

    async def main():
        loop = asyncio.create_task(server._keep_stage_state())
        try:
            for _ in range(500):
                if kept:
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.cancel()
    asyncio.run(main())
    assert kept[0] == {("decode", 0): ["a/2", "b.1/0"], ("memory", 1): ["a/2"], ("memory", 0): ["b.1/0"]}


def test_stage_call_deadline_is_checked_before_anything_starts(capsys):
    from echo_stream import cli

    for bad in ("0.5", "inf", "nan"):
        assert cli.main(["serve", "--port", "0", "--stage-call-deadline", bad]) == 1
        err = capsys.readouterr().err
        assert "--stage-call-deadline" in err and "seconds, at least 1" in err and "Traceback" not in err
