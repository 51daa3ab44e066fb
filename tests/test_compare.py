"""Issue 16: ``rf.compare`` / ``rankme-fast compare`` (ranking, label correlations against scipy, bootstrap,
seeded subsets), convergence of RankMe in N, spectrum plots, and the CLI polish (--each, --keep-going,
--version, metric spellings, the multi-tensor error before any table).

References: float64 ``torch.linalg.svdvals`` of the same rows and the DESIGN §2 formulas in NumPy; the
correlations are ``scipy.stats``' own functions on the same numbers.
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast.cli import main
from rankme_fast.compare import correlations, default_names, read_labels
from tests.conftest import np_collapse_auc, np_rankme, ref_sv

stats = pytest.importorskip("scipy.stats")
TOL = 1e-9


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def model(decay: float, n: int = 600, d: int = 24, seed: int = 0) -> np.ndarray:
    """Rows with singular values ∝ k^-decay: a larger decay is a more collapsed model (lower RankMe)."""
    g = np.random.default_rng(seed)
    return (g.standard_normal((n, d)) * np.arange(1, d + 1) ** -decay).astype(np.float32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    decays = {"ckpt_a.npy": 1.5, "ckpt_b.npy": 0.2, "ckpt_c.npy": 0.8, "ckpt_d.npy": 1.1}
    xs = {}
    for i, (name, dec) in enumerate(decays.items()):
        xs[name] = model(dec, seed=i)
        np.save(root / name, xs[name])
    return root, xs


def paths_of(root, xs):
    return [str(root / n) for n in xs]


# --------------------------------------------------------------------------------------------- compare


def test_ranks_known_ordering_and_values(ckpts):
    root, xs = ckpts
    res = rf.compare(paths_of(root, xs), metrics=("rankme", "collapse_auc"))
    assert res.names == list(xs)  # basenames by default
    order = [row["name"] for row in res.table]
    assert order == ["ckpt_b.npy", "ckpt_c.npy", "ckpt_d.npy", "ckpt_a.npy"]  # by decreasing RankMe
    assert [row["rank"] for row in res.table] == [1, 2, 3, 4]
    for row in res.table:
        x = torch.from_numpy(xs[row["name"]])
        assert rel(row["rankme"], np_rankme(ref_sv(x))) < TOL
        assert rel(row["collapse_auc"], np_collapse_auc(ref_sv(x, center=True))) < TOL
        assert row["n_rows"] == 600 and row["d"] == 24
    assert res.correlations == {}


@pytest.mark.parametrize("higher", (True, False))
def test_correlations_equal_scipy(ckpts, higher):
    root, xs = ckpts
    labels = {"ckpt_a.npy": 61.0, "ckpt_b.npy": 70.5, "ckpt_c.npy": 64.0, "ckpt_d.npy": 66.0}
    res = rf.compare(paths_of(root, xs), metrics="rankme,effective_rank", labels=labels, higher_is_better=higher)
    for m in ("rankme", "effective_rank"):
        x = np.array([res.results[n].metrics[m] for n in res.names])
        y = np.array([labels[n] for n in res.names])
        good = y if higher else -y
        c = res.correlations[m]
        assert abs(c["spearman"] - stats.spearmanr(x, good).statistic) < 1e-12
        assert abs(c["kendall"] - stats.kendalltau(x, good).statistic) < 1e-12
        assert abs(c["weighted_tau"] - stats.weightedtau(x, good).statistic) < 1e-12
        top = res.names[int(np.argmax(x))]
        assert c["top1_regret"] == pytest.approx(good.max() - (labels[top] if higher else -labels[top]), abs=1e-12)
        assert c["n"] == 4
    # a label order that disagrees in one pair: tau-b = (5 - 1) / 6
    if higher:
        assert res.correlations["rankme"]["kendall"] == pytest.approx(4 / 6, abs=1e-12)
        assert res.correlations["rankme"]["top1_regret"] == 0.0


def test_ties_share_a_rank_and_the_regret_is_their_mean():
    x = model(0.5, seed=3)
    y = model(1.5, seed=4)
    res = rf.compare([x, x.copy(), y], names="p,q,r", labels=[1.0, 3.0, 2.0])
    ranks = {row["name"]: row["rank"] for row in res.table}
    assert ranks == {"p": 1, "q": 1, "r": 3}
    c = res.correlations["rankme"]
    assert c["top1_regret"] == pytest.approx(np.mean([3.0 - 1.0, 3.0 - 3.0]), abs=1e-12)
    vals = [res.results[n].metrics["rankme"] for n in ("p", "q", "r")]
    assert abs(c["kendall"] - stats.kendalltau(vals, [1.0, 3.0, 2.0]).statistic) < 1e-12


def test_two_models_and_direct_correlations():
    res = rf.compare([model(0.3), model(1.3, seed=1)], labels={"model_0": 0.9, "model_1": 0.4})
    c = res.correlations["rankme"]
    assert c["spearman"] == pytest.approx(1.0) and c["kendall"] == pytest.approx(1.0) and c["n"] == 2
    c2 = correlations([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    assert c2["kendall"] == pytest.approx(-1.0) and c2["top1_regret"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least two"):
        correlations([1.0], [1.0])


def test_label_errors_name_the_models(ckpts):
    root, xs = ckpts
    with pytest.raises(ValueError) as e:
        rf.compare(paths_of(root, xs), labels={"ckpt_a.npy": 1.0, "ckpt_z.npy": 2.0})
    msg = str(e.value)
    assert "unknown models: ckpt_z.npy" in msg and "without a label: ckpt_b.npy, ckpt_c.npy, ckpt_d.npy" in msg
    with pytest.raises(ValueError, match="3 labels for 4 models"):
        rf.compare(paths_of(root, xs), labels=[1, 2, 3])
    with pytest.raises(TypeError, match="must be a number"):
        rf.compare(paths_of(root, xs), labels={n: "x" for n in xs})
    with pytest.raises(TypeError, match="ONE model"):
        rf.compare(str(root / "ckpt_a.npy"))
    with pytest.raises(ValueError, match="repeated: a"):
        rf.compare(paths_of(root, xs), names="a,a,b,c")


def test_label_files(tmp_path):
    (tmp_path / "l.csv").write_text("model,acc,loss\nm1,0.5,2\nm2,0.7,1\n")
    assert read_labels(tmp_path / "l.csv", "acc") == {"m1": 0.5, "m2": 0.7}
    with pytest.raises(ValueError, match="--label-column"):
        read_labels(tmp_path / "l.csv")
    (tmp_path / "two.csv").write_text("name,top1\nm1,1\nm2,2\n")
    assert read_labels(tmp_path / "two.csv") == {"m1": 1.0, "m2": 2.0}
    (tmp_path / "l.json").write_text(json.dumps({"m1": {"acc": 0.1, "loss": 3}, "m2": {"acc": 0.2, "loss": 4}}))
    assert read_labels(tmp_path / "l.json", "loss") == {"m1": 3.0, "m2": 4.0}
    (tmp_path / "flat.json").write_text(json.dumps({"m1": 1, "m2": 2.5}))
    assert read_labels(tmp_path / "flat.json") == {"m1": 1.0, "m2": 2.5}
    (tmp_path / "bad.csv").write_text("name,acc\nm1,abc\n")
    with pytest.raises(ValueError, match="not a number"):
        read_labels(tmp_path / "bad.csv")


def test_default_names_are_the_shortest_distinct_suffixes(tmp_path):
    assert default_names(["runs/a/ckpt.npy", "runs/b/ckpt.npy", "x/other.npy"]) == ["a/ckpt.npy", "b/ckpt.npy",
                                                                                  "other.npy"]
    assert default_names([np.zeros((2, 2)), "e.npy"]) == ["model_0", "e.npy"]


def test_max_rows_uses_the_same_seeded_subset(ckpts):
    root, xs = ckpts
    res = rf.compare(paths_of(root, xs), max_rows=250, seed=7)
    idx = np.sort(np.random.default_rng(7).choice(600, size=250, replace=False))
    for n, x in xs.items():
        assert res.results[n].n_rows == 250
        assert rel(res.results[n].metrics["rankme"], np_rankme(ref_sv(torch.from_numpy(x[idx])))) < TOL
    arr = rf.compare([xs["ckpt_b.npy"]], max_rows=250, seed=7)  # arrays take the same subset as files
    assert rel(arr.results["model_0"].metrics["rankme"], res.results["ckpt_b.npy"].metrics["rankme"]) < 1e-12


def test_bootstrap_interval_matches_an_independent_poisson_bootstrap():
    x = model(0.7, n=300, d=12, seed=5)
    b, seed = 40, 3
    res = rf.compare([x], bootstrap=b, seed=seed)
    est = res.results["model_0"].metrics["rankme"]
    reps = []
    for j in range(b):
        w = np.random.default_rng([seed, 0x5EED, j]).poisson(1.0, size=x.shape[0])
        reps.append(np_rankme(ref_sv(torch.from_numpy(np.repeat(x, w, axis=0)))))
    med, lo, hi = np.quantile(reps, [0.5, 0.025, 0.975])
    got = res.table[0]["rankme_ci"]
    assert got[0] == pytest.approx(est - (med - lo), rel=1e-9) and got[1] == pytest.approx(est + (hi - med), rel=1e-9)
    assert got[0] <= est <= got[1]
    assert np.median(reps) < est  # repeated rows lower RankMe: why the interval is re-centred


def test_compare_outputs(ckpts, tmp_path):
    root, xs = ckpts
    res = rf.compare(paths_of(root, xs), labels=[1, 4, 3, 2], bootstrap=3)
    obj = json.loads(res.to_json())
    assert [m["name"] for m in obj["models"]] == [row["name"] for row in res.table]
    assert obj["correlations"]["rankme"]["n"] == 4
    res.to_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("rank,name,n_rows,d,rankme,label") and len(lines) == 5
    txt = res.table_str()
    assert "weighted_tau" in txt and txt.splitlines()[1].split()[1] == res.table[0]["name"]


# --------------------------------------------------------------------------------------------- plots


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_valid_pngs(ckpts, tmp_path):
    pytest.importorskip("matplotlib")
    root, xs = ckpts
    res = rf.compare(paths_of(root, xs), labels=[1, 4, 3, 2])
    fig = res.plot(tmp_path / "c.png")
    w, h = _png_size(tmp_path / "c.png")
    assert w > 800 and h > 300 and len(fig.axes) == 2
    legend = fig.axes[1].get_legend().get_texts()[0].get_text()
    assert f"Kendall τ = {res.correlations['rankme']['kendall']:.3f}" in legend
    s = rf.score(str(root / "ckpt_b.npy"), "rankme")
    ax = s.plot(tmp_path / "s.png")
    assert _png_size(tmp_path / "s.png")[0] > 300
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"RankMe {s.metrics['rankme']:.4g}" in t for t in labels)
    assert any(t.startswith("α-ReQ fit, k = 5..24") for t in labels)
    spec = rf.spectrum(torch.from_numpy(xs["ckpt_a.npy"]))
    ax2 = spec.plot()
    import matplotlib.axes  # noqa: PLC0415
    assert isinstance(ax2, matplotlib.axes.Axes)
    line = ax2.get_lines()[0]
    sv = ref_sv(torch.from_numpy(xs["ckpt_a.npy"])).numpy()
    np.testing.assert_allclose(line.get_ydata(), sv / sv[0], rtol=1e-9)


# --------------------------------------------------------------------------------------------- convergence


def test_convergence_subsets_and_warning(tmp_path):
    x = model(0.0, n=300, d=64, seed=9)
    np.save(tmp_path / "e.npy", x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = rf.score(str(tmp_path / "e.npy"), "rankme,collapse_auc", convergence=True, seed=2, chunk_rows=97)
    conv = res.convergence
    assert [c["fraction"] for c in conv] == [0.125, 0.25, 0.5, 1.0]
    from rankme_fast._rows import row_levels  # the documented assignment of rows to nested subsets
    lv = row_levels(0, 300, 2)
    prev = 0
    for k, c in enumerate(conv):
        keep = lv <= k
        assert c["n_rows"] == int(keep.sum()) and c["n_rows"] >= prev
        prev = c["n_rows"]
        assert rel(c["metrics"]["rankme"], np_rankme(ref_sv(torch.from_numpy(x[keep])))) < TOL
        assert rel(c["metrics"]["collapse_auc"], np_collapse_auc(ref_sv(torch.from_numpy(x[keep]), center=True))) < TOL
    # the level fractions are those documented (a binomial count within 5 sigma)
    for k, f in enumerate((0.125, 0.25, 0.5)):
        assert abs(conv[k]["n_rows"] - 300 * f) < 5 * math.sqrt(300 * f * (1 - f))
    moved = abs(conv[-1]["metrics"]["rankme"] - conv[-2]["metrics"]["rankme"]) / conv[-1]["metrics"]["rankme"]
    assert moved > 0.01  # N = 300 for d = 64, a flat spectrum: not converged
    assert res.convergence_warning and "not enough rows" in res.convergence_warning
    assert any("not enough rows" in str(w.message) for w in caught)
    # plenty of rows: no warning
    big = model(0.3, n=20000, d=8, seed=1)
    r2 = rf.compare([big], convergence=True)
    assert r2.warnings == {} and r2.results["model_0"].convergence[-1]["n_rows"] == 20000
    # chunking does not change the subsets
    with pytest.warns(UserWarning, match="not enough rows"):
        res2 = rf.score(str(tmp_path / "e.npy"), "rankme", convergence=True, seed=2, chunk_rows=300)
    assert [c["n_rows"] for c in res2.convergence] == [c["n_rows"] for c in conv]


# --------------------------------------------------------------------------------------------- CLI


def run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_compare(ckpts, tmp_path, capsys):
    root, xs = ckpts
    (tmp_path / "labels.csv").write_text("name,acc\n" + "".join(f"{n},{v}\n" for n, v in
                                                                zip(xs, (61.0, 70.5, 64.0, 66.0))))
    rc, out, err = run(capsys, ["compare", *paths_of(root, xs), "--labels", str(tmp_path / "labels.csv"), "--json",
                                "--metrics", "RankMe,Collapse-AUC"])
    assert rc == 0, err
    obj = json.loads(out)
    direct = rf.compare(paths_of(root, xs), metrics="rankme,collapse_auc",
                        labels=dict(zip(xs, (61.0, 70.5, 64.0, 66.0))))
    assert obj["correlations"]["rankme"]["kendall"] == pytest.approx(direct.correlations["rankme"]["kendall"], abs=1e-12)
    assert [m["name"] for m in obj["models"]] == [r["name"] for r in direct.table]
    rc, out, err = run(capsys, ["compare", *paths_of(root, xs), "--labels", str(tmp_path / "labels.csv"),
                                "--lower-is-better", "--csv", str(tmp_path / "o.csv")])
    assert rc == 0 and "lower is better" in out and (tmp_path / "o.csv").exists()
    (tmp_path / "partial.csv").write_text("name,acc\nckpt_a.npy,1\nnobody.npy,2\n")
    rc, out, err = run(capsys, ["compare", *paths_of(root, xs), "--labels", str(tmp_path / "partial.csv")])
    assert rc == 2 and "unknown models: nobody.npy" in err and "ckpt_b.npy" in err and out == ""
    if pytest.importorskip("matplotlib"):
        rc, out, err = run(capsys, ["compare", *paths_of(root, xs), "--labels", str(tmp_path / "labels.csv"),
                                    "--plot", str(tmp_path / "p.png")])
        assert rc == 0 and _png_size(tmp_path / "p.png")[0] > 800


def test_cli_score_each_keep_going_plot_version(ckpts, tmp_path, capsys):
    root, xs = ckpts
    rc, out, err = run(capsys, ["score", str(root / "ckpt_*.npy")])  # a quoted glob: ONE matrix
    assert rc == 0 and len(out.strip().splitlines()) == 2
    allx = np.concatenate([xs[n] for n in sorted(xs)])
    assert rel(float(out.splitlines()[1].split()[4]), np_rankme(ref_sv(torch.from_numpy(allx)))) < 1e-6
    rc, out, err = run(capsys, ["score", str(root / "ckpt_*.npy"), "--each"])  # every file separately
    lines = out.strip().splitlines()
    assert rc == 0 and len(lines) == 5
    for ln in lines[1:]:
        name = ln.split()[0].rsplit("/", 1)[-1]
        assert rel(float(ln.split()[4]), np_rankme(ref_sv(torch.from_numpy(xs[name])))) < 1e-6
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    rc, out, err = run(capsys, ["score", str(root / "ckpt_a.npy"), str(tmp_path / "bad.npy"), str(root / "ckpt_b.npy"),
                                "--keep-going"])
    assert rc == 2 and len(out.strip().splitlines()) == 3 and "1 of 3 source(s) failed" in err and "bad.npy" in err
    rc, out, err = run(capsys, ["score", str(tmp_path / "bad.npy"), str(root / "ckpt_b.npy")])
    assert rc == 2 and out == ""  # without --keep-going the first bad file stops the run
    rc, out, err = run(capsys, ["score", str(root / "ckpt_a.npy"), "--convergence", "--json"])
    assert rc == 0 and len(json.loads(out)["convergence"]) == 4
    rc, out, err = run(capsys, [])
    assert rc == 2 and "give a command: score, compare" in err
    rc, out, err = run(capsys, ["--version"])
    assert rc == 0 and out.strip() == f"rankme-fast {rf.__version__}"
    if pytest.importorskip("matplotlib"):
        rc, out, err = run(capsys, ["score", str(root / "ckpt_a.npy"), "--plot", str(tmp_path / "s.png")])
        assert rc == 0 and _png_size(tmp_path / "s.png")[0] > 300
        rc, out, err = run(capsys, ["score", str(root / "ckpt_a.npy"), str(root / "ckpt_b.npy"), "--plot", "x.png"])
        assert rc == 2 and "one PATH" in err


def test_cli_multi_tensor_error_comes_before_any_table(tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    st.save_file({"a": torch.randn(10, 4), "b": torch.randn(10, 4)}, str(tmp_path / "two.safetensors"))
    rc, out, err = run(capsys, ["score", str(tmp_path / "two.safetensors")])
    assert rc == 2 and out == "" and "--key" in err


def test_metric_spellings():
    from rankme_fast.scoring import parse_metrics
    assert parse_metrics("RankMe, alpha-req,alpha_ReQ,Effective-Rank,COLLAPSE_AUC") == (
        "rankme", "alpha_req", "effective_rank", "collapse_auc")
    assert parse_metrics("ALL") == parse_metrics("all")
    with pytest.raises(ValueError, match="unknown metric 'rank_me2'"):
        parse_metrics("rank_me2")
