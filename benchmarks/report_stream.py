"""Markdown table for benchmarks/RESULTS.md from a test_bench_stream.py pytest-benchmark JSON file.

    python benchmarks/report_stream.py stream.json
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine_line  # noqa: E402


def main(path: str) -> None:
    data = json.load(open(path))
    print(machine_line(data) + "\n")
    by = {b["name"].split("[")[0]: b["extra_info"] for b in data["benchmarks"]}
    ex = by["test_stream_vs_memory"]
    times = ex["times"]
    mem = times["memory"]
    print("| N x d | route | per-round s | median s | median of per-round ratio to memory | RankMe |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        ratios = [t / m for t, m in zip(ts, mem)]
        print(f"| {ex['n']}x{ex['d']} | {name} | {', '.join(f'{t:.2f}' for t in ts)} | {statistics.median(ts):.2f} | "
              f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.2f}' for r in ratios)}) | {ex['rankme'][name]:.12g} |")
    cpu = ex.get("cpu_times")
    if cpu:
        print("\nCPU time (user+system, all threads of the process) per round:\n")
        print("| route | per-round CPU s | median of per-round ratio to memory |")
        print("|---|---|---|")
        for name, ts in cpu.items():
            ratios = [t / m for t, m in zip(ts, cpu["memory"])]
            print(f"| {name} | {', '.join(f'{t:.1f}' for t in ts)} | {statistics.median(ratios):.3f} |")
    print(f"\nfloor: N·d² at the {ex['dgemm_flops'] / 1e9:.0f} GFLOP/s dgemm measured in this run = {ex['floor_s']:.2f} s")
    sh = by.get("test_shards")
    if sh:
        print(f"- 4 shards vs single file (both warm): {sh['shards4']['seconds']:.2f} s vs {sh['single']['seconds']:.2f} s; "
              f"RankMe {sh['shards4']['rankme']:.15g} vs {sh['single']['rankme']:.15g}, relative difference "
              f"{sh['shard_vs_single_rel']:.2e}")
    rss = by.get("test_peak_rss")
    if rss:
        for k in ("single", "shards4", "single_mapped_elsewhere"):
            if k not in rss:  # runs before issue 14 measured two cases only
                continue
            r = rss[k]
            print(f"- fresh process, {k}: peak RSS {r['peak_rss'] / 2**20:.0f} MiB (after `import rankme_fast`: "
                  f"{r['rss_after_import'] / 2**20:.0f} MiB), {r['seconds']:.2f} s, RankMe {r['rankme']:.12g}")


if __name__ == "__main__":
    main(sys.argv[1])
