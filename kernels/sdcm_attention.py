"""SDCM decoupled cross-attention: fused Triton forward, torch reference, dispatch.

The op
------
``sdcm_attention(q, k_audio, v_audio, k_user, v_user, lip_mask, gate)`` computes::

    out = softmax(q k_audio^T * scale) v_audio
        + (~lip_mask) * gate * softmax(q k_user^T * scale) v_user

with each softmax taken over that branch's valid keys only. Shapes:

* ``q``: (B, H, Lq, D); ``out`` has the shape, dtype and device of ``q``.
* ``k_audio``/``v_audio``: (B, H, La, D); ``k_user``/``v_user``: (B, H, Lu, D).
* ``lip_mask``: bool, broadcastable to (B, Lq). True marks a lip-region query
  token: lip tokens see the audio branch only.
* ``gate``: floating point, broadcastable to (B, H, Lq).
* ``audio_lengths``/``user_lengths``: optional integer (B,). Keys at or beyond an
  item's length do not exist for that item. Values are clamped to [0, L]; a
  length of 0 makes that branch contribute exactly 0 (never NaN).
* ``scale`` defaults to ``D ** -0.5``.

The fused kernel
----------------
One launch computes both branches. A program owns a tile of ``BLOCK_M`` query
tokens of one (batch, head): it reads its q tile once, runs a float32 online
softmax (``exp2`` with the scale folded into ``scale * log2(e)``) over the audio
keys and then over the user keys, blends the two in registers and writes the
output tile once. Key loops stop at the item's length, so padded keys cost no
work, and a tile whose query tokens are all lip tokens skips the user branch
entirely (no user key/value is loaded).

Token layout for the lip fast path
----------------------------------
The skip only pays off when lip tokens fill whole query tiles. Callers that
control the token order should lay tokens out *region-major*: all lip-region
tokens first, padded up to a multiple of the tile size (128 covers every
autotuned ``BLOCK_M``; 16 under the interpreter), then the remaining tokens.
Padding tokens should be marked as lip tokens (their outputs are discarded), so
that the padded lip prefix consists of full all-lip tiles. Mixed tiles are
still correct, they just run both branches.

Dispatch
--------
``sdcm_attention`` runs the Triton kernel on CUDA tensors and the torch
reference on CPU tensors. When ``TRITON_INTERPRET=1`` is set (read at every
call, through ``triton.knobs`` where available) the Triton kernel itself runs
on CPU through Triton's interpreter, with a single small tile config.

Triton decides compiled-vs-interpreted per ``@triton.jit`` function when it is
decorated, and its own standard library (``tl.sum``, ``tl.max``, ``tl.zeros``)
is decorated when ``triton.language`` is first imported. So the interpreter only
works in a process where ``TRITON_INTERPRET=1`` was set before triton was
imported; a mismatch raises a ``RuntimeError`` that says so. This module's own
kernel is wrapped lazily for the mode of the call (``JITFunction`` or
``InterpretedFunction``), so importing this module earlier or later changes
nothing. Triton is optional: without it everything runs on the reference.
Inputs the kernel does not cover (D not in {32, 64, 128}, float64) also fall
back to the reference.

Autotuning
----------
On the GPU the kernel is autotuned over Hopper-oriented configs, keyed on the
head dim, power-of-two buckets of Lq/La/Lu and the input dtypes. Each newly
tuned key is logged at INFO on the ``echo_stream.kernels.sdcm_attention``
logger; ``TRITON_PRINT_AUTOTUNING=1`` makes Triton print it too.

Gradients
---------
The backward pass recomputes the op through the reference under autograd, so
q, k/v of both branches and ``gate`` get gradients.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple, Optional

import torch

try:  # Triton is optional: the reference path works without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["sdcm_attention", "sdcm_attention_reference", "SUPPORTED_HEAD_DIMS", "KERNEL_DTYPES"]

logger = logging.getLogger(__name__)

SUPPORTED_HEAD_DIMS = (32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

# Single small tile used under TRITON_INTERPRET (autotuning there is far too slow).
INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = 16


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------


class _Dims(NamedTuple):
    batch: int
    heads: int
    len_q: int
    len_audio: int
    len_user: int
    head_dim: int


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _check_rank4(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d tensor (B, H, L, D), got shape {tuple(t.shape)}")


def _check_same_device(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"{name}: on device {t.device}, but q is on {q.device}")


def _check_kv_pair(prefix: str, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> int:
    """Validate one branch's keys/values against q; return its key length."""
    b, h, _, d = q.shape
    for name, t in ((f"k_{prefix}", k), (f"v_{prefix}", v)):
        _require_tensor(name, t)
        _check_rank4(name, t)
        _check_same_device(name, t, q)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {q.dtype}")
        if t.shape[0] != b or t.shape[1] != h:
            raise ValueError(f"{name}: batch/heads {tuple(t.shape[:2])} do not match q's {(b, h)}")
        if t.shape[3] != d:
            raise ValueError(f"{name}: head dim {t.shape[3]} does not match q's head dim {d}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v_{prefix}: length {v.shape[2]} does not match k_{prefix}'s length {k.shape[2]}")
    return k.shape[2]


