"""Integrations with training frameworks; each submodule imports its framework only when imported itself.

- :mod:`rankme_fast.integrations.torchmetrics`: ``RankMe`` and ``SpectralMetrics``, ``torchmetrics.Metric``
  subclasses whose state is the float64 Gram accumulator (d² doubles, never the embeddings) and whose DDP
  sync is one all_reduce (``pip install "rankme_fast[torchmetrics]"``).
- :mod:`rankme_fast.integrations.lightning`: ``RankMeCallback`` for Lightning (``lightning`` or
  ``pytorch_lightning``; ``pip install "rankme_fast[lightning]"``).
"""


def missing_extra(module: str, extra: str, exc: BaseException) -> ImportError:
    """The ImportError raised when an optional dependency is absent, naming the extra that installs it."""
    err = ImportError(f"rankme_fast.integrations.{module} needs the optional dependency {extra!r}, which is not "
                      f"installed ({exc}); install it with: pip install \"rankme_fast[{extra}]\"")
    err.name = extra
    return err
