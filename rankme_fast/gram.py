"""Gram matrices of embedding matrices, exact in float64 (DESIGN §3).

``G = Vᵀ V`` with ``V = Z`` (uncentred) or ``V = Z - 1 μᵀ`` (centred), where Z is N×d. When N < d the
N×N Gram ``V Vᵀ`` is formed instead; both have the same non-zero eigenvalues σ_k².

Centring without cancellation: for N ≥ d the rows are shifted by the mean ``s`` of the first chunk while
accumulating, and the remaining offset is removed exactly at the end,
``G_c = G_s - c cᵀ / N`` with ``c = Σ_r (z_r - s)`` (Chan et al.), so G is never formed from
uncentred data with a large mean. For N < d the exact column means are computed first (float64,
chunked) and subtracted inside the kernel.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import backends

SHIFT_ROWS = 4096  # rows used to estimate the centring shift


@dataclass
class GramResult:
    gram: torch.Tensor  # (K, K) float64, upper triangle valid (full symmetric for the torch backend)
    n_rows: int
    n_features: int
    transposed: bool  # True when the N×N Gram was formed (N < d)
    backend: str


def _column_means(x: torch.Tensor) -> torch.Tensor:
    """Exact float64 column means of ``x`` (N×d), converting at most ~32 MiB at a time."""
    n, d = x.shape
    out = torch.empty(d, dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(n, 1))
    for j in range(0, d, step):
        out[j : j + step] = x[:, j : j + step].to(torch.float64).sum(0)
    return out / n


def exact_gram(
    x: torch.Tensor, *, center: bool, backend: Optional[str] = None, num_threads: Optional[int] = None
) -> GramResult:
    """Float64-exact Gram of a validated 2-D tensor ``x`` (N×d)."""
    n, d = x.shape
    be = backends.select(backend, x.device)
    transposed = n < d
    v = x.T if transposed else x
    k = v.shape[1]
    size = backends.cpu.padded(k) if be is backends.cpu else k
    g = torch.zeros(size, size, dtype=torch.float64, device=x.device)
    if not center:
        be.gram_update(v, g, num_threads=num_threads)
    elif transposed:
        mu = _column_means(x)  # one value per row of v
        be.gram_update(v, g, row_shift=mu, num_threads=num_threads)
    else:
        shift = x[: min(n, SHIFT_ROWS)].to(torch.float64).mean(0)
        csum = torch.zeros(k, dtype=torch.float64, device=x.device)
        be.gram_update(v, g, col_sum=csum, col_shift=shift, num_threads=num_threads)
        g[:k, :k].sub_(torch.outer(csum, csum), alpha=1.0 / n)
    return GramResult(g[:k, :k], n, d, transposed, be.NAME)


def fast_gram(x: torch.Tensor, *, center: bool, basis: Optional[torch.Tensor] = None) -> GramResult:
    """Float32-accumulated Gram (sgemm on row chunks, chunks summed in float64).

    With ``basis`` (K×m float64, orthonormal columns) the Gram of ``x @ basis`` is returned instead:
    the rotation pass of the refinement, whose near-diagonal result is far less sensitive to float32
    rounding than ``xᵀx`` itself.
    """
    n, d = x.shape
    transposed = n < d
    v = x.T if transposed else x
    rows, k = v.shape
    shift = None
    if center:
        shift = (_column_means(x) if transposed else x[: min(n, SHIFT_ROWS)].to(torch.float64).mean(0))
    m = k if basis is None else basis.shape[1]
    g = torch.zeros(m, m, dtype=torch.float64, device=x.device)
    csum = torch.zeros(m, dtype=torch.float64, device=x.device)
    b32 = None if basis is None else basis.to(torch.float32)
    step = max(1, (1 << 24) // max(k, 1))
    for r0 in range(0, rows, step):
        c = v[r0 : r0 + step]
        if c.dtype != torch.float64:
            c = c.to(torch.float32)
        if shift is not None:
            c = c - (shift[r0 : r0 + step, None] if transposed else shift[None, :]).to(c.dtype)
        # Scale each chunk by a power of two (exact) so float32 squares neither underflow nor overflow.
        amax = float(c.abs().max()) if c.numel() else 0.0
        scale = 2.0 ** -math.floor(math.log2(amax)) if amax > 0 and math.isfinite(amax) else 1.0
        c = (c * scale).to(torch.float32)
        if b32 is not None:
            c = c @ b32
        g += (c.T @ c).to(torch.float64) / scale / scale
        if center and not transposed:
            csum += c.sum(0, dtype=torch.float64) / scale
    if center and not transposed:
        g -= torch.outer(csum, csum) / n
    return GramResult(g, n, d, transposed, "torch-fp32")


def eigvals_desc(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric float64 matrix (upper triangle read), descending, negatives clamped to 0."""
    if g.dtype != torch.float64:
        g = g.to(torch.float64)
    try:
        lam = torch.linalg.eigvalsh(g, UPLO="U")
    except RuntimeError:
        if g.device.type == "cpu":
            raise
        warnings.warn("GPU eigensolver failed; retrying on the CPU in float64", RuntimeWarning, stacklevel=2)
        lam = torch.linalg.eigvalsh(g.cpu(), UPLO="U").to(g.device)
    return lam.flip(-1).clamp_min(0.0)