def _check_broadcastable(name: str, t: torch.Tensor, target: tuple) -> None:
    try:
        shape = torch.broadcast_shapes(tuple(t.shape), target)
    except RuntimeError:
        shape = None
    if shape != target:
        raise ValueError(f"{name}: shape {tuple(t.shape)} is not broadcastable to {target}")


def _check_lengths(name: str, lengths, q: torch.Tensor) -> None:
    if lengths is None:
        return
    _require_tensor(name, lengths)
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"{name}: expected an integer tensor, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (q.shape[0],):
        raise ValueError(f"{name}: expected shape ({q.shape[0]},), got {tuple(lengths.shape)}")
    _check_same_device(name, lengths, q)


def _as_gate_tensor(gate, q: torch.Tensor) -> torch.Tensor:
    if isinstance(gate, (int, float)) and not isinstance(gate, bool):
        return torch.tensor(float(gate), dtype=torch.float32, device=q.device)
    return _require_tensor("gate", gate)


def _check_inputs(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths, user_lengths) -> _Dims:
    """Check shapes, dtypes and devices up front; errors name the argument."""
    _require_tensor("q", q)
    _check_rank4("q", q)
    if not q.is_floating_point():
        raise TypeError(f"q: expected a floating point dtype, got {q.dtype}")
    if q.shape[3] == 0:
        raise ValueError("q: head dim must be at least 1")
    len_audio = _check_kv_pair("audio", k_audio, v_audio, q)
    len_user = _check_kv_pair("user", k_user, v_user, q)
    b, h, lq, d = q.shape

    _require_tensor("lip_mask", lip_mask)
    if lip_mask.dtype != torch.bool:
        raise TypeError(f"lip_mask: expected dtype torch.bool, got {lip_mask.dtype}")
    _check_broadcastable("lip_mask", lip_mask, (b, lq))
    _check_same_device("lip_mask", lip_mask, q)

    _require_tensor("gate", gate)
    if not gate.is_floating_point():
        raise TypeError(f"gate: expected a floating point dtype, got {gate.dtype}")
    _check_broadcastable("gate", gate, (b, h, lq))
    _check_same_device("gate", gate, q)

    _check_lengths("audio_lengths", audio_lengths, q)
    _check_lengths("user_lengths", user_lengths, q)
    return _Dims(b, h, lq, len_audio, len_user, d)


