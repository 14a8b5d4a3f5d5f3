"""``echo-stream preprocess``: conversations -> training shards, on Ray Data, resumable and exactly-once.

The per-conversation work is :func:`process_input`, a plain function (decode with PyAV, features with
the *same* code as the serving pipeline: :func:`echo_stream.featurize.featurize_conversation`; motion
targets from a track or a face tracker; quality checks; chunk rows as an Arrow table). It runs

* on Ray Data (``executor="ray"``): a streaming ``from_items -> map_batches(actor pool)`` dataset; the
  pool's actors hold the models (librosa/numba warm-up, the face tracker's models, an optional
  user-supplied face tracker), so those load once per worker; the driver consumes the stream and
  commits shards; or
* in this process (``executor="local"``): the plain sequential loop (``echo-stream shards``, the
  benchmark's baseline).

Exactly-once
------------
The driver is the only writer of ``OUTPUT``. It buffers finished conversations per split; when a
split holds ``shard_size`` chunk rows or more it writes them as one or more shard files (at most
``shard_size`` rows each, a conversation never split across two commits), each atomically
(temporary name + rename), and then appends one line to ``journal.jsonl`` (fsynced) naming the files
and the conversations in them. That line is the commit: on start, shard files the journal does not
name (a crash between rename and journal line) and temporary files are deleted, and a torn last
journal line is cut. Conversations named by the journal are *done* and skipped; results that arrive
twice (a retried Ray task) are dropped by conversation id. So every input ends up exactly once: in
one commit, or quarantined with a reason, whatever was interrupted (Ctrl-C, killed worker, lost
node) and however often the command is re-run. ``dataset.json`` (what ``train`` reads),
``outcomes.jsonl`` and ``dataset_card.md`` are rewritten atomically at the end of each run from the
journal.

See ``docs/preprocess.md`` for the input formats, the output layout and the cluster steps.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import __version__, atomic, config, features, motion, shards
from .arguments.data import PREPROCESS_EPILOG as EPILOG  # noqa: F401 (re-exported)
from .arguments.data import add_preprocess_arguments as add_arguments  # noqa: F401 (the command's arguments)
from .errors import EchoStreamError, InputError
from .featurize import featurize_conversation

#: set by the CLI's SIGINT handler: a Ctrl-C that Ray turns into another error must still stop the run
_interrupted = threading.Event()

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
OUTCOMES = "outcomes.jsonl"
SETTINGS_JSON = "preprocess.json"
CARD = "dataset_card.md"
LOCK = "preprocess.lock"
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
MEDIA_EXTS = (".wav", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".flac", ".mp4", ".mkv", ".webm", ".mov", ".avi")
TRANSCRIPT_EXTS = (".json", ".srt", ".vtt", ".txt")
TRACK_EXTS = (".parquet", ".csv")
SPLIT_DIRS = ("train", "heldout", "val", "test")
PATH_FIELDS = ("avatar_media", "user_media", "transcript", "avatar_motion", "user_motion")
DEFAULT_SHARD_SIZE = config.SHARD_ROWS
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


# ============================================================================ settings

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


# ============================================================================ inputs

@dataclass
class Item:
    """One input: the manifest row (paths as given), its root, and the row's identity hash."""

    conversation_id: str
    row: dict
    root: str
    row_hash: str
    problem: str | None = None   # a manifest-level problem: quarantined without touching the files


def _row_hash(row: dict) -> str:
    return hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clean_row(raw: dict, where: str) -> dict:
    row = {}
    for k, v in raw.items():
        if k is None:
            raise InputError(where, "more fields than the header has")
        k = str(k).strip()
        if isinstance(v, str):
            v = v.strip()
            if v == "":
                v = None
        row[k] = v
    for k in ("duration_s", "avatar_motion_offset_s"):
        if row.get(k) is not None:
            try:
                row[k] = float(row[k])
            except (TypeError, ValueError):
                raise InputError(where, f"'{k}' must be a number, got {row[k]!r}") from None
    if isinstance(row.get("synthetic"), str):
        row["synthetic"] = row["synthetic"].lower() in ("1", "true", "yes")
    return row


