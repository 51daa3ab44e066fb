"""A 2-process Lightning DDP fit on CPU (gloo) with RankMeCallback (run by tests/test_integrations_lightning.py).

Usage: python lt_ddp_worker.py CONFIG_JSON OUT_DIR. Lightning's "ddp" strategy re-launches this script
for rank 1. Each rank writes OUT_DIR/rank{r}.pt: the embeddings its steps produced per epoch and stage, and
the values logged by the callbacks.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    cfg = json.loads(sys.argv[1])
    out = sys.argv[2]
    import torch
    import lightning.pytorch as pl

    from lt_models import loaders, make_module, make_recorder
    from rankme_fast.integrations.lightning import RankMeCallback

    torch.manual_seed(0)
    model = make_module(pl)()
    rec = make_recorder(pl)()
    train, val = loaders(n=cfg.get("n", 160))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=cfg.get("epochs", 2),
                         callbacks=[RankMeCallback(stage="train", name="rk_train"),
                                    RankMeCallback(stage="validation", metrics=("rankme", "collapse_auc")), rec],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=1)
    trainer.fit(model, train, val)
    rank = trainer.global_rank
    torch.save({"seen": model.seen, "logged": rec.per_epoch}, os.path.join(out, f"rank{rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
