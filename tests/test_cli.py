"""``rankme-fast`` command line: demo prints a table whose numbers match an independent float64 SVD,
info prints the configuration, bad usage exits with 2 and one line on stderr."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from rankme_fast.cli import main
from rankme_fast.demo import make_embeddings
from tests.conftest import np_rankme, ref_sv, run_python

ROW = re.compile(r"^(flat|power1|rank8|rank1)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.e+-]+)\s+([0-9.]+)ms\s+([0-9.]+)\s+([0-9.e+-]+)$")


@pytest.fixture(scope="module")
def demo_output():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--rows", "3000", "--dim", "64"])
    return rc, buf.getvalue()


def test_demo_exit_code_and_header(demo_output):
    rc, out = demo_output
    assert rc == 0, out
    assert "synthetic float32 embeddings 3000 x 64" in out
    # columns: spectrum, reference (float64 SVD), exact, rel.err, time, fp32 Gram, rel.err
    assert re.search(r"(?m)^spectrum\s+\S.*\s+exact\s+rel\.err\s+time\s+fp32 Gram\s+rel\.err$", out), out


def test_demo_table_matches_reference(demo_output):
    _, out = demo_output
    rows = {m.group(1): m for m in (ROW.match(line.strip()) for line in out.splitlines()) if m}
    assert sorted(rows) == ["flat", "power1", "rank1", "rank8"], out
    for kind, m in rows.items():
        truth, exact, err = float(m.group(2)), float(m.group(3)), float(m.group(4))
        want = np_rankme(ref_sv(make_embeddings(3000, 64, kind, dtype=torch.float32, seed=0)).numpy())
        assert truth == pytest.approx(want, abs=5e-7 + 1e-12 * want), kind  # printed with 6 decimals
        assert abs(exact - want) <= 1e-4 * want + 5e-7, kind
        assert err <= 1e-4, kind


def test_demo_centred_line_matches_reference(demo_output):
    _, out = demo_output
    m = re.search(r"collapse_auc=([0-9.]+) alpha_req=([0-9.]+) stable_rank=([0-9.]+) participation_ratio=([0-9.]+)", out)
    assert m, out
    s = ref_sv(make_embeddings(3000, 64, "power1", dtype=torch.float32, seed=0), center=True).numpy()
    auc = float(np.mean(np.cumsum(s) / s.sum()))
    i = np.arange(5, 65, dtype=np.float64)
    alpha = float(np.polyfit(-np.log(i), np.log(s[4:64] ** 2), 1)[0])
    stable = float((s**2).sum() / s[0] ** 2)
    pr = float((s**2).sum() ** 2 / (s**4).sum())
    for got, want, dec in zip(map(float, m.groups()), (auc, alpha, stable, pr), (6, 4, 4, 4)):
        assert abs(got - want) <= 0.51 * 10.0**-dec + 1e-6 * abs(want), (got, want)
    assert re.search(r"backend=\w+ method=gram; worst exact RankMe error [0-9.e+-]+ \(contract: 1e-4\)", out)


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "rankme_fast:" in out and "backend_for_cpu_tensors:" in out and "cpu_extension:" in out


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        ([], r"required: cmd"),
        (["bogus"], r"invalid choice: 'bogus'"),
        (["demo", "--rows", "0"], r"rankme-fast: error: --rows and --dim must be positive"),
        (["demo", "--dim", "-3"], r"rankme-fast: error: --rows and --dim must be positive"),
        (["demo", "--rows", "many"], r"argument --rows: invalid int value: 'many'"),
        (["demo", "--colour"], r"unrecognized arguments: --colour"),
    ],
    ids=("no_command", "unknown_command", "zero_rows", "negative_dim", "non_integer", "unknown_flag"),
)
def test_bad_usage_exits_2(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "usage: rankme-fast" in capsys.readouterr().out


def test_module_entry_point(tmp_path):
    """``python -m rankme_fast info`` runs the same CLI in a fresh interpreter."""
    res = run_python("import runpy, sys; sys.argv = ['rankme_fast', 'info']; runpy.run_module('rankme_fast', run_name='__main__')",
                     tmp_path, check=False)
    assert res.returncode == 0, res.stderr
    assert "backend_for_cpu_tensors:" in res.stdout
    bad = run_python("import runpy, sys; sys.argv = ['rankme_fast', 'score']; runpy.run_module('rankme_fast', run_name='__main__')",
                     tmp_path, check=False)
    assert bad.returncode == 2 and "required: PATH" in bad.stderr
