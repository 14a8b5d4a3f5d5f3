"""EchoModel: encoders + LCU context memory + SDCM denoiser + streaming sampler, behind the pipeline API.

Shapes (``K = cfg.overlap_frames``, ``S = cfg.new_frames``, ``W = K + S = cfg.window_frames``,
``L = cfg.lookahead_frames``, ``M = cfg.memory_rows`` (LCU slots + transcript traces), ``d = cfg.d_model``):

* ``encode_transcript(texts) -> (B, transcript_dim)``; ``""`` gives zeros.
* ``memory_init(B) -> (B, M, d)``.
* ``memory_update(mem, avatar_audio (B,T,2,83), user_audio (B,T,2,83), user_video (B,T,16),
  user_blend (B,T,58), user_present (B,T,3), text_emb (B,Dt)) -> (B, M, d)``.
* ``sample(prev_motion (B,K,58), avatar_audio (B,W+L,2,83) for frames [t0-K, t0+S+L),
  user_* (B,U,...) for frames [t0+S-U, t0+S) (``U = cfg.user_frames``: the window and
  ``cfg.user_history_frames`` before it), memory (B,M,d), seeds [B ints]) -> (B, S, 58)``
  torch float32 tensor in physical units, clamped to ``motion.CHANNEL_MIN/MAX``.
* ``loss(batch, stage) -> (loss, logs)``.

Physical motion units are those of :mod:`echo_stream.motion`; the network works on
per-channel normalised motion ``(m - motion_mean) / motion_std`` (buffers saved
in checkpoints; defaults mean 0, std ``(max - min) / 4``). Audio features are
normalised with the ``audio_mean`` / ``audio_std`` buffers (defaults 0 / 1; the
training command sets them from data with :meth:`EchoModel.set_audio_stats`).

Outside training mode (``model.eval()``) ``memory_update`` and
``encode_transcript`` run without autograd, so a long-running session never
chains an autograd graph through its memory; ``sample`` always runs without
autograd (``torch.no_grad``, so its outputs are ordinary tensors; callers may
wrap it in ``torch.inference_mode`` too).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import motion
from ..config import CONFIGS, ModelConfig, get_config
from .denoiser import SDCMDenoiser
from .encoders import AudioEncoder, HashedTranscriptEncoder, TranscriptEncoder, UserEncoder
from .lcu import ContextMemory, MemoryState, TextTrace
from .reactions import ReactionHead
from .sampler import make_noise, sample_window

FUSIONS = ("sdcm", "entangled")


def validate_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the field when a config cannot build a model."""
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"fusion: must be one of {', '.join(FUSIONS)}, got {cfg.fusion!r}")
    if len(cfg.region_tokens) != len(motion.REGIONS) or min(cfg.region_tokens) < 1:
        raise ValueError(f"region_tokens: need {len(motion.REGIONS)} positive counts "
                         f"({', '.join(motion.REGIONS)}), got {cfg.region_tokens}")
    if not 0 <= cfg.overlap_frames < cfg.window_frames:
        raise ValueError(f"overlap_frames: must be in [0, window_frames={cfg.window_frames}), got {cfg.overlap_frames}")
    if cfg.lookahead_frames < 0:
        raise ValueError(f"lookahead_frames: must be >= 0, got {cfg.lookahead_frames}")
    if not cfg.user_dilations or min(cfg.user_dilations) < 1:
        raise ValueError(f"user_dilations: need positive dilations, got {cfg.user_dilations}")
    if cfg.user_aux_weight < 0:
        raise ValueError(f"user_aux_weight: must be >= 0, got {cfg.user_aux_weight}")
    if cfg.user_history_frames < 0:
        raise ValueError(f"user_history_frames: must be >= 0, got {cfg.user_history_frames}")
    if cfg.motion_dim != motion.NUM_CHANNELS:
        raise ValueError(f"motion_dim: the motion space has {motion.NUM_CHANNELS} channels, got {cfg.motion_dim}")
    if cfg.text_traces and cfg.transcript_dim >= cfg.d_model:
        raise ValueError(f"transcript_dim: with text_trace_decays a trace row holds transcript_dim + 1 values, "
                         f"so it must be < d_model={cfg.d_model}, got {cfg.transcript_dim}")
    if any(not 0.0 < lam <= 1.0 for lam in cfg.text_trace_decays):
        raise ValueError(f"text_trace_decays: each must be in (0, 1], got {cfg.text_trace_decays}")
    for name in ("d_model", "n_layers", "n_heads", "head_dim", "ff_mult", "memory_slots",
                 "memory_summary_tokens", "transcript_dim", "transcript_buckets", "sampler_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(cfg, name)}")


