"""Triton Gram kernels: G += VᵀV over row chunks, upper-triangular tiles only, N split across programs.

V = X − row_shift 1ᵀ − 1 col_shiftᵀ is never materialised: tiles of X are loaded with their strides,
upcast in registers (bf16/fp16/fp32 → fp32/fp64) and shifted there. Each program owns one
upper-triangular BM×BM tile (ti ≤ tj: symmetry halves the work) and one slice of the rows; its partial
tile is written in float64 and the partials are summed in float64 (deterministic, no atomics).
Diagonal-tile programs also produce the float64 column sums that centring needs.

Modes
-----
``"int8"`` (exact, the default for 16/32-bit input): error-free integer slicing
    (:mod:`rankme_fast.kernels.slices`): per chunk of ≤ 2^15 rows and per column, V is cut into S
    int8 digits relative to the column's chunk maximum (S = 4 for float32, 3 for bf16/fp16); all S²
    digit products run on int8 tensor cores with exact int32 sums, combined in float64. The result is
    the float64 Gram of X̃ with |X̃ − X| ≤ 2^-7S·(chunk column max) — σ moves by at most ‖X̃ − X‖₂,
    far inside the DESIGN §3 contract (measured in ``benchmarks/RESULTS.md``).
``"fp64"`` (exact): float64 tiles and a float64 ``tl.dot`` (DMMA where Triton lowers it so).
``"fast"``: float32-class — bf16/fp16 tiles go to the tensor cores as they are (fp32 accumulation),
    float32 (or shifted) tiles use ``input_precision="tf32x3"``; fp32 accumulators are flushed into
    the float64 tile every ``FOLD`` row blocks. Error: see ``rankme_fast.spectrum.FAST_RANKME_RTOL``.

Under ``TRITON_INTERPRET=1`` (CPU tests) 16-bit tiles are upcast before every ``tl.dot`` (the
interpreter multiplies bf16 wrongly) and ``input_precision`` is ignored by the interpreter.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import slices as _sl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODES = ("int8", "fp64", "fast")
TILE = 128  # Gram buffers are padded to a multiple of this, so every BM in (32, 64, 128) tiles them
SLICE_ROWS = 1 << 15  # rows per exponent block of the int8 mode
# int32 exactness: every digit has |D| ≤ 64, so a class (≤ S pairs) over R rows is ≤ R·S·2^12 in magnitude
assert SLICE_ROWS * 4 * 4096 < 2**31, "int8 class sums would overflow int32"
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90 (227 KB)
_DTYPE_SLICES = {torch.float32: 4, torch.float16: 3, torch.bfloat16: 3, torch.float64: 4}


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _load_v(x_ptr, rows_idx, cols_idx, stride_r, stride_c, n_rows, n_cols, rs_ptr, cs_ptr,
            HAS_RS: tl.constexpr, HAS_CS: tl.constexpr):
    """Tile V[rows_idx, cols_idx] in float64 (0 outside the matrix)."""
    mask = (rows_idx[:, None] < n_rows) & (cols_idx[None, :] < n_cols)
    v = tl.load(x_ptr + rows_idx[:, None].to(tl.int64) * stride_r + cols_idx[None, :].to(tl.int64) * stride_c,
                mask=mask, other=0.0).to(tl.float64)
    if HAS_RS:
        v -= tl.load(rs_ptr + rows_idx, mask=rows_idx < n_rows, other=0.0)[:, None]
    if HAS_CS:
        v -= tl.load(cs_ptr + cols_idx, mask=cols_idx < n_cols, other=0.0)[None, :]
    return tl.where(mask, v, 0.0)


@triton.jit
def _colstats_kernel(x_ptr, stride_r, stride_c, n_rows, n_cols, rs_ptr, cs_ptr, max_ptr, sum_ptr, rows_per_prog,
                     HAS_RS: tl.constexpr, HAS_CS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Per (row block, column): max |V| and Σ V in float64 — partials reduced by the caller."""
    pc = tl.program_id(0)
    pr = tl.program_id(1)
    cols = pc * BC + tl.arange(0, BC)
    m = tl.zeros([BC], dtype=tl.float64)
    s = tl.zeros([BC], dtype=tl.float64)
    r_end = tl.minimum(pr * rows_per_prog + rows_per_prog, n_rows)
    for r0 in range(pr * rows_per_prog, r_end, BR):
        rr = r0 + tl.arange(0, BR)
        v = _load_v(x_ptr, rr, cols, stride_r, stride_c, r_end, n_cols, rs_ptr, cs_ptr, HAS_RS, HAS_CS)
        m = tl.maximum(m, tl.max(tl.abs(v), axis=0))
        s += tl.sum(v, axis=0)
    cm = cols < n_cols
    tl.store(max_ptr + pr * n_cols + cols, m, mask=cm)
    tl.store(sum_ptr + pr * n_cols + cols, s, mask=cm)


