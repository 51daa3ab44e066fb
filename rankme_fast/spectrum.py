"""The singular-value spectrum of an embedding matrix and the strategies that compute it.

``spectrum(Z)`` returns a :class:`Spectrum`: σ_1 ≥ … ≥ σ_K ≥ 0 (float64, K = min(N, d)) of Z, or of
the centred Z - 1μᵀ, plus how it was obtained, so that one decomposition serves every metric.

Methods
-------
``"svd"``   torch.linalg.svdvals of the float64 input (materialises a float64 copy; reference).
``"gram"``  float64-exact streaming Gram (native SYRK when built, torch otherwise) + float64
            eigensolve; memory d² (or N² when N < d) plus one chunk. Exact per DESIGN §3.
``"auto"``  the fastest exact route: "gram" for 2-D input, batched "svd" for 3-D input.

Precision
---------
``"exact"`` (default): RankMe within 1e-4 relative of the float64 SVD on every tested spectrum, σ_k
within 1e-6·σ_1. ``"fast"``: float32 Gram (sgemm); if part of the spectrum lies below the float32
noise floor λ < FAST_FLOOR·tr(G), a second float32 pass in the eigenbasis of the first refines it and a
RuntimeWarning says so. Documented bound: RankMe within 1e-2 relative (see ``FAST_RANKME_RTOL``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import backends
from . import metrics as _m
from ._inputs import as_tensor, check_all_finite
from .gram import eigvals_desc, exact_gram, fast_gram

METHODS = ("auto", "svd", "gram", "randomized", "lanczos", "slq")
APPROX = ("randomized", "lanczos", "slq")
# method="auto" turns approximate only when the user accepts an error (rtol) at least this large and
# the exact Gram would be large: SLQ's default settings are tuned for ~1% RankMe (see approx.py)
AUTO_SLQ_RTOL = 1e-2
AUTO_SLQ_MIN_D = 8192
PRECISIONS = ("exact", "fast")
EXACT_RANKME_RTOL = 1e-4
FAST_RANKME_RTOL = 1e-2
# Float32 Gram rounding puts eigenvalue noise near u32 · tr(G) (u32 = 2^-24); below a few times that,
# the fast spectrum is noise.
FAST_FLOOR = 16 * 2.0**-24


@dataclass(frozen=True)
class Spectrum:
    """Singular values of Z (N×d) and their provenance; every metric of DESIGN §2 is a method.

    Attributes:
        singular_values: float64 tensor ``(..., K)``, descending, K = min(N, d).
        n_rows: N (samples per item).  n_features: d.
        centered: whether the column mean was removed before the decomposition.
        method: "svd" or "gram" (plus the refinement pass in fast mode: "gram+refine").
        backend: which implementation produced it ("torch", "cpu", "torch-fp32").
        precision: "exact" or "fast".  exact: True when the DESIGN §3 contract applies.
        rankme_rtol: documented relative error bound of RankMe from this spectrum.
        notes: human-readable remarks (e.g. why a refinement pass ran).
    """

    singular_values: torch.Tensor
    n_rows: int
    n_features: int
    centered: bool
    method: str
    backend: str
    precision: str = "exact"
    exact: bool = True
    rankme_rtol: float = EXACT_RANKME_RTOL
    notes: tuple = field(default_factory=tuple)

    @property
    def rank_dims(self) -> int:
        """K = min(N, d), the number of singular values."""
        return self.singular_values.shape[-1]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Covariance eigenvalues λ_k = σ_k² / (N-1) (σ_k² when N = 1)."""
        return self.singular_values**2 / max(self.n_rows - 1, 1)

    def _out(self, t: torch.Tensor):
        return float(t) if t.ndim == 0 else t

    def rankme(self, eps: float = _m.RANKME_EPS):
        return self._out(_m.rankme(self.singular_values, eps))

    def effective_rank(self):
        return self._out(_m.effective_rank(self.singular_values))

    def collapse_auc(self):
        return self._out(_m.collapse_auc(self.singular_values))

    def alpha_req(self, index_range: tuple = (5, 100)):
        return self._out(_m.alpha_req(self.singular_values, index_range))

    def stable_rank(self):
        return self._out(_m.stable_rank(self.singular_values))

    def participation_ratio(self):
        return self._out(_m.participation_ratio(self.singular_values))

    def nesum(self):
        return self._out(_m.nesum(self.singular_values))

    def __repr__(self) -> str:
        sv = self.singular_values
        shape = "x".join(map(str, sv.shape))
        return (
            f"Spectrum(K={self.rank_dims}, shape={shape}, N={self.n_rows}, d={self.n_features}, "
            f"centered={self.centered}, method={self.method!r}, backend={self.backend!r}, "
            f"precision={self.precision!r}, rankme_rtol={self.rankme_rtol:g})"
        )