def _resolve_config(config: ModelConfig | str | None) -> ModelConfig:
    if config is None:
        return CONFIGS["tiny"]
    if isinstance(config, ModelConfig):
        return config
    return get_config(config)


class EchoModel(nn.Module):
    """The ECHO interactive-head-generation model (see the module docstring for the API)."""

    def __init__(self, config: ModelConfig | str | None = None):
        super().__init__()
        cfg = _resolve_config(config)
        validate_config(cfg)
        self.cfg = cfg
        self.audio_encoder = AudioEncoder(cfg)
        self.user_encoder = UserEncoder(cfg)
        self.transcript_encoder = HashedTranscriptEncoder(cfg)
        self.lcu = ContextMemory(cfg)
        self.denoiser = SDCMDenoiser(cfg)
        self.register_buffer("motion_mean", torch.zeros(cfg.motion_dim))
        self.register_buffer("motion_std", torch.from_numpy((motion.CHANNEL_MAX - motion.CHANNEL_MIN) / 4.0).float())
        self.register_buffer("audio_mean", torch.zeros(cfg.audio_dim))
        self.register_buffer("audio_std", torch.ones(cfg.audio_dim))
        self.register_buffer("channel_min", torch.from_numpy(motion.CHANNEL_MIN.copy()), persistent=False)
        self.register_buffer("channel_max", torch.from_numpy(motion.CHANNEL_MAX.copy()), persistent=False)
        non_lip = torch.ones(cfg.motion_dim, dtype=torch.bool)
        non_lip[torch.from_numpy(motion.REGION_SLICES["lips"])] = False
        self.register_buffer("_non_lip_channels", non_lip, persistent=False)
        self._external_text_encoder: TranscriptEncoder | None = None
        #: metadata of the checkpoint this model was loaded from (set by load_checkpoint)
        self.checkpoint_meta: dict = {}
        # created last: a model with traces draws the same initial weights for everything else
        self.text_trace = TextTrace(cfg) if cfg.text_traces else None
        #: training-only head of the auxiliary user loss (cfg.user_aux_weight; not used to generate)
        self.user_aux = nn.Linear(cfg.d_model, cfg.motion_dim) if cfg.user_aux_weight > 0 else None
        #: listener reactions: onset probabilities from the user's features (``model/reactions.py``)
        self.reactions = ReactionHead(cfg) if cfg.reactions else None

    # ------------------------------------------------------------------ utils

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    @property
    def device(self) -> torch.device:
        return self.motion_mean.device

    def set_motion_stats(self, mean, std) -> None:
        """Per-channel normalisation statistics (physical units), e.g. from the training corpus."""
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        if mean.numel() != self.cfg.motion_dim or std.numel() != self.cfg.motion_dim:
            raise ValueError(f"motion stats: expected {self.cfg.motion_dim} values each")
        self.motion_mean.copy_(mean)
        self.motion_std.copy_(std.clamp_min(1e-4))

    def set_audio_stats(self, mean, std) -> None:
        """Per-feature (83) normalisation statistics of the audio features."""
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        if mean.numel() != self.cfg.audio_dim or std.numel() != self.cfg.audio_dim:
            raise ValueError(f"audio stats: expected {self.cfg.audio_dim} values each")
        self.audio_mean.copy_(mean)
        self.audio_std.copy_(std.clamp_min(1e-4))

    def normalise_motion(self, m: torch.Tensor) -> torch.Tensor:
        return (m - self.motion_mean) / self.motion_std

    def denormalise_motion(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.motion_std + self.motion_mean

    def _norm_audio(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.audio_mean) / self.audio_std

    def _t(self, name: str, x, shape: tuple) -> torch.Tensor:
        """``x`` as a float32 tensor on the model device; ``shape`` entries None match anything."""
        if x is None:
            raise ValueError(f"{name}: missing")
        t = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
        return t

    def _grad_ctx(self):
        return contextlib.nullcontext() if self.training else torch.no_grad()

    # ------------------------------------------------------------- transcript

    def set_transcript_encoder(self, encoder: TranscriptEncoder | None) -> None:
        """Plug in another transcript encoder (``None`` restores the built-in hashed one).

        It must provide ``dim == cfg.transcript_dim`` and ``encode(texts) -> (B, dim)``; it is not part
        of the checkpoint (the model's own weights see its embeddings through ``lcu.text_proj``).
        """
        if encoder is not None:
            if not isinstance(encoder, TranscriptEncoder):
                raise TypeError("transcript encoder: needs a 'dim' attribute and an 'encode(texts)' method")
            if encoder.dim != self.cfg.transcript_dim:
                raise ValueError(f"transcript encoder: dim {encoder.dim} != cfg.transcript_dim "
                                 f"{self.cfg.transcript_dim}; wrap it with a projection")
        self._external_text_encoder = encoder

    def encode_transcript(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, transcript_dim) embedding of each text; ``""`` gives zeros."""
        with self._grad_ctx():
            enc = self._external_text_encoder or self.transcript_encoder
            out = enc.encode(list(texts)).to(device=self.device, dtype=torch.float32)
        return out

    # ----------------------------------------------------------------- memory

    def memory_init(self, batch: int) -> torch.Tensor:
        """(B, M + R, d) initial memory of new sessions (slots, then zero transcript traces)."""
        with self._grad_ctx():
            slots = self.lcu.init(batch)
            if self.text_trace is None:
                return slots
            return torch.cat([slots, slots.new_zeros(batch, self.cfg.text_traces, self.cfg.d_model)], dim=1)

    def text_traces_from_history(self, texts: Sequence[Sequence[str]]) -> torch.Tensor:
        """(B, R, d) transcript traces after windows whose texts are ``texts[b]`` (closed form, with gradients).

        Equal to running :meth:`memory_update` over those windows from :meth:`memory_init` (traces part).
        """
        if self.text_trace is None:
            raise ValueError("text traces: this model config has none (text_trace_decays is empty)")
        b = len(texts)
        n = max((len(row) for row in texts), default=0)
        unique = sorted({t for row in texts for t in row if t})
        index = {t: i + 1 for i, t in enumerate(unique)}          # 0 = nothing said
        enc = self._external_text_encoder or self.transcript_encoder
        with self._grad_ctx():
            table = torch.zeros(len(unique) + 1, self.cfg.transcript_dim, device=self.device)
            if unique:
                table = torch.cat([table[:1], enc.encode(unique).to(self.device, torch.float32)])
            ids = torch.zeros(b, max(n, 1), dtype=torch.long, device=self.device)
            valid = torch.zeros(b, max(n, 1), dtype=torch.bool, device=self.device)
            for i, row in enumerate(texts):
                ids[i, :len(row)] = torch.tensor([index.get(t, 0) for t in row], dtype=torch.long)
                valid[i, :len(row)] = True
            return self.text_trace.closed_form(table[ids], valid, self.cfg.d_model)

    def memory_state(self, memory: torch.Tensor, steps: int = 0) -> MemoryState:
        """Wrap one session's (M, d) memory for serialisation."""
        return MemoryState(memory=memory.detach().to("cpu", torch.float32).clone(), config_name=self.cfg.name,
                           steps=steps)

    def _user_tokens(self, user_audio, user_video, user_blend, user_present) -> torch.Tensor:
        return self.user_encoder(self._norm_audio(user_audio), user_video, self.normalise_motion(user_blend),
                                 user_present)

    def _memory_step(self, mem, avatar_audio, user_audio, user_video, user_blend, user_present, text_emb):
        audio_tok = self.audio_encoder(self._norm_audio(avatar_audio), lookahead=False)
        user_tok = self._user_tokens(user_audio, user_video, user_blend, user_present)
        m = self.cfg.memory_slots
        slots = self.lcu(mem[:, :m], audio_tok, user_tok, user_present.any(dim=-1), text_emb)
        if self.text_trace is None:
            return slots
        return torch.cat([slots, self.text_trace.update(mem[:, m:], text_emb)], dim=1)

    def memory_tokens(self, memory: torch.Tensor) -> torch.Tensor:
        """The (B, M + R, d) tokens the denoiser attends to for an LCU state (slots as they are, traces read out)."""
        if self.text_trace is None:
            return memory
        m = self.cfg.memory_slots
        return torch.cat([memory[:, :m], self.text_trace.tokens(memory[:, m:])], dim=1)

    def memory_update(self, mem, avatar_audio, user_audio=None, user_video=None, user_blend=None,
                      user_present=None, text_emb=None) -> torch.Tensor:
        """One LCU update per window; every input covers the same T frames (text: (B, Dt)).

        ``user_*`` None means no user input (presence flags off); ``text_emb`` None means no transcript.
        """
        cfg = self.cfg
        mem = self._t("memory", mem, (None, cfg.memory_rows, cfg.d_model))
        b = mem.shape[0]
        avatar_audio = self._t("avatar_audio", avatar_audio, (b, None, cfg.mels_per_frame, cfg.audio_dim))
        t = avatar_audio.shape[1]
        dev = self.device
        user_audio = (torch.zeros_like(avatar_audio) if user_audio is None else
                      self._t("user_audio", user_audio, (b, t, cfg.mels_per_frame, cfg.audio_dim)))
        user_video = (torch.zeros(b, t, cfg.user_video_dim, device=dev) if user_video is None else
                      self._t("user_video", user_video, (b, t, cfg.user_video_dim)))
        user_blend = (self.motion_mean.expand(b, t, -1) if user_blend is None else
                      self._t("user_blend", user_blend, (b, t, cfg.motion_dim)))
        user_present = (torch.zeros(b, t, 3, device=dev) if user_present is None else
                        self._t("user_present", user_present, (b, t, 3)))
        if text_emb is None:
            text_emb = torch.zeros(b, cfg.transcript_dim, device=self.device)
        text_emb = self._t("text_emb", text_emb, (b, cfg.transcript_dim))
        with self._grad_ctx():
            return self._memory_step(mem, avatar_audio, user_audio, user_video, user_blend, user_present > 0.5,
                                     text_emb)

    # ----------------------------------------------------------------- sample

    def _context(self, avatar_audio, user_tok, memory, user_lengths, use_context: bool = True):
        audio_tok = self.audio_encoder(self._norm_audio(avatar_audio), lookahead=True)
        tokens = self.memory_tokens(memory)
        ctx = self.denoiser.prepare(audio_tok, tokens, user_tok, user_lengths)
        if self.text_trace is not None and use_context:
            # the traces' pooled tokens shift every non-lip token's embedding (see lcu.TextTrace)
            bias = self.text_trace.nonlip_bias(tokens[:, self.cfg.memory_slots:].mean(dim=1))   # (B, d)
            n_lip = self.cfg.region_tokens[0]
            per_token = torch.cat([bias.new_zeros(bias.shape[0], n_lip, bias.shape[1]),
                                   bias[:, None].expand(-1, self.cfg.tokens_per_frame - n_lip, -1)], dim=1)
            ctx.frame_bias = ctx.frame_bias + per_token.flatten(1)[:, None, :]
        return ctx

    @torch.no_grad()
    def sample(self, prev_motion, avatar_audio, user_audio=None, user_video=None, user_blend=None,
               user_present=None, memory=None, seeds: Sequence[int] | None = None, steps: int | None = None, *,
               return_window: bool = False, use_context: bool = True, user_guidance: float = 1.0) -> torch.Tensor:
        """Generate the S new frames of one window per session (see the module docstring).

        ``user_guidance`` g != 1: guidance on the user branch (as classifier-free guidance; training drops the
        user with probability ``user_drop``): every step predicts with and without the window's user input
        (memory kept) and uses ``without + g * (with - without)``, twice the denoiser cost. Windows without
        user input are unchanged.

        ``user_*`` may be None (no user input: the user/context branch then sees the memory only);
        ``memory`` None uses ``memory_init``; ``seeds`` None uses 0 for every item.
        ``return_window=True`` returns all W frames (the first K equal ``prev_motion``).
        ``use_context=False`` turns the user/context branch off (as in stage-1 training).

        ``prev_motion`` may hold more known frames than ``cfg.overlap_frames``: with K' known frames
        (``overlap_frames <= K' < window_frames``) the window still spans W frames and generates
        ``W - K'`` new ones. This is the low-latency streaming mode (a stride shorter than
        ``cfg.new_frames``: see :func:`echo_stream.stages.memory.window_geometry`).
        """
        cfg = self.cfg
        w, lk = cfg.window_frames, cfg.lookahead_frames
        prev = self._t("prev_motion", prev_motion, (None, None, cfg.motion_dim))
        k = prev.shape[1]
        if not cfg.overlap_frames <= k < w:
            raise ValueError(f"prev_motion: expected between {cfg.overlap_frames} and {w - 1} known frames "
                             f"(overlap_frames .. window_frames - 1), got {k}")
        b = prev.shape[0]
        u = cfg.user_frames
        avatar_audio = self._t("avatar_audio", avatar_audio, (b, w + lk, cfg.mels_per_frame, cfg.audio_dim))
        if user_present is None:
            user_present = torch.zeros(b, u, 3, device=self.device)
        user_present = self._t("user_present", user_present, (b, u, 3)) > 0.5
        zeros = torch.zeros
        user_audio = (zeros(b, u, cfg.mels_per_frame, cfg.audio_dim, device=self.device) if user_audio is None else
                      self._t("user_audio", user_audio, (b, u, cfg.mels_per_frame, cfg.audio_dim)))
        user_video = (zeros(b, u, cfg.user_video_dim, device=self.device) if user_video is None else
                      self._t("user_video", user_video, (b, u, cfg.user_video_dim)))
        user_blend = (self.motion_mean.expand(b, u, -1) if user_blend is None else
                      self._t("user_blend", user_blend, (b, u, cfg.motion_dim)))
        memory = (self.memory_init(b) if memory is None
                  else self._t("memory", memory, (b, cfg.memory_rows, cfg.d_model)))
        if seeds is None:
            seeds = [0] * b
        if len(seeds) != b:
            raise ValueError(f"seeds: expected {b} seeds (one per window), got {len(seeds)}")
        steps = cfg.sampler_steps if steps is None else int(steps)
        if not (math.isfinite(user_guidance) and user_guidance >= 0):
            raise ValueError(f"user_guidance: must be a finite number >= 0 (1 = none), got {user_guidance}")

        if use_context:
            user_any = user_present.flatten(1).any(dim=1)
            user_lengths = cfg.memory_rows + u * user_any.long()
        else:
            user_lengths = torch.zeros(b, dtype=torch.long, device=self.device)
        user_tok = self._user_tokens(user_audio, user_video, user_blend, user_present)
        ctx = self._context(avatar_audio, user_tok, memory, user_lengths, use_context)
        noise = make_noise(seeds, (w, cfg.motion_dim), device=self.device)

        cond: list = []
        guided = use_context and user_guidance != 1.0
        ctx_off = None
        if guided:
            ctx_off = self._context(avatar_audio, user_tok, memory, torch.minimum(
                user_lengths, torch.full_like(user_lengths, cfg.memory_rows)), use_context)

        def denoise(x, tau, known, mask):
            if not cond:  # known context is the same at every step: embed it once
                cond.append(self.denoiser.condition_known(known, mask, ctx))
                if guided:
                    cond.append(self.denoiser.condition_known(known, mask, ctx_off))
            x0 = self.denoiser.step(x, tau, cond[0], ctx)
            if not guided:
                return x0
            off = self.denoiser.step(x, tau, cond[1], ctx_off)
            return off + user_guidance * (x0 - off)

        # at a stride shorter than new_frames every new frame lies in the seam fade, which would drag the
        # lips towards the previous window's mouth shape: there the correction is left to non-lip channels
        seam_channels = None if k == cfg.overlap_frames else self._non_lip_channels
        x = sample_window(denoise, self.normalise_motion(prev), noise, steps, cfg.seam_blend_frames, seam_channels)
        out = self.denormalise_motion(x)
        out = torch.maximum(torch.minimum(out, self.channel_max), self.channel_min)
        out[:, :k] = prev
        return out if return_window else out[:, k:].contiguous()

    # ------------------------------------------------------------------- loss

    def _training_memory(self, batch: dict, b: int) -> torch.Tensor:
        cfg = self.cfg
        if batch.get("memory") is not None:
            mem = self._t("memory", batch["memory"], (b, cfg.memory_rows, cfg.d_model))
            return self._with_history_traces(mem, batch)
        mem = self.memory_init(b)
        if batch.get("context_avatar_audio") is None:
            return self._with_history_traces(mem, batch)
        ca = self._t("context_avatar_audio", batch["context_avatar_audio"],
                     (b, None, None, cfg.mels_per_frame, cfg.audio_dim))
        n, t = ca.shape[1], ca.shape[2]

        def get(key, tail, default):
            v = batch.get(key)
            return default if v is None else self._t(key, v, (b, n, t) + tail)

        cu_a = get("context_user_audio", (cfg.mels_per_frame, cfg.audio_dim), torch.zeros_like(ca))
        cu_v = get("context_user_video", (cfg.user_video_dim,),
                   torch.zeros(b, n, t, cfg.user_video_dim, device=self.device))
        cu_b = get("context_user_blend", (cfg.motion_dim,), self.motion_mean.expand(b, n, t, -1))
        cu_p = get("context_user_present", (3,), torch.zeros(b, n, t, 3, device=self.device)) > 0.5
        if batch.get("context_text_emb") is not None:
            text = self._t("context_text_emb", batch["context_text_emb"], (b, n, cfg.transcript_dim))
        elif batch.get("context_texts") is not None:
            texts = batch["context_texts"]
            if len(texts) != b or any(len(row) != n for row in texts):
                raise ValueError(f"context_texts: expected {b} lists of {n} strings")
            enc = self._external_text_encoder or self.transcript_encoder
            text = enc.encode([s for row in texts for s in row]).to(self.device).view(b, n, -1)
        else:
            text = torch.zeros(b, n, cfg.transcript_dim, device=self.device)
        for i in range(n):
            mem = self._memory_step(mem, ca[:, i], cu_a[:, i], cu_v[:, i], cu_b[:, i], cu_p[:, i], text[:, i])
        return self._with_history_traces(mem, batch)

    def _with_history_traces(self, mem: torch.Tensor, batch: dict) -> torch.Tensor:
        """``mem`` with its trace rows recomputed from ``context_all_texts`` (every window's text so far)."""
        texts = batch.get("context_all_texts")
        if texts is None or self.text_trace is None:
            return mem
        if len(texts) != mem.shape[0]:
            raise ValueError(f"context_all_texts: expected {mem.shape[0]} lists of strings, got {len(texts)}")
        return torch.cat([mem[:, :self.cfg.memory_slots], self.text_traces_from_history(texts)], dim=1)

    def loss(self, batch: dict, stage: int, *, vel_weight: float = 0.5, user_drop: float = 0.1,
             known_drop: float = 0.0, long_known: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Flow-matching (x0-prediction) loss on one batch of training windows.

        ``batch`` (tensors, physical units; W = window_frames, L = lookahead_frames):

        * ``motion`` (B, W, 58): the target window; its first K frames serve as the known context;
        * ``avatar_audio`` (B, W+L, 2, 83);
        * stage 2 only (absent keys mean "no user input"): ``user_audio`` (B,U,2,83), ``user_video``
          (B,U,16), ``user_blend`` (B,U,58), ``user_present`` (B,U,3) (U = ``cfg.user_frames``, ending
          with the window's last frame); and the memory, either
          ``memory`` (B,M,d) or a history rolled through the LCU with gradients:
          ``context_avatar_audio`` (B,N,T,2,83) + optional ``context_user_audio`` / ``_video`` /
          ``_blend`` / ``_present`` (B,N,T,...) + ``context_text_emb`` (B,N,Dt) or ``context_texts``
          (B lists of N strings); with transcript traces, optionally ``context_all_texts`` (B lists: the
          text of every window since the session start), from which the traces are computed in closed
          form (see ``lcu.py``), however long the history.

        Stage 1: own audio -> motion; the user/context branch is off (user_lengths = 0), no memory.
        Stage 2: full SDCM + LCU; each item's user input is dropped with probability ``user_drop`` so
        the model also learns sessions without user input; and with probability ``known_drop`` an item's
        known frames carry another item's non-lip baseline (each non-lip channel's mean over the K frames
        is swapped for that of the next item in a random rotation of the batch). At inference the known
        frames are the model's own output, which cannot hold an affect only the context knows; without
        this the model learns to copy the level of smiles, brows and head pose from the known frames
        instead of reading it from the memory. With it, the model learns to move from a plausible but
        wrong level towards the one the context implies, which over a session's windows converges.

        With probability ``long_known`` an item's window carries more known frames than
        ``overlap_frames``: K' drawn uniformly from ``[K + 1, W - 2]`` (so 2 to S - 1 new frames), the
        layout of the low-latency streaming mode (``sample`` with a longer ``prev_motion``).

        Loss = MSE(x0_hat, x) on the new frames + ``vel_weight`` * MSE of frame-to-frame differences over
        the window with the known frames in place (penalises seams and jitter); in stage 2 with
        ``cfg.user_aux_weight`` > 0, + that weight * MSE of the non-lip motion read from each frame's user
        token by the linear ``user_aux`` head (items with user input).
        """
        if stage not in (1, 2):
            raise ValueError(f"stage: must be 1 or 2, got {stage}")
        cfg = self.cfg
        k, w, lk = cfg.overlap_frames, cfg.window_frames, cfg.lookahead_frames
        target = self._t("motion", batch.get("motion"), (None, w, cfg.motion_dim))
        b = target.shape[0]
        avatar_audio = self._t("avatar_audio", batch.get("avatar_audio"),
                               (b, w + lk, cfg.mels_per_frame, cfg.audio_dim))
        x1 = self.normalise_motion(target)
        dev = self.device

        u = cfg.user_frames
        if stage == 1:
            memory = self.memory_init(b).detach()
            user_tok = torch.zeros(b, u, cfg.d_model, device=dev)
            user_lengths = torch.zeros(b, dtype=torch.long, device=dev)
        else:
            def get(key, tail, default):
                v = batch.get(key)
                return default if v is None else self._t(key, v, (b, u) + tail)

            u_a = get("user_audio", (cfg.mels_per_frame, cfg.audio_dim),
                      torch.zeros(b, u, cfg.mels_per_frame, cfg.audio_dim, device=dev))
            u_v = get("user_video", (cfg.user_video_dim,), torch.zeros(b, u, cfg.user_video_dim, device=dev))
            u_b = get("user_blend", (cfg.motion_dim,), self.motion_mean.expand(b, u, -1))
            u_p = get("user_present", (3,), torch.zeros(b, u, 3, device=dev)) > 0.5
            user_tok = self._user_tokens(u_a, u_v, u_b, u_p)
            memory = self._training_memory(batch, b)
            keep = torch.rand(b, generator=generator).to(dev) >= user_drop
            user_any = u_p.flatten(1).any(dim=1) & keep
            user_lengths = cfg.memory_rows + u * user_any.long()
        ctx = self._context(avatar_audio, user_tok, memory, user_lengths, use_context=stage == 2)

        # flow time: half uniform in [0, 1), half on the sampler's grid
        u = torch.rand(b, generator=generator)
        grid = torch.randint(0, cfg.sampler_steps, (b,), generator=generator).float() / cfg.sampler_steps
        pick = torch.rand(b, generator=generator) < 0.5
        tau = torch.where(pick, u, grid).to(dev)
        eps = torch.randn(x1.shape, generator=generator).to(dev)
        # known frames per item: K, or with probability long_known K' in [K + 1, W - 2]
        kk = torch.full((b,), k, dtype=torch.long)
        if long_known > 0 and w - 2 > k:
            longer = torch.rand(b, generator=generator) < long_known
            kk = torch.where(longer, torch.randint(k + 1, w - 1, (b,), generator=generator), kk)
        kk = kk.to(dev)
        known_m = (torch.arange(w, device=dev)[None, :] < kk[:, None])  # (B, W) bool
        km = known_m[:, :, None]
        xk = x1
        if stage == 2 and known_drop > 0 and k > 0 and b > 1:
            drop = (torch.rand(b, generator=generator) < known_drop).to(dev)
            shift = int(torch.randint(1, b, (1,), generator=generator))
            lip = torch.zeros(cfg.motion_dim, dtype=torch.bool, device=dev)
            lip[slice(*self.denoiser.ranges[0])] = True
            base = (x1 * km).sum(dim=1, keepdim=True) / kk[:, None, None].to(x1.dtype)
            swapped = x1 - base + torch.roll(base, shift, dims=0)
            xk = torch.where(drop[:, None, None] & ~lip, swapped, x1)
        tb = tau[:, None, None]
        x_tau = torch.where(km, tb * xk + (1.0 - tb) * eps, tb * x1 + (1.0 - tb) * eps)
        known = torch.where(km, xk, torch.zeros_like(x1))
        mask = known_m.to(x1.dtype)
        x0 = self.denoiser(x_tau, tau, known, mask, ctx)

        new_m = (~known_m).to(x1.dtype)[:, :, None]
        n_new = new_m.sum() * x1.shape[-1]
        fm = ((x0 - x1) ** 2 * new_m).sum() / n_new
        full = torch.where(km, x1, x0)
        vel = F.mse_loss(full[:, 1:] - full[:, :-1], x1[:, 1:] - x1[:, :-1])
        total = fm + vel_weight * vel
        aux = None
        if stage == 2 and self.user_aux is not None:
            # each frame's user token alone predicts that frame's non-lip motion (items with user input)
            pred = self.user_aux(user_tok[:, -w:])
            err = ((pred - x1) ** 2)[..., self._non_lip_channels].mean(dim=(1, 2))
            on = user_any.to(err.dtype)
            aux = (err * on).sum() / on.sum().clamp_min(1.0)
            total = total + cfg.user_aux_weight * aux
        lip = slice(*self.denoiser.ranges[0])
        lip_err = (x0[..., lip] - x1[..., lip]) ** 2 * new_m
        logs = {
            "loss": float(total.detach()),
            "fm": float(fm.detach()),
            "vel": float(vel.detach()),
            "lip_mse": float((lip_err.sum() / (new_m.sum() * lip_err.shape[-1])).detach()),
            "stage": stage,
        }
        if aux is not None:
            logs["user_aux"] = float(aux.detach())
        return total, logs