@triton.jit
def _digits_kernel(x_ptr, stride_r, stride_c, n_rows, n_cols, rs_ptr, cs_ptr, inv_scale_ptr, dig_ptr,
                   rows_pad, cols_pad, HAS_RS: tl.constexpr, HAS_CS: tl.constexpr, SLICES: tl.constexpr,
                   BR: tl.constexpr, BC: tl.constexpr):
    """int8 digits D[s, col, row] (row-contiguous: K-major operands for the int8 tensor cores).

    t = V·2^-E ∈ (-1, 1); y = 2^6 t; repeat S times: D = floor(y + ½), y = 2^7 (y − D). Every step
    is exact in float64. Padding rows/columns get zeros, so the Gram kernel needs no masks."""
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    rr = pr * BR + tl.arange(0, BR)
    cc = pc * BC + tl.arange(0, BC)
    v = _load_v(x_ptr, rr, cc, stride_r, stride_c, n_rows, n_cols, rs_ptr, cs_ptr, HAS_RS, HAS_CS)
    inv = tl.load(inv_scale_ptr + cc, mask=cc < n_cols, other=1.0)
    y = v * inv[None, :] * 64.0
    out = dig_ptr + cc[None, :].to(tl.int64) * rows_pad + rr[:, None]
    smask = (rr[:, None] < rows_pad) & (cc[None, :] < cols_pad)
    plane = cols_pad.to(tl.int64) * rows_pad
    for s in tl.static_range(SLICES):
        d = tl.floor(y + 0.5)
        tl.store(out + s * plane, d.to(tl.int8), mask=smask)
        y = (y - d) * 128.0


