"""torchmetrics RankMe / SpectralMetrics (rankme_fast.integrations.torchmetrics), issue 13.

References: the float64 SVD of the concatenated (dtype-converted) rows (``ref_sv``) and the formulas of
DESIGN §2 / the peers' conventions re-implemented here in NumPy. DDP runs two real gloo processes
(tests/tm_dist_worker.py) that record every torch.distributed collective the metric calls.
"""
from __future__ import annotations

import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import rankme_fast as rf

pytest.importorskip("torchmetrics")

from rankme_fast.integrations.torchmetrics import METRICS, RankMe, SpectralMetrics  # noqa: E402
from tests.conftest import ref_sv  # noqa: E402
from tests.tm_dist_worker import full_rank  # noqa: E402

TOL = 1e-9
N, D = 900, 24


def np_rankme_convention(sv, convention: str, eps=None) -> float:
    """The peers' formulas (README table), NumPy float64, written independently of rankme_fast.metrics."""
    s = np.asarray(sv, dtype=np.float64)
    if convention == "paper":
        p = s / s.sum() + (1e-7 if eps is None else eps)
    elif convention == "stable-pretraining":
        p = s / s.sum() + (1e-5 if eps is None else eps)
    elif convention == "stable-pretraining-jax":
        p = s / (s.sum() + 1e-7) + 1e-7
    else:  # reptrix: explained-variance ratio
        p = s**2 / (s**2).sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def np_metric(name: str, sv) -> float:
    s = np.asarray(sv, dtype=np.float64)
    lam = s**2
    if name == "rankme":
        return np_rankme_convention(s, "paper")
    if name == "effective_rank":
        p = s / s.sum()
        p = p[p > 0]
        return float(np.exp(-(p * np.log(p)).sum()))
    if name == "stable_rank":
        return float(lam.sum() / lam.max())
    if name == "collapse_auc":
        return float(np.mean(np.cumsum(s) / s.sum()))
    if name == "participation_ratio":
        return float(lam.sum() ** 2 / (lam**2).sum())
    if name == "nesum":
        return float(lam.sum() / lam.max())
    if name == "alpha_req":
        i = np.arange(5, min(100, len(s)) + 1)
        slope = np.polyfit(np.log(i), np.log(lam[i - 1]), 1)[0]
        return float(-slope)
    raise KeyError(name)


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


@pytest.fixture(scope="module")
def z64():
    return full_rank(N, D, 7, torch.float64)


def feed(metric, z, sizes):
    """Update ``metric`` with consecutive batches of ``z`` of the given sizes (cycled)."""
    r0, i = 0, 0
    while r0 < z.shape[0]:
        b = sizes[i % len(sizes)]
        metric.update(z[r0 : r0 + b])
        r0 += b
        i += 1
    return metric


# ---------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("sizes", [(256,), (1, 7, 100, 33), (N,)], ids=["b256", "ragged", "one"])
@pytest.mark.parametrize("max_rows", [None, 300, 257])
def test_rankme_equals_concatenated_rows(z64, dtype, sizes, max_rows):
    z = z64.to(dtype)
    metric = feed(RankMe(max_rows=max_rows), z, sizes)
    used = z if max_rows is None else z[:max_rows]
    value = metric.compute()
    assert value.dtype == torch.float64 and value.ndim == 0
    assert int(metric.n_rows) == used.shape[0]
    assert metric.rows_skipped == z.shape[0] - used.shape[0]
    assert rel(value, np_rankme_convention(ref_sv(used), "paper")) < TOL
    assert rel(value, rf.rankme(used)) < TOL  # the in-memory API on the concatenated batches


@pytest.mark.parametrize("convention", ["paper", "stable-pretraining", "stable-pretraining-jax", "reptrix"])
@pytest.mark.parametrize("center", [None, True, False])
def test_conventions_and_centring(z64, convention, center):
    metric = feed(RankMe(convention=convention, center=center), z64.float(), (128,))
    c = (convention == "reptrix") if center is None else center
    assert metric.center is c
    assert rel(metric.compute(), np_rankme_convention(ref_sv(z64.float(), center=c), convention)) < TOL


def test_eps_override(z64):
    metric = feed(RankMe(eps=0.0), z64, (200,))
    assert rel(metric.compute(), np_metric("effective_rank", ref_sv(z64))) < TOL


def test_flattens_leading_dimensions(z64):
    z3 = z64[:880].reshape(10, 88, D)  # (..., d): tokens of 10 sequences
    metric = RankMe()
    metric.update(z3)
    assert int(metric.n_rows) == 880
    assert rel(metric.compute(), np_rankme_convention(ref_sv(z64[:880]), "paper")) < TOL


