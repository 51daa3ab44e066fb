"""Metrics that need more structure than one embedding matrix: LiDAR (views of samples), computed in
float64 on d×d matrices. EigenScore and the other per-prompt LLM metrics live in :mod:`rankme_fast.llm`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._inputs import as_tensor
from ._threads import dense_step
from .gram import eigvals_desc


def lidar(x: Any, groups: Any, *, delta: float = 1e-4, eps: float = 1e-8) -> float:
    """LiDAR (Thilak et al. 2023): the effective rank of the linear-discriminant matrix of views.

    Rows of ``x`` (M×d) are embeddings of views; ``groups`` (M,) says which sample each view belongs
    to (n distinct ids, q_s ≥ 1 views each). With class means μ_s and grand mean μ = mean_s μ_s::

        Σ_b = 1/(n-1) · Σ_s (μ_s - μ)(μ_s - μ)ᵀ
        Σ_w = 1/(M-n) · Σ_s Σ_{i∈s} (z_i - μ_s)(z_i - μ_s)ᵀ + δI
        M_L = Σ_w^{-1/2} Σ_b Σ_w^{-1/2},  p = (λ + ε) / Σ(λ + ε),  LiDAR = exp(-Σ p log p)

    (M-n = n(q-1) for q views each, the paper's normalisation). Needs n ≥ 2 samples and at least one
    sample with ≥ 2 views.
    """
    z = as_tensor(x, name="x", check_finite=True)
    g = _as_groups(groups, z.shape[0])
    if not (delta >= 0 and eps >= 0):
        raise ValueError(f"delta and eps must be >= 0, got delta={delta}, eps={eps}")
    uniq, inv, counts = torch.unique(g.to(z.device), return_inverse=True, return_counts=True)
    n = uniq.numel()
    m, d = z.shape
    if n < 2:
        raise ValueError(f"lidar needs at least 2 distinct groups, got {n}")
    if m == n:
        raise ValueError("lidar needs at least one group with 2 or more views (within-class scatter is empty)")
    z64 = z.to(torch.float64)
    means = torch.zeros(n, d, dtype=torch.float64, device=z.device).index_add_(0, inv, z64) / counts[:, None].to(torch.float64)
    dev = z64 - means[inv]
    sw = dev.T @ dev / (m - n) + delta * torch.eye(d, dtype=torch.float64, device=z.device)
    mc = means - means.mean(0)
    sb = mc.T @ mc / (n - 1)
    with dense_step(sw):
        w, v = torch.linalg.eigh(sw)
    if bool((w <= 0).any()):
        raise ValueError("lidar: within-class scatter is singular; use delta > 0")
    wi = (v * w.rsqrt()) @ v.T
    lam = eigvals_desc(wi @ sb @ wi)
    p = (lam + eps) / (lam + eps).sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _as_groups(groups: Any, m: int) -> torch.Tensor:
    if isinstance(groups, torch.Tensor):
        g = groups
    else:
        arr = np.asarray(groups)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"groups: need integer group ids, got dtype {arr.dtype}")
        g = torch.from_numpy(arr.astype(np.int64))
    if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
        raise TypeError(f"groups: need integer group ids, got dtype {g.dtype}")
    if g.ndim != 1 or g.shape[0] != m:
        raise ValueError(f"groups: need one id per row of x, i.e. shape ({m},), got {tuple(g.shape)}")
    return g.to(torch.int64).cpu()
