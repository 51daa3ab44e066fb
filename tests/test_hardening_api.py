"""Issue 14 (hardening), the Python API side: every argument that used to crash the process, be silently
reinterpreted or silently ignored is now a TypeError/ValueError naming it, or gives the right value.

num_threads (and RANKME_FAST_NUM_THREADS) at the native backend's entry; threads the system refuses to
start (a subprocess under RLIMIT_AS) cost speed, never the result or a SIGABRT; eps, center and the
approximate methods' tolerances; NumPy masked and big-endian arrays; the GPU dispatch table."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast import backends
from rankme_fast.backends import cpu
from rankme_fast.gram import GramAccumulator
from tests.conftest import run_python

ROOT = Path(__file__).resolve().parents[1]
needs_native = pytest.mark.skipif(cpu.load() is None, reason="native CPU extension not built")


def _x(n=200, d=6, seed=0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- num_threads ------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("bad,exc,msg", [
    (-1, ValueError, f"num_threads must be between 1 and {cpu.max_threads()} (4 per CPU, at least 256), got -1"),
    (0, ValueError, f"num_threads must be between 1 and {cpu.max_threads()} (4 per CPU, at least 256), got 0"),
    (2**40, ValueError, f"num_threads must be between 1 and {cpu.max_threads()} (4 per CPU, at least 256), "
                        f"got {2**40}"),
    ("2", TypeError, "num_threads must be a positive int or None, got str '2'"),
    (True, TypeError, "num_threads must be a positive int or None, got bool True"),
    (2.0, TypeError, "num_threads must be a positive int or None, got float 2.0"),
], ids=["minus1", "zero", "2**40", "str", "bool", "float"])
def test_bad_num_threads(bad, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):  # at construction, not at the first batch
        GramAccumulator(backend="cpu", num_threads=bad)
    with pytest.raises(exc, match=re.escape(msg)):  # the kernel's own entry, even for 0 rows
        cpu.gram_update(torch.empty(0, 6), torch.zeros(8, 8, dtype=torch.float64), num_threads=bad)
    with pytest.raises(exc, match=re.escape(msg)):
        cpu.normal_apply(_x(), torch.ones(6, 2), num_threads=bad)
    with pytest.raises(exc, match=re.escape(msg)):
        cpu.sum_squares(_x(), num_threads=bad)


@needs_native
def test_good_num_threads_give_the_same_gram():
    x = _x(3000, 20)
    want = (x.T @ x).numpy()
    for nt in (1, 3, np.int64(2), cpu.max_threads()):
        acc = GramAccumulator(backend="cpu", num_threads=nt).update(x)
        np.testing.assert_allclose(acc.gram().numpy(), want, rtol=1e-12, atol=1e-9)


@needs_native
@pytest.mark.parametrize("env,exc,msg", [
    ("0", ValueError, "RANKME_FAST_NUM_THREADS must be a positive integer, got '0'"),
    ("-4", ValueError, "RANKME_FAST_NUM_THREADS must be a positive integer, got '-4'"),
    ("100000000", ValueError, f"RANKME_FAST_NUM_THREADS must be between 1 and {cpu.max_threads()} (4 per CPU, "
                              "at least 256), got 100000000"),
    ("two", ValueError, "RANKME_FAST_NUM_THREADS must be a positive integer, got 'two'"),
])
def test_bad_num_threads_env(monkeypatch, env, exc, msg):
    monkeypatch.setenv("RANKME_FAST_NUM_THREADS", env)
    with pytest.raises(exc, match=re.escape(msg)):
        GramAccumulator(backend="cpu").update(_x())


_RLIMIT = r"""
import json, resource, threading, torch
import rankme_fast.backends.cpu as cpu
from rankme_fast.gram import GramAccumulator
assert cpu.load() is not None
g = torch.Generator().manual_seed(1)
# 65536 rows x 16: the private schedule (a d×d copy per thread); 20000 x 16 (fewer chunks than threads): the shared one
xs = {"private": torch.randn(65536, 16, generator=g, dtype=torch.float64),
      "shared": torch.randn(20000, 16, generator=g, dtype=torch.float64)}
w = torch.randn(16, 3, generator=g, dtype=torch.float64)
want = {k: (x.T @ x, x.T @ (x @ w), float((x * x).sum())) for k, x in xs.items()}
accs = {k: GramAccumulator(num_threads=64, backend="cpu") for k in xs}
for k, acc in accs.items():
    acc.update(xs[k][:10])          # state allocated before the limit
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
lim = vm + 40 * 2**20               # room for a few 8 MiB thread stacks, not for 64
resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
out = {}
for k, acc in accs.items():
    acc.update(xs[k][10:])
    ref = want[k]
    out[k] = [float((acc.gram() - ref[0]).abs().max() / ref[0].abs().max()),
              float((cpu.normal_apply(xs[k], w, single_precision=False, num_threads=64) - ref[1]).abs().max()
                    / ref[1].abs().max()),
              abs(cpu.sum_squares(xs[k], num_threads=64) - ref[2]) / ref[2]]