def test_numpy_batches(z64):
    metric = feed(RankMe(), z64.numpy(), (300,))
    assert rel(metric.compute(), np_rankme_convention(ref_sv(z64), "paper")) < TOL


def test_spectral_metrics_each_against_reference(z64):
    names = tuple(METRICS)
    metric = feed(SpectralMetrics(names), z64.float(), (100, 57))
    out = metric.compute()
    assert set(out) == set(names)
    for name in names:
        centred = name in ("collapse_auc", "participation_ratio", "nesum", "alpha_req")
        want = np_metric(name, ref_sv(z64.float(), center=centred))
        assert out[name].dtype == torch.float64
        assert rel(out[name], want) < 1e-8, name


def test_spectral_metrics_center_override(z64):
    metric = feed(SpectralMetrics(("rankme", "collapse_auc"), center=True), z64, (400,))
    out = metric.compute()
    sv = ref_sv(z64, center=True)
    assert rel(out["rankme"], np_metric("rankme", sv)) < TOL
    assert rel(out["collapse_auc"], np_metric("collapse_auc", sv)) < TOL


def test_forward_returns_batch_value_and_accumulates(z64):
    metric = RankMe()
    values = [metric(z64[r0 : r0 + 300]) for r0 in range(0, N, 300)]
    for i, v in enumerate(values):
        assert rel(v, np_rankme_convention(ref_sv(z64[i * 300 : (i + 1) * 300]), "paper")) < TOL
    assert rel(metric.compute(), np_rankme_convention(ref_sv(z64), "paper")) < TOL
    sm = SpectralMetrics(("rankme", "collapse_auc"))
    out = sm(z64[:50])  # b < d: the b×b Gram
    assert rel(out["collapse_auc"], np_metric("collapse_auc", ref_sv(z64[:50], center=True))) < TOL


def test_reset_and_reuse(z64):
    metric = feed(RankMe(), z64, (256,))
    metric.compute()
    metric.reset()
    assert int(metric.n_rows) == 0 and metric.shift.numel() == 0
    metric.update(z64[:100, :10])  # a new d after reset is a new metric
    assert rel(metric.compute(), np_rankme_convention(ref_sv(z64[:100, :10]), "paper")) < TOL


def test_compute_then_keep_accumulating(z64):
    metric = RankMe()
    metric.update(z64[:400])
    first = metric.compute()
    metric.update(z64[400:])
    assert rel(first, np_rankme_convention(ref_sv(z64[:400]), "paper")) < TOL
    assert rel(metric.compute(), np_rankme_convention(ref_sv(z64), "paper")) < TOL


def test_state_is_the_gram_not_the_embeddings(z64):
    metric = feed(RankMe(), z64, (100,))
    state = metric.metric_state
    assert set(state) == {"n_rows", "shift", "col_sum", "scatter", "log2_scale"}
    assert state["scatter"].dtype == torch.float64 and state["scatter"].shape[0] >= D
    assert sum(t.numel() for t in state.values()) < 2 * (D + 8) ** 2  # independent of N = 900
    assert metric.full_state_update is False and metric.is_differentiable is False
    assert RankMe.higher_is_better is True and SpectralMetrics.higher_is_better is None


