"""Helpers shared by the strategy modules."""
from __future__ import annotations

import torch

from .._inputs import check_all_finite


def raise_if_nonfinite(x: torch.Tensor) -> None:
    """Called when the decomposition produced non-finite numbers: blame the input or overflow."""
    check_all_finite(x)  # raises naming count and row if the input itself has NaN/Inf
    amax = float(torch.linalg.vector_norm(x, float("inf")))
    raise ValueError(
        f"x: squares of the input overflow float64 (max |x| = {amax:.3g}); rescale the embeddings "
        "(RankMe and the other ratios are scale invariant)"
    )


def dims(n: int, d: int) -> tuple:
    """(K, M) = (min(N, d), max(N, d)): the Gram and operator side, and the other one."""
    return min(n, d), max(n, d)


def operator_pass(n: int, d: int, itemsize: int, block: int) -> tuple:
    """(flops, bytes) of one fused normal-operator pass Vᵀ(V W) with a ``block``-column W."""
    return 4.0 * n * d * block, float(n) * d * itemsize
