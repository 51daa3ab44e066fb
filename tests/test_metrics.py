"""DESIGN §2 metric definitions, checked against NumPy float64 implementations written here from the
formulas, the worked values of §2, the default centring of each public function, LiDAR and EigenScore."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast import metrics as M
from rankme_fast.demo import make_embeddings
from tests.conftest import SEED, np_rankme, ref_sv, rel_err

# ----------------------------------------------------------------------------------------------
# independent NumPy float64 implementations (DESIGN §2)


def np_effective_rank(s):
    return np_rankme(s, eps=0.0)


def np_collapse_auc(s):
    s = np.asarray(s, np.float64)
    return float(np.mean(np.cumsum(s) / s.sum()))


def np_alpha_req(s, lo=5, hi=100):
    s = np.asarray(s, np.float64)
    hi = min(hi, s.size)
    i = np.arange(lo, hi + 1, dtype=np.float64)
    lam = s[lo - 1 : hi] ** 2
    slope, _ = np.polyfit(-np.log(i), np.log(lam), 1)
    return float(slope)


def np_stable_rank(s):
    s = np.asarray(s, np.float64)
    return float((s**2).sum() / s.max() ** 2)


def np_participation_ratio(s, n_rows=1000):
    lam = np.asarray(s, np.float64) ** 2 / (n_rows - 1)
    return float(lam.sum() ** 2 / (lam**2).sum())


def np_nesum(s, n_rows=1000):
    lam = np.asarray(s, np.float64) ** 2 / (n_rows - 1)
    return float(lam.sum() / lam.max())


NP_METRICS = {
    "rankme": np_rankme,
    "effective_rank": np_effective_rank,
    "collapse_auc": np_collapse_auc,
    "alpha_req": np_alpha_req,
    "stable_rank": np_stable_rank,
    "participation_ratio": np_participation_ratio,
    "nesum": np_nesum,
}
DEFAULT_CENTER = {
    "rankme": False,
    "effective_rank": False,
    "stable_rank": False,
    "collapse_auc": True,
    "alpha_req": True,
    "participation_ratio": True,
    "nesum": True,
}


def random_spectra(rng, b, k, *, zeros=0):
    """(b, k) descending spectra spanning a few decades, with ``zeros`` trailing exact zeros."""
    s = np.exp(rng.normal(0.0, 2.0, size=(b, k)))
    s = -np.sort(-s, axis=1)
    if zeros:
        s[:, k - zeros :] = 0.0
    return s


# ----------------------------------------------------------------------------------------------
# DESIGN §2 worked values, on explicit singular values


def _flat(d):
    return torch.ones(d, dtype=torch.float64)


def _rank1(d):
    s = torch.zeros(d, dtype=torch.float64)
    s[0] = 1.0
    return s


@pytest.mark.parametrize(
    ("spec", "eps", "printed"),
    [
        ("flat", 0.0, "2048"),
        ("flat", 1e-7, "2050.780"),
        ("flat", 1e-5, "2345.099"),
        ("rank1", 0.0, "1"),
        ("rank1", 1e-7, "1.003305"),
        ("rank1", 1e-5, "1.265743"),
    ],
    ids=lambda v: str(v),
)
def test_worked_rankme_d2048(spec, eps, printed):
    sv = (_flat if spec == "flat" else _rank1)(2048)
    got = float(M.rankme(sv, eps))
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert round(got, decimals) == float(printed), got
    assert got == pytest.approx(np_rankme(sv.numpy(), eps), rel=1e-12)


def test_worked_values_small():
    assert round(float(M.rankme(_flat(128), 1e-7)), 4) == 128.0063
    assert round(float(M.rankme(_flat(128))), 4) == 128.0063  # ε = 1e-7 is the default
    assert M.RANKME_EPS == 1e-7
    assert round(float(M.collapse_auc(_flat(512))), 7) == 0.5009766
    assert float(M.collapse_auc(_flat(512))) == pytest.approx(513 / 1024, rel=1e-14)
    assert float(M.collapse_auc(_rank1(512))) == pytest.approx(1.0, rel=1e-15)
    assert float(M.effective_rank(_flat(2048))) == pytest.approx(2048, rel=1e-13)
    assert float(M.effective_rank(_rank1(2048))) == 1.0


def _signed_permutation(d, scale, seed=SEED):
    """d×d matrix with exactly one ±scale per row and column: σ = scale (flat), and its Gram is
    computed without a single rounding error, so the worked values hold to every printed digit."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(d, d, dtype=torch.float64)
    p[torch.arange(d), torch.randperm(d, generator=g)] = scale * (torch.randint(0, 2, (d,), generator=g) * 2 - 1).double()
    return p