def _check(method: str, precision: str, backend: Optional[str]) -> None:
    if backend not in (None, "auto") and backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(backends.BACKENDS)} or 'auto'")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _raise_if_nonfinite(x: torch.Tensor) -> None:
    """Called when the decomposition produced non-finite numbers: blame the input or overflow."""
    check_all_finite(x)  # raises naming count and row if the input itself has NaN/Inf
    amax = float(x.abs().max())
    raise ValueError(
        f"x: squares of the input overflow float64 (max |x| = {amax:.3g}); rescale the embeddings "
        "(RankMe and the other ratios are scale invariant)"
    )


def _svd_spectrum(x: torch.Tensor, center: bool) -> torch.Tensor:
    z = x.to(torch.float64)
    if center:
        z = z - z.mean(-2, keepdim=True)
    return torch.linalg.svdvals(z)


def _batched_svd(x: torch.Tensor, center: bool) -> torch.Tensor:
    b, n, d = x.shape
    step = max(1, (1 << 23) // max(n * d, 1))  # ≤ 64 MiB of float64 at a time
    return torch.cat([_svd_spectrum(x[i : i + step], center) for i in range(0, b, step)])


def _gram_spectrum(x: torch.Tensor, center: bool, backend: Optional[str]):
    res = exact_gram(x, center=center, backend=backend)
    if not bool(torch.isfinite(res.gram).all()):
        _raise_if_nonfinite(x)
    lam = eigvals_desc(res.gram)
    return lam.sqrt(), res.backend


def _fast_spectrum(x: torch.Tensor, center: bool):
    res = fast_gram(x, center=center)
    g = res.gram
    if not bool(torch.isfinite(g).all()):
        return None, res.backend, ()
    lam, vecs = torch.linalg.eigh(g)
    lam = lam.flip(-1)
    vecs = vecs.flip(-1)
    floor = FAST_FLOOR * float(torch.diagonal(g).sum())
    below = int((lam < floor).sum())
    notes: tuple = ()
    if below:
        refined = fast_gram(x, center=center, basis=vecs)
        lam = eigvals_desc(refined.gram)
        msg = (
            f"precision='fast': {below} of {lam.numel()} eigenvalues lie below the float32 noise floor "
            f"({FAST_FLOOR:.1e}·tr G); ran a second float32 pass in the first pass's eigenbasis. "
            f"Documented RankMe error <= {FAST_RANKME_RTOL:g} relative; use precision='exact' for 1e-4."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        notes = (msg,)
    return lam.clamp_min(0.0).sqrt(), res.backend, notes


def _auto_approx(n: int, d: int, rtol: Optional[float]) -> bool:
    """Whether method='auto' should use SLQ: the caller tolerates ≥ 1% error and the d×d (or N×N)
    float64 Gram is large — past AUTO_SLQ_MIN_D, or more than a quarter of the free memory."""
    if rtol is None or rtol < AUTO_SLQ_RTOL:
        return False
    k = min(n, d)
    if k >= AUTO_SLQ_MIN_D:
        return True
    try:
        import psutil  # noqa: PLC0415 - optional

        free = psutil.virtual_memory().available
    except ImportError:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 1 << 40
    return 8 * k * k > free // 4


def spectrum(
    x: Any,
    *,
    center: bool = False,
    method: str = "auto",
    precision: str = "exact",
    backend: Optional[str] = None,
    rtol: Optional[float] = None,
    **approx_options,
):
    """Singular values σ_1 ≥ … ≥ σ_K of Z (or of Z - 1μᵀ when ``center``), K = min(N, d).

    Args:
        x: embeddings ``(N, d)`` or a batch ``(B, N, d)``: torch tensor (any strides), NumPy array or
            any ``__dlpack__`` object; float64/32/16 or bfloat16. Or a path (file, shard directory,
            glob; see :func:`rankme_fast.score`), streamed with O(d²) memory.
        center: subtract the column mean first (per batch item for 3-D input).
        method: "auto" | "svd" | "gram" (exact) or "randomized" | "lanczos" | "slq" (approximate:
            an :class:`~rankme_fast.approx.ApproxSpectrum` with estimates and error bars, see
            :mod:`rankme_fast.approx`). "auto" stays exact unless ``rtol`` ≥ 1e-2 and the Gram would be
            large (min(N, d) ≥ 8192 or 8·min(N, d)² bytes > a quarter of free memory): then "slq".
        precision: "exact" | "fast".
        rtol: the relative error the caller accepts (only consulted by method="auto").
        **approx_options: for approximate methods — k, seed, oversample, power_iters, tol, probes,
            steps, deflate_steps, deflate, deflate_tol (see :func:`rankme_fast.approx.approx_spectrum`).
        backend: Gram backend, "auto" | "cpu" | "cuda" | "triton" | "torch" (default:
            ``RANKME_FAST_BACKEND`` or auto: the native CPU kernel for CPU tensors, the measured-best
            GPU kernel for CUDA tensors — see :mod:`rankme_fast.backends`).

    Raises:
        TypeError / ValueError for invalid input (DESIGN §6), including NaN/Inf (count and first row).
    """
    _check(method, precision, backend)
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
    if approx_options and method not in APPROX + ("auto",):
        raise ValueError(f"options {sorted(approx_options)} apply to approximate methods {APPROX} only")
    if method in APPROX or (method == "auto" and not isinstance(x, (str, os.PathLike))):
        t = None if isinstance(x, (str, os.PathLike)) else as_tensor(x, ndim=(2, 3))
        if method == "auto" and (t is None or t.ndim != 2 or not _auto_approx(*t.shape, rtol)):
            if approx_options:
                raise ValueError(f"options {sorted(approx_options)} apply to approximate methods only; "
                                 "method='auto' chose an exact one here")
        else:
            if t is None or t.ndim != 2:
                raise ValueError(f"method={method!r} needs one in-memory (N, d) matrix "
                                 "(not a path or a (B, N, d) batch)")
            if precision != "exact":
                raise ValueError(f"method={method!r} has its own error control; leave precision='exact'")
            from .approx import approx_spectrum  # noqa: PLC0415 - it checks finiteness in its trace pass

            return approx_spectrum(t, method="slq" if method == "auto" else method, center=center, rtol=rtol,
                                   **approx_options)
    if isinstance(x, (str, os.PathLike)):
        if method not in ("auto", "gram") or precision != "exact":
            raise ValueError("a path is streamed through the exact Gram accumulator: use method='auto' or 'gram' "
                             f"and precision='exact' (got method={method!r}, precision={precision!r})")
        from .scoring import accumulate

        acc, _ = accumulate(x, backend=backend, progress=False)
        return acc.spectrum(center)
    t = as_tensor(x, ndim=(2, 3))
    n, d = t.shape[-2], t.shape[-1]
    notes: tuple = ()
    if t.ndim == 3:
        if precision == "fast" or method == "gram":
            check_all_finite(t)  # report batch item and row before splitting the batch
            svs = []
            for i in range(t.shape[0]):
                svs.append(spectrum(t[i], center=center, method=method, precision=precision, backend=backend))
            sv = torch.stack([s.singular_values for s in svs])
            first = svs[0]
            return Spectrum(sv, n, d, center, first.method, first.backend, precision, first.exact,
                            max(s.rankme_rtol for s in svs), tuple(note for s in svs for note in s.notes))
        check_all_finite(t)
        sv = _batched_svd(t, center)
        used, be = "svd", "torch"
    elif method == "svd":
        check_all_finite(t)
        sv, used, be = _svd_spectrum(t, center), "svd", "torch"
    elif precision == "fast":
        sv, be, notes = _fast_spectrum(t, center)
        used = "gram+refine" if notes else "gram"
    else:
        sv, be = _gram_spectrum(t, center, backend)
        used = "gram"
    if sv is None or not bool(torch.isfinite(sv).all()):
        _raise_if_nonfinite(t)
    exact = precision == "exact"
    return Spectrum(
        sv, n, d, center, used, be, precision, exact, EXACT_RANKME_RTOL if exact else FAST_RANKME_RTOL, notes
    )
