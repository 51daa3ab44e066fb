"""GramAccumulator.all_reduce over torch.distributed (DESIGN §5), with two real gloo processes on CPU.

Each rank (tests/dist_worker.py) accumulates its own shard of a seeded matrix in batches and calls
``acc.all_reduce()``; both ranks must then hold the state of the whole matrix: every σ_k within 1e-9·σ_1
and RankMe within 1e-9 of a single-process GramAccumulator over all rows, and within the DESIGN §3
contract of the float64 SVD of the concatenated rows. A rank with a different d must make *both*
processes fail with a message naming that rank and both d values — never hang.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

import rankme_fast
from rankme_fast.demo import make_embeddings
from rankme_fast.gram import GramAccumulator
from rankme_fast.spectrum import EXACT_RANKME_RTOL
from tests.conftest import launch_ranks, np_rankme, ref_sv, rel_err, sv_err

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
WORLD = 2
TIMEOUT = 120  # seconds for the whole group; a hang fails the test instead of blocking the suite
TOL = 1e-9  # distributed vs single process, relative to σ_1 (σ) / relative (RankMe)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def launch(cfg: dict, tmp_path: Path, worker: Path = WORKER, timeout: float = TIMEOUT):
    """Run WORLD ``worker`` processes on ``cfg``; return (return codes, logs, out dir)."""
    return launch_ranks(cfg, tmp_path, worker, WORLD, timeout)


def full_matrix(cfg: dict) -> torch.Tensor:
    dtype = getattr(torch, cfg.get("dtype", "float64"))
    return make_embeddings(cfg["n"], cfg["d"], cfg["kind"], dtype=torch.float64, seed=cfg["seed"],
                           offset=cfg.get("offset", 0.0)).to(dtype)


def rankme_tol(ref: torch.Tensor) -> float:
    return 1e-6 if float(ref.min()) >= 1e-3 * float(ref.max()) else EXACT_RANKME_RTOL


# rows of the concatenated matrix per rank: uneven, one rank with no rows (and never an update), one rank
# with only an empty (0, d) batch.
CASES = {
    "uneven_f64": dict(kind="power1", n=3001, d=40, seed=5, offset=4.0, dtype="float64", splits=[1234, 1767],
                       batch=300),
    "rank0_no_rows_f32": dict(kind="flat", n=2000, d=24, seed=6, offset=-3.0, dtype="float32", splits=[0, 2000],
                              batch=333),
    "rank1_empty_batch_torch_backend": dict(kind="power1", n=1500, d=33, seed=7, offset=1.0, dtype="float64",
                                            splits=[1500, 0], batch=128, empty_batch_ranks=[1], backend="torch"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_reduce_matches_single_process(tmp_path, case):
    cfg = CASES[case]
    codes, logs, out = launch(cfg, tmp_path)
    assert codes == [0] * WORLD, "worker failed:\n" + "\n".join(f"--- rank {r}:\n{t}" for r, t in enumerate(logs))
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    z = full_matrix(cfg)
    assert sum(cfg["splits"]) == z.shape[0]
    single = GramAccumulator(backend=cfg.get("backend"))
    for r0 in range(0, z.shape[0], cfg["batch"]):
        single.update(z[r0 : r0 + cfg["batch"]])
    z64 = z.to(torch.float64)
    want_batches = sum(math.ceil(s / cfg["batch"]) for s in cfg["splits"]) + len(cfg.get("empty_batch_ranks", []))

    for r, res in enumerate(results):
        what = f"{case}/rank {r}"
        assert Path(res["package"]).resolve() == Path(rankme_fast.__file__).resolve(), \
            f"{what}: worker imported {res['package']}, the tests import {rankme_fast.__file__}"
        assert res["same_object"] is True, f"{what}: all_reduce did not return the accumulator itself"
        assert res["local"]["n_rows"] == cfg["splits"][r], what
        assert (res["n_rows"], res["n_features"], res["n_batches"]) == (z.shape[0], cfg["d"], want_batches), what
        for center, key in ((False, "raw"), (True, "centred")):
            sv = res[f"sv_{key}"]
            ref = ref_sv(z, center)
            s1 = single.spectrum(center).singular_values
            assert sv.dtype == torch.float64 and sv.shape == ref.shape == s1.shape, what
            e1 = sv_err(sv, s1)
            assert e1 <= TOL, f"{what} {key}: σ vs single process {e1:.3e} > {TOL:g}"
            r1 = rel_err(res[f"rankme_{key}"], single.rankme(center=center))
            assert r1 <= TOL, f"{what} {key}: RankMe vs single process {r1:.3e} > {TOL:g}"
            e = sv_err(sv, ref)
            assert e <= 1e-6, f"{what} {key}: σ vs float64 SVD {e:.3e}"
            want = np_rankme(ref.numpy())
            assert rel_err(res[f"rankme_{key}"], want) <= rankme_tol(ref), f"{what} {key}: RankMe vs float64 SVD"
            v = z64 - z64.mean(0) if center else z64
            g_ref = v.T @ v
            eg = float((res[f"gram_{key}"] - g_ref).abs().max() / g_ref.abs().max())
            assert eg <= 1e-12, f"{what} {key}: Gram vs float64 ZᵀZ {eg:.3e}"
        em = float((res["mean"] - z64.mean(0)).abs().max())
        assert em <= 1e-13 * (1.0 + abs(cfg["offset"])), f"{what}: mean error {em:.3e}"

    # both ranks hold the same global state
    a, b = results
    for key in ("sv_raw", "sv_centred"):
        assert sv_err(a[key], b[key]) <= 1e-12, f"{case}: ranks disagree on {key}"
    for key in ("rankme_raw", "rankme_centred"):
        assert rel_err(a[key], b[key]) <= 1e-12, f"{case}: ranks disagree on {key}"


@pytest.mark.parametrize("scale", (1e-170, 1e170), ids=("1e-170", "1e170"))
def test_all_reduce_of_tiny_and_huge_embeddings(tmp_path, scale):
    """Squares of |z| ~ 1e∓170 leave float64's range: each rank keeps z·2^k, the gather agrees on one common
    exponent (its 5th integer), and the reduced σ and RankMe are those of the float64 SVD (issue 14, item 8)."""
    cfg = dict(kind="power1", n=1200, d=16, seed=9, offset=0.5, dtype="float64", splits=[700, 500], batch=100,
               scale=scale)
    codes, logs, out = launch(cfg, tmp_path)
    assert codes == [0] * WORLD, "worker failed:\n" + "\n".join(f"--- rank {r}:\n{t}" for r, t in enumerate(logs))
    z = full_matrix(cfg) * scale
    for r in range(WORLD):
        res = torch.load(out / f"rank{r}.pt", weights_only=True)
        for center, key in ((False, "raw"), (True, "centred")):
            ref = ref_sv(z, center)
            assert sv_err(res[f"sv_{key}"], ref) <= 1e-9, (r, key)
            assert rel_err(res[f"rankme_{key}"], np_rankme(ref.numpy())) <= 1e-9, (r, key)


def test_feature_mismatch_fails_on_every_rank(tmp_path):
    cfg = dict(kind="power1", n=200, d=32, seed=8, offset=0.0, dtype="float32", splits=[120, 80], batch=50,
               d_of_rank={"1": 48})
    codes, logs, out = launch(cfg, tmp_path)
    for r in range(WORLD):
        what = f"rank {r} (rc={codes[r]}):\n{logs[r]}"
        assert codes[r] == 3, f"expected the worker to fail with the ValueError: {what}"
        err = json.loads((out / f"rank{r}.error.json").read_text())
        assert err["type"] == "ValueError", what
        msg = err["message"]
        assert "feature dimension differs across ranks" in msg, msg
        assert re.search(r"rank 0: d=32\b", msg) and re.search(r"rank 1: d=48\b", msg), msg
        assert re.search(r"\brank 1 differs from d=32\b", msg), msg
        assert not (out / f"rank{r}.pt").exists()
        assert "ValueError" in logs[r] and "rank 1: d=48" in logs[r], what


def test_broken_rank_fails_on_every_rank(tmp_path):
    """A rank whose accumulator was poisoned by a (caught) NaN batch: every rank raises, naming it, and
    nobody is left waiting in a collective."""
    cfg = dict(kind="power1", n=200, d=16, seed=10, offset=0.0, dtype="float32", splits=[100, 100], batch=50,
               nan_ranks=[1])
    codes, logs, out = launch(cfg, tmp_path)
    for r in range(WORLD):
        assert codes[r] == 3, f"rank {r} (rc={codes[r]}):\n{logs[r]}"
        err = json.loads((out / f"rank{r}.error.json").read_text())
        assert err["type"] == "RuntimeError", err
        assert "the accumulator of rank 1 is unusable after an earlier error" in err["message"], err
        assert not (out / f"rank{r}.pt").exists()


def test_no_rows_on_any_rank_fails_on_every_rank(tmp_path):
    cfg = dict(kind="flat", n=10, d=8, seed=9, offset=0.0, dtype="float64", splits=[0, 0], batch=4,
               empty_batch_ranks=[0])
    codes, logs, out = launch(cfg, tmp_path)
    for r in range(WORLD):
        assert codes[r] == 3, f"rank {r} (rc={codes[r]}):\n{logs[r]}"
        err = json.loads((out / f"rank{r}.error.json").read_text())
        err.pop("elapsed")
        assert err == {"type": "ValueError", "message": "GramAccumulator.all_reduce: no rank has accumulated any rows"}


@pytest.mark.parametrize("reload", ([], [1]), ids=("both_reduced", "rank1_reloaded_its_local_state"))
def test_second_all_reduce_fails_on_every_rank(tmp_path, reload):
    """A second all_reduce would count every row world-size times (4000 rows instead of 2000): it raises
    on every rank, naming the rank(s) still holding the reduced state, and changes nothing. A rank that
    loaded its local checkpoint back is no longer reduced (and is not named)."""
    cfg = dict(kind="power1", n=2000, d=12, seed=11, offset=1.0, dtype="float64", splits=[1200, 800], batch=500,
               twice=True, reload_ranks=reload)
    codes, logs, out = launch(cfg, tmp_path)
    who = "rank 0" if reload else "ranks 0, 1"
    for r in range(WORLD):
        assert codes[r] == 3, f"rank {r} (rc={codes[r]}):\n{logs[r]}"
        err = json.loads((out / f"rank{r}.error.json").read_text())
        assert err["type"] == "RuntimeError", err
        assert err["message"] == (f"GramAccumulator.all_reduce: the accumulator of {who} was already all-reduced "
                                  "(it holds the global state of every rank; reducing it again would count every "
                                  "row 2 times); call all_reduce once per accumulated state"), err
        after = json.loads((out / f"rank{r}.after.json").read_text())
        want_rows = cfg["splits"][r] if r in reload else 2000
        want_batches = math.ceil(cfg["splits"][r] / 500) if r in reload else 3 + 2
        assert after == {"n_rows": want_rows, "n_batches": want_batches}, (r, after)


def test_rank_failing_to_prepare_fails_on_every_rank(tmp_path):
    """Rank 1 cannot form its part (out of memory): it says so in the first small gather, so both ranks
    raise, naming it, before the d×d all_reduce the other one would otherwise wait in."""
    cfg = dict(kind="flat", n=300, d=8, seed=13, offset=0.0, dtype="float64", splits=[150, 150], batch=50,
               fail_prepare_ranks=[1])
    codes, logs, out = launch(cfg, tmp_path)
    assert codes == [3, 3], logs
    errs = [json.loads((out / f"rank{r}.error.json").read_text()) for r in range(WORLD)]
    head = "GramAccumulator.all_reduce: rank 1 could not prepare its state for the reduction"
    assert errs[0]["type"] == errs[1]["type"] == "RuntimeError", errs
    assert errs[0]["message"] == head + " (see the log of that rank)", errs
    assert errs[1]["message"] == head + ": MemoryError: simulated: cannot allocate the centred scatter matrix", errs


def test_absent_rank_times_out_instead_of_hanging(tmp_path):
    """Rank 1 never calls all_reduce (it raised before and went on, still in the group): rank 0, with
    timeout=5 s, raises RuntimeError naming the timeout after ~5 s, not after the group's 60 s."""
    cfg = dict(kind="flat", n=400, d=8, seed=12, offset=0.0, dtype="float64", splits=[200, 200], batch=100,
               absent_ranks=[1], absent_s=10, timeout=5)
    t0 = time.monotonic()
    codes, logs, out = launch(cfg, tmp_path, timeout=60)
    assert codes == [3, 0], logs
    err = json.loads((out / "rank0.error.json").read_text())
    assert err["type"] == "RuntimeError", err
    assert "did not complete within timeout=5 s" in err["message"], err
    assert "destroy_process_group" in err["message"], err
    assert re.search(r"\b1\b", err["message"].split("timeout=5 s", 1)[1]), f"rank 1 not named: {err}"
    assert 4.5 <= err["elapsed"] <= 12.0, err
    assert time.monotonic() - t0 < 45


