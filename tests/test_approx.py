"""Approximate spectra (issue 5): randomized SVD, block Lanczos and stochastic Lanczos
quadrature on the fused normal operator, against float64 SVD references; interval coverage over seeds;
method selection and bad input."""
from __future__ import annotations

import pytest
import torch

import rankme_fast as rf
from rankme_fast.approx import ApproxSpectrum, NormalOperator, lanczos_topk, randomized_topk
from tests.conftest import np_rankme, ref_sv

N, D = 3000, 384


def _x(matrices, kind, center=False, shape=(N, D)):
    # entries ~ 1/sqrt(d): every dtype represents them next to the offset
    return matrices.get(kind, shape, torch.float32, scale=shape[0] ** 0.5, offset=1.0 if center else 0.0)


@pytest.mark.parametrize("method", ["randomized", "lanczos"])
@pytest.mark.parametrize("kind", ["power1", "power2", "rank8_noise"])
def test_topk_values_and_residuals(matrices, kind, method):
    """Top-k σ against the float64 SVD; every Ritz value has an eigenvalue of G within its residual."""
    x = _x(matrices, kind)
    ref = ref_sv(x)
    s = rf.spectrum(x, method=method, k=16)
    assert isinstance(s, ApproxSpectrum) and s.singular_values.shape == (16,) and not s.exact
    lam, ref_lam = s.singular_values**2, ref**2
    # distance from each θ_i to the nearest eigenvalue of G is at most its residual (+ rounding)
    dist = (lam[:, None] - ref_lam[None, :]).abs().min(1).values
    assert bool((dist <= s.residuals + 1e-12 * float(ref_lam[0])).all())
    assert float((s.singular_values[:4] - ref[:4]).abs().max() / ref[0]) < 1e-6
    assert s.frobenius2 == pytest.approx(float((ref**2).sum()), rel=1e-12)
    assert s.stable_rank() == pytest.approx(float((ref**2).sum() / ref[0] ** 2), rel=1e-6)


def test_operator_matches_gram(matrices):
    x = _x(matrices, "power1", center=True)
    op = NormalOperator(x, center=True)
    v = x.double() - x.double().mean(0)
    w = torch.randn(D, 5, dtype=torch.float64)
    assert torch.allclose(op.apply(w), v.T @ (v @ w), rtol=1e-10, atol=1e-10 * float((v.T @ v).abs().max()))
    assert op.trace() == pytest.approx(float((v * v).sum()), rel=1e-12)


def test_lanczos_converges_and_reports(matrices):
    x = _x(matrices, "power2")
    top = lanczos_topk(NormalOperator(x, center=False), 8, tol=1e-10)
    assert top.converged and bool((top.residuals <= 1e-10 * top.eigenvalues[0]).all())
    ref = ref_sv(x)[:8] ** 2
    assert torch.allclose(top.eigenvalues, ref, rtol=1e-8, atol=0)
    r = randomized_topk(NormalOperator(x, center=False), 8, power_iters=0)  # no power iterations: looser
    assert bool((r.eigenvalues <= ref * (1 + 1e-12)).all())  # Ritz values are lower bounds


SPECTRA = ["flat", "rank1", "rank8", "power1", "power2", "exp", "rank8_noise"]


# hi/lo − 1 of the top-k (k = 32) RankMe range may not exceed these: ~3x the widths measured on
# 2026-12-02 (flat 5e-6, rank1 3.7e-4, rank8 8e-5, rank8_noise 2.8e-4, power2 0.32, power1 3.6, exp 5.3 —
# a top-32 head says little about a power-law or exponential tail), so an interval widened 1000x fails
TOPK_WIDTH = {"flat": 1e-4, "rank1": 1e-3, "rank8": 1e-3, "rank8_noise": 1e-3, "power2": 1.0, "power1": 10.0,
              "exp": 16.0}


