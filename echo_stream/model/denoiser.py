"""SDCM denoiser: a diffusion transformer over region-block motion tokens.

Token layout (region-major, lips first)
---------------------------------------
A window of ``W`` frames is embedded as ``W * sum(cfg.region_tokens)`` tokens.
Each region of :data:`echo_stream.motion.REGIONS` (lips, eyes, brows, cheeks,
head) has its own input linear layer, mapping the region's channels of one
frame -- noisy motion, known-context motion and the known-context flag -- to
``region_tokens[r]`` tokens, and its own output linear layer back to the
region's channels. Tokens are laid out **region-major**::

    [ lips: frame 0 tok 0..R0-1, frame 1 ..., frame W-1 | eyes: frame 0 ... | brows | cheeks | head ]

so all lip tokens form one contiguous prefix of ``W * region_tokens[0]``
tokens. (Implementation: the per-region layers are assembled into one
block-diagonal matrix per window, giving frame-major tokens in one matmul, and a
fixed permutation puts them region-major; the known-context part is embedded
once per window, not once per sampler step.) The fused SDCM kernel processes query tokens in tiles and skips the
user branch for tiles that contain lip tokens only: with this layout every tile
but (at most) the one straddling the lip/non-lip boundary is pure. On CUDA the
lip prefix is additionally padded with dummy lip tokens up to a multiple of the
kernel's largest tile (:data:`LIP_TILE_CUDA`) inside the cross-attention call,
so lip tokens fill whole tiles; the padding rows are dropped after the call. On
CPU (torch reference path) padding would only cost time and is not done.

Per token input: region linear embedding + learned frame-position embedding
(shared with the audio / user keys, so queries and keys can align in time) +
learned region-token embedding + the frame-aligned own-audio token (projected);
with ``cfg.user_frame_bias``, + the frame-aligned user token (projected, from
zero) on non-lip tokens only (every token with ``fusion == "entangled"``) and
only for windows with user input. The user encoder's causal convolutions
(``cfg.user_dilations``) give that token the user's last second: a nod 0.2-0.6 s
after the user stops talking is a function of the frame's own user token,
which cross-attention alone (a gated, softmax-weighted read of 58 keys) did
not learn in 1,400 stage-2 steps.

Block
-----
adaLN (shift / scale / gate from the timestep embedding, one linear layer for
all blocks) around three sub-layers:

1. self-attention over all motion tokens of the window;
2. SDCM cross-attention via :func:`echo_stream.kernels.sdcm_attention`: one
   query projection; audio keys/values from the own-audio tokens; user/context
   keys/values from ``[LCU memory tokens; user tokens]`` (memory first, so
   ``user_lengths = M`` means "memory only, no user input this window" and
   ``0`` turns the branch off, as in stage-1 training); ``lip_mask`` is True on
   the lip prefix; ``gate = sigmoid(per-head bias + per-token modulation)``,
   bias initialised to ``cfg.gate_init`` (small), modulation initialised to 0.
   With ``cfg.fusion == "entangled"`` (ablation) it is one softmax over the
   concatenated audio + user/context keys for every token instead (no lip mask,
   no gate), written in plain torch;
3. MLP.

The network predicts the clean (normalised) motion ``x0`` of the whole window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import motion
from ..config import ModelConfig
from .. import kernels as _kernels
from .lcu import sinusoidal

#: largest query tile (BLOCK_M) the CUDA kernel may be tuned to; lip prefix padding target on CUDA
LIP_TILE_CUDA = 128


def region_channel_ranges() -> list[tuple[int, int]]:
    """(start, stop) of each region's channels in the motion vector (regions are contiguous, in REGIONS order)."""
    ranges = []
    for r in motion.REGIONS:
        idx = motion.REGION_SLICES[r]
        start, stop = int(idx[0]), int(idx[-1]) + 1
        assert list(idx) == list(range(start, stop)), "motion regions must be contiguous"
        ranges.append((start, stop))
    return ranges


