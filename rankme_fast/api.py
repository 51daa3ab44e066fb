"""Public entry points: :func:`spectrum` (validate once, pick a strategy, run it) and the metric functions.

The metric functions accept a :class:`~rankme_fast.spectrum.Spectrum` / ``ApproxSpectrum`` or raw
embeddings. With raw data the spectrum is computed first, centred or not according to the metric's
reference (DESIGN §2: RankMe / effective rank / stable rank uncentred; collapse AUC, α-ReQ,
participation ratio, NEsum centred). ``center=None`` means that default; passing a Spectrum together
with a ``center`` that contradicts it raises instead of silently mixing conventions. 2-D input gives a
float, 3-D input (B, N, d) a float64 tensor of shape (B,). Every metric function takes the options of
:func:`spectrum` (``method``, ``precision``, ``backend``, ``rtol``, ``differentiable`` and the approximate
methods' settings); with ``differentiable=True`` 2-D input gives a 0-d float64 tensor with a gradient
(:mod:`rankme_fast.differentiable`).
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Optional

import numpy as np

from . import backends
from . import differentiable as _diff
from . import metrics as _m
from . import strategies
from ._inputs import as_tensor
from .spectrum import ApproxSpectrum, Spectrum

# the module, not the package attribute `spectrum` (which is the function below)
_sp = importlib.import_module("rankme_fast.spectrum")
DEFAULT_INTERVAL_RTOL = 1e-2  # a point estimate whose interval is wider than this (relative) warns
_SIZE_OPTIONS = {"randomized": ("k", "oversample", "power_iters"), "lanczos": ("k", "tol"),
                 "slq": ("probes", "steps", "deflate_steps")}


def _check(method: str, precision: str, backend: Optional[str]) -> None:
    if backend not in (None, "auto") and backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(backends.BACKENDS)} or 'auto'")
    if method not in _sp.METHODS:
        raise ValueError(f"method must be one of {_sp.METHODS}, got {method!r}")
    if precision not in _sp.PRECISIONS:
        raise ValueError(f"precision must be one of {_sp.PRECISIONS}, got {precision!r}")


def _warn_if_costlier(name: str, t, options: dict) -> None:
    """An approximate strategy at its *default* settings that is estimated to cost more than the exact
    Gram runs as asked, with a warning giving both estimates."""
    if any(o in options for o in _SIZE_OPTIONS.get(name, ())):
        return
    n, d = t.shape
    dev = t.device.type
    mine = strategies.estimate(name, n, d, t.element_size(), dev, **options)
    exact = strategies.estimate("gram", n, d, t.element_size(), dev)
    if mine.seconds(dev) > exact.seconds(dev):
        warnings.warn(
            f"method={name!r} at its default settings is estimated at {mine.flops:.3g} flops over {mine.passes} "
            f"passes (~{mine.seconds(dev):.3g} s nominal) against {exact.flops:.3g} flops in one pass "
            f"(~{exact.seconds(dev):.3g} s) for the exact Gram at {n}x{d}: method='gram' is cheaper here and "
            "exact; pass smaller settings (e.g. probes=, steps=) to keep the approximation",
            RuntimeWarning, stacklevel=4)


def spectrum(
    x: Any,
    *,
    center: bool = False,
    method: str = "auto",
    precision: str = "exact",
    backend: Optional[str] = None,
    rtol: Optional[float] = None,
    differentiable: bool = False,
    **approx_options,
):
    """Singular values σ_1 ≥ … ≥ σ_K of Z (or of Z - 1μᵀ when ``center``), K = min(N, d).

    Args:
        x: embeddings ``(N, d)`` or a batch ``(B, N, d)``: torch tensor (any strides), NumPy array or
            any ``__dlpack__`` object; float64/32/16 or bfloat16. Or a path (file, shard directory,
            glob; see :func:`rankme_fast.score`), streamed with O(d²) memory.
        center: subtract the column mean first (per batch item for 3-D input).
        method: a strategy of :mod:`rankme_fast.strategies`: "auto" | "svd" | "gram" (exact) or
            "randomized" | "lanczos" | "slq" (approximate: an :class:`~rankme_fast.spectrum.ApproxSpectrum`
            with estimates and error bars). "auto" stays exact unless ``rtol`` ≥ 1e-2 and the Gram would be
            large (min(N, d) ≥ 8192, 8·min(N, d)² bytes > a quarter of free memory, or SLQ estimated at
            under half its cost): then "slq" (:func:`rankme_fast.strategies.choose`).
        precision: "exact" | "fast" (the "gram-fast" strategy).
        rtol: the relative error the caller accepts (consulted by method="auto"; kept on approximate
            spectra, whose metric functions warn when their interval is wider).
        **approx_options: for approximate methods — k, seed, oversample, power_iters, tol, probes,
            steps, deflate_steps, deflate, deflate_tol (see :func:`rankme_fast.approx.approx_spectrum`).
        backend: Gram backend, "auto" | "cpu" | "cuda" | "triton" | "torch" (default:
            ``RANKME_FAST_BACKEND`` or auto: the native CPU kernel for CPU tensors, the measured-best
            GPU kernel for CUDA tensors — see :mod:`rankme_fast.backends`).
        differentiable: σ as a torch autograd graph of ``x`` (:mod:`rankme_fast.differentiable`):
            λ = eigvalsh(G) of the float64 Gram G = VᵀV, or VVᵀ when N < d (V = float64 Z, centred if
            asked), σ = √λ; the returned Spectrum's metric methods give float64 tensors (0-d for 2-D
            input) whose gradient reaches ``x`` in its own dtype (bf16/float16/float32/float64). Only
            eigenvalue derivatives are used (backward U diag(λ̄) Uᵀ), so the gradient is finite and, for
            RankMe / effective rank / participation ratio, unique at repeated singular values. σ = 0 gets
            the subgradient 0, and eigenvalues at or below the float64 rounding floor
            min(8·K·ε₆₄, 1e-12)·λ_1 count as exactly 0 (value and gradient). Needs an in-memory tensor
            (or array), method "auto" | "gram" | "svd" ("svd": autograd through
            ``torch.linalg.svdvals``, for strongly collapsed Z) and precision "exact"; ``backend`` must
            be None / "auto" / "torch" (torch ops run on the tensor's device); ``rtol`` is ignored.

    Raises:
        TypeError / ValueError for invalid input (DESIGN §6), including NaN/Inf (count and first row).
    """
    _check(method, precision, backend)
    _check_center(center, allow_none=False)
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
    if differentiable:
        return _differentiable_spectrum(x, center, method, precision, backend, approx_options)
    approx = _sp.APPROX
    if approx_options and method not in approx + ("auto",):
        raise ValueError(f"options {sorted(approx_options)} apply to approximate methods {approx} only")
    if isinstance(x, (str, os.PathLike)):
        if method in approx:
            raise ValueError(f"method={method!r} needs one in-memory (N, d) matrix (not a path or a (B, N, d) batch)")
        if approx_options:
            raise ValueError(f"options {sorted(approx_options)} apply to approximate methods only; "
                             "method='auto' chose an exact one here")
        if method not in ("auto", "gram") or precision != "exact":
            raise ValueError("a path is streamed through the exact Gram accumulator: use method='auto' or 'gram' "
                             f"and precision='exact' (got method={method!r}, precision={precision!r})")
        return strategies.get("gram").run(x, center=center, backend=backend)
    t = as_tensor(x, ndim=(2, 3))
    if method == "auto":
        name, _why = strategies.choose(t.shape[-2], t.shape[-1], ndim=t.ndim, itemsize=t.element_size(),
                                       device=t.device.type, precision=precision, rtol=rtol)
        if approx_options and name not in approx:
            raise ValueError(f"options {sorted(approx_options)} apply to approximate methods only; "
                             "method='auto' chose an exact one here")
    elif method in approx or method == "svd":
        name = method
    else:
        name = "gram-fast" if precision == "fast" else method
    strat = strategies.get(name)
    if name in approx:
        if t.ndim != 2:
            raise ValueError(f"method={name!r} needs one in-memory (N, d) matrix (not a path or a (B, N, d) batch)")
        if precision != "exact":
            raise ValueError(f"method={name!r} has its own error control; leave precision='exact'")
        if method != "auto":
            _warn_if_costlier(name, t, approx_options)
    return strat.run(t, center=center, backend=backend, rtol=rtol, precision=precision, **approx_options)


def _differentiable_spectrum(x, center, method, precision, backend, approx_options):
    if isinstance(x, (str, os.PathLike)):
        raise ValueError("differentiable=True needs in-memory embeddings (a tensor with the autograd graph), "
                         "not a path")
    if method not in _diff.METHODS:
        raise ValueError(f"differentiable=True supports method in {_diff.METHODS} (exact, through the float64 "
                         f"eigen-decomposition), got method={method!r}")
    if precision != "exact":
        raise ValueError(f"differentiable=True is exact only: leave precision='exact' (got {precision!r})")
    if backend not in (None, "auto", "torch"):
        raise ValueError(f"differentiable=True runs torch ops on the tensor's device: backend must be None, "
                         f"'auto' or 'torch' (got {backend!r})")
    if approx_options:
        raise ValueError(f"options {sorted(approx_options)} apply to approximate methods only, and "
                         "differentiable=True is exact")
    return _diff.spectrum(as_tensor(x, ndim=(2, 3)), center=bool(center), method=method)


# ------------------------------------------------------------------------------------------------
# metric functions


def _check_center(center, *, allow_none: bool = True) -> None:
    """``center`` must be a bool (or None for a metric's default): ``center='no'`` is an error, not True."""
    if center is None and allow_none:
        return
    if isinstance(center, (bool, np.bool_)):
        return
    want = "True, False or None (the metric's default)" if allow_none else "True or False"
    raise TypeError(f"center must be {want}, got {type(center).__name__} {center!r}")


def _spec(x: Any, center: Optional[bool], default_center: bool, opts: dict):
    _check_center(center)
    if isinstance(x, (Spectrum, ApproxSpectrum)):
        if opts.get("differentiable") and not getattr(x, "differentiable", False):
            raise ValueError("differentiable=True needs the raw embeddings (or a Spectrum from "
                             "rf.spectrum(z, differentiable=True)); this Spectrum holds no autograd graph")
        if center is not None and bool(center) != x.centered:
            raise ValueError(
                f"center={center} contradicts the given Spectrum (computed with centered={x.centered}); "
                "recompute the spectrum or drop the center argument"
            )
        return x
    c = default_center if center is None else bool(center)
    return spectrum(x, center=c, **opts)


def _with_interval(s, value, interval_fn, name: str, rtol: Optional[float], return_interval: bool):
    """The point estimate, and its interval when asked; an approximate one wider than ``rtol`` warns."""
    if isinstance(s, ApproxSpectrum):
        lo, hi = interval_fn()
        tol = rtol if rtol is not None else (s.rtol if s.rtol is not None else DEFAULT_INTERVAL_RTOL)
        if not return_interval and (hi - lo) > 2 * tol * abs(value):
            warnings.warn(
                f"{name} from method={s.method!r} is a point estimate {value:.6g} of a value known only to lie in "
                f"[{lo:.6g}, {hi:.6g}] (±{(hi - lo) / 2 / abs(value):.1%}, wider than rtol={tol:g}); pass "
                "return_interval=True to get the interval, or use an exact method", RuntimeWarning, stacklevel=3)
        return (value, (lo, hi)) if return_interval else value
    if return_interval:
        r = s.rankme_rtol
        return value, (value * (1 - r), value * (1 + r))
    return value


def rankme(x: Any, eps: Optional[float] = None, *, center: Optional[bool] = None, return_interval: bool = False,
           convention: str = "paper", **options):
    """RankMe (Garrido et al. 2023): exp(-Σ p_k log p_k), p_k = σ_k/‖σ‖₁ + ε, ε = 1e-7, uncentred.

    Args:
        x: embeddings (N, d) / (B, N, d) (tensor, NumPy, DLPack; any float dtype) or a Spectrum.
        eps: ε added to p (0 allowed; None: 1e-7, or the convention's); p is not renormalised, as in the paper.
        center: remove the column mean first (None = the convention's default: no centring, except
            "reptrix").
        convention: "paper" | "stable-pretraining" (ε = 1e-5) | "stable-pretraining-jax"
            (p = σ/(‖σ‖₁ + 1e-7) + 1e-7) | "reptrix" (centred, p = σ²/Σσ² + 1e-7): a peer's number.
        return_interval: return ``(value, (lo, hi))``: an approximate spectrum's interval, or the
            documented error bound of an exact/fast one. Without it, an approximate value whose interval is
            wider than ``rtol`` (default 1e-2) warns with the interval.
        **options: method, precision, backend, rtol, differentiable and the approximate settings of
            :func:`spectrum`.

    ``differentiable=True`` returns a float64 tensor (0-d; (B,) for a batch) with a gradient through the
    float64 eigen-decomposition of the Gram (N×N when N < d), for use as a loss term, e.g.
    ``loss = task_loss - 0.1 * rf.rankme(z, differentiable=True)``. Every convention works with it.
    The gradient is dR/dZ = Σ_k (∂R/∂σ_k) u_k v_kᵀ, built from eigenvalue derivatives only, so it is
    finite and unique at repeated singular values (R is a symmetric function of σ); σ_k = 0 gets the
    subgradient 0, and σ below the float64 Gram's resolution (λ_k ≤ min(8·K·ε₆₄, 1e-12)·λ_1) count as 0
    (see :func:`spectrum` and :mod:`rankme_fast.differentiable`).
    """
    if convention not in _m.RANKME_CONVENTIONS:
        raise ValueError(f"convention must be one of {list(_m.RANKME_CONVENTIONS)}, got {convention!r}")
    if eps is not None:
        eps = _m.check_eps(eps)  # before any work: the same rule as the CLI's --eps, 0 <= eps < 1
    s = _spec(x, center, _m.RANKME_CONVENTIONS[convention][0], options)
    if convention != "paper":
        if isinstance(s, ApproxSpectrum):
            raise ValueError(f"convention={convention!r} needs every singular value: use an exact method")
        if return_interval:
            raise ValueError("return_interval applies to convention='paper' only")
        return s.rankme(eps, convention=convention)
    e = _m.RANKME_EPS if eps is None else eps
    return _with_interval(s, s.rankme(e), lambda: s.rankme_interval(e), "RankMe", options.get("rtol"),
                          return_interval)


def effective_rank(x: Any, *, center: Optional[bool] = None, return_interval: bool = False, **options):
    """Effective rank (Roy & Vetterli 2007) = RankMe with ε = 0; uncentred by default."""
    s = _spec(x, center, False, options)
    return _with_interval(s, s.effective_rank(), lambda: s.rankme_interval(0.0), "effective rank",
                          options.get("rtol"), return_interval)


def collapse_auc(x: Any, *, center: Optional[bool] = None, **options):
    """Dimensional-collapse AUC (Li, Efros & Pathak 2022, Eq. 2) of singular values; centred by default."""
    return _spec(x, center, True, options).collapse_auc()


def alpha_req(x: Any, index_range: tuple = (5, 100), *, center: Optional[bool] = None, **options):
    """α-ReQ (Agrawal et al. 2022): power-law decay α of λ_i over ``index_range``; centred by default."""
    return _spec(x, center, True, options).alpha_req(index_range)


def stable_rank(x: Any, *, center: Optional[bool] = None, **options):
    """Stable rank Σσ²/σ_1²; uncentred by default."""
    return _spec(x, center, False, options).stable_rank()


def participation_ratio(x: Any, *, center: Optional[bool] = None, **options):
    """Participation ratio (Σλ)²/Σλ²; centred by default."""
    return _spec(x, center, True, options).participation_ratio()


def nesum(x: Any, *, center: Optional[bool] = None, **options):
    """NEsum Σλ_i/λ_1; centred by default."""
    return _spec(x, center, True, options).nesum()
