"""Named model configurations, pipeline constants and the defaults that the library and the CLI share.

``tiny`` is the CPU default (real time on 2 cores); ``base`` is the GPU
reference shape of the brief (d_model 512, 12 layers, 8 heads x 64,
25 frames x 8 region tokens = 200 query tokens per window).

This module stays light (NumPy at most): the command line reads its defaults
from here without loading torch, Ray, librosa or PyAV.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from . import motion

SAMPLE_RATE = 16_000          # decoded audio: 16 kHz mono float32
FPS = motion.FPS              # motion and video frames per second
MEL_BINS = 80                 # log-mel bins
MEL_HOP = SAMPLE_RATE // 50   # 50 Hz feature rate -> 320 samples
MELS_PER_FRAME = 2            # two 50 Hz feature frames per 25 fps video frame
PROSODY_DIM = 3               # log-energy, log-f0 (normalised), voicing probability
AUDIO_FEAT_DIM = MEL_BINS + PROSODY_DIM
USER_VIDEO_DIM = 16           # behaviour features computed from the user's webcam frames
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
#: new frames per generation window of served video sessions (``serve --stride``): a window's first frame
#: waits for stride + lookahead frames of audio, so 6 + 2 frames = 320 ms instead of 16 + 2 = 720 ms (tiny's
#: own new_frames); what it does to the motion is measured in docs/serving.md
DEFAULT_SERVE_STRIDE = 6

#: training shards: seconds of conversation per Parquet row (chunk), and chunk rows per shard file
SHARD_CHUNK_SECONDS = 64.0
SHARD_ROWS = 32
#: preprocess's quality checks: quarantine a conversation whose tracks' lengths differ from the avatar
#: audio's by more than this (seconds), or whose avatar audio peaks below this level (dBFS)
PREPROCESS_LENGTH_TOLERANCE_S = 1.0
PREPROCESS_SILENCE_DBFS = -60.0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    ff_mult: int = 2
    #: tokens per region block, in motion.REGIONS order (lips first, so that lip tokens fill whole kernel tiles)
    region_tokens: tuple[int, ...] = (1, 1, 1, 1, 1)
    window_frames: int = 20       # frames generated per model call (overlap + new)
    overlap_frames: int = 4       # previous-motion frames fed back as known context
    lookahead_frames: int = 2     # 2 frames = 80 ms of future audio
    #: user frames the user branch sees *before* the window's first frame: its keys are the last
    #: ``user_frames = user_history_frames + window_frames`` frames of the user up to the window's end (a
    #: reaction comes 0.2-0.6 s after its cue, often after the window it falls in has started). Configs
    #: written before this field existed load with 0 (the window's own frames only).
    user_history_frames: int = 0
    #: dilations of the user encoder's causal convolutions (receptive field 1 + 2 x sum: (1, 2, 4, 8) = 31
    #: frames, 1.24 s: a user frame's token knows when the user last stopped talking)
    user_dilations: tuple[int, ...] = (1, 2)
    #: frame-aligned user conditioning: each frame's user token (projected, learned from zero) is added to
    #: that frame's non-lip tokens (every token with ``fusion="entangled"``), beside the gated cross-attention.
    #: Configs written before this field existed load without it.
    user_frame_bias: bool = False
    #: stage 2: weight of an auxiliary loss that reads the target's non-lip motion from each frame's user token
    #: alone (a training-only linear head): the user encoder must extract the user's cues itself instead of
    #: waiting for the denoiser to ask for them. 0 = off (the default: at 0.5 the default recipe's nods were no
    #: better after 480 stage-2 steps; see the README)
    user_aux_weight: float = 0.0
    #: listener reactions (``model/reactions.py``): a head that learns *when* to nod / raise the brows from
    #: the user's features, with gesture templates measured on the training motion (``train --stage
    #: reactions``; until then the head never fires). Configs written before this field existed load without it.
    reactions: bool = False
    #: networks in the reaction head, each trained with its own seed, their probabilities averaged: one head's
    #: nod and micro-nod figures moved by 1.5x between two trainings with the same recipe and seed (README)
    reaction_members: int = 3
    memory_slots: int = 16        # LCU memory tokens (bounded whatever the session length)
    memory_summary_tokens: int = 4
    transcript_dim: int = 64      # hashed n-gram transcript embedding size
    transcript_buckets: int = 4096
    sampler_steps: int = 4
    audio_dim: int = AUDIO_FEAT_DIM
    mels_per_frame: int = MELS_PER_FRAME
    user_video_dim: int = USER_VIDEO_DIM
    motion_dim: int = motion.NUM_CHANNELS
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE
    #: cross-attention fusion: "sdcm" (decoupled audio / user+context branches, lip tokens audio-only)
    #: or "entangled" (ablation: one softmax over concatenated audio+user+context keys for every token)
    fusion: str = "sdcm"
    #: initial value of the learned per-head SDCM user gate, before the sigmoid (sigmoid(-2) ~ 0.12)
    gate_init: float = -2.0
    #: frames over which the sampler fades out its seam correction after the overlap (0 = off)
    seam_blend_frames: int = 6
    #: LCU transcript traces: one per-window decay factor per trace (``()`` = none; see ``model/lcu.py``).
    #: Configs written before this field existed load with none.
    text_trace_decays: tuple[float, ...] = ()

    @property
    def new_frames(self) -> int:
        return self.window_frames - self.overlap_frames

    @property
    def user_frames(self) -> int:
        """Frames of user behaviour each window's user branch attends to (ending at the window's end)."""
        return self.user_history_frames + self.window_frames

    @property
    def text_traces(self) -> int:
        return len(self.text_trace_decays)

    @property
    def memory_rows(self) -> int:
        """Rows of one session's LCU state: the behaviour slots, then the transcript traces."""
        return self.memory_slots + self.text_traces

    @property
    def tokens_per_frame(self) -> int:
        return sum(self.region_tokens)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        d = dict(d)
        for key in ("region_tokens", "text_trace_decays", "user_dilations"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(text_trace_decays=(0.9, 0.998), user_history_frames=20, user_dilations=(1, 2, 4, 8),
                        user_frame_bias=True, reactions=True),
    "base": ModelConfig(
        name="base", d_model=512, n_layers=12, n_heads=8, head_dim=64, ff_mult=4,
        region_tokens=(2, 2, 1, 1, 2), window_frames=25, overlap_frames=5,
        memory_slots=32, memory_summary_tokens=8, transcript_dim=128, text_trace_decays=(0.9, 0.998),
        user_history_frames=25, user_dilations=(1, 2, 4, 8), user_frame_bias=True, reactions=True,
    ),
}


