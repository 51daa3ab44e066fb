"""Markdown table for benchmarks/RESULTS.md from a test_bench_stream.py pytest-benchmark JSON file.

    python benchmarks/report_stream.py stream.json
"""
import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    mi = data["machine_info"]
    print(f"Machine: {mi.get('cpu')} ({mi.get('cores')} cores, torch threads {mi.get('torch_threads')}), "
          f"kernel ISA {mi.get('kernel_isa')}; torch {mi.get('torch')}, rankme_fast {mi.get('rankme_fast')}, "
          f"Python {mi.get('python_version')}; date {mi.get('date')}\n")
    routes, rss = {}, None
    for b in data["benchmarks"]:
        if b["name"].startswith("test_peak_rss"):
            rss = b["extra_info"]
            continue
        routes[b["params"]["route"]] = b
    mem = routes["memory"]["stats"]["median"]
    ex = routes["memory"]["extra_info"]
    print("| N x d | route | median s | min s | max s | rounds | route / memory | RankMe |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("memory", "stream_warm", "stream_cold", "shards4"):
        if name not in routes:
            continue
        s, e = routes[name]["stats"], routes[name]["extra_info"]
        print(f"| {e['n']}x{e['d']} | {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | {s['rounds']} | "
              f"{s['median'] / mem:.3f} | {e['rankme']:.12g} |")
    print(f"\nfloor: N·d² at the {ex['dgemm_flops'] / 1e9:.0f} GFLOP/s dgemm measured in this run = {ex['floor_s']:.2f} s")
    if rss:
        for k in ("single", "shards4"):
            r = rss[k]
            print(f"- fresh process, {k}: peak RSS {r['peak_rss'] / 2**20:.0f} MiB (after `import rankme_fast`: "
                  f"{r['rss_after_import'] / 2**20:.0f} MiB), {r['seconds']:.2f} s, RankMe {r['rankme']:.12g}")
        print(f"- RankMe shards4 vs single file: relative difference {rss['shard_vs_single_rel']:.2e}")


if __name__ == "__main__":
    main(sys.argv[1])