def _one_column(n, d, j, seed=SEED):
    """n×d, zero but for column j = u: σ = (‖u‖, 0, …, 0); its Gram is diagonal, exactly."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, d, dtype=torch.float64)
    z[:, j] = torch.randn(n, generator=g, dtype=torch.float64)
    return z


@pytest.fixture(scope="module")
def flat2048():
    return _signed_permutation(2048, 0.75)


@pytest.fixture(scope="module")
def rank1_2048():
    return _one_column(2048, 2048, 1234)


@pytest.mark.parametrize(("eps", "printed"), [(0.0, "2048"), (1e-7, "2050.780"), (1e-5, "2345.099")])
def test_worked_rankme_public_api_flat(flat2048, eps, printed):
    s = rf.spectrum(flat2048)
    assert s.rank_dims == 2048
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert round(rf.rankme(s, eps), decimals) == float(printed)
    assert round(s.rankme(eps), decimals) == float(printed)


@pytest.mark.parametrize(("eps", "printed"), [(0.0, "1"), (1e-7, "1.003305"), (1e-5, "1.265743")])
def test_worked_rankme_public_api_rank1(rank1_2048, eps, printed):
    s = rf.spectrum(rank1_2048)
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert round(rf.rankme(s, eps), decimals) == float(printed)


def test_worked_rankme_public_api_direct(flat2048, rank1_2048):
    """The one-call form (no Spectrum) on the same matrices, default ε = 1e-7."""
    assert round(rf.rankme(flat2048), 3) == 2050.780
    assert round(rf.rankme(rank1_2048), 6) == 1.003305
    assert rf.effective_rank(rank1_2048) == pytest.approx(1.0, abs=1e-12)


def test_worked_rankme_flat128_random_rotation():
    """A generic (dense, rotated) flat matrix: the contract's 1e-6 tier around the printed value."""
    z = make_embeddings(600, 128, "flat", dtype=torch.float32, seed=3)
    got = rf.rankme(z)
    assert abs(got - 128.0063) <= 5e-5 + 1e-6 * 128.0063
    assert rel_err(got, np_rankme(ref_sv(z).numpy())) <= 1e-6