@pytest.mark.parametrize("backend", [None, "torch"])
def test_state_dict_round_trip_and_resume(z64, backend):
    metric = feed(RankMe(), z64[:500], (128,))
    buf = io.BytesIO()
    torch.save(metric.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain tensors only: nothing unpickled
    assert set(state) == {"n_rows", "shift", "col_sum", "scatter", "log2_scale"}
    resumed = RankMe(backend=backend)  # another backend pads the buffer differently: re-padded on load
    resumed.load_state_dict(state)
    assert rel(resumed.compute(), np_rankme_convention(ref_sv(z64[:500]), "paper")) < TOL
    feed(resumed, z64[500:], (77,))
    assert rel(resumed.compute(), np_rankme_convention(ref_sv(z64), "paper")) < TOL


def test_state_survives_module_checkpoint(z64):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.rankme = RankMe()

    m = Model()
    feed(m.rankme, z64[:300], (64,))
    sd = m.state_dict()
    assert "rankme.scatter" in sd and "rankme.n_rows" in sd
    m2 = Model()
    m2.load_state_dict(sd)
    assert rel(m2.rankme.compute(), np_rankme_convention(ref_sv(z64[:300]), "paper")) < TOL


@pytest.mark.parametrize("e", [-170, 170])
def test_tiny_and_huge_float64_embeddings(z64, e):
    """|z| ~ 1e∓170: squares leave float64's range, so the state is kept for z·2^k (exact). The value —
    also after a checkpoint round trip, a device move and a merge — is that of the float64 SVD."""
    z = z64 * 10.0**e
    metric = feed(RankMe(), z[:600], (100,))
    assert int(metric.log2_scale) != 0
    want = np_rankme_convention(ref_sv(z64), "paper")  # RankMe is scale-invariant
    resumed = RankMe()
    resumed.load_state_dict(metric.state_dict())
    other = feed(RankMe(), z[600:], (150,))
    resumed.merge_state(other)
    assert rel(resumed.compute(), want) < TOL
    metric.to("cpu")
    feed(metric, z[600:], (300,))
    assert rel(metric.compute(), want) < TOL


def test_clone_and_merge_state(z64):
    a = feed(RankMe(), z64[:333], (100,))
    b = a.clone()
    feed(b, z64[333:600], (50,))
    assert rel(a.compute(), np_rankme_convention(ref_sv(z64[:333]), "paper")) < TOL  # clone is independent
    c = feed(RankMe(), z64[600:], (128,))
    b.merge_state(c)
    assert rel(b.compute(), np_rankme_convention(ref_sv(z64), "paper")) < TOL
    d = copy.deepcopy(b)
    assert rel(d.compute(), np_rankme_convention(ref_sv(z64), "paper")) < TOL


def test_plot(z64):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    metric = RankMe()
    vals = [metric(z64[i : i + 300]) for i in range(0, N, 300)]
    fig, ax = metric.plot(vals)
    assert len(ax.lines[0].get_ydata()) == 3
    fig2, _ = SpectralMetrics(("rankme", "collapse_auc")).plot([{"rankme": v, "collapse_auc": v / 10} for v in vals])
    assert fig is not None and fig2 is not None


# ---------------------------------------------------------------------------------------------
# bad input and options


def test_bad_input(z64):
    metric = RankMe()
    with pytest.raises(TypeError, match="integer"):
        metric.update(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(batch, d\)"):
        metric.update(torch.ones(5))
    metric.update(z64[:10])
    with pytest.raises(ValueError, match="d=5 features but the accumulator has d=24"):
        metric.update(z64[:10, :5])
    bad = z64[:4].clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        metric.update(bad)
    with pytest.raises(RuntimeError, match="unusable"):
        metric.compute()
    metric.reset()  # usable again
    metric.update(z64[:50])
    assert rel(metric.compute(), np_rankme_convention(ref_sv(z64[:50]), "paper")) < TOL


def test_compute_without_rows_raises():
    with pytest.warns(UserWarning, match="before the ``update``"):
        with pytest.raises(ValueError, match="no rows"):
            RankMe().compute()


def test_all_zero_embeddings_raise_clearly():
    metric = RankMe()
    metric.update(torch.zeros(10, 4))
    with pytest.raises(ValueError, match="all-zero"):
        metric.compute()


@pytest.mark.parametrize("kwargs, match", [
    ({"max_rows": 0}, "max_rows"), ({"max_rows": 2.5}, "max_rows"), ({"eps": -1.0}, "eps"), ({"eps": 5}, "eps"),
    ({"convention": "nope"}, "convention"), ({"backend": "nope"}, "backend"),
    ({"dist_sync_fn": lambda *a, **k: None}, "all_reduce"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankMe(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"metrics": ()}, "non-empty"), ({"metrics": ("rankme", "nope")}, "nope"),
    ({"metrics": ("rankme", "rankme")}, "twice"), ({"alpha_range": (0, 5)}, "alpha_range"),
])
def test_bad_spectral_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralMetrics(**kwargs)


def test_load_rejects_inconsistent_state(z64):
    state = feed(RankMe(), z64[:100], (100,)).state_dict()
    state["col_sum"] = state["col_sum"][:3]
    metric = RankMe()
    metric.load_state_dict(state)
    with pytest.raises(ValueError, match="inconsistent state shapes"):
        metric.compute()
    state2 = feed(RankMe(), z64[:100], (100,)).state_dict()
    state2["scatter"] = state2["scatter"].clone()
    state2["scatter"][0, 1] = float("inf")
    metric2 = RankMe()
    metric2.load_state_dict(state2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        metric2.update(z64[:3])


def test_import_is_lazy_and_missing_extra_is_named():
    code = (
        "import sys, rankme_fast\n"
        "assert 'torchmetrics' not in sys.modules and 'lightning' not in sys.modules, sorted(sys.modules)\n"
        "sys.modules['torchmetrics'] = None\n"  # simulate the extra not being installed
        "try:\n"
        "    import rankme_fast.integrations.torchmetrics\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_child_env())
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR" in out.stdout and 'pip install "rankme_fast[torchmetrics]"' in out.stdout


def _child_env() -> dict:
    from tests.conftest import rank_env

    env = rank_env(0, 2, 0)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


# ---------------------------------------------------------------------------------------------
# DDP: two gloo processes


def _ddp(tmp_path, cfg):
    from tests.test_distributed import launch

    worker = __import__("pathlib").Path(__file__).resolve().parent / "tm_dist_worker.py"
    codes, logs, out = launch(cfg, tmp_path, worker=worker, timeout=180)
    results = []
    for r in range(2):
        ok = out / f"rank{r}.json"
        err = out / f"rank{r}.error.json"
        results.append(json.loads(ok.read_text()) if ok.exists() else
                       {"error": json.loads(err.read_text()) if err.exists() else logs[r]})
    return codes, results


needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@needs_gloo
@pytest.mark.parametrize("splits", [(500, 300), (800, 0)], ids=["both", "rank1-empty"])
def test_ddp_equals_single_process(tmp_path, splits):
    n, d = 1000, 16
    cfg = {"n": n, "d": d, "seed": 3, "splits": list(splits), "batch": 64, "dtype": "float32", "metric": "RankMe",
           "second_round": [100, 100]}
    codes, res = _ddp(tmp_path, cfg)
    assert codes == [0, 0], res
    z = full_rank(n, d, 3, torch.float32)
    want1 = np_rankme_convention(ref_sv(z[:800]), "paper")
    want2 = np_rankme_convention(ref_sv(z), "paper")
    for r in range(2):
        assert rel(res[r]["first"], want1) < TOL
        assert res[r]["local_rows_after_compute"] == splits[r]  # unsync: back to the local state
        assert rel(res[r]["second"], want2) < TOL  # accumulation continues after a compute
    # the sync: a gather of 5 integers per rank, then float64 all_reduces of d and d*d values; nothing else
    for r in range(2):
        calls = res[r]["calls"]
        gathers = [c for c in calls if "gather" in c["op"] or "broadcast" in c["op"] or "scatter" in c["op"]]
        assert all(c["input_numel"] <= 5 and c["dtypes"] == ["torch.int64"] for c in gathers), gathers
        reduces = [c for c in calls if c["op"] == "all_reduce"]
        assert [c["numel"] for c in reduces] == [d, d * d, d, d * d], reduces  # two computes
        assert all(c["dtypes"] == ["torch.float64"] for c in reduces)


@needs_gloo
def test_ddp_spectral_metrics(tmp_path):
    n, d = 700, 12
    cfg = {"n": n, "d": d, "seed": 5, "splits": [300, 400], "batch": 50, "dtype": "bfloat16",
           "metric": "SpectralMetrics", "kwargs": {"metrics": ["rankme", "collapse_auc", "stable_rank"]}}
    codes, res = _ddp(tmp_path, cfg)
    assert codes == [0, 0], res
    z = full_rank(n, d, 5, torch.bfloat16)
    for r in range(2):
        for name in ("rankme", "collapse_auc", "stable_rank"):
            want = np_metric(name, ref_sv(z, center=name == "collapse_auc"))
            assert rel(res[r]["first"][name], want) < TOL, name


@needs_gloo
def test_ddp_feature_mismatch_fails_on_every_rank(tmp_path):
    cfg = {"n": 200, "d": 8, "seed": 1, "splits": [100, 100], "batch": 40, "metric": "RankMe",
           "d_of_rank": {"1": 6}}
    codes, res = _ddp(tmp_path, cfg)
    assert codes == [1, 1], res
    for r in range(2):
        msg = res[r]["error"]["message"]
        assert res[r]["error"]["type"] == "ValueError"
        assert "rank 0: d=8, rank 1: d=6" in msg and "differ" in msg


@pytest.mark.parametrize("kind", ("rank1", "rank8", "exp"))
@pytest.mark.parametrize("shape", ((600, 24), (40, 100), (300, 1)), ids=("N>d", "N<d", "d=1"))
@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
def test_collapsed_spectra_and_odd_shapes(kind, shape, center):
    """Collapsed (rank-1, rank-8) and fast-decaying spectra, N < d and d = 1, fed in uneven batches: every
    metric of SpectralMetrics within the exact contract (DESIGN §3: RankMe 1e-4, σ-based ratios alike) of
    the float64 SVD of the concatenated rows."""
    from rankme_fast.demo import make_embeddings
    from rankme_fast.spectrum import EXACT_RANKME_RTOL

    z = make_embeddings(*shape, kind, dtype=torch.float64, seed=12, offset=0.5).to(torch.float32)
    names = ("rankme", "collapse_auc", "stable_rank", "participation_ratio", "nesum")
    metric = feed(SpectralMetrics(names, center=center), z, (7, 33, 16))
    out = metric.compute()
    sv = ref_sv(z, center=center)
    if float(sv.max()) == 0.0:
        pytest.skip("centring a single column of equal rows leaves nothing")
    for name in names:
        assert rel(out[name], np_metric(name, sv)) < EXACT_RANKME_RTOL, (name, float(out[name]), np_metric(name, sv))