@pytest.mark.parametrize("bad,exc,msg", [
    ("5", TypeError, "timeout must be a datetime.timedelta, a number of seconds or None, got str '5'"),
    (True, TypeError, "timeout must be a datetime.timedelta, a number of seconds or None, got bool True"),
    (0, ValueError, "timeout must be a positive, finite duration, got 0"),
    (float("nan"), ValueError, "timeout must be a positive, finite duration, got nan"),
    (-1.0, ValueError, "timeout must be a positive, finite duration, got -1.0"),
])
def test_all_reduce_timeout_is_validated(bad, exc, msg):
    from rankme_fast.distributed import all_reduce_accumulator

    acc = GramAccumulator()
    acc.update(torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(exc, match=re.escape(msg)):
        all_reduce_accumulator(acc, timeout=bad)


@pytest.mark.parametrize("state", ("with_rows", "empty"))
def test_all_reduce_without_process_group_raises(state):
    assert not torch.distributed.is_initialized()
    acc = GramAccumulator()
    if state == "with_rows":
        acc.update(torch.randn(10, 4, dtype=torch.float64))
    g = acc.gram(center=True).clone() if acc.n_rows else None
    with pytest.raises(RuntimeError, match=r"torch.distributed is not initialised; call "
                                           r"torch.distributed.init_process_group\(\) first"):
        acc.all_reduce()
    if g is not None:  # the failed call changed nothing
        assert acc.n_rows == 10 and torch.equal(acc.gram(center=True), g)
