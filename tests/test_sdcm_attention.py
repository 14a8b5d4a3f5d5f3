"""Tests for echo_stream.kernels.sdcm_attention: reference, Triton kernel, autograd, dispatch, bench.

The Triton kernel runs on CPU only under Triton's interpreter, and Triton fixes
interpreted-vs-compiled when ``triton.language`` is first imported. So every
interpreter comparison runs in ONE child process started with
``TRITON_INTERPRET=1`` (this file, run as a script with ``--interpreter-worker``),
which saves the kernel's outputs; the assertions run here against the reference.
That holds whatever other test modules imported earlier in this pytest process.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from echo_stream.kernels import sdcm_attention, sdcm_attention_reference

sdcm_mod = importlib.import_module("echo_stream.kernels.sdcm_attention")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
requires_triton = pytest.mark.skipif(not sdcm_mod._HAS_TRITON, reason="triton is not installed")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DIFF_NAMES = ("q", "k_audio", "v_audio", "k_user", "v_user", "gate")


# ----------------------------------------------------------------------------
# Deterministic inputs, shared by this process and the interpreter worker
# ----------------------------------------------------------------------------


def make_inputs(case: dict, device: str = "cpu") -> dict:
    """Build the op's keyword arguments for a case (same values in every process)."""
    g = torch.Generator().manual_seed(case.get("seed", 0))
    dtype = DTYPES[case.get("dtype", "float32")]
    b, h, lq, la, lu, d = (case[k] for k in ("B", "H", "Lq", "La", "Lu", "D"))

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    def heads_view(length):
        if case.get("layout") == "blhd":  # stored (B, L, H, D), viewed as (B, H, L, D): non-contiguous
            return randn(b, length, h, d).transpose(1, 2)
        return randn(b, h, length, d)

    q, k_a, v_a, k_u, v_u = (heads_view(n) for n in (lq, la, la, lu, lu))
    lip_kind = case.get("lip", "random")
    if lip_kind == "random":
        lip = torch.rand(b, lq, generator=g) < 0.4
    elif lip_kind == "none":
        lip = torch.zeros(b, lq, dtype=torch.bool)
    elif lip_kind == "all":
        lip = torch.ones(b, lq, dtype=torch.bool)
    elif lip_kind == "prefix":  # region-major layout: lip tokens first
        lip = torch.zeros(b, lq, dtype=torch.bool)
        lip[:, : case.get("lip_prefix", 16)] = True
    elif lip_kind == "row":  # one mask shared by the batch, shape (1, Lq)
        lip = torch.rand(1, lq, generator=g) < 0.5
    else:
        raise ValueError(lip_kind)
    gate_shape = {"full": (b, h, lq), "head": (1, h, 1), "scalar": (1, 1, 1), "batch_query": (b, 1, lq)}
    gate = torch.rand(*gate_shape[case.get("gate", "full")], generator=g) + 0.25

    def lengths(key):
        value = case.get(key)
        return None if value is None else torch.tensor(value, dtype=torch.int64)

    inputs = dict(q=q, k_audio=k_a, v_audio=v_a, k_user=k_u, v_user=v_u, lip_mask=lip, gate=gate,
                  audio_lengths=lengths("audio_lengths"), user_lengths=lengths("user_lengths"),
                  scale=case.get("scale"))
    if case.get("nan_user"):
        inputs["k_user"] = torch.full_like(k_u, float("nan"))
        inputs["v_user"] = torch.full_like(v_u, float("nan"))
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def grad_weights(case: dict, out_shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + case.get("seed", 0))
    return torch.randn(*out_shape, generator=g)


def call(fn, inputs: dict) -> torch.Tensor:
    args = [inputs[k] for k in ("q", "k_audio", "v_audio", "k_user", "v_user", "lip_mask", "gate")]
    return fn(*args, audio_lengths=inputs["audio_lengths"], user_lengths=inputs["user_lengths"],
              scale=inputs["scale"])


def upcast(inputs: dict, dtype=torch.float64) -> dict:
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


