"""The batched row Gram (rankme_fast.backends.cpu.row_gram_batch, csrc/cpu/rowgram.cpp) against an
independent float64 oracle (torch matmul of the upcast, shifted valid rows): dtypes, ragged lengths
with NaN padding, both kernels and their block edges, shifts, untouched entries outside [:L, :L],
determinism across calls and thread counts, strided views, exact upcasts, and argument validation."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rankme_fast.backends import cpu
from tests.conftest import DTYPES, dtype_id, require_native, run_python

U64 = 2.0**-53
SENTINEL = 0.375  # prefill of gram / row_sum: exact, so "untouched" and "added to" are checked exactly


@pytest.fixture
def native():
    """The compiled kernel: skip when it is missing, fail when CI demands it (RANKME_FAST_REQUIRE_NATIVE=1)."""
    require_native()
    return cpu.load()


needs_native = pytest.mark.usefixtures("native")


def _data(B, n, d, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed * 7919 + B * 131 + n * 31 + d)
    scale = torch.logspace(0, -3, max(d, 1), dtype=torch.float64)[:d]
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype)


def _pad_nan(x, lengths):
    """NaN (or, for no-NaN dtypes, huge values) in the padding rows: they must never be read."""
    x = x.clone()
    for b, L in enumerate(lengths.tolist()):
        x[b, L:] = float("nan")
    return x


def _shifts(B, n, d, mode, seed=1):
    g = torch.Generator().manual_seed(seed)
    rs = torch.randn(B, n, generator=g, dtype=torch.float64) if mode in ("row", "both") else None
    cs = torch.randn(B, d, generator=g, dtype=torch.float64) * 0.5 if mode in ("col", "both") else None
    return rs, cs


def _oracle(x, lengths, row_shift, col_shift):
    """Per item: exact-ish float64 V Vᵀ, row sums, and the elementwise rounding bounds."""
    B, n, d = x.shape
    out = []
    for b in range(B):
        L = int(lengths[b])
        v = x[b, :L].to(torch.float64)
        w = v.abs()
        if row_shift is not None:
            v = v - row_shift[b, :L, None]
            w = w + row_shift[b, :L, None].abs()
        if col_shift is not None:
            v = v - col_shift[b][None, :]
            w = w + col_shift[b][None, :].abs()
        # any summation order and either order of the two subtractions: |err| <= γ_{d+2} Σ w w, 4× slack,
        # plus the sentinel's magnitude for the final addition
        bound = 4 * (d + 2) * U64 * (SENTINEL + w @ w.T) + 1e-300
        rs_bound = 4 * (d + 2) * U64 * (SENTINEL + w.sum(1)) + 1e-300
        out.append((L, v @ v.T, bound, v.sum(1), rs_bound))
    return out


def _run(x, lengths=None, row_shift=None, col_shift=None, row_sum=True, **kw):
    B, n, _ = x.shape
    gram = torch.full((B, n, n), SENTINEL, dtype=torch.float64)
    rs = torch.full((B, n), SENTINEL, dtype=torch.float64) if row_sum else None
    cpu.row_gram_batch(x, gram, lengths=lengths, row_sum=rs, row_shift=row_shift, col_shift=col_shift, **kw)
    return gram, rs


def _check(x, lengths, row_shift=None, col_shift=None, what="", **kw):
    B, n, d = x.shape
    if lengths is None:
        lengths_t = torch.full((B,), n, dtype=torch.int64)
    else:
        lengths_t = lengths
        x = _pad_nan(x, lengths) if x.dtype.is_floating_point else x
    x_before = x.clone()
    gram, rs = _run(x, lengths, row_shift, col_shift, **kw)
    assert torch.equal(x.nan_to_num(7.0), x_before.nan_to_num(7.0)), f"{what}: input modified"
    for b, (L, exact, bound, rsum, rs_bound) in enumerate(_oracle(x, lengths_t, row_shift, col_shift)):
        g = gram[b]
        err = (g[:L, :L] - SENTINEL - exact).abs()
        bad = ~(err <= bound)  # NaN counts as bad
        assert not bool(bad.any()), (
            f"{what} item {b} (L={L}): {int(bad.sum())} entries outside the bound, worst "
            f"{float((err / bound).max()):.3g}x")
        assert torch.equal(g[:L, :L], g[:L, :L].T), f"{what} item {b}: not symmetric"
        # outside [:L, :L] untouched
        untouched = bool((g[L:, :] == SENTINEL).all()) and bool((g[:, L:] == SENTINEL).all())
        assert untouched, f"{what} item {b}: padding written"
        assert bool(((rs[b, :L] - SENTINEL - rsum).abs() <= rs_bound).all()), f"{what} item {b}: row_sum wrong"
        assert bool((rs[b, L:] == SENTINEL).all()), f"{what} item {b}: row_sum padding written"
    return gram, rs


# ----------------------------------------------------------------------------------------------
# correctness grid


@needs_native
@pytest.mark.parametrize("kernel", (0, 1, 2), ids=("auto", "dot", "panel"))
@pytest.mark.parametrize("shift", ("none", "row", "col", "both"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ragged_batch(dtype, shift, kernel):
    B, n, d = 9, 13, 37  # B > threads; d not a multiple of the vector width, the 8-group or a block
    lengths = torch.tensor([0, 1, 13, 5, 13, 2, 8, 9, 12], dtype=torch.int64)
    x = _data(B, n, d, dtype, offset=0.3)
    rs, cs = _shifts(B, n, d, shift)
    _check(x, lengths, rs, cs, what=f"{dtype} {shift} k{kernel}", num_threads=2, _kernel=kernel)


@needs_native
@pytest.mark.parametrize("kernel", (0, 1, 2), ids=("auto", "dot", "panel"))
@pytest.mark.parametrize("shape", ((1, 10, 4096), (3, 10, 4096), (2, 40, 3), (4, 6, 1), (3, 33, 1),
                                   (2, 1, 9), (3, 70, 300), (2, 31, 520)),
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=dtype_id)
def test_shapes(dtype, shape, kernel):
    """d = 1, d = 4096, L > d, a single item, items across the dot/panel threshold, several panel blocks."""
    B, n, d = shape
    x = _data(B, n, d, dtype, seed=2)
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, n + 1, (B,), generator=g)
    lengths[0] = n
    rs, cs = _shifts(B, n, d, "both", seed=3)
    _check(x, None, what=f"{shape} full", num_threads=2, _kernel=kernel)
    _check(x, lengths, rs, cs, what=f"{shape} ragged", num_threads=3, _kernel=kernel)


@needs_native
@pytest.mark.parametrize("block", (8, 16, 24, 64, 520))
@pytest.mark.parametrize("kernel", (1, 2), ids=("dot", "panel"))
def test_block_edges(kernel, block):
    """Feature blocks that do and do not divide d, blocks wider than d."""
    B, n, d = 4, 19, 133
    lengths = torch.tensor([19, 7, 0, 16], dtype=torch.int64)
    x = _data(B, n, d, torch.float16, seed=4)
    rs, cs = _shifts(B, n, d, "both", seed=6)
    _check(x, lengths, rs, cs, what=f"k{kernel} block{block}", num_threads=2, _kernel=kernel, _block=block)


@needs_native
def test_empty_cases():
    for shape in ((0, 5, 8), (3, 0, 8), (3, 4, 0)):
        x = torch.randn(*shape)
        gram = torch.full((shape[0], shape[1], shape[1]), SENTINEL, dtype=torch.float64)
        rs = torch.full((shape[0], shape[1]), SENTINEL, dtype=torch.float64)
        cpu.row_gram_batch(x, gram, row_sum=rs, lengths=torch.full((shape[0],), shape[1], dtype=torch.int64))
        assert bool((gram == SENTINEL).all()) and bool((rs == SENTINEL).all())
    x = torch.full((3, 4, 8), float("nan"))
    gram = torch.full((3, 4, 4), SENTINEL, dtype=torch.float64)
    cpu.row_gram_batch(x, gram, lengths=torch.zeros(3, dtype=torch.int64), num_threads=2)  # all rows padding
    assert bool((gram == SENTINEL).all())


@needs_native
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
def test_exact_upcast_every_pattern(dtype):
    """Every 16-bit pattern (subnormals, ±0, ±Inf, NaN) through the vectorised upcast: item b holds the
    pattern b at feature b % 8 of a 1 x 8 row of zeros, so row_sum is the value and gram its square."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    vals = bits.view(dtype)
    B = vals.numel()
    x = torch.zeros(B, 1, 8, dtype=dtype)
    x[torch.arange(B), 0, torch.arange(B) % 8] = vals
    gram = torch.zeros(B, 1, 1, dtype=torch.float64)
    rs = torch.zeros(B, 1, dtype=torch.float64)
    cpu.row_gram_batch(x, gram, row_sum=rs, num_threads=2)
    ref = vals.to(torch.float64)
    nan = ref.isnan()
    assert torch.equal(rs[:, 0].isnan(), nan) and torch.equal(gram[:, 0, 0].isnan(), nan)
    assert torch.equal(rs[~nan, 0], ref[~nan])
    assert torch.equal(gram[~nan, 0, 0], ref[~nan] * ref[~nan])