def _default_scale(scale: Optional[float], head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------
# Reference (plain torch, computed in the input dtype)
# ----------------------------------------------------------------------------


def _branch_reference(q, k, v, lengths, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the valid keys; a branch with no key gives 0."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if lengths is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    positions = torch.arange(k.shape[2], device=k.device)
    valid = (positions[None, :] < lengths.to(torch.long)[:, None])[:, None, None, :]
    # finfo.min (not -inf) keeps fully masked rows finite; the final `* valid`
    # zeroes them, and exp(min - max) is exactly 0 for partially masked rows.
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * valid
    return torch.matmul(probs, v)


def _reference_forward(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths, user_lengths, scale):
    b, h, lq, _ = q.shape
    out_audio = _branch_reference(q, k_audio, v_audio, audio_lengths, scale)
    out_user = _branch_reference(q, k_user, v_user, user_lengths, scale)
    keep = (~lip_mask).expand(b, lq)[:, None, :, None]
    weight = gate.expand(b, h, lq)[..., None] * keep
    return out_audio + (weight * out_user).to(q.dtype)


def sdcm_attention_reference(
    q: torch.Tensor,
    k_audio: torch.Tensor,
    v_audio: torch.Tensor,
    k_user: torch.Tensor,
    v_user: torch.Tensor,
    lip_mask: torch.Tensor,
    gate,
    *,
    audio_lengths: Optional[torch.Tensor] = None,
    user_lengths: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The SDCM op written plainly in torch (see the module docstring)."""
    gate = _as_gate_tensor(gate, q) if isinstance(q, torch.Tensor) else gate
    dims = _check_inputs(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths, user_lengths)
    return _reference_forward(
        q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths, user_lengths,
        _default_scale(scale, dims.head_dim),
    )


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------
# The kernel is kept as a plain Python function and wrapped lazily (see
# `_kernel_for_mode`), so that one process can run it compiled on a GPU or
# through the interpreter on CPU, whatever TRITON_INTERPRET was at import time.
# It calls no other jit function for the same reason.


def _sdcm_fwd_kernel(
    Q, K_A, V_A, K_U, V_U, LIP, GATE, LEN_A, LEN_U, OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kab, stride_kah, stride_kan, stride_kad,
    stride_vab, stride_vah, stride_van, stride_vad,
    stride_kub, stride_kuh, stride_kun, stride_kud,
    stride_vub, stride_vuh, stride_vun, stride_vud,
    stride_ob, stride_oh, stride_om, stride_od,
    H, LQ, qk_scale,
    LQ_BUCKET, LA_BUCKET, LU_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    # ---- audio branch: every query token attends to the audio keys ----------
    len_a = tl.load(LEN_A + off_b)
    ka_base = K_A + off_b * stride_kab + off_h * stride_kah
    va_base = V_A + off_b * stride_vab + off_h * stride_vah
    m_a = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, len_a, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < len_a
        k_t = tl.load(ka_base + cols[None, :] * stride_kan + offs_d[:, None] * stride_kad,
                      mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_a, tl.max(s, 1))
        alpha = tl.math.exp2(m_a - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_a = l_a * alpha + tl.sum(p, 1)
        v = tl.load(va_base + cols[:, None] * stride_van + offs_d[None, :] * stride_vad,
                    mask=col_ok[:, None], other=0.0)
        acc_a = acc_a * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_a = m_new

    # ---- user branch: only non-lip tokens; all-lip tiles skip it ------------
    lip = tl.load(LIP + off_b * LQ + offs_m, mask=row_ok, other=1)
    user_rows = (lip == 0) & row_ok
    n_user_rows = tl.sum(user_rows.to(tl.int32), 0)
    len_u = tl.load(LEN_U + off_b)
    hi_u = tl.where(n_user_rows > 0, len_u, 0)
    ku_base = K_U + off_b * stride_kub + off_h * stride_kuh
    vu_base = V_U + off_b * stride_vub + off_h * stride_vuh
    m_u = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_u = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, hi_u, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi_u
        k_t = tl.load(ku_base + cols[None, :] * stride_kun + offs_d[:, None] * stride_kud,
                      mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_u, tl.max(s, 1))
        alpha = tl.math.exp2(m_u - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_u = l_u * alpha + tl.sum(p, 1)
        v = tl.load(vu_base + cols[:, None] * stride_vun + offs_d[None, :] * stride_vud,
                    mask=col_ok[:, None], other=0.0)
        acc_u = acc_u * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_u = m_new

    # ---- blend and write once ------------------------------------------------
    # l == 0 only when a branch saw no key (length 0 or skipped): its acc is 0.
    out_a = acc_a / tl.where(l_a > 0.0, l_a, 1.0)[:, None]
    out_u = acc_u / tl.where(l_u > 0.0, l_u, 1.0)[:, None]
    gate = tl.load(GATE + pid_bh.to(tl.int64) * LQ + offs_m, mask=row_ok, other=0.0).to(tl.float32)
    weight = tl.where(user_rows, gate, 0.0)
    out = out_a + weight[:, None] * out_u
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------

_AUTOTUNE_KEY = ["HEAD_DIM", "LQ_BUCKET", "LA_BUCKET", "LU_BUCKET"]  # + tensor dtypes (added by triton)
_SMEM_BUDGET_BYTES = 220 * 1024  # Hopper: 228 KiB per SM, minus some headroom


def _autotune_configs() -> list:
    """Hopper-oriented configs: 64-row tiles on one warpgroup, 128-row on two."""
    configs = []
    for block_m, num_warps in ((64, 4), (128, 8)):
        for block_n in (32, 64, 128):
            for num_stages in (2, 3, 4):
                configs.append(
                    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
                )
    return configs


def _prune_configs(configs, named_args, **kwargs) -> list:
    """Drop configs that overflow shared memory, spill registers (two fp32
    accumulators are live at D=128: BLOCK_N=128 spills there) or tile far past
    the problem."""
    args = {**named_args, **kwargs}
    head_dim = args["HEAD_DIM"]
    len_q = args["LQ_BUCKET"]
    len_kv = max(args["LA_BUCKET"], args["LU_BUCKET"], 16)
    kept = []
    for cfg in configs:
        block_m, block_n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        smem = 2 * (block_m * head_dim + cfg.num_stages * 2 * block_n * head_dim)
        if smem > _SMEM_BUDGET_BYTES:
            continue
        if head_dim >= 128 and block_n > 64:
            continue
        if block_m > 64 and len_q <= 64:
            continue
        if block_n > 32 and block_n > len_kv:
            continue
        kept.append(cfg)
    return kept or configs[:1]


def _length_bucket(n: int) -> int:
    """Power-of-two bucket used in the autotune key (0 stays 0)."""
    return 0 if n <= 0 else max(16, triton.next_power_of_2(int(n)))


_logged_tunings: set = set()


def _log_new_tunings(autotuner) -> None:
    cache = getattr(autotuner, "cache", None)
    if not cache or len(cache) == len(_logged_tunings):
        return
    for key, cfg in list(cache.items()):
        if key not in _logged_tunings:
            _logged_tunings.add(key)
            logger.info("sdcm_attention autotune: key=%s -> %s", key, cfg)


@functools.lru_cache(maxsize=None)
def _kernel_for_mode(interpret: bool):
    """The kernel wrapped for the current mode: interpreted, or jitted + autotuned."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_sdcm_fwd_kernel)
    from triton.runtime.jit import JITFunction

    return triton.autotune(
        configs=_autotune_configs(),
        key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_configs},
    )(JITFunction(_sdcm_fwd_kernel))


# ----------------------------------------------------------------------------
# Host-side launch
# ----------------------------------------------------------------------------


def _interpret_mode() -> bool:
    """True when TRITON_INTERPRET asks for the interpreter (read at call time)."""
    if not _HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_language_interpreted() -> bool:
    """Whether triton.language's own jit functions (tl.sum, tl.max, tl.zeros...)
    were built for the interpreter, i.e. TRITON_INTERPRET was set when triton
    was first imported. Triton fixes this at import; it cannot change later."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(tl.standard, "sum", None), InterpretedFunction)


def _check_triton_mode(interpret: bool) -> None:
    if interpret == _triton_language_interpreted():
        return
    if interpret:
        raise RuntimeError(
            "sdcm_attention: TRITON_INTERPRET=1 is set, but triton was imported before it was set, so "
            "triton.language was built for the compiler. Set TRITON_INTERPRET=1 in the environment before "
            "the first `import triton` (e.g. `TRITON_INTERPRET=1 python ...`)."
        )
    raise RuntimeError(
        "sdcm_attention: triton was imported with TRITON_INTERPRET=1, which is unset now; the compiled "
        "kernel cannot run in this process. Keep TRITON_INTERPRET consistent for the whole process."
    )


def _kernel_supports(q: torch.Tensor) -> bool:
    return q.dtype in KERNEL_DTYPES and q.shape[-1] in SUPPORTED_HEAD_DIMS


def _use_kernel(q: torch.Tensor) -> bool:
    if not _HAS_TRITON or not (q.is_cuda or _interpret_mode()):
        return False
    if not _kernel_supports(q):
        logger.debug("sdcm_attention: dtype %s / D=%d not covered by the kernel; using the reference",
                     q.dtype, q.shape[-1])
        return False
    return True


def _prepare_lengths(lengths: Optional[torch.Tensor], batch: int, max_len: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.int32, device=device)
    return lengths.clamp(0, max_len).to(torch.int32).contiguous()


def _prepare_lip(lip_mask: torch.Tensor, batch: int, len_q: int) -> torch.Tensor:
    return lip_mask.expand(batch, len_q).contiguous().view(torch.uint8)


def _prepare_gate(gate: torch.Tensor, batch: int, heads: int, len_q: int) -> torch.Tensor:
    return gate.expand(batch, heads, len_q).to(torch.float32).contiguous()


def _sdcm_forward_triton(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths, user_lengths,
                         scale: float) -> torch.Tensor:
    """Launch the fused kernel (compiled or interpreted, per TRITON_INTERPRET)."""
    if not _HAS_TRITON:
        raise RuntimeError("sdcm_attention: triton is not available")
    b, h, lq, d = q.shape
    la, lu = k_audio.shape[2], k_user.shape[2]
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: dtype {q.dtype} is not supported by the Triton kernel ({KERNEL_DTYPES})")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {d} is not supported by the Triton kernel {SUPPORTED_HEAD_DIMS}")

    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if la == 0 and lu == 0:
        return out.zero_()

    # A unit stride along D lets triton specialise it and vectorise/pipeline the loads.
    q, k_audio, v_audio, k_user, v_user = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_audio, v_audio, k_user, v_user)
    )
    len_a = _prepare_lengths(audio_lengths, b, la, q.device)
    len_u = _prepare_lengths(user_lengths, b, lu, q.device)
    lip = _prepare_lip(lip_mask, b, lq)
    gate_full = _prepare_gate(gate, b, h, lq)

    interpret = _interpret_mode()
    _check_triton_mode(interpret)
    kernel = _kernel_for_mode(interpret)
    args = (
        q, k_audio, v_audio, k_user, v_user, lip, gate_full, len_a, len_u, out,
        *q.stride(), *k_audio.stride(), *v_audio.stride(), *k_user.stride(), *v_user.stride(), *out.stride(),
        h, lq, scale * LOG2E,
        _length_bucket(lq), _length_bucket(la), _length_bucket(lu),
    )
    meta = {"HEAD_DIM": d, "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}
    if interpret:
        grid = (triton.cdiv(lq, INTERPRET_BLOCK_M), b * h)
        kernel[grid](*args, BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N, **meta)
        return out

    def grid(m):
        return (triton.cdiv(lq, m["BLOCK_M"]), b * h)

    with torch.cuda.device(q.device):
        kernel[grid](*args, **meta)
    _log_new_tunings(kernel)
    return out


# ----------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------

_DIFF_INPUTS = (0, 1, 2, 3, 4, 6)  # q, k_audio, v_audio, k_user, v_user, gate


class SDCMAttentionFunction(torch.autograd.Function):
    """Forward: fused kernel. Backward: recompute through the reference."""

    @staticmethod
    def forward(ctx, q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths, user_lengths, scale):
        ctx.scale = scale
        ctx.save_for_backward(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths, user_lengths)
        return _sdcm_forward_triton(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths,
                                    user_lengths, scale)

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        wanted = [i for i in _DIFF_INPUTS if ctx.needs_input_grad[i]]
        grads = [None] * 10
        if not wanted:
            return tuple(grads)
        with torch.enable_grad():
            for i in wanted:
                saved[i] = saved[i].detach().requires_grad_(True)
            out = _reference_forward(*saved, ctx.scale)
            found = torch.autograd.grad(out, [saved[i] for i in wanted], grad_out, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g if g is not None else torch.zeros_like(saved[i])
        return tuple(grads)


# ----------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------


def sdcm_attention(
    q: torch.Tensor,
    k_audio: torch.Tensor,
    v_audio: torch.Tensor,
    k_user: torch.Tensor,
    v_user: torch.Tensor,
    lip_mask: torch.Tensor,
    gate,
    *,
    audio_lengths: Optional[torch.Tensor] = None,
    user_lengths: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """SDCM decoupled cross-attention (see the module docstring).

    Runs the fused Triton kernel on CUDA tensors (or on CPU under
    ``TRITON_INTERPRET=1``) and the torch reference otherwise.
    """
    gate = _as_gate_tensor(gate, q) if isinstance(q, torch.Tensor) else gate
    dims = _check_inputs(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths, user_lengths)
    scale = _default_scale(scale, dims.head_dim)
    if not _use_kernel(q):
        return _reference_forward(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths,
                                  user_lengths, scale)
    return SDCMAttentionFunction.apply(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_lengths,
                                       user_lengths, scale)
