"""Triton fused normal operator: out = Vᵀ(V W) for a block W of k columns, V = X − 1·col_shiftᵀ.

Each program owns a contiguous slice of the rows and walks it in blocks of BM rows. For one block it
computes Y = V_b W (BM × k, reducing over d in tiles of BD columns), then Vᵀ_b Y tile by tile into its
own float64 partial of the output (d × KP). Between the two sweeps the block's BM×d tiles are re-read
while still in L2 (at BM = 32 and bf16, a 16k-column block is 1 MB), so X crosses HBM once per
application. The partials are summed over programs in float64 by torch (deterministic, no atomics).

Modes
-----
``"fp64"`` (default): tiles upcast to float64 in registers and a float64 ``tl.dot`` (what quadrature over
    the whole spectrum needs: rounding ~1e-16·‖G‖).
``"fp32"``: float32 tiles, ``input_precision="ieee"`` float32 products and sums within one block of BM
    rows; the blocks are added in float64.

Under ``TRITON_INTERPRET=1`` (CPU tests) tiles are upcast before every ``tl.dot`` anyway, so the
interpreter's bf16 product is never used.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODES = ("fp64", "fp32")
MAX_K = 64  # columns of W per pass (the BM × KP accumulator and BD × KP partial stay in registers)


@triton.jit
def _tile(x_ptr, rows, cols, stride_r, stride_c, r_end, n_cols, cs_ptr, HAS_CS: tl.constexpr, F64: tl.constexpr):
    """V[rows, cols] in float64 (F64) or float32, 0 outside the slice."""
    mask = (rows[:, None] < r_end) & (cols[None, :] < n_cols)
    v = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c,
                mask=mask, other=0.0)
    if F64:
        v = v.to(tl.float64)
        if HAS_CS:
            v -= tl.load(cs_ptr + cols, mask=cols < n_cols, other=0.0)[None, :]
    else:
        if HAS_CS:  # the shift is applied in float64, then rounded once
            v = (v.to(tl.float64) - tl.load(cs_ptr + cols, mask=cols < n_cols, other=0.0)[None, :]).to(tl.float32)
        else:
            v = v.to(tl.float32)
    return tl.where(mask, v, 0.0)


@triton.jit
def _normal_kernel(x_ptr, stride_r, stride_c, n_rows, n_cols, cs_ptr, w_ptr, out_ptr, rows_per_prog,
                   HAS_CS: tl.constexpr, F64: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr):
    pid = tl.program_id(0)
    r_begin = pid * rows_per_prog
    r_end = tl.minimum(r_begin + rows_per_prog, n_rows)
    kk = tl.arange(0, KP)
    dd = tl.arange(0, BD)
    part = out_ptr + pid.to(tl.int64) * n_cols * KP  # this program's (n_cols, KP) float64 partial
    for r0 in range(r_begin, r_end, BM):
        rows = r0 + tl.arange(0, BM)
        if F64:
            y = tl.zeros([BM, KP], dtype=tl.float64)
        else:
            y = tl.zeros([BM, KP], dtype=tl.float32)
        for c0 in range(0, n_cols, BD):
            cols = c0 + dd
            v = _tile(x_ptr, rows, cols, stride_r, stride_c, r_end, n_cols, cs_ptr, HAS_CS, F64)
            w = tl.load(w_ptr + cols[:, None] * KP + kk[None, :], mask=cols[:, None] < n_cols, other=0.0)
            if not F64:
                w = w.to(tl.float32)
            y = tl.dot(v, w, y, input_precision="ieee")
        for c0 in range(0, n_cols, BD):
            cols = c0 + dd
            v = _tile(x_ptr, rows, cols, stride_r, stride_c, r_end, n_cols, cs_ptr, HAS_CS, F64)
            contrib = tl.dot(tl.trans(v), y, input_precision="ieee")
            ptrs = part + cols[:, None] * KP + kk[None, :]
            m = cols[:, None] < n_cols
            tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + contrib.to(tl.float64), mask=m)


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: few, large programs


def normal_apply(x: torch.Tensor, w: torch.Tensor, *, col_shift: Optional[torch.Tensor] = None,
                 mode: str = "fp64", block_rows: Optional[int] = None, block_cols: Optional[int] = None,
                 programs: Optional[int] = None) -> torch.Tensor:
    """(d, k) float64 ``Vᵀ(V W)`` for x (N, d) float64/32/16/bf16 (any strides) and w (d, k) on x's device.

    Args:
        col_shift: float64 (d,) subtracted from every row (centring), or None.
        mode: "fp64" | "fp32" (see the module docstring).
        block_rows, block_cols: BM, BD (None: 32 × 64 for k ≤ 16, 32 × 32 above).
        programs: row slices (None: 2 per SM; 2 in the interpreter).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if x.ndim != 2 or w.ndim != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(f"normal_apply needs x (N, d) and w (d, k), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"normal_apply does not support dtype {x.dtype}")
    if w.device != x.device or (col_shift is not None and col_shift.device != x.device):
        raise ValueError(f"w and col_shift must be on x's device {x.device}")
    if col_shift is not None and (col_shift.dtype != torch.float64 or col_shift.shape != (x.shape[1],)):
        raise ValueError(f"col_shift must be float64 of shape ({x.shape[1]},), got {col_shift.dtype} "
                         f"{tuple(col_shift.shape)}")
    n, d = x.shape
    k = w.shape[1]
    dev = x.device
    if n == 0 or k == 0:
        return torch.zeros(d, k, dtype=torch.float64, device=dev)
    if k > MAX_K:  # register budget: wider blocks go MAX_K columns per pass
        return torch.cat([normal_apply(x, w[:, j:j + MAX_K], col_shift=col_shift, mode=mode, block_rows=block_rows,
                                       block_cols=block_cols, programs=programs) for j in range(0, k, MAX_K)], 1)
    kp = max(16, triton.next_power_of_2(k))
    f64 = mode == "fp64"
    # BM = 32, and BD = 64 (4 warps) for KP = 16 or BD = 32 (8 warps) for wider W: no register spills at
    # sm_90 in either mode for fp32/bf16 input (cuobjdump -res-usage, benchmarks/RESULTS.md)
    bm = block_rows or 32
    bd = block_cols or (64 if kp <= 16 else 32)
    warps = 4 if kp <= 16 else 8
    nprog = max(1, min(programs or _programs(dev), -(-n // bm)))
    per = -(-(-(-n // nprog)) // bm) * bm  # rows per program, a multiple of BM
    nprog = -(-n // per)
    wp = torch.zeros(d, kp, dtype=torch.float64, device=dev)
    wp[:, :k] = w
    parts = torch.zeros(nprog, d, kp, dtype=torch.float64, device=dev)
    cs = col_shift.contiguous() if col_shift is not None else wp  # dummy pointer when absent
    _normal_kernel[(nprog,)](x, x.stride(0), x.stride(1), n, d, cs, wp, parts, per,
                             HAS_CS=col_shift is not None, F64=f64, BM=bm, BD=bd, KP=kp,
                             num_warps=warps)
    return parts.sum(0)[:, :k]
