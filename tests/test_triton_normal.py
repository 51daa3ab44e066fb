"""Triton fused normal operator (issue 5, item 1, GPU side): Vᵀ(V W) against float64 torch, under
``TRITON_INTERPRET=1`` on CPU tensors when there is no GPU (set below, before anything imports the
kernels; small shapes), on the GPU when there is one; the approximate methods driven through it; and
compilation of both modes for sm_90.
"""
from __future__ import annotations

import os

import torch

HAVE_GPU = torch.cuda.is_available()
if not HAVE_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of the kernels

import pytest  # noqa: E402

from rankme_fast import approx  # noqa: E402
from rankme_fast.backends import triton_gpu  # noqa: E402
from tests.conftest import run_python  # noqa: E402

DEV = torch.device("cuda" if HAVE_GPU else "cpu")
# CI sets RANKME_FAST_REQUIRE_TRITON=1: a broken Triton import then fails these tests instead of skipping them
pytestmark = pytest.mark.skipif(triton_gpu.load() is None and os.environ.get("RANKME_FAST_REQUIRE_TRITON") != "1",
                                reason=f"triton not importable: {triton_gpu._error}")


def _kernels():
    from rankme_fast.kernels.triton import normal  # noqa: PLC0415 - after TRITON_INTERPRET is set

    return normal