@triton.jit
def _gram_int8_kernel(dig_ptr, ti_ptr, tj_ptr, out_ptr, rows_pad, cols_pad, k_end, k_per_prog,
                      SLICES: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Class sums C_c = Σ_{a+b=c} Σ_k D_a[I, k] D_b[J, k] of one tile over this program's rows, each
    exact in int32, written as int32 (out[c, split, tile]); the caller combines the 2S−1 classes in
    float64 with weights 2^-(12+7c) and the column scales. Only one int32 accumulator is live."""
    t = tl.program_id(0)
    sp = tl.program_id(1)
    ti = tl.load(ti_ptr + t)
    tj = tl.load(tj_ptr + t)
    ci = ti * BM + tl.arange(0, BM)
    cj = tj * BM + tl.arange(0, BM)
    kk = tl.arange(0, BK)
    plane = cols_pad.to(tl.int64) * rows_pad
    a_base = dig_ptr + ci[:, None].to(tl.int64) * rows_pad + kk[None, :]
    b_base = dig_ptr + cj[:, None].to(tl.int64) * rows_pad + kk[None, :]
    k0 = sp * k_per_prog
    k1 = tl.minimum(k0 + k_per_prog, k_end)
    r = tl.arange(0, BM)
    tile_elems = tl.num_programs(0).to(tl.int64) * tl.num_programs(1) * (BM * BM)
    o = out_ptr + (sp * tl.num_programs(0) + t).to(tl.int64) * (BM * BM) + r[:, None] * BM + r[None, :]
    n_k = (k1 - k0) // BK
    for c in range(0, 2 * SLICES - 1):
        # digit pairs (a, c − a) with 0 ≤ a, c − a < S, flattened with the K blocks into one loop so
        # the compiler pipelines a single dot stream (static unrolling spilled registers)
        lo = tl.maximum(c - SLICES + 1, 0)
        n_pair = tl.minimum(c, SLICES - 1) - lo + 1
        acc = tl.zeros([BM, BM], dtype=tl.int32)
        for it in range(0, n_k * n_pair):
            a = lo + it % n_pair
            k = k0 + (it // n_pair) * BK
            da = tl.load(a_base + a * plane + k)
            db = tl.load(b_base + (c - a) * plane + k)
            acc = tl.dot(da, tl.trans(db), acc, out_dtype=tl.int32)
        tl.store(o + c * tile_elems, acc)


@triton.jit
def _gram_float_kernel(x_ptr, stride_r, stride_c, n_rows, n_cols, rs_ptr, cs_ptr, scale, ti_ptr, tj_ptr, out_ptr,
                       csum_ptr, rows_per_prog, HAS_RS: tl.constexpr, HAS_CS: tl.constexpr, WANT_CSUM: tl.constexpr,
                       MODE: tl.constexpr, NATIVE16: tl.constexpr, IN_PREC: tl.constexpr, BM: tl.constexpr,
                       BK: tl.constexpr, FOLD: tl.constexpr, X_F64: tl.constexpr):
    """Partial tile of VᵀV from X directly. MODE 0: fast (fp32 accumulators flushed to float64 every
    FOLD·BK rows; NATIVE16 feeds unshifted bf16/fp16 tiles to the tensor cores as they are);
    MODE 1: float64 tiles and dot."""
    t = tl.program_id(0)
    sp = tl.program_id(1)
    ti = tl.load(ti_ptr + t)
    tj = tl.load(tj_ptr + t)
    ci = ti * BM + tl.arange(0, BM)
    cj = tj * BM + tl.arange(0, BM)
    kk = tl.arange(0, BK)
    r_begin = sp * rows_per_prog
    r_end = tl.minimum(r_begin + rows_per_prog, n_rows)
    r = tl.arange(0, BM)
    o = out_ptr + (sp * tl.num_programs(0) + t).to(tl.int64) * (BM * BM) + r[:, None] * BM + r[None, :]
    inv_s = tl.cast(1.0, tl.float64) / scale  # a power of two: a float64 division is exact (div.full.f32 is not)
    csum = tl.zeros([BM], dtype=tl.float64)
    diag = ti == tj
    for seg in range(r_begin, r_end, BK * FOLD):
        if MODE == 1:
            acc = tl.zeros([BM, BM], dtype=tl.float64)
        else:
            acc = tl.zeros([BM, BM], dtype=tl.float32)
        for r0 in range(seg, tl.minimum(seg + BK * FOLD, r_end), BK):
            rr = r0 + kk
            if NATIVE16 or (MODE == 0 and not HAS_RS and not HAS_CS and not X_F64):
                # unshifted fast path for ≤ 32-bit input: no float64 tiles in registers (they would spill);
                # float64 input takes the float64 route below, so the scale is applied before rounding
                ma = (rr[:, None] < r_end) & (ci[None, :] < n_cols)
                mb = (rr[:, None] < r_end) & (cj[None, :] < n_cols)
                a = tl.load(x_ptr + rr[:, None].to(tl.int64) * stride_r + ci[None, :].to(tl.int64) * stride_c,
                            mask=ma, other=0.0)
                b = tl.load(x_ptr + rr[:, None].to(tl.int64) * stride_r + cj[None, :].to(tl.int64) * stride_c,
                            mask=mb, other=0.0)
                if WANT_CSUM:
                    if diag:
                        csum += tl.sum(a.to(tl.float64), axis=0)  # exact sums, before any rounding
                if NATIVE16:  # bf16/fp16 straight to the tensor cores; the power-of-two scale is exact
                    acc = tl.dot(tl.trans((a.to(tl.float32) * scale).to(a.dtype)),
                                 (b.to(tl.float32) * scale).to(b.dtype), acc)
                else:
                    acc = tl.dot(tl.trans(a.to(tl.float32) * scale), b.to(tl.float32) * scale, acc,
                                 input_precision=IN_PREC)
            else:
                a = _load_v(x_ptr, rr, ci, stride_r, stride_c, r_end, n_cols, rs_ptr, cs_ptr, HAS_RS, HAS_CS)
                b = _load_v(x_ptr, rr, cj, stride_r, stride_c, r_end, n_cols, rs_ptr, cs_ptr, HAS_RS, HAS_CS)
                if WANT_CSUM:
                    if diag:
                        csum += tl.sum(a, axis=0)
                if MODE == 1:
                    acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
                else:
                    a32 = (a * scale).to(tl.float32)
                    b32 = (b * scale).to(tl.float32)
                    acc = tl.dot(tl.trans(a32), b32, acc, input_precision=IN_PREC)
        # flush into the (zeroed) float64 output: no float64 tile held in registers
        tl.store(o, tl.load(o) + acc.to(tl.float64) * inv_s * inv_s)
    if WANT_CSUM:
        if diag:
            tl.store(csum_ptr + sp * n_cols + ci, csum, mask=ci < n_cols)


# ------------------------------------------------------------------------------------------------
# launchers


def padded(n: int) -> int:
    return (n + TILE - 1) // TILE * TILE


_TILES_CACHE: dict = {}


def upper_tiles(n_tiles: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ti, tj) of every tile with ti ≤ tj, as int32 tensors, built on ``device`` once per size (a host
    copy would synchronise the stream on every update)."""
    key = (n_tiles, str(device))
    if key not in _TILES_CACHE:
        iu = torch.triu_indices(n_tiles, n_tiles, device=device)
        _TILES_CACHE[key] = (iu[0].to(torch.int32), iu[1].to(torch.int32))
    return _TILES_CACHE[key]


def _splits(rows: int, n_tiles: int, block: int, target_programs: int) -> tuple[int, int]:
    """(splits, rows per program): enough programs to fill the GPU, each a multiple of ``block`` rows."""
    want = max(1, min(-(-target_programs // max(n_tiles, 1)), -(-rows // block)))
    per = -(-rows // want)
    per = -(-per // block) * block
    return -(-rows // per), per


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: few, large programs


def _accumulate_tiles(gram: torch.Tensor, parts: torch.Tensor, ti: torch.Tensor, tj: torch.Tensor, bm: int) -> None:
    """gram[tile (ti, tj)] += Σ_split parts[split, t] (float64, deterministic order)."""
    p = gram.shape[0]
    nt = p // bm
    tiles = gram.view(nt, bm, nt, bm).permute(0, 2, 1, 3)
    tiles.index_put_((ti.long(), tj.long()), parts.sum(0), accumulate=True)


def float_config(mode: str, dtype: torch.dtype, shifted: bool, interpret: bool = INTERPRET) -> dict:
    """Tile configuration of ``_gram_float_kernel`` as launched (the Hopper compile test compiles these).

    BM 128 needs 8 warps; float64 tiles stay at 64² (a 128² float64 accumulator would spill). Fast float32
    (and shifted or float64-input fast) tiles use BK = 32: at BK = 64 with 3 stages the fp32 operands and
    their transposed copies need 256 KB of shared memory on sm_90, above its 227 KB (offline compile);
    FOLD keeps the fp32 accumulation window at 1024 rows either way."""
    if interpret:
        return {"BM": 64, "BK": 32, "FOLD": 1 << 24 if mode == "fp64" else 32, "num_warps": 4, "num_stages": 1}
    if mode == "fp64":
        return {"BM": 64, "BK": 32, "FOLD": 1 << 24, "num_warps": 4, "num_stages": 3}
    native16 = dtype in (torch.float16, torch.bfloat16) and not shifted
    bk = 64 if native16 else 32
    return {"BM": 128, "BK": bk, "FOLD": 1024 // bk, "num_warps": 8, "num_stages": 3}


def int8_config(interpret: bool = INTERPRET) -> dict:
    """Tile configuration of the int8 mode's three kernels as launched."""
    if interpret:
        return {"BM": 64, "BK": 32, "BR": 32, "BC": 32, "num_warps": 4}
    return {"BM": 128, "BK": 64, "BR": 64, "BC": 64, "num_warps": 8}


def default_mode(dtype: torch.dtype) -> str:
    """Exact mode by dtype: integer slicing for ≤ 32-bit input, float64 tiles for float64 input."""
    return "fp64" if dtype == torch.float64 else "int8"


def gram_update(
    x: torch.Tensor,
    gram: torch.Tensor,
    *,
    col_sum: Optional[torch.Tensor] = None,
    row_shift: Optional[torch.Tensor] = None,
    col_shift: Optional[torch.Tensor] = None,
    mode: Optional[str] = None,
    slices: Optional[int] = None,
    block: Optional[int] = None,
    scale: float = 1.0,
) -> None:
    """``gram[:C, :C] += VᵀV`` (upper tiles; V = X − row_shift − col_shift), ``col_sum += Σ_r V``.

    Args:
        x: (rows, C) float64/32/16 or bfloat16, any strides, on the device of ``gram``.
        gram: (padded(C), padded(C)) contiguous float64; only tiles with ti ≤ tj are written.
        mode: "int8" | "fp64" | "fast" (None: :func:`default_mode`).
        slices: int8 digits per value (None: 4 for float32/64, 3 for bf16/fp16).
        block: tile size BM (32, 64 or 128; None: 128 on a GPU, 64 in the interpreter).
        scale: power of two applied before the fast mode's fp32 products (keeps squares in range).
    """
    mode = mode or default_mode(x.dtype)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows, cols = x.shape
    p = gram.shape[0]
    if p % TILE or p < cols or tuple(gram.shape) != (p, p) or gram.dtype != torch.float64 or not gram.is_contiguous():
        raise ValueError(f"gram must be a contiguous float64 ({padded(cols)}, {padded(cols)}) buffer, "
                         f"got {gram.dtype} {tuple(gram.shape)}")
    if rows == 0:
        return
    dev = x.device
    shifted = row_shift is not None or col_shift is not None
    cfg = float_config(mode, x.dtype, shifted) if mode != "int8" else int8_config()
    bm = block or cfg["BM"]
    nt = p // bm
    ti, tj = upper_tiles(nt, dev)
    rs = row_shift if row_shift is not None else gram  # dummy pointer when absent
    cs = col_shift if col_shift is not None else gram
    if mode == "int8":
        if slices is None:
            slices = _DTYPE_SLICES[x.dtype]
            # Shifted 16-bit data stay exact in 3 digits only when the shift is itself representable in
            # the input's dtype (then x − s has few significant bits); otherwise use 4 (28 bits).
            for sh in (row_shift, col_shift):
                if sh is not None and slices < _sl.MAX_SLICES and not bool((sh.to(x.dtype).to(torch.float64) == sh).all()):
                    slices = _sl.MAX_SLICES
        _gram_int8(x, gram, col_sum, rs, cs, row_shift is not None, col_shift is not None, slices, bm, ti, tj)
        return
    bk = cfg["BK"]
    n_split, per = _splits(rows, len(ti), bk, _target_programs(dev))
    parts = torch.zeros(n_split, len(ti), bm, bm, dtype=torch.float64, device=dev)
    csum = torch.zeros(n_split, cols, dtype=torch.float64, device=dev)
    native16 = (mode == "fast" and not INTERPRET and x.dtype in (torch.float16, torch.bfloat16) and not shifted)
    _gram_float_kernel[(len(ti), n_split)](
        x, x.stride(0), x.stride(1), rows, cols, rs, cs, float(scale) if mode == "fast" else 1.0, ti, tj, parts, csum, per,
        HAS_RS=row_shift is not None, HAS_CS=col_shift is not None, WANT_CSUM=col_sum is not None,
        MODE=1 if mode == "fp64" else 0, NATIVE16=native16, IN_PREC="tf32x3", BM=bm, BK=bk,
        FOLD=cfg["FOLD"], X_F64=x.dtype == torch.float64, num_warps=8 if bm == 128 else 4,
        num_stages=cfg["num_stages"],
    )
    _accumulate_tiles(gram, parts, ti, tj, bm)
    if col_sum is not None:
        col_sum += csum.sum(0)


def _gram_int8(x, gram, col_sum, rs, cs, has_rs, has_cs, n_slices, bm, ti, tj) -> None:
    if not 1 <= n_slices <= _sl.MAX_SLICES:
        raise ValueError(f"slices must be in 1..{_sl.MAX_SLICES}, got {n_slices}")
    rows, cols = x.shape
    p = gram.shape[0]
    dev = x.device
    cfg = int8_config()
    bk, br, bc = cfg["BK"], cfg["BR"], cfg["BC"]
    chunk = min(SLICE_ROWS, rows)
    chunk_pad = -(-chunk // bk) * bk
    dig = torch.empty(n_slices, p, chunk_pad, dtype=torch.int8, device=dev)  # reused by every chunk
    for r0 in range(0, rows, chunk):
        xc = x[r0 : r0 + chunk]
        rsc = rs[r0 : r0 + chunk] if has_rs else rs
        n = xc.shape[0]
        # column max |V| and Σ V over the chunk (float64, partials per row block)
        n_rp, per = _splits(n, -(-cols // bc), br, _target_programs(dev))
        mx = torch.empty(n_rp, cols, dtype=torch.float64, device=dev)
        sm = torch.empty(n_rp, cols, dtype=torch.float64, device=dev)
        _colstats_kernel[(-(-cols // bc), n_rp)](
            xc, xc.stride(0), xc.stride(1), n, cols, rsc, cs, mx, sm, per,
            HAS_RS=has_rs, HAS_CS=has_cs, BR=br, BC=bc)
        if col_sum is not None:
            col_sum += sm.sum(0)
        e = torch.frexp(mx.amax(0)).exponent  # max |V| < 2^e (0 for a zero column)
        inv = torch.ones(p, dtype=torch.float64, device=dev)
        inv[:cols] = torch.ldexp(torch.ones(cols, dtype=torch.float64, device=dev), (-e).to(torch.float64))
        _digits_kernel[(-(-chunk_pad // br), p // bc)](
            xc, xc.stride(0), xc.stride(1), n, cols, rsc, cs, inv, dig, chunk_pad, p,
            HAS_RS=has_rs, HAS_CS=has_cs, SLICES=n_slices, BR=br, BC=bc)
        n_pad = -(-n // bk) * bk  # digit rows [n, n_pad) are zero
        n_split, kper = _splits(n_pad, len(ti), bk, _target_programs(dev))
        classes = torch.empty(2 * n_slices - 1, n_split, len(ti), bm, bm, dtype=torch.int32, device=dev)
        _gram_int8_kernel[(len(ti), n_split)](
            dig, ti, tj, classes, chunk_pad, p, n_pad, kper, SLICES=n_slices, BM=bm, BK=bk,
            num_warps=8 if bm == 128 else 4)
        # Σ_c 2^-(12+7c) C_c: integer class sums are exact in float64, then one float64 rounding per
        # class; times 2^(E_i + E_j)
        tiles = torch.zeros(len(ti), bm, bm, dtype=torch.float64, device=dev)
        for c in range(2 * n_slices - 1):
            tiles += classes[c].sum(0, dtype=torch.float64) * 2.0 ** (-12 - 7 * c)
        scl = 1.0 / inv
        # integer digits cannot carry NaN/Inf: a column whose float64 sum is not finite poisons its
        # rows and columns of G, so callers see the non-finite input (no host synchronisation)
        scl[:cols] = torch.where(torch.isfinite(sm.sum(0)), scl[:cols], torch.full_like(scl[:cols], float("nan")))
        s = scl.view(-1, bm)
        tiles *= s[ti.long()][:, :, None] * s[tj.long()][:, None, :]
        _accumulate_tiles(gram, tiles[None], ti, tj, bm)
