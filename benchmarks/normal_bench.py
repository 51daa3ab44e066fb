"""Fused normal operator Xᵀ(X W) vs torch's X.T @ (X @ W) on this CPU (issue 5, part 1).

    python benchmarks/normal_bench.py [--rounds 5]

float32 X (N×d), float64 W (d×k) (torch's route gets W in float32). Routes, interleaved round by round
so machine noise hits all alike; medians reported:
  fused-f32   rankme_fast.backends.cpu.normal_apply(x, w)          float32 blocks of <= 256 rows, float64 sums
  fused-f64   rankme_fast.backends.cpu.normal_apply(x, w, single_precision=False)
  torch       x.T @ (x @ w32)                                      two sgemm passes over X
"""
import argparse
import datetime
import platform
import statistics
import time

import torch

from rankme_fast.backends import cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="1000000x256,1000000x1024")
    ap.add_argument("--ks", default="8,16,32")
    a = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, isa {cpu.load().gram_isa()}, {datetime.date.today()}")
    print("| N x d | k | fused-f32 s | fused-f64 s | torch s | torch / fused-f32 | torch / fused-f64 |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for shape in a.shapes.split(","):
        n, d = map(int, shape.split("x"))
        x = torch.randn(n, d, generator=g)
        for k in map(int, a.ks.split(",")):
            w = torch.randn(d, k, generator=g, dtype=torch.float64)
            w32 = w.float()
            routes = {"fused-f32": lambda: cpu.normal_apply(x, w),
                      "fused-f64": lambda: cpu.normal_apply(x, w, single_precision=False),
                      "torch": lambda: x.T @ (x @ w32)}
            for f in routes.values():
                f()
            ts = {r: [] for r in routes}
            for _ in range(a.rounds):
                for r, f in routes.items():
                    t = time.perf_counter()
                    f()
                    ts[r].append(time.perf_counter() - t)
            m = {r: statistics.median(v) for r, v in ts.items()}
            print(f"| {n}x{d} | {k} | {m['fused-f32']:.3f} | {m['fused-f64']:.3f} | {m['torch']:.3f} | "
                  f"{m['torch'] / m['fused-f32']:.2f}x | {m['torch'] / m['fused-f64']:.2f}x |", flush=True)
        del x


if __name__ == "__main__":
    main()
