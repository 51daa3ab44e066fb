"""Approximate spectra for large d: randomized SVD, block Lanczos, stochastic Lanczos quadrature.

All three work with the d×d normal operator G = VᵀV (V = Z, or Z − 1μᵀ when centred) through
``G W = Vᵀ(V W)`` (:class:`NormalOperator`: the fused one-pass kernel, C++ on CPU and Triton on CUDA),
never forming G. The
exact Frobenius mass Σσ² = tr G comes from one extra float64 pass.

``randomized``  Halko–Martinsson–Tropp: Gaussian start (k + oversample columns), ``power_iters``
                normalised power iterations (QR after each), Rayleigh–Ritz. Ritz values are lower
                bounds of the top eigenvalues; residuals ‖G u − θ u‖ bound their distance to
                eigenvalues of G.
``lanczos``     block Lanczos with full reorthogonalisation until the top-k residuals fall below
                ``tol``·θ_1 (or ``max_iters`` blocks); the residual report comes with the result.
``slq``         stochastic Lanczos quadrature in two phases (:func:`slq_quadrature`): a few block
                Lanczos steps from random starts find the top eigenpairs, which are counted exactly
                (deflation); then Rademacher probes in their orthogonal complement (``probes``; default
                by size, :func:`default_probes`) run ``steps`` Lanczos steps on the deflated operator,
                all probes as one block (one operator pass per step). Each probe's Ritz values θ and
                squared first eigenvector components τ form a Gauss rule. RankMe uses the same nodes
                twice: S = tr G^{1/2} = ‖σ‖₁, then tr h_S(G) with h_S(λ) = −(√λ/S + ε) log(√λ/S + ε);
                the Gauss values after m − 2h, m − h and m steps are extrapolated (Aitken's Δ²). The
                interval is a percentile bootstrap over the probes (95%) spread around everything from
                the Gauss value to its extrapolation, and the operator's rounding floor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .backends import cpu as _cpu
from .backends import torch_ref as _torch_ref
from .backends import triton_gpu as _triton
from ._inputs import check_all_finite
from ._threads import dense_step
from .gram import _column_means
from .spectrum import ApproxSpectrum, Quadrature  # noqa: F401 - the value types live in spectrum.py

APPROX_METHODS = ("randomized", "lanczos", "slq")
F64 = torch.float64


class NormalOperator:
    """W ↦ G W = Vᵀ(V W) for the (N, d) embeddings ``x`` (V = x − 1μᵀ when ``center``), float64 out:
    the fused kernel of the tensor's device (C++ on CPU, Triton on CUDA), else torch in float64.

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
        self.triton = x.device.type == "cuda" and _triton.available(x.device)[0]
        self.passes = 0

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """G w for a (d, k) float64 CPU block (the result is a float64 CPU block too)."""
        self.passes += 1
        if self.native:
            return _cpu.normal_apply(self.x, w, col_shift=self.mu, single_precision=self.single_precision)
        if self.triton:
            return _triton.normal_apply(self.x, w.to(self.x.device), col_shift=self.mu,
                                        single_precision=self.single_precision).to(w.device)
        return _torch_ref.normal_apply(self.x, w.to(self.x.device), col_shift=self.mu).to(w.device)

    def trace(self) -> float:
        """tr G = Σ_r ‖v_r‖² = Σσ², exactly in float64 (one pass; non-finite data give a non-finite sum)."""
        self.passes += 1
        if self.native:
            return _cpu.sum_squares(self.x, col_shift=self.mu)
        total = 0.0
        step = max(1, (1 << 22) // max(self.d, 1))
        for r0 in range(0, self.x.shape[0], step):
            v = self.x[r0 : r0 + step].to(F64)
            if self.mu is not None:
                v = v - self.mu
            total += float((v * v).sum())
        return total


def _orth(w: torch.Tensor) -> torch.Tensor:
    with dense_step(w):
        return torch.linalg.qr(w).Q


def _ritz(q: torch.Tensor, y: torch.Tensor):
    """Rayleigh–Ritz in span(q) given y = G q: (θ desc, vectors in R^d, residual norms)."""
    with dense_step(q):  # small dense steps: one thread unless large (_threads.py)
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
                    seed: int = 0, tol: float = 1e-6) -> TopK:
    """Halko–Martinsson–Tropp top-k eigenpairs of G (normalised power iterations). ``converged`` says
    whether the top-k residuals met ‖G u_i − θ_i u_i‖ ≤ tol·θ_1 (a fixed iteration count guarantees
    nothing: on a slowly decaying spectrum θ_1 can be several % low after 2 power iterations)."""
    d = op.d
    ell = min(d, k + oversample)
    g = torch.Generator().manual_seed(seed)
    q = _orth(torch.randn(d, ell, generator=g, dtype=F64))
    for _ in range(power_iters):
        q = _orth(op.apply(q))
    y = op.apply(q)
    theta, u, res = _ritz(q, y)
    converged = bool((res[:k] <= tol * max(float(theta[0]), 1e-300)).all())
    return TopK(theta[:k].clamp_min(0), u[:, :k], res[:k], op.passes, converged)


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
        if basis.shape[1] >= d:  # the Krylov space is the whole space: Ritz pairs are exact
            converged = True
            break
        with dense_step(basis):
            w = y - basis @ (basis.T @ y)
            w = w - basis @ (basis.T @ w)  # twice is enough
            qn, beta = torch.linalg.qr(w)
        if float(torch.linalg.matrix_norm(beta)) <= 1e-14 * max(float(theta[0]), 1e-300):
            converged = True  # invariant subspace found
            break
        # On a rank-deficient block (collapsed data) Householder QR completes Q with arbitrary unit
        # vectors that need not be orthogonal to the basis: orthogonalise again and re-QR.
        for _ in range(2):
            with dense_step(basis):
                qn = qn - basis @ (basis.T @ qn)
                qn = torch.linalg.qr(qn).Q
        qs.append(qn[:, : d - basis.shape[1]])  # a last, narrower block completes the space
    k = min(k, theta.numel())
    return TopK(theta[:k].clamp_min(0), u[:, :k], res[:k], op.passes, converged)


