"""RankMe conventions of other implementations (issue 13, item 3): each against an independent NumPy
re-implementation of that peer's formula, so a migrating user gets the number they had."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast import metrics


def _entropy_exp(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def peer(z: np.ndarray, convention: str) -> float:
    """The peers' formulas, written out in float64 NumPy from their definitions."""
    if convention == "reptrix":
        zc = z - z.mean(0)
        s = np.linalg.svd(zc, compute_uv=False)
        ev = s**2 / (s**2).sum()  # explained-variance ratio
        return _entropy_exp(ev + 1e-7)
    s = np.linalg.svd(z, compute_uv=False)
    if convention == "stable-pretraining":
        return _entropy_exp(s / s.sum() + 1e-5)
    if convention == "stable-pretraining-jax":
        return _entropy_exp(s / (s.sum() + 1e-7) + 1e-7)
    return _entropy_exp(s / s.sum() + 1e-7)


@pytest.mark.parametrize("convention", list(metrics.RANKME_CONVENTIONS))
@pytest.mark.parametrize("kind", ["flat", "rank1", "rank8_noise", "power1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_convention_matches_peer(matrices, convention, kind, dtype):
    x = matrices.get(kind, (700, 64), dtype, offset=0.5)
    want = peer(x.double().numpy(), convention)
    got = rf.rankme(x, convention=convention)
    # DESIGN §3: 1e-4 on collapsed spectra (their tail is float64 rounding noise), 1e-6 otherwise
    tol = 1e-4 if kind in ("rank1", "rank8_noise") else 1e-6
    assert abs(got - want) / want < tol, (got, want)
    s = rf.spectrum(x, center=convention == "reptrix")
    assert s.rankme(convention=convention) == pytest.approx(got, rel=1e-12)


def test_worked_values_and_defaults():
    flat = torch.ones(2048, dtype=torch.float64)
    assert float(metrics.rankme_convention(flat, "stable-pretraining")) == pytest.approx(2345.099, abs=1e-3)
    assert float(metrics.rankme_convention(flat, "paper")) == pytest.approx(2050.780, abs=1e-3)
    x = torch.randn(500, 20, generator=torch.Generator().manual_seed(0)) + 3.0
    # reptrix centres raw data by default; an explicit centre overrides it
    assert rf.rankme(x, convention="reptrix") == pytest.approx(peer(x.double().numpy(), "reptrix"), rel=1e-9)
    assert rf.rankme(x, convention="reptrix", center=False) != pytest.approx(rf.rankme(x, convention="reptrix"))
    assert rf.rankme(x, convention="paper") == rf.rankme(x)
    # a batch gives one value per item
    b = torch.randn(3, 100, 10, generator=torch.Generator().manual_seed(1))
    out = rf.rankme(b, convention="stable-pretraining-jax")
    assert out.shape == (3,) and float(out[1]) == pytest.approx(peer(b[1].double().numpy(), "stable-pretraining-jax"))


def test_bad_convention():
    x = torch.randn(50, 5)
    with pytest.raises(ValueError, match=r"convention must be one of \['paper', 'stable-pretraining'"):
        rf.rankme(x, convention="lightly")
    with pytest.raises(ValueError, match="needs every singular value"):
        rf.rankme(x, convention="reptrix", method="lanczos", k=2)


@pytest.mark.parametrize("shape", [(20, 90), (300, 1)], ids=["N<d", "d=1"])
@pytest.mark.parametrize("convention", list(metrics.RANKME_CONVENTIONS))
def test_convention_odd_shapes(convention, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.3
    want = peer(x.numpy(), convention)
    assert rf.rankme(x, convention=convention) == pytest.approx(want, rel=1e-9)


def test_convention_interval_only_for_paper():
    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="return_interval applies to convention='paper' only"):
        rf.rankme(x, convention="stable-pretraining", return_interval=True)