@pytest.mark.parametrize("center", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("kind", SPECTRA)
def test_topk_intervals_cover(matrices, kind, center):
    """The RankMe range of randomized/Lanczos spectra contains the exact value for ≥ 90% of 20 seeds, and
    is no wider than TOPK_WIDTH (coverage alone would pass for any interval)."""
    x = _x(matrices, kind, center)
    want = np_rankme(ref_sv(x, center=center).numpy())
    for method in ("randomized", "lanczos"):
        hits = 0
        for seed in range(20):
            lo, hi = rf.spectrum(x, method=method, center=center, seed=seed).rankme_interval()
            hits += lo <= want <= hi
            assert hi / lo - 1 <= TOPK_WIDTH[kind], (method, seed, lo, hi)
        assert hits >= 18, (method, hits)


@pytest.mark.parametrize("kind", ["rank1", "power1", "exp", "rank8_noise"])
def test_slq_interval_coverage(matrices, kind):
    """SLQ's 95% interval (probe bootstrap + quadrature-error allowance) covers the exact RankMe in ≥ 90%
    of 20 seeds; at these cheap settings (60 steps) the estimate is within 10% on every seed."""
    x = _x(matrices, kind, shape=(1500, 256))
    want = np_rankme(ref_sv(x).numpy())
    hits = 0
    for seed in range(20):
        s = rf.spectrum(x, method="slq", seed=seed, probes=16, steps=60, deflate=32)
        lo, hi = s.rankme_interval()
        hits += lo <= want <= hi
        assert abs(s.rankme() - want) / want < 1e-1
        assert (hi - lo) / want < 0.25, (seed, lo, hi, want)  # not merely covering: informative
    assert hits >= 18, hits


@pytest.mark.parametrize("shape", [(3000, 384), (200, 600)], ids=["N>d", "N<d"])
@pytest.mark.parametrize("kind", SPECTRA)
def test_slq_default_accuracy(matrices, kind, shape):
    """At the default settings SLQ RankMe is within 1% on every DESIGN spectrum (seed 0), effective rank
    within 2%, and the interval contains the exact value."""
    x = _x(matrices, kind, shape=shape)
    sv = ref_sv(x).numpy()
    want = np_rankme(sv)
    s = rf.spectrum(x, method="slq")
    assert abs(s.rankme() - want) / want < 1e-2
    lo, hi = s.rankme_interval()
    assert lo <= want <= hi
    assert (hi - lo) / want < 0.05, (lo, hi, want)  # measured ≤ 0.0066 (power1, exp); issue 14 asks < 0.1
    assert abs(s.effective_rank() - np_rankme(sv, 0.0)) / np_rankme(sv, 0.0) < 2e-2


def test_slq_participation_ratio(matrices):
    x = _x(matrices, "power1")
    ref = ref_sv(x) ** 2
    want = float(ref.sum() ** 2 / (ref**2).sum())
    assert rf.spectrum(x, method="slq").participation_ratio() == pytest.approx(want, rel=2e-2)


def test_public_functions_accept_approx_spectrum(matrices):
    x = _x(matrices, "power2")
    s = rf.spectrum(x, method="slq")
    assert rf.rankme(s) == s.rankme()
    assert rf.stable_rank(s) == s.stable_rank()
    with pytest.raises(ValueError, match="collapse_auc needs every singular value"):
        rf.collapse_auc(rf.spectrum(x, method="randomized", center=True))
    with pytest.raises(ValueError, match="participation_ratio needs the whole spectrum"):
        rf.spectrum(x, method="lanczos").participation_ratio()
    with pytest.raises(ValueError, match=r"alpha_req over \(5, 100\) needs the top 100"):
        rf.spectrum(x, method="lanczos", k=16).alpha_req()


def test_auto_stays_exact_unless_asked(matrices):
    x = _x(matrices, "power1")
    assert type(rf.spectrum(x)).__name__ == "Spectrum"
    assert type(rf.spectrum(x, rtol=0.05)).__name__ == "Spectrum"  # small d: exact is cheap
    import sys  # noqa: PLC0415

    sp = sys.modules["rankme_fast.spectrum"]  # the package attribute `spectrum` is the function

    old = sp.AUTO_SLQ_MIN_D
    try:
        sp.AUTO_SLQ_MIN_D = 100
        s = rf.spectrum(x, rtol=0.05)
        assert isinstance(s, ApproxSpectrum) and s.method == "slq" and s.rtol == 0.05
        assert type(rf.spectrum(x, rtol=1e-3)).__name__ == "Spectrum"  # tighter than SLQ's design
    finally:
        sp.AUTO_SLQ_MIN_D = old


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"method": "randomized", "k": 0}, r"k must be an int in 1\.\.min\(N, d\)=384"),
    ({"method": "lanczos", "k": 385}, r"k must be an int"),
    ({"method": "slq", "probes": 1}, r"probes must be an int >= 2"),
    ({"method": "slq", "steps": 0}, r"steps must be an int >= 1"),
    ({"method": "slq", "deflate_steps": 0}, r"deflate_steps must be an int >= 1"),
    ({"method": "slq", "k": 8}, r"k does not apply to method='slq'"),
    ({"method": "slq", "deflate": -1}, r"deflate must be an int >= 0"),
    ({"method": "gram", "k": 5}, r"options \['k'\] apply to approximate methods"),
    ({"method": "slq", "precision": "fast"}, r"has its own error control"),
    ({"rtol": 2.0}, r"rtol must be a number in \(0, 1\)"),
    ({"rtol": 0.05, "probes": 4}, r"method='auto' chose an exact one"),
])
def test_bad_options(matrices, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        rf.spectrum(_x(matrices, "power1"), **kwargs)


def test_bad_data_for_approx():
    with pytest.raises(ValueError, match=r"needs one in-memory \(N, d\) matrix"):
        rf.spectrum(torch.randn(2, 50, 8), method="slq")
    x = torch.randn(100, 8)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="found 1 non-finite values"):
        rf.spectrum(x, method="randomized")
    for center in (False, True):  # the trace pass finds it; the message names count and row
        with pytest.raises(ValueError, match=r"found 1 non-finite values \(1 NaN, 0 Inf\).*first in row 3"):
            rf.spectrum(x, method="slq", center=center)
    big = torch.full((10, 4), 1e200, dtype=torch.float64)  # squares overflow: computed on big·2^k (issue 14)
    s = rf.spectrum(big, method="lanczos")
    assert s.log2_scale < 0
    half = -s.log2_scale // 2  # σ of big = σ·2^-k, in two factors that are each representable
    sigma1 = float(s.singular_values[0]) * 2.0**half * 2.0 ** (-s.log2_scale - half)
    assert sigma1 == pytest.approx(1e200 * 40**0.5, rel=1e-12)
    with pytest.raises(ValueError, match="all singular values are zero"):
        rf.spectrum(torch.zeros(100, 8), method="lanczos")


