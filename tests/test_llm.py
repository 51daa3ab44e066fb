"""LLM hidden-state metrics (rankme_fast.llm) against independent float64 NumPy implementations of the
formulas in the module docstring (issue 15): batched, ragged-list and padded+lengths input, bf16, n = 1,
n > d, d = 1, degenerate items, non-finite values, bad lengths, and the float64 fallback engine."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast import llm

RTOL = 1e-9


# ---------------------------------------------------------------------------------------------- references


def np_eigenscore(z, alpha=1e-3, convention="inside"):
    z = np.asarray(z, np.float64)
    k, d = z.shape
    if convention == "lm-polygraph":
        zc = z - z.mean(1, keepdims=True)
        c = zc @ zc.T
    else:
        c = np.cov(z).reshape(k, k)  # rows are variables: each centred over its features, ÷ (d − 1)
    s = np.linalg.svd(c + alpha * np.eye(k), compute_uv=False)  # SPD: singular values = eigenvalues
    return float(np.mean(np.log10(s))) if convention == "inside" else float(np.mean(np.log(s)))


def np_llm_check(t, alpha=1e-3):
    t = np.asarray(t, np.float64)
    tc = t - t.mean(1, keepdims=True)
    lam = np.linalg.eigvalsh(tc @ tc.T)  # n eigenvalues, zeros included when n > d
    return float(np.mean(np.log(lam + alpha)))


def _normalise_rows(z):
    nrm = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, nrm, out=np.zeros_like(z), where=nrm > 1e-300 * 0 + nrm.max() * 1e-12)


def np_matrix_entropy(t):
    t = np.asarray(t, np.float64)
    z = _normalise_rows(t - t.mean(0, keepdims=True))
    s = np.linalg.svd(z, compute_uv=False)
    lam = s**2 / np.sum(s**2)
    lam = lam[lam > 0]
    return float(-np.sum(lam * np.log(lam)))


def np_alpha_entropy(t, alpha=1.0, center=True, clamp=False, normalization="raw"):
    t = np.asarray(t, np.float64)
    n, d = t.shape
    z = t - t.mean(0, keepdims=True) if center else t
    z = _normalise_rows(z)
    a = z @ z.T
    if clamp:
        a = np.clip(a, 0, None)
    lam = np.linalg.eigvalsh(a) / np.trace(a)
    lam = lam[lam > 8 * n * 2.0**-53 * lam.max()]  # rounding-level eigenvalues are 0 (the documented rule)
    s = float(-np.sum(lam * np.log(lam))) if alpha == 1.0 else float(np.log(np.sum(lam**alpha)) / (1 - alpha))
    div = {"raw": 1.0, "maxEntropy": min(math.log(n), math.log(d)), "logN": math.log(n), "logD": math.log(d)}
    return s / div[normalization]


METRICS = {
    "eigenscore": (lambda x, **k: rf.eigenscore(x, **k), np_eigenscore),
    "eigenscore_paper": (lambda x, **k: rf.eigenscore(x, convention="paper", **k),
                         lambda t: np_eigenscore(t, convention="paper")),
    "eigenscore_lmpg": (lambda x, **k: rf.eigenscore(x, convention="lm-polygraph", **k),
                        lambda t: np_eigenscore(t, convention="lm-polygraph")),
    "llm_check": (lambda x, **k: rf.llm_check_hidden_score(x, **k), np_llm_check),
    "matrix_entropy": (lambda x, **k: rf.matrix_entropy(x, **k), np_matrix_entropy),
    "erank": (lambda x, **k: rf.erank(x, **k), lambda t: math.exp(np_matrix_entropy(t))),
    "alpha2_max": (lambda x, **k: rf.alpha_entropy(x, alpha=2.0, normalization="maxEntropy", **k),
                   lambda t: np_alpha_entropy(t, 2.0, normalization="maxEntropy")),
    "alpha1_nocenter_clamp": (lambda x, **k: rf.alpha_entropy(x, center=False, clamp=True, normalization="logN", **k),
                              lambda t: np_alpha_entropy(t, 1.0, center=False, clamp=True, normalization="logN")),
    "alpha05_logD": (lambda x, **k: rf.alpha_entropy(x, alpha=0.5, normalization="logD", **k),
                     lambda t: np_alpha_entropy(t, 0.5, normalization="logD")),
}


def _hidden(rng, b, n, d, dtype=torch.float64, mean=0.0):
    """Hidden-state-like items: a few strong directions, a shared offset, per-token noise."""
    basis = rng.normal(size=(6, d))
    x = rng.normal(size=(b, n, 6)) @ basis * 2.0 + rng.normal(size=(b, n, d)) * 0.3 + mean
    return torch.from_numpy(x).to(dtype)


def _refs(ref, items):
    return np.array([ref(t.double().numpy()) for t in items])


def _atol(metric, items) -> float:
    """Absolute tolerance: 1e-12, except where the value is ill-conditioned in float64 itself. LLM-Check's
    mean of ln(λ + α) with n > d has n − d zero eigenvalues that any float64 eigensolver (the reference's
    included) returns as ±c·n·u·λ_max, so each of their logs is uncertain by that over α: bound it by
    4·n·u·λ_max/α (measured 3e-11 against the reference on a Zen 4 MKL, where this is 1.3e-9)."""
    if metric != "llm_check":
        return 1e-12
    worst = 1e-12
    for t in items:
        tc = np.asarray(t.double().numpy() if isinstance(t, torch.Tensor) else t, np.float64)
        tc = tc - tc.mean(1, keepdims=True)
        n = tc.shape[0]
        if n > tc.shape[1]:
            worst = max(worst, 4 * n * 2.0**-53 * float(np.linalg.norm(tc, 2)) ** 2 / 1e-3)
    return worst


@pytest.fixture
def rng():
    return np.random.default_rng(15)


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("metric", METRICS)
def test_batched_vs_numpy(rng, metric):
    fn, ref = METRICS[metric]
    x = _hidden(rng, 6, 12, 40)
    got = fn(x)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), _refs(ref, x), rtol=RTOL, atol=1e-12)
    one = fn(x[2])  # one 2-D item: a float, the same value
    assert isinstance(one, float) and one == pytest.approx(float(got[2]), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("metric", METRICS)
def test_ragged_list_and_padded_lengths(rng, metric):
    fn, ref = METRICS[metric]
    lens = [5, 12, 3, 30, 7, 12, 2, 19]
    items = [_hidden(rng, 1, n, 24)[0] for n in lens]
    want = _refs(ref, items)
    tol = _atol(metric, items)
    got_list = fn(items)
    np.testing.assert_allclose(got_list.numpy(), want, rtol=RTOL, atol=tol)
    got_np = fn([t.numpy() for t in items])  # NumPy items
    np.testing.assert_allclose(got_np.numpy(), want, rtol=RTOL, atol=tol)
    outs = []
    for pad in (0.0, 1e30, float("nan"), float("-inf")):  # whatever the padding holds, it is never read
        p = torch.full((len(lens), max(lens), 24), pad, dtype=torch.float64)
        for i, t in enumerate(items):
            p[i, : t.shape[0]] = t
        outs.append(fn(p, lengths=torch.tensor(lens)))
    for o in outs:
        np.testing.assert_allclose(o.numpy(), want, rtol=RTOL, atol=tol)
        assert torch.equal(o, outs[0]), "the padding's values changed the result"
    np.testing.assert_allclose(fn(p, lengths=np.array(lens)).numpy(), want, rtol=RTOL, atol=tol)


@pytest.mark.parametrize("metric", ("eigenscore", "llm_check", "matrix_entropy", "alpha2_max"))
def test_bf16_and_float32(rng, metric):
    fn, ref = METRICS[metric]
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        x = _hidden(rng, 4, 9, 64, dtype=dtype)
        # the reference sees the same (exactly upcast) values
        np.testing.assert_allclose(fn(x).numpy(), _refs(ref, x), rtol=RTOL, atol=1e-12)
    mixed = [x[0].bfloat16(), x[1].half(), x[2].float()]  # a ragged list of mixed dtypes: a common dtype
    np.testing.assert_allclose(fn(mixed).numpy(), _refs(ref, [m.float() for m in mixed]), rtol=RTOL, atol=1e-12)


def test_many_buckets_and_chunks(rng, monkeypatch):
    """Lengths 1..60 (several buckets), chunks forced small, and EigenScore / LLM-Check items above 25 rows sent
    to the buckets instead of the one native call: every item lands in its own place."""
    monkeypatch.setattr(llm, "_CHUNK_BYTES", 40_000)
    monkeypatch.setattr(llm, "_NATIVE_LOGDET_MAX", 25)
    lens = list(range(1, 61))
    rng.shuffle(lens)
    items = [_hidden(rng, 1, n, 16)[0] for n in lens]
    np.testing.assert_allclose(rf.llm_check_hidden_score(items).numpy(), _refs(np_llm_check, items), rtol=RTOL)
    np.testing.assert_allclose(rf.eigenscore(items, convention="paper").numpy(),
                               _refs(lambda t: np_eigenscore(t, convention="paper"), items), rtol=RTOL, atol=1e-12)
    keep = [t for t in items if t.shape[0] >= 2]
    np.testing.assert_allclose(rf.matrix_entropy(keep).numpy(), _refs(np_matrix_entropy, keep), rtol=RTOL, atol=1e-12)


def test_long_ragged_items_in_one_native_call(rng, monkeypatch):
    """EigenScore / LLM-Check items of up to _NATIVE_LOGDET_MAX rows go to the kernel in one call, read where
    they lie: a ragged list with items across the blocked Cholesky's edges (64, 65, 97 … 300 rows, some with
    n > d), one of them a transposed view and one float32 among bf16 (converted on the way), and the same
    items padded with lengths (padding full of NaN), all against the float64 references; no torch Cholesky
    runs."""
    lens = [65, 3, 300, 97, 64, 150, 1, 129]
    items = [_hidden(rng, 1, n, 120, dtype=torch.bfloat16)[0] for n in lens]
    items[3] = items[3].t().contiguous().t()  # column-major rows
    items[5] = items[5].float()
    monkeypatch.setattr(llm, "_logdet_mean", lambda *a: pytest.fail("the torch route ran"))
    got = rf.llm_check_hidden_score(items)
    np.testing.assert_allclose(got.numpy(), _refs(np_llm_check, items), rtol=RTOL, atol=_atol("llm_check", items))
    es = rf.eigenscore(items[:1] + items[2:6] + items[7:])
    np.testing.assert_allclose(es.numpy(), _refs(np_eigenscore, items[:1] + items[2:6] + items[7:]), rtol=RTOL,
                               atol=1e-12)
    padded = torch.full((len(lens), max(lens), 120), float("nan"), dtype=torch.float32)
    for b, t in enumerate(items):
        padded[b, : t.shape[0]] = t.float()
    got_p = rf.llm_check_hidden_score(padded, lengths=lens)
    np.testing.assert_allclose(got_p.numpy(), got.numpy(), rtol=1e-13, atol=1e-13)


def test_n_greater_than_d_and_d_one(rng):
    x = _hidden(rng, 3, 40, 8)  # n > d: LLM-Check counts the n − d zero eigenvalues as ln α
    np.testing.assert_allclose(rf.llm_check_hidden_score(x).numpy(), _refs(np_llm_check, x), rtol=RTOL)
    np.testing.assert_allclose(rf.matrix_entropy(x).numpy(), _refs(np_matrix_entropy, x), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(rf.eigenscore(x).numpy(), _refs(np_eigenscore, x), rtol=RTOL, atol=1e-12)
    x1 = _hidden(rng, 3, 5, 1)  # d = 1: every row centred over its one feature is 0
    np.testing.assert_allclose(rf.llm_check_hidden_score(x1).numpy(), math.log(1e-3), rtol=1e-12)
    np.testing.assert_allclose(rf.eigenscore(x1, convention="lm-polygraph").numpy(), math.log(1e-3), rtol=1e-12)
    with pytest.raises(ValueError, match=r"eigenscore needs d >= 2 features to form a covariance, got d = 1"):
        rf.eigenscore(x1)
    # d = 1 over tokens: rows ±1 after centring and normalising, rank 1, H = 0
    np.testing.assert_allclose(rf.matrix_entropy(x1).numpy(), 0.0, atol=1e-10)  # rounding-level λ ~ 1e-13
    with pytest.raises(ValueError, match=r"divides item 0's entropy by ln d = 0"):
        rf.alpha_entropy(x1, normalization="logD")


def test_n_one(rng):
    x = _hidden(rng, 4, 1, 32)
    np.testing.assert_allclose(rf.eigenscore(x).numpy(), _refs(np_eigenscore, x), rtol=RTOL)
    np.testing.assert_allclose(rf.llm_check_hidden_score(x).numpy(), _refs(np_llm_check, x), rtol=RTOL)
    np.testing.assert_allclose(rf.alpha_entropy(x, center=False).numpy(), 0.0, atol=1e-15)  # one unit row: λ = [1]
    with pytest.raises(ValueError, match=r"matrix_entropy: item 0 has no row left after centring.*\(items \[0, 1, 2, 3\]\)"):
        rf.matrix_entropy(x)
    with pytest.raises(ValueError, match=r"maxEntropy.*divides item 0's entropy by min\(ln n, ln d\) = 0 \(n = 1"):
        rf.alpha_entropy(x, center=False, normalization="maxEntropy")


def test_all_equal_rows(rng):
    """EigenScore / LLM-Check of an item whose rows are all equal is defined (every eigenvalue 0: log α);
    the entropies have nothing to normalise and name the item."""
    x = _hidden(rng, 4, 6, 20)
    x[2] = x[2, :1].expand(6, 20)
    es = rf.eigenscore(x)
    np.testing.assert_allclose(es.numpy(), _refs(np_eigenscore, x), rtol=RTOL, atol=1e-12)
    # one row repeated: C = v·11ᵀ (v the row's variance over features), eigenvalues 6v + α and α (×5)
    v = float(x[2, 0].var())
    assert float(es[2]) == pytest.approx((math.log10(6 * v + 1e-3) + 5 * math.log10(1e-3)) / 6, rel=1e-9)
    x[1] = 3.25  # every value equal: a zero spectrum also after centring over features
    assert float(rf.eigenscore(x)[1]) == pytest.approx(math.log10(1e-3), rel=1e-12)
    assert float(rf.llm_check_hidden_score(x)[1]) == pytest.approx(math.log(1e-3), rel=1e-12)
    with pytest.raises(ValueError, match=r"matrix_entropy: item 1 has no row left after centring .*\(items \[1, 2\]\)"):
        rf.matrix_entropy(x)
    y = _hidden(rng, 2, 6, 20)
    y[1, 3] = y[1].mean(0)  # one token equal to the mean: a zero row, kept as zero (the others normalised)
    np.testing.assert_allclose(rf.matrix_entropy(y).numpy(), _refs(np_matrix_entropy, y), rtol=RTOL)


def test_large_shared_offset_is_exact(rng):
    """Hidden states with a huge shared component (massive activations): centring over tokens after the
    first-token shift keeps the entropies exact; the reference centres in float64 first."""
    x = _hidden(rng, 3, 16, 32, mean=0.0)
    x[..., 5] += 1e7
    np.testing.assert_allclose(rf.matrix_entropy(x).numpy(), _refs(np_matrix_entropy, x), rtol=1e-8)
    np.testing.assert_allclose(rf.alpha_entropy(x, alpha=3.0).numpy(),
                               _refs(lambda t: np_alpha_entropy(t, 3.0), x), rtol=1e-8)


def test_diff_erank(rng):
    base, trained = _hidden(rng, 5, 10, 24), _hidden(rng, 5, 10, 48)  # the feature dims may differ
    got = rf.diff_erank(base, trained)
    want = _refs(lambda t: math.exp(np_matrix_entropy(t)), base) - _refs(lambda t: math.exp(np_matrix_entropy(t)), trained)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    lens = [10, 4, 7, 10, 2]
    got_l = rf.diff_erank(base, trained, lengths=lens)
    want_l = [math.exp(np_matrix_entropy(base[i, :n].numpy())) - math.exp(np_matrix_entropy(trained[i, :n].numpy()))
              for i, n in enumerate(lens)]
    np.testing.assert_allclose(got_l.numpy(), want_l, rtol=1e-9, atol=1e-12)
    assert rf.diff_erank(base[0], trained[0]) == pytest.approx(float(got[0]), rel=1e-12)
    with pytest.raises(ValueError, match="diff_erank: base and trained need the same items, got 5 items and 4 items"):
        rf.diff_erank(base, trained[:4])


def test_fallback_engine_matches_native(rng, monkeypatch):
    """The float64-copy engine (no native kernel / non-CPU devices) gives the same values."""
    lens = [9, 3, 17, 1, 12]
    x = _hidden(rng, 5, 17, 33, dtype=torch.bfloat16)
    fast = [rf.llm_check_hidden_score(x, lengths=lens), rf.eigenscore(x, lengths=lens),
            rf.alpha_entropy(x, alpha=2.0, center=False, lengths=lens)]
    monkeypatch.setattr(llm, "_native", lambda: None)
    slow = [rf.llm_check_hidden_score(x, lengths=lens), rf.eigenscore(x, lengths=lens),
            rf.alpha_entropy(x, alpha=2.0, center=False, lengths=lens)]
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-13)


def test_native_logdet_matches_the_torch_route(rng, monkeypatch):
    """Items of up to _NATIVE_LOGDET_MAX rows take the native Cholesky on G − r rᵀ/d; it must agree with the
    torch route (centred Gram, batched Cholesky / eigvalsh), including an item whose matrix is not numerically
    SPD (a rank-1 item with a ridge below the Gram's rounding), which falls back to eigvalsh per item."""
    x = _hidden(rng, 6, 12, 40)
    x[4] = x[4, :1].expand(12, 40)  # rank 1 after centring: eigenvalues 0 (×11) up to rounding
    lens = [12, 5, 1, 12, 12, 7]
    calls = []
    real = llm._logdet_mean
    monkeypatch.setattr(llm, "_logdet_mean", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    cases = [(rf.eigenscore, {"alpha": 1e-3}), (rf.eigenscore, {"alpha": 1e-300, "convention": "lm-polygraph"}),
             (rf.llm_check_hidden_score, {"alpha": 1e-3}), (rf.llm_check_hidden_score, {"alpha": 1e-300})]
    fast = [fn(x, lengths=lens, **kw) for fn, kw in cases]
    assert calls and max(calls) <= 1, calls  # the native route ran; only the non-SPD item fell back
    calls.clear()
    monkeypatch.setattr(llm, "_NATIVE_LOGDET_MAX", 0)
    slow = [fn(x, lengths=lens, **kw) for fn, kw in cases]
    assert calls, "the torch route did not run"
    # the two factorisations differ by rounding: ln(λ + ridge) is uncertain by ~ L·u·λ_max/(λ_min + ridge),
    # large only for item 4's rounding-level zeros
    xc = x - x.mean(-1, keepdim=True)
    lam = [np.linalg.eigvalsh((xc[i, :n] @ xc[i, :n].T).numpy()) for i, n in enumerate(lens)]
    tr = torch.tensor([v[-1] for v in lam], dtype=torch.float64)
    lmin = torch.tensor([max(v[0], 0.0) for v in lam], dtype=torch.float64)
    for (fn, kw), a, b in zip(cases, fast, slow):
        assert torch.equal(a.isnan(), b.isnan()), (fn.__name__, kw, a, b)
        ridge = kw["alpha"] * (39 if fn is rf.eigenscore and "convention" not in kw else 1)
        tol = 1e-12 + 4 * 12 * 2.0**-53 * tr / (lmin + ridge)
        assert bool(((a - b).abs().nan_to_num(0) <= tol).all()), (fn.__name__, kw, a - b, tol)
    np.testing.assert_allclose(fast[0].numpy(), [np_eigenscore(x[i, :n].numpy()) for i, n in enumerate(lens)],
                               rtol=RTOL, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the batched float64 matmul on CUDA is not run")
def test_cuda_matches_cpu(rng):
    x = _hidden(rng, 6, 20, 64, dtype=torch.bfloat16)
    for fn in (rf.eigenscore, rf.llm_check_hidden_score, rf.matrix_entropy):
        got = fn(x.cuda(), lengths=[20, 3, 9, 20, 1, 5]) if fn is not rf.matrix_entropy else fn(x.cuda())
        assert got.device.type == "cuda"
        want = fn(x, lengths=[20, 3, 9, 20, 1, 5]) if fn is not rf.matrix_entropy else fn(x)
        np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- bad input


def test_nonfinite_names_item_and_token(rng):
    x = _hidden(rng, 5, 8, 16)
    x[3, 6, 2] = float("nan")
    for fn in (rf.eigenscore, rf.llm_check_hidden_score, rf.matrix_entropy, rf.alpha_entropy):
        with pytest.raises(ValueError, match=r"x: item 3 holds 1 non-finite value\(s\), the first \(nan\) in token "
                                             r"\(row\) 6, feature 2"):
            fn(x)
    items = [x[0], x[1, :4].clone()]
    items[1][2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"item 1 holds 1 non-finite value\(s\), the first \(inf\) in token \(row\) 2"):
        rf.llm_check_hidden_score(items)
    # NaN only in the padding: not an error
    assert torch.isfinite(rf.llm_check_hidden_score(x, lengths=[8, 8, 8, 6, 8])).all()


def test_bad_lengths(rng):
    x = _hidden(rng, 3, 5, 8)
    with pytest.raises(ValueError, match=r"lengths: item 1 has length 0, outside \[1, 5\]"):
        rf.eigenscore(x, lengths=[5, 0, 3])
    with pytest.raises(ValueError, match=r"lengths: item 2 has length 6, outside \[1, 5\]"):
        rf.matrix_entropy(x, lengths=[5, 1, 6])
    with pytest.raises(ValueError, match=r"lengths: need one length per item of x, shape \(3,\), got \(2,\)"):
        rf.llm_check_hidden_score(x, lengths=[5, 1])
    with pytest.raises(ValueError, match=r"shape \(3,\), got \(3, 1\)"):
        rf.llm_check_hidden_score(x, lengths=torch.ones(3, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"lengths: need integer"):
        rf.llm_check_hidden_score(x, lengths=[5.0, 1.0, 2.0])
    with pytest.raises(TypeError, match=r"lengths: need integer"):
        rf.llm_check_hidden_score(x, lengths=torch.tensor([5.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lengths= goes with a padded"):
        rf.llm_check_hidden_score([x[0], x[1]], lengths=[5, 5])
    with pytest.raises(ValueError, match=r"lengths= needs a padded \(B, n_max, d\) tensor, got one 2-D item"):
        rf.llm_check_hidden_score(x[0], lengths=[5])


def test_bad_items_and_options(rng):
    x = _hidden(rng, 3, 5, 8)
    with pytest.raises(ValueError, match=r"x\[1\]: has 7 features, item 0 has 8"):
        rf.matrix_entropy([x[0], x[1, :, :7]])
    with pytest.raises(ValueError, match=r"x\[1\]: expected a 2-D \(n, d\) item"):
        rf.matrix_entropy([x[0], x[1, 0]])
    with pytest.raises(ValueError, match=r"x\[0\]: empty item of shape \(0, 8\)"):
        rf.matrix_entropy([x[0, :0]])
    with pytest.raises(ValueError, match=r"empty list of items"):
        rf.eigenscore([])
    with pytest.raises(ValueError, match=r"expected a 2-D or 3-D tensor \(\(n, d\) for one item, \(B, n, d\) for a batch\) or a list"):
        rf.eigenscore(torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match=r"integer/bool input is not accepted"):
        rf.llm_check_hidden_score(torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"convention must be one of \('inside', 'paper', 'lm-polygraph'\), got 'log2'"):
        rf.eigenscore(x, convention="log2")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"alpha must be a finite number > 0"):
            rf.llm_check_hidden_score(x, alpha=bad)
        with pytest.raises(ValueError, match=r"alpha must be a finite number > 0"):
            rf.alpha_entropy(x, alpha=bad)
    with pytest.raises(TypeError, match=r"alpha must be a real number, got str"):
        rf.eigenscore(x, alpha="1e-3")
    with pytest.raises(TypeError, match=r"center must be a bool, got str 'no'"):
        rf.alpha_entropy(x, center="no")
    with pytest.raises(ValueError, match=r"normalization must be one of"):
        rf.alpha_entropy(x, normalization="max")


def test_float64_overflow_is_named(rng):
    x = _hidden(rng, 2, 4, 8)
    x[1] *= 1e160
    with pytest.raises(ValueError, match=r"overflow float64 .*rescale"):
        rf.llm_check_hidden_score(x)