def assert_flash_close(out: torch.Tensor, inputs: dict, what: str = "out") -> None:
    """flash-attn style: error vs a float64 reference is at most twice the error of
    the reference computed in the input dtype, plus a small absolute term."""
    ref_exact = call(sdcm_attention_reference, upcast(inputs)).cpu()
    ref_lowp = call(sdcm_attention_reference, inputs).cpu().double()
    out = out.cpu().double()
    assert out.shape == ref_exact.shape
    assert not torch.isnan(out).any(), f"{what}: NaN in kernel output"
    dtype = inputs["q"].dtype
    rounded = ref_exact.to(dtype)
    atol = 2 * ((rounded + 0.3 - 0.3) - rounded).abs().max().item() if out.numel() else 0.0
    atol = max(atol, 1e-6)
    err = (out - ref_exact).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp - ref_exact).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + atol, f"{what}: max err {err:.3e} > 2 * {base:.3e} + {atol:.3e}"


# ----------------------------------------------------------------------------
# Interpreter cases (run in the worker)
# ----------------------------------------------------------------------------

FORWARD_CASES = [
    dict(id="f32_random", dtype="float32", B=2, H=2, Lq=37, La=45, Lu=29, D=32, lip="random", gate="full", seed=1),
    dict(id="f16_lengths_head_gate", dtype="float16", B=2, H=2, Lq=37, La=45, Lu=29, D=32, gate="head",
         audio_lengths=[45, 0], user_lengths=[5, 29], seed=2),
    dict(id="f32_lu0_scalar_gate", dtype="float32", B=1, H=2, Lq=16, La=16, Lu=0, D=64, lip="none", gate="scalar",
         seed=3),
    dict(id="f16_all_lip", dtype="float16", B=2, H=1, Lq=33, La=17, Lu=50, D=32, lip="all", seed=4),
    dict(id="f32_d128_batch_query_gate", dtype="float32", B=2, H=1, Lq=20, La=19, Lu=23, D=128,
         gate="batch_query", seed=5),
    dict(id="f16_zero_lengths", dtype="float16", B=2, H=2, Lq=18, La=20, Lu=20, D=32, lip="none",
         audio_lengths=[0, 0], user_lengths=[0, 0], seed=6, expect_zero=True),
    dict(id="f32_audio_empty", dtype="float32", B=2, H=1, Lq=17, La=0, Lu=21, D=32, seed=7),
    dict(id="f32_tiny_row_mask", dtype="float32", B=3, H=1, Lq=1, La=1, Lu=1, D=32, lip="row", seed=8),
    dict(id="f16_noncontig_prefix_scale", dtype="float16", B=2, H=2, Lq=40, La=40, Lu=33, D=64, layout="blhd",
         lip="prefix", lip_prefix=16, scale=0.3, audio_lengths=[40, 7], user_lengths=[33, 1], seed=9),
    dict(id="f32_lengths_clamped", dtype="float32", B=2, H=1, Lq=21, La=19, Lu=18, D=32,
         audio_lengths=[100, 3], user_lengths=[-2, 50], seed=10),
    dict(id="f16_no_lip_full_tiles", dtype="float16", B=1, H=4, Lq=64, La=64, Lu=64, D=64, lip="none", seed=11),
    dict(id="f32_empty_batch", dtype="float32", B=0, H=2, Lq=5, La=5, Lu=5, D=32, seed=12),
    dict(id="f32_empty_queries", dtype="float32", B=2, H=2, Lq=0, La=5, Lu=5, D=32, seed=13),
]
GRAD_CASES = [
    dict(id="grad_all", dtype="float32", B=2, H=2, Lq=20, La=18, Lu=22, D=32, gate="full",
         audio_lengths=[18, 5], user_lengths=[0, 22], requires=list(DIFF_NAMES), seed=21),
    dict(id="grad_partial", dtype="float32", B=1, H=2, Lq=19, La=17, Lu=16, D=32, gate="head",
         requires=["v_user", "gate"], seed=22),
]
LIP_CASES = [
    dict(id="lip_independent", dtype="float16", B=2, H=2, Lq=35, La=20, Lu=30, D=32, lip="random", seed=31),
    dict(id="nan_user_all_lip", dtype="float32", B=1, H=2, Lq=32, La=20, Lu=24, D=32, lip="all", nan_user=True,
         seed=32),
]


