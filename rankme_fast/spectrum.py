"""The value types of a spectrum: :class:`Spectrum` (exact or fast, every σ) and :class:`ApproxSpectrum`
(top σ plus what is known of the rest, with intervals), and the constants of their error contracts.

This module imports no strategy: the ways of computing a spectrum live in :mod:`rankme_fast.strategies`
and the public :func:`rankme_fast.spectrum` in :mod:`rankme_fast.api`.

Precision
---------
``"exact"`` (default): RankMe within 1e-4 relative of the float64 SVD on every tested spectrum, σ_k
within 1e-6·σ_1. ``"fast"``: float32 Gram (sgemm); if part of the spectrum lies below the float32
noise floor λ < FAST_FLOOR·tr(G), a second float32 pass in the eigenbasis of the first refines it and a
RuntimeWarning says so. Documented bound: RankMe within 1e-2 relative (see ``FAST_RANKME_RTOL``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import metrics as _m

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
        differentiable: σ carry the autograd graph of the input (``rf.spectrum(z, differentiable=True)``,
            :mod:`rankme_fast.differentiable`); the metric methods then return float64 tensors (0-d for
            2-D input) instead of Python floats.
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
    differentiable: bool = False

    @property
    def rank_dims(self) -> int:
        """K = min(N, d), the number of singular values."""
        return self.singular_values.shape[-1]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Covariance eigenvalues λ_k = σ_k² / (N-1) (σ_k² when N = 1)."""
        return self.singular_values**2 / max(self.n_rows - 1, 1)

    def _out(self, t: torch.Tensor):
        return float(t) if t.ndim == 0 and not self.differentiable else t

    def _metric(self, fn, *args):
        """``fn(σ, *args)`` as a float or tensor; an all-zero spectrum's error says why, from N and centring."""
        try:
            return self._out(fn(self.singular_values, *args))
        except _m.ZeroSpectrumError as exc:
            raise _m.ZeroSpectrumError(_m.zero_spectrum_message(exc.what, self.n_rows, self.centered, exc.where),
                                       exc.what, exc.where) from None

    def rankme(self, eps: Optional[float] = None, convention: str = "paper"):
        """RankMe (ε = 1e-7 by default); ``convention`` reproduces a peer's formula (see
        :data:`rankme_fast.metrics.RANKME_CONVENTIONS`; its ε unless ``eps`` is given)."""
        if convention == "paper":
            return self._metric(_m.rankme, _m.RANKME_EPS if eps is None else eps)
        return self._metric(_m.rankme_convention, convention, eps)

    def effective_rank(self):
        return self._metric(_m.effective_rank)

    def collapse_auc(self):
        return self._metric(_m.collapse_auc)

    def alpha_req(self, index_range: tuple = (5, 100)):
        return self._metric(_m.alpha_req, index_range)

    def stable_rank(self):
        return self._metric(_m.stable_rank)

    def participation_ratio(self):
        return self._metric(_m.participation_ratio)

    def nesum(self):
        return self._metric(_m.nesum)

    def plot(self, ax=None, *, label: Optional[str] = None, fit: bool = True, annotate: bool = True):
        """Log-log σ_k/σ_1 against k on ``ax`` (a new figure when None), with the α-ReQ least-squares line
        over its index range and RankMe / effective rank in the legend; returns the matplotlib Axes (needs
        matplotlib: the ``[plot]`` extra)."""
        from .plot import spectrum_axes  # noqa: PLC0415

        return spectrum_axes(self, ax=ax, label=label, fit=fit, annotate=annotate)

    def __repr__(self) -> str:
        sv = self.singular_values
        shape = "x".join(map(str, sv.shape))
        return (
            f"Spectrum(K={self.rank_dims}, shape={shape}, N={self.n_rows}, d={self.n_features}, "
            f"centered={self.centered}, method={self.method!r}, backend={self.backend!r}, "
            f"precision={self.precision!r}, rankme_rtol={self.rankme_rtol:g}"
            + (", differentiable=True)" if self.differentiable else ")")
        )


F64 = torch.float64
_EMPTY = torch.zeros(0, dtype=F64)


@dataclass
class Quadrature:
    """Per-probe quadrature rules for tr h(G): nodes θ (P, n) and weights τ (P, n) of the full m-step
    rule, and ``shorter``: the rules of the first m − 2h and m − h steps (h = ⌊m/4⌋). Gauss quadrature of
    √λ-type functions converges geometrically in the steps once the spectrum's edge is resolved, so the
    three estimates are extrapolated (Aitken's Δ²) — see :meth:`ApproxSpectrum.rankme`."""
    nodes: torch.Tensor
    weights: torch.Tensor
    shorter: tuple = ()



