"""Approximate spectra for large d: randomized SVD, block Lanczos, stochastic Lanczos quadrature.

All three work with the d×d normal operator G = VᵀV (V = Z, or Z − 1μᵀ when centred) through
``G W = Vᵀ(V W)`` (:class:`NormalOperator`, the fused one-pass kernel on CPU), never forming G. The
exact Frobenius mass Σσ² = tr G comes from one extra float64 pass.

``randomized``  Halko–Martinsson–Tropp: Gaussian start (k + oversample columns), ``power_iters``
                normalised power iterations (QR after each), Rayleigh–Ritz. Ritz values are lower
                bounds of the top eigenvalues; residuals ‖G u − θ u‖ bound their distance to
                eigenvalues of G.
``lanczos``     block Lanczos with full reorthogonalisation until the top-k residuals fall below
                ``tol``·θ_1 (or ``max_iters`` blocks); the residual report comes with the result.
``slq``         stochastic Lanczos quadrature with deflation: the top ``deflate`` eigenpairs come from
                block Lanczos and are counted exactly; Rademacher probes projected onto their
                orthogonal complement each run ``steps`` Lanczos steps, whose Ritz values θ and squared
                first eigenvector components τ form a quadrature rule, tr h(G) ≈ Σ_top h(λ) +
                mean_probes Σ τ h(θ). RankMe uses the same nodes twice: S = tr G^{1/2} = ‖σ‖₁, then
                tr h_S(G) with h_S(λ) = −(√λ/S + ε) log(√λ/S + ε). The interval is a percentile
                bootstrap over the probes (95%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import metrics as _m
from .backends import cpu as _cpu
from .backends import torch_ref as _torch_ref
from .gram import _column_means

APPROX_METHODS = ("randomized", "lanczos", "slq")
F64 = torch.float64
_EMPTY = torch.zeros(0, dtype=F64)


class NormalOperator:
    """W ↦ G W = Vᵀ(V W) for the (N, d) embeddings ``x`` (V = x − 1μᵀ when ``center``), float64 out.

    ``single_precision``: the native kernel's float32 blocks (fast; ~1e-7·‖G‖ operator error, enough for
    the top of the spectrum); otherwise float64 throughout (what quadrature over the whole spectrum
    needs: a float32 operator puts a noise floor near 1e-7·λ_1 under every eigenvalue).
    """

    def __init__(self, x: torch.Tensor, *, center: bool, single_precision: bool = False):
        self.n_rows, self.n_features = x.shape
        self.center = center
        mu = _column_means(x) if center else None
        # Work in the smaller space: for N < d the N×N operator V Vᵀ has the same non-zero spectrum and
        # no d − N structural zeros for the quadrature to average over. (A centred N < d operator
        # materialises V in float64: N·d values, fewer than the d² a d×d Gram would take.)
        self.transposed = self.n_rows < self.n_features
        if self.transposed:
            v = (x.to(torch.float64) - mu) if center else x
            self.x, self.mu = v.T, None
        else:
            self.x, self.mu = x, mu
        self.d = self.x.shape[1]
        self.single_precision = single_precision
        self.native = x.device.type == "cpu" and _cpu.available(x.device)[0]
        self.passes = 0

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        if self.native:
            return _cpu.normal_apply(self.x, w, col_shift=self.mu, single_precision=self.single_precision)
        return _torch_ref.normal_apply(self.x, w.to(self.x.device), col_shift=self.mu).to(w.device)

    def trace(self) -> float:
        """tr G = Σ_r ‖v_r‖² = Σσ², exactly in float64 (one pass)."""
        self.passes += 1
        total = 0.0
        step = max(1, (1 << 22) // max(self.d, 1))
        for r0 in range(0, self.x.shape[0], step):
            v = self.x[r0 : r0 + step].to(F64)
            if self.mu is not None:
                v = v - self.mu
            total += float((v * v).sum())
        return total


def _orth(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(w).Q


def _ritz(q: torch.Tensor, y: torch.Tensor):
    """Rayleigh–Ritz in span(q) given y = G q: (θ desc, vectors in R^d, residual norms)."""
    b = q.T @ y
    theta, s = torch.linalg.eigh((b + b.T) / 2)
    theta, s = theta.flip(0), s.flip(1)
    u = q @ s
    res = torch.linalg.vector_norm(y @ s - u * theta, dim=0)
    return theta, u, res


@dataclass
class TopK:
    eigenvalues: torch.Tensor  # θ_1 ≥ … ≥ θ_k of G (float64, CPU)
    vectors: torch.Tensor  # (d, k)
    residuals: torch.Tensor  # ‖G u_i − θ_i u_i‖
    passes: int
    converged: bool


def randomized_topk(op: NormalOperator, k: int, *, oversample: int = 10, power_iters: int = 2,
                    seed: int = 0) -> TopK:
    """Halko–Martinsson–Tropp top-k eigenpairs of G (normalised power iterations)."""
    d = op.d
    ell = min(d, k + oversample)
    g = torch.Generator().manual_seed(seed)
    q = _orth(torch.randn(d, ell, generator=g, dtype=F64))
    for _ in range(power_iters):
        q = _orth(op.apply(q))
    y = op.apply(q)
    theta, u, res = _ritz(q, y)
    return TopK(theta[:k].clamp_min(0), u[:, :k], res[:k], op.passes, True)


def lanczos_topk(op: NormalOperator, k: int, *, block: Optional[int] = None, tol: float = 1e-6,
                 max_iters: Optional[int] = None, seed: int = 0) -> TopK:
    """Block Lanczos (full reorthogonalisation) until ‖G u_i − θ_i u_i‖ ≤ tol·θ_1 for i ≤ k."""
    d = op.d
    b = min(d, block or max(k, 8))
    max_iters = max_iters or max(4, min(60, -(-d // b)))
    g = torch.Generator().manual_seed(seed)
    qs = [_orth(torch.randn(d, b, generator=g, dtype=F64))]
    ys = []
    beta = None
    converged = False
    theta = u = res = None
    for it in range(max_iters):
        qj = qs[-1]
        y = op.apply(qj)
        ys.append(y)
        basis = torch.cat(qs, 1)
        theta, u, res = _ritz(basis, torch.cat(ys, 1))
        kk = min(k, theta.numel())
        if kk == k and bool((res[:k] <= tol * max(float(theta[0]), 1e-300)).all()):
            converged = True
            break
        if basis.shape[1] + b > d:  # the Krylov space is the whole space: Ritz pairs are exact
            converged = True
            break
        w = y - basis @ (basis.T @ y)
        w = w - basis @ (basis.T @ w)  # twice is enough
        qn, beta = torch.linalg.qr(w)
        if float(torch.linalg.matrix_norm(beta)) <= 1e-14 * max(float(theta[0]), 1e-300):
            converged = True  # invariant subspace found
            break
        # On a rank-deficient block (collapsed data) Householder QR completes Q with arbitrary unit
        # vectors that need not be orthogonal to the basis: orthogonalise again and re-QR.
        for _ in range(2):
            qn = qn - basis @ (basis.T @ qn)
            qn = torch.linalg.qr(qn).Q
        qs.append(qn)
    k = min(k, theta.numel())
    return TopK(theta[:k].clamp_min(0), u[:, :k], res[:k], op.passes, converged)


@dataclass
class Quadrature:
    """Per-probe quadrature rules for tr h(G): nodes θ (P, n), weights τ (P, n), and the rule of the first
    ⌈m/2⌉ Lanczos steps (``half_nodes``/``half_weights``): the change between the two estimates the
    quadrature error, which the probe bootstrap cannot see. Deflated pairs appear in every probe's rule
    as extra nodes with negative weights (see :func:`slq_quadrature`)."""
    nodes: torch.Tensor
    weights: torch.Tensor
    half_nodes: torch.Tensor
    half_weights: torch.Tensor


def default_probes(dim: int) -> int:
    """Probe count for an operator of size ``dim``: the Hutchinson variance of a spread-out spectrum falls
    like 1/(probes·dim), so probes·dim ≈ 2^17 (8 probes at dim ≥ 16384, up to 64 for small problems,
    where probes cost little)."""
    return int(min(64, max(8, -(-(1 << 17) // max(dim, 1)))))


def default_steps(n_rows: int, dim: int) -> int:
    """Lanczos steps per probe: 60 where one operator pass is costly (N·D ≥ 2^26), else 150 (passes are
    cheap there, and the extra steps resolve smooth, widely spread spectra — exponential decay over the
    whole range — to well under 1%); never more than D."""
    return int(min(dim, 60 if n_rows * dim >= (1 << 26) else 150))


def _block_lanczos_probes(op: NormalOperator, q: torch.Tensor, m: int):
    """Independent Lanczos recurrences for the unit columns of ``q`` (d, P), advanced together (one operator
    pass per step), each fully reorthogonalised (twice) against its own basis. Returns (alphas, betas, qs,
    ws): per-step coefficient rows (P,), and the Lanczos vectors and their images G q as (P, steps, d)."""
    d, probes = q.shape
    qs = torch.zeros(probes, m, d, dtype=F64)
    ws = torch.zeros(probes, m, d, dtype=F64)
    prev = torch.zeros_like(q)
    beta = torch.zeros(probes, dtype=F64)
    alive = torch.ones(probes, dtype=torch.bool)
    alphas, betas = [], []
    for j in range(m):
        qs[:, j] = q.T
        gq = op.apply(q)
        ws[:, j] = gq.T
        a = (q * gq).sum(0)
        w = (gq - q * a - prev * beta).T.unsqueeze(2)  # (P, d, 1)
        basis = qs[:, : j + 1]  # (P, j+1, d)
        for _ in range(2):  # twice is enough
            w = w - basis.transpose(1, 2) @ (basis @ w)
        w = w.squeeze(2).T
        alphas.append(a * alive)
        bn = torch.linalg.vector_norm(w, dim=0)
        # a breakdown (invariant subspace) ends that probe's recurrence: later steps add nothing
        alive = alive & (bn > 1e-12 * a.abs().clamp_min(1e-300))
        if j == m - 1 or not bool(alive.any()):
            break
        betas.append(bn * alive)
        prev, q = q, torch.where(alive, w / bn.clamp_min(1e-300), torch.zeros_like(w))
        beta = bn * alive
    n = len(alphas)
    return alphas, betas, qs[:, :n], ws[:, :n]


def _union_ritz(qs, ws, max_cols: int = 512):
    """Rayleigh–Ritz of G on the span of the Lanczos vectors ``qs`` (P, steps, d) (images G q in ``ws``),
    probe by probe up to ``max_cols`` columns. The spans overlap where the top eigenvectors have converged,
    so the union is orthonormalised through its SVD, dropping directions below 1e-8 of the largest."""
    probes, steps, d = qs.shape
    n_p = max(1, min(probes, max_cols // max(steps, 1)))
    q = qs[:n_p].reshape(-1, d).T  # (d, n_p·steps)
    w = ws[:n_p].reshape(-1, d).T
    live = torch.linalg.vector_norm(q, dim=0) > 0  # recurrences that broke down left zero columns
    q, w = q[:, live], w[:, live]
    try:
        _, sv, vh = torch.linalg.svd(q, full_matrices=False)
        v = vh.T
    except torch.linalg.LinAlgError:  # LAPACK's gesdd can fail to converge on highly repeated values
        s2, v = torch.linalg.eigh(q.T @ q)
        sv, v = s2.clamp_min(0).sqrt().flip(0), v.flip(1)
    keep = sv > 1e-8 * float(sv[0])
    c = v[:, keep] / sv[keep]
    return _ritz(q @ c, w @ c)


def _converged(theta, res, limit: int, tol: float) -> int:
    """Length of the leading run of Ritz pairs with residual ≤ tol·θ_1 (at most ``limit``)."""
    good = (res <= tol * max(float(theta[0]), 1e-300)) & (theta > 0)
    return int(min(limit, int(torch.cumprod(good.to(torch.int64), 0).sum())))


def slq_quadrature(op: NormalOperator, *, probes: int = 8, steps: int = 60, deflate: int = 64,
                   deflate_tol: float = 1e-6, seed: int = 0):
    """Stochastic Lanczos quadrature, deflated with eigenpairs from the probes' own Krylov spaces.

    Rademacher probes z_p (‖z‖² = D) each run ``steps`` Lanczos steps on G, giving the Gauss rule
    zᵀ h(G) z ≈ D Σ_j τ_pj h(θ_pj). The probes are split in two halves; Rayleigh–Ritz on the union of one
    half's Krylov spaces gives eigenpairs (θ_i, u_i), and up to ``deflate`` of them with residual ≤
    ``deflate_tol``·θ_1 serve as a control variate for the probes of the *other* half (so u_i does not
    depend on the probe it corrects): for an invariant subspace U,
        tr h(G) = Σ_i h(λ_i) + E[z⊥ᵀ h(G) z⊥],   z⊥ᵀ h(G) z⊥ = zᵀ h(G) z − Σ_i (u_iᵀz)² h(λ_i),
    so each probe's rule gains the nodes θ_i with weights 1 − (u_iᵀz)², and tr h(G) ≈ mean_p(rule_p) — in
    Girard's normalised form: the complement part is scaled by (D − k)/‖z⊥‖², exact for a flat tail.
    That has the variance of deflating first, without separate block-Lanczos passes. Returns
    (Quadrature, TopK): the top pairs from the union of all probes' spaces (reported, not used above).
    """
    d = op.d
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randint(0, 2, (d, probes), generator=g).to(F64) * 2 - 1
    m = max(1, min(steps, d))
    alphas, betas, qs, ws = _block_lanczos_probes(op, z / math.sqrt(d), m)
    halves = (torch.arange(0, (probes + 1) // 2), torch.arange((probes + 1) // 2, probes))
    cv = []  # per half: (θ, weights (k, P) = 1 − (u_iᵀ z_p)²), applied to the other half's probes
    for h in halves:
        theta, u, res = _union_ritz(qs[h], ws[h])
        n = _converged(theta, res, deflate, deflate_tol)
        c = (u[:, :n].T @ z) ** 2  # (k, P): (u_iᵀ z_p)²
        # Girard's normalisation in the complement: the (d − k)-dimensional part of each probe is rescaled
        # to its expected squared length, exact for a flat tail (z⊥ᵀ h z⊥ / ‖z⊥‖² · (d − k))
        scale = (d - n) / (d - c.sum(0)).clamp_min(1e-300)
        cv.append((theta[:n].clamp_min(0), 1 - c * scale, scale))
    theta, u, res = _union_ritz(qs, ws)
    n_top = _converged(theta, res, deflate, deflate_tol)
    top = TopK(theta[:n_top].clamp_min(0), u[:, :n_top], res[:n_top], op.passes, True)
    steps_done = len(alphas)
    width = max(c[0].numel() for c in cv)

    def rule(n_steps):
        nodes = torch.zeros(probes, n_steps + width, dtype=F64)
        weights = torch.zeros(probes, n_steps + width, dtype=F64)
        for p in range(probes):
            al = torch.stack([a[p] for a in alphas[:n_steps]])
            be = torch.stack([b[p] for b in betas[: n_steps - 1]]) if n_steps > 1 else torch.zeros(0, dtype=F64)
            n_live = n_steps  # a recurrence that stopped early: keep only its live part
            if be.numel() and bool((be == 0).any()):
                n_live = int((be == 0).nonzero()[0, 0]) + 1
            t = torch.diag(al[:n_live])
            if n_live > 1:
                t = t + torch.diag(be[: n_live - 1], 1) + torch.diag(be[: n_live - 1], -1)
            th, sv = torch.linalg.eigh(t)
            nodes[p, :n_live] = th.clamp_min(0)
            th_cv, w_cv, scale = cv[1] if p < halves[0].numel() else cv[0]
            weights[p, :n_live] = sv[0] ** 2 * d * scale[p]  # ‖z‖² = d for Rademacher probes
            nodes[p, n_steps : n_steps + th_cv.numel()] = th_cv
            weights[p, n_steps : n_steps + th_cv.numel()] = w_cv[:, p]
        return nodes, weights

    nodes, weights = rule(steps_done)
    half_nodes, half_weights = rule(max(1, (steps_done + 1) // 2))
    return Quadrature(nodes, weights, half_nodes, half_weights), top


# ------------------------------------------------------------------------------------------------
# metric estimates


def _rankme_from_parts(head_sv: torch.Tensor, tail_sum, tail_h, eps: float):
    """RankMe given the head singular values and functionals of the tail. ``tail_sum`` is Σ_tail σ and
    ``tail_h(S)`` returns Σ_tail h_S(σ²) for the normaliser S."""
    s = float(head_sv.sum()) + float(tail_sum)
    p = head_sv / s + eps
    ent = float(-(p * torch.log(p.clamp_min(1e-300))).sum()) + float(tail_h(s))
    return math.exp(ent)


def _check_eps(eps: float) -> None:
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


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

    def _slq_tail(self, eps: float, probes: Optional[torch.Tensor] = None, half: bool = False,
                  floor: Optional[str] = None):
        """(Σ σ, h ↦ Σ h) from the quadrature, over all D eigenvalues of the operator minus its D − K
        structural zeros. ``floor``: "up" / "down" moves every node by the operator's resolution floor
        (the two ends of what a float64 operator can tell apart)."""
        q = self.quadrature
        idx = probes if probes is not None else torch.arange(q.nodes.shape[0])
        nodes, w = (q.half_nodes, q.half_weights) if half else (q.nodes, q.weights)
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

    def _resolution_floor(self) -> float:
        """The float64 operator's absolute eigenvalue resolution, ~ D·ε₆₄·λ_1: every computed eigenvalue
        is known only to within it (eigenvalues below it are indistinguishable from 0)."""
        dim = self.operator_dim or self.n_features
        lam1 = max(float(self.quadrature.nodes.max()), float(self.singular_values[0]) ** 2 if
                   self.singular_values.numel() else 0.0)
        return 8.0 * dim * 2.0**-52 * lam1

    # -- metrics -----------------------------------------------------------------------------
    def rankme(self, eps: float = _m.RANKME_EPS) -> float:
        """Point estimate of RankMe (see :meth:`rankme_interval` for its range)."""
        _check_eps(eps)
        if self.method == "slq":
            return _rankme_from_parts(_EMPTY, *self._slq_tail(eps), eps)
        lo, hi = self.rankme_interval(eps)
        return math.sqrt(lo * hi)

    def _head_range(self):
        """Each computed θ_i has an eigenvalue of G within its residual: σ_i ∈ [√(θ−r), √(θ+r)]."""
        lam = self.singular_values**2
        r = self.residuals.to(F64)
        return (lam - r).clamp_min(0).sqrt(), (lam + r).sqrt()

    def rankme_interval(self, eps: float = _m.RANKME_EPS, *, level: float = 0.95, n_boot: int = 400) -> tuple:
        """randomized / lanczos: (lower, upper) of RankMe over the computed head moved within its
        residual bounds and the two extreme tails consistent with it and the exact Frobenius mass
        (flat, or concentrated at σ_k). slq: a percentile bootstrap over the probes, widened by the
        quadrature-error estimate (full rule vs the half-length rule) and by the operator's resolution
        floor (every eigenvalue moved by ±D·ε₆₄·λ_1)."""
        _check_eps(eps)
        lo_h, hi_h = self._head_range()
        if self.method == "slq":
            g = torch.Generator().manual_seed(12345)
            n = self.quadrature.nodes.shape[0]
            vals = []
            for _ in range(n_boot):
                idx = torch.randint(0, n, (n,), generator=g)
                vals.append(_rankme_from_parts(_EMPTY, *self._slq_tail(eps, idx), eps))
            v = torch.tensor(vals, dtype=F64)
            a = (1 - level) / 2
            lo, hi = float(torch.quantile(v, a)), float(torch.quantile(v, 1 - a))
            est = self.rankme(eps)
            quad_err = abs(est - _rankme_from_parts(_EMPTY, *self._slq_tail(eps, half=True), eps))
            ends = [_rankme_from_parts(_EMPTY, *self._slq_tail(eps, floor=f), eps) for f in ("down", "up")]
            # (and the evaluation of RankMe itself rounds: never claim more than ~1e-12 relative)
            return (min(lo, est, *ends) - quad_err) * (1 - 1e-12), (max(hi, est, *ends) + quad_err) * (1 + 1e-12)
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


def approx_spectrum(x: torch.Tensor, *, method: str, center: bool, k: Optional[int] = None, seed: int = 0,
                    oversample: int = 10, power_iters: int = 2, tol: float = 1e-6, probes: Optional[int] = None,
                    steps: Optional[int] = None, deflate: Optional[int] = None, deflate_tol: float = 1e-6,
                    rtol: Optional[float] = None) -> ApproxSpectrum:
    """Approximate spectrum of a validated (N, d) tensor by ``method`` (see module docstring)."""
    if method not in APPROX_METHODS:
        raise ValueError(f"method must be one of {APPROX_METHODS}, got {method!r}")
    n, d = x.shape
    kmax = min(n, d)
    if k is None:
        k = min(kmax, 32 if method != "slq" else 0)
    if not isinstance(k, int) or k < 0 or k > kmax or (k == 0 and method != "slq"):
        raise ValueError(f"k must be an int in {'0' if method == 'slq' else '1'}..min(N, d)={kmax}, got {k!r}")
    for name, val, lo in (("probes", 8 if probes is None else probes, 2), ("steps", 60 if steps is None else steps, 1), ("oversample", oversample, 0),
                          ("power_iters", power_iters, 0)):
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    op = NormalOperator(x, center=center)
    d = op.d
    frob2 = op.trace()
    if not math.isfinite(frob2):
        raise ValueError("x: the data are not finite or their squares overflow float64")
    if frob2 == 0.0:
        raise ValueError("x: all singular values are zero; the spectral metrics are undefined")
    quad = None
    if method == "randomized":
        top = randomized_topk(op, k, oversample=oversample, power_iters=power_iters, seed=seed)
    elif method == "lanczos":
        top = lanczos_topk(op, k, tol=tol, seed=seed)
    else:
        kd = deflate if deflate is not None else kmax  # every converged pair
        steps = steps or default_steps(op.x.shape[0], d)
        quad, top = slq_quadrature(op, probes=probes or default_probes(d), steps=steps, deflate=kd,
                                   deflate_tol=deflate_tol, seed=seed)
    sv = top.eigenvalues.clamp_min(0).sqrt()
    return ApproxSpectrum(sv, frob2, n, x.shape[1], center, method, top.residuals, top.converged, op.passes,
                          quad, operator_dim=op.d, rtol=rtol)
