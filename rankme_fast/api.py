"""Public metric functions: each accepts a :class:`Spectrum` or raw embeddings.

With raw data the spectrum is computed first, centred or not according to the metric's reference
(DESIGN §2: RankMe / effective rank / stable rank uncentred; collapse AUC, α-ReQ, participation ratio,
NEsum centred). ``center=None`` means that default; passing a Spectrum together with a ``center`` that
contradicts it raises instead of silently mixing conventions. 2-D input gives a float, 3-D input
(B, N, d) a float64 tensor of shape (B,).
"""
from __future__ import annotations

from typing import Any, Optional

from . import metrics as _m
from .spectrum import Spectrum, spectrum


def _spec(x: Any, center: Optional[bool], default_center: bool, method: str, precision: str, backend) -> Spectrum:
    from .approx import ApproxSpectrum  # noqa: PLC0415

    if isinstance(x, (Spectrum, ApproxSpectrum)):
        if center is not None and bool(center) != x.centered:
            raise ValueError(
                f"center={center} contradicts the given Spectrum (computed with centered={x.centered}); "
                "recompute the spectrum or drop the center argument"
            )
        return x
    c = default_center if center is None else bool(center)
    return spectrum(x, center=c, method=method, precision=precision, backend=backend)


def rankme(x: Any, eps: float = _m.RANKME_EPS, *, center: Optional[bool] = None, method: str = "auto",
           precision: str = "exact", backend: Optional[str] = None):
    """RankMe (Garrido et al. 2023): exp(-Σ p_k log p_k), p_k = σ_k/‖σ‖₁ + ε, ε = 1e-7, uncentred.

    Args:
        x: embeddings (N, d) / (B, N, d) (tensor, NumPy, DLPack; any float dtype) or a Spectrum.
        eps: ε added to p (0 allowed); p is not renormalised, as in the paper.
        center: remove the column mean first (None = the paper's default: no centring).
        method, precision, backend: see :func:`rankme_fast.spectrum`.
    """
    return _spec(x, center, False, method, precision, backend).rankme(eps)


def effective_rank(x: Any, *, center: Optional[bool] = None, method: str = "auto", precision: str = "exact",
                   backend: Optional[str] = None):
    """Effective rank (Roy & Vetterli 2007) = RankMe with ε = 0; uncentred by default."""
    return _spec(x, center, False, method, precision, backend).effective_rank()


def collapse_auc(x: Any, *, center: Optional[bool] = None, method: str = "auto", precision: str = "exact",
                 backend: Optional[str] = None):
    """Dimensional-collapse AUC (Li, Efros & Pathak 2022, Eq. 2) of singular values; centred by default."""
    return _spec(x, center, True, method, precision, backend).collapse_auc()


def alpha_req(x: Any, index_range: tuple = (5, 100), *, center: Optional[bool] = None, method: str = "auto",
              precision: str = "exact", backend: Optional[str] = None):
    """α-ReQ (Agrawal et al. 2022): power-law decay α of λ_i over ``index_range``; centred by default."""
    return _spec(x, center, True, method, precision, backend).alpha_req(index_range)


def stable_rank(x: Any, *, center: Optional[bool] = None, method: str = "auto", precision: str = "exact",
                backend: Optional[str] = None):
    """Stable rank Σσ²/σ_1²; uncentred by default."""
    return _spec(x, center, False, method, precision, backend).stable_rank()


def participation_ratio(x: Any, *, center: Optional[bool] = None, method: str = "auto", precision: str = "exact",
                        backend: Optional[str] = None):
    """Participation ratio (Σλ)²/Σλ²; centred by default."""
    return _spec(x, center, True, method, precision, backend).participation_ratio()


def nesum(x: Any, *, center: Optional[bool] = None, method: str = "auto", precision: str = "exact",
          backend: Optional[str] = None):
    """NEsum Σλ_i/λ_1; centred by default."""
    return _spec(x, center, True, method, precision, backend).nesum()
