"""torchmetrics metrics: :class:`RankMe` and :class:`SpectralMetrics`, exact in float64, O(d²) state.

Where the peers keep a queue of embeddings (stable-pretraining: ~2048 rows per rank, all_gathered, float32
``svdvals`` on rank 0), these metrics keep the state of a :class:`~rankme_fast.GramAccumulator`: the row
count n, a shift s, the shifted column sums and the d×d float64 scatter matrix. Any number of rows fits in
d²·8 bytes (32 MiB at d = 2048), the result is the exact spectrum of *all* rows seen, and under DDP the
states are combined by Chan's formula in one float64 all_reduce of the d×d matrix (plus a d-vector
all_reduce and a gather of five integers per rank that checks d and names a rank that differs) — not by
torchmetrics' default all_gather of every state (world × d² floats) and never by gathering embeddings.

>>> from rankme_fast.integrations.torchmetrics import RankMe
>>> metric = RankMe()                        # Garrido et al.: uncentred, p = σ/‖σ‖₁ + 1e-7
>>> for batch in loader:
...     metric.update(encoder(batch))        # (b, d) or (..., d), any float dtype, on the metric's device
>>> metric.compute()                         # float64 tensor, identical on every rank
>>> metric.reset()

The paper evaluates RankMe on 25,600 samples (Garrido et al. 2023, §4); ``max_rows=25_600`` reproduces
that budget (per process: under DDP each rank stops after ``max_rows`` rows, so pass
``25_600 // world_size`` for the paper's total).

State layout (``metric_state`` / ``state_dict()``): ``n_rows`` (int64 scalar), ``shift`` and ``col_sum``
(float64, d), ``scatter`` (float64, P×P with P ≥ d the kernel's padded size; the upper triangle of
``scatter[:d, :d]`` holds Σ (z − s)(z − s)ᵀ), ``log2_scale`` (int64: the states describe z·2^log2_scale,
0 unless float64 embeddings lie beyond 2^±400, where squares would under- or overflow). Before the first batch d is unknown and the vectors are
empty. Checkpoints load on any device and backend (the state is re-padded as needed).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from . import missing_extra

try:
    from torchmetrics import Metric
    from torchmetrics.utilities.exceptions import TorchMetricsUserError
except ImportError as _exc:  # pragma: no cover - exercised by a subprocess test without torchmetrics
    raise missing_extra("torchmetrics", "torchmetrics", _exc) from _exc

from .. import metrics as _m
from ..gram import STATE_FORMAT, STATE_VERSION, GramAccumulator, _sym_upper

__all__ = ["METRICS", "RankMe", "SpectralMetrics"]

F64 = torch.float64
PAPER_ROWS = 25_600  # samples used for RankMe in Garrido et al. 2023


def _alpha(sv, opts):
    return _m.alpha_req(sv, opts["alpha_range"])


# name -> (centred by default, value of a float64 spectrum tensor, higher is better)
METRICS = {
    "rankme": (None, lambda sv, o: _m.rankme_convention(sv, o["convention"], o["eps"]), True),
    "effective_rank": (False, lambda sv, o: _m.effective_rank(sv), True),
    "stable_rank": (False, lambda sv, o: _m.stable_rank(sv), True),
    "collapse_auc": (True, lambda sv, o: _m.collapse_auc(sv), False),
    "participation_ratio": (True, lambda sv, o: _m.participation_ratio(sv), True),
    "nesum": (True, lambda sv, o: _m.nesum(sv), True),
    "alpha_req": (True, _alpha, None),
}


def _check_max_rows(max_rows) -> Optional[int]:
    if max_rows is None:
        return None
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
    return max_rows


def _check_eps(eps) -> Optional[float]:
    return None if eps is None else _m.check_eps(eps)  # the package's one rule: [0, 1)


class _GramMetric(Metric):
    """Shared machinery: a GramAccumulator whose buffers *are* the registered metric states.

    torchmetrics replaces state tensors on reset(), .to(device), unsync() and load_state_dict(); every entry
    point therefore checks that the states are still the accumulator's own tensors and otherwise rebuilds
    the accumulator from them (one O(d²) copy, validated by GramAccumulator.load_state_dict)."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, *, max_rows: Optional[int] = None, backend: Optional[str] = None, **kwargs: Any):
        if kwargs.get("dist_sync_fn") is not None:
            raise ValueError(f"{type(self).__name__} synchronises by one all_reduce of its float64 Gram state "
                             "(Chan's formula); a custom dist_sync_fn (an all_gather of states) is not supported")
        super().__init__(**kwargs)
        self.max_rows = _check_max_rows(max_rows)
        GramAccumulator(backend=backend)  # validates the backend name now, not at the first batch
        self._backend = backend
        self.add_state("n_rows", torch.zeros((), dtype=torch.int64), dist_reduce_fx=None, persistent=True)
        self.add_state("shift", torch.zeros(0, dtype=F64), dist_reduce_fx=None, persistent=True)
        self.add_state("col_sum", torch.zeros(0, dtype=F64), dist_reduce_fx=None, persistent=True)
        self.add_state("scatter", torch.zeros(0, 0, dtype=F64), dist_reduce_fx=None, persistent=True)
        # the states hold the rows z·2^log2_scale (0 unless float64 embeddings are tiny or huge, |z| beyond 2^±400)
        self.add_state("log2_scale", torch.zeros((), dtype=torch.int64), dist_reduce_fx=None, persistent=True)
        self._acc: Optional[GramAccumulator] = None
        self._link: tuple = ()
        self.rows_skipped = 0  # rows offered after max_rows was reached (this process, since the last reset)

    # -- the accumulator behind the states ------------------------------------------------------
    def _states(self) -> tuple:
        return (self.n_rows, self.shift, self.col_sum, self.scatter, self.log2_scale)

    def _linked(self) -> bool:
        return self._acc is not None and len(self._link) == 5 and all(a is b for a, b in zip(self._link, self._states()))

    def _adopt(self, acc: GramAccumulator) -> GramAccumulator:
        """Make ``acc``'s buffers the metric states."""
        self._acc = acc
        if acc._g is not None:
            self.shift, self.col_sum, self.scatter = acc._shift, acc._csum, acc._g
        self.n_rows = torch.tensor(acc.n_rows, dtype=torch.int64, device=self.shift.device)
        self.log2_scale = torch.tensor(acc._log2_scale, dtype=torch.int64, device=self.shift.device)
        self._link = self._states()
        return acc

    def _from_states(self, states: dict, device) -> GramAccumulator:
        """A GramAccumulator on ``device`` holding ``states`` (this class's state layout), validated."""
        name = type(self).__name__
        n_rows, shift, col_sum, scatter = (states[k] for k in ("n_rows", "shift", "col_sum", "scatter"))
        log2_scale = states.get("log2_scale", torch.zeros((), dtype=torch.int64))  # absent in older checkpoints
        for key, t in (("n_rows", n_rows), ("shift", shift), ("col_sum", col_sum), ("scatter", scatter),
                       ("log2_scale", log2_scale)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: state {key!r} must be a tensor, got {type(t).__name__}")
        for key, t in (("n_rows", n_rows), ("log2_scale", log2_scale)):
            if t.numel() != 1 or t.is_floating_point() or t.is_complex():
                raise ValueError(f"{name}: state {key!r} must be one integer, got {t.dtype} {tuple(t.shape)}")
        d = shift.numel()
        if shift.ndim != 1 or col_sum.shape != shift.shape or scatter.ndim != 2 or \
                scatter.shape[0] != scatter.shape[1] or scatter.shape[0] < d or (d == 0 and scatter.numel()):
            raise ValueError(f"{name}: inconsistent state shapes: shift {tuple(shift.shape)}, col_sum "
                             f"{tuple(col_sum.shape)}, scatter {tuple(scatter.shape)} (want d, d and P×P with P ≥ d)")
        acc = GramAccumulator(device=device, backend=self._backend)
        sd = {"format": STATE_FORMAT, "version": STATE_VERSION, "n_rows": int(n_rows), "n_batches": 0,
              "n_features": d or None}
        if d:
            sd.update(shift=shift.to(device), col_sum=col_sum.to(device),
                      gram=_sym_upper(scatter[:d, :d].to(device)))
            if int(log2_scale):
                sd["log2_scale"] = int(log2_scale)
        try:
            return acc.load_state_dict(sd)
        except ValueError as exc:
            raise ValueError(f"{name}: invalid state: {exc}") from exc

    def _accumulator(self) -> GramAccumulator:
        if self._linked():
            return self._acc
        return self._adopt(self._from_states(
            dict(zip(("n_rows", "shift", "col_sum", "scatter", "log2_scale"), self._states())), self.device))

    # -- torchmetrics API ---------------------------------------------------------------------
    def _rows(self, z) -> torch.Tensor:
        from .._inputs import to_torch

        t = to_torch(z, name=f"{type(self).__name__}.update")
        if t.ndim < 2:
            raise ValueError(f"{type(self).__name__}.update expects embeddings of shape (batch, d) or (..., d), "
                             f"got shape {tuple(t.shape)}")
        return t.detach().reshape(-1, t.shape[-1])

    def update(self, z: torch.Tensor) -> None:
        """Add the rows of ``z`` ((b, d) or (..., d), flattened to rows; float64/32/16 or bfloat16; torch,
        NumPy or DLPack). Until the first row arrives the metric moves to ``z``'s device; afterwards ``z``
        must be on the metric's device. With ``max_rows``, rows beyond it are not accumulated (counted in
        ``rows_skipped``). NaN/Inf raise ValueError and leave the metric unusable until ``reset()``."""
        t = self._rows(z)
        acc = self._accumulator()
        if t.device != self.device:
            if acc.n_rows:
                raise ValueError(f"{type(self).__name__}.update: the batch is on {t.device} but the metric's state "
                                 f"({acc.n_rows} rows) is on {self.device}; move the batch, or the metric with "
                                 f".to({str(t.device)!r}) before its first update")
            self.to(t.device)
            acc = self._accumulator()
        if self.max_rows is not None:
            room = max(0, self.max_rows - acc.n_rows)
            self.rows_skipped += max(0, t.shape[0] - room)
            t = t[:room]
        acc.update(t)
        self._adopt(acc)

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        """One Chan-merged float64 all_reduce of the state (GramAccumulator.all_reduce) instead of
        torchmetrics' all_gather of every state; ranks without rows take part, a d mismatch raises on
        every rank naming the rank."""
        acc = self._accumulator()
        acc.all_reduce(process_group or self.process_group)
        self._adopt(acc)

    def _reduce_states(self, incoming_state: dict) -> None:
        """``merge_state``: add another state's rows (Chan's formula; every row, whatever ``max_rows``)."""
        other = self._from_states(incoming_state, self.device)
        acc = self._accumulator()
        acc.merge(other)
        self._adopt(acc)

    def forward(self, z: torch.Tensor) -> Any:
        """Accumulate ``z`` (as :meth:`update`) and return the value of this batch alone (one small
        eigen-decomposition: the b×b Gram when b < d)."""
        if self.dist_sync_on_step:  # the batch value is synchronised: torchmetrics' own path
            return super().forward(z)
        if self._is_synced:
            raise TorchMetricsUserError("The Metric shouldn't be synced when performing ``forward``. "
                                        "HINT: Did you forget to call ``unsync`` ?.")
        self.update(z)
        t = self._rows(z)
        if self.max_rows is not None:
            t = t[: self.max_rows]
        from ..api import spectrum

        if t.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.forward: the batch has no rows, so it has no value")
        self._forward_cache = self._values(lambda c: spectrum(t, center=c, backend=self._backend).singular_values)
        return self._forward_cache

    def compute(self) -> Any:
        acc = self._accumulator()
        if acc.n_rows == 0:
            raise ValueError(f"{type(self).__name__}.compute: no rows were accumulated (on any process); "
                             "call update() with embeddings first")
        return self._values(lambda c: acc.spectrum(c).singular_values)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if int(self.n_rows):  # a restored state counts as updated (no "compute before update" warning)
            self._update_count = max(self._update_count, 1)

    def plot(self, val=None, ax=None):
        """torchmetrics' plot of one value or a sequence of values (needs matplotlib)."""
        return self._plot(val, ax)

    def _values(self, singular_values):
        """The metric value(s) given ``singular_values(center) -> float64 σ``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}"


class RankMe(_GramMetric):
    """RankMe (Garrido et al. 2023) of every row passed to :meth:`update`, exact in float64.

    Args:
        eps: ε of p = σ/‖σ‖₁ + ε (None: 1e-7, or the convention's: 1e-5 for "stable-pretraining").
        center: remove the column mean first (None: the convention's default — uncentred, as in the
            paper, except "reptrix").
        max_rows: stop accumulating after this many rows per process (the paper used 25,600 in total).
        convention: "paper" | "stable-pretraining" | "stable-pretraining-jax" | "reptrix"
            (:data:`rankme_fast.metrics.RANKME_CONVENTIONS`): the number a migrating user had.
        backend: Gram backend ("auto" | "cpu" | "cuda" | "triton" | "torch").
        **kwargs: torchmetrics.Metric options (compute_on_cpu, sync_on_compute, process_group, ...).
    """

    higher_is_better = True
    plot_lower_bound = 1.0

    def __init__(self, eps: Optional[float] = None, center: Optional[bool] = None, max_rows: Optional[int] = None,
                 convention: str = "paper", backend: Optional[str] = None, **kwargs: Any):
        if convention not in _m.RANKME_CONVENTIONS:
            raise ValueError(f"convention must be one of {list(_m.RANKME_CONVENTIONS)}, got {convention!r}")
        self.eps = _check_eps(eps)
        self.convention = convention
        self.center = _m.RANKME_CONVENTIONS[convention][0] if center is None else bool(center)
        super().__init__(max_rows=max_rows, backend=backend, **kwargs)

    def _values(self, singular_values) -> torch.Tensor:
        sv = singular_values(self.center)
        return _m.rankme_convention(sv, self.convention, self.eps)

    def extra_repr(self) -> str:
        return f"convention={self.convention!r}, eps={self.eps}, center={self.center}, {super().extra_repr()}"


class SpectralMetrics(_GramMetric):
    """Several spectral metrics of every row passed to :meth:`update`, from one float64 state: a dict
    ``{name: float64 tensor}``.

    Args:
        metrics: names from :data:`METRICS` — "rankme", "effective_rank", "stable_rank" (uncentred by
            default), "collapse_auc", "participation_ratio", "nesum", "alpha_req" (centred by default, as in
            their papers; DESIGN §2). At most two eigen-decompositions (centred and uncentred) per compute.
        center: None (each metric's reference centring) or a bool applied to all.
        eps, convention: RankMe's options (see :class:`RankMe`).
        alpha_range: α-ReQ's fit range (first, last), 1-based, inclusive.
        max_rows, backend, **kwargs: as for :class:`RankMe`.
    """

    higher_is_better = None  # mixed: collapse_auc grows with collapse, the ranks shrink

    def __init__(self, metrics: Sequence[str] = ("rankme", "collapse_auc"), *, center: Optional[bool] = None,
                 eps: Optional[float] = None, convention: str = "paper", alpha_range: tuple = (5, 100),
                 max_rows: Optional[int] = None, backend: Optional[str] = None, **kwargs: Any):
        if isinstance(metrics, str):
            metrics = tuple(m.strip() for m in metrics.split(",") if m.strip())
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if not metrics or unknown:
            raise ValueError(f"metrics must be a non-empty selection of {list(METRICS)}, got {list(metrics)!r}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics lists a name twice: {list(metrics)!r}")
        if convention not in _m.RANKME_CONVENTIONS:
            raise ValueError(f"convention must be one of {list(_m.RANKME_CONVENTIONS)}, got {convention!r}")
        lo, hi = alpha_range
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo < hi):
            raise ValueError(f"alpha_range must be (first, last) ints with 1 <= first < last, got {alpha_range!r}")
        self.metrics = metrics
        self.center = None if center is None else bool(center)
        self.eps = _check_eps(eps)
        self.convention = convention
        self.alpha_range = (lo, hi)
        super().__init__(max_rows=max_rows, backend=backend, **kwargs)

    def centring(self, name: str) -> bool:
        """Whether metric ``name`` is computed on the centred embeddings."""
        if self.center is not None:
            return self.center
        default = METRICS[name][0]
        return _m.RANKME_CONVENTIONS[self.convention][0] if default is None else default

    def _values(self, singular_values) -> dict:
        opts = {"eps": self.eps, "convention": self.convention, "alpha_range": self.alpha_range}
        spectra: dict = {}
        out = {}
        for name in self.metrics:
            c = self.centring(name)
            if c not in spectra:
                spectra[c] = singular_values(c)
            out[name] = METRICS[name][1](spectra[c], opts)
        return out

    def extra_repr(self) -> str:
        return f"metrics={self.metrics}, center={self.center}, {super().extra_repr()}"
