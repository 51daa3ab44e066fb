"""Error-free integer slicing of a Gram matrix (Ozaki-style) — the pure-torch twin of the GPU kernels.

A chunk V (R×C, float64 after the optional shift) is written per column j as a fixed-point number
relative to its chunk maximum:  m_j = max_r |V_rj| = f·2^E_j with f ∈ [½, 1) (``frexp``), t = V·2^-E_j,
so |t| < 1, and

    t = Σ_{s<S} D_s · 2^-(6+7s) + ρ,      D_s ∈ [-64, 64] integers,  |ρ| ≤ 2^-(7S)

(digit s is ``floor(y + ½)`` of the running remainder y, scaled by 2^6 first and by 2^7 after).
Digits fit int8, their products fit 2^12, so int8 tensor cores accumulate Σ_r D_a[r,i]·D_b[r,j]
*exactly* in int32 for up to 2^17 rows per class. The Gram is then

    G_ij = 2^(E_i+E_j) Σ_{c ≤ 2S-2} 2^-(12+7c) Σ_{a+b=c} (D_aᵀ D_b)_ij

over *all* S² digit pairs, so G is exactly the Gram of the represented matrix X̃ (dropping the
low-order pairs, as truncated Ozaki schemes do, breaks that and squares the condition number again:
measured, see benchmarks/RESULTS.md), combined in float64. Every product and
every within-chunk sum is exact; the only errors are ρ (2^-7S of the chunk's column maximum per entry,
a perturbation of the *input*, not of G) and the float64 rounding of the cross-chunk sums.
``S = 4`` (28 bits) gives the DESIGN §3 exact contract on every test spectrum; see
``benchmarks/RESULTS.md`` for the measured errors against the float64 SVD.

This module holds the digit definition shared by the Triton and CUDA kernels and a float64 emulation
of the whole scheme (integer products of |D| ≤ 64 are exact in float64), used as their test oracle.
"""
from __future__ import annotations

from typing import Optional

import torch

DIGIT_BITS = 7  # bits per digit after the first (which has 6 + sign)
FIRST_SHIFT = 6
MAX_SLICES = 4
DEFAULT_SLICES = 4
# Rows per exponent block: int32 class sums stay exact while rows·(pairs per class)·2^12 < 2^31.
MAX_CHUNK_ROWS = (1 << 31) // (MAX_SLICES * 64 * 64) - 1


def column_exponents(v: torch.Tensor) -> torch.Tensor:
    """E_j with max_r |v_rj| < 2^E_j (0 for an all-zero column), as int32; ``v`` float64 (R, C)."""
    m = v.abs().amax(0) if v.shape[0] else torch.zeros(v.shape[1], dtype=v.dtype, device=v.device)
    return torch.frexp(m).exponent.to(torch.int32)


def digits(v: torch.Tensor, exps: torch.Tensor, slices: int) -> torch.Tensor:
    """Digits D (slices, R, C) as float64 integers in [-64, 64] of ``v`` (R, C) float64."""
    t = torch.ldexp(v, (-exps).to(v.dtype)[None, :])
    y = t * 2.0**FIRST_SHIFT
    out = []
    for _ in range(slices):
        d = torch.floor(y + 0.5)
        out.append(d)
        y = (y - d) * 2.0**DIGIT_BITS
    return torch.stack(out)


def gram_update(
    x: torch.Tensor,
    gram: torch.Tensor,
    *,
    col_sum: Optional[torch.Tensor] = None,
    row_shift: Optional[torch.Tensor] = None,
    col_shift: Optional[torch.Tensor] = None,
    slices: int = DEFAULT_SLICES,
    chunk_rows: int = 32768,
) -> None:
    """``gram += Vᵀ V`` by the integer-slice scheme (float64 emulation); same contract as
    :func:`rankme_fast.backends.torch_ref.gram_update` (``gram`` (C, C) float64, full matrix)."""
    if not 1 <= slices <= MAX_SLICES:
        raise ValueError(f"slices must be in 1..{MAX_SLICES}, got {slices}")
    rows, cols = x.shape
    for r0 in range(0, rows, chunk_rows):
        v = x[r0 : r0 + chunk_rows].to(torch.float64)
        if row_shift is not None:
            v = v - row_shift[r0 : r0 + chunk_rows, None]
        if col_shift is not None:
            v = v - col_shift[None, :]
        if col_sum is not None:
            col_sum += v.sum(0)
        e = column_exponents(v)
        dg = digits(v, e, slices)
        acc = torch.zeros(cols, cols, dtype=torch.float64, device=x.device)
        for c in range(2 * slices - 1):
            lo, hi = max(0, c - slices + 1), min(c, slices - 1)
            cls = sum(dg[a].T @ dg[c - a] for a in range(lo, hi + 1))  # exact: integers < 2^53
            acc += cls * 2.0 ** (-(2 * FIRST_SHIFT + DIGIT_BITS * c))
        scale = torch.ldexp(torch.ones(cols, dtype=torch.float64, device=x.device), e.to(torch.float64))
        gram[:cols, :cols] += acc * scale[:, None] * scale[None, :]
