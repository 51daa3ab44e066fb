"""A/B of how exact_gram spots float64 data beyond 2^±400 (issue 14, item 8), same run, interleaved:
"pre-check" = one abs_max pass over x before the Gram (the first version), "post-hoc" = a look at the Gram's
diagonal afterwards (current). Usage: python benchmarks/ab_scale_check.py [--n 1000000 --d 256 --reps 7]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rankme_fast as rf  # noqa: E402
from rankme_fast import backends, gram  # noqa: E402
from rankme_fast._config import cpu_model, kernel_isa  # noqa: E402
from rankme_fast.strategies import gram as sg  # noqa: E402


def pre_check(x, *, center, backend=None, num_threads=None, scaled=False):
    n, d = x.shape
    k = gram.scale_exponent(gram.abs_max(x)) if x.dtype == torch.float64 else 0
    be = backends.select(backend, x.device, dtype=x.dtype, shape=(n, d))
    g, transposed = gram._backend_gram(be, gram.ldexp(x, k) if k else x, center=center, num_threads=num_threads)
    if k and not scaled:
        g, k = gram.ldexp(g, -2 * k), 0
    return gram.GramResult(g, n, d, transposed, be.NAME, k)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    x = torch.randn(a.n, a.d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    routes = {"pre-check": pre_check, "post-hoc": gram.exact_gram}
    rf.rankme(x)
    times = {k: [] for k in routes}
    vals = {}
    for _ in range(a.reps):
        for name, fn in routes.items():
            sg.exact_gram = fn
            t0 = time.perf_counter()
            vals[name] = rf.rankme(x)
            times[name].append(time.perf_counter() - t0)
    sg.exact_gram = gram.exact_gram
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "isa": kernel_isa(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "n": a.n, "d": a.d, "reps": a.reps, "median_s": med,
           "ratio_post_over_pre": med["post-hoc"] / med["pre-check"], "rankme": vals, "raw_s": times}
    print(json.dumps({k: out[k] for k in ("cpu", "isa", "median_s", "ratio_post_over_pre", "rankme")}))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