def _run_worker_case(case: dict) -> dict:
    kind = case.get("check", "forward")
    inputs = make_inputs(case)
    if kind == "grad":
        leaves = {}
        for name in case["requires"]:
            leaves[name] = inputs[name] = inputs[name].detach().clone().requires_grad_(True)
        out = call(sdcm_attention, inputs)
        (out.float() * grad_weights(case, out.shape)).sum().backward()
        return {"out": out.detach(), **{f"grad_{n}": t.grad for n, t in leaves.items()}}
    if kind == "lip":
        out = call(sdcm_attention, inputs)
        other = dict(inputs)
        g = torch.Generator().manual_seed(2000 + case["seed"])
        other["k_user"] = torch.randn(inputs["k_user"].shape, generator=g).to(inputs["q"].dtype) * 3
        other["v_user"] = torch.randn(inputs["v_user"].shape, generator=g).to(inputs["q"].dtype) * 3
        return {"out": out, "out_other_user": call(sdcm_attention, other)}
    return {"out": call(sdcm_attention, inputs)}


def interpreter_worker(cases_path: str, out_path: str) -> None:
    """Child-process entry: run every case through `sdcm_attention` under the interpreter."""
    assert sdcm_mod._interpret_mode(), "the worker must run with TRITON_INTERPRET=1"
    launches = {"n": 0}
    launch = sdcm_mod._sdcm_forward_triton

    def counting_launch(*args, **kwargs):
        launches["n"] += 1
        return launch(*args, **kwargs)

    sdcm_mod._sdcm_forward_triton = counting_launch
    results = {}
    for case in json.loads(Path(cases_path).read_text()):
        launches["n"] = 0
        result = _run_worker_case(case)
        result["kernel_launches"] = launches["n"]
        results[case["id"]] = result
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interp(tmp_path_factory):
    """Outputs of all interpreter cases, computed once in a TRITON_INTERPRET=1 child."""
    if not sdcm_mod._HAS_TRITON:
        pytest.skip("triton is not installed")
    tmp = tmp_path_factory.mktemp("sdcm_interp")
    cases = ([dict(c, check="forward") for c in FORWARD_CASES] + [dict(c, check="grad") for c in GRAD_CASES]
             + [dict(c, check="lip") for c in LIP_CASES])
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--interpreter-worker", str(tmp / "cases.json"), str(tmp / "out.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(tmp / "out.pt")


# ----------------------------------------------------------------------------
# Kernel vs reference under the interpreter
# ----------------------------------------------------------------------------


@requires_triton
@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c["id"] for c in FORWARD_CASES])
def test_interpreter_matches_reference(interp, case):
    result = interp[case["id"]]
    inputs = make_inputs(case)
    out = result["out"]
    assert out.dtype == inputs["q"].dtype and out.shape == inputs["q"].shape
    assert result["kernel_launches"] == 1, "sdcm_attention did not dispatch to the Triton kernel"
    assert_flash_close(out, inputs)
    if case.get("expect_zero"):
        assert torch.equal(out, torch.zeros_like(out))


@requires_triton
def test_interpreter_zero_length_branch_is_exactly_zero(interp):
    case = next(c for c in FORWARD_CASES if c["id"] == "f16_lengths_head_gate")
    inputs = make_inputs(case)
    out = interp[case["id"]]["out"]
    # item 1 has no audio keys: its lip tokens get exactly 0, its other tokens only the user branch
    lip = inputs["lip_mask"][1]
    assert torch.equal(out[1][:, lip], torch.zeros_like(out[1][:, lip]))
    assert torch.isfinite(out).all()


@requires_triton
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c["id"] for c in GRAD_CASES])
def test_interpreter_autograd_matches_reference_grads(interp, case):
    result = interp[case["id"]]
    assert result["kernel_launches"] == 1
    inputs = make_inputs(case)
    leaves = [inputs[n].detach().clone().requires_grad_(True) for n in case["requires"]]
    ref_inputs = dict(inputs, **dict(zip(case["requires"], leaves)))
    ref = call(sdcm_attention_reference, ref_inputs)
    grads = torch.autograd.grad((ref * grad_weights(case, ref.shape)).sum(), leaves)
    assert_flash_close(result["out"], inputs)
    for name, expected in zip(case["requires"], grads):
        got = result[f"grad_{name}"]
        assert got is not None and got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    for name in set(DIFF_NAMES) - set(case["requires"]):
        assert f"grad_{name}" not in result


