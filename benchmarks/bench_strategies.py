"""The `rankme-fast bench` race for RESULTS.md (issue 12): every strategy and peer's route at
1,000,000×256 and 200,000×2048 float32, power1 and rank8+noise spectra, on this machine.

    python benchmarks/bench_strategies.py [--out benchmarks/results_bench] [--repeats 3] [--timeout 400]
                                          [--only 1000000x256:power1,...]

Writes one JSON per configuration (BenchResult.to_dict), the Markdown tables (stdout and
``<out>/tables.md``) and the Pareto plots (``<out>/pareto_<config>.png``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import rankme_fast as rf

CONFIGS = [((1_000_000, 256), "power1"), ((1_000_000, 256), "rank8+noise"),
           ((200_000, 2048), "power1"), ((200_000, 2048), "rank8+noise")]


def md_table(res) -> str:
    m = res.machine
    out = [f"**{res.n:,} × {res.d:,} {res.dtype}, {res.source}** — reference: {res.reference} "
           f"(RankMe {res.reference_rankme:.6g}; truth {res.truth_rankme:.6g}). {m['cpu']}, {m['isa']}, "
           f"{m['threads']} threads, torch {m['torch']}, rankme_fast {m['rankme_fast']}, {m['date']}.", "",
           "| route | exact | median s | min–max s | peak extra MiB | RankMe | rel. err | vs truth | max dσ/σ₁ | status |",
           "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "—" if v is None else fmt.format(v)
    for r in res.rows:
        out.append(f"| {r.name} | {'yes' if r.exact else 'no'} | {f(r.median_s, '{:.3g}')} | "
                   f"{f(r.min_s, '{:.3g}')}–{f(r.max_s, '{:.3g}')} | "
                   f"{f(None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20, '{:.0f}')} | "
                   f"{f(r.rankme, '{:.6g}')} | {f(r.rankme_rel_err, '{:.1e}')} | {f(r.rankme_rel_err_truth, '{:.1e}')} | "
                   f"{f(r.sigma_err, '{:.1e}')} | {r.status.replace('|', '/')} |")
    out.append(f"\nMemory: {res.memory_method}.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results_bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--only", default="")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    only = {s for s in a.only.split(",") if s}
    tables = []
    for (n, d), spec in CONFIGS:
        tag = f"{n}x{d}:{spec}"
        if only and tag not in only:
            continue
        res = rf.bench(shape=(n, d), spectrum=spec, repeats=a.repeats, timeout=a.timeout, progress=False)
        safe = tag.replace(":", "_").replace("+", "")
        (a.out / f"{safe}.json").write_text(json.dumps(res.to_dict(), indent=1, default=str))
        res.plot(a.out / f"pareto_{safe}.png")
        t = md_table(res)
        print(t + "\n", flush=True)
        tables.append(t)
    (a.out / "tables.md").write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
