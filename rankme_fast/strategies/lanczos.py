"""``lanczos``: block Lanczos top-k to ``tol``·θ₁ residuals + exact Σσ²."""
from __future__ import annotations

from . import Cost, Strategy
from ._approx import krylov_cost, run_approx
from ._common import dims


def cost(n, d, itemsize, device, options) -> Cost:
    """Worst case: every block step up to the iteration cap runs."""
    k, _ = dims(n, d)
    kk = min(k, options.get("k") or 32)
    b = min(k, max(kk, 8))
    iters = max(4, min(60, -(-k // b)))
    f, by, extra, passes = krylov_cost(n, d, itemsize, b, iters, b * iters)
    return Cost(f, by, extra, passes)


STRATEGY = Strategy("lanczos", False, "block Lanczos top-k to a residual tolerance + exact trace", cost,
                    run_approx("lanczos"), options=("k", "tol", "seed"))