def _read_manifest_file(p: Path) -> list[dict]:
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InputError(str(p), f"cannot read manifest: {e.strerror or e}") from None
    rows = []
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "conversation_id" not in [f.strip() for f in reader.fieldnames]:
            raise InputError(str(p), "CSV manifest needs a header with 'conversation_id' and 'avatar_media'")
        for i, r in enumerate(reader, 2):
            rows.append(_clean_row(r, f"{p}:{i}"))
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise InputError(f"{p}:{i}", f"not a JSON object: {e}") from None
            if not isinstance(r, dict):
                raise InputError(f"{p}:{i}", "not a JSON object")
            rows.append(_clean_row(r, f"{p}:{i}"))
    for i, r in enumerate(rows, 1):
        if not r.get("conversation_id") or not r.get("avatar_media"):
            raise InputError(f"{p}: row {i}", "manifest row needs 'conversation_id' and 'avatar_media'")
        r["conversation_id"] = str(r["conversation_id"])
    return rows


def _find(d: Path, stem: str, exts: Sequence[str]) -> str | None:
    hits = sorted(p for p in d.iterdir() if p.is_file() and p.stem == stem and p.suffix.lower() in exts)
    return hits[0].name if hits else None


def scan_directory(root: Path) -> list[dict]:
    """Rows of a directory laid out by the convention of ``docs/preprocess.md``:
    ``ROOT/[SPLIT/]ID/{avatar.*, user.*, transcript.*, avatar_motion.*, user_motion.*}``."""
    splits = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLIT_DIRS]
    groups = [(d.name, d) for d in splits] if splits else [("train", root)]
    rows = []
    for split, base in groups:
        for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            avatar = _find(d, "avatar", MEDIA_EXTS)
            if avatar is None:
                log.info("%s: no avatar.* media file, not a conversation directory", d)
                continue
            rel = d.relative_to(root).as_posix()
            row = {"conversation_id": d.name, "split": split, "avatar_media": f"{rel}/{avatar}"}
            for key, stem, exts in (("user_media", "user", MEDIA_EXTS), ("transcript", "transcript", TRANSCRIPT_EXTS),
                                    ("avatar_motion", "avatar_motion", TRACK_EXTS),
                                    ("user_motion", "user_motion", TRACK_EXTS)):
                name = _find(d, stem, exts)
                if name is not None:
                    row[key] = f"{rel}/{name}"
            rows.append(row)
    if not rows:
        raise InputError(str(root), "no manifest.jsonl / manifest.csv and no conversation directories "
                                    "(ID/avatar.wav ...) found; see docs/preprocess.md for the layout")
    return rows


def read_inputs(source: str | os.PathLike) -> tuple[list[dict], Path]:
    """``(rows, root)`` of INPUT: a manifest (``.jsonl``/``.csv``), a directory holding one, or a directory
    of conversation folders. Relative paths in rows start at ``root``."""
    p = Path(source)
    if p.is_dir():
        for name in MANIFEST_NAMES:
            if (p / name).is_file():
                return _read_manifest_file(p / name), p
        return scan_directory(p), p
    if not p.is_file():
        raise InputError(str(p), "input not found (expected a manifest .jsonl/.csv or a directory)")
    return _read_manifest_file(p), p.parent


def make_items(rows: Iterable[dict], root: str | os.PathLike) -> tuple[list[Item], list[tuple[int, str]]]:
    """``(items, duplicates)``: one item per conversation id (a bad split or a missing ``avatar_media``
    becomes that item's problem), and ``(row index, id)`` of rows repeating an earlier id (not processed)."""
    items, dups, seen = [], [], set()
    root = str(Path(root).resolve())
    for i, r in enumerate(rows):
        cid = str(r.get("conversation_id"))
        if cid in seen:
            dups.append((i, cid))
            continue
        seen.add(cid)
        problem = None
        split = str(r.get("split") or "train")
        if not _SPLIT_RE.match(split):
            problem = f"{cid}: split {split!r}: use letters, digits and '_' only"
        elif not r.get("avatar_media"):
            problem = f"{cid}: manifest row needs 'avatar_media'"
        items.append(Item(cid, dict(r), root, _row_hash(r), problem))
    return items, dups


DUPLICATE_REASON = "conversation_id appears twice in the manifest: only its first row is used"


# ============================================================================ one conversation

def _dbfs(x: float) -> float:
    return 20 * math.log10(max(x, 1e-12))


