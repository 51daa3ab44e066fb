"""rankme_fast.dist_score: embedding files scored across torch.distributed ranks (issue 16).

``plan`` is tested as a pure function (every row once, in order; whole files when there are enough; the
slowest rank's rows minimal / within one row of the others). ``accumulate_distributed`` runs in 2 (one
case: 3) real gloo processes (tests/dist_score_worker.py, group from ``init_from_env``) on .npy files
written here, and must give every rank the state of a single-process ``scoring.accumulate`` over the same
source: σ (raw and centred) within 1e-9·σ_1, RankMe within 1e-9, the Gram within 1e-12 — while each rank
read exactly its planned rows. A rank seeing another d, or a corrupt file, or NaN rows, makes every rank
raise, naming it; nothing hangs (each launch is bounded by TIMEOUT).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rankme_fast
from rankme_fast import dist_score
from rankme_fast.demo import make_embeddings
from rankme_fast.dist_score import plan
from rankme_fast.scoring import accumulate
from tests.conftest import free_port, launch_ranks, rank_env, rel_err, sv_err

WORKER = Path(__file__).resolve().parent / "dist_score_worker.py"
TIMEOUT = 120  # seconds for the whole group; a hang fails the test instead of blocking the suite
TOL = 1e-9  # distributed vs single process: σ relative to σ_1, RankMe relative

dist_only = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                               reason="torch.distributed with gloo is not available")


# -- plan: a pure function -----------------------------------------------------------------------------


def _all_parts(rows, world, max_rows=None):
    return [plan(rows, world, k, max_rows) for k in range(world)]


def _optimal_bottleneck(sizes, world):
    """Smallest possible largest group of ``world`` contiguous non-empty groups (brute force)."""
    n = len(sizes)
    best = None
    for cuts in itertools.combinations(range(1, n), world - 1):
        bounds = (0,) + cuts + (n,)
        worst = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


PLAN_ROWS = [[7], [1], [0, 3], [5, 5], [50, 80, 30], [1] * 10, [100, 1, 1, 1, 100], [3, 0, 4, 0, 0, 9, 2],
             [10, 20, 30, 40, 50, 60], [0, 0], [2, 1000, 2, 2]]


@pytest.mark.parametrize("world", (1, 2, 3, 4, 7))
@pytest.mark.parametrize("rows", PLAN_ROWS, ids=lambda r: "rows" + "_".join(map(str, r)))
@pytest.mark.parametrize("max_rows", (None, 1, 4, 55, 10**9), ids=lambda m: f"max{m}")
def test_plan_covers_every_row_once_in_order(rows, world, max_rows):
    parts = _all_parts(rows, world, max_rows)
    want = sum(rows) if max_rows is None else min(sum(rows), max_rows)
    # the parts of ranks 0, 1, ... concatenated are the first `want` rows of the concatenation, in order
    flat = [(i, r0, r1) for part in parts for (i, r0, r1) in part]
    assert all(r0 < r1 for _, r0, r1 in flat), parts
    seen = [(i, r) for i, r0, r1 in flat for r in range(r0, r1)]
    expect = [(i, r) for i, n in enumerate(rows) for r in range(n)][:want]
    assert seen == expect, parts
    assert _all_parts(rows, world, max_rows) == parts  # deterministic
    eff, left = [], want
    for n in rows:
        eff.append(min(n, left))
        left -= eff[-1]
    files = [i for i, n in enumerate(eff) if n]
    loads = [sum(r1 - r0 for _, r0, r1 in p) for p in parts]
    if len(files) >= world:  # whole files, each rank at least one, the largest load minimal
        assert all(p for p in parts), parts
        assert all(r0 == 0 and r1 == eff[i] for i, r0, r1 in flat), parts
        assert max(loads) == _optimal_bottleneck([eff[i] for i in files], world), (parts, loads)
    else:  # row ranges: ⌈N/P⌉ or ⌊N/P⌋ rows, the larger share first
        assert loads == sorted(loads, reverse=True) and max(loads) - min(loads) <= 1, loads
        assert sum(1 for p in parts if not p) == max(0, world - want), parts


def test_plan_examples():
    assert _all_parts([50, 80, 30], 2) == [[(0, 0, 50)], [(1, 0, 80), (2, 0, 30)]]
    assert _all_parts([50, 80, 30], 2, max_rows=100) == [[(0, 0, 50)], [(1, 0, 50)]]
    assert _all_parts([101], 2) == [[(0, 0, 51)], [(0, 51, 101)]]
    assert _all_parts([101], 2, max_rows=61) == [[(0, 0, 31)], [(0, 31, 61)]]
    assert _all_parts([1], 2) == [[(0, 0, 1)], []]
    assert _all_parts([40, 35], 3) == [[(0, 0, 25)], [(0, 25, 40), (1, 0, 10)], [(1, 10, 35)]]
    assert _all_parts([0, 5, 0, 7], 2) == [[(1, 0, 5)], [(3, 0, 7)]]
    assert _all_parts([0, 0], 3) == [[], [], []]
    assert plan(np.array([4, 6], dtype=np.int64), 2, 1) == [(1, 0, 6)]  # NumPy counts are fine


@pytest.mark.parametrize("args,msg", [
    (([5], 0, 0), "world must be an integer >= 1, got 0"),
    (([5], 2, 2), "rank must be < world = 2, got 2"),
    (([5], 2, -1), "rank must be an integer >= 0, got -1"),
    (([5], True, 0), "world must be an integer >= 1, got True"),
    (([5, -1], 2, 0), "rows[1] must be an integer >= 0, got -1"),
    (([5, 2.0], 2, 0), "rows[1] must be an integer >= 0, got 2.0"),
    (([5], 2, 0, 0), "max_rows must be an integer >= 1, got 0"),
])
def test_plan_rejects_bad_arguments(args, msg):
    with pytest.raises(ValueError, match=re.escape("plan: " + msg)):
        plan(*args)


def test_disagreement_names_ranks_and_values():
    from rankme_fast.dist_score import _check_same, _disagreement

    assert _disagreement("d", [32, 32, 32]) is None
    assert _disagreement("d", [32, 64]) == "rank 1 sees d = 64, rank 0 d = 32"
    assert _disagreement("d", [64, 32, 32, 16]) == "rank 0 sees d = 64, rank 3 sees d = 16, ranks 1, 2 d = 32"
    head = dict(d=8, dtype="float32", n_files=2, rows=[10, 20], max_rows=None, names=["a.npy", "b.npy"])
    _check_same([head, dict(head)], "src")
    with pytest.raises(ValueError, match=re.escape("rank 1 sees rows of file 1 (b.npy) = 21, rank 0 rows of file "
                                                   "1 (b.npy) = 20")):
        _check_same([head, dict(head, rows=[10, 21])], "src")
    with pytest.raises(ValueError, match=re.escape("rank 1 sees max_rows = 5, rank 0 max_rows = None")):
        _check_same([head, dict(head, max_rows=5)], "src")
    with pytest.raises(ValueError, match=re.escape("rank 1 sees dtype = 'float64', rank 0 dtype = 'float32'")):
        _check_same([head, dict(head, dtype="float64")], "src")


# -- without a process group --------------------------------------------------------------------------


def test_accumulate_distributed_without_process_group_raises(tmp_path):
    assert not torch.distributed.is_initialized()
    np.save(tmp_path / "x.npy", np.ones((4, 3)))
    with pytest.raises(RuntimeError, match=r"accumulate_distributed: torch.distributed is not initialised"):
        dist_score.accumulate_distributed(str(tmp_path / "x.npy"))


def test_init_from_env_outside_torchrun(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert dist_score.init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist_score.init_from_env() is None
    assert dist_score.is_rank0()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT are not set"):
        dist_score.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE must be an integer, got 'two'"):
        dist_score.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(RuntimeError, match=r"RANK=2 is outside \[0, WORLD_SIZE=2\)"):
        dist_score.init_from_env()
    assert not torch.distributed.is_initialized()


# -- real processes ------------------------------------------------------------------------------------


def launch(cfg: dict, tmp_path: Path, world: int = 2):
    """Run ``world`` workers on ``cfg``; return (return codes, logs, out dir)."""
    return launch_ranks(cfg, tmp_path, WORKER, world, TIMEOUT)


def _write(path: Path, n: int, d: int, dtype=np.float32, seed: int = 3, offset: float = 2.0) -> np.ndarray:
    z = make_embeddings(n, d, "power1", dtype=torch.float64, seed=seed, offset=offset).numpy().astype(dtype) \
        if n else np.zeros((0, d), dtype=dtype)
    np.save(path, z)
    return z


def _shards(tmp_path: Path, rows, d: int = 12, dtype=np.float32) -> str:
    src = tmp_path / "shards"
    src.mkdir()
    for i, n in enumerate(rows):
        _write(src / f"part_{i}.npy", n, d, dtype, seed=20 + i, offset=1.0 + i)
    return str(src)


def _one_file(tmp_path: Path, n: int, d: int = 12, dtype=np.float64) -> str:
    _write(tmp_path / "emb.npy", n, d, dtype)
    return str(tmp_path / "emb.npy")


# name -> (source builder, rows of its files, world, max_rows, chunk_rows, the plan of every rank)
CASES = {
    "three_shards_whole_files": (lambda p: _shards(p, [50, 80, 30]), [50, 80, 30], 2, None, 16,
                                 [[(0, 0, 50)], [(1, 0, 80), (2, 0, 30)]]),
    "one_file_row_ranges": (lambda p: _one_file(p, 101), [101], 2, None, 16, [[(0, 0, 51)], [(0, 51, 101)]]),
    "max_rows_inside_a_shard": (lambda p: _shards(p, [50, 80, 30]), [50, 80, 30], 2, 100, 16,
                                [[(0, 0, 50)], [(1, 0, 50)]]),
    "max_rows_inside_one_file": (lambda p: _one_file(p, 101), [101], 2, 61, 7, [[(0, 0, 31)], [(0, 31, 61)]]),
    "fewer_rows_than_ranks": (lambda p: _one_file(p, 1), [1], 2, None, None, [[(0, 0, 1)], []]),
    "empty_shard_skipped_f64": (lambda p: _shards(p, [30, 0, 45], dtype=np.float64), [30, 0, 45], 2, None, None,
                                [[(0, 0, 30)], [(2, 0, 45)]]),
    "three_ranks_ranges_span_files": (lambda p: _shards(p, [40, 35]), [40, 35], 3, None, 9,
                                      [[(0, 0, 25)], [(0, 25, 40), (1, 0, 10)], [(1, 10, 35)]]),
}


def _names(source: str):
    return [os.path.basename(f) for f in rankme_fast.io.expand(source)]


def _merged(reads):
    """Consecutive reads of adjacent rows of one file joined: the ranges a rank read."""
    out = []
    for name, r0, r1 in reads:
        if out and out[-1][0] == name and out[-1][2] == r0:
            out[-1][2] = r1
        else:
            out.append([name, r0, r1])
    return [tuple(x) for x in out]


@dist_only
@pytest.mark.parametrize("case", sorted(CASES))
def test_accumulate_distributed_matches_single_process(tmp_path, case):
    build, rows, world, max_rows, chunk_rows, want_plan = CASES[case]
    source = build(tmp_path)
    assert [plan(rows, world, k, max_rows) for k in range(world)] == want_plan
    codes, logs, out = launch(dict(source=source, max_rows=max_rows, chunk_rows=chunk_rows), tmp_path, world)
    assert codes == [0] * world, "worker failed:\n" + "\n".join(f"--- rank {r}:\n{t}" for r, t in enumerate(logs))

    single, info = accumulate(source, max_rows=max_rows, chunk_rows=chunk_rows, progress=False)
    names = _names(source)
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r, res in enumerate(results):
        what = f"{case}/rank {r}"
        assert Path(res["package"]).resolve() == Path(rankme_fast.__file__).resolve(), what
        assert res["init"] == res["again"] == [r, world] and res["is_rank0"] is (r == 0), what
        assert res["info"] == [list(info[0]), info[1], info[2], info[3]], what
        assert res["n_rows"] == single.n_rows == (sum(rows) if max_rows is None else min(sum(rows), max_rows)), what
        # this rank read exactly its planned rows, in chunks of at most chunk_rows
        assert _merged(res["reads"]) == [(names[i], r0, r1) for i, r0, r1 in want_plan[r]], (what, res["reads"])
        if chunk_rows is not None:
            assert all(r1 - r0 <= chunk_rows for _, r0, r1 in res["reads"]), what
        for center, key in ((False, "raw"), (True, "centred")):
            ref = single.spectrum(center=center).singular_values
            sv = res[f"sv_{key}"]
            g, g_ref = res[f"gram_{key}"], single.gram(center=center)
            if float(ref.max()) == 0.0:  # one row, centred: exactly zero
                assert float(sv.abs().max()) == 0.0 and float(g.abs().max()) == 0.0, what
                continue
            assert sv_err(sv, ref) <= TOL, f"{what} {key}: σ vs single process {sv_err(sv, ref):.3e}"
            eg = float((g - g_ref).abs().max() / g_ref.abs().max())
            assert eg <= 1e-12, f"{what} {key}: Gram vs single process {eg:.3e}"
        assert rel_err(res["rankme_raw"], single.rankme(center=False)) <= TOL, what
    for r in range(1, world):  # every rank holds the same global state
        assert sv_err(results[r]["sv_raw"], results[0]["sv_raw"]) <= 1e-12, case


def _errors(out: Path, world: int = 2):
    return [json.loads((out / f"rank{r}.error.json").read_text()) for r in range(world)]


@dist_only
def test_feature_mismatch_fails_on_every_rank_before_reading(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a" / "emb.npy", 40, 32)
    _write(tmp_path / "b" / "emb.npy", 40, 64)
    cfg = dict(source=str(tmp_path / "a" / "emb.npy"), source_of_rank={"1": str(tmp_path / "b" / "emb.npy")})
    codes, logs, out = launch(cfg, tmp_path)
    assert codes == [3, 3], logs
    for r, err in enumerate(_errors(out)):
        assert err["type"] == "ValueError", (r, err)
        assert "accumulate_distributed: the ranks see different sources" in err["message"], err
        assert "rank 1 sees d = 64, rank 0 d = 32" in err["message"], err
        assert err["reads"] == [], (r, err)  # refused before any row was read
        assert not (out / f"rank{r}.pt").exists()


@dist_only
def test_corrupt_file_on_one_rank_fails_on_every_rank(tmp_path):
    good = _one_file(tmp_path, 40)
    bad = tmp_path / "corrupt.npy"
    bad.write_bytes(b"\x93NUMPY\x01\x00" + b"garbage, not a header" * 3)
    with pytest.raises(ValueError) as single:
        accumulate(str(bad), progress=False)
    codes, logs, out = launch(dict(source=good, source_of_rank={"1": str(bad)}), tmp_path)
    assert codes == [3, 3], logs
    e0, e1 = _errors(out)
    assert e1 == {"type": "ValueError", "message": str(single.value), "reads": [], "init": [1, 2]}, e1
    assert e0["type"] == "ValueError" and e0["reads"] == [], e0
    assert e0["message"] == (f"accumulate_distributed: rank 1 failed to open {good} (this is rank 0): "
                             f"rank 1: ValueError: {single.value}"), e0


@dist_only
def test_nan_rows_read_by_one_rank_fail_on_every_rank(tmp_path):
    """Headers agree; the NaN is in the shard only rank 1 reads: rank 1 raises what scoring.accumulate says
    (file, rows, count), rank 0 an error naming rank 1 — before the reduction, so neither waits in it."""
    source = _shards(tmp_path, [50, 80, 30])
    path = os.path.join(source, "part_2.npy")
    z = np.load(path)
    z[7, 3] = np.nan
    np.save(path, z)
    with pytest.raises(ValueError) as single:
        accumulate(source, chunk_rows=16, progress=False)
    assert "part_2.npy (rows 0..16)" in str(single.value) and "1 non-finite values (1 NaN, 0 Inf)" in str(single.value)
    codes, logs, out = launch(dict(source=source, chunk_rows=16), tmp_path)
    assert codes == [3, 3], logs
    e0, e1 = _errors(out)
    assert (e1["type"], e1["message"]) == ("ValueError", str(single.value)), e1
    assert e0["type"] == "ValueError", e0
    assert e0["message"] == (f"accumulate_distributed: rank 1 failed to read its rows of {source} (this is rank 0): "
                             f"rank 1: ValueError: {single.value}"), e0
    assert _merged(e0["reads"]) == [("part_0.npy", 0, 50)], e0  # rank 0 read its own shard only


# ---------------------------------------------------------------------------------------------- issue 16:
# rf.score / rf.compare(distributed=True) and `torchrun -m rankme_fast score` against one process


def test_score_and_compare_distributed_equal_single_process(tmp_path):
    from rankme_fast.scoring import score

    src = _shards(tmp_path, [300, 0, 250, 170], d=16)
    one = tmp_path / "one.npy"
    _write(one, 500, 16, seed=9)
    cfg = {"mode": "score", "source": src, "chunk_rows": 64, "compare": [src, str(one)], "compare_max_rows": 400}
    codes, logs, out = launch(cfg, tmp_path)
    assert codes == [0, 0], "\n".join(logs)
    ref = score(src, "rankme,collapse_auc", convergence=True, seed=5, chunk_rows=64)
    ref_cmp = rankme_fast.compare([src, str(one)], metrics="rankme,collapse_auc", max_rows=400, seed=3,
                                  labels=[1.0, 2.0])
    for r in range(2):
        got = torch.load(out / f"rank{r}.pt", weights_only=False)
        s = got["score"]
        assert s["n_rows"] == ref.n_rows == 720
        for m, v in ref.metrics.items():
            assert abs(s["metrics"][m] - v) <= 1e-9 * abs(v), (r, m)
        for a, b in zip(s["convergence"], ref.convergence):
            assert a["n_rows"] == b["n_rows"]
            for m, v in b["metrics"].items():
                assert abs(a["metrics"][m] - v) <= 1e-9 * abs(v), (r, m, a["fraction"])
        c = got["compare"]
        assert [m["name"] for m in c["models"]] == [row["name"] for row in ref_cmp.table]
        for m_got, m_ref in zip(c["models"], ref_cmp.table):
            assert m_got["n_rows"] == m_ref["n_rows"] == 400
            assert abs(m_got["rankme"] - m_ref["rankme"]) <= 1e-9 * m_ref["rankme"]
    reads = [torch.load(out / f"rank{r}.pt", weights_only=False)["reads"] for r in range(2)]
    assert reads[0] and reads[1]  # both ranks read part of every source


def test_torchrun_cli_prints_once_and_equals_single_process(tmp_path):
    from rankme_fast.scoring import score

    src = _shards(tmp_path, [200, 180, 90], d=10)
    port = free_port()
    env = rank_env(0, 1, port)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "rankme_fast", "score", src, "--json", "--metrics", "rankme,collapse_auc", "-q"]
    p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout  # rank 0 prints, rank 1 does not
    got = json.loads(lines[0])
    ref = score(src, "rankme,collapse_auc")
    assert got["n_rows"] == 470
    for m, v in ref.metrics.items():
        assert abs(got["metrics"][m] - v) <= 1e-9 * abs(v)
