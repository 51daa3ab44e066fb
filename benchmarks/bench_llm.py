"""Batched LLM hidden-state metrics vs the per-prompt loops users write (issue 15).

    python benchmarks/bench_llm.py --json benchmarks/results_llm/<date>.json [--rounds 3]

Cases (bf16 inputs, seeded):
  eigenscore   10,000 prompts × K = 10 answers × d = 4096, one (B, K, d) tensor.
               loop: per prompt ``torch.linalg.svdvals(torch.cov(z.float()) + αI)``, mean log10 (float32).
  llm_check    1,000 prompts × n ∈ [32, 512] tokens × d = 4096, a ragged list.
               loop: per prompt T_c = T.float() centred over features, ``svdvals(T_c)``, mean ln(σ² + α).
Each round times the batched call and the loop once, back to back (ratio = loop / batched of the same
round); ``--loop-items`` times the loop on the first k prompts only and scales it (recorded as such).
Peak extra memory of the batched call: VmHWM after resetting it (``/proc/self/clear_refs``) minus VmRSS
before the call, in a fresh subprocess per case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rankme_fast as rf  # noqa: E402
from rankme_fast._config import cpu_model  # noqa: E402
from native_guard import require_native  # noqa: E402

ALPHA = 1e-3


def make(case: str, scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    if case == "eigenscore":
        b = int(10_000 * scale)
        return torch.randn(b, 10, 4096, generator=g).bfloat16()
    n = int(1000 * scale)
    lens = torch.randint(32, 513, (n,), generator=g)
    return [torch.randn(int(k), 4096, generator=g).bfloat16() for k in lens]


def batched(case, x):
    if case == "eigenscore":
        return rf.eigenscore(x, alpha=ALPHA)
    return rf.llm_check_hidden_score(x, alpha=ALPHA)


def loop(case, x, k):
    out = []
    eye = torch.eye(10)
    for i in range(k):
        if case == "eigenscore":
            s = torch.linalg.svdvals(torch.cov(x[i].float()) + ALPHA * eye)
            out.append(float(s.log10().mean()))
        else:
            t = x[i].float()
            s = torch.linalg.svdvals(t - t.mean(1, keepdim=True))
            out.append(float((s.square() + ALPHA).log().mean()))
    return out


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return -1


def peak_child(case, scale):
    """Run in a subprocess: prints the batched call's peak extra memory (bytes)."""
    x = make(case, scale)
    batched(case, x[:2] if case == "eigenscore" else x[:2])  # load the kernel
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    batched(case, x)
    print(json.dumps({"peak_extra_bytes": _status("VmHWM") - rss0, "rss_before": rss0}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the prompt counts (quick runs)")
    ap.add_argument("--loop-items", type=int, default=0, help="time the loop on this many prompts and scale")
    ap.add_argument("--cases", default="eigenscore,llm_check")
    ap.add_argument("--json")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peak_child:
        return peak_child(a.peak_child, a.scale)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    res = {"info": info, "cases": {}}
    for case in a.cases.split(","):
        x = make(case, a.scale)
        items = len(x)
        k = min(items, a.loop_items) if a.loop_items else items
        batched(case, x[:4] if case == "eigenscore" else x[:4])  # warm up
        got = batched(case, x)
        ref = torch.tensor(loop(case, x, min(k, 50)), dtype=torch.float64)
        err = float((got[: ref.numel()] - ref).abs().max())
        rounds = []
        for r in range(a.rounds):
            t0 = time.perf_counter()
            batched(case, x)
            tb = time.perf_counter() - t0
            t0 = time.perf_counter()
            loop(case, x, k)
            tl = (time.perf_counter() - t0) * items / k
            rounds.append({"batched_s": tb, "loop_s": tl, "ratio": tl / tb})
            print(f"{case} round {r}: batched {tb * 1e3:.1f} ms, loop {tl * 1e3:.0f} ms"
                  f"{' (scaled from %d prompts)' % k if k < items else ''}, ratio {tl / tb:.1f}x", flush=True)
        del x
        out = subprocess.run([sys.executable, __file__, "--peak-child", case, "--scale", str(a.scale)],
                             capture_output=True, text=True, check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])
        res["cases"][case] = {"items": items, "loop_items": k, "rounds": rounds,
                              "median_ratio": statistics.median(r["ratio"] for r in rounds),
                              "min_ratio": min(r["ratio"] for r in rounds),
                              "max_abs_diff_vs_float32_loop": err, **peak}
        print(f"{case}: median ratio {res['cases'][case]['median_ratio']:.1f}x (min "
              f"{res['cases'][case]['min_ratio']:.1f}x), peak extra {peak['peak_extra_bytes'] / 2**20:.0f} MiB, "
              f"|batched - float32 loop| <= {err:.2e}", flush=True)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", a.json)


if __name__ == "__main__":
    require_native(__file__)
    main()
