"""Timing of the batched row Gram (rankme_fast.backends.cpu.row_gram_batch), medians of repeats.

    PYTHONPATH=. python benchmarks/bench_rowgram.py [--threads 2] [--reps 5] [--case a|b|all]

(a) EigenScore-like: 10,000 items of 10 x 4096 bfloat16, contiguous.
(b) LLM-Check-like: 1,000 items of n_max=512 rows with lengths uniform in [32, 512], d=4096 bfloat16.
GFLOP/s counts the useful flops only: 2 * d * L (L + 1) / 2 per item.

Measured 2026-12-02 on the 2-vCPU dev VM (AMD EPYC, family 26 / Zen 5, AVX-512, shared and noisy),
medians of 5, isa=avx512:
    (a) 2 threads 44-49 ms (92-102 GFLOP/s), 1 thread 90 ms (50 GFLOP/s)
    (b) 2 threads 2.28-2.39 s (166-175 GFLOP/s), 1 thread 4.2 s (91 GFLOP/s)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from rankme_fast.backends import cpu


def run(name, x, lengths, threads, reps, **kw):
    B, n, d = x.shape
    L = lengths.double() if lengths is not None else torch.full((B,), float(n), dtype=torch.float64)
    flops = float((2 * d * L * (L + 1) / 2).sum())
    gram = torch.zeros(B, n, n, dtype=torch.float64)
    cpu.row_gram_batch(x, gram, lengths=lengths, num_threads=threads, **kw)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        cpu.row_gram_batch(x, gram, lengths=lengths, num_threads=threads, **kw)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"{name}: median {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}) over {reps}, "
          f"{flops / med / 1e9:.1f} GFLOP/s, threads={threads} {kw or ''}", flush=True)
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--case", default="all")
    ap.add_argument("--kernel", type=int, default=0)
    ap.add_argument("--block", type=int, default=0)
    a = ap.parse_args()
    print(f"isa={cpu.load().gram_isa()}")
    kw = {}
    if a.kernel:
        kw["_kernel"] = a.kernel
    if a.block:
        kw["_block"] = a.block
    g = torch.Generator().manual_seed(0)
    if a.case in ("a", "all"):
        x = torch.randn(10_000, 10, 4096, generator=g).to(torch.bfloat16)
        run("(a) 10000 x 10 x 4096 bf16", x, None, a.threads, a.reps, **kw)
        del x
    if a.case in ("b", "all"):
        x = torch.randn(1_000, 512, 4096, generator=g).to(torch.bfloat16)
        lengths = torch.randint(32, 513, (1_000,), generator=g)
        run("(b) 1000 x [32,512] x 4096 bf16", x, lengths, a.threads, a.reps, **kw)


if __name__ == "__main__":
    main()
