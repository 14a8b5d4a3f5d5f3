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


def parse(text: str, source: str = "<transcript>") -> list[Segment]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError:
            items = None
        except RecursionError:
            raise InputError(source, "JSON transcript is nested too deeply: expected a flat list of "
                                     "{start, end, speaker, text} objects") from None
        if isinstance(items, list):
            try:
                return sorted((Segment(float(d.get("start", 0.0)), float(d.get("end", d.get("start", 0.0))),
                                       str(d.get("speaker", "unknown")), str(d["text"])) for d in items),
                              key=lambda s: s.start)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise InputError(source, f"JSON transcript needs a list of {{start, end, speaker, text}}: {e}")
    if "-->" in text:
        return sorted(_parse_cues(text), key=lambda s: s.start)
    out = []
    for line in text.splitlines():
        if not line.strip() or line.strip().upper() == "WEBVTT":
            continue
        m = _TIMED.match(line)
        if m:
            spk, body = _speaker_text(m.group(3))
            out.append(Segment(float(m.group(1)), float(m.group(2)), spk, body))
        else:
            spk, body = _speaker_text(line)
            out.append(Segment(0.0, 0.0, spk, body))
    return sorted(out, key=lambda s: s.start)


def load(value: str | None) -> list[Segment]:
    """Segments from a transcript file, or from the literal text when ``value`` is not a file."""
    if not value:
        return []
    if os.path.isdir(value):
        raise InputError(value, "is a directory, not a transcript file")
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise InputError(value, "not UTF-8 text: give a .txt, .srt, .vtt or .json transcript") from None
        return parse(text, value)
    if re.search(r"\.(txt|srt|vtt|json)$", value, re.I):
        raise InputError(value, "no such transcript file")
    return [Segment(0.0, 0.0, "unknown", value.strip())]