# ----------------------------------------------------------------------------------------------
# determinism, threads, layouts


def _ragged_case(dtype=torch.bfloat16, B=23, n=40, d=200, seed=8):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, n + 1, (B,), generator=g)
    lengths[:3] = torch.tensor([n, 1, 0])
    x = _pad_nan(_data(B, n, d, dtype, seed=seed), lengths)
    rs, cs = _shifts(B, n, d, "both", seed=seed)
    return x, lengths, rs, cs


@needs_native
def test_deterministic_across_calls_and_threads():
    x, lengths, rs, cs = _ragged_case()
    ref_g, ref_rs = _run(x, lengths, rs, cs, num_threads=1)
    for nt in (1, 2, 5, 1, 2, 5, 2, 2):
        g, r = _run(x, lengths, rs, cs, num_threads=nt)
        assert torch.equal(g, ref_g) and torch.equal(r, ref_rs), f"threads={nt}: bits differ"


@needs_native
def test_strided_views_give_the_same_bits():
    x, lengths, rs, cs = _ragged_case(dtype=torch.float32, B=7, n=21, d=45)
    ref_g, ref_rs = _run(x, lengths, rs, cs, num_threads=2)
    B, n, d = x.shape
    views = {
        "transposed": x.transpose(1, 2).contiguous().transpose(1, 2),  # stride(-1) = n
        "every_other_col": torch.stack([x, x], dim=-1).flatten(-2)[..., ::2],  # stride(-1) = 2
        "col_slice": torch.cat([x, torch.full_like(x, float("nan"))], dim=-1)[..., :d],  # stride_r = 2d
        "batch_major_last": x.permute(1, 2, 0).contiguous().permute(2, 0, 1),
        "every_other_item": torch.stack([x, torch.full_like(x, float("nan"))], dim=1).flatten(0, 1)[::2],
    }
    for name, v in views.items():
        assert torch.equal(v.nan_to_num(3.0), x.nan_to_num(3.0)), name
        g, r = _run(v, lengths, rs, cs, num_threads=2)
        assert torch.equal(g, ref_g) and torch.equal(r, ref_rs), f"{name} (strides {v.stride()}) differs"
    # shifts as broadcast / strided views
    mu = cs[0]
    g1, r1 = _run(x, lengths, rs, mu.expand(B, d).contiguous(), num_threads=2)
    g2, r2 = _run(x, lengths, rs, mu.expand(B, d), num_threads=2)
    g3, r3 = _run(x, lengths, rs.T.contiguous().T, mu.expand(B, d), num_threads=2)
    assert torch.equal(g1, g2) and torch.equal(r1, r2) and torch.equal(g1, g3) and torch.equal(r1, r3)


