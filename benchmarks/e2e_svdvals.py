"""Exact RankMe end to end against torch.linalg.svdvals at issue 17's shapes, same run, per round.

    PYTHONPATH=. python benchmarks/e2e_svdvals.py OUT.json

1,000,000 x 256 and 200,000 x 2048 float32 (standard normal, seed 0): `rf.rankme(x)` and
`torch.linalg.svdvals(x)` alternate, 3 rounds; the ratio is svdvals / rankme of the same round.
Needs ~2.5 GB of memory and ~3 minutes on 2 cores.
"""
import json
import sys
import time

import torch

import rankme_fast as rf
torch.manual_seed(0)
out = {}
for (n, d) in [(1_000_000, 256), (200_000, 2048)]:
    x = torch.randn(n, d)
    rf.rankme(x[:4096])
    rows = []
    for rnd in range(3):
        t = time.perf_counter(); r1 = rf.rankme(x); a = time.perf_counter() - t
        t = time.perf_counter(); s = torch.linalg.svdvals(x); b = time.perf_counter() - t
        rows.append((a, b, b / a))
        print(f"{n}x{d} round {rnd}: rf.rankme {a:.3f} s  svdvals {b:.3f} s  ratio {b/a:.2f}", flush=True)
    out[f"{n}x{d}"] = rows
    del x
json.dump(out, open(sys.argv[1], "w"), indent=1)
