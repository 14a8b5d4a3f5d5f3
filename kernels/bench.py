"""``echo-stream bench kernels``: the fused SDCM attention kernel against the compositions a user would write.

Implementations compared at every grid point (bf16 by default):

* ``fused``: :func:`echo_stream.kernels.sdcm_attention` (one Triton launch; per-item
  lengths for variable-length points).
* ``eager_sdpa``: two ``scaled_dot_product_attention`` calls plus mask * gate * add,
  as diffusers' IP-Adapter attention processor does (boolean key masks for
  variable-length points).
* ``compiled_sdpa``: the same composition under ``torch.compile``.
* ``flex``: two compiled FlexAttention calls plus the blend; the user-branch call
  carries a block mask that drops lip query tiles (where
  ``torch.nn.attention.flex_attention`` exists).
* ``reference``: the plain torch reference (CPU smoke only).

Each gets the median time (``triton.testing.do_bench``), TFLOP/s
(``4*B*H*Lq*D*(La + (1 - lip_fraction)*Lu)``, over the valid keys), GB/s of the
minimal traffic (read q and the valid keys/values of both branches, the user
branch only when some token is not a lip token, write out) and the % of the
device roofline (``max(flops/peak, bytes/bandwidth)`` over the measured time).
Results go to ``--out`` as JSON, CSV and a PNG plot.

Without CUDA, ``--cpu-smoke`` runs a tiny float32 grid on CPU (reference vs
eager composition; the fused kernel too under ``TRITON_INTERPRET=1``) so that the
code path is exercised in CI; its timings mean nothing.

Run as ``python -m echo_stream.kernels.bench [--quick] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib
import json
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from echo_stream.arguments.bench import KERNEL_GPU_IMPLS as GPU_IMPLS
from echo_stream.arguments.bench import RESULTS as DEFAULT_OUT  # noqa: F401 (re-exported)
from echo_stream.arguments.bench import add_kernels_bench_arguments as add_arguments
from echo_stream.machine import cpu_name

# The module itself: the package exports the function under the same name.
_sdcm = importlib.import_module(f"{__package__ or 'echo_stream.kernels'}.sdcm_attention")

JSON_NAME = "sdcm_attention_bench.json"
CSV_NAME = "sdcm_attention_bench.csv"
PNG_NAME = "sdcm_attention_bench.png"

CPU_IMPLS = ("reference", "eager_sdpa", "fused")

# (substring of torch.cuda.get_device_name(), dense bf16 tensor TFLOP/s, HBM TB/s); first match wins.
DEVICE_PEAKS = (
    ("H200", 989.0, 4.8),
    ("H100 PCIe", 756.0, 2.0),
    ("H100 NVL", 835.0, 3.9),
    ("H100", 989.0, 3.35),
    ("A100-SXM4-80GB", 312.0, 2.039),
    ("A100 80GB PCIe", 312.0, 1.935),
    ("A100", 312.0, 1.555),
)


# ----------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    batch: int
    heads: int
    head_dim: int
    len_q: int
    len_audio: int
    len_user: int
    lip_fraction: float
    ragged: bool = False  # per-item lengths drawn in [L/2, L]

    def label(self) -> str:
        text = (f"B{self.batch} D{self.head_dim} Lq{self.len_q} La{self.len_audio} "
                f"Lu{self.len_user} lip{self.lip_fraction:g}")
        return text + (" ragged" if self.ragged else "")


def _unique(points) -> list:
    seen, out = set(), []
    for p in points:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def full_grid() -> list:
    """One-at-a-time sweeps around a base point, for D = 64 and 128, plus the corners."""
    points = []
    for d in (64, 128):
        base = Point(8, 8, d, 1024, 128, 256, 0.25)
        points.append(base)
        points += [dataclasses.replace(base, batch=b) for b in (1, 32, 128)]
        points += [dataclasses.replace(base, len_q=n) for n in (200, 4096)]
        points += [dataclasses.replace(base, len_audio=n) for n in (32, 512)]
        points += [dataclasses.replace(base, len_user=n) for n in (0, 128, 512)]
        points += [dataclasses.replace(base, lip_fraction=f) for f in (0.0, 1.0)]
        points.append(dataclasses.replace(base, ragged=True))
        points.append(Point(1, 8, d, 200, 32, 0, 0.0))
        points.append(Point(128, 8, d, 4096, 512, 512, 0.0))
        points.append(Point(32, 8, d, 4096, 512, 512, 0.25, ragged=True))
    return _unique(points)


def quick_grid() -> list:
    base = Point(8, 8, 64, 1024, 128, 256, 0.25)
    return _unique([
        base,
        Point(1, 8, 64, 200, 128, 256, 0.25),
        dataclasses.replace(base, lip_fraction=0.0),
        dataclasses.replace(base, lip_fraction=1.0),
        dataclasses.replace(base, len_user=0),
        dataclasses.replace(base, ragged=True),
        dataclasses.replace(base, head_dim=128),
    ])


def cpu_smoke_grid(quick: bool) -> list:
    points = [Point(1, 2, 32, 20, 16, 16, 0.25), Point(2, 2, 32, 33, 17, 0, 0.0, ragged=True)]
    if not quick:
        points += [Point(2, 2, 64, 40, 24, 30, 1.0), Point(1, 2, 32, 48, 32, 20, 0.25, ragged=True)]
    return points


# ----------------------------------------------------------------------------
# Inputs and metrics
# ----------------------------------------------------------------------------


def make_inputs(p: Point, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Random inputs; lip tokens come first (the region-major layout the kernel favours)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(length):
        return torch.randn(p.batch, p.heads, length, p.head_dim, generator=gen).to(device=device, dtype=dtype)

    def lengths(full):
        if not p.ragged or full == 0:
            return torch.full((p.batch,), full, dtype=torch.int32)
        return torch.randint(max(1, full // 2), full + 1, (p.batch,), generator=gen, dtype=torch.int32)

    n_lip = round(p.lip_fraction * p.len_q)
    lip = torch.zeros(p.batch, p.len_q, dtype=torch.bool)
    lip[:, :n_lip] = True
    len_a, len_u = lengths(p.len_audio), lengths(p.len_user)
    return dict(
        q=randn(p.len_q), k_audio=randn(p.len_audio), v_audio=randn(p.len_audio),
        k_user=randn(p.len_user), v_user=randn(p.len_user),
        lip_mask=lip.to(device), gate=(torch.rand(1, p.heads, 1, generator=gen) + 0.5).to(device=device, dtype=dtype),
        audio_lengths=len_a.to(device) if p.ragged else None,
        user_lengths=len_u.to(device) if p.ragged else None,
        n_lip=n_lip, sum_len_audio=int(len_a.sum()), sum_len_user=int(len_u.sum()),
    )


def work(p: Point, x: dict, dtype: torch.dtype) -> tuple:
    """(FLOPs, minimal bytes) over the valid keys."""
    user_share = 1.0 - x["n_lip"] / p.len_q if p.len_q else 0.0
    flops = 4 * p.heads * p.len_q * p.head_dim * (x["sum_len_audio"] + user_share * x["sum_len_user"])
    elem = torch.finfo(dtype).bits // 8
    kv_elems = 2 * p.heads * p.head_dim * (x["sum_len_audio"] + (x["sum_len_user"] if user_share > 0 else 0))
    bytes_moved = elem * (2 * p.batch * p.heads * p.len_q * p.head_dim + kv_elems)
    return flops, bytes_moved


def device_peaks(name: str) -> tuple:
    """(peak dense bf16 TFLOP/s, HBM TB/s) for a device name, or (None, None)."""
    for key, tflops, tbps in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return tflops, tbps
    return None, None


def roofline_pct(flops: float, bytes_moved: float, time_ms: float, peaks: tuple) -> Optional[float]:
    peak_tflops, peak_tbps = peaks
    if peak_tflops is None or time_ms <= 0:
        return None
    bound_s = max(flops / (peak_tflops * 1e12), bytes_moved / (peak_tbps * 1e12))
    return 100.0 * bound_s / (time_ms * 1e-3)


# ----------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------


def _key_mask(lengths: Optional[torch.Tensor], length: int) -> Optional[torch.Tensor]:
    """(B, 1, 1, L) boolean SDPA mask (True = attend), or None when all keys are valid."""
    if lengths is None:
        return None
    return (torch.arange(length, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


def eager_composition(q, k_audio, v_audio, k_user, v_user, lip_mask, gate, audio_mask=None, user_mask=None):
    """What a user writes without the fused op (cf. diffusers' IP-Adapter processor)."""
    out = F.scaled_dot_product_attention(q, k_audio, v_audio, attn_mask=audio_mask)
    if k_user.shape[2] > 0:
        user = F.scaled_dot_product_attention(q, k_user, v_user, attn_mask=user_mask)
        out = out + (~lip_mask)[:, None, :, None].to(q.dtype) * gate[..., None] * user
    return out


def _build_fused(x: dict) -> Callable:
    args = [x[k] for k in ("q", "k_audio", "v_audio", "k_user", "v_user", "lip_mask", "gate")]
    return lambda: _sdcm.sdcm_attention(*args, audio_lengths=x["audio_lengths"], user_lengths=x["user_lengths"])


def _build_reference(x: dict) -> Callable:
    args = [x[k] for k in ("q", "k_audio", "v_audio", "k_user", "v_user", "lip_mask", "gate")]
    return lambda: _sdcm.sdcm_attention_reference(*args, audio_lengths=x["audio_lengths"],
                                                  user_lengths=x["user_lengths"])


def _sdpa_args(x: dict) -> tuple:
    return (x["q"], x["k_audio"], x["v_audio"], x["k_user"], x["v_user"], x["lip_mask"], x["gate"],
            _key_mask(x["audio_lengths"], x["k_audio"].shape[2]), _key_mask(x["user_lengths"], x["k_user"].shape[2]))


def _build_eager(x: dict) -> Callable:
    args = _sdpa_args(x)
    return lambda: eager_composition(*args)


def _build_compiled(x: dict) -> Callable:
    torch._dynamo.reset()
    compiled = torch.compile(eager_composition, dynamic=False)
    args = _sdpa_args(x)
    return lambda: compiled(*args)


def _build_flex(x: dict) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    q, device = x["q"], x["q"].device
    batch, _, len_q, _ = q.shape
    len_a, len_u = x["k_audio"].shape[2], x["k_user"].shape[2]
    not_lip = ~x["lip_mask"]
    a_len = x["audio_lengths"] if x["audio_lengths"] is not None else torch.full((batch,), len_a, device=device)
    u_len = x["user_lengths"] if x["user_lengths"] is not None else torch.full((batch,), len_u, device=device)

    def audio_mod(b, h, q_idx, kv_idx):
        return kv_idx < a_len[b]

    def user_mod(b, h, q_idx, kv_idx):  # lip query tiles become empty blocks and are skipped
        return not_lip[b, q_idx] & (kv_idx < u_len[b])

    audio_mask = create_block_mask(audio_mod, batch, None, len_q, len_a, device=device) \
        if x["audio_lengths"] is not None else None
    user_mask = create_block_mask(user_mod, batch, None, len_q, len_u, device=device) if len_u > 0 else None
    blend = not_lip[:, None, :, None].to(q.dtype) * x["gate"][..., None]

    def run():
        out = flex(q, x["k_audio"], x["v_audio"], block_mask=audio_mask)
        if user_mask is not None:
            out = out + blend * flex(q, x["k_user"], x["v_user"], block_mask=user_mask)
        return out

    return run


BUILDERS = {
    "fused": _build_fused,
    "reference": _build_reference,
    "eager_sdpa": _build_eager,
    "compiled_sdpa": _build_compiled,
    "flex": _build_flex,
}


def _flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def _time_cuda(fn: Callable, warmup_ms: int, rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _time_cpu(fn: Callable, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "cpu": cpu_name(),
        "platform": platform.platform(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": _sdcm._interpret_mode(),
    }
    if device == "cuda":
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    info["peak_tflops_bf16"], info["peak_hbm_tbps"] = device_peaks(info["device_name"]) if device == "cuda" \
        else (None, None)
    return info


# ----------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------


def _select_impls(args, device: str) -> list:
    wanted = [s.strip() for s in args.impls.split(",")] if args.impls else list(
        GPU_IMPLS if device == "cuda" else CPU_IMPLS)
    unknown = [w for w in wanted if w not in BUILDERS]
    if unknown:
        raise SystemExit(f"--impls: unknown implementation(s) {unknown}; choose from {sorted(BUILDERS)}")
    if "flex" in wanted and not _flex_available():
        print("bench kernels: torch.nn.attention.flex_attention is not available; skipping flex")
        wanted.remove("flex")
    if device == "cpu" and "fused" in wanted and not (
            _sdcm._HAS_TRITON and _sdcm._interpret_mode() and _sdcm._triton_language_interpreted()):
        wanted.remove("fused")  # the kernel runs on CPU only under TRITON_INTERPRET=1
    if device == "cpu":
        wanted = [w for w in wanted if w in ("reference", "eager_sdpa", "fused")]
    return wanted


def _measure_point(p: Point, impls: list, dtype, device: str, args, peaks: tuple) -> list:
    x = make_inputs(p, dtype, device, args.seed)
    flops, bytes_moved = work(p, x, dtype)
    rows, outputs = [], {}
    for impl in impls:
        row = {**dataclasses.asdict(p), "label": p.label(), "impl": impl, "dtype": str(dtype).replace("torch.", ""),
               "flops": flops, "bytes": bytes_moved, "status": "ok", "time_ms": None, "tflops": None,
               "gbps": None, "roofline_pct": None, "max_abs_diff": None, "speedup_vs_eager": None}
        try:
            fn = BUILDERS[impl](x)
            outputs[impl] = fn().float()  # warm-up (compiles, autotunes) and keeps the result
            ms = _time_cuda(fn, args.warmup_ms, args.rep_ms) if device == "cuda" else _time_cpu(fn)
            row.update(time_ms=ms, tflops=flops / (ms * 1e-3) / 1e12, gbps=bytes_moved / (ms * 1e-3) / 1e9,
                       roofline_pct=roofline_pct(flops, bytes_moved, ms, peaks))
        except Exception as err:  # keep going: one failing impl/point must not lose the grid
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        rows.append(row)
    baseline = "eager_sdpa" if "eager_sdpa" in outputs else next(iter(outputs), None)
    eager_ms = next((r["time_ms"] for r in rows if r["impl"] == "eager_sdpa" and r["status"] == "ok"), None)
    for row in rows:
        if row["impl"] in outputs and baseline is not None:
            row["max_abs_diff"] = (outputs[row["impl"]] - outputs[baseline]).abs().max().item() \
                if outputs[baseline].numel() else 0.0
        if eager_ms and row["time_ms"]:
            row["speedup_vs_eager"] = eager_ms / row["time_ms"]
    del x, outputs
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['impl']}: {row['status']}"
    text = f"{row['impl']} {row['time_ms']:.3f} ms {row['tflops']:.1f} TFLOP/s {row['gbps']:.0f} GB/s"
    if row["roofline_pct"] is not None:
        text += f" {row['roofline_pct']:.0f}%"
    return text


def write_csv(path: Path, rows: list) -> None:
    fields = list(rows[0].keys()) if rows else ["impl"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _or_nan(value) -> float:
    return float("nan") if value is None else float(value)


def write_plot(path: Path, rows: list, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, (ax_time, ax_speed) = plt.subplots(2, 1, figsize=(max(8.0, 0.45 * len(labels) + 3), 9), sharex=True)
    xs = range(len(labels))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        by_label = {r["label"]: r for r in rows if r["impl"] == impl}
        times = [_or_nan(by_label.get(label, {}).get("time_ms")) for label in labels]
        speed = [_or_nan(by_label.get(label, {}).get("speedup_vs_eager")) for label in labels]
        offsets = [x + (i - (len(impls) - 1) / 2) * width for x in xs]
        ax_time.bar(offsets, times, width=width, label=impl)
        ax_speed.bar(offsets, speed, width=width, label=impl)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("median time (ms, log)")
    ax_time.legend(ncol=len(impls), fontsize="small")
    ax_time.set_title(f"SDCM attention: {env.get('device_name')} | torch {env.get('torch')} | "
                      f"triton {env.get('triton')}", fontsize="medium")
    ax_speed.axhline(1.0, color="grey", linewidth=0.8)
    ax_speed.set_ylabel("speed-up vs eager SDPA")
    ax_speed.set_xticks(list(xs))
    ax_speed.set_xticklabels(labels, rotation=70, ha="right", fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; write JSON, CSV and PNG into ``args.out``. Returns an exit code."""
    if args.cpu_smoke:
        device, dtype, points = "cpu", torch.float32, cpu_smoke_grid(args.quick)
    elif torch.cuda.is_available():
        device, dtype = "cuda", getattr(torch, args.dtype)
        points = quick_grid() if args.quick else full_grid()
    else:
        print("bench kernels: no CUDA device found; the benchmark needs a GPU. "
              "Pass --cpu-smoke to run a tiny CPU grid that only exercises the code path.")
        return 1

    impls = _select_impls(args, device)
    env = environment(device)
    peaks = (env["peak_tflops_bf16"], env["peak_hbm_tbps"])
    print(f"bench kernels: {env['device_name']} ({device}), {len(points)} points, impls: {', '.join(impls)}")
    rows = []
    for i, p in enumerate(points, 1):
        point_rows = _measure_point(p, impls, dtype, device, args, peaks)
        rows += point_rows
        print(f"[{i}/{len(points)}] {p.label()}: " + " | ".join(_format_row(r) for r in point_rows), flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    payload = {"environment": env, "settings": settings, "impls": impls, "results": rows}
    (out_dir / JSON_NAME).write_text(json.dumps(payload, indent=2))
    write_csv(out_dir / CSV_NAME, rows)
    write_plot(out_dir / PNG_NAME, rows, env)
    print(f"bench kernels: wrote {out_dir / JSON_NAME}, {out_dir / CSV_NAME}, {out_dir / PNG_NAME}")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"bench kernels: {len(failed)} measurement(s) failed; see 'status' in the results")
    return 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echo_stream.kernels.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