@needs_native
@pytest.mark.parametrize("d", [45, 64, 2111])
@pytest.mark.parametrize("shift", [None, "col"])
def test_bfloat16_blocks_same_bits_in_every_layout(d, shift):
    """bfloat16 on AVX-512 is summed in blocks of 16 features with a lane order of its own (even / odd
    features); the contiguous fast loop, the general (strided) loop and the ragged tail of a block must
    give the same bits, and the oracle's values, with and without column shifts, across slice edges."""
    x, lengths, _, cs = _ragged_case(dtype=torch.bfloat16, B=9, n=12, d=d, seed=d)
    cs = cs if shift == "col" else None
    _check(x, lengths, None, cs, what=f"bf16 d={d} {shift}", num_threads=2, _kernel=1)
    ref_g, ref_rs = _run(x, lengths, None, cs, num_threads=2, _kernel=1)
    views = {
        "transposed": x.transpose(1, 2).contiguous().transpose(1, 2),
        "every_other_col": torch.stack([x, x], dim=-1).flatten(-2)[..., ::2],
        "col_slice": torch.cat([x, torch.full_like(x, float("nan"))], dim=-1)[..., :d],
    }
    for name, v in views.items():
        g, r = _run(v, lengths, None, cs, num_threads=2, _kernel=1)
        assert torch.equal(g, ref_g) and torch.equal(r, ref_rs), f"{name} d={d}: bits differ"
    # other slice widths (the test hook) keep each lane's order, so the bits
    for blk in (16, 48, 1024):
        g, r = _run(x, lengths, None, cs, num_threads=1, _kernel=1, _block=blk)
        assert torch.equal(g, ref_g) and torch.equal(r, ref_rs), f"block {blk} d={d}: bits differ"


