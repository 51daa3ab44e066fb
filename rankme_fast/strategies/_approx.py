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
        import dataclasses  # noqa: PLC0415

        from ..approx import approx_spectrum  # noqa: PLC0415 - it checks finiteness in its trace pass
        from ..gram import scaled_copy  # noqa: PLC0415

        # float64 beyond 2^±400: λ = σ² would under- or overflow, so the method runs on the exact copy t·2^k
        # and the spectrum says so (its values describe t·2^k; every metric is scale-invariant)
        x, k = scaled_copy(t)
        s = approx_spectrum(x, method=method, center=center, rtol=rtol, **options)
        if k:
            s = dataclasses.replace(s, log2_scale=k, notes=s.notes + (
                f"float64 input with max |x| beyond 2^±400: computed on x·2^{k} (exact); singular_values, "
                f"frobenius2, residuals and quadrature nodes describe x·2^{k} (σ of x = σ·2^{-k})",))
        return s
    return run


def krylov_cost(n, d, itemsize, block: int, steps: int, basis_cols: int):
    """(flops, bytes, extra bytes, passes) of ``steps`` operator passes with a ``block``-column W plus the
    trace pass, and full reorthogonalisation against up to ``basis_cols`` stored columns."""
    k, _ = dims(n, d)
    f1, b1 = operator_pass(n, d, itemsize, block)
    ft, bt = trace_pass(n, d, itemsize)
    reorth = 4.0 * k * basis_cols * block * steps
    return f1 * steps + ft + reorth, b1 * steps + bt, 16.0 * k * basis_cols, steps + 1