@dataclass
class TokenLayout:
    """Where every motion token of a window sits: frame index, region-token kind, lip flag."""

    frames: int
    region_tokens: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.frames * sum(self.region_tokens)

    @property
    def lip_tokens(self) -> int:
        return self.frames * self.region_tokens[0]

    def offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.region_tokens:
            out.append(acc)
            acc += self.frames * n
        return out

    def frame_index(self) -> torch.Tensor:
        return torch.cat([torch.arange(self.frames).repeat_interleave(n) for n in self.region_tokens])

    def kind_index(self) -> torch.Tensor:
        base = [sum(self.region_tokens[:i]) for i in range(len(self.region_tokens))]
        return torch.cat([(b + torch.arange(n)).repeat(self.frames) for b, n in zip(base, self.region_tokens)])

    def frame_major_to_region_major(self) -> torch.Tensor:
        """Index n of the region-major layout -> index (frame * T + region-token kind) of the frame-major one."""
        t = sum(self.region_tokens)
        return self.frame_index() * t + self.kind_index()

    def lip_mask(self) -> torch.Tensor:
        m = torch.zeros(self.tokens, dtype=torch.bool)
        m[: self.lip_tokens] = True
        return m


@dataclass
class DenoiserContext:
    """Everything a denoiser step needs besides the noisy motion; computed once per window."""

    kv: list                      # per layer: (k_audio, v_audio, k_user, v_user), each (B, H, L, D)
    frame_bias: torch.Tensor      # (B, W, T*d) frame-aligned own-audio conditioning + frame / region-token embeddings
    audio_lengths: torch.Tensor   # (B,) int
    user_lengths: torch.Tensor    # (B,) int: memory slots + user frames present (0 = branch off)
    # the per-region input / output linear layers assembled into block-diagonal matrices (one matmul each)
    w_in_x: torch.Tensor          # (T*d, C) noisy-motion columns
    w_in_known: torch.Tensor      # (T*d, C) known-context columns
    w_in_flag: torch.Tensor       # (T*d,)   known-context flag column
    b_in: torch.Tensor            # (T*d,)
    w_out: torch.Tensor           # (C, T*d)
    b_out: torch.Tensor           # (C,)