@requires_triton
def test_interpreter_lip_tokens_ignore_user_keys_values(interp):
    case = next(c for c in LIP_CASES if c["id"] == "lip_independent")
    result = interp[case["id"]]
    lip = make_inputs(case)["lip_mask"]  # (B, Lq)
    out, other = result["out"], result["out_other_user"]
    lip_rows = lip[:, None, :].expand(out.shape[:3])
    assert torch.equal(out[lip_rows], other[lip_rows])
    assert not torch.equal(out[~lip_rows], other[~lip_rows])


@requires_triton
def test_interpreter_all_lip_tiles_never_read_user_branch(interp):
    # User keys/values are NaN: a kernel that loaded them would produce NaN.
    case = next(c for c in LIP_CASES if c["id"] == "nan_user_all_lip")
    out = interp[case["id"]]["out"]
    inputs = make_inputs(case)
    audio_only = torch.softmax(inputs["q"] @ inputs["k_audio"].transpose(-1, -2) * 32 ** -0.5, -1) @ inputs["v_audio"]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, audio_only, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Reference semantics (in process, CPU)
# ----------------------------------------------------------------------------


def _single_branch(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v


def test_reference_matches_definition_per_item():
    case = dict(dtype="float32", B=3, H=2, Lq=9, La=7, Lu=6, D=16, gate="batch_query",
                audio_lengths=[7, 3, 0], user_lengths=[2, 0, 6], seed=41)
    x = upcast(make_inputs(case))
    out = call(sdcm_attention_reference, x)
    scale = 16 ** -0.5
    for b in range(3):
        la, lu = case["audio_lengths"][b], case["user_lengths"][b]
        q = x["q"][b]
        audio = _single_branch(q, x["k_audio"][b, :, :la], x["v_audio"][b, :, :la], scale) if la else 0 * q
        user = _single_branch(q, x["k_user"][b, :, :lu], x["v_user"][b, :, :lu], scale) if lu else 0 * q
        weight = x["gate"][b].expand(2, 9)[..., None] * (~x["lip_mask"][b])[None, :, None]
        torch.testing.assert_close(out[b], audio + weight * user)


def test_reference_zero_lengths_give_zero_without_nan():
    case = dict(dtype="float32", B=2, H=1, Lq=5, La=4, Lu=4, D=8, lip="none",
                audio_lengths=[0, 0], user_lengths=[0, 0], seed=42)
    x = {k: v for k, v in make_inputs(case).items()}
    for name in DIFF_NAMES:
        x[name] = x[name].requires_grad_(True)
    out = call(sdcm_attention_reference, x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(x[n].grad).all() for n in DIFF_NAMES)


def test_reference_lip_tokens_ignore_user_branch():
    case = dict(dtype="float32", B=2, H=2, Lq=11, La=5, Lu=7, D=8, seed=43)
    x = make_inputs(case)
    out = call(sdcm_attention_reference, x)
    y = dict(x, k_user=torch.randn_like(x["k_user"]), v_user=torch.randn_like(x["v_user"]))
    out2 = call(sdcm_attention_reference, y)
    lip = x["lip_mask"][:, None, :].expand(out.shape[:3])
    assert torch.equal(out[lip], out2[lip])


def test_cpu_dispatch_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*args, **kwargs):
        raise AssertionError("the kernel must not run on CPU without TRITON_INTERPRET")

    monkeypatch.setattr(sdcm_mod, "_sdcm_forward_triton", boom)
    x = make_inputs(dict(dtype="float32", B=1, H=2, Lq=5, La=4, Lu=3, D=32, seed=44))
    torch.testing.assert_close(call(sdcm_attention, x), call(sdcm_attention_reference, x))


