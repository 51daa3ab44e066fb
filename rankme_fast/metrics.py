"""Spectral metrics as pure functions of singular values (DESIGN §2).

All functions take ``sv``: a float64 tensor of singular values σ_1 ≥ … ≥ σ_K ≥ 0 along the last
dimension (any leading batch dimensions) and return a tensor of the leading shape. Covariance
eigenvalues are λ_k = σ_k² / (N-1); every metric below that uses λ is invariant to that scale, so
it works on σ² directly. Whether Z was centred is the caller's business (see ``Spectrum``).
"""
from __future__ import annotations


import os
import sys
import warnings
from typing import Optional

import torch

RANKME_EPS = 1e-7
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def check_eps(eps) -> float:
    """ε as a float in [0, 1) — the one rule of the Python API and the CLI (``--eps``): p_k = σ_k/‖σ‖₁ + ε
    is meant as a tiny floor under a probability, and ε ≥ 1 would swamp every p_k."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        try:
            import numpy as np
            ok = isinstance(eps, (np.integer, np.floating))
        except ImportError:  # pragma: no cover - numpy is a dependency
            ok = False
        if not ok:
            raise TypeError(f"eps must be a real number in [0, 1), got {type(eps).__name__} {eps!r}")
    e = float(eps)
    if not (0.0 <= e < 1.0):  # NaN fails too
        raise ValueError(f"eps must be in [0, 1), got {eps!r}")
    return e


class ZeroSpectrumError(ValueError):
    """A metric asked of a spectrum whose singular values are all 0 (the matrix is zero). ``what`` names
    the metric, so a caller that knows the provenance (N, centring) can say why: see
    :func:`zero_spectrum_message`."""

    def __init__(self, message: str, what: str = "", where: str = ""):
        super().__init__(message)
        self.what, self.where = what, where  # the metric; "" or " at batch item i (of B)"


def zero_spectrum_cause(n_rows: int, centered: bool) -> str:
    """Why the matrix behind an all-zero spectrum is zero, from its provenance (N rows, centred or not)."""
    if centered and n_rows == 1:
        return ("centring a single row leaves nothing (the row is its own column mean, so the centred "
                "matrix is zero); use center=False (--no-center) or more rows")
    if centered:
        return (f"all {n_rows} rows are equal, so the centred matrix is zero; use center=False (--no-center) "
                "if that is expected")
    return "the input is all zeros"


def zero_spectrum_message(what: str, n_rows: int, centered: bool, where: str = "") -> str:
    """The message of a :class:`ZeroSpectrumError` for a spectrum of known provenance."""
    return (f"{what} is undefined for an all-zero spectrum (every singular value is 0){where}: "
            f"{zero_spectrum_cause(n_rows, centered)}")


def _check_nonzero(sv: torch.Tensor, what: str) -> torch.Tensor:
    total = sv.sum(-1)
    zero = total <= 0
    if bool(zero.any()):
        where = ""
        if zero.ndim:  # batched: say which item
            idx = zero.nonzero()[0].tolist()
            where = (f" at batch item {idx[0]} (of {zero.shape[0]})" if zero.ndim == 1
                     else f" at batch index {tuple(idx)} (batch shape {tuple(zero.shape)})")
        msg = f"{what} is undefined for an all-zero spectrum (every singular value is 0){where}"
        if sv.shape[-1] == 1:  # K = min(N, d) = 1: most often one row that was centred away
            msg += ("; with K = 1 the usual cause is centring a single row, which leaves nothing (the centred "
                    "matrix of one row is zero): use center=False (--no-center) or more rows")
        raise ZeroSpectrumError(msg, what, where)
    return total


def _caller_stacklevel() -> int:
    """The stacklevel that points a warning at the first frame outside this package (the user's call),
    however many rankme_fast layers (api → Spectrum → metrics) lie in between."""
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        f, level = f.f_back, level + 1
    return level


def rankme(sv: torch.Tensor, eps: float = RANKME_EPS) -> torch.Tensor:
    """RankMe = exp(-Σ_k p_k log p_k),  p_k = σ_k / ‖σ‖₁ + ε  (Garrido et al. 2023).

    p is *not* renormalised after adding ε, exactly as in the paper's definition; ε = 0 gives the
    effective rank of Roy & Vetterli with 0·log 0 = 0.
    """
    eps = check_eps(eps)
    total = _check_nonzero(sv, "RankMe")
    p = sv / total.unsqueeze(-1) + eps
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return torch.exp(-plogp.sum(-1))


# RankMe as computed by other implementations, so that migrating users get their old number:
# name -> (default centring of raw data, ε, description)
RANKME_CONVENTIONS = {
    "paper": (False, RANKME_EPS, "p = σ/‖σ‖₁ + 1e-7 of the uncentred Z (Garrido et al. 2023)"),
    "stable-pretraining": (False, 1e-5, "p = σ/‖σ‖₁ + 1e-5 (stable-pretraining's RankMe callback)"),
    "stable-pretraining-jax": (False, 1e-7, "p = σ/(‖σ‖₁ + 1e-7) + 1e-7 (its JAX variant)"),
    "reptrix": (True, 1e-7, "centred; p = σ²/Σσ² + 1e-7, the explained-variance ratio (reptrix)"),
}


def rankme_convention(sv: torch.Tensor, convention: str = "paper", eps: Optional[float] = None) -> torch.Tensor:
    """RankMe of σ in a peer's ``convention`` (:data:`RANKME_CONVENTIONS`); ``eps`` overrides its ε
    (only "paper" and "stable-pretraining" differ by ε alone). exp(−Σ p log p), p not renormalised."""
    if convention not in RANKME_CONVENTIONS:
        raise ValueError(f"convention must be one of {list(RANKME_CONVENTIONS)}, got {convention!r}")
    e = RANKME_CONVENTIONS[convention][1] if eps is None else eps
    if convention in ("paper", "stable-pretraining"):
        return rankme(sv, e)
    e = check_eps(e)
    total = _check_nonzero(sv, "RankMe")
    if convention == "stable-pretraining-jax":
        p = sv / (total.unsqueeze(-1) + e) + e
    else:  # reptrix: the explained-variance ratio of the eigenvalues
        lam = sv * sv
        p = lam / lam.sum(-1, keepdim=True) + e
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return torch.exp(-plogp.sum(-1))


def effective_rank(sv: torch.Tensor) -> torch.Tensor:
    """Effective rank = exp(H(σ/‖σ‖₁)) with 0·log 0 = 0 (Roy & Vetterli 2007) = RankMe with ε = 0."""
    return rankme(sv, eps=0.0)


def collapse_auc(sv: torch.Tensor) -> torch.Tensor:
    """AUC of the normalised cumulative singular values (Li, Efros & Pathak 2022, Eq. 2).

    (1/K) Σ_{k=1..K} Σ_{j≤k} σ_j / Σ_j σ_j  ∈ [(K+1)/(2K), 1]; higher = more collapsed.
    """
    total = _check_nonzero(sv, "collapse AUC")
    return (torch.cumsum(sv, -1) / total.unsqueeze(-1)).mean(-1)


def stable_rank(sv: torch.Tensor) -> torch.Tensor:
    """Stable rank = Σ σ_k² / σ_1²."""
    _check_nonzero(sv, "stable rank")
    r = sv / sv.amax(-1, keepdim=True)  # σ/σ_1 first: σ² under- or overflows for σ beyond 1e±154
    return (r * r).sum(-1)


def participation_ratio(sv: torch.Tensor) -> torch.Tensor:
    """Participation ratio = (Σ λ)² / Σ λ², λ_k ∝ σ_k²."""
    _check_nonzero(sv, "participation ratio")
    r = sv / sv.amax(-1, keepdim=True)  # σ/σ_1 before squaring: σ² (and σ⁴) under/overflow far before σ does
    lam = r * r
    return lam.sum(-1) ** 2 / (lam * lam).sum(-1)


def nesum(sv: torch.Tensor) -> torch.Tensor:
    """NEsum = Σ λ_i / λ_1 (normalised eigenvalue sum)."""
    _check_nonzero(sv, "NEsum")
    r = sv / sv.amax(-1, keepdim=True)  # λ/λ_1 = (σ/σ_1)²: no σ² to under- or overflow
    return (r * r).sum(-1)


def alpha_req(sv: torch.Tensor, index_range: tuple = (5, 100)) -> torch.Tensor:
    """α-ReQ (Agrawal et al. 2022): slope α of the least-squares fit log λ_i ≈ c - α log i.

    ``index_range`` = (first, last), 1-based and inclusive. A ``last`` beyond K is narrowed to K with a
    ``UserWarning`` (the default (5, 100) is narrowed whenever K < 100). Needs at least two indices and
    λ_i > 0 on all of them (a zero eigenvalue has no logarithm: raises).
    """
    lo, hi = int(index_range[0]), int(index_range[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"index_range must be (first, last) with 1 <= first <= last, got {index_range}")
    k = sv.shape[-1]
    if hi > k:
        if k - lo + 1 < 2:
            raise ValueError(f"alpha_req needs at least 2 eigenvalues in the index range {index_range}, but K = {k}")
        # a message for Python and CLI users alike: the CLI has no flag for the range, so no call to copy
        warnings.warn(f"alpha_req: index_range {tuple(index_range)} narrowed to ({lo}, {k}): the spectrum has only "
                      f"K = min(N, d) = {k} eigenvalues (a range ending at or before K is fitted as given)",
                      UserWarning, stacklevel=_caller_stacklevel())
        hi = k
    if hi - lo + 1 < 2:
        raise ValueError(f"alpha_req needs at least 2 eigenvalues in the index range {index_range}, but K = {k}")
    sig = sv[..., lo - 1 : hi]
    if bool((sig <= 0).any()):
        raise ValueError(
            f"alpha_req: an eigenvalue in the fit range i={lo}..{hi} is zero (rank-deficient spectrum); "
            "choose an index_range inside the numerical rank"
        )
    x = -torch.log(torch.arange(lo, hi + 1, dtype=torch.float64, device=sv.device))
    y = 2.0 * torch.log(sig)  # log λ without forming σ² (which under/overflows beyond 1e±154)
    xc = x - x.mean()
    return (y * xc).sum(-1) / (xc * xc).sum()
