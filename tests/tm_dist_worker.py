"""One rank of the torchmetrics DDP tests (run by tests/test_integrations_torchmetrics.py).

Usage: python tm_dist_worker.py CONFIG_JSON OUT_DIR — with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE set.

CONFIG_JSON: {"n", "d", "seed", "splits": rows per rank, "batch", "dtype", "metric": "RankMe" |
"SpectralMetrics", "kwargs": metric options, "d_of_rank": {rank: d}, "second_round": rows per rank fed
after the first compute (then computed again)}. The matrix is tests' ``full_rank(n, d, seed)``; rank r
takes rows ``sum(splits[:r]) : sum(splits[:r+1])``. Every torch.distributed collective the metric calls is
recorded (name, numel, dtype) by wrapping the functions of torch.distributed. Writes OUT_DIR/rank{r}.json
with the values and the calls, or OUT_DIR/rank{r}.error.json with the exception (exit code 1).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import traceback

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "broadcast",
               "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter", "scatter",
               "all_to_all", "all_to_all_single")


def full_rank(n: int, d: int, seed: int, dtype):
    """A full-rank matrix with a decaying spectrum (σ_1/σ_d = 30) and a non-zero mean."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -1.5, d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scales @ q.T + 0.3
    return z.to(dtype)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    out = sys.argv[2]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])

    import torch
    import torch.distributed as dist

    from rankme_fast.integrations import torchmetrics as rtm

    dtype = getattr(torch, cfg.get("dtype", "float64"))
    d = int(cfg.get("d_of_rank", {}).get(str(rank), cfg["d"]))
    z = full_rank(cfg["n"], d, cfg["seed"], dtype)
    lo = sum(cfg["splits"][:rank])
    shard = z[lo : lo + cfg["splits"][rank]]

    calls = []

    def spy(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            lists = [a for a in args if isinstance(a, list)]
            numel = sum(t.numel() for t in tensors) + sum(t.numel() for lst in lists for t in lst
                                                          if isinstance(t, torch.Tensor))
            dtypes = sorted({str(t.dtype) for t in tensors})
            calls.append({"op": name, "numel": numel, "dtypes": dtypes,
                          "input_numel": tensors[0].numel() if tensors else None})
            return fn(*args, **kwargs)
        return wrapped

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, spy(name, getattr(dist, name)))
    try:
        metric = getattr(rtm, cfg["metric"])(**cfg.get("kwargs", {}))
        step = cfg["batch"]
        for r0 in range(0, shard.shape[0], step):
            metric.update(shard[r0 : r0 + step])
        first = metric.compute()
        result = {"first": _plain(first), "local_rows_after_compute": int(metric.n_rows), "calls": calls}
        second = cfg.get("second_round")
        if second:
            lo2 = sum(cfg["splits"]) + sum(second[:rank])
            extra = z[lo2 : lo2 + second[rank]]
            metric.update(extra)
            result["second"] = _plain(metric.compute())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        code = 0
    except Exception as exc:  # noqa: BLE001 - reported to the test
        with open(os.path.join(out, f"rank{rank}.error.json"), "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}, f)
        code = 1
    dist.destroy_process_group()
    return code


def _plain(v):
    if isinstance(v, dict):
        return {k: float(x) for k, x in v.items()}
    return float(v)


if __name__ == "__main__":
    sys.exit(main())
