"""``gram``: the float64-exact streaming Gram (native SYRK / Triton / CUDA / torch by backend) + eigvalsh."""
from __future__ import annotations

import os

import torch

from ..gram import eigvals_desc, exact_gram
from ..spectrum import EXACT_RANKME_RTOL, Spectrum
from . import Cost, Strategy
from ._common import dims, per_item, raise_if_nonfinite


def cost(n, d, itemsize, device, options) -> Cost:
    k, m = dims(n, d)
    # symmetric Gram: M·K(K+1)/2 multiply-adds; symmetric eigenvalues ~4K³/3 (tridiagonalisation) + K²
    return Cost(float(m) * k * (k + 1) + 4.0 * k**3 / 3, float(n) * d * itemsize, 8.0 * k * k + (64 << 20))


def run(t, *, center, backend=None, rtol=None, **_):  # noqa: ARG001
    """``t``: a validated (N, d) / (B, N, d) tensor, or a path (file, shard directory, glob) streamed
    through the float64 accumulator with O(d²) memory."""
    if isinstance(t, (str, os.PathLike)):
        from ..scoring import accumulate  # noqa: PLC0415 - the file readers load only for paths
        acc, _ = accumulate(t, backend=backend, progress=False)
        return acc.spectrum(center)
    if t.ndim == 3:
        return per_item(run, t, center=center, backend=backend)
    res = exact_gram(t, center=center, backend=backend)
    if not bool(torch.isfinite(res.gram).all()):
        raise_if_nonfinite(t)
    sv = eigvals_desc(res.gram).sqrt()
    if not bool(torch.isfinite(sv).all()):
        raise_if_nonfinite(t)
    return Spectrum(sv, t.shape[0], t.shape[1], center, "gram", res.backend, "exact", True, EXACT_RANKME_RTOL)


STRATEGY = Strategy("gram", True, "float64-exact streaming Gram + float64 eigvalsh", cost, run, batched=True,
                    path=True)
