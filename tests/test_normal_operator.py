"""The fused normal operator Vᵀ(V W) (issue 5, part 1): the native CPU kernel against its float64
pure-torch twin and float64 torch, over dtypes, odd shapes, k across the vector-group boundaries,
shifts, strided views, threads; bad input."""
from __future__ import annotations

import pytest
import torch

from rankme_fast.backends import cpu, torch_ref
from tests.conftest import DTYPE_IDS, require_native


@pytest.fixture
def native():
    require_native()
    return cpu


def _x(rows, cols, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed + 13 * rows + cols)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.logspace(0, -2, cols, dtype=torch.float64)
    return (x + offset).to(dtype)


def _ref(x, w, shift=None):
    v = x.to(torch.float64)
    if shift is not None:
        v = v - shift
    return v.T @ (v @ w.to(torch.float64))


def _bound(x, w, shift, single):
    v = x.to(torch.float64)
    if shift is not None:
        v = v - shift
    av = v.abs()
    mag = av.T @ (av @ w.to(torch.float64).abs())
    u = 2.0**-22 if single else 2.0**-50  # unit roundoff of the block arithmetic, with slack for the sums
    return (x.shape[1] + 256) * u * mag + 1e-300


# k across the vector-group edges (1, 2, 4 vectors; several groups); every k at one shape
CASES = [(sh, k) for sh in ((1, 1), (7, 5), (300, 37), (5, 300)) for k in (1, 3, 8, 16, 17)] + [
    ((1000, 130), k) for k in (1, 3, 8, 16, 17, 33, 64, 100)]


@pytest.mark.parametrize("single", [True, False], ids=["f32blocks", "f64"])
@pytest.mark.parametrize("shape,k", CASES, ids=[f"{a}x{b}-k{k}" for (a, b), k in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_normal_apply_grid(native, dtype, shape, k, single):
    x = _x(*shape, dtype)
    w = torch.randn(shape[1], k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got = native.normal_apply(x, w, single_precision=single, num_threads=2)
    want = _ref(x, w)
    assert got.dtype == torch.float64 and got.shape == (shape[1], k)
    assert bool(((got - want).abs() <= _bound(x, w, None, single)).all())
    twin = torch_ref.normal_apply(x, w)
    assert torch.allclose(twin, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()) + 1e-300)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_normal_apply_shift_strides_threads(native, threads):
    base = _x(2000, 96, torch.float32, offset=5.0)
    x = base[::2, 1::2]  # strided view: rows and columns
    shift = x[:100].to(torch.float64).mean(0)
    w = torch.randn(48, 12, dtype=torch.float64)
    got = native.normal_apply(x, w, col_shift=shift, num_threads=threads)
    want = _ref(x, w, shift)
    assert bool(((got - want).abs() <= _bound(x, w, shift, True)).all())
    got64 = native.normal_apply(x, w, col_shift=shift, single_precision=False, num_threads=threads)
    assert torch.allclose(got64, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    assert torch.allclose(torch_ref.normal_apply(x, w, col_shift=shift), want, rtol=1e-12,
                          atol=1e-12 * float(want.abs().max()))


def test_normal_apply_is_gram_times_w(native):
    """Consistency with the exact Gram kernel: GW from the operator = (XᵀX) W."""
    x = _x(3000, 70, torch.bfloat16)
    g = torch.zeros(cpu.padded(70), cpu.padded(70), dtype=torch.float64)
    native.gram_update(x, g)
    gfull = torch.triu(g[:70, :70]) + torch.triu(g[:70, :70], 1).T
    w = torch.randn(70, 5, dtype=torch.float64)
    got = native.normal_apply(x, w, single_precision=False)
    assert torch.allclose(got, gfull @ w, rtol=1e-11, atol=1e-11 * float(got.abs().max()))


def test_normal_apply_empty_and_bad_input(native):
    w = torch.ones(4, 2, dtype=torch.float64)
    assert float(native.normal_apply(torch.zeros(0, 4), w).abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"w must be a \(d=4, k\) float CPU tensor"):
        native.normal_apply(torch.ones(3, 4), torch.ones(5, 2))
    with pytest.raises(ValueError, match=r"w must be a \(d=4, k\)"):
        native.normal_apply(torch.ones(3, 4), torch.ones(4, 0))
    with pytest.raises(ValueError, match="expects a 2-D CPU tensor"):
        native.normal_apply(torch.ones(3, 4, 1), w)
    with pytest.raises(TypeError, match="does not support dtype"):
        native.normal_apply(torch.ones(3, 4, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="col_shift: need a contiguous float64 CPU vector of length 4"):
        native.normal_apply(torch.ones(3, 4), w, col_shift=torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shift", [False, True], ids=["raw", "shifted"])
@pytest.mark.parametrize("threads", [1, 3])
def test_sum_squares(native, dtype, shift, threads):
    """tr VᵀV in float64 in one pass: against float64 torch, any strides; non-finite input → non-finite."""
    x = _x(301, 37, dtype, offset=2.0 if shift else 0.0)
    sh = x.to(torch.float64).mean(0) if shift else None
    v = x.to(torch.float64) - (sh if shift else 0.0)
    want = float((v * v).sum())
    assert native.sum_squares(x, col_shift=sh, num_threads=threads) == pytest.approx(want, rel=1e-13)
    xt = _x(37, 301, dtype).T  # strided view
    assert native.sum_squares(xt, num_threads=threads) == pytest.approx(float((xt.double() ** 2).sum()), rel=1e-13)
    bad = x.clone()
    bad[200, 5] = float("nan")
    assert native.sum_squares(bad, num_threads=threads) != native.sum_squares(bad, num_threads=threads)  # NaN
    with pytest.raises(ValueError, match="2-D CPU tensor"):
        native.sum_squares(x[0])


def test_normal_apply_large_d_blocks(native):
    """Wide rows (d = 20000: row blocks shrink to 16 rows) and a row count that is no multiple of the
    row group, float64 blocks against float64 torch."""
    x = _x(53, 20000, torch.float32)
    w = torch.randn(20000, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = native.normal_apply(x, w, single_precision=False)
    assert torch.allclose(got, _ref(x, w), rtol=0, atol=float(_bound(x, w, None, False).max()))
