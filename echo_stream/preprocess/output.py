"""OUTPUT and its commit protocol: shard files written atomically, then named by a journal line (see the
package docstring); recovery of an interrupted run; ``dataset.json``'s content from the journal."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from .. import __version__, atomic, config, features, motion, shards
from ..errors import InputError
from .settings import CARD, JOURNAL, LOCK, OUTCOMES, SETTINGS_JSON, Settings

log = logging.getLogger(__name__)


class OutputDir:
    """The commit protocol of OUTPUT (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.commits: list[dict] = []
        self.done: dict[str, dict] = {}          # conversation id -> its journal entry (+ shard files)
        self.quarantined: dict[str, dict] = {}   # conversation id -> {"reason", "row_hash"}
        self.next_index: dict[str, int] = {}
        self._journal = None
        self._lock = None

    # ------------------------------------------------------------------ opening / recovery
    def open(self, settings: Settings, fresh: bool = False) -> "OutputDir":
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK, "a")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise InputError(str(self.path), "another preprocess run is writing to this OUTPUT (one writer at a "
                                             "time); wait for it or use another directory") from None
        if fresh:
            self._clear()
        sp = self.path / SETTINGS_JSON
        want = settings.locked()
        if sp.is_file():
            try:
                have = json.loads(sp.read_text())
            except ValueError:
                have = None
            if have != want:
                diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
                raise InputError(str(self.path), f"was preprocessed with other settings ({', '.join(diff)}): use "
                                                 "the same options, another OUTPUT, or --fresh to start over")
        else:
            if any(self._shard_re().match(p.name) for p in self.path.iterdir()) or (self.path / JOURNAL).exists():
                raise InputError(str(self.path), "holds shards without preprocess.json (written by an older "
                                                 "version?): use another OUTPUT or --fresh")
            atomic.write_text(sp, json.dumps(want, indent=1) + "\n")
        self._recover()
        self._journal = open(self.path / JOURNAL, "a", encoding="utf-8")
        return self

    @staticmethod
    def _shard_re():
        return shards.SHARD_RE

    def _clear(self) -> None:
        ours = (JOURNAL, OUTCOMES, SETTINGS_JSON, CARD, shards.DATASET_JSON)
        for p in self.path.iterdir():
            if self._shard_re().match(p.name) or p.name in ours or atomic.is_temp_name(p.name):
                p.unlink()

    def _recover(self) -> None:
        jp = self.path / JOURNAL
        entries = []
        if jp.is_file():
            data = jp.read_bytes()
            good = 0
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    break
                good += len(line)
            if good < len(data):
                log.warning("%s: cutting a torn last journal line (%d bytes) left by an interrupted run", jp,
                            len(data) - good)
                with open(jp, "r+b") as f:
                    f.truncate(good)
        for e in entries:
            if e.get("type") == "commit":
                self.commits.append(e)
                for c in e["conversations"]:
                    self.done[c["conversation_id"]] = dict(c, split=e["split"])
                    self.quarantined.pop(c["conversation_id"], None)
                for f in e["files"]:
                    m = self._shard_re().match(f["file"])
                    self.next_index[e["split"]] = max(self.next_index.get(e["split"], 0), int(m["index"]) + 1)
            elif e.get("type") == "quarantined" and e["conversation_id"] not in self.done:
                self.quarantined[e["conversation_id"]] = {"reason": e["reason"], "row_hash": e.get("row_hash")}
            elif e.get("type") == "retry":
                self.quarantined.pop(e["conversation_id"], None)
        listed = {f["file"] for e in self.commits for f in e["files"]}
        for p in list(self.path.iterdir()):
            orphan = self._shard_re().match(p.name) and p.name not in listed
            if orphan or atomic.is_temp_name(p.name):
                log.warning("removing %s (%s of an interrupted run)", p.name, "uncommitted shard" if orphan else
                            "temporary file")
                p.unlink()
        missing = [f for f in listed if not (self.path / f).is_file()]
        if missing:
            raise InputError(str(self.path), f"committed shard files are missing ({', '.join(sorted(missing)[:3])}"
                                             "...): the output was modified; use --fresh to start over")

    # ------------------------------------------------------------------ writing
    def _append(self, entry: dict) -> None:
        self._journal.write(json.dumps(entry) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def commit(self, split: str, results: list[dict], shard_size: int) -> list[str]:
        """Write ``results`` (done conversations of one split) as shard file(s), then journal them."""
        import pyarrow as pa

        rows = sum(r["chunks"] for r in results)
        n_files = max(1, math.ceil(rows / shard_size))
        table = pa.concat_tables([r["table"] for r in results])
        bounds = np.linspace(0, rows, n_files + 1).round().astype(int)
        files = []
        for k in range(n_files):
            idx = self.next_index.get(split, 0)
            name = f"{split}-{idx:05d}.parquet"
            part = table.slice(int(bounds[k]), int(bounds[k + 1] - bounds[k]))
            atomic.write_parquet(part, self.path / name)
            frames = int(pa.compute.sum(part.column("frames")).as_py() or 0)
            files.append({"file": name, "rows": part.num_rows, "frames": frames})
            self.next_index[split] = idx + 1
        mom = {}
        for key in ("motion", "audio"):
            ms = [r["moments"][key] for r in results]
            mom[key] = [sum(m[0] for m in ms), np.sum([m[1] for m in ms], 0).tolist(),
                        np.sum([m[2] for m in ms], 0).tolist()]
        convs = [{"conversation_id": r["conversation_id"], "row_hash": r["row_hash"], "frames": r["frames"],
                  "media_s": round(r["media_s"], 4), "chunks": r["chunks"]} for r in results]
        entry = {"type": "commit", "split": split, "files": files, "conversations": convs, "moments": mom,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._append(entry)
        self.commits.append(entry)
        for c in convs:
            self.done[c["conversation_id"]] = dict(c, split=split, files=[f["file"] for f in files])
            self.quarantined.pop(c["conversation_id"], None)
        return [f["file"] for f in files]

    def quarantine(self, cid: str, reason: str, row_hash: str | None) -> None:
        self._append({"type": "quarantined", "conversation_id": cid, "reason": reason, "row_hash": row_hash,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.quarantined[cid] = {"reason": reason, "row_hash": row_hash}

    def forget_quarantine(self, cid: str) -> None:
        self._append({"type": "retry", "conversation_id": cid})
        self.quarantined.pop(cid, None)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock is not None:  # (the file stays: unlinking it would race with a waiting writer)
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ final files
    def dataset_info(self, settings: Settings, shard_size: int, source: str, seconds: float) -> dict:
        counts: dict[str, dict] = {}
        for e in self.commits:
            c = counts.setdefault(e["split"], {"conversations": 0, "chunks": 0, "frames": 0})
            c["conversations"] += len(e["conversations"])
            c["chunks"] += sum(f["rows"] for f in e["files"])
            c["frames"] += sum(f["frames"] for f in e["files"])
        for c in counts.values():
            c["hours"] = c["frames"] / config.FPS / 3600.0
        which = "train" if any(e["split"] == "train" for e in self.commits) else "all"
        stats = {}
        for key, dim in (("motion", motion.NUM_CHANNELS), ("audio", config.AUDIO_FEAT_DIM)):
            m = shards.Moments(dim)
            for e in self.commits:
                if which == "all" or e["split"] == "train":
                    n, s, ss = e["moments"][key]
                    m.n += n
                    m.s += np.asarray(s)
                    m.ss += np.asarray(ss)
            stats[key] = m
        mm, msd = stats["motion"].result()
        am, asd = stats["audio"].result()
        return {
            "format": shards.FORMAT, "schema_version": shards.SCHEMA_VERSION, "code_version": __version__, "source": source,
            "fps": config.FPS, "chunk_seconds": float(settings.chunk_seconds), "chunk_frames": settings.chunk_frames,
            "shard_rows": int(shard_size),
            "frame_columns": {k: list(v) for k, v in shards.FRAME_COLUMNS.items()},
            "motion_channels": list(motion.CHANNELS), "audio_features": list(features.AUDIO_FEATURE_COLUMNS),
            "user_face": "user_blend: the user's face as 58-channel motion (echo_stream.face tracker, streaming)",
            "shards": [dict(f, split=e["split"]) for e in self.commits for f in e["files"]],
            "splits": counts,
            "total": {k: sum(c[k] for c in counts.values()) for k in ("conversations", "chunks", "frames", "hours")},
            "stats": {"split": which, "frames": stats["motion"].n, "motion_mean": mm, "motion_std": msd,
                      "audio_mean": am, "audio_std": asd},
            "quarantined": [{"conversation_id": k, "reason": v["reason"]} for k, v in sorted(self.quarantined.items())],
            "settings": dataclasses.asdict(settings),
            "seconds": round(seconds, 3),
        }
