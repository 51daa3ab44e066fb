"""One rank of the tests of rankme_fast.dist_score (run by tests/test_dist_score.py).

Usage: python dist_score_worker.py CONFIG_JSON OUT_DIR — with MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set.

CONFIG_JSON: {"source": a path or a list of paths, "source_of_rank": {rank: source} (overrides "source" on
that rank), "max_rows", "chunk_rows", "backend"}. The process group comes from ``init_from_env()``. Every
``Reader.read(r0, r1)`` is logged, so the test can check which rows each rank read. Writes
OUT_DIR/rank{r}.pt with the reduced state, or OUT_DIR/rank{r}.error.json with the exception (exit 3);
both with the reads and the (rank, world) init_from_env returned.
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> int:
    cfg = json.loads(sys.argv[1])
    out = sys.argv[2]
    rank = int(os.environ["RANK"])

    import torch

    import rankme_fast
    from rankme_fast import dist_score, io

    reads = []
    orig = io.Reader.read

    def logged(self, r0, r1):
        reads.append([os.path.basename(self.path), int(r0), int(r1)])
        return orig(self, r0, r1)

    io.Reader.read = logged
    source = cfg.get("source_of_rank", {}).get(str(rank), cfg["source"])
    init = dist_score.init_from_env()
    again = dist_score.init_from_env()  # an existing group is used as it is
    try:
        if cfg.get("mode") == "score":  # rf.score / rf.compare with distributed=True (issue 16)
            res = rankme_fast.score(source, "rankme,collapse_auc", distributed=True, convergence=True, seed=5,
                                    chunk_rows=cfg.get("chunk_rows"), max_rows=cfg.get("max_rows"))
            cmp = rankme_fast.compare(cfg["compare"], metrics="rankme,collapse_auc", distributed=True,
                                      max_rows=cfg.get("compare_max_rows"), seed=3, labels=[1.0, 2.0])
            torch.save({"score": res.as_dict(), "compare": cmp.as_dict(), "reads": reads},
                       os.path.join(out, f"rank{rank}.pt"))
            return 0
        acc, info = dist_score.accumulate_distributed(source, max_rows=cfg.get("max_rows"),
                                                      chunk_rows=cfg.get("chunk_rows"), backend=cfg.get("backend"))
        result = {
            "package": rankme_fast.__file__,
            "init": list(init), "again": list(again), "is_rank0": dist_score.is_rank0(),
            "reads": reads,
            "info": [list(info[0]), info[1], info[2], info[3]],
            "n_rows": acc.n_rows,
            "sv_raw": acc.spectrum(center=False).singular_values,
            "sv_centred": acc.spectrum(center=True).singular_values,
            "rankme_raw": acc.rankme(center=False),
            "gram_raw": acc.gram(center=False),
            "gram_centred": acc.gram(center=True),
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the test, then the process fails
        with open(os.path.join(out, f"rank{rank}.error.json"), "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc), "reads": reads, "init": list(init)}, f)
        traceback.print_exc()
        return 3
    finally:
        dist_score.shutdown()


if __name__ == "__main__":
    sys.exit(main())
