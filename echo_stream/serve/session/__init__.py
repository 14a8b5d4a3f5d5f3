"""One served session: ingest -> the shared stage pipeline -> egress, with epochs for interrupt and faults.

=============  ================================================================================
module         what it owns
=============  ================================================================================
``core``       :class:`Session`: the queues, the three tasks (feed, generate, egress), lifecycle
``epochs``     interrupt and fault recovery: switching to a new epoch (a mixin of ``Session``)
``ingest``     the pacing rule (lead over real time), chunking input into chains, latency origins
``edge``       decoding encoded client audio at the ingress
``ledger``     the replay ledger (input in flight, what to replay after a fault), the resume state,
               the handles in flight
``stages``     the session's route to stage replicas, its epoch's state id, opening / closing epochs
``output``     frames -> outbox messages exactly once, fMP4, the end of the session; ``SessionStats``
``failures``   ``SessionFailed`` and the one mapping of exceptions to what the client is told
=============  ================================================================================
"""
from .core import Session
from .failures import SessionFailed, failure_from, log_error
from .output import SessionStats, warm_up_encoder

__all__ = ["Session", "SessionFailed", "SessionStats", "failure_from", "log_error", "warm_up_encoder"]
