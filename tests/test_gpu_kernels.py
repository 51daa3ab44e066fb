"""GPU Gram kernels (issue 4): the Triton kernels against float64 torch and their pure-torch twin, the
DESIGN §3 contract through the public API, the CUDA C++ module, dispatch and DLPack.

Without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (set below, before
anything imports the kernels; small shapes, large tiles). With a GPU the same tests run on it. The
CUDA C++ kernels cannot run without a GPU: those tests skip with that reason, and a separate test
checks that the module was compiled wherever nvcc exists.
"""
from __future__ import annotations

import os
import shutil
import warnings

import torch

HAVE_GPU = torch.cuda.is_available()
if not HAVE_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of the kernels

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import rankme_fast as rf  # noqa: E402
from rankme_fast import backends  # noqa: E402
from rankme_fast.backends import triton_gpu  # noqa: E402
from rankme_fast.kernels import slices  # noqa: E402
from tests.conftest import DTYPE_IDS, build, np_rankme, ref_sv, run_python  # noqa: E402

DEV = torch.device("cuda" if HAVE_GPU else "cpu")
# CI sets RANKME_FAST_REQUIRE_TRITON=1: there a broken Triton import fails these tests instead of skipping them
REQUIRE_TRITON = os.environ.get("RANKME_FAST_REQUIRE_TRITON") == "1"
needs_triton = pytest.mark.skipif(triton_gpu.load() is None and not REQUIRE_TRITON,
                                  reason=f"triton not importable: {triton_gpu._error}")
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU on this machine (CUDA C++ kernels cannot run)")


def _tg():
    return triton_gpu.load()