ev, started = threading.Event(), 0
try:                                # evidence that the limit bites: Python cannot start 64 threads either
    for _ in range(64):
        threading.Thread(target=ev.wait, daemon=True).start()
        started += 1
except RuntimeError:
    pass
ev.set()
print(json.dumps({"errors": out, "python_threads": started}))
"""


@needs_native
def test_thread_start_failure_is_not_an_abort(tmp_path):
    """64 threads asked for where the address-space limit lets only a few start: the kernels run on the
    threads they got and give the right result (exit 0), never std::terminate / SIGABRT."""
    res = run_python(_RLIMIT, tmp_path, check=False, timeout=120)
    assert res.returncode == 0, f"rc={res.returncode} (SIGABRT is -6)\n{res.stdout}\n{res.stderr}"
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["python_threads"] < 64, f"the limit did not bite: {rep}"
    for k, (eg, en, es) in rep["errors"].items():
        assert eg <= 1e-13 and en <= 1e-12 and es <= 1e-12, (k, rep)


# -- eps, center, tol -----------------------------------------------------------------------------

@pytest.mark.parametrize("eps,exc,msg", [
    (5, ValueError, "eps must be in [0, 1), got 5"),
    (1.0, ValueError, "eps must be in [0, 1), got 1.0"),
    (-1e-7, ValueError, "eps must be in [0, 1), got -1e-07"),
    (float("nan"), ValueError, "eps must be in [0, 1), got nan"),
    ("1e-7", TypeError, "eps must be a real number in [0, 1), got str '1e-7'"),
    (True, TypeError, "eps must be a real number in [0, 1), got bool True"),
])
def test_bad_eps(eps, exc, msg):
    x = _x()
    with pytest.raises(exc, match=re.escape(msg)):
        rf.rankme(x, eps)
    s = rf.spectrum(x)
    with pytest.raises(exc, match=re.escape(msg)):
        s.rankme(eps)
    with pytest.raises(exc, match=re.escape(msg)):
        GramAccumulator().update(x).rankme(eps)


def test_eps_rule_matches_the_cli(capsys):
    from rankme_fast.cli import main

    assert rf.rankme(_x(), 0.999) > 0 and rf.rankme(_x(), 0) > 0  # the ends of [0, 1) the CLI accepts too
    assert main(["score", "x.npy", "--eps", "1"]) == 2
    assert "eps must be in [0, 1), got '1'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ("no", "False", 1, 0, None), ids=repr)
def test_center_must_be_a_bool(bad):
    x = _x()
    if bad is not None:  # None is each metric's default, but spectrum() has no default convention
        for fn in (rf.rankme, rf.effective_rank, rf.collapse_auc, rf.stable_rank, rf.participation_ratio,
                   rf.nesum, rf.alpha_req):
            with pytest.raises(TypeError, match=re.escape(f"center must be True, False or None (the metric's "
                                                          f"default), got {type(bad).__name__} {bad!r}")):
                fn(x, center=bad)
    with pytest.raises(TypeError, match=re.escape(f"center must be True or False, got {type(bad).__name__} {bad!r}")):
        rf.spectrum(x, center=bad)


def test_center_accepts_numpy_bool():
    x = _x()
    assert rf.rankme(x, center=np.bool_(True)) == rf.rankme(x, center=True)
    assert rf.rankme(x, center=np.bool_(False)) == rf.rankme(x)


@pytest.mark.parametrize("method,key,val", [
    ("randomized", "tol", float("nan")), ("lanczos", "tol", float("nan")), ("lanczos", "tol", 0.0),
    ("lanczos", "tol", 1.5), ("randomized", "tol", "1e-6"), ("slq", "deflate_tol", float("nan")),
    ("slq", "deflate_tol", -1e-6),
], ids=lambda v: repr(v))
@pytest.mark.filterwarnings("ignore:method=:RuntimeWarning")  # "gram would be cheaper here": not the point
def test_bad_approx_tolerance(method, key, val):
    with pytest.raises(ValueError, match=re.escape(f"{key} must be a number in (0, 1) (residual ≤ {key}·θ), "
                                                   f"got {val!r}")):
        rf.spectrum(_x(300, 40), method=method, **{key: val})


# -- masked and big-endian arrays ------------------------------------------------------------------

def test_masked_array_is_refused():
    a = np.ma.masked_array(_x(20, 4).numpy(), mask=np.zeros((20, 4), bool))
    a.mask[3, 1] = True
    want = ("x: NumPy masked arrays are not accepted (got a MaskedArray of shape (20, 4) and dtype float64 with 1 "
            "masked values): the mask would be silently ignored; pass x.filled(value) to fill them, or keep the "
            "complete rows with x.data[~np.ma.getmaskarray(x).any(axis=1)]")
    with pytest.raises(TypeError, match=re.escape(want)):
        rf.rankme(a)
    with pytest.raises(TypeError, match=r"^batch 0: NumPy masked arrays are not accepted"):
        GramAccumulator().update(a)
    rows = a.data[~np.ma.getmaskarray(a).any(axis=1)]  # the advertised way out works
    assert rows.shape == (19, 4) and rf.rankme(rows) == rf.rankme(np.delete(a.data, 3, axis=0))


@pytest.mark.parametrize("dt", (">f8", ">f4", ">f2"))
def test_big_endian_array_is_converted(dt):
    native = _x(300, 12).numpy().astype({">f8": np.float64, ">f4": np.float32, ">f2": np.float16}[dt])
    big = native.astype(dt)
    assert not big.dtype.isnative and np.array_equal(big, native)
    assert rf.rankme(big) == rf.rankme(native)
    assert torch.equal(rf.spectrum(big, center=True).singular_values,
                       rf.spectrum(native, center=True).singular_values)
    acc_b, acc_n = GramAccumulator().update(big[:100]).update(big[100:]), GramAccumulator().update(native)
    assert torch.allclose(acc_b.gram(), acc_n.gram(), rtol=1e-13, atol=0)
    assert big.dtype.str == dt  # the caller's array is untouched (a native copy was made)


# -- the GPU dispatch table ----------------------------------------------------------------------

_GOOD = {"measured": False, "source": "test", "min_work": 1e8,
         "order": {"exact": {"float32": ["triton", "cuda", "torch"]}, "fast": {"float32": ["torch"]}}}


@pytest.mark.parametrize("edit,why", [
    (lambda t: t.pop("order"), "missing 'order'"),
    (lambda t: t["order"].pop("fast"), "'order' has no 'fast' entry"),
    (lambda t: t["order"]["exact"].pop("float32"), "order['exact'] must be an object with at least a 'float32'"),
    (lambda t: t["order"]["exact"].update(float32=["tpu"]), "order['exact']['float32'] names unknown backends ['tpu']"),
    (lambda t: t["order"]["exact"].update(float32=[]), "order['exact']['float32'] must be a non-empty list"),
    (lambda t: t["order"]["exact"].update(int8=["torch"]), "unknown dtype 'int8' in order['exact']"),
    (lambda t: t["order"].update(turbo={"float32": ["torch"]}), "unknown precision 'turbo'"),
    (lambda t: t.update(min_work="big"), "'min_work' must be a finite number >= 0, got 'big'"),
    (lambda t: t.update(measured="yes"), "'measured' must be true or false, got 'yes'"),
])
def test_invalid_dispatch_table_names_the_file(tmp_path, edit, why):
    t = json.loads(json.dumps(_GOOD))
    edit(t)
    p = tmp_path / "dispatch.json"
    p.write_text(json.dumps(t))
    with pytest.raises(ValueError, match=re.escape(f"{p}: invalid GPU dispatch table: {why}")):
        backends.load_dispatch(p)


def test_malformed_dispatch_json_names_the_file(tmp_path):
    p = tmp_path / "dispatch.json"
    p.write_text('{"order": ')
    with pytest.raises(ValueError, match=re.escape(f"{p}: the GPU dispatch table is not valid JSON (")):
        backends.load_dispatch(p)


def test_packaged_dispatch_table_is_valid():
    assert backends.load_dispatch(backends.DISPATCH_PATH) == backends.dispatch_table()


def test_written_dispatch_round_trips_through_gpu_order(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py --write-dispatch: the table it derives from measurements loads and drives
    gpu_order; and it targets the repository's rankme_fast/backends/dispatch.json, not an installed copy."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
        import gpu_report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    sample = json.loads((ROOT / "tests" / "data" / "gpu_results_sample.json").read_text())
    new = gpu_report.dispatch_from_results(sample, backends.load_dispatch(backends.DISPATCH_PATH))
    p = tmp_path / "dispatch.json"
    p.write_text(json.dumps(new, indent=2) + "\n")  # as gpu_check.report writes it
    table = backends.load_dispatch(p)
    monkeypatch.setattr(backends, "dispatch_table", lambda: table)
    big = (10**6, 4096)
    assert backends.gpu_order(torch.bfloat16, big) == ["triton", "torch", "cuda"]
    assert backends.gpu_order(torch.float32, big) == ["cuda", "triton", "torch"]
    assert backends.gpu_order(torch.float32, big, "fast") == ["triton", "torch", "cuda"]
    assert backends.gpu_order(torch.float32, (10, 10)) == ["torch"]  # below min_work
    assert gpu_check.ROOT.resolve() == ROOT  # writes ROOT/rankme_fast/backends/dispatch.json: the source tree
    assert (ROOT / "rankme_fast" / "backends" / "dispatch.json").is_file()