def test_worked_collapse_auc_public_api():
    """collapse_auc centres by default: stack Z on -Z so the column mean is exactly zero and the
    centred spectrum is √2·σ(Z) — still flat / still rank 1."""
    p = _signed_permutation(512, 2.0)
    flat = torch.cat([p, -p])
    assert round(rf.collapse_auc(flat), 7) == 0.5009766
    assert rf.collapse_auc(flat) == pytest.approx(513 / 1024, rel=1e-12)
    u = _one_column(300, 512, 17)
    r1 = torch.cat([u, -u])
    assert rf.collapse_auc(r1) == pytest.approx(1.0, rel=1e-12)
    s = rf.spectrum(flat, center=True)
    assert s.centered and s.collapse_auc() == pytest.approx(513 / 1024, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# every metric against NumPy on random spectra


K_ZEROS = [pytest.param(k, z, id=f"K{k}-{z}zeros") for k in (1, 2, 7, 150) for z in (0, 3) if z < k]


@pytest.mark.parametrize(("k", "zeros"), K_ZEROS)
@pytest.mark.parametrize("name", sorted(NP_METRICS))
def test_metric_functions_vs_numpy(rng, name, k, zeros):
    s = random_spectra(rng, 5, k, zeros=zeros)
    t = torch.from_numpy(s)
    fn = getattr(M, name)
    if name == "alpha_req":
        lo, hi = (1, 100) if k < 5 else (5, 100)
        if hi - lo + 1 < 2 or min(hi, k) - lo + 1 < 2:
            with pytest.raises(ValueError, match="at least 2 eigenvalues"):
                fn(t, (lo, hi))
            return
        if zeros and min(hi, k) > k - zeros:
            with pytest.raises(ValueError, match="zero"):
                fn(t, (lo, hi))
            return
        got = fn(t, (lo, hi))
        want = [np_alpha_req(row, lo, hi) for row in s]
    elif name in ("participation_ratio", "nesum"):
        got = fn(t)
        want = [NP_METRICS[name](row) for row in s]  # invariant to the 1/(N-1) of λ
    else:
        got = fn(t)
        want = [NP_METRICS[name](row) for row in s]
    assert got.shape == (5,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-11, atol=0)
    # one row at a time gives a 0-d tensor with the same value
    one = fn(t[2], (lo, hi)) if name == "alpha_req" else fn(t[2])
    assert one.ndim == 0 and float(one) == pytest.approx(want[2], rel=1e-12)


@pytest.mark.parametrize("eps", (0.0, 1e-7, 1e-5, 0.3))
def test_rankme_eps_not_renormalised(rng, eps):
    s = random_spectra(rng, 3, 40, zeros=5)
    got = M.rankme(torch.from_numpy(s), eps)
    np.testing.assert_allclose(got.numpy(), [np_rankme(r, eps) for r in s], rtol=1e-12)
    if eps > 0:  # p = σ/‖σ‖₁ + ε sums to 1 + Kε: a renormalised p would give a different number
        p = s[0] / s[0].sum() + eps
        p = p / p.sum()
        assert abs(float(got[0]) - math.exp(-(p * np.log(p)).sum())) > 1e-9


def test_collapse_auc_range(rng):
    for k in (1, 2, 5, 64, 513):
        s = torch.from_numpy(random_spectra(rng, 50, k, zeros=k // 3))
        auc = M.collapse_auc(s)
        lo = (k + 1) / (2 * k)
        assert bool((auc >= lo - 1e-15).all()) and bool((auc <= 1 + 1e-15).all()), k
        assert float(M.collapse_auc(torch.ones(k, dtype=torch.float64))) == pytest.approx(lo, rel=1e-14)
        one_hot = torch.zeros(k, dtype=torch.float64)
        one_hot[0] = 3.0
        assert float(M.collapse_auc(one_hot)) == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize("a", (0.5, 1.0, 2.0))
def test_alpha_req_exact_power_law(a):
    k = torch.arange(1, 257, dtype=torch.float64)
    sv = k ** (-a)
    assert float(M.alpha_req(sv)) == pytest.approx(2 * a, rel=1e-12)  # λ = σ² = k^(-2a)
    assert float(M.alpha_req(sv, (1, 256))) == pytest.approx(2 * a, rel=1e-12)
    assert float(M.alpha_req(sv * 1e-30)) == pytest.approx(2 * a, rel=1e-12)  # scale free


@pytest.mark.parametrize(("kind", "alpha", "index_range"), [("power1", 2.0, (5, 100)), ("power2", 4.0, (5, 40))])
def test_alpha_req_public_api_power_law(kind, alpha, index_range):
    """Through the public (centring) API: stack Z on -Z so the centred spectrum is √2·σ(Z), σ_k = k^-a."""
    z = make_embeddings(400, 128, kind, dtype=torch.float64, seed=5)
    zz = torch.cat([z, -z])
    assert rf.alpha_req(zz, index_range) == pytest.approx(alpha, abs=1e-6)
    assert rf.alpha_req(z, index_range, center=False) == pytest.approx(alpha, abs=1e-6)


def test_eigenvalues_and_stable_rank_scale():
    z = make_embeddings(500, 20, "power1", dtype=torch.float64, seed=1)
    s = rf.spectrum(z)
    ref = ref_sv(z)
    torch.testing.assert_close(s.eigenvalues, ref**2 / 499, rtol=1e-9, atol=1e-14)
    assert s.stable_rank() == pytest.approx(float((ref**2).sum() / ref[0] ** 2), rel=1e-9)


# ----------------------------------------------------------------------------------------------
# public API: default centring, Spectrum reuse, return types


@pytest.fixture(scope="module")
def offset_data():
    """Power-law embeddings with a mean 5× their spread: centring changes every metric a lot."""
    z = make_embeddings(2000, 32, "power1", dtype=torch.float32, seed=11)
    z = z + 5.0 * float(z.std()) * torch.linspace(0.5, 1.5, 32, dtype=torch.float32)
    return z, ref_sv(z, center=False).numpy(), ref_sv(z, center=True).numpy()


@pytest.mark.parametrize("name", sorted(NP_METRICS))
def test_public_default_centering(offset_data, name):
    z, raw, cen = offset_data
    fn = getattr(rf, name)
    np_fn = NP_METRICS[name]
    kw = {"n_rows": z.shape[0]} if name in ("participation_ratio", "nesum") else {}
    want_raw, want_cen = np_fn(raw, **kw), np_fn(cen, **kw)
    # the test is only meaningful if centring matters for this metric on this data
    assert rel_err(want_raw, want_cen) > 1e-2
    want = want_cen if DEFAULT_CENTER[name] else want_raw
    got = fn(z)
    assert isinstance(got, float)
    assert rel_err(got, want) <= 1e-6, (name, got, want, "centred" if DEFAULT_CENTER[name] else "raw")
    # explicit center= overrides the default
    other = not DEFAULT_CENTER[name]
    assert rel_err(fn(z, center=other), want_cen if other else want_raw) <= 1e-6


@pytest.mark.parametrize("name", sorted(NP_METRICS))
@pytest.mark.parametrize("centered", (False, True), ids=("raw_spectrum", "centred_spectrum"))
def test_public_accepts_spectrum_without_center_argument(offset_data, name, centered):
    """DESIGN/api.py: a Spectrum is used as given; only an explicit, contradicting center= raises."""
    z, raw, cen = offset_data
    s = rf.spectrum(z, center=centered)
    kw = {"n_rows": z.shape[0]} if name in ("participation_ratio", "nesum") else {}
    want = NP_METRICS[name](cen if centered else raw, **kw)
    got = getattr(rf, name)(s)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("name", sorted(NP_METRICS))
@pytest.mark.parametrize("centered", (False, True), ids=("raw_spectrum", "centred_spectrum"))
def test_public_spectrum_contradicting_center_raises(offset_data, name, centered):
    z, _, _ = offset_data
    s = rf.spectrum(z, center=centered)
    fn = getattr(rf, name)
    with pytest.raises(ValueError, match=rf"center={not centered} contradicts the given Spectrum"):
        fn(s, center=not centered)
    # the agreeing value is accepted
    assert fn(s, center=centered) == getattr(s, name)()


def test_spectrum_methods_match_numpy(offset_data):
    z, _, cen = offset_data
    s = rf.spectrum(z, center=True)
    n = z.shape[0]
    for name, np_fn in NP_METRICS.items():
        kw = {"n_rows": n} if name in ("participation_ratio", "nesum") else {}
        assert rel_err(getattr(s, name)(), np_fn(cen, **kw)) <= 1e-6, name


@pytest.mark.parametrize("name", sorted(NP_METRICS))
def test_public_batched_returns_tensor(name):
    zs = torch.stack([make_embeddings(60, 12, k, dtype=torch.float64, seed=i)
                      for i, k in enumerate(("power1", "flat", "exp"))]) + 2.0
    got = getattr(rf, name)(zs)
    assert isinstance(got, torch.Tensor) and got.shape == (3,) and got.dtype == torch.float64
    for i in range(3):
        sv = ref_sv(zs[i], center=DEFAULT_CENTER[name]).numpy()
        kw = {"n_rows": 60} if name in ("participation_ratio", "nesum") else {}
        assert rel_err(got[i], NP_METRICS[name](sv, **kw)) <= 1e-9, (name, i)


# ----------------------------------------------------------------------------------------------
# LiDAR (Thilak et al. 2023) and EigenScore (Chen et al. 2024)


def np_lidar(z, groups, delta=1e-4, eps=1e-8):
    """The formula of rankme_fast.structured.lidar's docstring, in NumPy float64."""
    z = np.asarray(z, np.float64)
    groups = np.asarray(groups)
    ids = np.unique(groups)
    n = ids.size
    m, d = z.shape
    mus = np.stack([z[groups == g].mean(0) for g in ids])
    mu = mus.mean(0)
    sb = (mus - mu).T @ (mus - mu) / (n - 1)
    sw = np.zeros((d, d))
    for i, g in enumerate(ids):
        dev = z[groups == g] - mus[i]
        sw += dev.T @ dev
    sw = sw / (m - n) + delta * np.eye(d)
    w, v = np.linalg.eigh(sw)
    inv_sqrt = (v / np.sqrt(w)) @ v.T
    lam = np.clip(np.linalg.eigvalsh(inv_sqrt @ sb @ inv_sqrt), 0.0, None)
    p = (lam + eps) / (lam + eps).sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _views(rng, n, q, d, rank=None, noise=0.3):
    centers = rng.normal(size=(n, d))
    if rank is not None:  # sample means confined to a rank-r subspace
        centers = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))
    groups = np.repeat(np.arange(n), q)
    z = centers[groups] + noise * rng.normal(size=(n * q, d))
    return z, groups


@pytest.mark.parametrize(
    "case",
    ["equal_views", "low_rank_means", "unequal_views", "shuffled_sparse_ids", "float32", "torch_groups"],
)
def test_lidar_vs_numpy(rng, case):
    z, groups = _views(rng, 30, 4, 10, rank=3 if case == "low_rank_means" else None)
    if case == "unequal_views":
        keep = np.ones(len(groups), bool)
        keep[[1, 2, 3, 9, 10]] = False  # sample 0 keeps one view, sample 2 keeps two
        z, groups = z[keep], groups[keep]
    if case == "shuffled_sparse_ids":
        perm = rng.permutation(len(groups))
        z, groups = z[perm], (groups * 37 + 5)[perm]
    x = z.astype(np.float32) if case == "float32" else z
    g = torch.from_numpy(groups) if case == "torch_groups" else groups
    got = rf.lidar(x, g)
    assert isinstance(got, float)
    want = np_lidar(x.astype(np.float64), groups)
    assert got == pytest.approx(want, rel=1e-9)
    assert 1.0 <= got <= z.shape[1]
    # other δ, ε
    assert rf.lidar(x, g, delta=1e-2, eps=1e-6) == pytest.approx(np_lidar(x, groups, 1e-2, 1e-6), rel=1e-9)


def test_lidar_low_rank_means_is_low(rng):
    z, groups = _views(rng, 40, 5, 12, rank=2, noise=0.05)
    assert rf.lidar(z, groups) == pytest.approx(np_lidar(z, groups), rel=1e-9)
    assert rf.lidar(z, groups) < 3.0


def np_eigenscore(z, alpha=1e-3):
    z = np.asarray(z, np.float64)
    c = np.cov(z) + alpha * np.eye(z.shape[0])  # rows = generations (variables), features = observations
    return float(np.mean(np.log(np.linalg.eigvalsh(c))))


@pytest.mark.parametrize("dtype", (np.float64, np.float32), ids=("f64", "f32"))
@pytest.mark.parametrize("shape", ((10, 64), (1, 5), (20, 8)), ids=("10x64", "1x5", "20x8_K_gt_d"))
def test_eigenscore_2d_vs_numpy(rng, shape, dtype):
    z = rng.normal(size=shape).astype(dtype)
    # convention="paper" (natural log) is what rf.eigenscore returned before issue 15 made "inside" the default
    got = rf.eigenscore(z, convention="paper")
    assert isinstance(got, float)
    assert got == pytest.approx(np_eigenscore(z), rel=1e-10, abs=1e-12)
    assert rf.eigenscore(z, alpha=0.5, convention="paper") == pytest.approx(np_eigenscore(z, 0.5), rel=1e-10, abs=1e-12)
    assert rf.eigenscore(z) == pytest.approx(np_eigenscore(z) / np.log(10), rel=1e-10, abs=1e-12)  # "inside": log10


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=("f64", "f32", "bf16"))
def test_eigenscore_batched_vs_numpy(rng, dtype):
    zs = torch.from_numpy(rng.normal(size=(7, 6, 32)))
    zs[3] = zs[3, :1].expand(6, 32)  # identical generations: C = v·11ᵀ, eigenvalues 6v + α and α (×5)
    zs = zs.to(dtype)
    got = rf.eigenscore(zs, convention="paper")
    assert isinstance(got, torch.Tensor) and got.shape == (7,) and got.dtype == torch.float64
    want = [np_eigenscore(zs[i].double().numpy()) for i in range(7)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    v = float(zs[3, 0].double().var())  # variance over features (d - 1 normalisation)
    assert float(got[3]) == pytest.approx((math.log(6 * v + 1e-3) + 5 * math.log(1e-3)) / 6, rel=1e-9)
    for i in range(7):  # batched == one item at a time
        assert float(got[i]) == pytest.approx(rf.eigenscore(zs[i], convention="paper"), rel=1e-12, abs=1e-12)
