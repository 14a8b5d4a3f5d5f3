"""Letters -> phones -> syllables: the tiny phonology of the pseudo-speech."""
from __future__ import annotations

import re
from dataclasses import dataclass



@dataclass(frozen=True)
class _Vowel:
    formants: tuple[float, float, float]
    open: float       # jaw openness
    funnel: float
    pucker: float
    spread: float     # mouthStretch


_VOWELS: dict[str, _Vowel] = {
    "a": _Vowel((730.0, 1090.0, 2440.0), 1.00, 0.0, 0.0, 0.10),
    "e": _Vowel((530.0, 1840.0, 2480.0), 0.55, 0.0, 0.0, 0.50),
    "i": _Vowel((290.0, 2290.0, 3010.0), 0.20, 0.0, 0.0, 1.00),
    "o": _Vowel((570.0, 840.0, 2410.0), 0.60, 0.8, 0.45, 0.0),
    "u": _Vowel((310.0, 870.0, 2240.0), 0.22, 0.5, 1.00, 0.0),
}
_BANDWIDTHS = (90.0, 110.0, 170.0)


@dataclass(frozen=True)
class _Cons:
    kind: str                                   # stop | fric | nasal | approx
    dur: float                                  # s at rate 1
    amp: float                                  # relative to the voice level
    band: tuple[float, float] | None = None     # noise band (fricative, stop burst)
    formants: tuple[float, float, float] | None = None
    lips: tuple[tuple[str, float], ...] = ()    # articulation targets


def _sym(**kw) -> tuple[tuple[str, float], ...]:
    out = []
    for k, v in kw.items():
        if k.endswith("_LR"):
            out += [(k[:-3] + "Left", v), (k[:-3] + "Right", v)]
        else:
            out.append((k, v))
    return tuple(out)


_CONSONANTS: dict[str, _Cons] = {
    "p": _Cons("stop", 0.075, 0.10, (400.0, 2200.0), None, _sym(mouthClose=0.8, mouthPress_LR=0.55, jawOpen=0.03,
                                                                 mouthRollLower=0.15, mouthRollUpper=0.15)),
    "b": _Cons("stop", 0.065, 0.06, (300.0, 1800.0), None, _sym(mouthClose=0.8, mouthPress_LR=0.45, jawOpen=0.03,
                                                                 mouthRollLower=0.12, mouthRollUpper=0.12)),
    "m": _Cons("nasal", 0.070, 0.20, None, (250.0, 1100.0, 2200.0), _sym(mouthClose=0.7, mouthPress_LR=0.35,
                                                                          jawOpen=0.05)),
    "f": _Cons("fric", 0.080, 0.07, (1500.0, 7000.0), None, _sym(mouthRollLower=0.55, mouthUpperUp_LR=0.2,
                                                                  jawOpen=0.07)),
    "th": _Cons("fric", 0.070, 0.05, (2000.0, 7000.0), None, _sym(tongueOut=0.25, jawOpen=0.12)),
    "s": _Cons("fric", 0.085, 0.15, (3800.0, 7500.0), None, _sym(mouthStretch_LR=0.2, jawOpen=0.05)),
    "sh": _Cons("fric", 0.085, 0.16, (1800.0, 5000.0), None, _sym(mouthFunnel=0.5, mouthPucker=0.25, jawOpen=0.08)),
    "h": _Cons("fric", 0.050, 0.05, (400.0, 3500.0), None, _sym(jawOpen=0.2)),
    "t": _Cons("stop", 0.065, 0.10, (2500.0, 6500.0), None, _sym(jawOpen=0.1)),
    "k": _Cons("stop", 0.070, 0.10, (1200.0, 3200.0), None, _sym(jawOpen=0.14)),
    "n": _Cons("nasal", 0.060, 0.18, None, (250.0, 1600.0, 2600.0), _sym(jawOpen=0.1)),
    "l": _Cons("approx", 0.055, 0.30, None, (360.0, 1300.0, 2700.0), _sym(jawOpen=0.15)),
    "r": _Cons("approx", 0.055, 0.28, None, (420.0, 1300.0, 1600.0), _sym(mouthFunnel=0.25, jawOpen=0.12)),
    "w": _Cons("approx", 0.055, 0.28, None, (300.0, 700.0, 2200.0), _sym(mouthPucker=0.6, mouthFunnel=0.3,
                                                                          jawOpen=0.06)),
    "y": _Cons("approx", 0.050, 0.28, None, (280.0, 2200.0, 3000.0), _sym(mouthStretch_LR=0.3, jawOpen=0.07)),
}

