"""Shared run/cost plumbing of the three approximate strategies (randomized, lanczos, slq)."""
from __future__ import annotations

from ._common import dims, operator_pass


def trace_pass(n, d, itemsize) -> tuple:
    return 2.0 * n * d, float(n) * d * itemsize


def run_approx(method: str):
    def run(t, *, center, backend=None, rtol=None, precision="exact", **options):  # noqa: ARG001
        if t.ndim != 2:
            raise ValueError(f"method={method!r} needs one in-memory (N, d) matrix "
                             "(not a path or a (B, N, d) batch)")
        from ..approx import approx_spectrum  # noqa: PLC0415 - it checks finiteness in its trace pass
        return approx_spectrum(t, method=method, center=center, rtol=rtol, **options)
    return run


def krylov_cost(n, d, itemsize, block: int, steps: int, basis_cols: int):
    """(flops, bytes, extra bytes, passes) of ``steps`` operator passes with a ``block``-column W plus the
    trace pass, and full reorthogonalisation against up to ``basis_cols`` stored columns."""
    k, _ = dims(n, d)
    f1, b1 = operator_pass(n, d, itemsize, block)
    ft, bt = trace_pass(n, d, itemsize)
    reorth = 4.0 * k * basis_cols * block * steps
    return f1 * steps + ft + reorth, b1 * steps + bt, 16.0 * k * basis_cols, steps + 1
