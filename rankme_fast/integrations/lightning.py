"""Lightning callback: :class:`RankMeCallback` logs RankMe (and other spectral metrics) every epoch.

>>> from rankme_fast.integrations.lightning import RankMeCallback
>>> trainer = lightning.Trainer(callbacks=[RankMeCallback(target="embedding", stage="validation")])
>>> # validation_step returns {"embedding": z, ...}; "rankme" is logged at each validation epoch end

It accumulates the exact float64 Gram of every embedding of the epoch (a
:class:`~rankme_fast.integrations.torchmetrics.SpectralMetrics` on the embeddings' device: d² doubles,
never the embeddings themselves), combines the ranks' states under DDP by one all_reduce, and logs with
``pl_module.log`` at the end of the stage's epoch. Works with ``lightning`` (``lightning.pytorch``) and
with the standalone ``pytorch_lightning``: the class derives from the Callback of each one installed.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence, Union

import torch

from . import missing_extra

_BASES = []
try:
    from lightning.pytorch import Callback as _LCallback

    _BASES.append(_LCallback)
except ImportError as _exc:
    _first_error = _exc
try:
    from pytorch_lightning import Callback as _PLCallback

    _BASES.append(_PLCallback)
except ImportError as _exc:
    _first_error = _exc
if not _BASES:  # pragma: no cover - exercised by a subprocess test without lightning
    raise missing_extra("lightning", "lightning", _first_error)

from .torchmetrics import SpectralMetrics  # noqa: E402  (needs torchmetrics, which lightning requires)

__all__ = ["RankMeCallback"]

STAGES = ("train", "validation")
STATE_VERSION = 1


class RankMeCallback(*_BASES):
    """Log RankMe of the embeddings of each epoch of one stage.

    Args:
        name: the logged key; with several metrics each is logged as ``name/<metric>``.
        target: the key of the embeddings in the step's output dict (``training_step`` /
            ``validation_step`` return ``{"loss": ..., target: z}``), or a callable
            ``(pl_module, outputs, batch) -> tensor`` returning them. (b, d) or (..., d), any float dtype.
        stage: "train" (``on_train_batch_end`` / ``on_train_epoch_end``) or "validation".
        metrics: names of :data:`rankme_fast.integrations.torchmetrics.METRICS`.
        every_n_epochs: accumulate and log on epochs e with (e + 1) % every_n_epochs == 0.
        max_rows: rows accumulated per process and epoch (the RankMe paper used 25,600 in total).
        eps, center, convention: RankMe's options (see :class:`~rankme_fast.integrations.torchmetrics.RankMe`);
            ``center`` None means each metric's reference centring.
        backend: Gram backend of the accumulator.
        verbose: also accumulate RankMe on nested seeded random subsets of about 1/8, 1/4 and 1/2 of the
            epoch's rows (+0.9x the Gram work), log one line per logged epoch on rank 0 (logger
            ``rankme_fast``) with RankMe at N/8, N/4, N/2, N, and warn (``UserWarning``) when the last doubling
            still moves RankMe by more than 1 % — the epoch's N is then too small for a stable value.
        seed: the seed of those subsets.

    The sanity-check validation run is skipped. The accumulated state is part of the callback's
    ``state_dict`` (so a mid-epoch checkpoint resumes it); it is reset after each logged epoch. A metric
    that is undefined for the epoch's embeddings (e.g. all of them zero) is logged as NaN with a
    RuntimeWarning saying why, rather than stopping the training run.
    """

    def __init__(self, name: str = "rankme", target: Union[str, Callable] = "embedding", stage: str = "validation",
                 metrics: Sequence[str] = ("rankme",), every_n_epochs: int = 1, max_rows: Optional[int] = None,
                 eps: Optional[float] = None, center: Optional[bool] = None, convention: str = "paper",
                 backend: Optional[str] = None, verbose: bool = False, seed: int = 0):
        super().__init__()
        if not isinstance(verbose, bool):
            raise TypeError(f"verbose must be True or False, got {verbose!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if not (isinstance(target, str) or callable(target)):
            raise TypeError(f"target must be an output key (str) or a callable (pl_module, outputs, batch) -> tensor, "
                            f"got {type(target).__name__}")
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.name, self.target, self.stage, self.every_n_epochs = name, target, stage, every_n_epochs
        self.metric = SpectralMetrics(metrics, center=center, eps=eps, convention=convention, max_rows=max_rows,
                                      backend=backend)
        self.metrics = self.metric.metrics
        self.verbose, self.seed = verbose, int(seed)
        # verbose: RankMe on nested subsets (fractions 1/8, 1/4, 1/2 of the rows) for the convergence line
        # (a fourth, of every row, when RankMe is not among the logged metrics)
        self._fracs = (0.125, 0.25, 0.5) + (() if "rankme" in self.metrics else (1.0,))
        self._subsets = [SpectralMetrics(("rankme",), center=center, eps=eps, convention=convention, backend=backend)
                         for _ in self._fracs] if verbose else []
        self._seen = 0  # rows offered to the subsets this epoch (their hash index)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, stage=self.stage)

    # -- helpers ------------------------------------------------------------------------------
    def _active(self, trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _embeddings(self, pl_module, outputs, batch) -> torch.Tensor:
        if callable(self.target):
            z = self.target(pl_module, outputs, batch)
        elif isinstance(outputs, dict) or hasattr(outputs, "keys"):
            if self.target not in outputs:
                raise KeyError(f"RankMeCallback: the {self.stage} step output has no {self.target!r} "
                               f"(keys: {sorted(map(str, outputs.keys()))}); return it from the step or pass "
                               "target=<key> / a callable (pl_module, outputs, batch) -> tensor")
            z = outputs[self.target]
        else:
            raise TypeError(f"RankMeCallback: the {self.stage} step returned {type(outputs).__name__}, not a dict "
                            f"holding {self.target!r}; return {{'loss': ..., {self.target!r}: z}} or pass a "
                            "callable target=(pl_module, outputs, batch) -> tensor")
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"RankMeCallback: the embeddings must be a torch.Tensor, got {type(z).__name__}")
        return z

    def _accumulate(self, trainer, pl_module, outputs, batch) -> None:
        if self._active(trainer):
            z = self._embeddings(pl_module, outputs, batch)
            before = int(self.metric.n_rows)
            self.metric.update(z)
            if self._subsets:
                self._update_subsets(z, int(self.metric.n_rows) - before)

    def _update_subsets(self, z: torch.Tensor, taken: int) -> None:
        from .._rows import _unit_hash  # noqa: PLC0415

        rows = z.reshape(-1, z.shape[-1])[:taken]
        if rows.shape[0] == 0:
            return
        import numpy as np  # noqa: PLC0415

        rank = torch.distributed.get_rank() if _distributed() else 0
        u = _unit_hash(np.arange(self._seen, self._seen + rows.shape[0], dtype=np.uint64), self.seed * 1_000_003 + rank)
        self._seen += rows.shape[0]
        u = torch.from_numpy(u).to(rows.device)
        for frac, m in zip(self._fracs, self._subsets):
            part = rows if frac >= 1.0 else rows[u < frac]
            if part.shape[0]:
                m.update(part)

    def _convergence(self, full_rankme) -> None:
        """The verbose line and the >1 % warning (rank 0 logs; every rank computes: compute() syncs)."""
        import logging  # noqa: PLC0415

        from ..scoring import CONVERGENCE_TOL  # noqa: PLC0415
        vals = []
        for m in self._subsets:
            try:
                vals.append((int(m.n_rows), float(m.compute()["rankme"]) if int(m.n_rows) else math.nan))
            except ValueError:
                vals.append((int(m.n_rows), math.nan))
            finally:
                m.reset()
        self._seen = 0
        if full_rankme is not None:
            vals.append((int(self.metric.n_rows), float(full_rankme)))
        if _distributed() and torch.distributed.get_rank() != 0:
            return
        line = ", ".join(f"{lab}={k}: {v:.4g}" for lab, (k, v) in zip(("N/8", "N/4", "N/2", "N"), vals))
        logging.getLogger("rankme_fast").info("RankMeCallback(%r) RankMe convergence: %s", self.name, line)
        a, b = vals[-2][1], vals[-1][1]
        if math.isfinite(a) and math.isfinite(b) and b != 0 and abs(b - a) / abs(b) > CONVERGENCE_TOL:
            warnings.warn(f"RankMeCallback({self.name!r}): RankMe moved by {abs(b - a) / abs(b):.1%} from ~N/2 to N "
                          f"rows ({line}); the epoch's N is probably too small for a stable value — raise max_rows "
                          "or the number of evaluation rows", UserWarning, stacklevel=2)

    def _log(self, trainer, pl_module) -> None:
        if not self._active(trainer):
            return
        metric = self.metric
        if not metric.update_called and int(metric.n_rows) == 0 and not _distributed():
            warnings.warn(f"RankMeCallback({self.name!r}): no {self.stage} embeddings this epoch; nothing logged",
                          RuntimeWarning, stacklevel=2)
            return
        try:
            values = metric.compute()
            if self._subsets:
                self._convergence(values.get("rankme"))
        except ValueError as exc:  # undefined for these embeddings: NaN, not a crashed run
            warnings.warn(f"RankMeCallback({self.name!r}) logs NaN at epoch {trainer.current_epoch}: {exc}",
                          RuntimeWarning, stacklevel=2)
            values = {m: torch.tensor(math.nan, dtype=torch.float64) for m in self.metrics}
        finally:
            metric.reset()
            for m in self._subsets:
                m.reset()
            self._seen = 0
        for m, v in values.items():
            key = self.name if len(self.metrics) == 1 else f"{self.name}/{m}"
            pl_module.log(key, v, on_step=False, on_epoch=True, sync_dist=False)  # same on every rank

    # -- hooks --------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stage == "train":
            self._accumulate(trainer, pl_module, outputs, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "validation":
            self._accumulate(trainer, pl_module, outputs, batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.stage == "train":
            self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.stage == "validation":
            self._log(trainer, pl_module)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "metrics": list(self.metrics),
                "metric": {k: v.detach().cpu() for k, v in self.metric.state_dict().items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"RankMeCallback: not a version-{STATE_VERSION} RankMeCallback state")
        if list(state_dict.get("metrics", ())) != list(self.metrics):
            raise ValueError(f"RankMeCallback: the checkpoint's state is for metrics {state_dict.get('metrics')}, "
                             f"this callback computes {list(self.metrics)}")
        self.metric.reset()
        self.metric.load_state_dict(dict(state_dict["metric"]))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
