"""A tiny Lightning model for the RankMeCallback tests (tests/test_integrations_lightning.py and the DDP
worker tests/lt_ddp_worker.py). It records every embedding its steps return (outside the sanity check),
so a test can recompute the logged value from the very tensors the callback saw."""
from __future__ import annotations

import torch


def make_module(pl):
    """The model class for the Lightning package ``pl`` (``lightning.pytorch`` or ``pytorch_lightning``)."""

    class TinyEncoder(pl.LightningModule):
        def __init__(self, d_in: int = 8, d_out: int = 12):
            super().__init__()
            # full rank on the data (d_out <= hidden): a rank-deficient encoder puts σ at the float64 Gram's
            # noise floor (~1e-8 σ_1), which moves RankMe by ~1e-7 — inside the exact contract, not 1e-9
            self.enc = torch.nn.Sequential(torch.nn.Linear(d_in, 32), torch.nn.Tanh(), torch.nn.Linear(32, d_out))
            self.seen = {"train": {}, "validation": {}}

        def _step(self, batch, stage):
            z = self.enc(batch[0])
            if not self.trainer.sanity_checking:
                self.seen[stage].setdefault(self.current_epoch, []).append(z.detach().clone())
            return {"loss": z.pow(2).mean() - z.std(0).mean(), "embedding": z}

        def training_step(self, batch, batch_idx):
            return self._step(batch, "train")

        def validation_step(self, batch, batch_idx):
            return self._step(batch, "validation")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return TinyEncoder


def make_recorder(pl):
    """A callback that copies ``trainer.callback_metrics`` at each train epoch end (after the others)."""

    class Recorder(pl.Callback):
        def __init__(self):
            self.per_epoch = {}

        def on_train_epoch_end(self, trainer, pl_module):
            self.per_epoch[trainer.current_epoch] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    return Recorder


def loaders(n: int = 200, d_in: int = 8, batch: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, d_in, generator=g) * 2 + 1)
    return torch.utils.data.DataLoader(ds, batch_size=batch), torch.utils.data.DataLoader(ds, batch_size=batch + 7)
