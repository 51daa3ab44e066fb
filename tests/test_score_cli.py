"""``rankme-fast score``: the table and ``--json`` output carry the float64-SVD numbers for each PATH,
the flags do what they say, bad usage / bad files exit with 2 and exactly one line on stderr."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rankme_fast
from rankme_fast.cli import main
from rankme_fast.scoring import METRICS
from tests.conftest import np_rankme, powerlaw_matrix, ref_metrics, ref_sv, rel_err

N, D = 2000, 40
ALL = tuple(METRICS)
PRINTED = 5.1e-7  # the table prints 6 decimals


def make_x(n: int = N, d: int = D, seed: int = 0, offset: float = 0.5) -> np.ndarray:
    return powerlaw_matrix(n, d, seed, offset)


def ref(x, names=ALL, center=None, eps: float = 1e-7) -> dict:
    return ref_metrics(x, names, center=center, eps=eps)


def parse_table(out: str):
    """-> (metric names, {metric: centred-marker}, {path: {column: cell}}, footnote present)."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    head = lines[0].split()
    assert head[:4] == ["path", "rows", "d", "dtype"] and head[-1] == "time", lines[0]
    names = [h.removesuffix("(c)") for h in head[4:-1]]
    marked = {n: h.endswith("(c)") for n, h in zip(names, head[4:-1])}
    rows = {}
    foot = False
    for ln in lines[1:]:
        if ln.startswith("(c) = centred spectrum"):
            foot = True
            continue
        cells = ln.split()
        assert len(cells) == len(head), ln
        assert re.fullmatch(r"[0-9.]+s", cells[-1]), ln
        rows[cells[0]] = dict(zip(["path", "rows", "d", "dtype"] + names, cells[:-1]))
    return names, marked, rows, foot