@requires_triton
def test_interpret_env_is_read_at_call_time(monkeypatch):
    """With TRITON_INTERPRET=1 set after import, dispatch goes to the kernel: it runs if
    triton itself was imported in interpreter mode, else it says how to fix it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sdcm_mod._interpret_mode()
    x = make_inputs(dict(dtype="float32", B=1, H=1, Lq=5, La=4, Lu=3, D=32, seed=45))
    if sdcm_mod._triton_language_interpreted():
        assert_flash_close(call(sdcm_attention, x), x)
    else:
        with pytest.raises(RuntimeError, match="before the first `import triton`"):
            call(sdcm_attention, x)


def test_unsupported_head_dim_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = make_inputs(dict(dtype="float32", B=1, H=1, Lq=5, La=4, Lu=3, D=24, seed=46))
    torch.testing.assert_close(call(sdcm_attention, x), call(sdcm_attention_reference, x))


def test_reference_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from echo_stream.kernels import sdcm_attention, sdcm_attention_reference\n"
        "import importlib; m = importlib.import_module('echo_stream.kernels.sdcm_attention')\n"
        "assert not m._HAS_TRITON\n"
        "q = torch.randn(1, 2, 5, 32); k = torch.randn(1, 2, 4, 32)\n"
        "o = sdcm_attention(q, k, k, k[:, :, :3], k[:, :, :3], torch.zeros(1, 5, dtype=torch.bool),"
        " torch.ones(1, 1, 1))\n"
        "assert o.shape == q.shape and torch.isfinite(o).all()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_autograd_function_backward_in_process(monkeypatch):
    """SDCMAttentionFunction's backward (recompute through the reference), with the
    forward swapped for the reference so this runs without the interpreter."""
    monkeypatch.setattr(sdcm_mod, "_sdcm_forward_triton",
                        lambda *a: sdcm_mod._reference_forward(*a).detach())
    case = dict(dtype="float32", B=2, H=2, Lq=6, La=5, Lu=4, D=16, gate="head", user_lengths=[4, 1], seed=47)
    x = make_inputs(case)
    q = x["q"].requires_grad_(True)
    gate = x["gate"].requires_grad_(True)
    args = (q, x["k_audio"], x["v_audio"], x["k_user"], x["v_user"], x["lip_mask"], gate, None,
            x["user_lengths"], 0.25)
    out = sdcm_mod.SDCMAttentionFunction.apply(*args)
    gq, gg = torch.autograd.grad(out.square().sum(), (q, gate))
    ref = sdcm_mod._reference_forward(*args)
    rq, rg = torch.autograd.grad(ref.square().sum(), (q, gate))
    torch.testing.assert_close(gq, rq)
    torch.testing.assert_close(gg, rg)
    assert gg.shape == gate.shape


@requires_triton
def test_zero_size_returns_without_launch():
    x = make_inputs(dict(dtype="float16", B=2, H=2, Lq=0, La=3, Lu=3, D=64, seed=48))
    out = sdcm_mod._sdcm_forward_triton(x["q"], x["k_audio"], x["v_audio"], x["k_user"], x["v_user"],
                                        x["lip_mask"], x["gate"], None, None, 0.125)
    assert out.shape == (2, 2, 0, 64)
    x = make_inputs(dict(dtype="float32", B=1, H=2, Lq=4, La=0, Lu=0, D=32, seed=49))
    out = sdcm_mod._sdcm_forward_triton(x["q"], x["k_audio"], x["v_audio"], x["k_user"], x["v_user"],
                                        x["lip_mask"], x["gate"], None, None, 0.125)
    assert torch.equal(out, torch.zeros_like(out))


@requires_triton
def test_autotune_configs_are_pruned_sensibly():
    configs = sdcm_mod._autotune_configs()
    blocks = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}
    assert {bm for bm, *_ in blocks} == {64, 128} and {bn for _, bn, *_ in blocks} == {32, 64, 128}
    big = sdcm_mod._prune_configs(configs, {"LQ_BUCKET": 4096, "LA_BUCKET": 512, "LU_BUCKET": 512}, HEAD_DIM=128)
    assert big and all(2 * (c.kwargs["BLOCK_M"] * 128 + c.num_stages * 2 * c.kwargs["BLOCK_N"] * 128)
                       <= sdcm_mod._SMEM_BUDGET_BYTES for c in big)
    small = sdcm_mod._prune_configs(configs, {"LQ_BUCKET": 32, "LA_BUCKET": 16, "LU_BUCKET": 0}, HEAD_DIM=64)
    assert small and all(c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] == 32 for c in small)
    assert sdcm_mod._length_bucket(0) == 0 and sdcm_mod._length_bucket(200) == 256


def _compile_for_hopper(dtype: str, head_dim: int, block_m: int, block_n: int, num_warps: int, num_stages: int):
    """Compile the kernel ahead of time for sm_90 (no GPU needed), specialised the
    way a launch on contiguous tensors is: unit D strides, 16-divisible pointers/strides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(sdcm_mod._sdcm_fwd_kernel)
    pointers = {"Q": dtype, "K_A": dtype, "V_A": dtype, "K_U": dtype, "V_U": dtype, "OUT": dtype,
                "LIP": "u8", "GATE": "fp32", "LEN_A": "i32", "LEN_U": "i32"}
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride") and name.endswith("d"):
            signature[name], constexprs[name] = "constexpr", 1
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})