@needs_native
def test_avx2_variant(tmp_path):
    """The AVX2 kernels (the buffered dot kernel, the 4 x 3-vector panel tiles), selected with
    RANKME_FAST_DISABLE_AVX512=1 in a fresh process; both narrow dot paths give the same bits."""
    code = """
import torch
from rankme_fast.backends import cpu
from tests.test_rowgram import _check, _ragged_case
assert cpu.load().gram_isa() in ("avx2", "generic"), cpu.load().gram_isa()
x, lengths, rs, cs = _ragged_case(dtype=torch.bfloat16, B=6, n=40, d=77)
for k in (1, 2):
    _check(x, lengths, rs, cs, what=f"avx2 k{k}", num_threads=2, _kernel=k)
# The narrow dot kernel buffers a sub-slice of the rows (L * 64 bytes <= 20 KiB); longer items forced onto
# the dot kernel take the register tiles. A pair's sum depends only on its two rows, so the first rows of
# a long item must give the same bits through either path.
for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
    for strided, mode in ((False, None), (False, "row"), (False, "col"), (True, "both")):
        x, lengths, rs, cs = _ragged_case(dtype=dt, B=3, n=330, d=45)
        x, lengths = x[:1], lengths[:1]
        rs = rs[:1] if mode in ("row", "both") else None
        cs = cs[:1] if mode in ("col", "both") else None
        if strided:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        _check(x, lengths, rs, cs, what=f"avx2 long dot {dt}", num_threads=1, _kernel=1)
        big_g = torch.zeros(1, 330, 330, dtype=torch.float64); big_r = torch.zeros(1, 330, dtype=torch.float64)
        cpu.row_gram_batch(x, big_g, row_sum=big_r, row_shift=rs, col_shift=cs, _kernel=1)
        for L in (1, 4, 10, 13):
            g = torch.zeros(1, L, L, dtype=torch.float64); r = torch.zeros(1, L, dtype=torch.float64)
            cpu.row_gram_batch(x[:, :L], g, row_sum=r, row_shift=None if rs is None else rs[:, :L].contiguous(),
                               col_shift=cs, _kernel=1)
            assert torch.equal(g, big_g[:, :L, :L]) and torch.equal(r, big_r[:, :L]), (dt, strided, L)
print("ok")
"""
    import rankme_fast
    root = str(Path(__file__).resolve().parents[1])
    pkg = str(Path(rankme_fast.__file__).resolve().parents[1])
    r = run_python(code, tmp_path, env_extra={"RANKME_FAST_DISABLE_AVX512": "1", "PYTHONPATH": pkg + os.pathsep + root})  # the installed package (with its .so) first
    assert "ok" in r.stdout


