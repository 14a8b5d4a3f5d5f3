"""LCU -- Long-range Contextual Understanding: the bounded per-session context memory.

State
-----
One session's state is a ``(M + R, d_model)`` float32 tensor (``M = cfg.memory_slots``
behaviour slots, ``R`` transcript traces, below), whatever the session length; a
batch of sessions is ``(B, M + R, d_model)``. Every slot value stays inside [-1, 1] (initial slots and every update candidate go
through ``tanh`` and the update is a convex combination).

Update (once per generation window)
-----------------------------------
1. **Summarise** the window: ``cfg.memory_summary_tokens`` learned queries
   attention-pool over the window's own-audio tokens, user tokens (frames where
   the user is absent are masked out) and the transcript embedding (one
   token), each tagged with a type embedding and a sinusoidal in-window frame
   position.
2. **Write**: the memory slots (plus a learned slot identity embedding)
   cross-attend to ``[memory; summaries]``, and a GRU-style gated residual
   update mixes the result in::

       z = sigmoid(W_z [m, a] + b_z[slot])         # update gate
       r = sigmoid(W_r [m, a])                      # reset gate
       c = tanh(W_c [r * m, a])                     # candidate
       m' = (1 - z) * m + z * c

   ``b_z`` is per slot and initialised on a spread of time scales, from
   ``sigmoid(-1) = 0.27`` (fast slots) down to ``sigmoid(-5) = 0.007`` (slow
   slots: half-life ~100 windows, about a minute at 0.64 s per window), so old
   context decays slowly and information from dozens of windows back (30 s and
   more) persists in the slow slots.

Transcript traces
-----------------
Behaviour slots learn what to keep through a recurrence; trained with truncated
back-propagation, they cannot learn to keep what was *said* a minute ago (no
gradient reaches that far). So the state also holds ``R = cfg.text_traces``
transcript traces, one per decay factor ``lambda_r`` in ``cfg.text_trace_decays``
(tiny: 0.9 per window, ~4 s half-life, and 0.998, ~3.7 min). With ``e_j`` the
transcript embedding of window ``j`` (zeros when nothing was said), ``c_j = 1``
when it is not all zeros, and a learned salience ``a_j = sigmoid(u . e_j + b)``::

    s_r <- lambda_r * s_r + a_j * c_j * e_j        w_r <- lambda_r * w_r + a_j * c_j

The read-out ``s_r / max(w_r, 1)`` is a salience-weighted, slowly forgetting mean
of what has been said; a small MLP turns each trace into one memory token. The
trace tokens sit among the memory tokens of SDCM's gated context branch, and
their mean, through one linear layer (zero at init), is also added to the input
embedding of every *non-lip* motion token: the affect a conversation
established is a global setting of brows, smiles and head, and that direct path
learns it in a few hundred steps where attention to 2 of ~40 gated keys did
not. Lip tokens never receive it. The
recurrence has no parameters of its own (``a_j`` depends on the text alone), so
training computes the same traces in closed form over a conversation's whole
past, with gradients to the transcript encoder, the salience and the read-out
however long ago the text came (:meth:`TextTrace.closed_form`; a test checks it
equals the recurrence).

State layout: one ``(M + R, d_model)`` tensor, ``M = cfg.memory_slots`` slot rows
then ``R`` trace rows holding ``[s_r (transcript_dim values), w_r, 0 ...]``
(so ``transcript_dim < d_model``). :meth:`EchoModel.memory_update` updates both
parts; the denoiser sees the slots and the traces' tokens.

The memory tokens condition generation as extra keys of the user/context branch
of SDCM (see ``denoiser.py``).

Serialisation
-------------
:class:`MemoryState` holds one session's memory and update count.
``to_bytes()`` writes safetensors bytes (tensor ``memory``) with JSON-able
metadata (format, config name, slots, d_model, steps and a SHA-256 of the tensor
bytes); ``from_bytes()`` restores it bit for bit and raises
:class:`MemoryStateError` (a :class:`~echo_stream.errors.CheckpointError`) on
corrupt bytes, a checksum mismatch or a shape / config that does not match the
model.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError

MEMORY_FORMAT = "echo-stream/lcu-memory"
MEMORY_FORMAT_VERSION = "1"


class MemoryStateError(CheckpointError):
    """A serialised context-memory state cannot be restored (corrupt, or for another model)."""


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sinusoidal embedding of (...,) positions -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    ang = positions.to(torch.float32)[..., None] * freqs
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class CrossAttention(nn.Module):
    """Plain multi-head cross-attention with an optional key validity mask (B, Lk)."""

    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q = nn.Linear(d, heads * head_dim)
        self.kv = nn.Linear(d, 2 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, _ = x.shape
        lk = ctx.shape[1]
        q = self.q(x).view(b, lq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(ctx).view(b, lk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, lq, self.heads * self.head_dim))


class ContextMemory(nn.Module):
    """The LCU memory: ``init(B)`` and ``forward(memory, audio_tok, user_tok, user_valid, text_emb) -> memory``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, m, s = cfg.d_model, cfg.memory_slots, cfg.memory_summary_tokens
        self.d_model, self.slots, self.summary_tokens = d, m, s
        self.slot_init = nn.Parameter(torch.randn(m, d) * 0.5)
        self.slot_emb = nn.Parameter(torch.randn(m, d) * 0.02)
        self.type_emb = nn.Parameter(torch.randn(3, d) * 0.02)  # own audio, user, transcript
        self.text_proj = nn.Linear(cfg.transcript_dim, d)
        self.summary_queries = nn.Parameter(torch.randn(s, d) * 0.02)
        self.pool_norm = nn.LayerNorm(d)
        self.pool = CrossAttention(d, cfg.n_heads, cfg.head_dim)
        self.pool_mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.write_q_norm = nn.LayerNorm(d)
        self.write_kv_norm = nn.LayerNorm(d)
        self.write = CrossAttention(d, cfg.n_heads, cfg.head_dim)
        self.gate_z = nn.Linear(2 * d, d)
        self.gate_r = nn.Linear(2 * d, d)
        self.cand = nn.Linear(2 * d, d)
        #: per-slot update-gate bias: a spread of time scales (fast .. slow slots)
        self.z_bias = nn.Parameter(torch.linspace(-1.0, -5.0, m)[:, None].repeat(1, d).contiguous())

    def init(self, batch: int) -> torch.Tensor:
        return torch.tanh(self.slot_init).unsqueeze(0).expand(batch, -1, -1).clone()

    def summarise(self, audio_tok: torch.Tensor, user_tok: torch.Tensor, user_valid: torch.Tensor,
                  text_emb: torch.Tensor) -> torch.Tensor:
        b, t, d = audio_tok.shape
        pos = sinusoidal(torch.arange(t, device=audio_tok.device), d)
        keys = torch.cat([
            audio_tok + pos + self.type_emb[0],
            user_tok + pos + self.type_emb[1],
            (self.text_proj(text_emb) + self.type_emb[2]).unsqueeze(1),
        ], dim=1)
        valid = torch.cat([
            torch.ones(b, t, dtype=torch.bool, device=audio_tok.device),
            user_valid.to(torch.bool),
            torch.ones(b, 1, dtype=torch.bool, device=audio_tok.device),
        ], dim=1)
        q = self.summary_queries.unsqueeze(0).expand(b, -1, -1)
        s = q + self.pool(q, self.pool_norm(keys), valid)
        return s + self.pool_mlp(s)

    def forward(self, memory: torch.Tensor, audio_tok: torch.Tensor, user_tok: torch.Tensor,
                user_valid: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        summaries = self.summarise(audio_tok, user_tok, user_valid, text_emb)
        kv = self.write_kv_norm(torch.cat([memory, summaries], dim=1))
        a = self.write(self.write_q_norm(memory + self.slot_emb), kv)
        ma = torch.cat([memory, a], dim=-1)
        z = torch.sigmoid(self.gate_z(ma) + self.z_bias)
        r = torch.sigmoid(self.gate_r(ma))
        c = torch.tanh(self.cand(torch.cat([r * memory, a], dim=-1)))
        return (1.0 - z) * memory + z * c


class TextTrace(nn.Module):
    """The LCU transcript traces (see the module docstring): update, closed form, and read-out tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, dt = cfg.d_model, cfg.transcript_dim
        self.dt = dt
        self.register_buffer("decays", torch.tensor(cfg.text_trace_decays, dtype=torch.float32), persistent=False)
        self.salience = nn.Linear(dt, 1)
        self.read = nn.Sequential(nn.LayerNorm(dt), nn.Linear(dt, d), nn.GELU(), nn.Linear(d, d))
        self.trace_emb = nn.Parameter(torch.randn(cfg.text_traces, d) * 0.02)
        #: the traces' tokens, pooled, also shift the embedding of every non-lip motion token (zero at init)
        self.nonlip_bias = nn.Linear(d, d)
        nn.init.zeros_(self.nonlip_bias.weight)
        nn.init.zeros_(self.nonlip_bias.bias)

    @property
    def rows(self) -> int:
        return int(self.decays.numel())

    def _weighted(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., Dt) embeddings -> salience-weighted embeddings (..., Dt) and weights (..., 1)."""
        said = (emb != 0).any(dim=-1, keepdim=True).to(emb.dtype)
        a = torch.sigmoid(self.salience(emb)) * said
        return a * emb, a

    def update(self, traces: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """One window: traces (B, R, d) and the window's transcript embedding (B, Dt) -> traces."""
        ae, a = self._weighted(emb)
        lam = self.decays[None, :, None]
        s = lam * traces[..., :self.dt] + ae[:, None, :]
        w = lam * traces[..., self.dt:self.dt + 1] + a[:, None, :]
        return torch.cat([s, w, torch.zeros_like(traces[..., self.dt + 1:])], dim=-1)

    def closed_form(self, emb: torch.Tensor, valid: torch.Tensor, d_model: int) -> torch.Tensor:
        """Traces after windows ``0..N-1`` from zeros: emb (B, N, Dt), valid (B, N) -> (B, R, d).

        Item ``b``'s windows are the first ``valid[b].sum()`` positions (the rest is padding); equal to
        applying :meth:`update` window by window, with gradients to every embedding.
        """
        n_valid = valid.sum(dim=1, keepdim=True)                                   # (B, 1)
        age = (n_valid - 1 - torch.arange(emb.shape[1], device=emb.device)[None]).clamp_min(0)  # (B, N)
        lam = self.decays[None, :, None] ** age[:, None, :].to(emb.dtype)          # (B, R, N)
        lam = lam * valid[:, None, :].to(emb.dtype)
        ae, a = self._weighted(emb)
        s = torch.einsum("brn,bnd->brd", lam, ae)
        w = torch.einsum("brn,bnd->brd", lam, a)
        pad = emb.new_zeros(emb.shape[0], self.rows, d_model - self.dt - 1)
        return torch.cat([s, w, pad], dim=-1)

    def tokens(self, traces: torch.Tensor) -> torch.Tensor:
        """(B, R, d) trace rows -> (B, R, d) memory tokens."""
        mean = traces[..., :self.dt] / traces[..., self.dt:self.dt + 1].clamp_min(1.0)
        return self.read(mean) + self.trace_emb


# ----------------------------------------------------------------------------
# Serialisable per-session state
# ----------------------------------------------------------------------------


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class MemoryState:
    """One session's context memory: ``memory`` (M + R, d_model) float32, ``steps`` updates so far."""

    memory: torch.Tensor
    config_name: str
    steps: int = 0

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        mem = self.memory.detach().to("cpu", torch.float32).contiguous()
        if mem.dim() != 2:
            raise ValueError(f"memory: expected one session's (rows, d_model) tensor, got shape {tuple(mem.shape)}")
        meta = {
            "format": MEMORY_FORMAT,
            "version": MEMORY_FORMAT_VERSION,
            "config": self.config_name,
            "slots": str(mem.shape[0]),
            "d_model": str(mem.shape[1]),
            "steps": str(int(self.steps)),
            "sha256": _digest(mem),
        }
        return save({"memory": mem}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, config: ModelConfig | None = None) -> "MemoryState":
        """Restore a state written by :meth:`to_bytes`; with ``config``, check it fits that model."""
        from safetensors.torch import load

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MemoryStateError(f"memory state: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        try:
            tensors = load(data)
            meta = _read_metadata(data)
        except MemoryStateError:
            raise
        except Exception as e:  # safetensors raises several error types on garbage
            raise MemoryStateError(f"memory state: corrupt bytes ({len(data)} bytes): {e}") from None
        if meta.get("format") != MEMORY_FORMAT:
            raise MemoryStateError(f"memory state: not an echo-stream LCU memory (format {meta.get('format')!r})")
        if set(tensors) != {"memory"}:
            raise MemoryStateError(f"memory state: expected one tensor 'memory', found {sorted(tensors)}")
        mem = tensors["memory"]
        if mem.dtype != torch.float32 or mem.dim() != 2:
            raise MemoryStateError(f"memory state: expected a float32 (slots, d_model) tensor, "
                                   f"got {mem.dtype} {tuple(mem.shape)}")
        if meta.get("sha256") != _digest(mem):
            raise MemoryStateError("memory state: corrupt bytes (checksum mismatch)")
        try:
            steps = int(meta.get("steps", "0"))
        except ValueError:
            raise MemoryStateError(f"memory state: bad step count {meta.get('steps')!r}") from None
        name = meta.get("config", "")
        if config is not None:
            want = (config.memory_rows, config.d_model)
            if tuple(mem.shape) != want:
                raise MemoryStateError(f"memory state: shape {tuple(mem.shape)} does not match model config "
                                       f"'{config.name}' (memory_slots + text_traces, d_model) = {want}")
            if name != config.name:
                raise MemoryStateError(f"memory state: written for config '{name}', model config is '{config.name}'")
        return cls(memory=mem, config_name=name, steps=steps)

    @staticmethod
    def stack(states: list["MemoryState"]) -> torch.Tensor:
        """(B, M, d) batch of the states' memories."""
        return torch.stack([s.memory for s in states])


def _read_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes (header: u64 little-endian length + JSON)."""
    if len(data) < 8:
        raise MemoryStateError(f"memory state: corrupt bytes (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise MemoryStateError("memory state: corrupt bytes (bad header length)")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise MemoryStateError("memory state: corrupt bytes (bad metadata)")
    return meta
