"""Exact power-of-two scaling of float64 data whose squares would leave float64's range (issue 14, item 8).

Shared by :mod:`rankme_fast.gram` (in-memory Gram, GramAccumulator) and :mod:`rankme_fast.distributed` (one
common exponent across ranks); it imports only torch, so neither imports the other for it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# Squares of |x| outside [2**-400, 2**400] (summed over up to 2**60 rows) come near float64's subnormal or
# overflow range: such data is multiplied by a power of two first (exact), and σ divided by it afterwards.
SCALE_EXP_LIMIT = 400


def _magnitude_exp(amax: float) -> Optional[int]:
    """e with amax = m·2^e, m ∈ [0.5, 1); None when amax is 0 or not finite (no magnitude to scale)."""
    return math.frexp(amax)[1] if amax > 0 and math.isfinite(amax) else None


def _scale_for_exp(e: Optional[int]) -> int:
    """k such that data of magnitude 2^e is safe to square once multiplied by 2^k: 0 in the common range,
    else -e (magnitude brought to [0.5, 1)). Non-increasing in e, so a larger magnitude never asks to
    scale stored values up (which could overflow)."""
    return 0 if e is None or -SCALE_EXP_LIMIT <= e <= SCALE_EXP_LIMIT else -e


def scale_exponent(amax: float) -> int:
    """The power-of-two exponent k to multiply data of max |x| = ``amax`` by before squaring (0 usually)."""
    return _scale_for_exp(_magnitude_exp(amax))


def ldexp(t: torch.Tensor, k: int, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """t·2^k in float64 (written into ``out`` when given; ``out`` may be ``t``), in steps of at most 2^±512
    so that no factor overflows: exact unless the result itself under- or overflows float64. Without
    ``out`` and with k = 0 a float64 ``t`` is returned as is (no copy)."""
    res = t.to(torch.float64)
    while k:
        step = max(-512, min(512, k))
        res = res * (2.0 ** step) if out is None else torch.mul(res, 2.0 ** step, out=out)
        k -= step
    if out is not None and res is not out:
        out.copy_(res)
        res = out
    return res