def _data(n, d, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed * 101 + n * 7 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return (x + offset).to(dtype).to(DEV)


def _ref(x, w, shift):
    v = x.to(torch.float64)
    if shift is not None:
        v = v - shift
    # a bound on every output's rounding: |V|ᵀ(|V||W|)
    return v.T @ (v @ w), v.abs().T @ (v.abs() @ w.abs())


@pytest.mark.parametrize("mode", ["fp64", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("n,d,k", [(70, 50, 1), (130, 33, 5), (40, 100, 17)])
@pytest.mark.parametrize("shift", [False, True], ids=["raw", "shifted"])
def test_normal_kernel_matches_float64(mode, dtype, n, d, k, shift):
    x = _data(n, d, dtype, offset=3.0 if shift else 0.0)
    sh = x.to(torch.float64).mean(0) if shift else None
    w = torch.randn(d, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64).to(DEV)
    got = _kernels().normal_apply(x, w, col_shift=sh, mode=mode)
    want, bound = _ref(x, w, sh)
    assert got.dtype == torch.float64 and got.shape == (d, k)
    # fp64: float64 products and sums; fp32: float32 within a block of ≤ BM rows (the tiles of V are
    # rounded to float32 once, the sums over d and rows in float32), float64 across blocks
    rel = 1e-12 if mode == "fp64" else 2e-5
    assert bool(((got - want).abs() <= rel * bound + 1e-300).all()), float(((got - want).abs() / bound).max())


def test_normal_kernel_wide_block_and_strides():
    """k > MAX_K goes MAX_K columns per pass; a transposed (column-major) view is read in place."""
    nk = _kernels()
    base = _data(60, 90, torch.float32)
    x = base.T  # (90, 60), strides (1, 90)
    w = torch.randn(60, nk.MAX_K + 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEV)
    got = nk.normal_apply(x, w, block_rows=32, block_cols=64)
    want, bound = _ref(x, w, None)
    assert bool(((got - want).abs() <= 1e-12 * bound).all())


@pytest.mark.parametrize("kind", ["rank1", "rank8", "d1"])
def test_normal_kernel_collapsed_and_thin(kind):
    """Collapsed inputs (rank 1, rank 8 with a large common offset, centred) and d = 1, float64 mode."""
    g = torch.Generator().manual_seed(11)
    if kind == "d1":
        x, sh = torch.randn(90, 1, generator=g, dtype=torch.float64), None
    else:
        r = 1 if kind == "rank1" else 8
        x = torch.randn(120, r, generator=g, dtype=torch.float64) @ torch.randn(r, 70, generator=g, dtype=torch.float64)
        x = x + 5.0
        sh = x.mean(0)
    x = x.to(torch.float32).to(DEV)
    sh = sh.to(DEV) if sh is not None else None
    w = torch.randn(x.shape[1], 3, generator=g, dtype=torch.float64).to(DEV)
    got = _kernels().normal_apply(x, w, col_shift=sh)
    want, bound = _ref(x, w, sh)
    assert bool(((got - want).abs() <= 1e-12 * bound + 1e-300).all())


def test_normal_kernel_bad_arguments():
    nk = _kernels()
    x = _data(10, 8, torch.float32)
    w = torch.zeros(8, 2, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="mode must be one of"):
        nk.normal_apply(x, w, mode="tf32")
    with pytest.raises(ValueError, match=r"needs x \(N, d\) and w \(d, k\)"):
        nk.normal_apply(x, w[:5])
    with pytest.raises(TypeError, match="does not support dtype"):
        nk.normal_apply(x.to(torch.int32), w)
    with pytest.raises(ValueError, match="col_shift must be float64"):
        nk.normal_apply(x, w, col_shift=torch.zeros(8, dtype=torch.float32, device=DEV))
    assert nk.normal_apply(x[:0], w).abs().sum() == 0


@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
def test_approx_methods_through_triton_operator(center):
    """SLQ and Lanczos driven by the Triton operator give the results of the native CPU operator."""
    x = _data(160, 40, torch.float32, offset=1.0 if center else 0.0).cpu()

    def op(use_triton):
        if not use_triton:
            return approx.NormalOperator(x, center=center)
        o = approx.NormalOperator(x.to(DEV), center=center)
        o.native, o.triton = False, True  # on CPU tensors: the kernel under the interpreter
        return o

    qa, ta = approx.slq_quadrature(op(True), probes=4, steps=12)
    qb, tb = approx.slq_quadrature(op(False), probes=4, steps=12)
    assert torch.allclose(qa.nodes, qb.nodes, rtol=1e-9, atol=1e-9 * float(qb.nodes.max()))
    la = approx.lanczos_topk(op(True), 4, tol=1e-10)
    lb = approx.lanczos_topk(op(False), 4, tol=1e-10)
    assert torch.allclose(la.eigenvalues, lb.eigenvalues, rtol=1e-10)
    v = x.double() - (x.double().mean(0) if center else 0)
    assert torch.allclose(la.eigenvalues, torch.linalg.eigvalsh(v.T @ v).flip(0)[:4], rtol=1e-9)


COMPILE_SCRIPT = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rankme_fast.kernels.triton import normal as k
tgt = GPUTarget("cuda", 90, 32)
out = {}
sig = {"x_ptr": "*bf16", "stride_r": "i32", "stride_c": "constexpr", "n_rows": "i32", "n_cols": "i32", "cs_ptr": "*fp64",
       "w_ptr": "*fp64", "out_ptr": "*fp64", "rows_per_prog": "i32"}
for mode, f64 in (("fp64", True), ("fp32", False)):
    ok = True
    for kp, bd, warps in ((16, 64, 4), (64, 32, 8)):  # the launcher's two configurations
        # stride_c == 1 is specialised to a constexpr at launch: compile the kernel that runs
        consts = {"stride_c": 1, "HAS_CS": True, "F64": f64, "BM": 32, "BD": bd, "KP": kp}
        s = dict(sig, **{c: "constexpr" for c in consts})
        ck = triton.compile(ASTSource(fn=k._normal_kernel, signature=s, constexprs=consts), target=tgt,
                            options={"num_warps": warps})
        ptx = ck.asm["ptx"]
        ok &= ("mma" in ptx or "fma.rn.f64" in ptx) if f64 else ("mma" in ptx or "fma.rn.f32" in ptx)
        ok &= int(ck.metadata.shared) <= 232448  # sm_90's opt-in shared memory per block
    out[mode] = bool(ok)
print(json.dumps(out))
"""


def test_normal_kernel_compiles_for_hopper(tmp_path):
    """Both modes lower to sm_90 PTX with float64 (DMMA or FMA) / float32 products."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401, PLC0415
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Triton's CUDA backend is not importable: {exc}")
    import json  # noqa: PLC0415

    res = run_python(COMPILE_SCRIPT, tmp_path, timeout=600)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"fp64": True, "fp32": True}, out
