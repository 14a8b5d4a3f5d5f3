"""The five pipeline stages as plain classes (no Ray here).

Each stage has ``setup()`` (load models, warm up; called once per process),
``process(packet)`` (one session's batch in, one out), per-session state that
``reset_session`` clears (interrupt) and ``close_session`` drops, and a
``resources`` declaration the runner uses when it makes the stage an actor.
Stages exchange :class:`Packet` objects: a session id, named Arrow record
batches (each validated against its contract in :mod:`echo_stream.schemas`),
an end-of-stream flag and small metadata.

=========================  =====================================
stage                      file
=========================  =====================================
decode (PyAV)              ``echo_stream/stages/decode.py``
features (librosa, video)  ``echo_stream/stages/features.py``
context memory (LCU)       ``echo_stream/stages/memory.py``
motion diffusion (SDCM)    ``echo_stream/stages/diffusion.py``
render (warping)           ``echo_stream/stages/render.py``
=========================  =====================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .. import schemas


@dataclass
class Packet:
    """One session's unit of work between two stages."""

    session_id: str
    batches: dict[str, pa.RecordBatch] = field(default_factory=dict)
    end: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, contract: schemas.Contract) -> pa.RecordBatch | None:
        return self.batches.get(contract.name)

    def put(self, batch: pa.RecordBatch, contract: schemas.Contract) -> None:
        self.batches[contract.name] = schemas.validate(batch, contract)

    def rows(self, contract: schemas.Contract) -> int:
        b = self.batches.get(contract.name)
        return 0 if b is None else b.num_rows


class Stage:
    """Base class of a pipeline stage: ``setup()`` once, ``process(packet)`` per batch."""

    name = "stage"
    #: resources the runner reserves for the stage's actor (Ray ``num_cpus`` / ``num_gpus``)
    resources: dict[str, float] = {"num_cpus": 0.5}
    #: contracts this stage accepts on input; checked by ``check_input``
    input_contracts: tuple[schemas.Contract, ...] = ()

    def __init__(self) -> None:
        self._ready = False

    def setup(self) -> None:
        self._ready = True

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()

    def check_input(self, packet: Packet) -> Packet:
        if not isinstance(packet, Packet):
            raise TypeError(f"{self.name}: expected a Packet, got {type(packet).__name__}")
        allowed = {c.name: c for c in self.input_contracts}
        for name, batch in packet.batches.items():
            if name not in allowed:
                raise schemas.SchemaError(name, "<batch>", f"not accepted by the {self.name} stage")
            schemas.validate(batch, allowed[name])
        return packet

    def reset_session(self, session_id: str) -> None:
        """Drop buffered work of one session (interrupt); state that must survive stays."""

    def close_session(self, session_id: str) -> None:
        """Forget a session entirely."""

    def ping(self) -> str:
        return self.name

    def sessions(self) -> int:
        """How many sessions' state this stage holds (one per open session epoch): a replica's load, which
        autoscaling looks at."""
        return len(getattr(self, "_sessions", ()))

    def session_ids(self) -> list[str]:
        """The ids of the sessions whose state this stage holds (what its host may close when they sit idle:
        :meth:`~echo_stream.stages.host.StageHost.sweep`)."""
        return list(getattr(self, "_sessions", ()))
