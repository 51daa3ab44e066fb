"""One rank of the torch.distributed tests of GramAccumulator.all_reduce (run by tests/test_distributed.py).

Usage: python dist_worker.py CONFIG_JSON OUT_DIR — with MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set.

CONFIG_JSON: {"kind", "n", "d", "seed", "offset", "dtype", "splits": [rows of rank 0, rows of rank 1, ...],
"batch": rows per update, "empty_batch_ranks": ranks that feed one (0, d) batch, "d_of_rank": {rank: d},
"nan_ranks": ranks that feed (and catch the error of) a batch holding a NaN after their shard,
"twice": call all_reduce a second time, "reload_ranks": ranks that load their local state_dict back
between the two calls, "timeout": seconds passed to all_reduce, "absent_ranks": ranks that never call
all_reduce (they sleep "absent_s" seconds, still in the group, then exit 0), "fail_prepare_ranks": ranks
whose accumulator fails (MemoryError) to form its part of the reduction}.
The full matrix is ``make_embeddings(n, d, kind, seed, offset)`` in float64, converted to ``dtype``;
rank r takes the rows ``sum(splits[:r]) : sum(splits[:r+1])`` (a rank listed in d_of_rank builds its
shard from a matrix of that width instead). Writes OUT_DIR/rank{r}.pt with the reduced state, or
OUT_DIR/rank{r}.error.json with the exception, and exits non-zero on error.

Run with the temporary directory as cwd and the script's own folder first on sys.path, so
``import rankme_fast`` finds the installed package, never the source tree.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback


def main() -> int:
    cfg = json.loads(sys.argv[1])
    out = sys.argv[2]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])

    import torch
    import torch.distributed as dist

    import rankme_fast
    from rankme_fast.demo import make_embeddings
    from rankme_fast.gram import GramAccumulator

    dtype = getattr(torch, cfg.get("dtype", "float64"))
    d = int(cfg.get("d_of_rank", {}).get(str(rank), cfg["d"]))
    z = make_embeddings(cfg["n"], d, cfg["kind"], dtype=torch.float64, seed=cfg["seed"],
                        offset=cfg.get("offset", 0.0)).to(dtype) * cfg.get("scale", 1.0)
    lo = sum(cfg["splits"][:rank])
    shard = z[lo : lo + cfg["splits"][rank]]

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    acc = None
    t0 = time.monotonic()
    try:
        acc = GramAccumulator(backend=cfg.get("backend"))
        if rank in cfg.get("empty_batch_ranks", []):
            acc.update(torch.empty(0, d, dtype=dtype))
        step = cfg["batch"]
        for r0 in range(0, shard.shape[0], step):
            acc.update(shard[r0 : r0 + step])
        if rank in cfg.get("nan_ranks", []):  # a caught NaN batch leaves this rank's accumulator broken
            bad = shard[:2].clone()
            bad[1, 0] = float("nan")
            try:
                acc.update(bad)
            except ValueError:
                pass
        local = {"n_rows": acc.n_rows, "n_batches": acc.n_batches}
        if rank in cfg.get("fail_prepare_ranks", []):  # e.g. out of memory forming this rank's d×d part
            def oom(*a, **k):
                raise MemoryError("simulated: cannot allocate the centred scatter matrix")
            acc._centered_parts = oom
        if rank in cfg.get("absent_ranks", []):  # e.g. this rank raised before all_reduce and moved on
            time.sleep(cfg.get("absent_s", 20))
            return 0
        local_state = acc.state_dict() if rank in cfg.get("reload_ranks", []) else None
        if "timeout" in cfg:
            from rankme_fast.distributed import all_reduce_accumulator

            t0 = time.monotonic()
            ret = all_reduce_accumulator(acc, timeout=cfg["timeout"])
        else:
            ret = acc.all_reduce()
        if cfg.get("twice"):
            if rank in cfg.get("reload_ranks", []):
                acc.load_state_dict(local_state)
            try:
                acc.all_reduce()
            finally:
                with open(os.path.join(out, f"rank{rank}.after.json"), "w") as f:
                    json.dump({"n_rows": acc.n_rows, "n_batches": acc.n_batches}, f)
        result = {
            "package": rankme_fast.__file__,
            "same_object": ret is acc,
            "local": local,
            "n_rows": acc.n_rows,
            "n_features": acc.n_features,
            "n_batches": acc.n_batches,
            "sv_raw": acc.spectrum(center=False).singular_values,
            "sv_centred": acc.spectrum(center=True).singular_values,
            "rankme_raw": acc.rankme(center=False),
            "rankme_centred": acc.rankme(center=True),
            "gram_raw": acc.gram(center=False),
            "gram_centred": acc.gram(center=True),
            "mean": acc.mean(),
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the test, then the process fails
        with open(os.path.join(out, f"rank{rank}.error.json"), "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - t0}, f)
        traceback.print_exc()
        return 3
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
