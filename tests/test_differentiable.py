"""Differentiable RankMe (``differentiable=True``): values against the float64 SVD in NumPy, gradients
against an independent reference dM/dZ = Σ_k (∂M/∂σ_k) u_k v_kᵀ (u, v, σ from ``np.linalg.svd``, ∂M/∂σ
by central differences of a NumPy re-implementation of the metric, or in closed form), against
``torch.autograd.gradcheck`` and against finite differences of the non-differentiable exact path; at
repeated and at zero singular values; for bf16/float16/float32 leaves and (B, N, d) batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rankme_fast as rf

F64 = torch.float64
GEN = 20240531


def _rand(*shape, seed=0, dtype=F64, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=F64)
    # a decaying column scale keeps the singular values well separated (and the mean offset makes the
    # centred and uncentred spectra differ)
    z = z * torch.linspace(1.0, 0.3, shape[-1], dtype=F64) + offset
    return z.to(dtype)


# ------------------------------------------------------------------------------------------------
# NumPy references: each metric of DESIGN §2 as a function of the descending σ (no sorting, so the
# derivative in position k is the one for the order given; zeros allowed where the formula allows them)


def _exp_entropy(p):
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _np_alpha(s, lo=1, hi=4):
    i = np.arange(lo, hi + 1, dtype=np.float64)
    return float(np.polyfit(-np.log(i), np.log(s[lo - 1:hi] ** 2), 1)[0])


NP_METRICS = {
    "rankme": lambda s: _exp_entropy(s / s.sum() + 1e-7),
    "rankme-eps0.01": lambda s: _exp_entropy(s / s.sum() + 1e-2),
    "stable-pretraining": lambda s: _exp_entropy(s / s.sum() + 1e-5),
    "stable-pretraining-jax": lambda s: _exp_entropy(s / (s.sum() + 1e-7) + 1e-7),
    "reptrix": lambda s: _exp_entropy(s**2 / (s**2).sum() + 1e-7),
    "effective_rank": lambda s: _exp_entropy(s / s.sum()),
    "collapse_auc": lambda s: float(np.mean(np.cumsum(s) / s.sum())),
    "stable_rank": lambda s: float((s**2).sum() / s[0] ** 2),
    "participation_ratio": lambda s: float((s**2).sum() ** 2 / (s**4).sum()),
    "nesum": lambda s: float((s**2).sum() / s[0] ** 2),
    "alpha_req": _np_alpha,
}

RF_METRICS = {
    "rankme": lambda z, **kw: rf.rankme(z, **kw),
    "rankme-eps0.01": lambda z, **kw: rf.rankme(z, 1e-2, **kw),
    "stable-pretraining": lambda z, **kw: rf.rankme(z, convention="stable-pretraining", **kw),
    "stable-pretraining-jax": lambda z, **kw: rf.rankme(z, convention="stable-pretraining-jax", **kw),
    "reptrix": lambda z, **kw: rf.rankme(z, convention="reptrix", **kw),
    "effective_rank": lambda z, **kw: rf.effective_rank(z, **kw),
    "collapse_auc": lambda z, **kw: rf.collapse_auc(z, **kw),
    "stable_rank": lambda z, **kw: rf.stable_rank(z, **kw),
    "participation_ratio": lambda z, **kw: rf.participation_ratio(z, **kw),
    "nesum": lambda z, **kw: rf.nesum(z, **kw),
    "alpha_req": lambda z, **kw: rf.alpha_req(z, (1, 4), **kw),
}
METRICS = tuple(NP_METRICS)


def np_sv(z, center):
    x = np.asarray(z, dtype=np.float64)
    if center:
        x = x - x.mean(0)
    return np.linalg.svd(x, full_matrices=False)


def ref_value(z, name, center, zero_tol=0.0):
    _, s, _ = np_sv(z, center)
    return NP_METRICS[name](np.where(s > zero_tol * s[0], s, 0.0))


def ref_grad(z, name, center, zero_tol=1e-9, dsigma=None):
    """dM/dZ = Σ_{σ_k > zero_tol·σ_1} (∂M/∂σ_k) u_k v_kᵀ; the σ_k at or below it (exact zeros, up to
    rounding) get the subgradient 0. ∂M/∂σ: ``dsigma(s)`` if given, else central differences of the
    NumPy metric (step 1e-6·σ_1). Centring needs no projection: u_k ⟂ 1 for every σ_k > 0."""
    u, s, vt = np_sv(z, center)
    s = np.where(s > zero_tol * s[0], s, 0.0)
    live = np.nonzero(s)[0]
    if dsigma is not None:
        g = np.where(s > 0, dsigma(s), 0.0)
    else:
        g = np.zeros_like(s)
        h = 1e-6 * s[0]
        for k in live:
            sp, sm = s.copy(), s.copy()
            sp[k] += h
            sm[k] -= h
            g[k] = (NP_METRICS[name](sp) - NP_METRICS[name](sm)) / (2 * h)
    return (u * g) @ vt


def drankme_dsigma(s, eps=1e-7):
    """Closed form: R = exp(H), H = −Σ p log p, p_j = σ_j/S + ε, so
    ∂H/∂σ_k = −(log p_k + 1)/S + Σ_j (log p_j + 1) σ_j / S²,  ∂R/∂σ_k = R ∂H/∂σ_k."""
    S = s.sum()
    p = s / S + eps
    lp = np.log(p)
    r = np.exp(-(p * lp).sum())
    return r * (-(lp + 1) / S + ((lp + 1) * s).sum() / S**2)


def dpr_dsigma(s):
    """Participation ratio (Σλ)²/Σλ², λ = σ²: ∂/∂σ_k = 2σ_k (2Σλ/Σλ² − 2(Σλ)² λ_k/(Σλ²)²)."""
    lam = s**2
    a, b = lam.sum(), (lam**2).sum()
    return 2 * s * (2 * a / b - 2 * a**2 * lam / b**2)


def grad_of(fn, z):
    leaf = z.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward()
    return out.detach(), leaf.grad


def assert_grad_close(got, want, rtol=1e-7):
    got = got.detach().to(F64).numpy()
    assert np.isfinite(got).all()
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------------------------------------------
# values and gradients against the SVD reference


@pytest.mark.parametrize("method", ["auto", "svd"])
@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("shape", [(40, 7), (7, 40)], ids=["N>d", "N<d"])
@pytest.mark.parametrize("name", METRICS)
def test_value_and_gradient_match_svd_reference(name, shape, center, method):
    z = _rand(*shape, seed=1, offset=0.4)
    fn = RF_METRICS[name]
    val, g = grad_of(lambda x: fn(x, center=center, differentiable=True, method=method), z)
    assert isinstance(val, torch.Tensor) and val.ndim == 0 and val.dtype == F64
    want = ref_value(z.numpy(), name, center, zero_tol=1e-9)
    assert float(val) == pytest.approx(want, rel=1e-10)
    # the non-differentiable exact path gives the same number — except that a centred N < d matrix has
    # one structural zero σ (rank N − 1), which that path keeps as rounding noise (~1e-8·σ_1)
    structural_zero = center and shape[0] < shape[1]
    assert float(val) == pytest.approx(float(fn(z, center=center)), rel=1e-6 if structural_zero else 1e-10)
    assert_grad_close(g, ref_grad(z.numpy(), name, center))


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("shape", [(9, 5), (5, 9)], ids=["N>d", "N<d"])
@pytest.mark.parametrize("name", METRICS)
def test_gradcheck(name, shape, center, method):
    z = _rand(*shape, seed=2, offset=0.3).requires_grad_(True)
    fn = RF_METRICS[name]
    assert torch.autograd.gradcheck(lambda x: fn(x, center=center, differentiable=True, method=method), (z,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shape,center", [((30, 6), False), ((30, 6), True), ((6, 30), False)],
                         ids=["N>d-raw", "N>d-centred", "N<d-raw"])
def test_matches_finite_differences_of_the_exact_path(shape, center):
    """Central differences of the non-differentiable rf.rankme (native float64 Gram) in every entry. (Not
    for a centred N < d matrix: there that path keeps the structural zero σ as rounding noise ~1e-8·σ_1,
    whose differences over a step h are noise/h — exactly what the floor of the differentiable path
    removes; gradcheck and the SVD reference cover that case.)"""
    z = _rand(*shape, seed=3, offset=0.5)
    _, g = grad_of(lambda x: rf.rankme(x, center=center, differentiable=True), z)
    h = 1e-6
    fd = torch.zeros_like(z)
    for idx in np.ndindex(*shape):
        zp, zm = z.clone(), z.clone()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (rf.rankme(zp, center=center) - rf.rankme(zm, center=center)) / (2 * h)
    assert_grad_close(g, fd.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("name,center,shape", [("rankme", False, (64, 16)), ("reptrix", True, (16, 48)),
                                               ("collapse_auc", True, (64, 16))])
def test_low_precision_leaf_gets_gradient_of_its_upcast(dtype, name, center, shape):
    z = _rand(*shape, seed=4, dtype=dtype, offset=0.2).requires_grad_(True)
    out = RF_METRICS[name](z, center=center, differentiable=True)
    out.backward()
    assert out.dtype == F64 and z.grad.dtype == dtype and z.grad.shape == z.shape
    up = z.detach().to(F64)
    assert float(out.detach()) == pytest.approx(ref_value(up.numpy(), name, center, zero_tol=1e-9), rel=1e-10)
    # the leaf's gradient is the float64 gradient of its upcast copy, rounded to the leaf's dtype (within
    # one ulp; float16's subnormal ulp below its smallest normal number)
    _, g64 = grad_of(lambda x: RF_METRICS[name](x, center=center, differentiable=True), up)
    assert_grad_close(g64, ref_grad(up.numpy(), name, center), rtol=1e-6)
    fin = torch.finfo(dtype)
    np.testing.assert_allclose(z.grad.to(F64).numpy(), g64.numpy(), rtol=fin.eps, atol=fin.tiny * fin.eps)


# ------------------------------------------------------------------------------------------------
# repeated and zero singular values


def _with_spectrum(n, d, s, seed=5):
    """Z = Q diag(s) Pᵀ: Q (n×K), P (d×K) orthonormal columns from float64 QR, K = len(s)."""
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(g.standard_normal((n, len(s))))
    p, _ = np.linalg.qr(g.standard_normal((d, len(s))))
    return q @ np.diag(s) @ p.T, q, p


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("transpose", [False, True], ids=["N>d", "N<d"])
@pytest.mark.parametrize("name,dsigma", [("rankme", drankme_dsigma), ("rankme-eps0.01", lambda s: drankme_dsigma(s, 1e-2)),
                                         ("effective_rank", lambda s: drankme_dsigma(s, 0.0)),
                                         ("participation_ratio", dpr_dsigma)])
def test_repeated_singular_values(name, dsigma, transpose, method):
    """σ = (3, 3, 3, 1.5, 1.5, 1, 0.5): the solver's eigenvectors inside each repeated block are arbitrary,
    but the gradient Σ_k (∂M/∂σ_k) u_k v_kᵀ is not (equal ∂M/∂σ_k inside a block): closed form."""
    s = np.array([3.0, 3.0, 3.0, 1.5, 1.5, 1.0, 0.5])
    zn, q, p = _with_spectrum(12, 7, s)
    want = (q * dsigma(s)) @ p.T
    if transpose:
        zn, want = zn.T.copy(), want.T.copy()
    z = torch.from_numpy(zn)
    sv = torch.linalg.svdvals(z)
    assert float(sv[0] - sv[2]) < 1e-13 and float(sv[3] - sv[4]) < 1e-13  # really repeated
    val, g = grad_of(lambda x: RF_METRICS[name](x, center=False, differentiable=True, method=method), z)
    assert float(val) == pytest.approx(NP_METRICS[name](s), rel=1e-11)
    assert_grad_close(g, want, rtol=1e-9)


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("case", ["low-rank", "zero-column", "centred-N<d", "repeated-and-zero"])
@pytest.mark.parametrize("name", ["rankme", "effective_rank", "reptrix", "collapse_auc", "stable_rank"])
def test_rank_deficient_input_has_finite_subgradient(name, case, method):
    """Exactly rank-deficient Z: every σ that is 0 up to rounding gets the subgradient 0 (and value 0),
    the others their partial — the gradient is finite and equals the reference over σ_k > 0."""
    center = False
    if case == "low-rank":
        g = torch.Generator().manual_seed(6)
        z = torch.randn(30, 3, generator=g, dtype=F64) @ torch.randn(3, 8, generator=g, dtype=F64)
    elif case == "zero-column":
        z = _rand(20, 6, seed=7)
        z[:, 2] = 0.0
    elif case == "centred-N<d":  # rank N − 1 after centring
        z, center = _rand(6, 20, seed=8, offset=1.0), True
    else:
        z = torch.from_numpy(_with_spectrum(10, 8, np.array([2.0, 2.0, 1.0, 1.0, 0.0, 0.0]))[0])
    zn = z.numpy()
    val, gr = grad_of(lambda x: RF_METRICS[name](x, center=center, differentiable=True, method=method), z)
    assert float(val) == pytest.approx(ref_value(zn, name, center, zero_tol=1e-9), rel=1e-9)
    # the exact path keeps the rounding noise of the zero σ: the same number within its contract
    assert float(val) == pytest.approx(float(RF_METRICS[name](z, center=center)), rel=1e-4)
    sv = rf.spectrum(z, center=center, differentiable=True, method=method).singular_values
    assert int((sv == 0).sum()) >= 1
    if case == "repeated-and-zero" and name in ("collapse_auc", "stable_rank"):
        # these weight σ by rank order (or divide by σ_1): at the ties σ_1 = σ_2, σ_3 = σ_4 they have kinks,
        # and the gradient is the one-sided one of the solver's order — not unique, but finite and, as
        # every metric here is scale invariant, orthogonal to Z (Euler: ⟨∇M(Z), Z⟩ = dM(cZ)/dc = 0)
        g = gr.numpy()
        assert np.isfinite(g).all() and abs((g * zn).sum()) < 1e-10 * np.linalg.norm(g) * np.linalg.norm(zn)
        return
    assert_grad_close(gr, ref_grad(zn, name, center), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# batches, inputs without grad, the Spectrum object


@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("shape", [(3, 12, 5), (3, 5, 12)], ids=["N>d", "N<d"])
def test_batched_input(shape, center):
    z = _rand(*shape, seed=9, offset=0.3)
    leaf = z.clone().requires_grad_(True)
    out = rf.rankme(leaf, center=center, differentiable=True)
    assert out.shape == (shape[0],) and out.dtype == F64
    out.sum().backward()
    for i in range(shape[0]):
        assert float(out.detach()[i]) == pytest.approx(ref_value(z[i].numpy(), "rankme", center, 1e-9), rel=1e-10)
        assert_grad_close(leaf.grad[i], ref_grad(z[i].numpy(), "rankme", center))
    small = _rand(2, 4, 3, seed=10).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: rf.stable_rank(x, center=center, differentiable=True), (small,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_inputs_without_grad_and_the_spectrum_object():
    z = _rand(50, 8, seed=11, offset=0.5)
    want = ref_value(z.numpy(), "rankme", False)
    for x in (z, z.numpy(), z.float()):
        r = rf.rankme(x, differentiable=True)
        assert isinstance(r, torch.Tensor) and r.ndim == 0 and not r.requires_grad
        assert float(r) == pytest.approx(want, rel=1e-6 if x is not z and not isinstance(x, np.ndarray) else 1e-10)
    with torch.no_grad():
        r = rf.rankme(z.clone().requires_grad_(True), differentiable=True)
    assert not r.requires_grad and float(r) == pytest.approx(want, rel=1e-10)

    leaf = z.clone().requires_grad_(True)
    s = rf.spectrum(leaf, center=True, differentiable=True)
    assert s.differentiable and s.exact and s.precision == "exact" and s.method == "gram" and s.centered
    assert "differentiable=True" in repr(s) and s.singular_values.requires_grad
    np.testing.assert_allclose(s.singular_values.detach().numpy(), np_sv(z.numpy(), True)[1], rtol=1e-12)
    auc = s.collapse_auc()
    assert auc.grad_fn is not None and float(auc.detach()) == pytest.approx(ref_value(z.numpy(), "collapse_auc", True))
    # a differentiable Spectrum passed to the metric functions keeps its graph
    assert rf.collapse_auc(s, differentiable=True).grad_fn is not None
    # the default path is unchanged: floats, no flag
    plain = rf.spectrum(z)
    assert not plain.differentiable and isinstance(plain.rankme(), float) and "differentiable" not in repr(plain)
    assert isinstance(rf.rankme(z), float)


def test_as_a_regulariser_the_step_raises_rankme():
    """One gradient step on −RankMe (the README's regulariser) spreads a collapsed batch."""
    g = torch.Generator().manual_seed(12)
    z = (torch.randn(64, 2, generator=g) @ torch.randn(2, 16, generator=g) + 0.05 * torch.randn(64, 16, generator=g))
    z.requires_grad_(True)
    before = rf.rankme(z, differentiable=True)
    (-before).backward()
    with torch.no_grad():
        after = rf.rankme(z - 0.5 * z.grad / z.grad.norm() * z.norm(), differentiable=True)
    assert float(after) > float(before.detach()) + 0.1
    assert float(before.detach()) == pytest.approx(ref_value(z.detach().double().numpy(), "rankme", False), rel=1e-10)


# ------------------------------------------------------------------------------------------------
# bad options


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "slq"}, "method"), ({"method": "randomized"}, "method"), ({"method": "lanczos"}, "method"),
    ({"precision": "fast"}, "precision"), ({"backend": "cpu"}, "backend"), ({"k": 4}, "approximate"),
])
def test_bad_options_raise(kwargs, match):
    z = _rand(20, 6, seed=13).requires_grad_(True)
    with pytest.raises(ValueError, match=match):
        rf.rankme(z, differentiable=True, **kwargs)
    with pytest.raises(ValueError, match=match):
        rf.spectrum(z, differentiable=True, **kwargs)


def test_bad_inputs_raise(tmp_path):
    z = _rand(20, 6, seed=14)
    with pytest.raises(ValueError, match="autograd graph"):
        rf.rankme(rf.spectrum(z), differentiable=True)
    with pytest.raises(ValueError, match="path"):
        rf.rankme(str(tmp_path / "x.npy"), differentiable=True)
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rf.rankme(bad.requires_grad_(True), differentiable=True)
    with pytest.raises(ValueError, match="all-zero"):
        rf.rankme(torch.zeros(5, 3, requires_grad=True), differentiable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    z = _rand(300, 24, seed=15, dtype=torch.float32, offset=0.3)
    leaf = z.cuda().requires_grad_(True)
    out = rf.rankme(leaf, center=True, differentiable=True)
    out.backward()
    assert out.device.type == "cuda" and leaf.grad.device.type == "cuda" and leaf.grad.dtype == torch.float32
    up = z.double().numpy()
    assert float(out.detach()) == pytest.approx(ref_value(up, "rankme", True), rel=1e-10)
    np.testing.assert_allclose(leaf.grad.cpu().double().numpy(), ref_grad(up, "rankme", True), rtol=2e-7, atol=1e-9)