@pytest.mark.parametrize("shape", [(50, 1), (1, 40)], ids=["d=1", "N=1"])
@pytest.mark.parametrize("method", ["randomized", "lanczos", "slq"])
def test_single_singular_value(method, shape):
    """K = 1: the one σ is found exactly and RankMe = (1 + ε)^-(1+ε), inside its own range."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    ref = ref_sv(x)
    s = rf.spectrum(x, method=method)
    assert s.singular_values.numel() == 1
    assert float(s.singular_values[0]) == pytest.approx(float(ref[0]), rel=1e-12)
    want = np_rankme(ref.numpy())
    assert s.rankme() == pytest.approx(want, rel=1e-12)
    lo, hi = s.rankme_interval()
    assert lo <= want <= hi


def test_slq_extrapolation_improves_on_gauss():
    """With too few steps for Gauss quadrature to converge (a power-law spectrum over 1024 columns, 20
    steps), Aitken's extrapolation over 10/15/20 steps lands closer to the exact RankMe than the Gauss value
    on every seed, and the interval (which spans both) contains the exact value."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 1024, generator=g) * torch.arange(1, 1025, dtype=torch.float32) ** -0.7
    want = np_rankme(ref_sv(x).numpy())
    for seed in range(3):
        s = rf.spectrum(x, method="slq", steps=20, deflate_steps=10, probes=16, seed=seed)
        est, gauss = s._slq_rankme(1e-7)
        assert est == s.rankme() and est != gauss
        assert abs(est - want) < abs(gauss - want)
        lo, hi = s.rankme_interval()
        assert lo <= want <= hi and lo <= gauss <= hi
