"""The native float64 SYRK kernel (rankme_fast._C) against its pure-torch twin and a float64 oracle:
dtypes, odd column counts, chunk edges, both thread schedules, strided views, ISA variants; plus lazy
loading, show_config, the fallback when the extension is missing, and the optional CUDA module."""
from __future__ import annotations

import io
import json
import os
import platform

import numpy as np
import pytest
import torch

import rankme_fast
from rankme_fast.backends import cpu, torch_ref
from tests.conftest import DTYPES, dtype_id, require_native, run_python

U64 = 2.0**-53


@pytest.fixture
def native():
    """The compiled kernel: skip when it is missing, fail when CI demands it (RANKME_FAST_REQUIRE_NATIVE=1)."""
    require_native()
    return cpu.load()


needs_native = pytest.mark.usefixtures("native")


def _data(rows, cols, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed * 7919 + rows * 31 + cols)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.logspace(0, -3, max(cols, 1), dtype=torch.float64)[:cols]
    return (x + offset).to(dtype)


def _initial_state(cols, seed=1):
    """A non-zero starting Gram (symmetric, zero padding) and col_sum: the kernel must *add* to them."""
    g = torch.Generator().manual_seed(seed)
    cp = cpu.padded(cols)
    a = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    gram = torch.zeros(cp, cp, dtype=torch.float64)
    gram[:cols, :cols] = a + a.T
    col_sum = torch.randn(cols, generator=g, dtype=torch.float64)
    return gram, col_sum


def _oracle(x, gram0, cs0, row_shift, col_shift):
    """float64 Vᵀ V with V = x - row_shift - col_shift, and the rounding bound of a length-N dot product."""
    cols = x.shape[1]
    v = x.to(torch.float64)
    if row_shift is not None:
        v = v - row_shift[:, None]
    if col_shift is not None:
        v = v - col_shift[None, :]
    exact = gram0[:cols, :cols] + v.T @ v
    # Rounding bound for any order of the two shift subtractions and of the sum: with
    # w = |x| + |row_shift| + |col_shift| (the subtractions may cancel), |fl(Σ) − Σ| ≤ γ_{n+2} Σ w_i w_j;
    # 4× slack, and the initial value's magnitude for the final addition.
    w = x.to(torch.float64).abs()
    if row_shift is not None:
        w = w + row_shift.abs()[:, None]
    if col_shift is not None:
        w = w + col_shift.abs()[None, :]
    bound = 4 * (x.shape[0] + 2) * U64 * (gram0[:cols, :cols].abs() + w.T @ w) + 1e-300
    cs = cs0 + v.sum(0)
    cs_bound = 4 * (x.shape[0] + 2) * U64 * (cs0.abs() + w.sum(0)) + 1e-300
    return exact, bound, cs, cs_bound


