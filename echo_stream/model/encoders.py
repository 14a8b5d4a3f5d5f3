"""Condition encoders: the avatar's own audio, the user's behaviour, the transcript.

All frame-rate encoders emit one ``d_model`` token per 25 fps motion frame.

Own-audio encoder and its lookahead
-----------------------------------
Input: ``(B, T, 2, 83)`` per-frame features (two 50 Hz feature frames per video
frame; 80 log-mel bins + 3 prosody values each). A per-frame linear layer is
followed by a residual stack of *causal* dilated 1-d convolutions (kernel 3,
dilations 1, 2, 4), so the causal feature ``h[t]`` depends on input frames
``t - 14 .. t`` only. Lookahead is obtained by a shift, not by a centred
kernel: with ``lookahead=True`` the token of frame ``t`` is ``h[t + L]`` with
``L = cfg.lookahead_frames`` (2 frames = 80 ms). The token of frame ``t``
therefore sees audio frames ``t + L - 14 .. t + L`` and *never* anything after
``t + L``; callers pass ``T + L`` audio frames to get ``T`` tokens.
``tests/test_model.py`` checks both halves of that bound (a change at
``t + L + 1`` leaves token ``t`` bit-identical; a change at ``t + L`` moves it).

User-behaviour encoder
----------------------
Inputs per frame: user audio features ``(2, 83)``, a reserved ``(16,)``
video slot (hand-made behaviour features in earlier checkpoints; zero with its
flag off since the face tracker), the user's face as motion ``(58,)`` (client
blendshapes, or the face tracker on the user video) and presence flags ``(3,)``
(audio / video slot / face present). Each modality is replaced by zeros where
its presence flag is off (``torch.where``, so an absent modality contributes
exactly nothing whatever its buffer holds, NaN included); the flags themselves
are also inputs. The
stack is causal with no lookahead (user behaviour arrives in real time).

Transcript encoder (offline)
----------------------------
:class:`HashedTranscriptEncoder` needs no download: words, word bigrams and
character trigrams are hashed (CRC-32, stable across processes, unlike
``hash()``) into ``cfg.transcript_buckets`` buckets and averaged by an
``EmbeddingBag``; a small built-in affect lexicon adds valence / arousal /
negation / punctuation counts through a linear layer, so the model can learn
transcript affect from the start. ``""`` (or text without a single word)
encodes to exact zeros.

A stronger (e.g. sentence-transformer) encoder can be plugged in later through
the :class:`TranscriptEncoder` protocol -- anything with ``dim`` and
``encode(texts) -> (B, dim)`` -- via ``EchoModel.set_transcript_encoder``; its
``dim`` must equal ``cfg.transcript_dim`` (wrap it with a projection otherwise).
A future ``--transcript-encoder PATH`` option only has to build such an object
from local files (no network at run time) and hand it to that method.
"""
from __future__ import annotations

import functools
import math
import re
import zlib
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

# ----------------------------------------------------------------------------
# Causal convolution stack
# ----------------------------------------------------------------------------


