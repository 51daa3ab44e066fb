"""``svd``: torch.linalg.svdvals of a float64 copy of the input (batched for (B, N, d)); the reference."""
from __future__ import annotations

import torch

from .._inputs import check_all_finite
from .._threads import dense_step
from ..spectrum import EXACT_RANKME_RTOL, FAST_RANKME_RTOL, Spectrum
from . import Cost, Strategy
from ._common import dims, raise_if_nonfinite


def _svd(x: torch.Tensor, center: bool) -> torch.Tensor:
    z = x.to(torch.float64)
    if center:
        z = z - z.mean(-2, keepdim=True)
    with dense_step(z):  # thread count by size and by the cores idle now (_threads.py)
        return torch.linalg.svdvals(z)


def _batched(x: torch.Tensor, center: bool) -> torch.Tensor:
    b, n, d = x.shape
    step = max(1, (1 << 23) // max(n * d, 1))  # ≤ 64 MiB of float64 at a time
    return torch.cat([_svd(x[i : i + step], center) for i in range(0, b, step)])


def cost(n, d, itemsize, device, options) -> Cost:
    k, m = dims(n, d)
    # Golub–Kahan bidiagonalisation ~4·M·K² − 4K³/3, then the bidiagonal values
    return Cost(4.0 * m * k * k, float(n) * d * itemsize, 8.0 * n * d + 8.0 * k * k)


def run(t, *, center, backend=None, rtol=None, precision="exact", **_):  # noqa: ARG001
    """``precision="fast"`` still computes the float64 SVD but labels the spectrum with the fast contract
    the caller asked for (as it always has)."""
    check_all_finite(t)
    sv = _batched(t, center) if t.ndim == 3 else _svd(t, center)
    if not bool(torch.isfinite(sv).all()):
        raise_if_nonfinite(t)
    exact = precision == "exact"
    return Spectrum(sv, t.shape[-2], t.shape[-1], center, "svd", "torch", precision, exact,
                    EXACT_RANKME_RTOL if exact else FAST_RANKME_RTOL)


STRATEGY = Strategy("svd", True, "torch.linalg.svdvals of a float64 copy", cost, run, batched=True)
