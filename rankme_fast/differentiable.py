"""Differentiable spectra: σ(Z) as a torch autograd graph, so RankMe and the other metrics can be losses.

    V = float64(Z)  (centred: V − 1μᵀ),   G = VᵀV (d×d), or VVᵀ (N×N when N < d),
    λ = eigvalsh(G),   σ_k = √λ_k  if λ_k > floor,  else 0 (value and gradient),
    floor = min(8·K·ε₆₄, 1e-12)·λ_1   (method="gram"; K = min(N, d)).

Why this is well defined at repeated singular values: the backward of ``torch.linalg.eigvalsh`` is
Ḡ = U diag(λ̄) Uᵀ — eigenvalue derivatives only, none of the 1/(λ_i − λ_j) terms of the eigenvector
derivative that blow up at repeated eigenvalues. RankMe, the effective rank and the participation ratio
are smooth symmetric functions of σ, so λ̄ is equal across a degenerate eigenspace S and
U_S diag(c) U_Sᵀ = c·U_S U_Sᵀ does not depend on the basis the solver picked: the gradient is the
unique one, dR/dZ = Σ_k (∂R/∂σ_k) u_k v_kᵀ. Metrics that weight σ by rank order or divide by σ_1
(collapse AUC, α-ReQ, stable rank, NEsum) have kinks where the ordered values they weight differently
tie (like max(a, b) at a = b); there the gradient is a one-sided one (finite, an element of the
generalised gradient) for the order the solver returned.

Why σ = 0 gets gradient 0: σ_k(Z) is not differentiable where σ_k = 0 (like |x| at 0; every direction
out of the null space increases it), and 0 is the subgradient chosen — the minimal-norm one. A float64
Gram resolves eigenvalues only down to its rounding floor (measured: |λ_noise| ≤ ~16·ε₆₄·λ_1 up to
K = 2048; bounded here by 8·K·ε₆₄·λ_1, capped at 1e-12·λ_1 = (1e-6·σ_1)², the σ tolerance of the exact
contract, DESIGN §3). Below it a computed λ is rounding noise with a meaningless eigenvector; its
√-derivative 1/(2σ) would turn that noise into gradients of arbitrary direction, so such σ are exactly 0
in the value *and* the gradient. Well-conditioned inputs have no σ below the floor, and their values equal
the non-differentiable exact path's (to float64 rounding); on collapsed inputs the value moves at most
by σ's the exact contract does not resolve anyway. σ a little above the floor are known only as well as
the Gram resolves them (λ to ~ε₆₄·λ_1 absolute), and so are their gradients.

``method="svd"`` differentiates ``torch.linalg.svdvals`` of V instead (backward U diag(σ̄) Vᵀ, again
eigenvalue-only): more accurate for strongly collapsed Z (σ resolved to ~K·ε₆₄·σ_1, the floor used
there is σ_k ≤ 8·K·ε₆₄·σ_1), at the cost of an N×K U and an SVD instead of a Gram.

Gradients reach the input in its own dtype (the upcast ``.to(float64)`` casts them back), on its own
device; every op is a torch op, so CUDA input runs on the GPU.
"""
from __future__ import annotations

import torch

from ._inputs import check_all_finite
from .gram import eigvals_desc
from .spectrum import EXACT_RANKME_RTOL, Spectrum

F64 = torch.float64
EPS64 = 2.0**-52
# Gram route: eigenvalues at or below min(GRAM_FLOOR_ULPS·K·ε₆₄, GRAM_FLOOR_CAP)·λ_1 count as 0
GRAM_FLOOR_ULPS = 8
GRAM_FLOOR_CAP = 1e-12
# SVD route: σ at or below SVD_FLOOR_ULPS·K·ε₆₄·σ_1 count as 0
SVD_FLOOR_ULPS = 8
METHODS = ("auto", "gram", "svd")


def gram_floor(k: int) -> float:
    """Relative eigenvalue floor (× λ_1) of a K×K float64 Gram."""
    return min(GRAM_FLOOR_ULPS * k * EPS64, GRAM_FLOOR_CAP)


def _zero_below(x: torch.Tensor, floor: torch.Tensor, fn) -> torch.Tensor:
    """fn(x) where x > floor, else 0 — with gradient 0 there too. The inner ``where`` keeps fn away from
    the discarded entries, so their gradient is 0 rather than 0·∞ = NaN (and double backward stays finite)."""
    keep = x.detach() > floor
    safe = torch.where(keep, x, torch.ones_like(x))
    return torch.where(keep, fn(safe), torch.zeros_like(x))


def _raise_nonfinite(t: torch.Tensor) -> None:
    from .strategies._common import raise_if_nonfinite  # noqa: PLC0415 - only on the error path
    raise_if_nonfinite(t.detach())


def singular_values(t: torch.Tensor, *, center: bool = False, method: str = "auto") -> torch.Tensor:
    """Descending σ of ``t`` (N, d) / (B, N, d) as a differentiable float64 tensor (..., K) (see the module
    docstring for the floor and the gradient at repeated and zero σ)."""
    if method not in METHODS:
        raise ValueError(f"differentiable=True supports method in {METHODS}, got {method!r}")
    v = t.to(F64)
    if center:
        v = v - v.mean(-2, keepdim=True)
    n, d = v.shape[-2], v.shape[-1]
    k = min(n, d)
    if method == "svd":
        sv = torch.linalg.svdvals(v)
        if not bool(torch.isfinite(sv.detach()).all()):
            _raise_nonfinite(t)
        floor = SVD_FLOOR_ULPS * k * EPS64 * sv.detach().amax(-1, keepdim=True)
        return _zero_below(sv, floor, lambda s: s)
    g = v.mT @ v if n >= d else v @ v.mT
    lam = eigvals_desc(g)  # autograd-aware: eigvalsh, flip, clamp (and the GPU solver's CPU retry)
    if not bool(torch.isfinite(lam.detach()).all()):
        _raise_nonfinite(t)
    floor = gram_floor(k) * lam.detach().amax(-1, keepdim=True)
    return _zero_below(lam, floor, torch.sqrt)


def spectrum(t: torch.Tensor, *, center: bool = False, method: str = "auto") -> Spectrum:
    """A :class:`Spectrum` whose σ carry the autograd graph of ``t`` (a validated 2-D/3-D tensor); its
    metric methods return 0-d float64 tensors (shape (B,) for a batch) instead of floats."""
    check_all_finite(t.detach())
    sv = singular_values(t, center=center, method=method)
    return Spectrum(sv, t.shape[-2], t.shape[-1], bool(center), "svd" if method == "svd" else "gram", "torch",
                    "exact", True, EXACT_RANKME_RTOL, differentiable=True)
