"""Which replica a recovering session takes (``serve.backend.best_answer``), without Ray: replicas answer a
ping after a delay of their own (None: silent for the whole ping timeout). What was waited for is read from
which pings ran to their end (``finished``), not from the clock."""
from __future__ import annotations

import asyncio

import pytest

from echo_stream.serve.backend import best_answer


class Replicas:
    """A backend whose replicas of one stage answer after ``delays[i]`` s (None: never) from ``nodes[i]``."""

    def __init__(self, delays: list[float | None], nodes: list[str] | None = None):
        self.delays = delays
        self.nodes = nodes or ["n0"] * len(delays)
        self.replica_nodes: dict[tuple, str] = {}
        self.finished: set[int] = set()             # pings that ran to their end: answered, or timed out

    async def _answers(self, stage: str, i: int, timeout: float) -> bool:
        d = self.delays[i]
        if d is None or d > timeout:
            await asyncio.sleep(timeout)
            self.finished.add(i)
            return False
        await asyncio.sleep(d)
        self.finished.add(i)
        self.replica_nodes[(stage, i)] = self.nodes[i]
        return True


def pick(backend, order, wait=1.0, avoid=None, grace=0.25):
    return asyncio.run(best_answer(backend, "diffusion", order, wait, avoid, grace=grace))


def test_the_best_replica_that_answers_in_time_is_taken():
    backend = Replicas([0.05, 0.01, 0.01])
    assert pick(backend, [0, 1, 2]) == 0


def test_a_silent_better_replica_is_waited_for_only_the_grace_after_the_first_answer():
    # replica 0 (the session's own) is on a lost node: silent for the whole 2 s ping timeout
    backend = Replicas([None, 0.02, 0.01])
    best = pick(backend, [0, 1, 2], wait=2.0, grace=0.2)
    assert best == 1                              # the better of the two that answered, not the first to answer
    assert 0 not in backend.finished              # taken before the silent one's 2 s ping timeout ran out


def test_a_better_replica_answering_within_the_grace_is_still_preferred():
    assert pick(Replicas([0.15, 0.01]), [0, 1], grace=0.5) == 0


def test_with_no_answer_within_the_grace_the_session_waits_for_any_answer():
    # nobody answers fast: the grace only starts with the first answer
    backend = Replicas([None, 0.4])
    assert pick(backend, [0, 1], wait=1.0, grace=0.05) == 1
    assert backend.finished == {1}                # waited for that answer, not for the silent one's timeout


def test_none_when_no_replica_answers():
    backend = Replicas([None, None])
    assert pick(backend, [0, 1], wait=0.2) is None and backend.finished == {0, 1}


def test_a_replica_on_the_avoided_node_is_taken_only_when_no_other_answers():
    backend = Replicas([0.01, 0.1, None], nodes=["lost", "kept", "kept"])
    best = pick(backend, [0, 1, 2], wait=0.5, grace=0.05, avoid="lost")
    assert best == 1                              # ordered first and fastest, but on the avoided node
    backend = Replicas([0.01, None, None], nodes=["lost", "kept", "kept"])
    best = pick(backend, [0, 1, 2], wait=0.3, grace=0.05, avoid="lost")
    assert best == 0 and backend.finished == {0, 1, 2}   # the others were given the whole ping timeout first


@pytest.mark.parametrize("known", [True, False])
def test_the_avoided_node_goes_last_whether_known_before_or_learned_from_the_answer(known):
    backend = Replicas([0.01, 0.05], nodes=["lost", "kept"])
    if known:
        backend.replica_nodes[("diffusion", 0)] = "lost"
    assert pick(backend, [0, 1], wait=0.5, avoid="lost") == 1
