"""``gram``: the float64-exact streaming Gram (native SYRK / Triton / CUDA / torch by backend) + eigvalsh."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..gram import abs_max, eigvals_desc, exact_gram, ldexp
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
        wide = _read_if_wide(t)
        if wide is None:
            from ..scoring import accumulate  # noqa: PLC0415 - the file readers load only for paths
            acc, _ = accumulate(t, backend=backend, progress=False)
            return acc.spectrum(center)
        t = wide  # N < d: the N×N Gram of the rows in memory, not a d×d one streamed
    if t.ndim == 3:
        return per_item(run, t, center=center, backend=backend)
    res = exact_gram(t, center=center, backend=backend, scaled=True)
    if not bool(torch.isfinite(res.gram).all()):
        raise_if_nonfinite(t)
    sv = eigvals_desc(res.gram).sqrt()
    if not bool(torch.isfinite(sv).all()):
        raise_if_nonfinite(t)
    if res.log2_scale:  # the Gram is that of t·2^k (tiny or huge input): σ back to t's scale, exactly
        sv = ldexp(sv, -res.log2_scale)
        if not bool(torch.isfinite(sv).all()):
            raise ValueError(f"x: its largest singular value exceeds float64's range (max |x| = "
                             f"{abs_max(t):.3g}); rescale the "
                             "embeddings (RankMe and the other ratios are scale invariant)")
    return Spectrum(sv, t.shape[0], t.shape[1], center, "gram", res.backend, "exact", True, EXACT_RANKME_RTOL)


def _read_if_wide(source) -> Optional[torch.Tensor]:
    """All rows of ``source`` as one tensor when it has fewer rows than features (N < d) and they take
    under a quarter of free memory — the d×d Gram of a stream would need d²·8 bytes, far more than the N×d
    rows themselves (50×100000 float32: 20 MB vs 80 GB) — else None (stream it)."""
    from .._inputs import check_all_finite  # noqa: PLC0415
    from ..io import default_chunk_rows, iter_chunks, open_source  # noqa: PLC0415
    from . import free_memory  # noqa: PLC0415

    readers = open_source(source)
    try:
        n, d, dtype = sum(r.n_rows for r in readers), readers[0].n_features, readers[0].dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        if n == 0 or n >= d or n * d * itemsize > free_memory("cpu") // 4:
            return None
        # torch.cat copies: the chunks may be views of file mappings, closed below
        x = torch.cat([c for _, _, c in iter_chunks(readers, default_chunk_rows(d, dtype))])
    finally:
        for r in readers:
            r.close()
    check_all_finite(x, name=os.fspath(source) if isinstance(source, (str, os.PathLike)) else "x")
    return x


STRATEGY = Strategy("gram", True, "float64-exact streaming Gram + float64 eigvalsh", cost, run, batched=True,
                    path=True)
