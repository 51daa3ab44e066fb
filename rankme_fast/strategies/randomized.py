"""``randomized``: Halko–Martinsson–Tropp top-k (``k``, ``oversample``, ``power_iters``) + exact Σσ²."""
from __future__ import annotations

from . import Cost, Strategy
from ._approx import krylov_cost, run_approx
from ._common import dims


def cost(n, d, itemsize, device, options) -> Cost:
    k, _ = dims(n, d)
    kk = min(k, options.get("k") or 32)
    b = min(k, kk + options.get("oversample", 10))
    steps = options.get("power_iters", 2) + 1
    f, by, extra, passes = krylov_cost(n, d, itemsize, b, steps, b)
    return Cost(f, by, extra, passes)


STRATEGY = Strategy("randomized", False, "randomized top-k (power iterations) + exact trace", cost,
                    run_approx("randomized"), options=("k", "oversample", "power_iters", "seed", "tol"))
