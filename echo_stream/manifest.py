"""Conversation manifests: one row per conversation (``manifest.jsonl`` or ``manifest.csv``; the fields are
documented in ``docs/preprocess.md``). The one reader of them: ``preprocess``, ``shards``, the corpus
tools and ``eval`` all read manifests here."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .errors import InputError

#: the manifest file names a corpus directory may hold, in the order they are looked for
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")


def find_manifest(directory: str | os.PathLike) -> Path | None:
    """The manifest file in ``directory`` (:data:`MANIFEST_NAMES` in order), or None."""
    for name in MANIFEST_NAMES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def read_manifest(source: str | os.PathLike) -> list[dict]:
    """The rows of a manifest file, or of the manifest a corpus directory holds (:func:`read_manifest_file`)."""
    p = Path(source)
    if p.is_dir():
        found = find_manifest(p)
        if found is None:
            raise InputError(str(p), f"no {' or '.join(MANIFEST_NAMES)} in this directory")
        p = found
    return read_manifest_file(p)


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


def read_manifest_file(path: str | os.PathLike) -> list[dict]:
    """The rows of a manifest file: JSON lines, or CSV with a header (``.csv``). Strings are stripped and
    empty ones become None, ``duration_s`` / ``avatar_motion_offset_s`` numbers, ``synthetic`` a bool;
    every row needs ``conversation_id`` (made a string) and ``avatar_media``. Problems raise
    :class:`~echo_stream.errors.InputError` naming the file and line."""
    p = Path(path)
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
            except RecursionError:               # a hostile line of thousands of nested brackets
                raise InputError(f"{p}:{i}", "not a JSON object of one level: nested too deeply") from None
            if not isinstance(r, dict):
                raise InputError(f"{p}:{i}", "not a JSON object")
            rows.append(_clean_row(r, f"{p}:{i}"))
    for i, r in enumerate(rows, 1):
        if not r.get("conversation_id") or not r.get("avatar_media"):
            raise InputError(f"{p}: row {i}", "manifest row needs 'conversation_id' and 'avatar_media'")
        r["conversation_id"] = str(r["conversation_id"])
    return rows
