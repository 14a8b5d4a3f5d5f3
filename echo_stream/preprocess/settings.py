"""What a preprocessing run's output depends on (:class:`Settings`), and the names of OUTPUT's files."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import config, shards
from ..errors import InputError

JOURNAL = "journal.jsonl"
OUTCOMES = "outcomes.jsonl"
SETTINGS_JSON = "preprocess.json"
CARD = "dataset_card.md"
LOCK = "preprocess.lock"
DEFAULT_SHARD_SIZE = config.SHARD_ROWS


@dataclass(frozen=True)
class Settings:
    """What a conversation's output depends on (recorded in ``preprocess.json``; a resumed run must match)."""

    chunk_seconds: float = config.SHARD_CHUNK_SECONDS
    require_motion: bool = True
    length_tolerance_s: float = config.PREPROCESS_LENGTH_TOLERANCE_S
    silence_dbfs: float = config.PREPROCESS_SILENCE_DBFS
    livelink_fps: float | None = None
    extractor: str | None = None
    extractor_model: str | None = None
    no_tracker: bool = False

    def check(self) -> None:
        if not self.chunk_seconds > 0:
            raise InputError("--chunk-seconds", f"must be > 0, got {self.chunk_seconds}")
        if not self.length_tolerance_s >= 0:
            raise InputError("--length-tolerance", f"must be >= 0, got {self.length_tolerance_s}")
        if self.extractor_model and not self.extractor:
            raise InputError("--extractor-model", "needs --extractor MODULE:CLASS (the tracker that reads it)")
        if self.no_tracker and self.extractor:
            raise InputError("--no-tracker", "contradicts --extractor: give one of them")

    @property
    def chunk_frames(self) -> int:
        return max(1, int(round(self.chunk_seconds * config.FPS)))

    def locked(self) -> dict:
        d = dataclasses.asdict(self)
        d["schema_version"] = shards.SCHEMA_VERSION
        return d