#: The SDCM-interference ablation: one softmax over concatenated audio + user keys for every token.
CONFIGS["tiny-entangled"] = dataclasses.replace(CONFIGS["tiny"], name="tiny-entangled", fusion="entangled")


def get_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A named config (``tiny``, ``base``) or a JSON file of ModelConfig fields."""
    key = str(name_or_path)
    if key in CONFIGS:
        return CONFIGS[key]
    if os.path.isfile(key):
        with open(key) as f:
            try:
                return ModelConfig.from_dict(json.load(f))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{key}: not a valid model config: {e}") from None
            except RecursionError:
                raise ValueError(f"{key}: not a valid model config: JSON nested too deeply") from None
    raise ValueError(f"unknown config '{key}': use one of {', '.join(CONFIGS)} or a path to a JSON config file")


# ============================================================================ the default training recipe

@dataclass(frozen=True)
class StageSettings:
    """Optimisation settings of one training stage (:mod:`echo_stream.train`)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    clip: float = 1.0
    min_lr_frac: float = 0.05
    #: stage 2: share of windows whose known frames lose their non-lip baseline (see EchoModel.loss)
    known_drop: float = 0.0
    #: share of windows with more known frames than overlap_frames (low-latency stride; see EchoModel.loss)
    long_known: float = 0.0


#: The default recipe (tiny config, 2 CPU cores): see :mod:`echo_stream.train` and the docs.
TRAIN_DEFAULTS: dict[int, StageSettings] = {
    1: StageSettings(steps=2000, batch_size=32, lr=1e-3, warmup=100),
    2: StageSettings(steps=1200, batch_size=16, lr=4e-4, warmup=50, known_drop=0.35),
}
#: stage 2: seconds of history rolled through the LCU memory before each window
TRAIN_HISTORY_S = 30.0
#: windows of each stage-2 history rolled through the LCU with gradients (the rest without): None = all
TRAIN_BPTT_WINDOWS: int | None = 12
