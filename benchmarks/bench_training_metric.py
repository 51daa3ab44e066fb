"""Cost of the torchmetrics RankMe in a training loop (issue 13, item 5), on this CPU.

Measures, in the same process and interleaved (so the ratios survive drift on shared cores):
  step    one training step of a small CNN encoder (b images 3×32×32 -> d-dim embedding; forward, backward,
          SGD update);
  update  ``RankMe.update`` of that step's (b, d) float32 embeddings (the float64 SYRK of the native kernel);
  enqueue the peer's alternative per step: copying the embeddings into a preallocated float32 queue;
and, once per epoch, ``RankMe.compute`` (float64 eigvalsh of the d×d Gram) against the peer's
``torch.linalg.svdvals`` of a float32 queue of N rows. Memory is reported for the paper's N = 25,600, d = 2048.

Usage: python benchmarks/bench_training_metric.py [--b 256] [--d 2048] [--reps 7] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankme_fast._config import cpu_model, kernel_isa  # noqa: E402
from rankme_fast.integrations.torchmetrics import RankMe  # noqa: E402


def encoder(d: int) -> torch.nn.Module:
    """A small CNN (~0.4 M parameters before the projection) ending in a d-dim linear projection."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(128, 256, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(256, d))


def timed(fn, reps: int) -> list:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=256)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--queue", type=int, default=2048, help="rows of the peer's queue for the compute comparison")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    b, d = args.b, args.d
    torch.manual_seed(0)
    net = encoder(d)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(b, 3, 32, 32)
    holder = {}

    def step():
        z = net(x)
        loss = z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        holder["z"] = z.detach()

    metric = RankMe()
    queue = torch.empty(args.queue, d, dtype=torch.float32)

    def update():
        metric.update(holder["z"])

    def enqueue():
        queue[:b].copy_(holder["z"])

    step(), update(), enqueue()  # warm-up (native kernel load, allocations)
    rows = {"step": [], "update": [], "enqueue": []}
    for _ in range(args.reps):  # interleaved: each repetition measures all three back to back
        rows["step"] += timed(step, 1)
        rows["update"] += timed(update, 1)
        rows["enqueue"] += timed(enqueue, 1)
    med = {k: statistics.median(v) for k, v in rows.items()}

    metric.compute()
    t_compute = statistics.median(timed(lambda: (setattr(metric, "_computed", None), metric.compute()), 3))
    qfill = torch.randn(args.queue, d)
    t_svd = statistics.median(timed(lambda: torch.linalg.svdvals(qfill), 3))

    n_paper = 25_600
    mem = {"ours_state_bytes": d * d * 8 + 2 * d * 8 + 8,
           "queue_bytes_per_rank": n_paper * d * 4,
           "queue_bytes_after_gather_world8": 8 * n_paper * d * 4}
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "isa": kernel_isa(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "b": b, "d": d, "reps": args.reps,
        "median_s": med, "update_over_step": med["update"] / med["step"],
        "compute_s": t_compute, "peer_svdvals_s": t_svd, "peer_queue_rows": args.queue, "memory": mem,
        "raw_s": rows,
    }
    print(f"{result['cpu']} ({result['isa']}), {result['threads']} threads, torch {torch.__version__}")
    print(f"b={b}, d={d}: training step {med['step'] * 1e3:.1f} ms, RankMe.update {med['update'] * 1e3:.2f} ms "
          f"({100 * result['update_over_step']:.1f}% of the step), queue copy {med['enqueue'] * 1e3:.3f} ms")
    print(f"epoch end: RankMe.compute (float64 eigvalsh {d}x{d}) {t_compute:.3f} s; "
          f"peer svdvals of a {args.queue}x{d} float32 queue {t_svd:.3f} s")
    print(f"memory at N=25,600: ours {mem['ours_state_bytes'] / 2**20:.1f} MiB (any N); queue "
          f"{mem['queue_bytes_per_rank'] / 2**20:.0f} MiB per rank, "
          f"{mem['queue_bytes_after_gather_world8'] / 2**20:.0f} MiB after an all_gather over 8 ranks")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
