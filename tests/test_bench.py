"""``rankme_fast.bench`` and ``rankme-fast bench`` (issue 12) on small shapes: every route runs or is
skipped with its reason, exact ones agree with the float64 SVD, the float32 Gram is visibly wrong on
collapsed input, and the CLI's table / JSON / CSV / plot / exit codes."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import importlib

import rankme_fast as rf

B = importlib.import_module("rankme_fast.bench")  # the package attribute `bench` is the function
from tests.conftest import np_rankme

SMALL = (3000, 48)


@pytest.fixture(scope="module")
def rank8():
    return B.bench(shape=SMALL, spectrum="rank8+noise", repeats=1)


def test_every_route_runs_or_says_why(rank8):
    names = [r.name for r in rank8.rows]
    assert set(names) == {r.name for r in B.routes("cpu")}
    for r in rank8.rows:
        assert r.status == "ok" or r.status.startswith("skipped: "), (r.name, r.status)
        if r.status == "ok":
            assert r.median_s > 0 and r.min_s <= r.median_s <= r.max_s and r.repeats == 1
            assert r.peak_mem_bytes is not None and r.peak_mem_bytes >= 0
            assert r.rankme_rel_err is not None and r.sigma_err is not None and r.n_sigma >= 1
    assert rank8.row("sklearn-pca").status.startswith("skipped: PCA always centres")


def test_exact_routes_agree_with_float64_svd(rank8):
    from rankme_fast.demo import make_embeddings, singular_values  # noqa: PLC0415
    x = make_embeddings(*SMALL, "rank8_noise", dtype=torch.float32, seed=0)
    ref = np_rankme(np.linalg.svd(x.double().numpy(), compute_uv=False))
    assert rank8.reference.startswith("float64 SVD")
    assert rank8.reference_rankme == pytest.approx(ref, rel=1e-12)
    assert rank8.truth_rankme == pytest.approx(np_rankme(singular_values("rank8_noise", SMALL[1]).numpy()), rel=1e-12)
    for r in rank8.rows:
        if r.exact and r.status == "ok":
            assert r.rankme_rel_err < 1e-4 and r.sigma_err < 1e-6, r.name
    # what most hand-written code does: float32 x.T @ x inflates RankMe on collapsed input
    assert rank8.row("torch-gram-fp32").rankme_rel_err > 1e-3
    assert rank8.row("gram").rankme_rel_err < 1e-6


def test_rank1_float32_gram_visibly_wrong():
    res = B.bench(shape=(4000, 64), spectrum="rank1", strategies="gram,torch-gram-fp32,torch-svdvals-fp64", repeats=1)
    assert [r.name for r in res.rows] == ["gram", "torch-gram-fp32", "torch-svdvals-fp64"]
    assert res.row("torch-gram-fp32").rankme_rel_err > 1e-3
    assert res.row("gram").rankme_rel_err < 1e-4


def test_centred_and_user_matrix():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(800, 30, generator=g) + 5.0
    res = B.bench(x, strategies=["gram", "svd", "sklearn-pca"], center=True, repeats=2)
    assert res.source == "the given matrix" and res.truth_rankme is None and res.center
    ref = np_rankme(np.linalg.svd((x.double() - x.double().mean(0)).numpy(), compute_uv=False))
    assert res.row("gram").rankme == pytest.approx(ref, rel=1e-9)
    pca = res.row("sklearn-pca")
    assert pca.status == "ok" or "sklearn not installed" in pca.status


def test_path_source(tmp_path):
    x = torch.randn(500, 20, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "e.npy", x.numpy())
    res = B.bench(str(tmp_path / "e.npy"), strategies="gram", repeats=1)
    assert res.n == 500 and res.d == 20 and res.row("gram").rankme == pytest.approx(rf.rankme(x), rel=1e-12)


def test_predicted_too_slow_or_too_big_is_skipped(monkeypatch):
    res = B.bench(shape=(2000, 40), strategies="gram,svd,slq", repeats=1, timeout=1e-9)
    assert res.row("gram").status == "ok"  # the first route calibrates the model
    for name in ("svd", "slq"):
        assert res.row(name).status.startswith("skipped: predicted"), res.row(name).status
    assert res.reference.startswith("our exact float64 Gram")  # the float64 SVD did not fit in time
    # without gram in the race, a quick Gram on a row subset calibrates the prediction
    res = B.bench(shape=(2000, 40), strategies="svd,slq", repeats=1, timeout=1e-9)
    assert all(r.status.startswith("skipped: predicted") and r.estimate_s > 0 for r in res.rows)
    monkeypatch.setattr(B, "_free", lambda device: 1 << 20)  # 1 MiB free: a float64 copy is not attempted
    res = B.bench(shape=(2000, 40), strategies="svd,torch-gram-fp64", repeats=1)
    for r in res.rows:
        assert r.status.startswith("skipped: needs ~") and "quarter of" in r.status


@pytest.mark.parametrize("kwargs,pattern", [
    ({"strategies": "gram,qr"}, r"unknown strategies \['qr'\]"),
    ({"repeats": 0}, "repeats must be a positive int"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"spectrum": "zipf"}, "unknown spectrum 'zipf'"),
    ({"timeout": -1}, "timeout must be a positive number"),
    ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        B.bench(shape=(100, 10), **kwargs)


def _cli(*args, timeout=600):
    code = "import sys; from rankme_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_table_json_csv_plot(tmp_path):
    out_csv, out_png = tmp_path / "rows.csv", tmp_path / "pareto.png"
    res = _cli("bench", "--shape", "1500x32", "--spectrum", "rank8", "--strategies", "gram,torch-gram-fp32,lanczos",
               "--repeats", "2", "--csv", str(out_csv), "--plot", str(out_png))
    assert res.returncode == 0, res.stderr
    assert "reference: float64 SVD" in res.stdout and "torch-gram-fp32" in res.stdout
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["name"] for r in rows] == ["gram", "torch-gram-fp32", "lanczos"] and rows[0]["status"] == "ok"
    assert float(rows[0]["rankme_rel_err"]) < 1e-6 and rows[0]["repeats"] == "2"
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    import matplotlib.image as mpimg  # noqa: PLC0415
    img = mpimg.imread(out_png)
    assert img.shape[0] > 300 and img.shape[1] > 300 and float(img[..., :3].std()) > 0.01  # not blank
    res = _cli("bench", "--shape", "1500x32", "--strategies", "gram,svd", "--repeats", "1", "--json")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    assert [r["name"] for r in obj["rows"]] == ["gram", "svd"] and obj["n"] == 1500 and obj["d"] == 32
    assert obj["machine"]["torch"] == torch.__version__ and obj["reference"].startswith("float64 SVD")


def test_cli_list_names_every_route():
    res = _cli("bench", "--list")
    assert res.returncode == 0
    for name in B.route_names("cpu"):
        assert name in res.stdout, name
    assert "unavailable" in res.stdout  # cuda / triton here


@pytest.mark.parametrize("args,pattern", [
    (["--shape", "10x"], "shape must look like 20000x512"),
    (["--shape", "0x5"], "shape must be positive"),
    (["--strategies", "nope"], r"unknown strategies \['nope'\]"),
    (["--repeats", "0"], "repeats"),
    (["--timeout", "soon"], "expected a number of seconds"),
    (["--spectrum", "zipf"], "invalid choice"),
    (["x.npy", "--shape", "10x10"], "give a PATH or --shape, not both"),
    (["/nonexistent/e.npy"], "e.npy"),
])
def test_cli_bad_arguments_exit_2(args, pattern):
    res = _cli("bench", *args)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    import re  # noqa: PLC0415
    assert re.search(pattern, res.stderr), res.stderr


def test_cli_plot_without_matplotlib_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from rankme_fast.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", code, "bench", "--shape", "200x8", "--strategies", "gram",
                          "--repeats", "1", "--plot", str(tmp_path / "p.png")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "pip install 'rankme_fast[plot]'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shape", [(40, 300), (500, 1), (1, 30)], ids=["N<d", "d=1", "N=1"])
def test_odd_shapes_every_route_runs_or_says_why(shape):
    from rankme_fast.demo import make_embeddings  # noqa: PLC0415
    res = B.bench(shape=shape, spectrum="rank1", repeats=1)
    x = make_embeddings(*shape, "rank1", dtype=torch.float32, seed=0)
    ref = np_rankme(np.linalg.svd(x.double().numpy(), compute_uv=False))
    for r in res.rows:
        assert r.status == "ok" or r.status.startswith("skipped: "), (r.name, r.status)
        if r.exact and r.status == "ok":
            assert abs(r.rankme - ref) / ref < 1e-4, r.name
    for name in ("randomized", "lanczos"):  # top-k routes compute min(32, K) values
        assert res.row(name).status == "ok" and res.row(name).n_sigma == min(32, min(shape))
    if min(shape) < 6:
        assert "torch.lobpcg needs a Gram of size" in res.row("torch-lobpcg").status