def check_quality(row: dict, feats: dict, settings: Settings) -> None:
    """Raise :class:`InputError` when a featurised conversation is unfit for training: silent avatar
    audio, no motion targets, or tracks whose lengths disagree (beyond ``length_tolerance_s``)."""
    cid = str(row.get("conversation_id"))
    m = feats["media"]
    tol = settings.length_tolerance_s
    dur = m["avatar_s"]
    if _dbfs(m["avatar_peak"]) < settings.silence_dbfs:
        raise InputError(row["avatar_media"], f"avatar audio is silent (peak {_dbfs(m['avatar_peak']):.0f} dBFS "
                                              f"< {settings.silence_dbfs:g} dBFS)")
    if settings.require_motion and not feats["has_motion"]:
        raise InputError(cid, "no motion targets: give 'avatar_motion' (motion .parquet or Live Link Face .csv)"
                              + (" or avatar video with a face for the tracker" if not settings.no_tracker else
                                 " or run without --no-tracker on avatar video"))
    declared = row.get("duration_s")
    if declared is not None and abs(float(declared) - dur) > tol:
        raise InputError(row["avatar_media"], f"wrong length: avatar audio is {dur:.2f} s, the manifest says "
                                              f"duration_s {float(declared):.2f} s (tolerance {tol:g} s)")
    for key, what, path_key in (("user_audio_s", "user audio", "user_media"),
                                ("user_video_s", "user video", "user_media"), ("motion_s", "motion track", None)):
        got = m.get(key)
        if got is None:
            continue
        too_long = key == "user_audio_s" or (key == "motion_s" and path_key is None and row.get("avatar_motion"))
        if got < dur - tol or (too_long and got > dur + tol):
            where = row.get(path_key) if path_key else (row.get("avatar_motion") or m.get("motion_source") or cid)
            raise InputError(str(where), f"wrong length: {what} covers {got:.2f} s, the avatar audio {dur:.2f} s "
                                         f"(tolerance {tol:g} s)")


def _moments(x: np.ndarray) -> list:
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1] if x.ndim > 1 else 1)
    return [int(x.shape[0]), x.sum(0).tolist(), (x * x).sum(0).tolist()]


def process_input(item: Item, settings: Settings, tracker=None) -> dict:
    """Featurise one conversation into its shard rows, or say why it is quarantined. Never raises for bad input.

    Returns ``{"conversation_id", "row_hash", "status": "done"|"quarantined", "reason", "split", "frames",
    "media_s", "chunks", "table": pyarrow.Table (done only), "moments": {"motion", "audio"}, "elapsed_s"}``.
    """
    t0 = time.perf_counter()
    row = item.row
    out = {"conversation_id": item.conversation_id, "row_hash": item.row_hash, "status": "quarantined",
           "reason": item.problem, "split": str(row.get("split") or "train"), "frames": 0, "media_s": 0.0,
           "chunks": 0, "table": None, "moments": None}
    if item.problem is None:
        try:
            feats = featurize_conversation(row, item.root, tracker=tracker, livelink_fps=settings.livelink_fps)
            check_quality(row, feats, settings)
            rows = shards.chunk_rows(row, feats, out["split"], settings.chunk_frames)
            out["table"] = shards.rows_to_table(rows)
            audio = [feats["avatar_audio"]] + ([feats["user_audio"]] if feats["has_user_audio"] else [])
            out["moments"] = {"motion": _moments(feats["motion"]),
                              "audio": _moments(np.concatenate([a.reshape(-1, a.shape[-1]) for a in audio]))}
            out.update(status="done", reason=None, frames=int(feats["frames"]), media_s=feats["media"]["avatar_s"],
                       chunks=len(rows))
        except InputError as e:
            out["reason"] = str(e)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # a decoder/library failure on a weird file must not stop the job
            log.warning("%s: unexpected %s", item.conversation_id, type(e).__name__, exc_info=True)
            out["reason"] = f"{item.conversation_id}: unexpected error {type(e).__name__}: {e}"
    out["elapsed_s"] = time.perf_counter() - t0
    return out


# ============================================================================ output directory

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
        for p in self.path.iterdir():
            if (self._shard_re().match(p.name) or p.name in (JOURNAL, OUTCOMES, SETTINGS_JSON, CARD, shards.DATASET_JSON)
                    or (p.name.startswith(".") and p.name.endswith(".tmp"))):
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
            if orphan or (p.name.startswith(".") and p.name.endswith(".tmp")):
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


# ============================================================================ executors