@requires_triton
@pytest.mark.parametrize("config", [("bf16", 64, 128, 64, 8, 3), ("fp16", 128, 64, 64, 4, 2)], ids=str)
def test_kernel_compiles_for_hopper_with_wgmma_and_pipelined_loads(config):
    """Catches what the interpreter cannot: the compiled front end and lowering for H100/H200."""
    if sdcm_mod._triton_language_interpreted():
        pytest.skip("triton was imported with TRITON_INTERPRET=1: nothing can be compiled in this process")
    try:
        kernel = _compile_for_hopper(*config)
    except (ImportError, FileNotFoundError, RuntimeError) as err:
        if "ptxas" in str(err).lower() or isinstance(err, (ImportError, FileNotFoundError)):
            pytest.skip(f"no CUDA toolchain for ahead-of-time compilation: {err}")
        raise
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "the dots did not lower to Hopper wgmma"
    assert "cp.async" in ptx, "key/value loads were not software-pipelined"
    assert kernel.metadata.shared <= sdcm_mod._SMEM_BUDGET_BYTES


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------

BASE = dict(dtype="float32", B=2, H=2, Lq=5, La=4, Lu=3, D=32, seed=50)


def _bad(**changes):
    def build():
        x = make_inputs(BASE)
        for key, fn in changes.items():
            x[key] = fn(x)
        return x
    return build


BAD_ARGS = [
    ("q_rank", _bad(q=lambda x: x["q"][0]), ValueError, "q"),
    ("q_not_tensor", _bad(q=lambda x: x["q"].tolist()), TypeError, "q"),
    ("q_int", _bad(q=lambda x: x["q"].long()), TypeError, "q"),
    ("k_audio_head_dim", _bad(k_audio=lambda x: x["k_audio"][..., :16]), ValueError, "k_audio"),
    ("k_audio_rank", _bad(k_audio=lambda x: x["k_audio"][0]), ValueError, "k_audio"),
    ("v_audio_batch", _bad(v_audio=lambda x: x["v_audio"][:1]), ValueError, "v_audio"),
    ("v_user_length", _bad(v_user=lambda x: x["v_user"][:, :, :2]), ValueError, "v_user"),
    ("k_user_dtype", _bad(k_user=lambda x: x["k_user"].half()), TypeError, "k_user"),
    ("lip_mask_dtype", _bad(lip_mask=lambda x: x["lip_mask"].float()), TypeError, "lip_mask"),
    ("lip_mask_shape", _bad(lip_mask=lambda x: torch.zeros(2, 6, dtype=torch.bool)), ValueError, "lip_mask"),
    ("gate_dtype", _bad(gate=lambda x: torch.ones(1, 1, 1, dtype=torch.int32)), TypeError, "gate"),
    ("gate_shape", _bad(gate=lambda x: torch.ones(2, 3, 5)), ValueError, "gate"),
    ("audio_lengths_shape", _bad(audio_lengths=lambda x: torch.tensor([1, 2, 3])), ValueError, "audio_lengths"),
    ("audio_lengths_2d", _bad(audio_lengths=lambda x: torch.tensor([[1, 2]])), ValueError, "audio_lengths"),
    ("user_lengths_float", _bad(user_lengths=lambda x: torch.tensor([1.0, 2.0])), TypeError, "user_lengths"),
]


