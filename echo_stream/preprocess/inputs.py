"""INPUT: a manifest (``.jsonl`` / ``.csv``) or a directory of conversation folders -> one :class:`Item` per
conversation (its row, root and identity hash; a manifest-level problem recorded, not raised)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import InputError
from ..manifest import MANIFEST_NAMES, find_manifest, read_manifest_file  # noqa: F401 (MANIFEST_NAMES re-exported)

log = logging.getLogger(__name__)

MEDIA_EXTS = (".wav", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".flac", ".mp4", ".mkv", ".webm", ".mov", ".avi")
TRANSCRIPT_EXTS = (".json", ".srt", ".vtt", ".txt")
TRACK_EXTS = (".parquet", ".csv")
SPLIT_DIRS = ("train", "heldout", "val", "test")
PATH_FIELDS = ("avatar_media", "user_media", "transcript", "avatar_motion", "user_motion")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


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
        found = find_manifest(p)
        return (read_manifest_file(found) if found else scan_directory(p)), p
    if not p.is_file():
        raise InputError(str(p), "input not found (expected a manifest .jsonl/.csv or a directory)")
    return read_manifest_file(p), p.parent


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