def run_cli(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Files shared by the tests: a float32 .npy, a float64 shard directory (part_1, part_2, part_10),
    and their float64 values."""
    root = tmp_path_factory.mktemp("cli")
    x = make_x()
    y = make_x(seed=1)
    f32 = root / "emb32.npy"
    np.save(f32, x.astype(np.float32))
    shards = root / "shards"
    shards.mkdir()
    cuts = {"part_1": (0, 600), "part_2": (600, 1300), "part_10": (1300, N)}
    for name, (a, b) in cuts.items():
        np.save(shards / f"{name}.npy", y[a:b])
    return {"root": root, "f32": f32, "x32": x.astype(np.float32).astype(np.float64), "shards": shards, "y": y}


# ----------------------------------------------------------------------------------------------
# output


def test_table_one_row_per_path(capsys, data):
    f32, shards = str(data["f32"]), str(data["shards"])
    rc, out, err = run_cli(capsys, ["score", f32, shards, "--metrics", "rankme,collapse_auc"])
    assert rc == 0 and err == "", err
    names, marked, rows, foot = parse_table(out)
    assert names == ["rankme", "collapse_auc"]
    assert marked == {"rankme": False, "collapse_auc": True} and foot
    assert list(rows) == [f32, shards]
    for path, x, dtype in ((f32, data["x32"], "float32"), (shards, data["y"], "float64")):
        row = rows[path]
        assert (int(row["rows"]), int(row["d"]), row["dtype"]) == (N, D, dtype)
        want = ref(x, names)
        for m in names:
            assert abs(float(row[m]) - want[m]) <= PRINTED + 1e-9 * want[m], (path, m, row[m], want[m])


def test_table_metrics_all(capsys, data):
    rc, out, err = run_cli(capsys, ["score", str(data["shards"]), "--metrics", "all", "--chunk-rows", "333"])
    # d = 40 < 100: alpha_req's default index range is narrowed, and says so (issue 16), once
    assert rc == 0 and err.count("\n") == 1 and "alpha_req: index_range (5, 100) narrowed to (5, 40)" in err
    names, marked, rows, foot = parse_table(out)
    assert names == list(ALL) and foot
    assert marked == {m: METRICS[m] for m in ALL}
    want = ref(data["y"])
    row = rows[str(data["shards"])]
    for m in ALL:
        assert abs(float(row[m]) - want[m]) <= PRINTED + 1e-9 * abs(want[m]), (m, row[m], want[m])


def test_json_one_object_per_path(capsys, data):
    f32, shards = str(data["f32"]), str(data["shards"])
    glob = str(data["shards"] / "part_*.npy")
    rc, out, err = run_cli(capsys, ["score", f32, shards, glob, "--json", "--metrics", "all"])
    assert rc == 0 and all("alpha_req: index_range (5, 100) narrowed" in ln for ln in err.splitlines())
    lines = out.splitlines()
    assert len(lines) == 3
    objs = [json.loads(ln) for ln in lines]
    names = [os.path.join(str(data["shards"]), f"{n}.npy") for n in ("part_1", "part_2", "part_10")]
    for obj, src, x, files in ((objs[0], f32, data["x32"], [f32]), (objs[1], shards, data["y"], names),
                               (objs[2], glob, data["y"], names)):
        assert obj["source"] == src and obj["files"] == files
        assert (obj["n_rows"], obj["total_rows"], obj["n_features"]) == (N, N, D)
        assert obj["centered"] == {m: METRICS[m] for m in ALL}
        want = ref(x)
        tol = 1e-9 if x is data["y"] else 1e-6
        for m in ALL:
            assert rel_err(obj["metrics"][m], want[m]) <= tol, (src, m)


@pytest.mark.parametrize("flag", [None, "--center", "--no-center"])
def test_center_flags(capsys, data, flag):
    argv = ["score", str(data["shards"]), "--metrics", "all", "--json"] + ([flag] if flag else [])
    rc, out, _ = run_cli(capsys, argv)
    assert rc == 0
    obj = json.loads(out)
    center = {None: None, "--center": True, "--no-center": False}[flag]
    want = ref(data["y"], center=center)
    assert obj["centered"] == {m: (METRICS[m] if center is None else center) for m in ALL}
    for m in ALL:
        assert rel_err(obj["metrics"][m], want[m]) <= 1e-9, m
    # the table's header marks centred columns only under the per-metric convention
    rc, out, _ = run_cli(capsys, [a for a in argv if a != "--json"])
    names, marked, rows, foot = parse_table(out)
    assert foot == (flag is None)
    assert marked == {m: (METRICS[m] if flag is None else False) for m in ALL}


def test_center_really_changes_values(capsys, data):
    """Guard for the test above: on this data every metric differs between the two centrings."""
    a, b = ref(data["y"], center=True), ref(data["y"], center=False)
    assert all(rel_err(a[m], b[m]) > 1e-3 for m in ALL)


@pytest.mark.parametrize("eps", ["0", "1e-5", "0.0"])
def test_eps(capsys, data, eps):
    rc, out, _ = run_cli(capsys, ["score", str(data["f32"]), "--json", "--eps", eps,
                                  "--metrics", "rankme,effective_rank"])
    assert rc == 0
    m = json.loads(out)["metrics"]
    s = ref_sv(torch.from_numpy(data["x32"])).numpy()
    assert rel_err(m["rankme"], np_rankme(s, float(eps))) <= 1e-6
    assert rel_err(m["effective_rank"], np_rankme(s, 0.0)) <= 1e-6
    if float(eps) == 0:
        assert rel_err(m["rankme"], m["effective_rank"]) <= 1e-12
    else:
        assert rel_err(m["rankme"], m["effective_rank"]) > 1e-6


@pytest.mark.parametrize("max_rows", [500, 601, 1500])
def test_max_rows(capsys, data, max_rows):
    rc, out, _ = run_cli(capsys, ["score", str(data["shards"]), "--json", "--max-rows", str(max_rows),
                                  "--chunk-rows", "128", "--metrics", "rankme,collapse_auc"])
    assert rc == 0
    obj = json.loads(out)
    assert obj["n_rows"] == max_rows and obj["total_rows"] == N
    want = ref(data["y"][:max_rows], ["rankme", "collapse_auc"])  # natural order: part_1, part_2, part_10
    for m in want:
        assert rel_err(obj["metrics"][m], want[m]) <= 1e-9, m
    # in the table too
    rc, out, _ = run_cli(capsys, ["score", str(data["shards"]), "--max-rows", str(max_rows)])
    _, _, rows, _ = parse_table(out)
    row = rows[str(data["shards"])]
    assert int(row["rows"]) == max_rows
    assert abs(float(row["rankme"]) - want["rankme"]) <= PRINTED + 1e-9 * want["rankme"]


def test_chunk_rows_do_not_change_result(capsys, data):
    got = []
    for c in ("7", "600", "100000"):
        rc, out, _ = run_cli(capsys, ["score", str(data["shards"]), "--json", "--chunk-rows", c,
                                      "--metrics", "rankme,alpha_req"])
        assert rc == 0
        got.append(json.loads(out)["metrics"])
    want = ref(data["y"], ["rankme", "alpha_req"])
    for g in got:
        for m in want:
            assert rel_err(g[m], want[m]) <= 1e-9 and rel_err(g[m], got[0][m]) <= 1e-9, m


def test_key(capsys, data, tmp_path):
    a = torch.from_numpy(make_x(600, 24, seed=2))
    b = torch.from_numpy(make_x(600, 24, seed=3))
    p = tmp_path / "two.pt"
    torch.save({"a": a, "b": b}, p)
    for key, x in (("a", a), ("b", b)):
        rc, out, _ = run_cli(capsys, ["score", str(p), "--key", key, "--json"])
        assert rc == 0
        assert rel_err(json.loads(out)["metrics"]["rankme"], np_rankme(ref_sv(x).numpy())) <= 1e-9
    rc, out, err = run_cli(capsys, ["score", str(p), "--json"])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("rankme-fast: error: ")
    assert str(p) in err and "'a'" in err and "'b'" in err and "key=" in err


def test_key_safetensors(capsys, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    a = torch.from_numpy(make_x(600, 24, seed=4)).to(torch.bfloat16)
    p = tmp_path / "emb.safetensors"
    st.save_file({"emb": a, "proj": torch.randn(24, 24, dtype=torch.bfloat16)}, str(p))
    rc, out, _ = run_cli(capsys, ["score", str(p), "--key", "emb", "--json", "--metrics", "rankme,nesum"])
    assert rc == 0
    obj = json.loads(out)
    assert obj["dtype"] == "bfloat16"
    want = ref(a, ["rankme", "nesum"])
    for m in want:
        assert rel_err(obj["metrics"][m], want[m]) <= 1e-6, m


# ----------------------------------------------------------------------------------------------
# errors: exit 2, one line on stderr


@pytest.fixture(scope="module")
def bad_files(data):
    root = data["root"]
    raw = data["f32"].read_bytes()
    trunc = root / "truncated.npy"
    trunc.write_bytes(raw[: len(raw) // 2])
    nan = root / "nan.npy"
    x = data["x32"].copy()
    x[1234, 5] = np.nan
    np.save(nan, x)
    return {"truncated": trunc, "nan": nan, "missing": root / "missing.npy"}


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["score"], r"^rankme-fast score: error: the following arguments are required: PATH"),
        (["score", "{f32}", "--metrics", "bogus"], r"^rankme-fast: error: unknown metric 'bogus'"),
        (["score", "{f32}", "--metrics", ""], r"^rankme-fast: error: metrics must be a non-empty list"),
        (["score", "{f32}", "--max-rows", "0"], r"^rankme-fast score: error: argument --max-rows: expected a positive integer, got '0'"),
        (["score", "{f32}", "--chunk-rows", "-5"], r"^rankme-fast score: error: argument --chunk-rows: expected a positive integer"),
        (["score", "{f32}", "--chunk-rows", "lots"], r"^rankme-fast score: error: argument --chunk-rows: expected a positive integer, got 'lots'"),
        (["score", "{f32}", "--eps", "-1"], r"^rankme-fast score: error: argument --eps: eps must be in \[0, 1\), got '-1'"),
        (["score", "{f32}", "--eps", "nan"], r"^rankme-fast score: error: argument --eps: eps must be in \[0, 1\)"),
        (["score", "{f32}", "--eps", "x"], r"^rankme-fast score: error: argument --eps: expected a number, got 'x'"),
        (["score", "{f32}", "--center", "--no-center"], r"^rankme-fast score: error: argument --no-center: not allowed with argument --center"),
        (["score", "{missing}"], r"^rankme-fast: error: {missing}: no such file or directory$"),
        (["score", "{truncated}"], r"^rankme-fast: error: {truncated}: truncated: header promises"),
        (["score", "{nan}", "--chunk-rows", "100"], r"^rankme-fast: error: {nan} \(rows 1200\.\.1300\): found 1 non-finite values \(1 NaN, 0 Inf\).* first in row 1234$"),
        (["score", "{f32}", "--key", "emb"], r"^rankme-fast: error: {f32}: a \.npy file holds one array, key='emb' does not apply$"),
    ],
    ids=["no_path", "unknown_metric", "empty_metrics", "max_rows_0", "chunk_rows_negative", "chunk_rows_text",
         "eps_negative", "eps_nan", "eps_text", "center_and_no_center", "missing_file", "truncated_file",
         "nan_row", "key_on_npy"],
)
@pytest.mark.parametrize("json_flag", [False, True], ids=["table", "json"])
def test_bad_usage_exit_2_one_line(capsys, data, bad_files, argv, pattern, json_flag):
    paths = {"f32": str(data["f32"]), **{k: str(v) for k, v in bad_files.items()}}
    argv = [a.format(**paths) for a in argv] + (["--json"] if json_flag and len(argv) > 1 else [])
    pattern = pattern.format(**{k: re.escape(v) for k, v in paths.items()})
    rc, out, err = run_cli(capsys, argv)
    assert rc == 2
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert re.search(pattern, err.rstrip("\n")), (pattern, err)
    if json_flag:
        assert out == ""  # nothing half-written on stdout
    else:  # at most the table header, never a result row
        assert len(out.splitlines()) <= 1


def test_error_after_good_path_keeps_printed_rows(capsys, data, bad_files):
    """Each PATH's row is printed when it is done; a later bad PATH still exits 2 with one line."""
    f32, missing = str(data["f32"]), str(bad_files["missing"])
    rc, out, err = run_cli(capsys, ["score", f32, missing, "--json"])
    assert rc == 2
    lines = out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["source"] == f32
    assert rel_err(json.loads(lines[0])["metrics"]["rankme"], ref(data["x32"], ["rankme"])["rankme"]) <= 1e-6
    assert err.count("\n") == 1 and err.startswith(f"rankme-fast: error: {missing}: no such file")


def test_interrupt_exits_130(capsys, data, monkeypatch):
    score_mod = sys.modules["rankme_fast.scoring"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(score_mod, "score", interrupted)
    rc, _, err = run_cli(capsys, ["score", str(data["f32"])])
    assert rc == 130 and err == "rankme-fast: interrupted\n"


# ----------------------------------------------------------------------------------------------
# progress output


def test_progress_only_on_tty_and_not_with_quiet(capsys, data, monkeypatch):
    argv = ["score", str(data["shards"]), "--chunk-rows", "100", "--json"]
    # not a terminal (capsys): no progress bar, stderr stays empty
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0 and err == ""
    want = ref(data["y"], ["rankme"])["rankme"]
    assert rel_err(json.loads(out)["metrics"]["rankme"], want) <= 1e-9
    # a terminal: the bar is drawn on stderr ...
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0 and "shards" in err and "row" in err, err
    assert rel_err(json.loads(out)["metrics"]["rankme"], want) <= 1e-9  # stdout stays clean JSON
    # ... unless --quiet / -q
    for q in ("--quiet", "-q"):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        rc, out, err = run_cli(capsys, argv + [q])
        assert rc == 0 and err == "", err
        assert rel_err(json.loads(out)["metrics"]["rankme"], want) <= 1e-9


def test_info(capsys):
    rc, out, err = run_cli(capsys, ["info"])
    assert rc == 0 and err == ""
    assert "rankme_fast:" in out and "backend_for_cpu_tensors:" in out


# ----------------------------------------------------------------------------------------------
# a real process: `python -m rankme_fast` and the console script


def _env():
    env = dict(os.environ)
    pkg_parent = str(Path(rankme_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("RANKME_FAST_BACKEND", None)
    return env


def test_subprocess_exit_codes(data, bad_files, tmp_path):
    def run(cmd):
        return subprocess.run(cmd, cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=180)

    py = [sys.executable, "-m", "rankme_fast"]
    ok = run(py + ["score", str(data["shards"]), "--json", "--metrics", "rankme,collapse_auc"])
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""  # stderr is a pipe, not a terminal: no progress bar
    obj = json.loads(ok.stdout)
    want = ref(data["y"], ["rankme", "collapse_auc"])
    for m in want:
        assert rel_err(obj["metrics"][m], want[m]) <= 1e-9, m

    bad = run(py + ["score", str(bad_files["truncated"])])
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("rankme-fast: error: "), bad.stderr
    assert str(bad_files["truncated"]) in bad.stderr

    usage = run(py + ["score", str(data["f32"]), "--max-rows", "0"])
    assert usage.returncode == 2 and usage.stdout == ""
    assert usage.stderr.count("\n") == 1 and usage.stderr.startswith("rankme-fast score: error: "), usage.stderr

    exe = shutil.which("rankme-fast")
    if exe is None:
        pytest.skip("the rankme-fast console script is not on PATH")
    res = run([exe, "score", str(bad_files["missing"])])
    assert res.returncode == 2
    assert res.stderr == f"rankme-fast: error: {bad_files['missing']}: no such file or directory\n"