# ----------------------------------------------------------------------------------------------
# validation


@needs_native
def test_validation_errors():
    B, n, d = 3, 5, 16
    x = torch.randn(B, n, d)
    gram = torch.zeros(B, n, n, dtype=torch.float64)

    def bad(exc, match, *args, **kw):
        g = kw.pop("gram", gram)
        before = g.clone() if isinstance(g, torch.Tensor) and g.device.type == "cpu" else None
        with pytest.raises(exc, match=match):
            cpu.row_gram_batch(*(args or (x,)), g, **kw)
        if before is not None:
            assert torch.equal(g.nan_to_num(0), before.nan_to_num(0)), "written before the error"

    bad(ValueError, "gram", gram=torch.zeros(B, n, n, dtype=torch.float32))
    bad(ValueError, "gram", gram=torch.zeros(B, n, n + 1, dtype=torch.float64))
    bad(ValueError, "gram", gram=torch.zeros(B, n, n, dtype=torch.float64).transpose(1, 2))
    bad(ValueError, "gram", gram=torch.zeros(B, n, n, dtype=torch.float64, device="meta"))
    bad(TypeError, "gram", gram=[[0.0]])
    bad(ValueError, "x", torch.randn(n, d))
    bad(TypeError, "x", torch.ones(B, n, d, dtype=torch.int32))
    bad(ValueError, "x", torch.randn(B, n, d, device="meta"))
    bad(ValueError, "lengths", lengths=torch.tensor([0, n + 1, 2]))
    bad(ValueError, "lengths", lengths=torch.tensor([0, -1, 2]))
    bad(ValueError, "lengths", lengths=torch.tensor([1, 2]))
    bad(TypeError, "lengths", lengths=torch.tensor([1, 2, 3], dtype=torch.int32))
    bad(TypeError, "lengths", lengths=[1, 2, 3])
    bad(ValueError, "row_shift", row_shift=torch.zeros(B, n + 1, dtype=torch.float64))
    bad(ValueError, "row_shift", row_shift=torch.zeros(B, n))  # float32
    bad(ValueError, "col_shift", col_shift=torch.zeros(B, d - 1, dtype=torch.float64))
    bad(ValueError, "row_sum", row_sum=torch.zeros(B, n))
    bad(ValueError, "row_sum", row_sum=torch.zeros(n, B, dtype=torch.float64).T)
    bad(ValueError, "num_threads", num_threads=0)
    bad(TypeError, "num_threads", num_threads=1.5)
    if torch.cuda.is_available():
        bad(ValueError, "x", x.cuda())


@needs_native
def test_native_status_codes(native):
    """The C++ layer checks for itself (a caller that bypasses the Python wrapper): nothing written."""
    B, n, d = 2, 4, 8
    x = torch.randn(B, n, d)
    gram = torch.full((B, n, n), SENTINEL, dtype=torch.float64)
    lengths = torch.tensor([4, -1], dtype=torch.int64)
    common = dict(x=x.data_ptr(), dtype=1, batch=B, n_max=n, dim=d, stride_b=n * d, stride_r=d, stride_c=1,
                  row_shift=0, row_shift_stride_b=0, row_shift_stride_r=0, col_shift=0, col_shift_stride_b=0,
                  col_shift_stride_c=0, gram=gram.data_ptr(), gram_stride_b=n * n, ldg=n, row_sum=0,
                  row_sum_stride_b=0, num_threads=2)
    with pytest.raises(ValueError, match="invalid argument"):
        native.row_gram_batch(lengths=lengths.data_ptr(), **common)
    with pytest.raises(ValueError, match="invalid argument"):
        native.row_gram_batch(lengths=0, **{**common, "ldg": n - 1})
    with pytest.raises(ValueError, match="invalid argument"):
        native.row_gram_batch(lengths=0, **{**common, "gram_stride_b": n})  # blocks would overlap
    with pytest.raises(ValueError, match="unsupported dtype"):
        native.row_gram_batch(lengths=0, **{**common, "dtype": 7})
    assert bool((gram == SENTINEL).all())
    native.row_gram_batch(lengths=0, **common)
    assert not bool((gram == SENTINEL).all())


