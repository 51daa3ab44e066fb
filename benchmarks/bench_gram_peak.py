"""Exact-Gram kernel efficiency against the machine's FMA peak and torch's dgemm, same run (issue 17).

    python benchmarks/bench_gram_peak.py [--isa auto|avx512|avx2|generic] [--dims 256,1024,2048]
                                         [--gflop 4] [--rounds 3] [--load] [--json FILE]

For each d: N = gflop·1e9 / d² rows of float32 (the streaming kernel's work is N·d² flops: the upper
triangle, 2 flops per FMA), ``rankme_fast.backends.cpu.gram_update`` timed on 1 and on all threads (the
best of ``--rounds``); the FMA peak of benchmarks/fma_peak.py for the same ISA and thread count; torch's
float64 ``x.T @ x`` (MKL/OpenBLAS dgemm, 2·N·d² flops) on the same thread count. ``--isa`` forces the
kernel (RANKME_FAST_ISA, in a fresh process). ``--load`` repeats the 2-thread timing with one and with two
``while True: pass`` processes on the cores (the hardening issue's bounded-slowdown check).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _child(isa: str, dims, gflop: float, rounds: int, load: bool) -> dict:
    import torch

    from fma_peak import peak
    from rankme_fast._config import cpu_model
    from rankme_fast.backends import cpu

    mod = cpu.load()
    ran = mod.gram_isa()
    pk = peak(ran, seconds=0.3)
    nt_all = pk["threads"]
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
           "isa": ran, "forced": os.environ.get("RANKME_FAST_ISA"), "torch": torch.__version__,
           "python": platform.python_version(), "peak": pk, "rows": []}
    spin_procs = []

    def spin(k):
        for p in spin_procs:
            p.kill()
            p.wait()
        spin_procs.clear()
        spin_procs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k))
        if k:
            time.sleep(0.3)

    try:
        for d in dims:
            n = max(1000, int(gflop * 1e9 / (d * d)))
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, d, generator=g)
            gram = torch.zeros(cpu.padded(d), cpu.padded(d), dtype=torch.float64)
            row = {"d": d, "n": n}
            loads = (0, 1, 2) if load else (0,)
            for busy in loads:
                spin(busy)
                for nt in ((1, nt_all) if busy == 0 else (nt_all,)):
                    best = float("inf")
                    for _ in range(rounds):
                        gram.zero_()
                        t0 = time.perf_counter()
                        cpu.gram_update(x, gram, num_threads=nt)
                        best = min(best, time.perf_counter() - t0)
                    rate = n * d * d / best / 1e9
                    key = f"t{nt}" + (f"_busy{busy}" if busy else "")
                    row[key + "_s"] = best
                    row[key + "_gflops"] = rate
                    if not busy:
                        row[key + "_eff"] = rate / (pk["gflops_1thread"] if nt == 1 else pk["gflops_all"])
            spin(0)
            xd = x.double()
            for nt in (1, nt_all):
                prev = torch.get_num_threads()
                torch.set_num_threads(nt)
                try:
                    best = float("inf")
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        xd.T @ xd
                        best = min(best, time.perf_counter() - t0)
                finally:
                    torch.set_num_threads(prev)
                row[f"dgemm_t{nt}_gflops"] = 2 * n * d * d / best / 1e9
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        spin(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default="auto", choices=("auto", "avx512", "avx2", "generic"))
    ap.add_argument("--dims", default="256,1024,2048")
    ap.add_argument("--gflop", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    dims = [int(v) for v in a.dims.split(",")]
    if a.child:
        print(json.dumps(_child(a.isa, dims, a.gflop, a.rounds, a.load)))
        return
    env = dict(os.environ)
    env.pop("RANKME_FAST_ISA", None)
    if a.isa != "auto":
        env["RANKME_FAST_ISA"] = a.isa
    cmd = [sys.executable, __file__, "--child", "--isa", a.isa, "--dims", a.dims, "--gflop", str(a.gflop),
           "--rounds", str(a.rounds)] + (["--load"] if a.load else [])
    res = json.loads(subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout)
    pk = res["peak"]
    print(f"{res['cpu']}, kernel isa={res['isa']}, FMA peak {pk['gflops_1thread']:.1f} GFLOP/s (1 thread), "
          f"{pk['gflops_all']:.1f} ({pk['threads']} threads)")
    nt = pk["threads"]
    print(f"{'d':>6} {'N':>9} {'1 thr GF/s':>11} {'eff':>6} {f'{nt} thr GF/s':>11} {'eff':>6} {'dgemm1':>8} "
          f"{f'dgemm{nt}':>8}" + (f" {'1 busy':>8} {'2 busy':>8}" if a.load else ""))
    for r in res["rows"]:
        line = (f"{r['d']:>6} {r['n']:>9} {r['t1_gflops']:>11.1f} {r['t1_eff']:>6.0%} {r[f't{nt}_gflops']:>11.1f} "
                f"{r[f't{nt}_eff']:>6.0%} {r['dgemm_t1_gflops']:>8.1f} {r[f'dgemm_t{nt}_gflops']:>8.1f}")
        if a.load:
            line += (f" {r[f't{nt}_s'] and r[f't{nt}_busy1_s'] / r[f't{nt}_s']:>7.2f}x"
                     f" {r[f't{nt}_busy2_s'] / r[f't{nt}_s']:>7.2f}x")
        print(line)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", a.json)


if __name__ == "__main__":
    main()
