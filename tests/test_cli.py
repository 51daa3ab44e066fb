"""``rankme-fast`` command line: demo prints a table whose numbers match an independent float64 SVD,
info prints the configuration, bad usage exits with 2 and one line on stderr."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
        ([], r"give a command: score, compare, bench, info or demo"),
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


# -- hardening (issue 14): closed stdout, MemoryError, Ctrl-C, a broken dispatch.json -------------------

def _cli_env(tmp_path, site: str | None = None) -> dict:
    """Environment for ``python -m rankme_fast`` importing the same package as this process, optionally
    with a ``sitecustomize`` (``site``: its source) that runs before anything else."""
    import rankme_fast

    env = dict(os.environ)
    paths = [str(Path(rankme_fast.__file__).resolve().parents[1])]
    if site is not None:
        sdir = tmp_path / "site"
        sdir.mkdir()
        (sdir / "sitecustomize.py").write_text(textwrap.dedent(site))
        paths.insert(0, str(sdir))
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("RANKME_FAST_BACKEND", None)
    return env


def test_closed_stdout_exits_quietly(tmp_path):
    """``rankme-fast demo | head -0``: the reader is gone before the first line; exit 1, nothing on stderr
    (no BrokenPipeError traceback, no 'Exception ignored' at the interpreter's final flush)."""
    p = subprocess.Popen([sys.executable, "-m", "rankme_fast", "demo", "--rows", "300", "--dim", "8"],
                         cwd=str(tmp_path), env=_cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    try:
        err = p.stderr.read()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, err
    assert err == b""


def test_memory_error_is_one_line_exit_1(monkeypatch, capsys):
    import rankme_fast.scoring as scoring

    def boom(*a, **k):
        raise MemoryError("cannot allocate 8.0 GiB")
    monkeypatch.setattr(scoring, "score", boom)
    assert main(["score", "x.npy", "-q"]) == 1
    err = capsys.readouterr().err
    assert err == ("rankme-fast: error: out of memory: cannot allocate 8.0 GiB (exit code 1); for score, read fewer "
                   "rows at a time (--chunk-rows) — its memory is O(d²) plus one chunk\n")


_SLEEPY_PARSE = """
    import argparse, os, time
    _orig = argparse.ArgumentParser.parse_args
    def parse_args(self, *a, **k):
        open(os.environ["MARKER"], "w").close()
        time.sleep(60)
        return _orig(self, *a, **k)
    argparse.ArgumentParser.parse_args = parse_args
"""

_SLEEPY_TORCH_IMPORT = """
    import os, sys, time
    class _Slow:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                open(os.environ["MARKER"], "w").close()
                time.sleep(60)
            return None
    sys.meta_path.insert(0, _Slow())
"""


def _sigint_run(tmp_path, site: str, args=("-m", "rankme_fast", "info")):
    """Run ``python *args`` with ``site`` preloaded, SIGINT it once the marker file appears; (rc, stderr)."""
    import signal

    marker = tmp_path / "marker"
    env = _cli_env(tmp_path, site)
    env["MARKER"] = str(marker)
    p = subprocess.Popen([sys.executable, *args], cwd=str(tmp_path), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), p.communicate(timeout=30)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err.decode()


def test_sigint_while_parsing_exits_130_quietly(tmp_path):
    rc, err = _sigint_run(tmp_path, _SLEEPY_PARSE)
    assert (rc, err) == (130, "rankme-fast: interrupted\n")


def test_sigint_during_import_exits_130_quietly(tmp_path):
    """A Ctrl-C while `import rankme_fast` loads torch: the package's __init__ sees it is the CLI starting
    and exits 130 with one line (a library import re-raises KeyboardInterrupt: next test)."""
    rc, err = _sigint_run(tmp_path, _SLEEPY_TORCH_IMPORT)
    assert (rc, err) == (130, "rankme-fast: interrupted\n"), (rc, err)


def test_sigint_during_a_library_import_is_the_callers(tmp_path):
    rc, err = _sigint_run(tmp_path, _SLEEPY_TORCH_IMPORT, args=("-c", "import rankme_fast"))
    # uncaught KeyboardInterrupt: Python re-raises SIGINT at exit (-2), with its traceback
    assert rc in (-2, 130) and "KeyboardInterrupt" in err, (rc, err)


@pytest.mark.parametrize("text,why", [
    ('{"min_work": 1e8}', "missing 'order'"),
    ('{"order": {"exact": {"float32": ["triton"]}', "not valid JSON"),
])
def test_info_with_a_broken_dispatch_table_names_the_file(tmp_path, monkeypatch, capsys, text, why):
    from rankme_fast import backends

    bad = tmp_path / "dispatch.json"
    bad.write_text(text)
    monkeypatch.setattr(backends, "DISPATCH_PATH", bad)
    backends.dispatch_table.cache_clear()
    try:
        assert main(["info"]) == 2
    finally:
        backends.dispatch_table.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith(f"rankme-fast: error: {bad}: ") and why in err and err.count("\n") == 1, err
