"""Helpers shared by the strategy modules."""
from __future__ import annotations

import torch

from .._inputs import check_all_finite
from ..gram import abs_max


def raise_if_nonfinite(x: torch.Tensor) -> None:
    """Called when the decomposition produced non-finite numbers: blame the input or overflow."""
    check_all_finite(x)  # raises naming count and row if the input itself has NaN/Inf
    amax = abs_max(x)
    raise ValueError(
        f"x: squares of the input overflow float64 (max |x| = {amax:.3g}); rescale the embeddings "
        "(RankMe and the other ratios are scale invariant)"
    )


def per_item(run, t: torch.Tensor, **kw):
    """A (B, N, d) batch through a 2-D strategy item by item: one Spectrum with stacked σ (after one
    finiteness check that names the batch item and row)."""
    from ..spectrum import Spectrum  # noqa: PLC0415
    check_all_finite(t)
    parts = [run(t[i], **kw) for i in range(t.shape[0])]
    first = parts[0]
    return Spectrum(torch.stack([s.singular_values for s in parts]), t.shape[-2], t.shape[-1], first.centered,
                    first.method, first.backend, first.precision, first.exact, max(s.rankme_rtol for s in parts),
                    tuple(note for s in parts for note in s.notes))


def dims(n: int, d: int) -> tuple:
    """(K, M) = (min(N, d), max(N, d)): the Gram and operator side, and the other one."""
    return min(n, d), max(n, d)


def operator_pass(n: int, d: int, itemsize: int, block: int) -> tuple:
    """(flops, bytes) of one fused normal-operator pass Vᵀ(V W) with a ``block``-column W."""
    return 4.0 * n * d * block, float(n) * d * itemsize
