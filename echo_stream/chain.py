"""The stage chain, declared once: which stages, in which order, what each reserves on a GPU, which one
serving batches across sessions. Generate (``pipeline.stream_session``), serve (``serve.session``), eval
(``evaluate.rollout``) and the warm-ups (``serve.backend.warm_up``, ``DiffusionStage.setup``) all walk it
with :func:`run_chain`; the runners build one actor (or in-process host) per entry.

::

    decode -> features -> memory -> diffusion -> render

This module imports nothing of the stages, so that a stage may walk the chain too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StageSpec:
    """One stage of the chain as the pipeline declares it (its own resources are its class's ``resources``)."""

    name: str
    #: GPU share its actor reserves with ``--device cuda`` (Ray ``num_gpus``; 0 = a CPU stage)
    gpu_share: float = 0.0
    #: serving hands this stage windows of many sessions at once (``serve.batching.WindowBatcher``)
    batched: bool = False


#: the chain, declared once: generate, serve, eval and the warm-ups walk it with :func:`run_chain`
PIPELINE: tuple[StageSpec, ...] = (
    StageSpec("decode"),                      # media in -> PCM / RGB chunks (``next_chunk`` / ``push``)
    StageSpec("features"),                    # -> per-frame features
    StageSpec("memory"),                      # -> generation windows with their LCU memory tokens
    StageSpec("diffusion", gpu_share=0.5, batched=True),   # -> motion
    StageSpec("render", gpu_share=0.5),       # -> frames
)
STAGES = tuple(s.name for s in PIPELINE)
#: the stage serving batches across sessions; the chain is walked up to the one before it, then from it
BATCHED = next(s.name for s in PIPELINE if s.batched)


def stage_items(text: str | None, flag: str, form: str = "STAGE=N", example: str = "diffusion=2,render=2"):
    """``(stage, value)`` of each item of a comma-separated ``STAGE=VALUE`` option (``--replicas``,
    ``--autoscale``), in order. Raises :class:`~echo_stream.errors.InputError` naming ``flag`` and the problem
    for an item that is not ``form``, an unknown stage or a stage named twice."""
    from .errors import InputError

    seen: set = set()
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise InputError(flag, f"{item!r} is not {form}: give e.g. {flag} {example}")
        if name not in STAGES:
            raise InputError(flag, f"unknown stage {name!r}: the stages are {', '.join(STAGES)}")
        if name in seen:
            raise InputError(flag, f"stage {name!r} is named twice: give each stage once")
        seen.add(name)
        yield name, value


def parse_replicas(text: str | None, flag: str = "--replicas") -> dict[str, int]:
    """``"diffusion=2,render=2"`` -> ``{"diffusion": 2, "render": 2}`` (stages not named: 1 replica each).

    Raises :class:`~echo_stream.errors.InputError` naming ``flag`` and the problem for an unknown stage, a count
    that is not a whole number >= 1, a stage named twice or an item that is not ``STAGE=N``."""
    from .errors import InputError

    out: dict[str, int] = {}
    for name, count in stage_items(text, flag):
        try:
            n = int(count)
        except ValueError:
            raise InputError(flag, f"{name}={count}: the replica count must be a whole number >= 1") from None
        if n < 1:
            raise InputError(flag, f"{name}={n}: every stage needs at least 1 replica (default 1)")
        out[name] = n
    return out


def replica_counts(replicas: dict[str, int] | None) -> dict[str, int]:
    """Replicas of every stage of the chain (1 where ``replicas`` names none); checked as :func:`parse_replicas`."""
    text = ",".join(f"{k}={v}" for k, v in (replicas or {}).items())
    return {**{s: 1 for s in STAGES}, **parse_replicas(text, "replicas")}


def local_call(stages: dict) -> Callable:
    """:func:`run_chain`'s ``call`` over stage objects in this process (``{name: stage}``)."""
    return lambda name, method, *args: getattr(stages[name], method)(*args)


def stage_before(name: str) -> str:
    return STAGES[STAGES.index(name) - 1]


def stage_after(name: str) -> str:
    return STAGES[STAGES.index(name) + 1]


def run_chain(call: Callable, packet, first: str = "features", last: str = "render"):
    """``process`` through the declared stages from ``first`` to ``last`` (both included), in order:
    ``call(stage, "process", x)`` returns what the next stage takes (a value, an object ref, a handle)."""
    i, j = STAGES.index(first), STAGES.index(last)
    if i > j:
        raise ValueError(f"run_chain: {first!r} comes after {last!r} in the pipeline {STAGES}")
    for name in STAGES[i:j + 1]:
        packet = call(name, "process", packet)
    return packet
