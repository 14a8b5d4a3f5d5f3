"""Transcript input: timed text segments of the conversation (both speakers).

Accepted files (UTF-8):

* SubRip ``.srt`` and WebVTT ``.vtt`` cues (an optional ``speaker:`` prefix in the text);
* JSON: a list of ``{"start": s, "end": s, "speaker": "user"|"avatar", "text": "..."}``;
* plain text, one segment per line, optionally timed:
  ``[12.5-14.0] user: I got the job!`` or ``12.5 14.0 user: I got the job!``;
  untimed lines all start at 0 s (known before the conversation starts).

A ``--transcript`` value that is not an existing file is taken as the text itself.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    speaker: str
    text: str


_TS = r"(\d+:)?(\d+):(\d+(?:[.,]\d+)?)"
_CUE = re.compile(rf"^\s*({_TS})\s*-->\s*({_TS})")
_TIMED = re.compile(r"^\s*\[?\s*(\d+(?:\.\d+)?)\s*[-\s]\s*(\d+(?:\.\d+)?)\s*\]?\s+(.*)$")
_SPEAKER = re.compile(r"^\s*([A-Za-z_][\w-]{0,31})\s*:\s*(.*)$")
_SPEAKER_NAME = re.compile(r"^[A-Za-z_][\w-]{0,31}$")


def _seconds(ts: str) -> float:
    parts = ts.replace(",", ".").split(":")
    return sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts)))


def _speaker_text(s: str) -> tuple[str, str]:
    m = _SPEAKER.match(s)
    return (m.group(1).lower(), m.group(2).strip()) if m else ("unknown", s.strip())


def _parse_cues(text: str) -> list[Segment]:
    out, cur, lines = [], None, []
    for line in text.splitlines() + [""]:
        m = _CUE.match(line)
        if m:
            cur, lines = (_seconds(m.group(1)), _seconds(m.group(5))), []
        elif not line.strip():
            if cur and lines:
                spk, body = _speaker_text(" ".join(lines))
                out.append(Segment(cur[0], cur[1], spk, body))
            cur, lines = None, []
        elif cur is not None:
            lines.append(line.strip())
    return out


#: limits on a transcript: longer conversations or texts are not transcripts but mistakes
MAX_SECONDS = 24 * 3600.0
MAX_TEXT_CHARS = 20_000
MAX_FILE_BYTES = 16 * 1024 * 1024


def _number(v, key: str, where: str, source: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(source, f"{where}: '{key}' must be a number of seconds, got {json.dumps(v)[:40]}")
    return float(v)


def _checked(seg: Segment, where: str, source: str) -> Segment:
    """One segment's times and text checked: finite, >= 0, end not before start, bounded."""
    for key, v in (("start", seg.start), ("end", seg.end)):
        if v != v or v in (float("inf"), float("-inf")):
            raise InputError(source, f"{where}: '{key}' is not a finite number ({v})")
        if v < 0:
            raise InputError(source, f"{where}: '{key}' is negative ({v:g} s); times count from 0")
        if v > MAX_SECONDS:
            raise InputError(source, f"{where}: '{key}' = {v:g} s is too large (a transcript spans at most "
                                     f"{MAX_SECONDS / 3600:g} h)")
    if seg.end < seg.start:
        raise InputError(source, f"{where}: 'end' ({seg.end:g} s) is before 'start' ({seg.start:g} s)")
    if len(seg.text) > MAX_TEXT_CHARS:
        raise InputError(source, f"{where}: text of {len(seg.text)} characters (at most {MAX_TEXT_CHARS})")
    return seg


def _parse_json(stripped: str, source: str) -> list[Segment] | None:
    """Segments of a JSON transcript; None when the text is not JSON at all (then it is plain text)."""
    try:
        items = json.loads(stripped)
    except json.JSONDecodeError:
        if stripped.startswith("{"):
            raise InputError(source, "not valid JSON: a JSON transcript is a list of "
                                     "{start, end, speaker, text} objects") from None
        return None
    except RecursionError:
        raise InputError(source, "JSON transcript is nested too deeply: expected a flat list of "
                                 "{start, end, speaker, text} objects") from None
    if not isinstance(items, list):
        raise InputError(source, f"JSON transcript must be a list of {{start, end, speaker, text}} objects, "
                                 f"got a {type(items).__name__}")
    out = []
    for i, d in enumerate(items):
        where = f"item {i}"
        if not isinstance(d, dict):
            raise InputError(source, f"{where}: expected an object with start, end, speaker, text; "
                                     f"got {json.dumps(d)[:40]}")
        if not isinstance(d.get("text"), str):
            raise InputError(source, f"{where}: needs a 'text' string")
        speaker = d.get("speaker", "unknown")
        if not isinstance(speaker, str) or not _SPEAKER_NAME.match(speaker):
            raise InputError(source, f"{where}: 'speaker' must be a name like \"user\" or \"avatar\", "
                                     f"got {json.dumps(speaker)[:40]}")
        start = _number(d.get("start", 0.0), "start", where, source)
        end = _number(d.get("end", start), "end", where, source)
        out.append(_checked(Segment(start, end, speaker.lower(), d["text"]), where, source))
    return sorted(out, key=lambda s: s.start)


def parse(text: str, source: str = "<transcript>") -> list[Segment]:
    """Segments of a transcript's text; raises :class:`InputError` naming ``source`` and the line at fault."""
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        segs = _parse_json(stripped, source)
        if segs is not None:
            return segs
    if "-->" in text:
        for n, line in enumerate(text.splitlines(), 1):
            if "-->" in line and not _CUE.match(line):
                raise InputError(source, f"line {n}: cannot read the cue timing {line.strip()[:60]!r} "
                                         "(expected HH:MM:SS,mmm --> HH:MM:SS,mmm)")
        return sorted((_checked(s, "cue", source) for s in _parse_cues(text)), key=lambda s: s.start)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.strip().upper() == "WEBVTT":
            continue
        m = _TIMED.match(line)
        if m:
            spk, body = _speaker_text(m.group(3))
            out.append(_checked(Segment(float(m.group(1)), float(m.group(2)), spk, body), f"line {n}", source))
        else:
            spk, body = _speaker_text(line)
            out.append(_checked(Segment(0.0, 0.0, spk, body), f"line {n}", source))
    return sorted(out, key=lambda s: s.start)


def load(value: str | None) -> list[Segment]:
    """Segments from a transcript file, or from the literal text when ``value`` is not a file."""
    if not value:
        return []
    if os.path.isdir(value):
        raise InputError(value, "is a directory, not a transcript file")
    if os.path.isfile(value):
        size = os.path.getsize(value)
        if size > MAX_FILE_BYTES:
            raise InputError(value, f"transcript file of {size / 2**20:.0f} MiB (at most "
                                    f"{MAX_FILE_BYTES // 2**20} MiB)")
        try:
            with open(value, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise InputError(value, "not UTF-8 text: give a .txt, .srt, .vtt or .json transcript") from None
        return parse(text, value)
    if re.search(r"\.(txt|srt|vtt|json)$", value, re.I):
        raise InputError(value, "no such transcript file")
    return [Segment(0.0, 0.0, "unknown", value.strip())]
