"""Turn a pytest-benchmark JSON file into the markdown table kept in benchmarks/RESULTS.md.

    python benchmarks/report.py bench.json
"""
import json
import sys
from collections import defaultdict


def machine_line(data: dict) -> str:
    """One line naming the machine, versions and date of a pytest-benchmark JSON file."""
    mi = data["machine_info"]
    return (f"Machine: {mi.get('cpu')} ({mi.get('cores')} cores, torch threads {mi.get('torch_threads')}), "
            f"kernel ISA {mi.get('kernel_isa')}; torch {mi.get('torch')}, rankme_fast {mi.get('rankme_fast')}, "
            f"Python {mi.get('python_version')}; date {mi.get('date')}")


def main(path: str) -> None:
    data = json.load(open(path))
    print(machine_line(data) + "\n")
    groups = defaultdict(dict)
    extra = {}
    for b in data["benchmarks"]:
        route = b["params"]["route"]
        groups[b["group"]][route] = b["stats"]
        extra[b["group"]] = b["extra_info"]
    print("| N x d | route | median s | IQR s | rounds | svdvals / route | route / floor |")
    print("|---|---|---|---|---|---|---|")
    for g, routes in groups.items():
        floor = extra[g]["floor_s"]
        sv = routes.get("svdvals", {}).get("median")
        for r in ("rankme_fast", "svdvals", "f64_gram"):
            if r not in routes:
                continue
            s = routes[r]
            ratio = f"{sv / s['median']:.2f}x" if sv else "-"
            print(f"| {g} | {r} | {s['median']:.3f} | {s['iqr']:.3f} | {s['rounds']} | {ratio} | "
                  f"{s['median'] / floor:.2f} |")
        print(f"| {g} | floor (N·d² at {extra[g]['dgemm_flops'] / 1e9:.0f} GFLOP/s dgemm) | {floor:.3f} | | | | 1.00 |")


if __name__ == "__main__":
    main(sys.argv[1])
