"""``slq``: stochastic Lanczos quadrature (deflation phase, then probes on the deflated operator)."""
from __future__ import annotations

from . import Cost, Strategy
from ._approx import krylov_cost, run_approx
from ._common import dims


def settings(n, d, options) -> tuple:
    """(probes, deflation steps, quadrature steps) that ``approx_spectrum`` will use."""
    from ..approx import default_probes, default_steps  # noqa: PLC0415
    k, _ = dims(n, d)
    rows = max(n, d)  # the operator's long side (it runs on Xᵀ when N < d)
    m1, m2 = default_steps(rows, k)
    return (options.get("probes") or default_probes(k, rows), options.get("deflate_steps") or m1,
            options.get("steps") or m2)


def cost(n, d, itemsize, device, options) -> Cost:
    p, m1, m2 = settings(n, d, options)
    f1, b1, e1, n1 = krylov_cost(n, d, itemsize, p, m1, p * m1)  # deflation: block Lanczos, kept basis
    f2, b2, e2, n2 = krylov_cost(n, d, itemsize, p, m2, 3 * p)  # quadrature: three-term, no images kept
    return Cost(f1 + f2, b1 + b2, max(e1, e2), n1 + n2 - 1)


STRATEGY = Strategy("slq", False, "stochastic Lanczos quadrature with an interval", cost, run_approx("slq"),
                    options=("probes", "steps", "deflate_steps", "deflate", "deflate_tol", "seed"))
