"""Exact RankMe vs the torch routes, on this machine, in one run (issue 2).

Run:  pytest benchmarks/test_bench_exact.py --benchmark-json=bench.json  then
      python benchmarks/report.py bench.json   (prints the RESULTS.md table)

Contenders per shape (float32 input, N x d):
  rankme_fast  rankme_fast.rankme(x)  (native float64 SYRK + float64 eigvalsh)
  svdvals      torch.linalg.svdvals(x)  (float32 LAPACK)
  f64_gram     torch.linalg.eigvalsh(x.double().T @ x.double())
  floor        N·d² flops at the dgemm rate measured in the same run (a perfect float64 SYRK)
"""
import json
import os
import subprocess
import tempfile
import sys

import pytest
import torch

import rankme_fast

SHAPES = [(1_000_000, 256), (200_000, 2048)]
if os.environ.get("RANKME_FAST_BENCH_SMALL"):
    SHAPES = [(100_000, 256), (20_000, 1024)]
ROUNDS = int(os.environ.get("RANKME_FAST_BENCH_ROUNDS", "5"))


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def data(request):
    n, d = request.param
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float32)


def _route(name):
    if name == "rankme_fast":
        return lambda x: rankme_fast.rankme(x)
    if name == "svdvals":
        return lambda x: torch.linalg.svdvals(x)
    if name == "f64_gram":
        return lambda x: torch.linalg.eigvalsh(x.double().T @ x.double())
    raise KeyError(name)


@pytest.mark.parametrize("route", ["rankme_fast", "svdvals", "f64_gram"])
def test_exact_routes(benchmark, data, route, dgemm_rate):
    n, d = data.shape
    rounds = ROUNDS if route == "rankme_fast" else max(2, ROUNDS // 2)
    benchmark.group = f"{n}x{d}"
    benchmark.extra_info.update({"n": n, "d": d, "dgemm_flops": dgemm_rate, "floor_s": n * d * d / dgemm_rate})
    out = benchmark.pedantic(_route(route), args=(data,), rounds=rounds, iterations=1, warmup_rounds=0)
    assert out is not None


MEM_SCRIPT = r"""
import json, re, sys, threading, time, torch, rankme_fast
def rss(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
n, d = int(sys.argv[1]), int(sys.argv[2])
x = torch.empty(n, d, dtype=torch.float32).normal_()
rankme_fast.rankme(x[:1000])          # load the extension and warm torch before measuring
base = rss("VmRSS")
try:                                   # reset the kernel's high-water mark (Linux >= 4.0)
    open("/proc/self/clear_refs", "w").write("5")
    reset = True
except OSError:
    reset = False
peak = [base]
done = threading.Event()
def sample():                          # fallback when VmHWM cannot be reset
    while not done.is_set():
        peak[0] = max(peak[0], rss("VmRSS")); time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
r = rankme_fast.rankme(x)
done.set(); t.join()
hwm = rss("VmHWM") if reset else peak[0]
print(json.dumps({"extra_bytes": max(hwm, peak[0]) - base, "hwm_reset": reset, "rankme": r,
                  "native": rankme_fast.backends.cpu.load() is not None}))
"""


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_peak_extra_memory(shape, record_property):
    """Peak RSS growth of rankme() over the input itself must stay within d²·8 B + 64 MiB."""
    n, d = shape
    # cwd outside the repository, so `python -c` imports the installed package (with its extension)
    out = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(n), str(d)], capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["native"], "the child process did not load the native extension"
    limit = d * d * 8 + 64 * 2**20
    record_property("extra_bytes", res["extra_bytes"])
    print(f"\n{n}x{d}: peak extra {res['extra_bytes'] / 2**20:.1f} MiB, limit {limit / 2**20:.1f} MiB")
    assert res["extra_bytes"] <= limit