_V_DIGRAPHS = {"ee": "i", "ea": "i", "ie": "i", "oo": "u", "ou": "o", "ai": "e", "ay": "e", "ei": "e", "ey": "e",
               "oa": "o", "ow": "o", "au": "o", "aw": "o", "oi": "o", "oy": "o", "ue": "u", "ew": "u"}
_C_DIGRAPHS = {"sh": "sh", "ch": "sh", "th": "th", "ph": "f", "ck": "k", "ng": "n", "qu": "k", "wh": "w"}
_C_SINGLE = {"b": "b", "c": "k", "d": "t", "f": "f", "g": "k", "h": "h", "j": "sh", "k": "k", "l": "l", "m": "m",
             "n": "n", "p": "p", "q": "k", "r": "r", "s": "s", "t": "t", "v": "f", "w": "w", "x": "s", "z": "s"}
_VOWEL_LETTERS = "aeiou"


def _word_phones(word: str) -> list[str]:
    """Letters of one word -> phone symbols (a crude, deterministic spelling-to-sound mapping)."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if len(w) >= 3 and w.endswith("e") and w[-2] not in _VOWEL_LETTERS + "y" \
            and any(c in _VOWEL_LETTERS for c in w[:-2]):
        w = w[:-1]                                   # silent final e
    out, i = [], 0
    while i < len(w):
        two = w[i:i + 2]
        c = w[i]
        if two in _V_DIGRAPHS:
            out.append(_V_DIGRAPHS[two])
            i += 2
        elif two in _C_DIGRAPHS:
            out.append(_C_DIGRAPHS[two])
            i += 2
        elif c in _VOWEL_LETTERS:
            out.append(c)
            i += 1
        elif c == "y":
            nxt = w[i + 1:i + 2]
            out.append("y" if nxt and nxt in _VOWEL_LETTERS else "i")
            i += 1
        elif c == "c" and w[i + 1:i + 2] in ("e", "i", "y"):
            out.append("s")
            i += 1
        else:
            if out and out[-1] == _C_SINGLE[c]:      # doubled letters are one phone
                i += 1
                continue
            out.append(_C_SINGLE[c])
            i += 1
    return out


def text_to_syllables(text: str) -> list[list[list[tuple[tuple[str, ...], str, tuple[str, ...]]]]]:
    """``text`` -> sentences -> phrases -> syllables ``(onset, nucleus, coda)`` of phone symbols.

    Sentences end at ``. ! ?``, phrases at ``, ; :``; within a phrase words are
    concatenated. Onsets and codas keep at most two consonants. A word without
    a vowel ("mhm") gets a nasal or approximant as its nucleus (or /e/).
    """
    sentences = []
    for sent in re.findall(r"[^.!?]+[.!?]*", text):
        phrases = []
        for phrase in re.split(r"[,;:]", sent):
            syls = []
            for word in phrase.split():
                ph = _word_phones(word)
                if not ph:
                    continue
                if not any(p in _VOWELS for p in ph):
                    k = next((j for j, p in enumerate(ph) if _CONSONANTS[p].kind in ("nasal", "approx")), None)
                    if k is None:
                        ph = ph + ["e"]
                    else:
                        ph = ph[:k] + [ph[k] + "_"] + ph[k + 1:]   # syllabic consonant
                nuclei = [j for j, p in enumerate(ph) if p in _VOWELS or p.endswith("_")]
                word_syls = []
                prev_end = 0
                for n_i, j in enumerate(nuclei):
                    cons = ph[prev_end:j]
                    coda_prev: list[str] = []
                    if n_i > 0 and len(cons) >= 2:
                        coda_prev, cons = cons[:1], cons[1:]
                    if coda_prev:
                        o, v, c = word_syls[-1]
                        word_syls[-1] = (o, v, tuple(list(c) + coda_prev)[:2])
                    word_syls.append((tuple(cons[-2:]), ph[j], ()))
                    prev_end = j + 1
                tail = ph[prev_end:]
                if tail:
                    o, v, c = word_syls[-1]
                    word_syls[-1] = (o, v, tuple(list(c) + tail)[:2])
                syls.extend(word_syls)
                syls.append(None)                     # word boundary marker
            while syls and syls[-1] is None:
                syls.pop()
            if syls:
                phrases.append(syls)
        if phrases:
            sentences.append(phrases)
    return sentences


