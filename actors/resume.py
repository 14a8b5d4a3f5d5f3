"""The cluster's resume records as detached, named Ray actors (the logic: :class:`~echo_stream.serve.resume.ResumeRecords`).

Every ingress of a cluster (``echo-stream serve`` processes, the Serve application's ingress replicas) reaches
the same actors by name (a few shards, ``--resume-shards``; ``bench resume`` measures them), so a session whose stream broke can be resumed through any of them. It is *detached*
(it outlives the ingress that started it) and placed on the head node, whose loss ends the cluster anyway; it
restarts if its process dies (``max_restarts=-1``), empty: running sessions go on, only the resumes of
streams broken before the restart are refused (NOT_FOUND) until the sessions' next updates.
"""
from __future__ import annotations

import ray

from echo_stream.serve.resume import STORE_NAME, STORE_NAMESPACE, ResumeRecords, ResumeRefused, Update


class ResumeStore:
    """:class:`ResumeRecords` behind Ray calls; a refusal comes back as a value (``{"refused": code, "message":
    ...}``), not as an exception, so that the ingress reads it without unpickling an error."""

    def __init__(self, ttl_s: float = 120.0, max_records: int = 100_000):
        self.records = ResumeRecords(ttl_s=ttl_s, max_records=max_records)

    def create(self, session_id: str, principal: str, digest: str, node: str = ""):
        try:
            return {"generation": self.records.create(session_id, principal, digest, node)}
        except ResumeRefused as e:
            return {"refused": e.code, "message": e.message}

    def update(self, session_id: str, generation: int, u: Update) -> bool:
        return self.records.update(session_id, generation, u)

    def touch(self, owned: list) -> list:
        return self.records.touch(owned)

    def claim(self, session_id: str, principal: str, digest: str, node: str = ""):
        try:
            generation, record = self.records.claim(session_id, principal, digest, node)
        except ResumeRefused as e:
            return {"refused": e.code, "message": e.message}
        return {"generation": generation, "record": record}

    def drop(self, session_id: str, generation: int) -> None:
        self.records.drop(session_id, generation)

    def count(self) -> int:
        return len(self.records)


def resume_store(ttl_s: float = 120.0, max_records: int = 100_000, shards: int = 4) -> list:
    """The cluster's store: ``shards`` actors (a session's record lives on shard ``crc32(id) % shards``), started
    by the first ingress that asks; the others get the same actors (every ingress must use the same count)."""
    per = max(1, -(-max_records // shards))
    return [ray.remote(ResumeStore).options(
        name=f"{STORE_NAME}_{i}", namespace=STORE_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_task_retries=0, resources={"node:__internal_head__": 0.001}).remote(ttl_s, per)
        for i in range(shards)]