class CausalConv1d(nn.Module):
    """Dilated 1-d convolution over (B, T, C) whose output at t sees inputs t - (k-1)*dilation .. t only.

    Written as one matmul over the k shifted copies of the (left zero-padded) input: on CPU this is much
    faster than ``nn.Conv1d`` with dilation for these short sequences.
    """

    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.kernel, self.dilation = kernel, dilation
        self.pad = (kernel - 1) * dilation
        self.proj = nn.Linear(kernel * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        xp = F.pad(x, (0, 0, self.pad, 0))
        taps = [xp[:, i * self.dilation: i * self.dilation + t] for i in range(self.kernel)]
        return self.proj(torch.cat(taps, dim=-1))


class CausalConvStack(nn.Module):
    """Residual pre-norm stack of causal dilated convolutions over (B, T, d)."""

    def __init__(self, d: int, kernel: int = 3, dilations: Sequence[int] = (1, 2, 4)):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in dilations)
        self.convs = nn.ModuleList(CausalConv1d(d, kernel, dl) for dl in dilations)
        #: number of input frames (the current one included) an output frame depends on
        self.receptive_field = 1 + sum((kernel - 1) * dl for dl in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, conv in zip(self.norms, self.convs):
            x = x + conv(F.gelu(norm(x)))
        return x


class AudioEncoder(nn.Module):
    """Own-audio features (B, T, 2, 83) -> tokens (B, T[-L], d), causal + exactly L frames of lookahead."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.lookahead = cfg.lookahead_frames
        self.in_dim = cfg.mels_per_frame * cfg.audio_dim
        self.proj = nn.Linear(self.in_dim, d)
        self.stack = CausalConvStack(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, feats: torch.Tensor, lookahead: bool = True) -> torch.Tensor:
        """``feats``: (B, T, 2, 83), already normalised.

        ``lookahead=True``: returns (B, T - L, d); token t = causal feature of frame t + L.
        ``lookahead=False``: returns (B, T, d), purely causal (used by the context memory).
        """
        b, t = feats.shape[:2]
        h = self.norm(self.stack(self.proj(feats.reshape(b, t, self.in_dim))))
        if lookahead and self.lookahead:
            if t <= self.lookahead:
                raise ValueError(f"avatar_audio: {t} frames given, need more than the "
                                 f"{self.lookahead} lookahead frames")
            h = h[:, self.lookahead:]
        return h


class UserEncoder(nn.Module):
    """User audio / video features / client blendshapes / presence flags -> tokens (B, T, d), causal."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.audio_dim = cfg.mels_per_frame * cfg.audio_dim
        self.video_dim = cfg.user_video_dim
        self.blend_dim = cfg.motion_dim
        self.proj = nn.Linear(self.audio_dim + self.video_dim + self.blend_dim + 3, d)
        self.stack = CausalConvStack(d, dilations=tuple(cfg.user_dilations))
        self.norm = nn.LayerNorm(d)

    def forward(self, audio: torch.Tensor, video: torch.Tensor, blend: torch.Tensor,
                present: torch.Tensor) -> torch.Tensor:
        """``audio`` (B,T,2,83) normalised, ``video`` (B,T,16), ``blend`` (B,T,58) normalised, ``present`` (B,T,3)."""
        b, t = audio.shape[:2]
        on = present > 0.5 if present.dtype != torch.bool else present
        zero = audio.new_zeros(())
        # torch.where, not a product: whatever an absent modality's buffer holds (even NaN) is dropped
        x = torch.cat([
            torch.where(on[..., 0:1], audio.reshape(b, t, self.audio_dim), zero),
            torch.where(on[..., 1:2], video, zero),
            torch.where(on[..., 2:3], blend, zero),
            on.to(audio.dtype),
        ], dim=-1)
        return self.norm(self.stack(self.proj(x)))


# ----------------------------------------------------------------------------
# Transcript
# ----------------------------------------------------------------------------


@runtime_checkable
class TranscriptEncoder(Protocol):
    """Hook for a transcript encoder: ``encode(texts) -> (len(texts), dim)`` float tensor.

    ``encode("")`` must give zeros. Plug one in with ``EchoModel.set_transcript_encoder``.
    """

    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


POSITIVE_WORDS = frozenset("""
great good love loved lovely happy thanks thank wonderful glad excellent awesome nice amazing fantastic
excited fun beautiful perfect enjoy enjoyed laugh pleased proud delighted cool brilliant yes congratulations
""".split())
NEGATIVE_WORDS = frozenset("""
sorry sad terrible angry worried bad hate awful upset afraid scared hurt pain lonely tired annoyed
frustrated disappointed horrible cry sick stressed anxious problem unfortunately lost miss fear
""".split())
HIGH_AROUSAL_WORDS = frozenset("""
excited angry amazing awesome scared afraid furious wow fantastic shocked thrilled panic hate love
terrible incredible urgent hurry
""".split())
LOW_AROUSAL_WORDS = frozenset("""
calm tired sad relaxed bored sleepy quiet peaceful lonely slow okay fine
""".split())
NEGATIONS = frozenset("not no never don't didn't isn't wasn't can't won't nothing nobody".split())

LEXICON_FEATURES = ("positive", "negative", "high_arousal", "low_arousal", "negation", "question", "exclamation")

_WORD_RE = re.compile(r"[a-z0-9']+")


def _bucket(feature: str, buckets: int) -> int:
    return zlib.crc32(feature.encode("utf-8")) % buckets


@functools.lru_cache(maxsize=8192)
def featurize_transcript(text: str, buckets: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Hashed n-gram bucket ids and affect-lexicon features of one text (pure, cached)."""
    lowered = text.lower()
    words = _WORD_RE.findall(lowered)
    if not words:
        return (), (0.0,) * len(LEXICON_FEATURES)
    ids = []
    for w in words:
        ids.append(_bucket("w:" + w, buckets))
        padded = f"<{w}>"
        for i in range(len(padded) - 2):
            ids.append(_bucket("c:" + padded[i:i + 3], buckets))
    for a, b in zip(words, words[1:]):
        ids.append(_bucket(f"b:{a} {b}", buckets))
    counts = (
        sum(w in POSITIVE_WORDS for w in words),
        sum(w in NEGATIVE_WORDS for w in words),
        sum(w in HIGH_AROUSAL_WORDS for w in words),
        sum(w in LOW_AROUSAL_WORDS for w in words),
        sum(w in NEGATIONS for w in words),
        lowered.count("?"),
        lowered.count("!"),
    )
    return tuple(ids), tuple(math.log1p(c) for c in counts)


class HashedTranscriptEncoder(nn.Module):
    """Offline transcript encoder: hashed word / bigram / char-trigram bag + affect lexicon -> (B, transcript_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim = cfg.transcript_dim
        self.buckets = cfg.transcript_buckets
        self.bag = nn.EmbeddingBag(self.buckets, self.dim, mode="mean")
        nn.init.normal_(self.bag.weight, std=0.5)
        self.lexicon = nn.Linear(len(LEXICON_FEATURES), self.dim)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of strings, got one string")
        device = self.bag.weight.device
        ids: list[int] = []
        offsets: list[int] = []
        lex: list[tuple[float, ...]] = []
        nonempty: list[float] = []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts: expected strings, got {type(text).__name__}")
            i, f = featurize_transcript(text, self.buckets)
            offsets.append(len(ids))
            ids.extend(i)
            lex.append(f)
            nonempty.append(1.0 if i else 0.0)
        if not texts:
            return torch.zeros(0, self.dim, device=device)
        bag = self.bag(torch.tensor(ids, dtype=torch.long, device=device),
                       torch.tensor(offsets, dtype=torch.long, device=device))
        lex_t = torch.tensor(lex, dtype=bag.dtype, device=device)
        mask = torch.tensor(nonempty, dtype=bag.dtype, device=device)[:, None]
        return (bag + self.lexicon(lex_t)) * mask

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)