def one_thread_per_library() -> None:
    """Pin this process's feature libraries to one thread each: OpenCV's pool (the face tracker's crops) and
    FFmpeg's threads (decoding, RGB conversion); LiteRT runs the face models on one thread already. A featuriser actor does this (one featuriser per CPU: the
    libraries' own threads would only oversubscribe the cores; Ray already sets ``OMP_NUM_THREADS=1`` for
    BLAS), and so does the benchmark's single-threaded sequential baseline. Outputs do not depend on it."""
    import cv2

    from . import media

    cv2.setNumThreads(1)
    media.set_decode_threads(1)


class _Featurizer:
    """Ray Data actor: holds the models for its lifetime and featurises one conversation per call."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        one_thread_per_library()
        self.tracker = make_tracker(self.settings)
        features.warmup()

    def __call__(self, batch):
        import pyarrow as pa
        import ray

        node = ray.get_runtime_context().get_node_id()
        out = {"conversation_id": [], "result": [], "table": []}
        for blob in batch.column("item").to_pylist():
            t0 = time.time()
            r = process_input(Item(**json.loads(blob)), self.settings, self.tracker)
            r["node"] = node
            table = r.pop("table")
            out["table"].append(None if table is None else _ipc(table))
            r["busy"] = [f"{node}:{os.getpid()}", t0, time.time()]   # this worker's busy interval (run summary)
            out["conversation_id"].append(r["conversation_id"])
            out["result"].append(json.dumps(r))
        return pa.table({"conversation_id": pa.array(out["conversation_id"], pa.string()),
                         "result": pa.array(out["result"], pa.string()),
                         "table": pa.array(out["table"], pa.binary())})


def _featurizer_class(settings: dict) -> type:
    """:class:`_Featurizer` with ``settings`` baked in (no constructor arguments in the object store, so a
    restarted actor never depends on an object that a lost node held)."""

    class Featurizer(_Featurizer):
        def __init__(self):
            super().__init__(settings)

    return Featurizer


def _ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(blob: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(blob).read_all()


def make_tracker(settings: Settings):
    """The face tracker for avatar video without a motion track: ``--extractor``'s, else the bundled one
    (:class:`echo_stream.face.VideoMotionTracker`), or none with ``--no-tracker``."""
    from . import tracks

    if settings.extractor:
        return tracks.load_extractor(settings.extractor, settings.extractor_model)
    if settings.no_tracker:
        return None
    from .face import VideoMotionTracker

    return VideoMotionTracker()


def run_local(items: Sequence[Item], settings: Settings) -> Iterator[dict]:
    """The plain sequential loop: :func:`process_input` over ``items`` in this process."""
    tracker = make_tracker(settings)
    for it in items:
        yield process_input(it, settings, tracker)


#: conversations handed to a featuriser actor at a time: the one it works on and the next (see run_ray)
_IN_FLIGHT_PER_ACTOR = 2


@dataclass
class RayOptions:
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    workers: int | None = None          # actor pool size (default: the cluster's CPUs)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def _ensure_ray(opts: RayOptions) -> bool:
    """Connect to / start Ray; True when this call started it (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    kw = {"include_dashboard": False, "ignore_reinit_error": True, "log_to_driver": True,
          "logging_level": logging.WARNING}
    if opts.address:
        ray.init(address=opts.address, **kw)
    else:
        ray.init(num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, **kw)
    return True


def run_ray(items: Sequence[Item], settings: Settings, opts: RayOptions) -> Iterator[dict]:
    """:func:`process_input` over ``items`` on Ray Data (streaming; an autoscaling actor pool holds the models)."""
    import ray
    import ray.data

    if not items:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False          # ours shows files/s, media hours/h and ETA
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # the pool starts at its maximum size, so the autoscaler's "cannot scale up" notice is noise
    logging.getLogger("ray.data._internal.actor_autoscaler").setLevel(logging.ERROR)
    ctx.execution_options.preserve_order = False
    cpus = ray.cluster_resources().get("CPU", 1)
    n = opts.workers or max(1, int(cpus // max(opts.cpus_per_worker, 1e-6)))
    n = max(1, min(n, len(items)))
    blobs = [{"item": json.dumps(dataclasses.asdict(it))} for it in items]
    ds = ray.data.from_items(blobs, override_num_blocks=len(blobs))
    # the pool starts at n actors and may shrink to 1 (a lost node); actors restart and their tasks are
    # retried by Ray Data's defaults. Two conversations in flight per actor: the one it works on and the next,
    # already queued at the actor, so it starts at once (with one, each actor waited about 0.16 s per
    # conversation for the executor to hand it the next: 4 % of a 1-minute conversation). More would only
    # make the tail uneven (a queued conversation cannot move to an actor that has run out of work).
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=n, initial_size=n,
                                      max_tasks_in_flight_per_actor=_IN_FLIGHT_PER_ACTOR)
    ds = ds.map_batches(_featurizer_class(dataclasses.asdict(settings)), batch_size=1, batch_format="pyarrow", compute=pool,
                        num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker or None)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        for cid, res, blob in zip(*(batch.column(c).to_pylist() for c in ("conversation_id", "result", "table"))):
            r = json.loads(res)
            r["table"] = None if blob is None else _from_ipc(blob)
            yield r


# ============================================================================ the job

class _Progress:
    """tqdm bar over the pending inputs: files/s, ETA, media hours per wall-clock hour, quarantined count."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.t0 = time.perf_counter()
        self.media_s = 0.0
        self.quarantined = 0
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="preprocess", unit="conv", dynamic_ncols=True)

    def update(self, r: dict) -> None:
        self.media_s += r.get("media_s") or 0.0
        self.quarantined += r["status"] == "quarantined"
        if self.bar is not None:
            wall = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.media_s / wall:.1f} media-h/h, quarantined {self.quarantined}",
                                     refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess(inputs: str | os.PathLike | Sequence[dict], output: str | os.PathLike, *,
               root: str | os.PathLike | None = None, settings: Settings | None = None,
               shard_size: int = DEFAULT_SHARD_SIZE, executor: str = "ray", ray_options: RayOptions | None = None,
               progress: bool = True, fresh: bool = False, retry_quarantined: bool = False,
               on_error: str = "quarantine", max_passes: int = 3, limit: int | None = None) -> dict:
    """Preprocess ``inputs`` into OUTPUT; returns the run summary (``dataset.json`` content + ``run``).

    ``inputs``: manifest path / directory (see :func:`read_inputs`) or rows (then ``root`` is needed).
    ``on_error="raise"`` stops at the first bad conversation instead of quarantining it (nothing of
    it is written). ``limit`` processes at most that many pending inputs (then stops, resumable; for
    tests and trials). ``max_passes``: when workers die and a Ray pass fails, the inputs not yet
    accounted for are run again, up to this many passes.
    """
    settings = settings or Settings()
    settings.check()
    if shard_size < 1:
        raise InputError("--shard-size", f"must be >= 1, got {shard_size}")
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    if on_error not in ("quarantine", "raise"):
        raise ValueError(f"on_error must be 'quarantine' or 'raise', got {on_error!r}")
    t_start = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        rows, mroot = read_inputs(inputs)
        root = root if root is not None else mroot
        source = str(inputs)
    else:
        rows = list(inputs)
        if root is None:
            raise ValueError("root: needed when the inputs are given as rows")
        source = "<rows>"
    items, dups = make_items(rows, root)
    if dups and on_error == "raise":
        raise InputError(dups[0][1], DUPLICATE_REASON)
    for _, cid in dups:
        log.warning("%s: %s", cid, DUPLICATE_REASON)
    out = OutputDir(output)
    outcome: dict[str, dict] = {}
    try:
        out.open(settings, fresh=fresh)
        pending = []
        for it in items:
            d = out.done.get(it.conversation_id)
            q = out.quarantined.get(it.conversation_id)
            if d is not None:
                if d.get("row_hash") != it.row_hash:
                    raise InputError(it.conversation_id, f"its manifest row changed since it was preprocessed into "
                                                         f"{output}: use another OUTPUT or --fresh")
                outcome[it.conversation_id] = {"status": "skipped", "reason": "already done", "split": d["split"],
                                               "shards": d.get("files") or _files_of(out, it.conversation_id)}
            elif q is not None and not retry_quarantined and q.get("row_hash") == it.row_hash:
                outcome[it.conversation_id] = {"status": "quarantined", "reason": q["reason"], "earlier_run": True}
            else:
                if q is not None:
                    out.forget_quarantine(it.conversation_id)
                pending.append(it)
        if limit is not None:
            pending = pending[:max(0, int(limit))]
        bar = _Progress(len(pending), progress)
        stats = {"passes": 0, "pass_errors": [], "media_s": 0.0, "done": 0, "quarantined": 0, "duplicates": 0,
                 "nodes": {}, "featurise_s": 0.0, "first_result_s": None, "busy": []}
        buffers: dict[str, list[dict]] = {}
        started_ray = False
        t_proc = None
        try:
            todo = list(pending)
            while todo and stats["passes"] < max_passes:
                stats["passes"] += 1
                try:
                    if executor == "ray":
                        started_ray = _ensure_ray(ray_options or RayOptions()) or started_ray
                        t_proc = t_proc or time.perf_counter()
                        stream = run_ray(todo, settings, ray_options or RayOptions())
                    else:
                        t_proc = t_proc or time.perf_counter()
                        stream = run_local(todo, settings)
                    for r in stream:
                        if _interrupted.is_set():  # Ctrl-C that Ray's threads swallowed: stop before committing more
                            raise KeyboardInterrupt
                        cid = r["conversation_id"]
                        if stats["first_result_s"] is None:
                            stats["first_result_s"] = time.perf_counter() - t_proc
                        stats["featurise_s"] += r.get("elapsed_s") or 0.0
                        if r.get("busy"):
                            stats["busy"].append(r["busy"])
                        if cid in outcome:        # a result delivered twice (retried task): drop it
                            stats["duplicates"] += 1
                            continue
                        if r["status"] == "done":
                            buf = buffers.setdefault(r["split"], [])
                            buf.append(r)
                            outcome[cid] = {"status": "done", "split": r["split"], "media_s": r["media_s"]}
                            stats["done"] += 1
                            stats["media_s"] += r["media_s"]
                            if sum(x["chunks"] for x in buf) >= shard_size:
                                _flush(out, outcome, r["split"], buf, shard_size)
                        else:
                            if on_error == "raise":
                                what, _, problem = r["reason"].partition(": ")
                                raise InputError(what, problem or r["reason"])
                            out.quarantine(cid, r["reason"], r["row_hash"])
                            outcome[cid] = {"status": "quarantined", "reason": r["reason"]}
                            stats["quarantined"] += 1
                        if r.get("node"):
                            stats["nodes"][r["node"]] = stats["nodes"].get(r["node"], 0) + 1
                        bar.update(r)
                except (EchoStreamError, KeyboardInterrupt):
                    raise
                except Exception as e:  # a failed Ray pass (lost node, dead actors): keep what is done, go again
                    if executor != "ray":
                        raise
                    if _interrupted.is_set():  # Ctrl-C surfaced as Ray's own error: stop, do not retry
                        raise KeyboardInterrupt from e
                    log.warning("preprocess pass %d failed (%s: %s); resuming the %d inputs not yet accounted for",
                                stats["passes"], type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                                len([i for i in todo if i.conversation_id not in outcome]))
                    stats["pass_errors"].append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                todo = [i for i in todo if i.conversation_id not in outcome]
            for split, buf in buffers.items():
                if buf:
                    _flush(out, outcome, split, buf, shard_size)
            for it in todo:
                reason = (f"{it.conversation_id}: not processed after {stats['passes']} passes "
                          f"(worker failures: {'; '.join(stats['pass_errors'][-1:])})")
                out.quarantine(it.conversation_id, reason, it.row_hash)
                outcome[it.conversation_id] = {"status": "quarantined", "reason": reason}
                stats["quarantined"] += 1
        finally:
            bar.close()
            if started_ray:
                import ray
                ray.shutdown()
        not_run = [it for it in items if it.conversation_id not in outcome]  # beyond --limit
        seconds = time.perf_counter() - t_start
        _write_outcomes(out, items, dups, outcome)
        if not out.commits and not not_run:
            raise InputError(source, "no usable conversations: nothing to write"
                                     + (f" ({len(out.quarantined)} quarantined, see {Path(output) / OUTCOMES})"
                                        if out.quarantined else ""))
        info = out.dataset_info(settings, shard_size, source, seconds)
        if not not_run:
            atomic.write_text(out.path / shards.DATASET_JSON, json.dumps(info, indent=1) + "\n")
            atomic.write_text(out.path / CARD, dataset_card(info))
        info["run"] = {
            "inputs": len(items), "done": stats["done"], "quarantined_now": stats["quarantined"],
            "skipped": sum(1 for o in outcome.values() if o["status"] == "skipped"),
            "quarantined_before": sum(1 for o in outcome.values() if o.get("earlier_run")),
            "not_run": len(not_run), "complete": not not_run, "duplicate_rows": len(dups),
            "media_s": stats["media_s"], "wall_s": seconds,
            "processing_s": time.perf_counter() - (t_proc or t_start), "passes": stats["passes"],
            "pass_errors": stats["pass_errors"], "duplicates_dropped": stats["duplicates"],
            "executor": executor, "results_per_node": stats["nodes"],
            "featurise_s": stats["featurise_s"], "first_result_s": stats["first_result_s"],
            "workers": worker_utilisation(stats["busy"]),
        }
        return info
    finally:
        out.close()


def worker_utilisation(busy: Sequence[Sequence]) -> dict | None:
    """How busy the featuriser workers were, from their ``(worker, start, end)`` intervals (Ray runs only):
    ``utilisation`` = busy time / (workers x the span from the first start to the last end), and the mean
    idle gap between one conversation and the next on the same worker."""
    if not busy:
        return None
    per: dict[str, list[tuple[float, float]]] = {}
    for w, a, b in busy:
        per.setdefault(w, []).append((a, b))
    span = max(b for _, _, b in busy) - min(a for _, a, _ in busy)
    gaps = [max(0.0, iv[k + 1][0] - iv[k][1]) for iv in map(sorted, per.values()) for k in range(len(iv) - 1)]
    total = sum(b - a for _, a, b in busy)
    return {"workers": len(per), "span_s": round(span, 2), "busy_s": round(total, 2),
            "utilisation": round(total / max(len(per) * span, 1e-9), 3),
            "mean_gap_s": round(sum(gaps) / len(gaps), 3) if gaps else None}


def _flush(out: OutputDir, outcome: dict, split: str, buf: list[dict], shard_size: int) -> None:
    files = out.commit(split, buf, shard_size)
    for r in buf:
        outcome[r["conversation_id"]]["shards"] = files
    buf.clear()


def _files_of(out: OutputDir, cid: str) -> list[str]:
    for e in out.commits:
        if any(c["conversation_id"] == cid for c in e["conversations"]):
            return [f["file"] for f in e["files"]]
    return []


def _write_outcomes(out: OutputDir, items: Sequence[Item], dups: Sequence[tuple[int, str]], outcome: dict) -> None:
    lines = []
    order = list(items)
    for i, cid in dups:  # back in manifest order
        order.insert(i, cid)
    for it in order:
        if isinstance(it, str):
            lines.append(json.dumps({"conversation_id": it, "status": "quarantined", "reason": DUPLICATE_REASON,
                                     "duplicate_row": True}))
            continue
        o = outcome.get(it.conversation_id, {"status": "not_run", "reason": "beyond --limit; re-run to process"})
        rec = {"conversation_id": it.conversation_id, "status": o["status"]}
        if o.get("reason") and o["status"] != "done":
            rec["reason"] = o["reason"]
        if o.get("shards"):
            rec["shards"] = o["shards"]
        if o.get("earlier_run"):
            rec["earlier_run"] = True
        lines.append(json.dumps(rec))
    atomic.write_text(out.path / OUTCOMES, "\n".join(lines) + "\n")


def dataset_card(info: dict) -> str:
    """A human-readable dataset card: counts, hours, feature statistics, quarantine list."""
    t = info["total"]
    lines = [
        "# Dataset card (echo-stream training shards)", "",
        f"Written by echo-stream {info['code_version']} `preprocess` from `{info['source']}`; shard format "
        f"`{info['format']}` schema version {info['schema_version']} (see docs/preprocess.md).", "",
        "## Counts", "",
        "| split | conversations | chunks (rows) | frames (25 fps) | hours |", "|---|---:|---:|---:|---:|",
    ]
    for split, c in sorted(info["splits"].items()):
        lines.append(f"| {split} | {c['conversations']} | {c['chunks']} | {c['frames']} | {c['hours']:.3f} |")
    lines += [f"| **total** | {t['conversations']} | {t['chunks']} | {t['frames']} | {t['hours']:.3f} |", "",
              f"{len(info['shards'])} shard files; {len(info['quarantined'])} inputs quarantined.", "",
              f"## Feature statistics (split `{info['stats']['split']}`, {info['stats']['frames']} frames)", "",
              "Motion targets, the 10 channels with the largest standard deviation:", "",
              "| channel | mean | std |", "|---|---:|---:|"]
    st = info["stats"]
    order = np.argsort(st["motion_std"])[::-1][:10]
    for i in order:
        lines.append(f"| {motion.CHANNELS[i]} | {st['motion_mean'][i]:.4f} | {st['motion_std'][i]:.4f} |")
    lines += ["", "Audio features (avatar and user audio), summary over the 83 features:", "",
              "| | min | median | max |", "|---|---:|---:|---:|"]
    for key in ("audio_mean", "audio_std"):
        a = np.asarray(st[key])
        lines.append(f"| {key.split('_')[1]} | {a.min():.3f} | {np.median(a):.3f} | {a.max():.3f} |")
    if info["quarantined"]:
        lines += ["", "## Quarantined inputs", "", "| conversation | reason |", "|---|---|"]
        for q in info["quarantined"]:
            lines.append(f"| {q['conversation_id']} | {q['reason'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def summary_table(info: dict) -> str:
    """The final summary printed after a run."""
    r = info["run"]
    wall = max(r["wall_s"], 1e-9)
    rows = [
        ("inputs", f"{r['inputs']}"),
        ("done this run", f"{r['done']}  ({r['media_s'] / 3600:.3f} h of media)"),
        ("skipped (done before)", f"{r['skipped']}"),
        ("quarantined", f"{r['quarantined_now']} this run, {r['quarantined_before']} from earlier runs"),
    ]
    if r["duplicate_rows"]:
        rows.append(("duplicate rows", f"{r['duplicate_rows']} (a conversation_id repeated; ignored)"))
    if r["not_run"]:
        rows.append(("not run (--limit)", f"{r['not_run']}: re-run the same command to continue"))
    rows += [
        ("wall time", f"{r['wall_s']:.1f} s  ({r['executor']}, {r['passes']} pass(es))"),
        ("throughput", f"{r['media_s'] / wall:.1f} media-h/h, {r['done'] / wall:.3f} files/s"),
        ("dataset", f"{info['total']['conversations']} conversations, {info['total']['hours']:.3f} h, "
                    f"{len(info['shards'])} shards"),
    ]
    if r["pass_errors"]:
        rows.append(("recovered from", "; ".join(r["pass_errors"])[:200]))
    w = max(len(k) for k, _ in rows)
    out = ["", "preprocess summary", "-" * (w + 40)] + [f"{k:<{w}}  {v}" for k, v in rows]
    if info["quarantined"]:
        out += ["", "quarantined (reason):"] + [f"  {q['conversation_id']}: {q['reason']}"
                                                for q in info["quarantined"][:20]]
        if len(info["quarantined"]) > 20:
            out.append(f"  ... and {len(info['quarantined']) - 20} more in outcomes.jsonl")
    return "\n".join(out)


# ============================================================================ CLI

def settings_from_args(args) -> Settings:
    return Settings(chunk_seconds=args.chunk_seconds, require_motion=not args.allow_no_motion,
                    length_tolerance_s=args.length_tolerance, silence_dbfs=args.silence_dbfs,
                    livelink_fps=args.livelink_fps, extractor=args.extractor, no_tracker=args.no_tracker,
                    extractor_model=None if args.extractor_model is None else str(Path(args.extractor_model).resolve()))


def run(args) -> int:
    """``echo-stream preprocess``."""
    opts = RayOptions(address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker)

    def on_sigint(signum, frame):
        _interrupted.set()
        signal.default_int_handler(signum, frame)

    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        info = preprocess(args.input, args.output, settings=settings_from_args(args), shard_size=args.shard_size,
                          executor="local" if args.sequential else "ray", ray_options=opts,
                          progress=not args.quiet, fresh=args.fresh, retry_quarantined=args.retry_quarantined,
                          limit=args.limit)
    except KeyboardInterrupt:
        print(f"echo-stream preprocess: interrupted; committed shards are kept in {args.output}. "
              "Run the same command again to resume (every input is processed exactly once).", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    if not args.quiet:
        print(summary_table(info), file=sys.stderr)
    if args.json:
        print(json.dumps({k: info[k] for k in ("run", "total", "splits", "quarantined")}, indent=1))
    return 0