class TimestepEmbedding(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(tau * 1000.0, self.d))


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(d, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class SDCMCrossAttention(nn.Module):
    """Decoupled cross-attention: audio branch for every token, gated user/context branch for non-lip tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.heads, self.head_dim, self.fusion = h, hd, cfg.fusion
        self.q = nn.Linear(d, h * hd)
        self.kv_audio = nn.Linear(d, 2 * h * hd)
        self.kv_user = nn.Linear(d, 2 * h * hd)
        self.out = nn.Linear(h * hd, d)
        self.gate_bias = nn.Parameter(torch.full((h,), float(cfg.gate_init)))
        self.gate_mod = nn.Linear(d, h)
        nn.init.zeros_(self.gate_mod.weight)
        nn.init.zeros_(self.gate_mod.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def keys(self, audio: torch.Tensor, user: torch.Tensor):
        """Project normalised audio tokens (B,La,d) and user/context tokens (B,Lu,d) to per-head keys/values."""
        ka, va = self._heads(self.kv_audio(audio))
        ku, vu = self._heads(self.kv_user(user))
        return ka, va, ku, vu

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """(B, H, N) user-branch gate in (0, 1)."""
        return torch.sigmoid(self.gate_mod(h) + self.gate_bias).transpose(1, 2)

    def forward(self, h: torch.Tensor, kv, lip_mask: torch.Tensor, n_lip: int, lip_pad: int,
                audio_lengths: torch.Tensor, user_lengths: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        q = self.q(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        ka, va, ku, vu = kv
        if self.fusion == "entangled":
            o = entangled_attention(q, ka, va, ku, vu, audio_lengths, user_lengths)
        else:
            gate = self.gate(h)
            if lip_pad:
                q = torch.cat([q[:, :, :n_lip], q.new_zeros(b, self.heads, lip_pad, self.head_dim), q[:, :, n_lip:]], 2)
                gate = torch.cat([gate[:, :, :n_lip], gate.new_zeros(b, self.heads, lip_pad), gate[:, :, n_lip:]], 2)
            o = _kernels.sdcm_attention(q, ka, va, ku, vu, lip_mask, gate,
                                        audio_lengths=audio_lengths, user_lengths=user_lengths)
            if lip_pad:
                o = torch.cat([o[:, :, :n_lip], o[:, :, n_lip + lip_pad:]], 2)
        return self.out(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def entangled_attention(q, ka, va, ku, vu, audio_lengths, user_lengths) -> torch.Tensor:
    """Ablation: one softmax over the concatenated audio + user/context keys (valid keys only), every token."""
    k = torch.cat([ka, ku], dim=2)
    v = torch.cat([va, vu], dim=2)
    la, lu = ka.shape[2], ku.shape[2]
    valid = torch.cat([
        torch.arange(la, device=q.device)[None, :] < audio_lengths[:, None],
        torch.arange(lu, device=q.device)[None, :] < user_lengths[:, None],
    ], dim=1)[:, None, None, :]
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * valid
    return torch.matmul(probs, v)


class DenoiserBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = SelfAttention(d, cfg.n_heads, cfg.head_dim)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.cross = SDCMCrossAttention(cfg)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.ff_mult * d), nn.GELU(), nn.Linear(cfg.ff_mult * d, d))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, kv, lip_mask, n_lip: int, lip_pad: int,
                audio_lengths, user_lengths) -> torch.Tensor:
        # mod: (B, 9, d) = shift / (1 + scale) / gate for self-attention, cross-attention, MLP
        m = mod.unsqueeze(2)
        x = torch.addcmul(x, m[:, 2], self.attn(torch.addcmul(m[:, 0], self.norm1(x), m[:, 1])))
        h = torch.addcmul(m[:, 3], self.norm2(x), m[:, 4])
        x = torch.addcmul(x, m[:, 5], self.cross(h, kv, lip_mask, n_lip, lip_pad, audio_lengths, user_lengths))
        x = torch.addcmul(x, m[:, 8], self.mlp(torch.addcmul(m[:, 6], self.norm3(x), m[:, 7])))
        return x


class SDCMDenoiser(nn.Module):
    """x0-predicting diffusion transformer over region-major motion tokens of one window."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.d = d
        self.layout = TokenLayout(cfg.window_frames, tuple(cfg.region_tokens))
        self.ranges = region_channel_ranges()
        if len(cfg.region_tokens) != len(self.ranges):
            raise ValueError(f"region_tokens: expected {len(self.ranges)} entries (one per region "
                             f"{', '.join(motion.REGIONS)}), got {len(cfg.region_tokens)}")
        spans = list(zip(self.ranges, cfg.region_tokens))
        self.embed = nn.ModuleList(nn.Linear(2 * (e - s) + 1, n * d) for (s, e), n in spans)
        self.unembed = nn.ModuleList(nn.Linear(n * d, e - s) for (s, e), n in spans)
        self.frame_pos = nn.Parameter(torch.randn(cfg.window_frames, d) * 0.02)
        self.kind_emb = nn.Parameter(torch.randn(sum(cfg.region_tokens), d) * 0.02)
        self.t_embed = TimestepEmbedding(d)
        # context token preparation
        self.audio_type = nn.Parameter(torch.randn(d) * 0.02)
        self.user_type = nn.Parameter(torch.randn(d) * 0.02)
        self.mem_in = nn.Linear(d, d)
        self.mem_pos = nn.Parameter(torch.randn(cfg.memory_slots, d) * 0.02)
        self.audio_norm = nn.LayerNorm(d)
        self.user_norm = nn.LayerNorm(d)
        self.audio_add = nn.Linear(d, d)
        self.blocks = nn.ModuleList(DenoiserBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(d, elementwise_affine=False)
        # one adaLN projection for all blocks (9 x d each) and the final layer (shift, scale)
        self.n_mod = 9 * cfg.n_layers + 2
        self.ada = nn.Linear(d, self.n_mod * d)
        nn.init.zeros_(self.ada.weight)
        with torch.no_grad():
            # rows (per block): shift, 1+scale, gate for each of the 3 sub-layers; then final shift, 1+scale.
            # scales are stored as (1 + scale): bias 1; residual gates open at init: bias 1.
            bias = torch.zeros(self.n_mod, d)
            for i in range(cfg.n_layers):
                for j in (1, 2, 4, 5, 7, 8):
                    bias[9 * i + j] = 1.0
            bias[-1] = 1.0
            self.ada.bias.copy_(bias.flatten())
        perm = self.layout.frame_major_to_region_major()
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=False)
        self.register_buffer("lip_mask", self.layout.lip_mask(), persistent=False)
        #: lip-prefix padding inside the SDCM call: None = automatic (LIP_TILE_CUDA on CUDA, none on CPU)
        self.lip_tile: int | None = None
        # positions of the user frames before the window (the window's own frames share frame_pos with the
        # queries, so a query and the user frame at the same time carry the same position)
        self.user_hist_pos = (nn.Parameter(torch.randn(cfg.user_history_frames, d) * 0.02)
                              if cfg.user_history_frames else None)
        # frame-aligned user conditioning (cfg.user_frame_bias), from zero: an untrained path changes nothing
        self.user_add = nn.Linear(d, d) if cfg.user_frame_bias else None
        if self.user_add is not None:
            nn.init.zeros_(self.user_add.weight)
            nn.init.zeros_(self.user_add.bias)
            per_token = torch.ones(sum(cfg.region_tokens), 1)
            if cfg.fusion == "sdcm":
                per_token[:cfg.region_tokens[0]] = 0.0       # lip tokens: own audio only
            self.register_buffer("user_add_tokens", per_token, persistent=False)

    # -- context ---------------------------------------------------------------

    def prepare(self, audio_tok: torch.Tensor, memory: torch.Tensor, user_tok: torch.Tensor,
                user_lengths: torch.Tensor, audio_lengths: torch.Tensor | None = None) -> DenoiserContext:
        """Per-layer keys/values for one window: audio (B,W,d), memory (B,M,d), user (B,U,d) (``U =
        cfg.user_frames``: ``cfg.user_history_frames`` before the window, then the window's W frames)."""
        b, w, _ = audio_tok.shape
        if w != self.cfg.window_frames:
            raise ValueError(f"audio tokens: expected {self.cfg.window_frames} frames, got {w}")
        a = self.audio_norm(audio_tok + self.frame_pos + self.audio_type)
        mem_pos = self.mem_pos
        if memory.shape[1] > mem_pos.shape[0]:  # transcript-trace tokens carry their own embedding
            mem_pos = torch.cat([mem_pos, mem_pos.new_zeros(memory.shape[1] - mem_pos.shape[0], mem_pos.shape[1])])
        user_pos = self.frame_pos if self.user_hist_pos is None else torch.cat([self.user_hist_pos, self.frame_pos])
        if user_tok.shape[1] != user_pos.shape[0]:
            raise ValueError(f"user tokens: expected {user_pos.shape[0]} frames (user_frames), got {user_tok.shape[1]}")
        u = self.user_norm(torch.cat([self.mem_in(memory) + mem_pos,
                                      user_tok + user_pos + self.user_type], dim=1))
        kv = [blk.cross.keys(a, u) for blk in self.blocks]
        if audio_lengths is None:
            audio_lengths = torch.full((b,), w, dtype=torch.long, device=audio_tok.device)
        frame_bias = self.audio_add(audio_tok).unsqueeze(2) + self.frame_pos[:, None, :] + self.kind_emb
        if self.user_add is not None:
            # the user's frame-aligned tokens (the window's W frames), only for items with user input
            on = (user_lengths > memory.shape[1]).to(user_tok.dtype)[:, None, None, None]
            ub = self.user_add(user_tok[:, -w:]).unsqueeze(2) * self.user_add_tokens
            frame_bias = frame_bias + on * ub
        frame_bias = frame_bias.flatten(2)
        widths = [e - s for s, e in self.ranges]
        w_in = [lin.weight for lin in self.embed]
        return DenoiserContext(
            kv=kv, frame_bias=frame_bias,
            audio_lengths=audio_lengths, user_lengths=user_lengths.to(torch.long),
            w_in_x=torch.block_diag(*[wt[:, :c] for wt, c in zip(w_in, widths)]),
            w_in_known=torch.block_diag(*[wt[:, c:2 * c] for wt, c in zip(w_in, widths)]),
            w_in_flag=torch.cat([wt[:, 2 * c] for wt, c in zip(w_in, widths)]),
            b_in=torch.cat([lin.bias for lin in self.embed]),
            w_out=torch.block_diag(*[lin.weight for lin in self.unembed]),
            b_out=torch.cat([lin.bias for lin in self.unembed]),
        )

    # -- tokens ----------------------------------------------------------------
    # Region r's input layer maps [noisy x_r, known_r, flag] of one frame to region_tokens[r] tokens; with
    # regions and channels both in REGIONS order, all of them together are one block-diagonal matmul giving
    # (B, W, T*d) in frame-major order [frame][region token]; `perm` reorders that to the region-major layout.

    def condition_known(self, known: torch.Tensor, known_mask: torch.Tensor, ctx: DenoiserContext) -> torch.Tensor:
        """The part of the token embeddings that does not change across sampler steps: (B, W, T*d)."""
        flag = known_mask.to(known.dtype).unsqueeze(-1)
        return torch.addcmul(F.linear(known, ctx.w_in_known, ctx.b_in) + ctx.frame_bias, flag, ctx.w_in_flag)

    def tokens_in(self, x_t: torch.Tensor, cond: torch.Tensor, ctx: DenoiserContext) -> torch.Tensor:
        b, w, _ = x_t.shape
        e = F.linear(x_t, ctx.w_in_x) + cond
        return e.view(b, -1, self.d)[:, self.perm]

    def tokens_out(self, h: torch.Tensor, ctx: DenoiserContext) -> torch.Tensor:
        b = h.shape[0]
        return F.linear(h[:, self.inv_perm].reshape(b, self.cfg.window_frames, -1), ctx.w_out, ctx.b_out)

    def _lip_pad(self, device: torch.device) -> int:
        tile = self.lip_tile if self.lip_tile is not None else (LIP_TILE_CUDA if device.type == "cuda" else 0)
        if not tile or self.cfg.fusion != "sdcm":
            return 0
        return (-self.layout.lip_tokens) % tile

    def lip_args(self, device: torch.device) -> tuple[torch.Tensor, int, int]:
        """(lip_mask over the padded query rows, number of lip tokens, padding rows) for the SDCM call."""
        n_lip = self.layout.lip_tokens
        pad = self._lip_pad(device)
        lip_mask = self.lip_mask
        if pad:
            lip_mask = torch.cat([lip_mask[:n_lip], lip_mask.new_ones(pad), lip_mask[n_lip:]])
        return lip_mask, n_lip, pad

    # -- forward ---------------------------------------------------------------

    def forward(self, x_t: torch.Tensor, tau: torch.Tensor, known: torch.Tensor, known_mask: torch.Tensor,
                ctx: DenoiserContext) -> torch.Tensor:
        """Predict clean normalised motion (B, W, C) from noisy ``x_t`` at flow time ``tau`` (B,) in [0, 1].

        ``known`` (B, W, C): known-context motion (zeros where unknown), ``known_mask`` (B, W): 1 on known frames.
        """
        return self.step(x_t, tau, self.condition_known(known, known_mask, ctx), ctx)

    def step(self, x_t: torch.Tensor, tau: torch.Tensor, cond: torch.Tensor, ctx: DenoiserContext) -> torch.Tensor:
        """``forward`` with the known-context part precomputed by :meth:`condition_known` (sampler steps)."""
        b = x_t.shape[0]
        # adaLN parameters of every block; scale rows hold (1 + scale) thanks to the bias init below
        mods = self.ada(F.silu(self.t_embed(tau))).view(b, self.n_mod, self.d)
        x = self.tokens_in(x_t, cond, ctx)
        lip_mask, n_lip, pad = self.lip_args(x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, mods[:, 9 * i: 9 * i + 9], ctx.kv[i], lip_mask, n_lip, pad,
                    ctx.audio_lengths, ctx.user_lengths)
        h = torch.addcmul(mods[:, -2].unsqueeze(1), self.norm_f(x), mods[:, -1].unsqueeze(1))
        return self.tokens_out(h, ctx)