# ------------------------------------------------------------------------------------------------
# approximate spectra: metric estimates and intervals


def _rankme_from_parts(head_sv: torch.Tensor, tail_sum, tail_h, eps: float):
    """RankMe given the head singular values and functionals of the tail. ``tail_sum`` is Σ_tail σ and
    ``tail_h(S)`` returns Σ_tail h_S(σ²) for the normaliser S."""
    s = float(head_sv.sum()) + float(tail_sum)
    p = head_sv / s + eps
    ent = float(-(p * torch.log(p.clamp_min(1e-300))).sum()) + float(tail_h(s))
    return math.exp(ent)


def _check_eps(eps: float) -> None:
    _m.check_eps(eps)  # the one rule: a real number in [0, 1)


def _h(lam: torch.Tensor, s: float, eps: float) -> torch.Tensor:
    p = lam.clamp_min(0).sqrt() / s + eps
    out = -p * torch.log(p.clamp_min(1e-300))
    return torch.where(p > 0, out, torch.zeros_like(out))


@dataclass(frozen=True)
class ApproxSpectrum:
    """An approximate spectrum: the computed top singular values plus what is known about the rest.

    Attributes:
        singular_values: the top-k σ computed (float64, descending; Ritz values: lower bounds).
        frobenius2: Σ_{all k} σ_k² = tr G, exact.
        n_rows, n_features, centered, method ("randomized" | "lanczos" | "slq").
        residuals: ‖G u_i − θ_i u_i‖ per computed pair (an eigenvalue of G lies within it).
        converged: whether Lanczos met its tolerance.
        quadrature: SLQ nodes/weights per probe (slq only).
        passes: operator passes over the data.
        exact: always False; ``rtol``: the accuracy the caller asked for (auto), if any.
    """

    singular_values: torch.Tensor
    frobenius2: float
    n_rows: int
    n_features: int
    centered: bool
    method: str
    residuals: torch.Tensor
    converged: bool
    passes: int
    quadrature: Optional[Quadrature] = None
    operator_dim: int = 0  # size of the operator the quadrature ran on (min(N, d))
    exact: bool = False
    rtol: Optional[float] = None
    notes: tuple = field(default_factory=tuple)
    # ≠ 0 only for float64 input beyond 2^±400 (λ = σ² out of float64's range): every stored value then
    # describes Z·2^log2_scale — σ of Z = singular_values·2^-log2_scale; the metrics are scale-invariant
    log2_scale: int = 0

    @property
    def rank_dims(self) -> int:
        return min(self.n_rows, self.n_features)

    @property
    def backend(self) -> str:
        return "approx"

    # -- tail bookkeeping --------------------------------------------------------------------
    def _tail_count(self) -> int:
        return self.rank_dims - self.singular_values.numel()

    def _extreme_tails(self, head: torch.Tensor, t2: float):
        """Two tails consistent with ``head`` and tail mass ``t2``: flat (all equal, the most spread) and
        concentrated (as many values as possible at the head's last value, one remainder, zeros)."""
        m = self._tail_count()
        sk = float(head[-1]) if head.numel() else math.sqrt(max(t2, 0.0))
        if m <= 0 or t2 <= 0:
            z = torch.zeros(max(m, 0), dtype=F64)
            return z, z
        flat = torch.full((m,), min(math.sqrt(t2 / m), sk) if sk > 0 else math.sqrt(t2 / m), dtype=F64)
        full = int(min(m, math.floor(t2 / sk**2))) if sk > 0 else 0
        conc = torch.zeros(m, dtype=F64)
        conc[:full] = sk
        if full < m:
            conc[full] = math.sqrt(max(0.0, t2 - full * sk**2))
        return flat, conc

    def _slq_tail(self, eps: float, probes: Optional[torch.Tensor] = None, rule: int = -1,
                  floor: Optional[str] = None):
        """(Σ σ, h ↦ Σ h) from quadrature rule ``rule`` (-1: the full one, 0/1: the shorter ones), over
        all D eigenvalues of the operator minus its D − K structural zeros. ``floor``: "up" / "down" moves
        every node by the operator's resolution floor (the two ends of what a float64 operator can tell
        apart)."""
        q = self.quadrature
        idx = probes if probes is not None else torch.arange(q.nodes.shape[0])
        nodes, w = (q.nodes, q.weights) if rule < 0 else q.shorter[rule]
        nodes, w = nodes[idx], w[idx]
        if floor is not None:
            f = self._resolution_floor()
            nodes = nodes + f if floor == "up" else (nodes - f).clamp_min(0)
        zeros = (self.operator_dim or self.n_features) - self.rank_dims
        tail_sum = float((w * nodes.sqrt()).sum(1).mean())

        def tail_h(s):
            est = float((w * _h(nodes, s, eps)).sum(1).mean())
            return est - zeros * float(_h(torch.zeros(1, dtype=F64), s, eps)[0])
        return tail_sum, tail_h

    def _slq_rankme(self, eps: float, probes: Optional[torch.Tensor] = None):
        """(extrapolated estimate, full-rule Gauss value). The Gauss values R1, R2, R3 of m − 2h, m − h and
        m steps are extrapolated by Aitken's Δ² when they converge geometrically (successive changes of
        one sign, shrinking); otherwise the estimate is R3."""
        r3 = _rankme_from_parts(_EMPTY, *self._slq_tail(eps, probes), eps)
        if len(self.quadrature.shorter) != 2:
            return r3, r3
        r1, r2 = (_rankme_from_parts(_EMPTY, *self._slq_tail(eps, probes, rule=j), eps) for j in (0, 1))
        d1, d2 = r2 - r1, r3 - r2
        if d1 == 0 or abs(d1) <= 1e-12 * abs(r3) or not (0 < d2 / d1 < 1):
            return r3, r3
        return r3 - d2 * d2 / (d2 - d1), r3

    def _resolution_floor(self) -> float:
        """The float64 operator's absolute eigenvalue resolution, ~ D·ε₆₄·λ_1: every computed eigenvalue
        is known only to within it (eigenvalues below it are indistinguishable from 0)."""
        dim = self.operator_dim or self.n_features
        lam1 = max(float(self.quadrature.nodes.max()) if self.quadrature is not None else 0.0,
                   float(self.singular_values[0]) ** 2 if self.singular_values.numel() else 0.0)
        return 8.0 * dim * 2.0**-52 * lam1

    # -- metrics -----------------------------------------------------------------------------
    def rankme(self, eps: float = _m.RANKME_EPS) -> float:
        """Point estimate of RankMe (see :meth:`rankme_interval` for its range)."""
        _check_eps(eps)
        if self.method == "slq":
            return self._slq_rankme(eps)[0]
        lo, hi = self.rankme_interval(eps)
        return math.sqrt(lo * hi)

    def _head_range(self):
        """Each computed θ_i has an eigenvalue of G within its residual plus the float64 operator's
        resolution floor (on collapsed data the tail θ are rounding-level): σ_i ∈ [√(θ−r), √(θ+r)]."""
        lam = self.singular_values**2
        r = self.residuals.to(F64) + self._resolution_floor()
        return (lam - r).clamp_min(0).sqrt(), (lam + r).sqrt()

    def rankme_interval(self, eps: float = _m.RANKME_EPS, *, level: float = 0.95, n_boot: int = 400) -> tuple:
        """randomized / lanczos: (lower, upper) of RankMe over the computed head moved within its
        residual bounds and the two extreme tails consistent with it and the exact Frobenius mass
        (flat, or concentrated at σ_k). slq: the percentile bootstrap over the probes (of the
        extrapolated estimate) around every value the quadrature error allows — the Gauss value, its
        extrapolation, and the extrapolation moved as far again — and the operator's resolution floor (every eigenvalue moved by ±D·ε₆₄·λ_1)."""
        _check_eps(eps)
        if self.method == "slq":
            g = torch.Generator().manual_seed(12345)
            n = self.quadrature.nodes.shape[0]
            vals = []
            for _ in range(n_boot):
                idx = torch.randint(0, n, (n,), generator=g)
                vals.append(self._slq_rankme(eps, idx)[0])
            v = torch.tensor(vals, dtype=F64)
            a = (1 - level) / 2
            lo, hi = float(torch.quantile(v, a)), float(torch.quantile(v, 1 - a))
            est, gauss = self._slq_rankme(eps)
            # quadrature error: the extrapolation is allowed to be off by its own size in either direction
            # (the bootstrap cannot see this bias); without one, by the last step-block's change of the
            # Gauss value
            quad = [est, gauss, est - (gauss - est)]
            if len(self.quadrature.shorter) == 2 and est == gauss:
                r2 = _rankme_from_parts(_EMPTY, *self._slq_tail(eps, rule=1), eps)
                quad += [gauss - (r2 - gauss), r2]
            ends = [_rankme_from_parts(_EMPTY, *self._slq_tail(eps, floor=f), eps) for f in ("down", "up")]
            spread_lo, spread_hi = est - lo, hi - est
            lo_all = min(min(quad) - spread_lo, *ends)
            hi_all = max(max(quad) + spread_hi, *ends)
            # (and the evaluation of RankMe itself rounds: never claim more than ~1e-12 relative)
            return lo_all * (1 - 1e-12), hi_all * (1 + 1e-12)
        lo_h, hi_h = self._head_range()
        # Tail mass = tr G − Σ head², known up to the float64 rounding of both sums (relative ~1e-13
        # of tr G, which on collapsed data is as large as the true tail) and the head's own range.
        slack = 1e-13 * self.frobenius2
        out = []
        for head in (lo_h, hi_h, self.singular_values):
            t2 = self.frobenius2 - float((head**2).sum())
            for t in (max(0.0, t2 - slack), max(0.0, t2 + slack)):
                for tail in self._extreme_tails(head, t):
                    sv = torch.cat([head, tail])
                    if float(sv.sum()) > 0:
                        out.append(float(_m.rankme(sv, eps)))
        # A cluster straddling the cut (the last computed values and the tail all equal) is the most
        # spread spectrum of all; it is consistent when one level lies inside every merged value's
        # residual range. Merging j of the last head values into a flat tail covers it.
        k, m = self.singular_values.numel(), self._tail_count()
        for j in range(1, k):
            head = self.singular_values[: k - j]
            rest = self.frobenius2 - float((head**2).sum())
            level = math.sqrt(max(rest, 0.0) / (m + j)) if m + j > 0 else 0.0
            if not bool(((lo_h[k - j:] <= level * (1 + 1e-12)) & (level <= hi_h[k - j:] * (1 + 1e-12))).all()):
                break  # the level moved outside a merged value's range: so will every larger j
            sv = torch.cat([head, torch.full((m + j,), level, dtype=F64)])
            out.append(float(_m.rankme(sv, eps)))
        # the evaluation of RankMe itself rounds: never claim more than ~1e-12 relative
        return min(out) * (1 - 1e-12), max(out) * (1 + 1e-12)

    def effective_rank(self) -> float:
        return self.rankme(0.0)

    def stable_rank(self) -> float:
        """Σσ²/σ_1²: exact numerator, σ_1 from the top Ritz value."""
        return self.frobenius2 / float(self.singular_values[0]) ** 2

    def nesum(self) -> float:
        """Σλ/λ_1 (the same ratio as stable rank, from the exact trace)."""
        return self.stable_rank()

    def participation_ratio(self) -> float:
        """(Σλ)²/Σλ²: exact trace; Σλ² = Σ_top θ² + the quadrature of the tail (slq only)."""
        if self.method != "slq":
            raise ValueError(f"participation_ratio needs the whole spectrum: use method='slq' or an exact method "
                             f"(this spectrum is {self.method!r}, top-{self.singular_values.numel()} only)")
        q = self.quadrature
        lam2 = float((q.weights * q.nodes**2).sum(1).mean())
        return self.frobenius2**2 / lam2

    def _unsupported(self, name: str):
        raise ValueError(f"{name} needs every singular value: use an exact method (method='gram' or 'svd'); "
                         f"this spectrum is {self.method!r}")

    def collapse_auc(self):
        self._unsupported("collapse_auc")

    def alpha_req(self, index_range: tuple = (5, 100)):
        first, last = index_range
        if last > self.singular_values.numel():
            raise ValueError(f"alpha_req over {index_range} needs the top {last} singular values; this "
                             f"{self.method!r} spectrum has {self.singular_values.numel()} (raise k)")
        return float(_m.alpha_req(self.singular_values, index_range))

    def __repr__(self) -> str:
        return (f"ApproxSpectrum(method={self.method!r}, k={self.singular_values.numel()}, N={self.n_rows}, "
                f"d={self.n_features}, centered={self.centered}, passes={self.passes}, converged={self.converged})")


