"""SLQ at d = 65,536 within this machine's 24 GiB (issue 5, item 4).

    python benchmarks/slq_large_d.py [--n 70000] [--d 65536] [--dtype bfloat16]

X: (N, d) Gaussian with column scales k^-0.7, built in row chunks directly in ``--dtype`` (bf16: 9.2 GB at
the defaults; a float64 d×d Gram would be 34 GB, so exact methods cannot run here). Reports the SLQ
estimate, its interval, time, operator passes and the process's peak resident memory (ru_maxrss).
"""
import argparse
import datetime
import resource
import time

import torch

import rankme_fast as rf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=70_000)
    ap.add_argument("--d", type=int, default=65_536)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    scale = torch.arange(1, a.d + 1, dtype=torch.float32) ** -0.7
    x = torch.empty(a.n, a.d, dtype=dt)
    for r0 in range(0, a.n, 4096):
        r1 = min(a.n, r0 + 4096)
        x[r0:r1] = (torch.randn(r1 - r0, a.d, generator=g) * scale).to(dt)
    print(f"N={a.n} d={a.d} {a.dtype} ({x.numel() * x.element_size() / 2**30:.1f} GiB), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {datetime.date.today()}", flush=True)
    t = time.perf_counter()
    s = rf.spectrum(x, method="slq")
    el = time.perf_counter() - t
    lo, hi = s.rankme_interval()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"slq: {el:.1f} s, passes {s.passes}, probes {s.quadrature.nodes.shape[0]}, deflated {s.singular_values.numel()}, "
          f"RankMe {s.rankme():.2f} [{lo:.2f}, {hi:.2f}], stable rank {s.stable_rank():.3f}, peak RSS {peak:.1f} GiB")


if __name__ == "__main__":
    main()