def _logdet_ref(v, scale, ridge):
    """ln det(V Vᵀ − scale·r rᵀ + ridge·I)/L in float64 NumPy and its tolerance from the conditioning."""
    v = np.asarray(v, np.float64)
    m = v @ v.T - scale * np.outer(v.sum(1), v.sum(1)) + ridge * np.eye(len(v))
    lam = np.linalg.eigvalsh(m)
    sign, ld = np.linalg.slogdet(m)
    assert sign == 1
    return ld / len(v), 1e-12 + 4 * len(v) * 2.0**-53 * lam[-1] / lam[0]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_row_logdet_blocked_cholesky(dtype):
    """Items of more than 64 rows take the blocked Cholesky (32-row blocks, the trailing update by the Gram's
    tiles): lengths at and across the block edges, L < d and L > d (rank d − 1 after centring, so the ridge
    carries the small eigenvalues), a rank-2 item, both kernels and 1 / 2 threads (same bits), against NumPy's
    float64 slogdet; a pivot that fails in a later block (info 1, NaN) and a non-finite row (info 2)."""
    g = torch.Generator().manual_seed(17)
    lens = [64, 65, 96, 97, 130, 203, 512]
    d = 300
    x = torch.randn(len(lens), max(lens), d, generator=g, dtype=torch.float64)
    x[:, :, :40] *= 6.0  # a few strong directions
    x[2, :96] = torch.randn(96, 2, generator=g, dtype=torch.float64) @ torch.randn(2, d, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    lengths = torch.tensor(lens)
    for ridge in (0.3, 1e-3):
        ref = [_logdet_ref(x[b, :L].double().numpy(), 1.0 / d, ridge) for b, L in enumerate(lens)]
        outs = {}
        for kernel in (1, 2):
            for nt in (1, 2):
                out, info = cpu.row_logdet_batch(x, lengths=lengths, scale=1.0 / d, ridge=ridge, num_threads=nt,
                                                 _kernel=kernel)
                assert info.tolist() == [0] * len(lens)
                for b, (v, tol) in enumerate(ref):
                    assert abs(float(out[b]) - v) <= tol * max(1.0, abs(v)), (kernel, nt, b, float(out[b]), v, tol)
                outs[kernel, nt] = out
            assert torch.equal(outs[kernel, 1], outs[kernel, 2])
    # collapsed and odd shapes on the blocked path: rank 1, rows decaying over 12 orders, d = 1 (every centred
    # row is zero: ln ridge), each against NumPy with its conditioning tolerance
    odd = {
        "rank1": torch.randn(100, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 50, generator=g, dtype=torch.float64),
        "decay": torch.randn(130, 200, generator=g, dtype=torch.float64) * torch.logspace(0, -12, 130)[:, None],
        "d=1": torch.randn(90, 1, generator=g, dtype=torch.float64),
    }
    for name, v in odd.items():
        v = v.to(dtype)
        dd = v.shape[1]
        out, info = cpu.row_logdet_batch(v[None], scale=1.0 / dd, ridge=1e-3)
        ref, tol = _logdet_ref(v.double().numpy(), 1.0 / dd, 1e-3)
        assert info.tolist() == [0] and abs(float(out[0]) - ref) <= tol * max(1.0, abs(ref)), (name, float(out[0]), ref)
    o1, _ = cpu.row_logdet_batch(odd["d=1"].to(dtype)[None], scale=1.0, ridge=1e-3)
    assert float(o1[0]) == pytest.approx(np.log(1e-3), rel=1e-12)
    # a row equal to an earlier one at row 80 (the third block): with a small negative ridge that pivot is < 0
    y = torch.randn(1, 150, 200, generator=g, dtype=torch.float64)
    y[0, 80] = y[0, 10]
    o, i = cpu.row_logdet_batch(y.to(dtype), scale=0.0, ridge=-1e-6)
    assert i.tolist() == [1] and bool(o.isnan().all())
    o, i = cpu.row_logdet_batch(y.to(dtype), scale=0.0, ridge=1e-6)
    assert i.tolist() == [0] and bool(o.isfinite().all())
    y[0, 120, 7] = float("nan")
    o, i = cpu.row_logdet_batch(y.to(dtype), scale=0.0, ridge=1e-6)
    assert i.tolist() == [2] and bool(o.isnan().all())


@needs_native
@pytest.mark.parametrize("L", [10, 80])
def test_row_logdet_subnormal_pivots(L):
    """Pivots below the smallest normal double (rows c·e_i with c = 2^-520: G = c² I = 2^-1040 I exactly) go
    through the pivots' exponent split exactly, in the column loop (L = 10) and the blocked one (L = 80)."""
    x = (torch.eye(L, dtype=torch.float64) * 2.0**-520)[None]
    out, info = cpu.row_logdet_batch(x, scale=0.0, ridge=0.0)
    assert info.tolist() == [0]
    assert float(out[0]) == pytest.approx(-1040 * np.log(2.0), rel=1e-15)


@needs_native
def test_row_logdet_list_matches_the_padded_batch():
    """A ragged list in one call (each item read where it lies) gives the padded batch's bits; length-0 items
    give 0; items of another dtype, width or layout are refused with their index."""
    g = torch.Generator().manual_seed(5)
    lens = [3, 70, 0, 1, 129, 40]
    d = 90
    items = [torch.randn(n, d, generator=g).bfloat16() for n in lens]
    padded = torch.zeros(len(lens), max(lens), d, dtype=torch.bfloat16)
    for b, t in enumerate(items):
        padded[b, : t.shape[0]] = t
    for nt in (1, 2):
        o1, i1 = cpu.row_logdet_list(items, scale=1.0 / d, ridge=1e-2, num_threads=nt)
        o2, i2 = cpu.row_logdet_batch(padded, lengths=torch.tensor(lens), scale=1.0 / d, ridge=1e-2, num_threads=nt)
        assert torch.equal(o1, o2) and torch.equal(i1, i2) and float(o1[2]) == 0.0
    for b, L in enumerate(lens):
        if L:
            v, tol = _logdet_ref(items[b].double().numpy(), 1.0 / d, 1e-2)
            assert abs(float(o1[b]) - v) <= tol * max(1.0, abs(v))
    with pytest.raises(ValueError, match=r"items\[1\]: every item must be a CPU tensor of dtype torch.bfloat16"):
        cpu.row_logdet_list([items[0], items[1].float()])
    with pytest.raises(ValueError, match=r"items\[1\]: every item must be .* with 90 columns"):
        cpu.row_logdet_list([items[0], items[1][:, :80].contiguous()])
    with pytest.raises(ValueError, match=r"items\[0\]: rows must be contiguous"):
        cpu.row_logdet_list([items[1][:, ::2]])
    with pytest.raises(ValueError, match=r"items\[0\]: rows must be contiguous"):
        cpu.row_logdet_list([items[1].t().contiguous().t()])
    with pytest.raises(TypeError, match=r"items\[0\] must be a 2-D torch.Tensor"):
        cpu.row_logdet_list([items[1][0]])
    with pytest.raises(ValueError, match="non-empty list"):
        cpu.row_logdet_list([])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_row_logdet_batch_against_numpy(dtype):
    """The Cholesky epilogue of the row Gram: ln det(V Vᵀ − scale·r rᵀ + ridge·I)/L per item against NumPy's
    float64 slogdet of the upcast rows; info codes for a non-finite row (2) and a matrix that is not positive
    definite (1); length-0 items; thread counts; both kernels (dot, panel); bad arguments."""
    g = torch.Generator().manual_seed(3)
    B, n, d = 8, 9, 30
    x = (torch.randn(B, n, d, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    lengths = torch.tensor([9, 1, 4, 9, 9, 9, 0, 7])
    x[3, 2, 5] = float("nan")
    x[4, 8, 0] = float("inf")
    x[5] = x[5, :1]  # rank 1 after centring: singular with ridge 0
    for kernel in (1, 2):
        outs = []
        for nt in (1, 2, 3):
            out, info = cpu.row_logdet_batch(x, lengths=lengths, scale=1.0 / d, ridge=0.25, num_threads=nt,
                                             _kernel=kernel)
            outs.append((out, info))
        out, info = outs[0]
        for o, i in outs[1:]:
            assert torch.equal(i, info) and torch.equal(o.nan_to_num(7.0), out.nan_to_num(7.0))
        assert info.tolist() == [0, 0, 0, 2, 2, 0, 0, 0]
        assert out[[3, 4]].isnan().all() and float(out[6]) == 0.0
        for b in (0, 1, 2, 5, 7):
            L = int(lengths[b])
            v = x[b, :L].double().numpy()
            vc = v - v.mean(1, keepdims=True)
            sign, ld = np.linalg.slogdet(vc @ vc.T + 0.25 * np.eye(L))
            assert sign == 1 and abs(float(out[b]) - ld / L) <= 1e-12 * max(1.0, abs(ld / L)), (kernel, b)
    # not positive definite: the rank-1 item with no ridge (its zero pivots come out <= 0 or at rounding
    # level; a negative ridge makes it certain)
    o, i = cpu.row_logdet_batch(x[5:6], scale=1.0 / d, ridge=-1e-3)
    assert i.tolist() == [1] and bool(o.isnan().all())
    # no centring: ln det(V Vᵀ + ridge I)/n
    o3, i3 = cpu.row_logdet_batch(x[:3], ridge=0.5)
    for b in range(3):
        v = x[b].double().numpy()
        sign, ld = np.linalg.slogdet(v @ v.T + 0.5 * np.eye(n))
        assert int(i3[b]) == 0 and abs(float(o3[b]) - ld / n) <= 1e-12 * max(1.0, abs(ld / n))
    # collapsed spectra and odd shapes, centred: n > d (rank d - 1), rank 2 of 12 rows, fast-decaying rows,
    # d = 1 (every centred row is zero: ln ridge)
    cases = {
        "n>d": torch.randn(1, 12, 5, generator=g, dtype=torch.float64),
        "rank2": torch.randn(1, 12, 2, generator=g, dtype=torch.float64) @ torch.randn(1, 2, 64, generator=g,
                                                                                        dtype=torch.float64),
        "decay": torch.randn(1, 12, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -6, 12)[None, :, None],
        "d=1": torch.randn(1, 7, 1, generator=g, dtype=torch.float64),
    }
    for name, v in cases.items():
        v = v.to(dtype)
        L, dd = v.shape[1], v.shape[2]
        o, i = cpu.row_logdet_batch(v, scale=1.0 / dd, ridge=1e-3)
        w = v[0].double().numpy()
        wc = w - w.mean(1, keepdims=True)
        m = wc @ wc.T + 1e-3 * np.eye(L)
        sign, ld = np.linalg.slogdet(m)
        lam = np.linalg.eigvalsh(m)
        tol = 1e-12 + 4 * L * 2.0**-53 * lam[-1] / lam[0]  # ln λ of the ridge-level eigenvalues: conditioning
        assert int(i[0]) == 0 and sign == 1 and abs(float(o[0]) - ld / L) <= tol, (name, float(o[0]), ld / L, tol)
    o1, _ = cpu.row_logdet_batch(cases["d=1"].to(dtype), scale=1.0, ridge=1e-3)
    assert float(o1[0]) == pytest.approx(np.log(1e-3), rel=1e-12)
    with pytest.raises(ValueError, match="lengths must lie in"):
        cpu.row_logdet_batch(x, lengths=torch.full((B,), n + 1))
    with pytest.raises(ValueError, match="ridge must be a finite number"):
        cpu.row_logdet_batch(x, ridge=float("nan"))
    with pytest.raises(ValueError, match="at least one feature"):
        cpu.row_logdet_batch(x[:, :, :0])
    with pytest.raises(ValueError, match="scale must be a finite number"):
        cpu.row_logdet_batch(x, scale=float("inf"))
    with pytest.raises(ValueError, match="_kernel must be 0, 1 or 2"):
        cpu.row_logdet_batch(x, _kernel=3)
    with pytest.raises(ValueError, match=r"x must be a 3-D \(B, n_max, d\) tensor"):
        cpu.row_logdet_batch(x[0])
