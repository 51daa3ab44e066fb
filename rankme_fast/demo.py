"""Synthetic embeddings with a known spectrum (used by ``rankme-fast demo`` and the benchmarks).

``Z = Q diag(σ) Wᵀ`` with Q (N×d) and W (d×d) orthonormal, so the singular values of Z are exactly σ
(up to the final rounding to the requested dtype).
"""
from __future__ import annotations

import math

import torch

SPECTRA = ("flat", "rank1", "rank8", "power1", "power2", "exp", "rank8_noise")


def singular_values(kind: str, d: int) -> torch.Tensor:
    """σ (descending, float64, length d) of a named test spectrum, σ_1 = 1."""
    k = torch.arange(1, d + 1, dtype=torch.float64)
    if kind == "flat":
        return torch.ones(d, dtype=torch.float64)
    if kind == "rank1":
        return (k == 1).to(torch.float64)
    if kind == "rank8":
        return (k <= 8).to(torch.float64)
    if kind == "power1":
        return 1.0 / k
    if kind == "power2":
        return 1.0 / k**2
    if kind == "exp":
        return torch.exp(-(k - 1) * (10.0 / max(d, 1)))  # σ_d ≈ e^-10 ≈ 4.5e-5
    if kind == "rank8_noise":
        return torch.where(k <= 8, torch.ones_like(k), torch.full_like(k, 1e-6))
    raise ValueError(f"unknown spectrum {kind!r}; choose one of {SPECTRA}")


def make_embeddings(n: int, d: int, kind: str = "power1", *, dtype=torch.float32, seed: int = 0,
                    scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """(N, d) matrix whose singular values are ``scale * singular_values(kind, min(N, d))``; an
    ``offset`` is added to every entry afterwards (a mean far from 0, for centred metrics)."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, d)
    q = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q
    z = (q * (scale * singular_values(kind, k))) @ w.T
    if offset:
        z = z + offset
    return z.to(dtype)


def default_demo_matrix(n: int = 200_000, d: int = 256, seed: int = 0):
    """Large demo matrix built cheaply: Gaussian rows times a fixed mixing matrix with power-law scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    scales = singular_values("power1", d) * math.sqrt(n)
    z = torch.randn(n, d, generator=g, dtype=torch.float32) @ (w * scales).T.to(torch.float32)
    return z