def _data(rows, cols, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed * 7919 + rows * 31 + cols)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = x * torch.logspace(0, -2, cols, dtype=torch.float64)  # columns of different scales
    if rows > 3:
        x[rows // 3] *= 50.0  # an outlier row: the chunk maxima are not the typical values
    return (x + offset).to(dtype).to(DEV)


def _v(x, row_shift, col_shift):
    v = x.to(torch.float64)
    if row_shift is not None:
        v = v - row_shift[:, None]
    if col_shift is not None:
        v = v - col_shift[None, :]
    return v


def _run(x, mode, row_shift=None, col_shift=None, want_csum=True, **kw):
    cols = x.shape[1]
    p = _tg().padded(cols)
    g = torch.zeros(p, p, dtype=torch.float64, device=x.device)
    cs = torch.zeros(cols, dtype=torch.float64, device=x.device) if want_csum else None
    _tg().gram_update(x, g, col_sum=cs, row_shift=row_shift, col_shift=col_shift, mode=mode, **kw)
    return g, cs


SHAPES = [(1, 1), (37, 5), (300, 70), (5, 130), (131, 129)]
SHIFTS = ["none", "col", "row"]


def _shifts(x, which):
    rows, cols = x.shape
    if which == "col":
        return None, x[: min(rows, 50)].to(torch.float64).mean(0)
    if which == "row":
        return x.to(torch.float64).mean(1), None
    return None, None


def _fast_rel(rows: int) -> float:
    """Fast-mode error relative to |V|ᵀ|V|: tf32x3 products (its small part is truncated by the tensor
    core: ≈ 1.25·2^-20 per product) plus fp32 accumulation over up to 1024 rows before each float64 flush
    (worst case linear in the rows). The interpreter multiplies in plain fp32, well inside this."""
    return 2.0**-19 + min(rows, 1024) * 2.0**-24


TILE_CASES = [(sh, shift) for sh in SHAPES for shift in SHIFTS if shift != "row" or sh in ((37, 5), (5, 130))]


@needs_triton
@pytest.mark.parametrize("shape,shift", TILE_CASES, ids=[f"{a}x{b}-{c}" for (a, b), c in TILE_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["int8", "fp64", "fast"])
def test_triton_gram_tiles(mode, dtype, shape, shift):
    """Upper tiles of G and the column sums against float64 torch, with a per-mode error bound."""
    x = _data(*shape, dtype, offset=3.0 if shift != "none" else 0.0)
    rs, cs = _shifts(x, shift)
    g, csum = _run(x, mode, row_shift=rs, col_shift=cs)
    cols = shape[1]
    v = _v(x, rs, cs)
    ref = v.T @ v
    av = v.abs()
    got = g[:cols, :cols]
    upper = torch.triu(torch.ones(cols, cols, dtype=torch.bool, device=x.device))
    err = (got - ref).abs()[upper]
    if mode == "fp64":
        bound = (4 * (shape[0] + 2) * 2.0**-53 * (av.T @ av))[upper]
    elif mode == "int8":
        # |X̃ − X| ≤ 2^-7S · 2^E ≤ 2^(1-7S) · (column max) per entry, S from the dtype (4 when a shift is not representable)
        s_eff = slices.MAX_SLICES if (dtype == torch.float32 or dtype == torch.float64 or shift != "none") else 3
        m = av.amax(0)
        d = 2.0 ** (1 - 7 * s_eff) * m  # 2^-7S in units of 2^E, and 2^E ≤ 2·(column max)
        bound = ((d[:, None] * av.sum(0)[None, :] + av.sum(0)[:, None] * d[None, :]) * 1.01
                 + shape[0] * d[:, None] * d[None, :] + 8 * (shape[0] + 2) * 2.0**-53 * (av.T @ av))[upper]
    else:
        bound = (_fast_rel(shape[0]) * (av.T @ av) + 1e-300)[upper]  # fp32 products and accumulation (tf32x3 on a GPU)
    assert bool((err <= bound).all()), f"max err/bound {float((err / bound).max()):.3g}"
    # untouched: tiles below the diagonal stay zero, padding stays zero
    p = g.shape[0]
    bm = 64 if triton_gpu.interpreting() else 128
    for ti in range(p // bm):
        for tj in range(ti):
            assert float(g[ti * bm:(ti + 1) * bm, tj * bm:(tj + 1) * bm].abs().max()) == 0.0
    assert float(g[cols:, :].abs().max() if p > cols else 0.0) == 0.0
    cs_ref = v.sum(0)
    assert torch.allclose(csum, cs_ref, rtol=0, atol=1e-12 * float(av.sum(0).max()) + 1e-300)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_triton_int8_matches_twin(dtype, monkeypatch):
    """The int8 kernel computes exactly the scheme of its pure-torch twin (several exponent chunks)."""
    monkeypatch.setattr(_tg(), "SLICE_ROWS", 96)
    x = _data(300, 70, dtype, seed=3)
    shift = x[:50].to(torch.float64).mean(0).to(dtype).to(torch.float64)  # representable: S = 3 for bf16
    g, cs = _run(x, "int8", col_shift=shift)
    s = 4 if dtype == torch.float32 else 3
    twin = torch.zeros(70, 70, dtype=torch.float64, device=x.device)
    tcs = torch.zeros(70, dtype=torch.float64, device=x.device)
    slices.gram_update(x, twin, col_sum=tcs, col_shift=shift, slices=s, chunk_rows=96)
    got = torch.triu(g[:70, :70])
    assert torch.allclose(got, torch.triu(twin), rtol=1e-14, atol=1e-14 * float(twin.abs().max()))
    assert torch.allclose(cs, tcs, rtol=1e-14, atol=1e-14 * float(tcs.abs().max()))


def test_twin_digits_reconstruct():
    """Digit definition: t = Σ D_s 2^-(6+7s) + ρ with |ρ| ≤ 2^-7S, |D| ≤ 64 (so int8 and int32-exact)."""
    g = torch.Generator().manual_seed(5)
    v = torch.randn(500, 9, generator=g, dtype=torch.float64) * torch.logspace(-30, 30, 9, dtype=torch.float64)
    v[:, 3] = 0.0
    e = slices.column_exponents(v)
    assert bool((v.abs().amax(0) < torch.ldexp(torch.ones(9, dtype=torch.float64), e.double())).all())
    for s in (1, 2, 3, 4):
        dg = slices.digits(v, e, s)
        assert float(dg.abs().max()) <= 64
        w = 2.0 ** -(slices.FIRST_SHIFT + slices.DIGIT_BITS * torch.arange(s, dtype=torch.float64))
        t = torch.ldexp(v, (-e).double()[None, :])
        rec = (dg * w[:, None, None]).sum(0)
        assert float((rec - t).abs().max()) <= 2.0 ** (-7 * s)


@pytest.mark.parametrize("s,kind", [(4, "rank1"), (4, "power2"), (3, "rank8")])
def test_twin_scheme_contract(s, kind, matrices):
    """The slicing scheme itself (float64 emulation, no kernel) meets DESIGN §3 on collapsed spectra at
    a size where a float32 Gram fails: float32 input needs S = 4, bfloat16 input S = 3."""
    dtype = torch.float32 if s == 4 else torch.bfloat16
    x = matrices.get(kind, (4000, 256), dtype)
    g = torch.zeros(256, 256, dtype=torch.float64)
    slices.gram_update(x, g, slices=s)
    sv = torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt()
    ref = matrices.ref(kind, (4000, 256), dtype)
    assert abs(np_rankme(sv.numpy()) - np_rankme(ref.numpy())) / np_rankme(ref.numpy()) < 1e-4
    assert float((sv - ref).abs().max() / ref[0]) < 1e-6


CONTRACT_SPECTRA = ["flat", "rank1", "rank8", "power2", "exp", "rank8_noise", "repeated_rows"]
# every spectrum at one shape; the odd shapes (d not a tile multiple, N < d) with three spectra
CONTRACT_CASES = [(k, (700, 64)) for k in CONTRACT_SPECTRA] + [
    (k, sh) for sh in ((300, 130), (40, 200)) for k in ("rank1", "power2", "repeated_rows")]


@needs_triton
@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind,shape", CONTRACT_CASES, ids=[f"{k}-{a}x{b}" for k, (a, b) in CONTRACT_CASES])
def test_triton_exact_contract(matrices, kind, shape, dtype, center):
    """DESIGN §3 exact contract through rf.spectrum(backend='triton'), collapsed spectra included."""
    x = matrices.get(kind, shape, dtype, offset=2.0 if center else 0.0).to(DEV)
    s = rf.spectrum(x, center=center, backend="triton")
    assert s.backend == "triton" and s.exact
    ref = ref_sv(x.cpu(), center=center)
    sv = s.singular_values.cpu()
    assert float((sv - ref).abs().max() / ref[0]) < 1e-6
    want = np_rankme(ref.numpy())
    assert abs(s.rankme() - want) / want < 1e-4


@needs_triton
@pytest.mark.parametrize("mode", ["int8", "fp64"])
def test_triton_mode_env(monkeypatch, mode, matrices):
    monkeypatch.setenv(triton_gpu.MODE_ENV, mode)
    x = matrices.get("rank8", (500, 40), torch.float32).to(DEV)
    ref = ref_sv(x.cpu())
    got = rf.rankme(x, backend="triton")
    assert abs(got - np_rankme(ref.numpy())) / np_rankme(ref.numpy()) < 1e-4
    monkeypatch.setenv(triton_gpu.MODE_ENV, "int4")
    with pytest.raises(ValueError, match="RANKME_FAST_TRITON_MODE"):
        rf.rankme(x, backend="triton")


@needs_triton
def test_triton_accumulator_matches_torch(matrices):
    """Streaming through the Triton backend: several batches, both conventions, vs the torch backend."""
    x = matrices.get("power1", (900, 70), torch.float32, offset=1.5).to(DEV)
    a, b = rf.GramAccumulator(backend="triton"), rf.GramAccumulator(backend="torch")
    for r0 in range(0, 900, 250):
        a.update(x[r0:r0 + 250])
        b.update(x[r0:r0 + 250])
    assert a.backend == "triton"
    for center in (False, True):
        ga, gb = a.gram(center), b.gram(center)
        assert torch.allclose(ga, gb, rtol=0, atol=1e-7 * float(gb.abs().max()))
        assert abs(a.spectrum(center).rankme() - b.spectrum(center).rankme()) < 1e-6


@needs_triton
def test_triton_fast_scale_and_bound(matrices):
    """Fast mode: a power-of-two scale keeps tiny inputs out of float32 underflow, divided out exactly."""
    x = (matrices.get("power1", (200, 40), torch.float64) * 1e-30).to(torch.float32).to(DEV)
    g, _ = _run(x, "fast", want_csum=False, scale=2.0**100)
    v = x.to(torch.float64)
    ref = v.T @ v
    got = torch.triu(g[:40, :40])
    assert float((got - torch.triu(ref)).abs().max() / ref.abs().max()) < _fast_rel(200)
    g0, _ = _run(x, "fast", want_csum=False)  # unscaled: the squares underflow float32
    assert float(g0.abs().max()) < 1e-3 * float(ref.abs().max())


@needs_triton
def test_triton_fast_float64_scaled_before_rounding():
    """float64 input far outside float32's range: the scale is applied in float64, then rounded."""
    for mag in (1e-50, 1e40):
        x = (torch.randn(300, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * mag).to(DEV)
        amax = float(x.abs().max())
        import math  # noqa: PLC0415
        g, _ = _run(x, "fast", want_csum=False, scale=2.0 ** min(126, max(-126, -math.floor(math.log2(amax)))))
        ref = x.T @ x
        assert float((torch.triu(g[:40, :40]) - torch.triu(ref)).abs().max() / ref.abs().max()) < _fast_rel(300)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy on NaN inside the interpreter
@pytest.mark.parametrize("center", [False, True])
def test_triton_int8_nonfinite_input_reported(center):
    """Integer digits cannot carry NaN/Inf: the kernel path must still surface them (never a finite Gram)."""
    x = _data(200, 30, torch.float32)
    x[17, 4] = float("nan")
    x[150, 9] = float("inf")
    g, _ = _run(x, "int8", want_csum=False)
    assert not bool(torch.isfinite(g[:30, :30]).all())
    with pytest.raises(ValueError, match=r"found 2 non-finite values \(1 NaN, 1 Inf\).*first in row 17"):
        rf.spectrum(x, center=center, backend="triton")


@needs_triton
def test_triton_bad_arguments():
    x = _data(10, 5, torch.float32)
    g = torch.zeros(5, 5, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="gram must be a contiguous float64"):
        _tg().gram_update(x, g)
    with pytest.raises(ValueError, match="mode must be one of"):
        _tg().gram_update(x, torch.zeros(128, 128, dtype=torch.float64, device=DEV), mode="int4")
    with pytest.raises(ValueError, match="col_shift: need a contiguous float64 vector of length 5"):
        triton_gpu.gram_update(x, torch.zeros(128, 128, dtype=torch.float64, device=DEV),
                               col_shift=torch.zeros(4, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match="precision must be"):
        triton_gpu.gram_update(x, torch.zeros(128, 128, dtype=torch.float64, device=DEV), precision="tf32")


# ------------------------------------------------------------------------------------------------
# compilation for a Hopper target (no GPU needed: Triton's own ptxas)


COMPILE_SCRIPT = r"""
import json, os, re, subprocess, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rankme_fast.kernels.triton import gram as k
tgt = GPUTarget("cuda", 90, 32)
PT = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}


def comp(fn, sig, consts, warps, stages=3):
    # stride_c == 1 is a constexpr at launch (Triton specialises ints equal to 1): compile it so, with
    # the launch's warps and stages, so this is the kernel that runs (vectorised loads, its shared memory)
    if "stride_c" in fn.arg_names:
        consts = dict(consts, stride_c=1)
    sig = dict(sig, **{c: "constexpr" for c in consts})
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=tgt,
                        options={"num_warps": warps, "num_stages": stages})
    RES.append(res_usage(ck.asm.get("cubin")))
    return ck.asm["ptx"], int(ck.metadata.shared)


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
RES = []


def res_usage(cubin):
    # (registers, stack bytes) of the cubin's kernel from `cuobjdump -res-usage` (None when unavailable)
    if not cubin or not os.path.exists(CUOBJDUMP):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        txt = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", txt)
    return [int(m.group(1)), int(m.group(2))] if m else None


out = {}
xs = {"stride_r": "i32", "n_rows": "i32", "n_cols": "i32", "rs_ptr": "*fp64", "cs_ptr": "*fp64"}
c8 = k.int8_config(interpret=False)
for s_ in (3, 4):
    ptx, sh = comp(k._gram_int8_kernel, {"dig_ptr": "*i8", "ti_ptr": "*i32", "tj_ptr": "*i32", "out_ptr": "*i32",
                   "rows_pad": "i32", "cols_pad": "i32", "k_end": "i32", "k_per_prog": "i32"},
                   {"SLICES": s_, "BM": c8["BM"], "BK": c8["BK"]}, c8["num_warps"])
    out[f"int8_S{s_}"] = {"ok": "wgmma" in ptx and ".s8" in ptx, "shared": sh, "res": RES[-1]}
for dt in (torch.bfloat16, torch.float32):
    ptx, sh = comp(k._digits_kernel, dict(xs, x_ptr=PT[dt], inv_scale_ptr="*fp64", dig_ptr="*i8", rows_pad="i32",
                   cols_pad="i32"), {"HAS_RS": False, "HAS_CS": True, "SLICES": 3, "BR": c8["BR"], "BC": c8["BC"]}, 4)
    out[f"digits_{PT[dt][1:]}"] = {"ok": "cvt" in ptx, "shared": sh}
    ptx, sh = comp(k._colstats_kernel, dict(xs, x_ptr=PT[dt], max_ptr="*fp64", sum_ptr="*fp64", rows_per_prog="i32"),
                   {"HAS_RS": False, "HAS_CS": True, "BR": c8["BR"], "BC": c8["BC"]}, 4)
    out[f"colstats_{PT[dt][1:]}"] = {"ok": True, "shared": sh}
fsig = dict(xs, scale="fp32", ti_ptr="*i32", tj_ptr="*i32", out_ptr="*fp64", csum_ptr="*fp64", rows_per_prog="i32")
for mode, dt, shifted in (("fast", torch.bfloat16, False), ("fast", torch.bfloat16, True), ("fast", torch.float32, False),
                          ("fast", torch.float32, True), ("fast", torch.float64, False), ("fp64", torch.float32, False),
                          ("fp64", torch.bfloat16, True), ("fp64", torch.float64, False)):
    cfg = k.float_config(mode, dt, shifted, interpret=False)
    native16 = mode == "fast" and dt != torch.float32 and dt != torch.float64 and not shifted
    consts = {"MODE": 1 if mode == "fp64" else 0, "NATIVE16": native16, "IN_PREC": "tf32x3", "HAS_RS": False,
              "HAS_CS": shifted, "WANT_CSUM": True, "BM": cfg["BM"], "BK": cfg["BK"], "FOLD": cfg["FOLD"],
              "X_F64": dt == torch.float64}
    ptx, sh = comp(k._gram_float_kernel, dict(fsig, x_ptr=PT[dt]), consts, cfg["num_warps"], cfg["num_stages"])
    ok = ("mma" in ptx or "fma.rn.f64" in ptx) if mode == "fp64" else ("mma" in ptx)
    out[f"{mode}_{PT[dt][1:]}{'_shifted' if shifted else ''}"] = {"ok": ok, "shared": sh, "res": RES[-1]}
print(json.dumps(out))
"""


def _can_compile_cuda() -> str:
    try:
        import triton  # noqa: F401, PLC0415
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401, PLC0415
    except Exception as exc:  # noqa: BLE001
        return f"Triton's CUDA backend is not importable: {exc}"
    return ""


@needs_triton
def test_triton_kernels_compile_for_hopper(tmp_path):
    """Every kernel configuration the launcher uses (its tiles, warps, stages and the stride-1 specialisation
    of a launch) lowers to sm_90 PTX within the shared-memory limit; the int8 Gram uses wgmma s8."""
    why = _can_compile_cuda()
    if why:
        pytest.skip(why)
    import json  # noqa: PLC0415

    res = run_python(COMPILE_SCRIPT, tmp_path, env_extra={"TRITON_DEFAULT_FP_FUSION": "1"}, timeout=600)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["int8_S3"]["ok"] and out["int8_S4"]["ok"], f"int8 Gram kernel did not use wgmma with s8 operands: {out}"
    bad = {name: r for name, r in out.items() if not r["ok"]}
    assert not bad, f"kernels without tensor-core/float64 products: {bad}"
    # a launch asking for more shared memory than sm_90 has raises OutOfResources on the GPU
    big = {name: r["shared"] for name, r in out.items() if r["shared"] > triton_gpu.load().SM90_MAX_SHARED}
    assert not big, f"launched configurations above sm_90's {triton_gpu.load().SM90_MAX_SHARED} B of shared memory: {big}"
    # RESULTS.md's register claims, read from the cubins (cuobjdump ships with Triton's CUDA backend)
    res = {name: r["res"] for name, r in out.items() if r.get("res")}
    if not res:
        pytest.skip("cuobjdump not found next to Triton's ptxas: registers and stack not checked")
    assert all(regs <= 255 for regs, _ in res.values()), res
    no_stack = ("int8_S3", "int8_S4", "fast_bf16")  # the int8 Gram and fast bf16: no spill (0 bytes stack)
    assert all(res[k][1] == 0 for k in no_stack if k in res), {k: res.get(k) for k in no_stack}
    assert all(stack <= 256 for _, stack in res.values()), f"a launched kernel spills more than 256 B: {res}"


# ------------------------------------------------------------------------------------------------
# CUDA C++ module


def test_triton_importable_when_required():
    """RANKME_FAST_REQUIRE_TRITON=1 (CI): Triton must import, so ~250 kernel tests cannot skip silently."""
    if not REQUIRE_TRITON:
        pytest.skip("RANKME_FAST_REQUIRE_TRITON is not set (CI sets it)")
    assert triton_gpu.load() is not None, f"RANKME_FAST_REQUIRE_TRITON=1 but triton did not load: {triton_gpu._error}"


def test_cuda_kernels_do_not_spill():
    """RESULTS.md's claim for the CUDA C++ kernels, read from the built module's cubins
    (`cuobjdump -res-usage`): every kernel has 0 bytes of stack (no spills) and at most 255 registers."""
    import re  # noqa: PLC0415

    try:
        from rankme_fast import _build_info  # noqa: PLC0415
    except ImportError:
        pytest.skip("running from a source tree without a build")
    if not _build_info.cuda_built:
        pytest.skip("rankme_fast._C_cuda was not built (no nvcc)")
    try:
        import triton  # noqa: PLC0415
    except ImportError:
        pytest.skip("cuobjdump is taken from Triton's CUDA backend, and triton is not importable")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool:
        pytest.skip("no cuobjdump")
    import glob  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    so = glob.glob(os.path.join(os.path.dirname(rf.__file__), "_C_cuda*.so"))
    assert so, "cuda_built but no _C_cuda*.so next to the package"
    txt = subprocess.run([tool, "-res-usage", so[0]], capture_output=True, text=True, timeout=120).stdout
    usage = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+)", txt)
    kernels = {name: (int(r), int(st)) for name, r, st in usage if "gram" in name}
    assert kernels, f"no Gram kernels found in {so[0]}: {txt[:500]}"
    assert all(st == 0 for _, st in kernels.values()), {k: v for k, v in kernels.items() if v[1]}
    assert all(r <= 255 for r, _ in kernels.values())


def test_cuda_module_built_where_nvcc_exists():
    """The CMake build compiles rankme_fast._C_cuda whenever a CUDA compiler is found (CI has nvcc)."""
    try:
        from rankme_fast import _build_info  # noqa: PLC0415
    except ImportError:
        pytest.skip("running from a source tree without a build")
    nvcc = shutil.which("nvcc")
    if not nvcc or _build_info.cuda_option == "OFF":
        pytest.skip(f"no nvcc on PATH (or RANKME_FAST_CUDA=OFF: {_build_info.cuda_option})")
    assert _build_info.cuda_built, "nvcc exists but _C_cuda was not built"
    from rankme_fast import _C_cuda  # noqa: PLC0415 - importable without a GPU (static cudart)

    assert _C_cuda.TILE == backends.cuda.TILE
    assert hasattr(_C_cuda, "gram_update")


def test_cuda_entry_point_validates_without_gpu():
    """The C++ entry point rejects inconsistent arguments before any CUDA call (runs without a GPU)."""
    mod = backends.cuda.load()
    if mod is None:
        pytest.skip(f"_C_cuda not built: {backends.cuda._error}")
    fake = 1 << 20  # never dereferenced: validation fails first, or rows == 0 returns at once

    def call(**kw):
        a = dict(x=fake, dtype=1, rows=100, cols=70, sr=70, sc=1, rs=0, cs=0, gram=fake, ldg=128, col_sum=0,
                 ti=fake, tj=fake, n_tiles=3, splits=2, per=50, ws=fake, cws=0, mode=0, scale=1.0, stream=0)
        a.update(kw)
        return mod.gram_update(*a.values())

    call(rows=0)  # nothing to do: returns without touching the device
    for bad in ({"cols": 0}, {"ldg": 64}, {"splits": 1}, {"per": 0}, {"ws": 0}, {"col_sum": fake},
                {"scale": 0.0}, {"n_tiles": 0}):
        with pytest.raises(RuntimeError, match="rankme_fast CUDA gram_update failed: invalid argument"):
            call(**bad)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        call(dtype=9)


@needs_gpu
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("shift", ["none", "col", "row"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (3000, 70), (5, 130), (1031, 257)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_gram_tiles(shape, dtype, shift, precision):
    if backends.cuda.load() is None:
        pytest.skip(f"_C_cuda not built: {backends.cuda._error}")
    x = _data(*shape, dtype, offset=3.0 if shift != "none" else 0.0)
    rs, cs = _shifts(x, shift)
    cols = shape[1]
    p = backends.cuda.padded(cols)
    g = torch.zeros(p, p, dtype=torch.float64, device=DEV)
    csum = torch.zeros(cols, dtype=torch.float64, device=DEV)
    backends.cuda.gram_update(x, g, col_sum=csum, row_shift=rs, col_shift=cs, precision=precision)
    torch.cuda.synchronize()
    v = _v(x, rs, cs)
    av = v.abs()
    ref = v.T @ v
    tol = (4 * (shape[0] + 2) * 2.0**-53 if precision == "exact" else 2.0**-20) * (av.T @ av)
    upper = torch.triu(torch.ones(cols, cols, dtype=torch.bool, device=DEV))
    assert bool(((g[:cols, :cols] - ref).abs() <= tol + 1e-300)[upper].all())
    assert torch.allclose(csum, v.sum(0), rtol=0, atol=1e-12 * float(av.sum(0).max()) + 1e-300)


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["rank1", "rank8", "power2", "repeated_rows"])
def test_gpu_exact_contract_large(matrices, backend, kind):
    """DESIGN §3 on a GPU at a size where the float32 Gram fails."""
    if not backends.BACKENDS[backend].available(DEV)[0]:
        pytest.skip(backends.BACKENDS[backend].available(DEV)[1])
    for dtype in (torch.float32, torch.bfloat16):
        x = matrices.get(kind, (20000, 512), dtype).to(DEV)
        for center in (False, True):
            s = rf.spectrum(x, center=center, backend=backend)
            ref = ref_sv(x.cpu(), center=center)
            assert float((s.singular_values.cpu() - ref).abs().max() / ref[0]) < 1e-6
            assert abs(s.rankme() - np_rankme(ref.numpy())) / np_rankme(ref.numpy()) < 1e-4


def _abs_stats(x: torch.Tensor, chunk: int = 1 << 18):
    """float64 G = XᵀX, A = |X|ᵀ|X|, column max |X| and column Σ|X| of a large GPU matrix, in row chunks."""
    d = x.shape[1]
    g = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    a = torch.zeros_like(g)
    mx = torch.zeros(d, dtype=torch.float64, device=x.device)
    sm = torch.zeros_like(mx)
    for r0 in range(0, x.shape[0], chunk):
        v = x[r0:r0 + chunk].to(torch.float64)
        g += v.T @ v
        v = v.abs_()
        a += v.T @ v
        mx = torch.maximum(mx, v.amax(0))
        sm += v.sum(0)
    return g, a, mx, sm


@needs_gpu
@pytest.mark.parametrize("case", ["bf16-2200000x1024", "fp32-40000x4096", "fp32-transposed-50000x1024"])
def test_gpu_gram_large_multichunk(case):
    """Real multi-chunk shapes (GPU-REVIEW §4): N·d > 2^31 elements, 528 tiles over 2 int8 chunks, and a
    transposed (column-major) view; every Triton mode and CUDA precision against a chunked float64 Gram."""
    gen = torch.Generator(device=DEV).manual_seed(5)
    if case.startswith("bf16"):
        x = torch.randn(2_200_000, 1024, device=DEV, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    elif case == "fp32-40000x4096":
        x = torch.randn(40_000, 4096, device=DEV, generator=gen)
    else:
        x = torch.randn(1024, 50_000, device=DEV, generator=gen).T  # strides (1, 50000)
    rows, cols = x.shape
    ref, a, mx, sm = _abs_stats(x)
    upper = torch.triu(torch.ones(cols, cols, dtype=torch.bool, device=DEV))
    s_eff = 3 if x.dtype == torch.bfloat16 else slices.MAX_SLICES
    dl = 2.0 ** (1 - 7 * s_eff) * mx  # per-entry slicing perturbation bound (int8 mode)
    bounds = {
        "fp64": 4 * (rows + 2) * 2.0**-53 * a,
        "int8": (dl[:, None] * sm[None, :] + sm[:, None] * dl[None, :]) * 1.01 + rows * dl[:, None] * dl[None, :]
        + 8 * (rows + 2) * 2.0**-53 * a,
        "fast": _fast_rel(rows) * a,
    }
    got = {}
    for mode in ("int8", "fp64", "fast"):
        p = _tg().padded(cols)
        g = torch.zeros(p, p, dtype=torch.float64, device=DEV)
        _tg().gram_update(x, g, mode=mode)
        got[f"triton-{mode}"] = (g[:cols, :cols], bounds[mode])
    cuda_be = backends.BACKENDS["cuda"]
    if cuda_be.available(DEV)[0]:
        for prec, bound in (("exact", bounds["fp64"]), ("fast", bounds["fast"])):
            p = cuda_be.padded(cols)
            g = torch.zeros(p, p, dtype=torch.float64, device=DEV)
            cuda_be.gram_update(x, g, precision=prec)
            got[f"cuda-{prec}"] = (g[:cols, :cols], bound)
    for name, (g, bound) in got.items():
        err = (g - ref).abs()[upper]
        assert bool((err <= bound[upper] + 1e-300).all()), f"{name}: max err/bound {float((err / bound[upper]).max()):.3g}"
    scale = float(ref.diagonal().max())
    diff = (got["triton-int8"][0] - got["triton-fp64"][0]).abs()[upper]
    assert float(diff.max()) / scale < 1e-9, "int8 slicing and float64 tiles disagree"


@needs_gpu
def test_gpu_fast_mode_bound(matrices):
    for kind in ("flat", "rank1", "power2"):
        x = matrices.get(kind, (20000, 512), torch.bfloat16).to(DEV)
        ref = np_rankme(ref_sv(x.cpu()).numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the refinement pass may announce itself
            s = rf.spectrum(x, precision="fast")
        assert s.backend.endswith("-fast") and not s.exact
        assert abs(s.rankme() - ref) / ref < s.rankme_rtol


# ------------------------------------------------------------------------------------------------
# dispatch, DLPack


def test_dispatch_table_and_order():
    t = backends.dispatch_table()
    assert set(t["order"]) == {"exact", "fast"} and isinstance(t["measured"], bool)
    for prec in ("exact", "fast"):
        for dt in ("float64", "float32", "float16", "bfloat16"):
            assert "torch" in t["order"][prec][dt]  # the fallback is always there (measured orders may rank it first)
    assert backends.gpu_order(torch.float32, (10, 10)) == ["torch"]  # tiny: launch cost dominates
    assert backends.gpu_order(torch.bfloat16, (10**6, 4096)) == t["order"]["exact"]["bfloat16"]
    assert backends.gpu_order(torch.float64, (4096, 10**6), "fast") == t["order"]["fast"]["float64"]


def test_select_cuda_without_gpu_falls_back_or_raises(monkeypatch):
    if HAVE_GPU:
        pytest.skip("this machine has a GPU")
    cuda = torch.device("cuda")
    assert backends.select(None, cuda, dtype=torch.float32, shape=(10**6, 1024)) is backends.torch_ref
    for name in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match=f"backend '{name}' was requested but cannot run on cuda"):
            backends.select(name, cuda)
    monkeypatch.setenv("RANKME_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda' was requested"):
        backends.select(None, torch.device("cpu"))


def test_auto_never_picks_triton_for_cpu_tensors(matrices):
    x = matrices.get("power1", (300, 20), torch.float32)
    assert rf.spectrum(x).backend in ("cpu", "torch")


def test_dlpack_zero_copy_numpy():
    """Objects exporting __dlpack__ (NumPy here; CuPy/JAX arrays on a GPU alike) are viewed, not copied."""
    from rankme_fast._inputs import as_tensor  # noqa: PLC0415

    class Exporter:  # only the protocol, as CuPy and JAX expose it
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    a = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    t = as_tensor(Exporter(a))
    assert t.data_ptr() == a.ctypes.data
    ref = np_rankme(np.linalg.svd(a.astype(np.float64), compute_uv=False))
    assert abs(rf.rankme(Exporter(a)) - ref) / ref < 1e-6


@needs_gpu
def test_dlpack_zero_copy_cupy():
    cp = pytest.importorskip("cupy", reason="CuPy not installed")
    a = cp.random.standard_normal((4000, 64), dtype=cp.float32)
    from rankme_fast._inputs import as_tensor  # noqa: PLC0415

    t = as_tensor(a)
    assert t.is_cuda and t.data_ptr() == a.data.ptr
    ref = np_rankme(np.linalg.svd(cp.asnumpy(a).astype(np.float64), compute_uv=False))
    assert abs(rf.rankme(a) - ref) / ref < 1e-4


@needs_triton
# the unscaled first try of 1e160 float64 overflows (the interpreter's NumPy matmul says so); the Gram's
# diagonal shows it and the route redoes the product on the exact 2^k copy
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", ("int8", "fp64"))
@pytest.mark.parametrize("dtype, mag", [(torch.float64, 1e-160), (torch.float64, 1e160), (torch.float32, 1e-30)],
                         ids=("f64-1e-160", "f64-1e160", "f32-1e-30"))
def test_triton_route_tiny_and_huge_is_exact(monkeypatch, mode, dtype, mag):
    """Issue 14 item 8 on the GPU route: embeddings whose squares underflow or overflow (float64 beyond
    1e±154, float32 beyond float32's squares) give the float64-SVD RankMe through the Triton backend, in
    memory and streamed through the accumulator, raw and centred, in both exact variants (int8 slices,
    fp64) — the exact power-of-two scaling happens before the kernel whatever the device (here: the
    interpreter without a GPU)."""
    monkeypatch.setenv("RANKME_FAST_TRITON_MODE", mode)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(160, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 12, dtype=torch.float64)
    x = (base * mag).to(dtype)
    acc = rf.GramAccumulator(backend="triton")
    for r0 in range(0, 160, 80):
        acc.update(x[r0:r0 + 80].to(DEV))
    assert acc.backend == "triton"
    for center in (False, True):
        v = x.to(torch.float64) / mag  # σ(x) / mag: the same spectrum up to scale
        if center:
            v = v - v.mean(0)
        want = float(np_rankme(ref_sv(v.numpy()).numpy()))
        got = rf.rankme(x.to(DEV), center=center, backend="triton")
        assert abs(got - want) <= 1e-9 * want, (center, got, want)
        got = acc.spectrum(center).rankme()
        assert abs(got - want) <= 1e-9 * want, (center, got, want)


@needs_gpu
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype, mag", [(torch.float64, 1e-160), (torch.float64, 1e160), (torch.float32, 1e-30)],
                         ids=("f64-1e-160", "f64-1e160", "f32-1e-30"))
def test_cuda_route_tiny_and_huge_is_exact(dtype, mag):
    """The same through the CUDA C++ backend (GPU only)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(160, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 12, dtype=torch.float64)
    x = (base * mag).to(dtype)
    acc = rf.GramAccumulator(backend="cuda")
    for r0 in range(0, 160, 80):
        acc.update(x[r0:r0 + 80].cuda())
    for center in (False, True):
        v = x.to(torch.float64) / mag
        if center:
            v = v - v.mean(0)
        want = float(np_rankme(ref_sv(v.numpy()).numpy()))
        assert abs(rf.rankme(x.cuda(), center=center, backend="cuda") - want) <= 1e-9 * want
        assert abs(acc.spectrum(center).rankme() - want) <= 1e-9 * want
