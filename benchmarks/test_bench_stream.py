"""Streaming from disk vs in memory (issue 3): a 2,000,000 x 1024 float32 .npy (8 GiB).

Run:  pytest benchmarks/test_bench_stream.py --benchmark-json=stream.json  then
      python benchmarks/report_stream.py stream.json      (prints the RESULTS.md table)

Routes, interleaved round by round in one process (same run, same data; the machine is shared and its
speed drifts, so only ratios within a round mean much):
  memory        rankme_fast.rankme(x) with the whole matrix already in RAM (np.load, untimed)
  stream_warm   rankme_fast.score(path) — file in the OS page cache
  stream_cold   rankme_fast.score(path) — file evicted from the page cache first (posix_fadvise)
then ``test_shards`` (the same rows as 4 .npy shards vs the single file: time and RankMe) and
``test_peak_rss`` (``score`` in a fresh process: peak RSS = VmHWM, torch import included).

Data: rows N(0, I) scaled per column by k^-1/2 (k = 1..d), seed 0, written once to
``$RANKME_FAST_BENCH_DIR`` (default: <tmp>/rankme_fast_bench; ~16 GiB with the shards) and reused.
``RANKME_FAST_BENCH_SMALL=1`` shrinks it to 200,000 x 1024 for a quick check.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import rankme_fast

SMALL = bool(os.environ.get("RANKME_FAST_BENCH_SMALL"))
N, D = (200_000, 1024) if SMALL else (2_000_000, 1024)
SHARDS = 4
ROUNDS = int(os.environ.get("RANKME_FAST_BENCH_ROUNDS", "5"))
WRITE_ROWS = 65_536


def _write(path: str, rows: range, scales: torch.Tensor, gen_seed: int) -> None:
    out = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=np.float32, shape=(len(rows), D))
    for i, r0 in enumerate(range(0, len(rows), WRITE_ROWS)):
        # one generator per block of the *global* row index, so shards and the single file hold the same rows
        blk = rows.start + r0
        g = torch.Generator().manual_seed(gen_seed * 1_000_003 + blk)
        m = min(WRITE_ROWS, len(rows) - r0)
        out[r0 : r0 + m] = (torch.randn(m, D, generator=g) * scales).numpy()
    out.flush()
    del out
    os.replace(path + ".tmp", path)


@pytest.fixture(scope="module")
def files():
    root = os.environ.get("RANKME_FAST_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "rankme_fast_bench")
    os.makedirs(root, exist_ok=True)
    single = os.path.join(root, f"emb_{N}x{D}_f32.npy")
    shard_dir = os.path.join(root, f"shards_{N}x{D}_f32")
    scales = torch.arange(1, D + 1, dtype=torch.float32) ** -0.5
    if not os.path.exists(single):
        _write(single, range(0, N), scales, 0)
    os.makedirs(shard_dir, exist_ok=True)
    bounds = np.linspace(0, N, SHARDS + 1).astype(int) // WRITE_ROWS * WRITE_ROWS
    bounds[-1] = N
    for i in range(SHARDS):
        p = os.path.join(shard_dir, f"part_{i}.npy")
        if not os.path.exists(p):
            _write(p, range(int(bounds[i]), int(bounds[i + 1])), scales, 0)
    return single, shard_dir


def _evict(path: str) -> None:
    """Drop the file's pages from the OS page cache (clean pages; no root needed)."""
    paths = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in os.listdir(path)]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


ROUTES = ("memory", "stream_warm", "stream_cold")


def test_stream_vs_memory(benchmark, files, dgemm_rate):
    """The three routes interleaved round by round (memory, warm, cold, memory, ...), so drifts of this
    shared machine's speed hit all of them alike; per-route times go to extra_info["times"]."""
    import time

    single, shard_dir = files
    benchmark.group = f"{N}x{D}"
    _evict(shard_dir)  # 8 GiB array + 8 GiB file in the page cache must fit in RAM together
    x = torch.from_numpy(np.load(single))  # 8 GiB in RAM, untimed; the file stays in the page cache too
    times = {r: [] for r in ROUTES}
    cpu = {r: [] for r in ROUTES}
    values = {}

    def one_round():
        for route in ROUTES:
            if route == "stream_cold":
                _evict(single)
            elif route == "stream_warm":
                _warm(single)
            t, c = time.perf_counter(), time.process_time()
            if route == "memory":
                values[route] = rankme_fast.rankme(x)
            else:
                values[route] = rankme_fast.score(single, progress=False).metrics["rankme"]
            times[route].append(time.perf_counter() - t)
            cpu[route].append(time.process_time() - c)  # all threads of this process

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    x = None  # free the 8 GiB before the next test
    benchmark.extra_info.update({"n": N, "d": D, "dgemm_flops": dgemm_rate, "floor_s": N * D * D / dgemm_rate,
                                 "times": times, "cpu_times": cpu, "rankme": values})
    assert max(values.values()) - min(values.values()) <= 1e-9 * values["memory"]


def test_shards(benchmark, files):
    """The same rows as 4 shards: time and RankMe next to the single file (both warm)."""
    single, shard_dir = files
    benchmark.group = f"{N}x{D}-shards"
    out = {}

    def both():
        for name, src in (("single", single), ("shards4", shard_dir)):
            _warm(src)
            import time

            t = time.perf_counter()
            out[name] = (rankme_fast.score(src, progress=False).metrics["rankme"], time.perf_counter() - t)

    benchmark.pedantic(both, rounds=1, iterations=1)
    benchmark.extra_info.update({k: {"rankme": v[0], "seconds": v[1]} for k, v in out.items()})
    benchmark.extra_info["shard_vs_single_rel"] = abs(out["shards4"][0] - out["single"][0]) / out["single"][0]
    assert benchmark.extra_info["shard_vs_single_rel"] <= 1e-9


CHILD = r"""
import json, re, sys, time
import rankme_fast
def vm(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
base = vm("VmRSS")
t = time.perf_counter()
res = rankme_fast.score(sys.argv[1], progress=False)
dt = time.perf_counter() - t
print(json.dumps({"rankme": res.metrics["rankme"], "seconds": dt, "peak_rss": vm("VmHWM"), "rss_after_import": base,
                  "backend": res.spectra[False].backend, "package": rankme_fast.__file__}))
"""


def test_peak_rss(benchmark, files):
    """Peak resident memory of scoring the 8 GiB file in a fresh process (page cache not counted); and
    of the single file again while this process holds every page of it mapped (issue 14: a reader
    that maps the file would then count the shared pages it touched)."""
    import mmap

    single, shard_dir = files
    benchmark.group = f"{N}x{D}-rss"
    out = {}
    for name, src in (("single", single), ("shards4", shard_dir), ("single_mapped_elsewhere", single)):
        _warm(src)
        mm = None
        if name == "single_mapped_elsewhere":
            with open(src, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            np.frombuffer(mm, np.uint8)[::mmap.PAGESIZE].max()  # every page mapped and resident here
        # cwd outside the repository: `python -c` puts the cwd first on sys.path, and the source tree has
        # no compiled extension (it would silently measure the pure-torch fallback)
        try:
            r = subprocess.run([sys.executable, "-c", CHILD, src], capture_output=True, text=True, check=True,
                               cwd=tempfile.gettempdir())
        finally:
            if mm is not None:
                mm.close()
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
        assert out[name]["backend"] == "cpu", out[name]
    benchmark.extra_info.update(out)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert out["single"]["peak_rss"] > 0