@pytest.mark.parametrize("fn", [sdcm_attention, sdcm_attention_reference], ids=["dispatch", "reference"])
@pytest.mark.parametrize("name,build,exc,arg", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_argument_errors_name_the_argument(fn, name, build, exc, arg):
    with pytest.raises(exc, match=rf"^{arg}:"):
        call(fn, build())


def test_python_float_gate_is_accepted():
    x = make_inputs(BASE)
    out = call(sdcm_attention, dict(x, gate=0.5))
    torch.testing.assert_close(out, call(sdcm_attention_reference, dict(x, gate=torch.full((1, 1, 1), 0.5))))


# ----------------------------------------------------------------------------
# Bench
# ----------------------------------------------------------------------------


def test_bench_cpu_smoke_writes_json_csv_png(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from echo_stream.kernels import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--cpu-smoke", "--quick", "--out", str(tmp_path)])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / bench.JSON_NAME).read_text())
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["hostname"]
    rows = data["results"]
    assert rows and {r["impl"] for r in rows} >= {"reference", "eager_sdpa"}
    assert all(r["time_ms"] > 0 and r["tflops"] >= 0 and r["gbps"] > 0 for r in rows if r["status"] == "ok")
    with open(tmp_path / bench.CSV_NAME, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and "time_ms" in csv_rows[0]
    assert (tmp_path / bench.PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_without_cuda_explains(tmp_path, capsys):
    if HAS_CUDA:
        pytest.skip("a CUDA device is present")
    from echo_stream.kernels import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--out", str(tmp_path)])) != 0
    assert "--cpu-smoke" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------

GPU_CASES = [
    dict(B=2, H=8, Lq=200, La=77, Lu=128, D=64, lip="random", gate="full"),
    dict(B=3, H=8, Lq=1000, La=300, Lu=200, D=128, lip="prefix", lip_prefix=256, gate="head",
         audio_lengths=[300, 17, 0], user_lengths=[5, 200, 0]),
    dict(B=1, H=8, Lq=333, La=32, Lu=0, D=32, lip="none", gate="scalar"),
    dict(B=2, H=4, Lq=256, La=64, Lu=512, D=64, lip="all"),
]


@pytest.mark.gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("index", range(len(GPU_CASES)))
def test_cuda_kernel_matches_reference(monkeypatch, dtype, index):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = dict(GPU_CASES[index], dtype=dtype, seed=60 + index)
    x = make_inputs(case, device="cuda")
    out = call(sdcm_attention, x)
    assert out.is_cuda and out.dtype == x["q"].dtype
    assert_flash_close(out, x)


@pytest.mark.gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_grads_match_reference(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = dict(dtype=dtype, B=2, H=4, Lq=150, La=70, Lu=90, D=64, audio_lengths=[70, 3], user_lengths=[0, 90],
                seed=70)
    x = make_inputs(case, device="cuda")
    names = list(DIFF_NAMES)
    leaves = [x[n].detach().clone().requires_grad_(True) for n in names]
    out = call(sdcm_attention, dict(x, **dict(zip(names, leaves))))
    w = grad_weights(case, out.shape).cuda()
    got = torch.autograd.grad((out.float() * w).sum(), leaves)
    ref_leaves = [x[n].detach().clone().requires_grad_(True) for n in names]
    ref = call(sdcm_attention_reference, dict(x, **dict(zip(names, ref_leaves))))
    want = torch.autograd.grad((ref.float() * w).sum(), ref_leaves)
    for name, g, r in zip(names, got, want):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@requires_cuda
@requires_triton
def test_cuda_lip_tokens_ignore_user_branch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = dict(dtype="bfloat16", B=2, H=8, Lq=300, La=64, Lu=128, D=64, lip="prefix", lip_prefix=128, seed=71)
    x = make_inputs(case, device="cuda")
    out = call(sdcm_attention, x)
    out2 = call(sdcm_attention, dict(x, k_user=torch.randn_like(x["k_user"]), v_user=torch.randn_like(x["v_user"])))
    lip = x["lip_mask"][:, None, :].expand(out.shape[:3])
    assert torch.equal(out[lip], out2[lip])
    nan_user = dict(x, lip_mask=torch.ones_like(x["lip_mask"]), k_user=torch.full_like(x["k_user"], float("nan")))
    assert torch.isfinite(call(sdcm_attention, nan_user)).all()


@pytest.mark.gpu
@requires_cuda
@requires_triton
def test_cuda_autotune_smoke(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    caplog.set_level("INFO", logger=sdcm_mod.logger.name)
    case = dict(dtype="bfloat16", B=1, H=8, Lq=517, La=96, Lu=64, D=64, seed=72)
    x = make_inputs(case, device="cuda")
    first = call(sdcm_attention, x)
    second = call(sdcm_attention, x)
    assert torch.equal(first, second)
    tuner = sdcm_mod._kernel_for_mode(False)
    assert tuner.cache, "autotuner cached no config"
    assert any("autotune" in r.getMessage() for r in caplog.records) or sdcm_mod._logged_tunings


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--interpreter-worker":
        interpreter_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: test_sdcm_attention.py --interpreter-worker CASES.json OUT.pt")