def default_probes(dim: int, n_rows: Optional[int] = None) -> int:
    """Probe count for an operator of size ``dim``: the Hutchinson variance of a spread-out spectrum falls
    like 1/(probes·dim), so probes·dim ≈ 2^17 (8 probes at dim ≥ 16384, up to 64 for small problems,
    where probes cost little). Given ``n_rows`` on a large problem (N·D ≥ 2^26, where every pass is
    costly), the count is also capped so the passes cost no more than the exact Gram's ~N·D·D flops
    (each of the m Lanczos steps costs ~4·N·D·probes), but never below 8."""
    p = int(min(64, max(8, -(-(1 << 17) // max(dim, 1)))))
    if n_rows is not None and n_rows * dim >= (1 << 26):
        m1, m2 = default_steps(n_rows, dim)
        p = min(p, max(8, dim // (4 * (m1 + m2 + 1))))
    return p


def default_steps(n_rows: int, dim: int) -> tuple:
    """(deflation steps, quadrature steps) per probe: (20, 40) where one operator pass is costly
    (N·D ≥ 2^26), else (150, 150) — passes are cheap there: the deflation then resolves most of a small
    spectrum exactly and the quadrature the rest of smooth, widely spread ones (exponential decay over the
    whole range) to well under 1%; never more than D."""
    big = n_rows * dim >= (1 << 26)
    return int(min(dim, 20 if big else 150)), int(min(dim, 40 if big else 150))


def _block_lanczos_probes(op: NormalOperator, q: torch.Tensor, m: int, basis: Optional[torch.Tensor] = None,
                          images: bool = True):
    """Independent Lanczos recurrences for the unit columns of ``q`` (d, P), advanced together (one operator
    pass per step), each fully reorthogonalised (twice) against its own basis and, when ``basis`` (d, k)
    is given, run on the deflated operator (I − UUᵀ) G (I − UUᵀ). Returns (alphas, betas, qs, ws):
    per-step coefficient rows (P,), and the Lanczos vectors and their images as (P, steps, d) (images:
    None unless ``images``)."""
    d, probes = q.shape
    qs = torch.zeros(probes, m, d, dtype=F64)
    ws = torch.zeros(probes, m, d, dtype=F64) if images else None
    prev = torch.zeros_like(q)
    beta = torch.zeros(probes, dtype=F64)
    alive = torch.ones(probes, dtype=torch.bool)
    alphas, betas = [], []

    def proj(w):
        if basis is not None and basis.shape[1]:
            with dense_step(basis):  # small products on torch's spinning team were 5.7x slower all-busy
                for _ in range(2):
                    w = w - basis @ (basis.T @ w)
        return w

    for j in range(m):
        qs[:, j] = q.T
        gq = proj(op.apply(q))
        if images:
            ws[:, j] = gq.T
        a = (q * gq).sum(0)
        w = (gq - q * a - prev * beta).T.unsqueeze(2)  # (P, d, 1)
        vs = qs[:, : j + 1]  # (P, j+1, d)
        with dense_step(vs):  # small batched products: one thread (_threads.py)
            for _ in range(2):  # twice is enough
                w = w - vs.transpose(1, 2) @ (vs @ w)
            w = proj(w.squeeze(2).T)
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
    return alphas, betas, qs[:, :n], ws[:, :n] if images else None


def _union_ritz(qs, ws, max_cols: int = 512):
    """Rayleigh–Ritz of G on the span of the Lanczos vectors ``qs`` (P, steps, d) (images G q in ``ws``),
    probe by probe up to ``max_cols`` columns. The spans overlap where the top eigenvectors have converged,
    so the union is orthonormalised through the eigendecomposition of its Gram matrix, dropping directions
    below 1e-6 of the largest singular value (the eigenvalues of QᵀQ are rounded at ~1e-16)."""
    probes, steps, d = qs.shape
    n_p = max(1, min(probes, max_cols // max(steps, 1)))
    q = qs[:n_p].reshape(-1, d).T  # (d, n_p·steps)
    w = ws[:n_p].reshape(-1, d).T
    live = torch.linalg.vector_norm(q, dim=0) > 0  # recurrences that broke down left zero columns
    q, w = q[:, live], w[:, live]
    with dense_step(q):
        s2, v = torch.linalg.eigh(q.T @ q)
        keep = s2 > 1e-12 * float(s2[-1])
        c = v[:, keep] / s2[keep].sqrt()
        qc, wc = q @ c, w @ c
    return _ritz(qc, wc)


def _converged(theta, res, limit: int, tol: float) -> int:
    """Length of the leading run of Ritz pairs with residual ≤ tol·θ_i (each accurate relative to its
    own size: a small eigenvalue counted exactly must be right, not just small; at most ``limit``)."""
    good = (res <= tol * theta) & (theta > 0)
    return int(min(limit, int(torch.cumprod(good.to(torch.int64), 0).sum())))


def _gauss_rule(alphas, betas, p: int, n_steps: int):
    """Nodes and weights (squared first eigenvector components) of probe p's first n_steps Lanczos
    steps; a recurrence that stopped early keeps only its live part."""
    al = torch.stack([a[p] for a in alphas[:n_steps]])
    be = torch.stack([b[p] for b in betas[: n_steps - 1]]) if n_steps > 1 else torch.zeros(0, dtype=F64)
    n_live = n_steps
    if be.numel() and bool((be == 0).any()):
        n_live = int((be == 0).nonzero()[0, 0]) + 1
    t = torch.diag(al[:n_live])
    if n_live > 1:
        t = t + torch.diag(be[: n_live - 1], 1) + torch.diag(be[: n_live - 1], -1)
    with dense_step(t):
        th, sv = torch.linalg.eigh(t)
    return th.clamp_min(0), sv[0] ** 2


def slq_quadrature(op: NormalOperator, *, probes: int = 8, steps: int = 40, deflate_steps: int = 20,
                   deflate: int = 512, deflate_tol: float = 1e-6, seed: int = 0):
    """Deflated stochastic Lanczos quadrature in two phases.

    1. Deflation: ``probes`` Gaussian start vectors run ``deflate_steps`` Lanczos steps (one block pass
       per step); Rayleigh–Ritz on the union of their Krylov spaces gives the top eigenpairs, and the
       leading ones with residual ≤ ``deflate_tol``·θ_i (at most ``deflate``) form U. They are counted
       exactly: tr h(G) = Σ_i h(θ_i) + tr h((I − UUᵀ) G (I − UUᵀ)) restricted to the complement.
    2. Quadrature: fresh Rademacher probes, projected onto the complement of U, run ``steps`` Lanczos
       steps on the deflated operator; each gives a Gauss rule (D − k)·Σ_j τ_j h(θ_j) (Girard's
       normalised estimator: unit probes in the (D − k)-dimensional complement, exact for a flat tail).
       All of phase 2's steps resolve the tail, none the head.
    The head enters every probe's rule as nodes θ_i with weight 1. Returns (Quadrature, TopK of U).
    """
    d = op.d
    g = torch.Generator().manual_seed(seed + 1)
    m1 = max(1, min(deflate_steps, d))
    start = torch.randn(d, probes, generator=g, dtype=F64)
    _, _, qs, ws = _block_lanczos_probes(op, start / torch.linalg.vector_norm(start, dim=0), m1)
    theta, u, res = _union_ritz(qs, ws)
    n_top = _converged(theta, res, deflate, deflate_tol)
    top = TopK(theta[:n_top].clamp_min(0), u[:, :n_top], res[:n_top], op.passes, True)
    basis = u[:, :n_top]
    dim = d - n_top
    z = torch.randint(0, 2, (d, probes), generator=g).to(F64) * 2 - 1
    with dense_step(basis):
        for _ in range(2):
            z = z - basis @ (basis.T @ z)
    norms = torch.linalg.vector_norm(z, dim=0)
    m = max(1, min(steps, dim))
    if dim == 0:  # the deflation captured the whole space
        alphas, betas = [torch.zeros(probes, dtype=F64)], []
    else:
        alphas, betas, _, _ = _block_lanczos_probes(op, z / norms.clamp_min(1e-300), m, basis, images=False)

    def rule(n_steps):
        nodes = torch.zeros(probes, n_steps + n_top, dtype=F64)
        weights = torch.zeros(probes, n_steps + n_top, dtype=F64)
        for p in range(probes):
            th, tau = _gauss_rule(alphas, betas, p, n_steps)
            nodes[p, : th.numel()] = th
            weights[p, : th.numel()] = tau * dim
            nodes[p, n_steps:] = top.eigenvalues
            weights[p, n_steps:] = 1.0
        return nodes, weights

    steps_done = len(alphas)
    h = steps_done // 4
    shorter = tuple(rule(steps_done - j * h) for j in (2, 1)) if h >= 1 else ()
    return Quadrature(*rule(steps_done), shorter), top


def approx_spectrum(x: torch.Tensor, *, method: str, center: bool, k: Optional[int] = None, seed: int = 0,
                    oversample: int = 10, power_iters: int = 2, tol: float = 1e-6, probes: Optional[int] = None,
                    steps: Optional[int] = None, deflate_steps: Optional[int] = None,
                    deflate: Optional[int] = None, deflate_tol: float = 1e-6,
                    rtol: Optional[float] = None) -> ApproxSpectrum:
    """Approximate spectrum of a validated (N, d) tensor by ``method`` (see module docstring).

    randomized: ``k`` (32), ``oversample``, ``power_iters``, ``seed``. lanczos: ``k``, ``tol`` (residual
    ≤ tol·θ_1). slq: ``probes`` (None: :func:`default_probes`), ``steps`` (None: :func:`default_steps`),
    ``deflate`` (at most this many converged pairs are deflated; None: all), ``deflate_tol``, ``seed``.
    """
    if method not in APPROX_METHODS:
        raise ValueError(f"method must be one of {APPROX_METHODS}, got {method!r}")
    n, d = x.shape
    kmax = min(n, d)
    if method == "slq" and k is not None:
        raise ValueError("k does not apply to method='slq' (it deflates every pair its first phase converges; "
                         "bound that with deflate=)")
    if k is None:
        k = min(kmax, 32)
    if not isinstance(k, int) or k < 1 or k > kmax:
        raise ValueError(f"k must be an int in 1..min(N, d)={kmax}, got {k!r}")
    for name, val, lo in (("probes", 8 if probes is None else probes, 2), ("steps", 60 if steps is None else steps, 1),
                          ("deflate_steps", 20 if deflate_steps is None else deflate_steps, 1), ("oversample", oversample, 0),
                          ("power_iters", power_iters, 0), ("deflate", 0 if deflate is None else deflate, 0)):
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    for name, val in (("tol", tol), ("deflate_tol", deflate_tol)):
        # a NaN tolerance would make every residual test false (run to max_iters, report "not converged")
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not (0.0 < float(val) < 1.0):
            raise ValueError(f"{name} must be a number in (0, 1) (residual ≤ {name}·θ), got {val!r}")
    op = NormalOperator(x, center=center)
    d = op.d
    frob2 = op.trace()
    if not math.isfinite(frob2):
        # the trace pass doubles as the finiteness check (squares of ≤ 32-bit values cannot overflow
        # float64): only now scan for the count and the first row of the non-finite values
        check_all_finite(x)
        raise ValueError("x: the squares of the data overflow float64")
    if frob2 == 0.0:
        raise ValueError("x: all singular values are zero; the spectral metrics are undefined")
    quad = None
    if method == "randomized":
        top = randomized_topk(op, k, oversample=oversample, power_iters=power_iters, seed=seed, tol=tol)
    elif method == "lanczos":
        top = lanczos_topk(op, k, tol=tol, seed=seed)
    else:
        kd = deflate if deflate is not None else kmax  # every converged pair
        m1, m2 = default_steps(op.x.shape[0], d)
        quad, top = slq_quadrature(op, probes=probes or default_probes(d, op.x.shape[0]), steps=steps or m2,
                                   deflate_steps=deflate_steps or m1, deflate=kd, deflate_tol=deflate_tol, seed=seed)
    sv = top.eigenvalues.clamp_min(0).sqrt()
    return ApproxSpectrum(sv, frob2, n, x.shape[1], center, method, top.residuals, top.converged, op.passes,
                          quad, operator_dim=op.d, rtol=rtol)