def _check_update(x, *, row_shift=None, col_shift=None, num_threads=1, chunk_rows=0, what=""):
    cols = x.shape[1]
    gram0, cs0 = _initial_state(cols)
    g_nat, cs_nat = gram0.clone(), cs0.clone()
    g_ref, cs_ref = gram0.clone(), cs0.clone()
    x_before = x.clone()
    cpu.gram_update(x, g_nat, col_sum=cs_nat, row_shift=row_shift, col_shift=col_shift, num_threads=num_threads,
                    chunk_rows=chunk_rows)
    torch_ref.gram_update(x, g_ref, col_sum=cs_ref, row_shift=row_shift, col_shift=col_shift)
    assert torch.equal(x, x_before), f"{what}: input modified"
    exact, bound, cs_exact, cs_bound = _oracle(x, gram0, cs0, row_shift, col_shift)
    up = torch.triu(torch.ones(cols, cols, dtype=torch.bool))
    for name, g, cs in (("native", g_nat, cs_nat), ("torch_ref", g_ref, cs_ref)):
        err = (g[:cols, :cols] - exact).abs()
        bad = (err > bound) & up
        assert not bool(bad.any()), (
            f"{what} [{name}]: {int(bad.sum())} upper-triangle entries outside the float64 bound; worst "
            f"{float((err / bound)[up].max()):.3g}× the bound at {tuple(int(i) for i in (bad.nonzero()[0]))}"
        )
        assert bool(((cs - cs_exact).abs() <= cs_bound).all()), f"{what} [{name}]: col_sum wrong"
    # native vs its torch twin directly (upper triangle incl. diagonal): both within the bound of the
    # exact value, hence within twice the bound of each other; bitwise equality is not promised
    diff = (g_nat[:cols, :cols] - g_ref[:cols, :cols]).abs()
    assert bool((diff <= 2 * bound)[up].all()), f"{what}: native and torch twin disagree"
    # padding untouched (stays zero), strictly-lower part outside the 8×8 diagonal blocks untouched
    assert bool((g_nat[cols:, :] == 0).all()) and bool((g_nat[:, cols:] == 0).all()), f"{what}: padding written"
    i = torch.arange(cols)
    same_block = (i[:, None] // cpu.PANEL) == (i[None, :] // cpu.PANEL)
    outside = ~up & ~same_block
    assert torch.equal(g_nat[:cols, :cols][outside], gram0[:cols, :cols][outside]), f"{what}: lower triangle written"


def _shifts(mode, rows, cols, dtype):
    g = torch.Generator().manual_seed(rows + 3 * cols)
    rs = torch.randn(rows, generator=g, dtype=torch.float64) if mode in ("row", "both") else None
    cs = torch.randn(cols, generator=g, dtype=torch.float64) if mode in ("col", "both") else None
    return rs, cs


# ----------------------------------------------------------------------------------------------
# the kernel grid


@needs_native
@pytest.mark.parametrize("threads", (1, 2, 3), ids=lambda t: f"t{t}")
@pytest.mark.parametrize("chunk_rows", (0, 3, 17), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("rows", (1, 5, 131, 1000), ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("cols", (1, 7, 8, 9, 24, 63, 257), ids=lambda c: f"cols{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gram_update_grid(dtype, cols, rows, chunk_rows, threads):
    mode = ("none", "both", "col", "row")[(rows + cols + chunk_rows + threads) % 4]
    rs, cs = _shifts(mode, rows, cols, dtype)
    x = _data(rows, cols, dtype, offset=2.0)
    _check_update(x, row_shift=rs, col_shift=cs, num_threads=threads, chunk_rows=chunk_rows,
                  what=f"{dtype_id(dtype)} {rows}x{cols} chunk={chunk_rows} t={threads} shift={mode}")


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gram_update_zero_rows(dtype):
    """An empty chunk (0 rows) is a no-op, as in the torch twin — a stream may hand one over."""
    for threads, cols in ((1, 1), (1, 9), (3, 9)):
        _check_update(_data(0, cols, dtype), num_threads=threads, what=f"0x{cols}")
        rs, cs = _shifts("both", 0, cols, dtype)
        _check_update(_data(0, cols, dtype), row_shift=rs, col_shift=cs, num_threads=threads, chunk_rows=3,
                      what=f"0x{cols} shifted")


@needs_native
@pytest.mark.parametrize("mode", ("none", "row", "col", "both"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gram_update_shift_modes(dtype, mode):
    rows, cols = 301, 19
    rs, cs = _shifts(mode, rows, cols, dtype)
    _check_update(_data(rows, cols, dtype, offset=50.0), row_shift=rs, col_shift=cs, num_threads=2, chunk_rows=17,
                  what=f"{dtype_id(dtype)} shift={mode}")


def _layout(x_full, layout):
    if layout == "transposed_view":  # stride_r = 1, stride_c = rows
        return x_full.T.contiguous().T
    if layout == "col_stride2":
        return x_full[:, ::2]
    if layout == "row_stride3":
        return x_full[::3]
    if layout == "both_strided_transposed":
        return x_full.T.contiguous().T[1::2, ::3]
    if layout == "column_slice_offset":  # non-zero storage offset, row stride > cols
        return x_full[5:, 3:-2]
    raise AssertionError(layout)


LAYOUTS = ("transposed_view", "col_stride2", "row_stride3", "both_strided_transposed", "column_slice_offset")


@needs_native
@pytest.mark.parametrize("threads", (1, 2), ids=lambda t: f"t{t}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cols", (9, 40, 131), ids=lambda c: f"cols{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gram_update_strided_views(dtype, cols, layout, threads):
    x = _layout(_data(517, cols, dtype, seed=3), layout)
    assert not x.is_contiguous()
    _check_update(x, num_threads=threads, chunk_rows=17, what=f"{layout} {dtype_id(dtype)} {tuple(x.shape)}")
    rs, cs = _shifts("both", x.shape[0], x.shape[1], dtype)
    _check_update(x, row_shift=rs, col_shift=cs, num_threads=threads, what=f"{layout} shifted")


@needs_native
@pytest.mark.parametrize("chunk_rows", (0, 7), ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("threads", (2, 3), ids=lambda t: f"t{t}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gram_update_shared_schedule_large_d(dtype, threads, chunk_rows):
    """(threads-1)·padded(d)²·8 B > 16 MiB: the threads share one G and split it by column panels."""
    d = 1500
    assert (threads - 1) * cpu.padded(d) ** 2 * 8 > 16 << 20
    rows = 40
    rs, cs = _shifts("col", rows, d, dtype)
    _check_update(_data(rows, d, dtype, seed=5), col_shift=cs, num_threads=threads, chunk_rows=chunk_rows,
                  what=f"shared d=1500 {dtype_id(dtype)} t={threads}")


@needs_native
def test_gram_update_shared_schedule_transposed_large_d():
    x = _data(1500, 33, torch.float32, seed=6).T  # 33 rows × 1500 cols, stride_c = 1500... as a view
    assert x.stride() == (1, 33)
    _check_update(x, num_threads=2, chunk_rows=5, what="shared, transposed view")


def _shared_case(kind, threads):
    """(x, chunk_rows) that gram_update runs on the shared schedule at `threads` threads."""
    g = torch.Generator().manual_seed(11)
    if kind == "randn":  # padded(1500)² · 8 B > 16 MiB: too big for a copy per thread
        return _data(3000, 1500, torch.float32, seed=11), 64
    if kind == "rank1":  # a collapsed spectrum: every row a multiple of one direction
        u = torch.randn(3000, 1, generator=g, dtype=torch.float64)
        v = torch.randn(1, 1500, generator=g, dtype=torch.float64)
        return (u @ v).to(torch.float32), 64
    if kind == "n_lt_d":  # N < d
        return _data(700, 1500, torch.float32, seed=12), 64
    # d = 1, one-row chunks, fewer chunks than threads: the shared schedule with a single panel
    return torch.randn(threads - 1, 1, generator=g, dtype=torch.float64).to(torch.float32), 1


@needs_native
@pytest.mark.parametrize("kind", ["randn", "rank1", "n_lt_d", "d1"])
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_gram_update_shared_schedule_matches_one_thread_bits(kind, threads):
    """The shared schedule runs a chunk's packs and tile pieces as tasks that wait only for what they read
    (chunk c's packs after chunk c - 1's, a tile piece after the same piece of chunk c - 1, a pack after the
    tiles of chunk c - 2 that shared its buffer), so threads move on to the next chunk without a barrier. Each
    element of G still gets the chunks in order and the same tile sums as on one thread: the bits of G and of
    the column sums equal the one-thread run (7 threads on fewer cores, as in CI: some are descheduled mid-task)."""
    x, chunk_rows = _shared_case(kind, threads)
    rows, cols = x.shape
    nchunks = -(-rows // chunk_rows)
    assert (threads - 1) * cpu.padded(cols) ** 2 * 8 > 16 << 20 or nchunks < threads  # the shared schedule
    gram0, cs0 = _initial_state(cols)
    ref_g, ref_cs = gram0.clone(), cs0.clone()
    cpu.gram_update(x, ref_g, col_sum=ref_cs, num_threads=1, chunk_rows=chunk_rows)
    for _ in range(2):
        g, cs = gram0.clone(), cs0.clone()
        cpu.gram_update(x, g, col_sum=cs, num_threads=threads, chunk_rows=chunk_rows)
        assert torch.equal(torch.triu(g[:cols, :cols]), torch.triu(ref_g[:cols, :cols]))
        assert torch.equal(cs, ref_cs)
    exact, bound, cs_exact, cs_bound = _oracle(x, gram0, cs0, None, None)
    upper = torch.triu(torch.ones(cols, cols, dtype=torch.bool))
    assert bool(((ref_g[:cols, :cols] - exact).abs()[upper] <= bound[upper]).all())
    assert bool(((ref_cs - cs_exact).abs() <= cs_bound).all())


@needs_native
@pytest.mark.parametrize("rows, cols, chunk_rows", [(20000, 64, 512), (3000, 300, 17), (2100, 1500, 64),
                                                     (1100, 2048, 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_gram_update_dynamic_schedule_is_deterministic(rows, cols, chunk_rows, threads):
    """Both schedules hand out work dynamically (guided slots of chunks / triangle pieces from a counter),
    yet the same input and thread count give the same bits on every call, whichever thread ran what,
    and match the float64 oracle within its rounding bound (private: cols ≤ 1448 at 2 threads; shared above)."""
    x = _data(rows, cols, torch.float32, seed=3)
    gram0, cs0 = _initial_state(cols)
    outs = []
    for _ in range(4):
        g, cs = gram0.clone(), cs0.clone()
        cpu.gram_update(x, g, col_sum=cs, num_threads=threads, chunk_rows=chunk_rows)
        outs.append((g, cs))
    for g, cs in outs[1:]:
        assert torch.equal(torch.triu(g[:cols, :cols]), torch.triu(outs[0][0][:cols, :cols])), "Gram not reproducible"
        assert torch.equal(cs, outs[0][1]), "column sums not reproducible"
    exact, bound, cs_exact, cs_bound = _oracle(x, gram0, cs0, None, None)
    upper = torch.triu(torch.ones(cols, cols, dtype=torch.bool))
    err = (outs[0][0][:cols, :cols] - exact).abs()
    assert bool((err[upper] <= bound[upper]).all()), f"max error / bound {float((err / bound)[upper].max()):.3g}"
    assert bool(((outs[0][1] - cs_exact).abs() <= cs_bound).all())


@needs_native
@pytest.mark.parametrize("kind", ("decay", "rank1", "rank2"))
@pytest.mark.parametrize("threads", (1, 2), ids=lambda t: f"t{t}")
@pytest.mark.parametrize("rows, chunk_rows", [(1300, 0), (700, 300)], ids=lambda v: str(v))
def test_gram_update_k_and_j_blocks(rows, chunk_rows, threads, kind):
    """Chunks of 512 / 512 / 276 (or 300 / 300 / 100) rows, so k-blocks of 128 rows with a short last one, and
    800 columns = 100 panels, so several j-blocks of a multiple of 3 panels with a remainder (the AVX2 sweep,
    run under RANKME_FAST_ISA=avx2 by tests/test_isa.py; the other ISAs take the same shapes): within the float64
    bound of the oracle. Columns decaying over 3 decades (700 rows: N < d), or a rank-1 / rank-2 matrix (a
    collapsed spectrum)."""
    x = _data(rows, 800, torch.float64, seed=9, offset=0.5)
    if kind != "decay":
        g = torch.Generator().manual_seed(rows)
        k = 1 if kind == "rank1" else 2
        x = torch.randn(rows, k, generator=g, dtype=torch.float64) @ torch.randn(k, 800, generator=g, dtype=torch.float64)
    x = x.to(torch.float32)
    _check_update(x, num_threads=threads, chunk_rows=chunk_rows, what=f"k/j blocks {kind} {rows} rows t={threads}")


@needs_native
@pytest.mark.parametrize("cols", (16, 20, 200), ids=lambda c: f"cols{c}")
def test_gram_update_reads_nothing_past_the_rows(tmp_path, cols):
    """The rows' last bytes are the last bytes of a file mapping (the next page is not mapped), and
    a copy of the same rows starts one byte past an aligned address: the touch pass before the pack and the
    pack read only inside each row's columns (a read past them would fault), and both give the oracle's Gram."""
    rows = 1024  # 4096·cols bytes: whole pages, so the mapping ends where the last row does
    x_np = np.random.default_rng(cols).standard_normal((rows, cols)).astype(np.float32)
    path = tmp_path / "x.bin"
    x_np.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r+", shape=(rows, cols))
    raw = bytearray(rows * cols * 4 + 1)
    shifted = np.frombuffer(raw, dtype=np.float32, count=rows * cols, offset=1).reshape(rows, cols)
    shifted[...] = x_np
    x64 = torch.from_numpy(x_np).double()
    ref = x64.T @ x64
    bound = 4 * (rows + 2) * U64 * (x64.abs().T @ x64.abs())
    up = torch.triu(torch.ones(cols, cols, dtype=torch.bool))
    x_mapped = torch.from_numpy(np.asarray(mapped))
    for what, x in (("mapped", x_mapped), ("misaligned", torch.from_numpy(shifted))):
        for threads in (1, 2):
            g = torch.zeros(cpu.padded(cols), cpu.padded(cols), dtype=torch.float64)
            cpu.gram_update(x, g, num_threads=threads)
            err = (g[:cols, :cols] - ref).abs()
            assert bool((err <= bound)[up].all()), f"{what} t={threads}"


@needs_native
def test_gram_update_scratch_reuse_across_shapes():
    """The private schedule's G copies and packing buffers are cached between calls (zeroed copies are
    tagged with their layout): calls of other widths in between, whose copies and packing buffers reuse
    the same blocks, change no bit of a later call, which stays within the float64 bound. The 15.7 MB copies
    of d = 1400 push the 8 MB ones of d = 1024 out of the 40 MiB cache (oldest first), so the repeated
    shapes after it run on fresh blocks."""
    shapes = [(6000, 64), (6000, 72), (4000, 300), (9000, 8), (6000, 64), (3000, 1024), (6000, 72), (6000, 64),
              (2000, 1400), (3000, 1024), (6000, 64)]
    first = {}
    for rows, cols in shapes:
        x = _data(rows, cols, torch.float32, seed=cols)
        gram0, cs0 = _initial_state(cols)
        g, cs = gram0.clone(), cs0.clone()
        cpu.gram_update(x, g, col_sum=cs, num_threads=2, chunk_rows=64)
        if cols in first:
            assert torch.equal(torch.triu(g[:cols, :cols]), first[cols][0]) and torch.equal(cs, first[cols][1]), cols
        else:
            first[cols] = (torch.triu(g[:cols, :cols]), cs)
        exact, bound, cs_exact, cs_bound = _oracle(x, gram0, cs0, None, None)
        up = torch.triu(torch.ones(cols, cols, dtype=torch.bool))
        assert bool(((g[:cols, :cols] - exact).abs() <= bound)[up].all()), cols
        assert bool(((cs - cs_exact).abs() <= cs_bound).all()), cols


@needs_native
@pytest.mark.parametrize("rows, kind", [(3000, "rank1"), (3000, "rank8"), (3000, "decay"), (600, "rank8")],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("threads", [2, 3])
def test_gram_update_private_rounds_over_the_copy_budget(rows, kind, threads):
    """d = 1000 (8 MB copies: the guided slots of many 16-row chunks exceed the 32 MiB copy budget, so the
    private schedule cuts rounds of equal slots), collapsed and fast-decaying spectra, N > d and N < d:
    reproducible bits on every call and the float64 oracle's bound; the spectrum of the Gram matches
    NumPy's float64 SVD of the rows."""
    cols = 1000
    g = torch.Generator().manual_seed(rows + threads)
    r = {"rank1": 1, "rank8": 8, "decay": cols}[kind]
    x = torch.randn(rows, r, generator=g, dtype=torch.float64) @ torch.randn(r, cols, generator=g, dtype=torch.float64)
    if kind == "decay":
        x = torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.logspace(0, -6, cols, dtype=torch.float64)
    x = x.to(torch.float32)
    gram0, cs0 = torch.zeros(cpu.padded(cols), cpu.padded(cols), dtype=torch.float64), torch.zeros(cols, dtype=torch.float64)
    outs = []
    for _ in range(2):
        gg, cs = gram0.clone(), cs0.clone()
        cpu.gram_update(x, gg, col_sum=cs, num_threads=threads, chunk_rows=16)
        outs.append((torch.triu(gg[:cols, :cols]), cs))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    exact, bound, cs_exact, cs_bound = _oracle(x, gram0, cs0, None, None)
    up = torch.triu(torch.ones(cols, cols, dtype=torch.bool))
    assert bool(((outs[0][0] - exact).abs() <= bound)[up].all())
    assert bool(((outs[0][1] - cs_exact).abs() <= cs_bound).all())
    full = outs[0][0] + outs[0][0].T - torch.diag(torch.diagonal(outs[0][0]))
    ev = torch.linalg.eigvalsh(full).flip(0).clamp_min(0).sqrt()
    sv = np.linalg.svd(x.double().numpy(), compute_uv=False)
    k = min(rows, cols)
    assert float((ev[:k] - torch.from_numpy(sv)).abs().max()) <= 1e-6 * float(sv[0])


def test_gram_update_accumulates_over_calls():
    """Streaming: two updates on halves equal one update on the whole (float64 bound)."""
    x = _data(1001, 37, torch.float32, seed=9)
    g1 = torch.zeros(cpu.padded(37), cpu.padded(37), dtype=torch.float64)
    c1 = torch.zeros(37, dtype=torch.float64)
    cpu.gram_update(x[:400], g1, col_sum=c1, num_threads=2, chunk_rows=17)
    cpu.gram_update(x[400:], g1, col_sum=c1, num_threads=2, chunk_rows=17)
    g0, cs0 = torch.zeros_like(g1), torch.zeros(37, dtype=torch.float64)
    exact, bound, cs, cs_bound = _oracle(x, g0, cs0, None, None)
    up = torch.triu(torch.ones(37, 37, dtype=torch.bool))
    assert bool(((g1[:37, :37] - exact).abs() <= bound)[up].all())
    assert bool(((c1 - cs).abs() <= cs_bound).all())


@needs_native
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
def test_half_types_upcast_exactly(dtype):
    """Every float16/bfloat16 value, subnormals included, converts exactly: a Gram of one-hot rows
    holding each value reproduces value² exactly."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    vals = bits.view(dtype)
    vals = vals[torch.isfinite(vals)]
    vals = vals[vals.to(torch.float64).abs() < 2.0**500]
    x = vals.reshape(-1, 1)
    g = torch.zeros(8, 8, dtype=torch.float64)
    cs = torch.zeros(1, dtype=torch.float64)
    cpu.gram_update(x, g, col_sum=cs, num_threads=1)
    v64 = vals.to(torch.float64)
    # sum of squares / sum in float64: compare with the same sums done by torch in float64 (bound)
    assert abs(float(g[0, 0]) - float((v64 * v64).sum())) <= (v64.numel() + 2) * U64 * float((v64 * v64).sum())
    assert abs(float(cs[0]) - float(v64.sum())) <= (v64.numel() + 2) * U64 * float(v64.abs().sum())
    # and value by value (no accumulation): a 1×1 Gram of each subnormal and of the extremes
    special = [v for v in (vals[(vals != 0) & (vals.abs() < torch.finfo(dtype).tiny)][:5].tolist()
                           + [float(torch.finfo(dtype).max), -float(torch.finfo(dtype).max)])]
    for s in special:
        t = torch.tensor([[s]], dtype=dtype)
        g1 = torch.zeros(8, 8, dtype=torch.float64)
        cpu.gram_update(t, g1, num_threads=1)
        assert float(g1[0, 0]) == float(t.to(torch.float64)) ** 2, (dtype, s)


# ----------------------------------------------------------------------------------------------
# validation layer in front of the kernel


@needs_native
def test_gram_update_validation():
    x = torch.randn(10, 9)
    good = torch.zeros(16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gram buffer must be contiguous float64 CPU of shape \(16, 16\), got torch.float64 \(9, 9\)"):
        cpu.gram_update(x, torch.zeros(9, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gram buffer must be contiguous float64 CPU of shape \(16, 16\), got torch.float32"):
        cpu.gram_update(x, torch.zeros(16, 16))
    with pytest.raises(ValueError, match=r"gram buffer must be contiguous float64"):
        cpu.gram_update(x, torch.zeros(16, 16, dtype=torch.float64).T)  # column-major
    with pytest.raises(ValueError, match=r"gram buffer must be contiguous float64"):
        cpu.gram_update(x, torch.zeros(16, 32, dtype=torch.float64)[:, ::2])
    with pytest.raises(ValueError, match=r"gram_update expects a 2-D tensor, got shape \(2, 10, 9\)"):
        cpu.gram_update(torch.randn(2, 10, 9), good)
    with pytest.raises(TypeError, match=r"does not support dtype torch.int32"):
        cpu.gram_update(torch.ones(10, 9, dtype=torch.int32), good)
    with pytest.raises(ValueError, match=r"col_sum: need a contiguous float64 CPU vector of length 9, got torch.float64 \(8,\)"):
        cpu.gram_update(x, good, col_sum=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"row_shift: need a contiguous float64 CPU vector of length 10, got torch.float32"):
        cpu.gram_update(x, good, row_shift=torch.zeros(10))
    with pytest.raises(ValueError, match=r"col_shift: need a contiguous float64 CPU vector of length 9"):
        cpu.gram_update(x, good, col_shift=torch.zeros(18, dtype=torch.float64)[::2])
    assert torch.equal(good, torch.zeros(16, 16, dtype=torch.float64)), "a rejected call wrote into G"


@needs_native
def test_kernel_rejects_zero_columns():
    with pytest.raises(ValueError, match=r"gram_update: invalid argument"):
        cpu.gram_update(torch.zeros(4, 0), torch.zeros(0, 0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# extension loading, ISA selection, configuration


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@needs_native
def test_native_extension_loaded():
    """CI sets RANKME_FAST_REQUIRE_NATIVE=1: there the extension must have loaded (the autouse fixture
    fails the test otherwise); elsewhere a missing extension skips."""
    mod = cpu.load()
    assert mod is not None and cpu.load_error() is None
    assert mod.PANEL == cpu.PANEL == 8
    assert cpu.available(torch.device("cpu")) == (True, f"isa={mod.gram_isa()}")
    ok, why = cpu.available(torch.device("meta"))
    assert not ok and "cannot read meta memory" in why
    assert rankme_fast.backends.select(None, torch.device("cpu")) is cpu
    assert rankme_fast.backends.select("torch", torch.device("cpu")) is torch_ref


@needs_native
def test_kernel_isa_matches_cpu():
    isa = cpu.load().gram_isa()
    assert isa in ("avx512", "avx2", "generic")
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        assert isa == "generic" or platform.machine() in ("x86_64", "AMD64")
        return
    from rankme_fast import _build_info  # noqa: PLC0415

    if "avx512" not in _build_info.cpu_isa_variants:
        pytest.skip("built without the x86 ISA variants")
    if os.environ.get("RANKME_FAST_ISA"):  # forced (tests/test_isa.py): what was asked for, validated by load()
        want = os.environ["RANKME_FAST_ISA"].strip().lower()
    elif os.environ.get("RANKME_FAST_DISABLE_AVX512"):
        want = "avx2" if {"avx2", "fma"} <= flags else "generic"
    elif "avx512f" in flags:
        want = "avx512"
    else:
        want = "avx2" if {"avx2", "fma"} <= flags else "generic"
    assert isa == want


_AVX2_SCRIPT = r"""
import json, torch
from rankme_fast.backends import cpu, torch_ref
u = 2.0 ** -53
worst = 0.0
cases = 0
for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
    for cols in (1, 7, 9, 24, 63, 257):
        for rows in (1, 131, 600):
            for threads, chunk in ((1, 0), (2, 17), (3, 3)):
                g = torch.Generator().manual_seed(rows * 1000 + cols)
                x64 = torch.randn(rows, cols, generator=g, dtype=torch.float64) + 1.5
                x = x64.to(dtype)
                cs = torch.randn(cols, generator=g, dtype=torch.float64) if cols % 2 else None
                cp = cpu.padded(cols)
                gn = torch.zeros(cp, cp, dtype=torch.float64); sn = torch.zeros(cols, dtype=torch.float64)
                gr = torch.zeros(cp, cp, dtype=torch.float64); sr = torch.zeros(cols, dtype=torch.float64)
                cpu.gram_update(x, gn, col_sum=sn, col_shift=cs, num_threads=threads, chunk_rows=chunk)
                torch_ref.gram_update(x, gr, col_sum=sr, col_shift=cs)
                v = x.to(torch.float64) - (cs if cs is not None else 0.0)
                bound = 4 * (rows + 2) * u * (v.abs().T @ v.abs()) + 1e-300
                up = torch.triu(torch.ones(cols, cols, dtype=torch.bool))
                for got in (gn, gr):
                    r = ((got[:cols, :cols] - v.T @ v).abs() / bound)[up].max().item()
                    worst = max(worst, r)
                assert bool(((sn - v.sum(0)).abs() <= 4 * (rows + 2) * u * v.abs().sum(0) + 1e-300).all())
                assert bool((gn[cols:] == 0).all()) and bool((gn[:, cols:] == 0).all())
                cases += 1
print(json.dumps({"isa": cpu.load().gram_isa(), "worst": worst, "cases": cases}))
"""


@needs_native
def test_avx2_variant_in_subprocess(tmp_path):
    """RANKME_FAST_DISABLE_AVX512=1 is read once per process at first kernel use: fresh interpreter."""
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 ISA variants only")
    res = run_python(_AVX2_SCRIPT, tmp_path, {"RANKME_FAST_DISABLE_AVX512": "1"})
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if flags:
        assert out["isa"] == ("avx2" if {"avx2", "fma"} <= flags else "generic")
    else:
        assert out["isa"] in ("avx2", "generic")
    assert out["cases"] == 4 * 6 * 3 * 3
    assert out["worst"] <= 1.0, f"worst error {out['worst']:.3g}× the float64 summation bound"


def test_import_loads_no_native_code(tmp_path):
    code = r"""
    import json, sys
    import rankme_fast
    before = sorted(m for m in sys.modules if m.startswith("rankme_fast._C") or m == "triton" or m.startswith("triton."))
    import torch
    z = torch.randn(300, 12, dtype=torch.float64)
    r = rankme_fast.rankme(z)
    ref = torch.linalg.svdvals(z)
    p = ref / ref.sum() + 1e-7
    want = float(torch.exp(-(p * p.log()).sum()))
    print(json.dumps({"before": before, "after": "rankme_fast._C" in sys.modules,
                      "cuda_after": "rankme_fast._C_cuda" in sys.modules, "r": r, "want": want}))
    """
    out = json.loads(run_python(code, tmp_path).stdout.strip().splitlines()[-1])
    assert out["before"] == [], f"import rankme_fast loaded {out['before']}"
    if cpu.load() is not None:  # built: the first CPU computation loads it
        assert out["after"] is True, "the first CPU computation should load the native kernel"
    assert out["cuda_after"] is False, "a CPU computation must not load the CUDA module"
    assert abs(out["r"] - out["want"]) <= 1e-6 * out["want"]


@needs_native
def test_show_config_reports_backend(capsys, monkeypatch):
    monkeypatch.delenv("RANKME_FAST_BACKEND", raising=False)
    rankme_fast.show_config()
    out = capsys.readouterr().out
    isa = cpu.load().gram_isa()
    assert f"rankme_fast: {rankme_fast.__version__}" in out
    assert f"cpu_extension: loaded, kernel isa={isa}" in out
    assert "backend_for_cpu_tensors: cpu (auto)" in out
    assert f"cpu: available (isa={isa})" in out and "torch: available" in out
    buf = io.StringIO()
    monkeypatch.setenv("RANKME_FAST_BACKEND", "torch")
    rankme_fast.show_config(file=buf)
    assert "backend_for_cpu_tensors: torch (from RANKME_FAST_BACKEND=torch)" in buf.getvalue()
    buf = io.StringIO()
    monkeypatch.setenv("RANKME_FAST_BACKEND", "bogus")
    rankme_fast.show_config(file=buf)
    assert "backend_for_cpu_tensors: error: unknown backend 'bogus'" in buf.getvalue()


def test_fallback_when_extension_hidden(tmp_path):
    """No native code at all: everything runs on the torch twin; an explicit 'cpu' request raises."""
    code = r"""
    import io, json, os, sys
    sys.modules["rankme_fast._C"] = None  # makes `from rankme_fast import _C` raise ImportError
    import torch
    import rankme_fast as rf
    from rankme_fast import backends
    from rankme_fast.demo import make_embeddings
    res = {}
    z = make_embeddings(3000, 64, "rank8_noise", dtype=torch.float32, seed=4)
    ref = torch.linalg.svdvals(z.double())
    p = ref / ref.sum() + 1e-7
    res["want"] = float(torch.exp(-(p * p.log()).sum()))
    res["got"] = rf.rankme(z)
    s = rf.spectrum(z)
    res["backend"] = s.backend
    res["sv_err"] = float((s.singular_values - ref).abs().max() / ref[0])
    zc = make_embeddings(257, 300, "power1", dtype=torch.float32, seed=4, offset=100.0)
    refc = torch.linalg.svdvals(zc.double() - zc.double().mean(0))
    res["sv_err_centred"] = float((rf.spectrum(zc, center=True).singular_values - refc).abs().max() / refc[0])
    for name, call in (("select", lambda: backends.select("cpu", torch.device("cpu"))),
                       ("rankme", lambda: rf.rankme(z, backend="cpu"))):
        try:
            call()
            res[name] = "no error"
        except RuntimeError as exc:
            res[name] = "RuntimeError: " + str(exc)
    os.environ["RANKME_FAST_BACKEND"] = "cpu"
    try:
        rf.rankme(z)
        res["env"] = "no error"
    except RuntimeError as exc:
        res["env"] = "RuntimeError: " + str(exc)
    del os.environ["RANKME_FAST_BACKEND"]
    buf = io.StringIO()
    rf.show_config(file=buf)
    res["config"] = buf.getvalue()
    print(json.dumps(res))
    """
    out = json.loads(run_python(code, tmp_path).stdout.strip().splitlines()[-1])
    assert out["backend"] == "torch"
    assert abs(out["got"] - out["want"]) <= 1e-4 * out["want"]
    assert out["sv_err"] <= 1e-6 and out["sv_err_centred"] <= 1e-6
    for key in ("select", "rankme", "env"):
        assert out[key].startswith("RuntimeError: backend 'cpu' was requested but cannot run on cpu"), (key, out[key])
        assert "rankme_fast._C not importable" in out[key]
    assert "cpu_extension: missing" in out["config"]
    assert "backend_for_cpu_tensors: torch (auto)" in out["config"]


# ----------------------------------------------------------------------------------------------
# optional CUDA module


def test_cuda_selftest():
    try:
        from rankme_fast import _build_info  # noqa: PLC0415
    except ImportError:
        pytest.skip("no build info: not an installed build")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _build_info.cuda_built:
        pytest.skip("rankme_fast._C_cuda was not built (no CUDA compiler at build time)")
    from rankme_fast import _C_cuda  # noqa: PLC0415

    out = _C_cuda.selftest(2.5, 1000)
    assert len(out) == 1000 and all(v == 2.5 for v in out)
    out = _C_cuda.selftest(-1e-300, 3)
    assert out == [-1e-300] * 3
    assert _C_cuda.device_count() == torch.cuda.device_count() >= 1
    assert _C_cuda.runtime_version() > 0
    buf = io.StringIO()
    rankme_fast.show_config(file=buf)
    assert f"cuda_extension: loaded, runtime {_C_cuda.runtime_version()}, devices {_C_cuda.device_count()}" in buf.getvalue()
