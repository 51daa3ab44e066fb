"""Pure-PyTorch Gram update: the oracle for the native kernels and the fallback everywhere.

``G[:C, :C] += Vᵀ V`` with ``V = float64(x) - row_shift[:, None] - col_shift[None, :]``, accumulated
in row chunks so only one chunk is ever held in float64.
"""
from __future__ import annotations

from typing import Optional

import torch

NAME = "torch"
CHUNK_ELEMS = 1 << 22  # 32 MiB of float64 per chunk


def available(device: torch.device):
    return True, ""


def padded(n: int) -> int:
    return n


def gram_update(
    x: torch.Tensor,
    gram: torch.Tensor,
    *,
    col_sum: Optional[torch.Tensor] = None,
    row_shift: Optional[torch.Tensor] = None,
    col_shift: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,  # noqa: ARG001 - uniform signature
    precision: str = "exact",
) -> None:
    if precision != "exact":
        raise ValueError(f"the torch backend computes the exact float64 Gram only (precision={precision!r})")
    rows, cols = x.shape
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    g = gram[:cols, :cols]
    for r0 in range(0, rows, step):
        v = x[r0 : r0 + step].to(torch.float64)
        if row_shift is not None:
            v = v - row_shift[r0 : r0 + step, None]
        if col_shift is not None:
            v = v - col_shift[None, :]
        g.addmm_(v.T, v)
        if col_sum is not None:
            col_sum += v.sum(0)


def normal_apply(x: torch.Tensor, w: torch.Tensor, *, col_shift: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
    """Twin of the fused normal operator: ``Vᵀ (V W)`` in float64, V = X − 1 col_shiftᵀ, in row chunks."""
    rows, cols = x.shape
    w64 = w.to(torch.float64)
    out = torch.zeros(cols, w.shape[1], dtype=torch.float64, device=x.device)
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        v = x[r0 : r0 + step].to(torch.float64)
        if col_shift is not None:
            v = v - col_shift[None, :]
        out.addmm_(v.T, v @ w64)
    return out
