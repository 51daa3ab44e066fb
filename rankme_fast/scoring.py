"""``score``: stream embedding files through a :class:`GramAccumulator` and report spectral metrics.

Memory is O(d²) plus a few chunks, whatever N is; one pass over the data serves every metric, centred
or not (the accumulator yields both Gram matrices), and the d×d eigenproblem is solved once per
centring convention that the requested metrics need.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from . import metrics as _m
from .gram import GramAccumulator
from ._rows import LEVEL_FRACTIONS, _check_row_index, _progress, feed_chunk
from .io import Source, default_chunk_rows, iter_chunks, open_source

# name -> (centred by default, as in the metric's reference; DESIGN §2)
METRICS: Dict[str, bool] = {
    "rankme": False,
    "effective_rank": False,
    "stable_rank": False,
    "collapse_auc": True,
    "alpha_req": True,
    "participation_ratio": True,
    "nesum": True,
}
DEFAULT_METRICS = ("rankme",)


@dataclass
class ScoreResult:
    """Metrics of one embedding source (file, shard directory, glob, or list of files).

    Attributes:
        source: the source as given.  files: the files read, in order.
        n_rows: rows used (all, or the first ``max_rows``).  total_rows: rows available.
        n_features: d.  dtype: stored dtype ("float32", ...).
        metrics: name -> value.  centered: name -> whether that metric used the centred spectrum.
        spectra: ``{False: Spectrum, True: Spectrum}`` for the centrings that were needed.
        seconds: wall time of reading + accumulating + solving.
        convergence: with ``convergence=True``, the metrics on nested seeded random subsets of about N/8,
            N/4, N/2 and all N rows: ``[{"fraction", "n_rows", "metrics": {name: value}}]`` (else None).
        convergence_warning: the warning text when the last doubling moved RankMe by more than 1 % (else None).
    """

    source: str
    files: Tuple[str, ...]
    n_rows: int
    total_rows: int
    n_features: int
    dtype: str
    metrics: Dict[str, float]
    centered: Dict[str, bool]
    seconds: float
    spectra: dict = field(repr=False, default_factory=dict)
    convergence: Optional[list] = None
    convergence_warning: Optional[str] = None

    def as_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        d = {"source": self.source, "files": list(self.files), "n_rows": self.n_rows,
             "total_rows": self.total_rows, "n_features": self.n_features, "dtype": self.dtype,
             "metrics": dict(self.metrics), "centered": dict(self.centered), "seconds": round(self.seconds, 4)}
        if self.convergence is not None:
            d["convergence"] = self.convergence
            d["convergence_warning"] = self.convergence_warning
        return d

    def plot(self, path=None, ax=None):
        """Log-log spectrum (σ_k/σ_1) with the α-ReQ fit over its index range and RankMe / effective rank
        annotated (needs matplotlib); writes a PNG to ``path`` when given; returns the Axes."""
        from .plot import score_spectrum  # noqa: PLC0415

        return score_spectrum(self, path=path, ax=ax)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


# spellings people type, case-, dash- and underscore-insensitively -> the canonical name
_ALIASES = {**{_norm(m): m for m in METRICS}, "erank": "effective_rank", "auc": "collapse_auc",
            "pr": "participation_ratio", "alpha": "alpha_req"}


def canonical_metric(name) -> str:
    """``"RankMe"``, ``"alpha-req"``, ``"alpha_ReQ"``, ``"Effective-Rank"`` ... -> the canonical name in
    :data:`METRICS` (case, dashes, underscores and spaces are ignored); ValueError for an unknown one."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a metric name must be a non-empty string, got {name!r}")
    m = _ALIASES.get(_norm(name))
    if m is None:
        raise ValueError(f"unknown metric {name.strip()!r}; choose from {', '.join(METRICS)} or 'all' "
                         "(case and dashes do not matter)")
    return m


def parse_metrics(metrics: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``"rankme,collapse_auc"`` / a sequence / ``"all"`` -> validated tuple of canonical metric names
    (``"RankMe"``, ``"alpha-req"`` and ``"alpha_ReQ"`` are accepted: see :func:`canonical_metric`)."""
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    if len(names) == 1 and isinstance(names[0], str) and names[0].lower() == "all":
        return tuple(METRICS)
    if not names or any(not isinstance(m, str) or not m for m in names):
        raise ValueError(f"metrics must be a non-empty list of names from {sorted(METRICS)} (or 'all'), got {metrics!r}")
    bad = [m for m in names if _ALIASES.get(_norm(m)) is None]
    if bad:
        raise ValueError(f"unknown metric{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                         f"choose from {', '.join(METRICS)} or 'all' (case and dashes do not matter)")
    return tuple(dict.fromkeys(canonical_metric(m) for m in names))


def _metric(spec, name: str, eps: float) -> float:
    if name == "rankme":
        return spec.rankme(eps)
    return getattr(spec, name)()


CONVERGENCE_TOL = 0.01  # warn when the last doubling moves RankMe by more than this (relative)


def accumulate(source: Source, *, key: Optional[str] = None, chunk_rows: Optional[int] = None,
               max_rows: Optional[int] = None, progress: Optional[bool] = None, backend: Optional[str] = None,
               num_threads: Optional[int] = None, row_index=None, split_seed: Optional[int] = None):
    """Stream ``source`` into a new :class:`GramAccumulator`; returns ``(accumulator, readers_info)``.

    ``row_index`` (sorted unique global row indices) keeps only those rows; ``split_seed`` returns, instead
    of one accumulator, the list of the four level accumulators of :func:`row_levels` (their merge is the
    whole)."""
    for name, v in (("chunk_rows", chunk_rows), ("max_rows", max_rows)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    readers = open_source(source, key)
    try:
        first = readers[0]
        total = sum(r.n_rows for r in readers)
        if total == 0:
            raise ValueError(f"{source}: holds no rows (shape (0, {first.n_features}))")
        idx = None if row_index is None else _check_row_index(row_index, total)
        rows = default_chunk_rows(first.n_features, first.dtype) if chunk_rows is None else chunk_rows
        n_acc = 1 if split_seed is None else len(LEVEL_FRACTIONS)
        accs = [GramAccumulator(first.n_features, backend=backend, num_threads=num_threads) for _ in range(n_acc)]
        want = total if max_rows is None else min(total, max_rows)
        if idx is not None:
            want = int(np.searchsorted(idx, want))
        label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else readers[0].path
        bar = _progress(progress, want, os.path.basename(label.rstrip("/" + os.sep)) or label)
        starts, g = {}, 0
        for r in readers:
            starts[id(r)] = g
            g += r.n_rows
        try:
            for r, r0, t in iter_chunks(readers, rows, max_rows):
                fed = feed_chunk(accs, r.path, r0, starts[id(r)] + r0, t, idx, split_seed)
                del t  # chunks may be views of a file mapping, closed below
                if bar is not None and fed:
                    bar.update(fed)
        finally:
            if bar is not None:
                bar.close()
        info = ([r.path for r in readers], total, first.n_features, str(first.dtype).replace("torch.", ""))
    finally:
        for r in readers:
            r.close()
    return (accs[0] if split_seed is None else accs), info


def merged(accs: Sequence[GramAccumulator], upto: int) -> GramAccumulator:
    """A new accumulator holding the rows of ``accs[0..upto]`` (the nested subset ``levels <= upto``)."""
    out = GramAccumulator(accs[0].n_features, backend=accs[0].backend)
    for a in accs[: upto + 1]:
        out.merge(a)
    return out


def convergence_table(accs: Sequence[GramAccumulator], want: Dict[str, bool], eps: float,
                      spectra_full: Optional[dict] = None) -> list:
    """``[{"fraction", "n_rows", "metrics"}]`` for the nested subsets (last = all rows); a metric that is
    undefined on a subset (too few rows) is NaN there."""
    out = []
    for k, frac in enumerate(LEVEL_FRACTIONS):
        sub = merged(accs, k)
        row = {"fraction": frac, "n_rows": sub.n_rows, "metrics": {}}
        if sub.n_rows:
            spectra = spectra_full if (k == len(LEVEL_FRACTIONS) - 1 and spectra_full) else {}
            for m, c in want.items():
                try:
                    if c not in spectra:
                        spectra[c] = sub.spectrum(center=c)
                    row["metrics"][m] = float(_metric(spectra[c], m, eps))
                except ValueError:
                    row["metrics"][m] = float("nan")
        else:
            row["metrics"] = {m: float("nan") for m in want}
        out.append(row)
    return out


def convergence_warning(conv: list, name: str = "rankme", tol: float = CONVERGENCE_TOL) -> Optional[str]:
    """The warning text when the last doubling (N/2 -> N rows) moves ``name`` by more than ``tol``
    (relative), else None."""
    if len(conv) < 2 or name not in conv[-1]["metrics"]:
        return None
    a, b = conv[-2]["metrics"][name], conv[-1]["metrics"][name]
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    rel = abs(b - a) / abs(b)
    if rel <= tol:
        return None
    return (f"{name} moved by {rel:.1%} from {conv[-2]['n_rows']} to {conv[-1]['n_rows']} rows ({a:.4g} -> {b:.4g}): "
            f"N = {conv[-1]['n_rows']} is probably not enough rows for a stable value (RankMe grows with N; "
            "Garrido et al. use 25,600 rows for d = 2048) — score more rows")


def score(source: Source, metrics: Union[str, Sequence[str]] = DEFAULT_METRICS, *, center: Optional[bool] = None,
          eps: float = _m.RANKME_EPS, key: Optional[str] = None, chunk_rows: Optional[int] = None,
          max_rows: Optional[int] = None, progress: Optional[bool] = None, backend: Optional[str] = None,
          num_threads: Optional[int] = None, distributed: bool = False, convergence: bool = False,
          seed: int = 0, row_index=None) -> ScoreResult:
    """Spectral metrics of the embeddings stored in ``source``, streamed with O(d²) memory.

    Args:
        source: a ``.npy``/``.safetensors``/``.pt``/``.h5``/``.zarr`` file, a directory of shards, a glob
            pattern, or a list of those — all rows of all files form ONE (N, d) matrix (see
            :mod:`rankme_fast.io`; to score several files separately call ``score`` once per file, or use
            :func:`rankme_fast.compare`).
        metrics: names from :data:`METRICS` (any case, dashes or underscores), a comma-separated string, or
            ``"all"``.
        center: None = each metric's reference convention (RankMe uncentred, collapse AUC centred, ...);
            True/False forces one convention for all.
        eps: RankMe's ε.  key: tensor/dataset name inside a multi-tensor file.
        chunk_rows: rows per read (default: ~64 MiB of input).  max_rows: use only the first rows.
        progress: tqdm bar on stderr (None = only when stderr is a terminal).
        backend, num_threads: Gram backend and kernel threads (see :func:`rankme_fast.spectrum`).
        distributed: inside an initialised torch.distributed process group (e.g. under ``torchrun``), split
            the reading across the ranks — whole shards when there are at least as many as ranks, else
            contiguous row ranges — and combine the ranks' Gram states with one all_reduce; every rank
            returns the same result (:mod:`rankme_fast.dist_score`).
        convergence: also report the metrics on nested seeded random subsets of about N/8, N/4, N/2 and N
            rows from the same pass (``ScoreResult.convergence``), and warn (``UserWarning``) when the last
            doubling still moves RankMe by more than 1 % — N is then probably too small. Costs three more
            d×d eigensolves per centring and four Gram states of memory.
        seed: the seed of the convergence subsets.
        row_index: sorted unique global row indices to keep (e.g. a seeded subset; see :func:`rankme_fast.compare`).

    Returns:
        :class:`ScoreResult`. Bad files raise ``ValueError``/``TypeError`` naming the file.
    """
    names = parse_metrics(metrics)
    if center is not None and not isinstance(center, bool):
        raise TypeError(f"center must be None, True or False, got {center!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < 1):
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")  # checked before hours of streaming
    for nm, v in (("distributed", distributed), ("convergence", convergence)):
        if not isinstance(v, bool):
            raise TypeError(f"{nm} must be True or False, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    t0 = time.perf_counter()
    kw = dict(key=key, chunk_rows=chunk_rows, max_rows=max_rows, progress=progress, backend=backend,
              num_threads=num_threads, row_index=row_index, split_seed=int(seed) if convergence else None)
    if distributed:
        from .dist_score import accumulate_distributed  # noqa: PLC0415

        acc, (files, total, d, dtype) = accumulate_distributed(source, **kw)
    else:
        acc, (files, total, d, dtype) = accumulate(source, **kw)
    src = os.fspath(source) if isinstance(source, (str, os.PathLike)) else ",".join(map(os.fspath, source))
    return finish(acc if not convergence else None, acc if convergence else None, names, center, eps, src,
                  tuple(files), total, d, dtype, t0)


def finish(acc: Optional[GramAccumulator], levels: Optional[Sequence[GramAccumulator]], names, center, eps: float,
           src: str, files: tuple, total: int, d: int, dtype: str, t0: float) -> ScoreResult:
    """The :class:`ScoreResult` of one accumulator — or of the four level accumulators of a convergence pass
    (merged for the metrics, nested for ``convergence``; warns when RankMe has not converged)."""
    if levels is not None:
        acc = merged(levels, len(LEVEL_FRACTIONS) - 1)
    want = {m: (METRICS[m] if center is None else center) for m in names}
    try:
        spectra = {c: acc.spectrum(center=c) for c in sorted(set(want.values()))}
        values = {m: float(_metric(spectra[c], m, eps)) for m, c in want.items()}
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    conv = warn = None
    if levels is not None:
        conv_want = dict(want)
        conv_want.setdefault("rankme", METRICS["rankme"] if center is None else center)
        conv = convergence_table(levels, conv_want, eps, dict(spectra))
        warn = convergence_warning(conv)
        if warn:
            warnings.warn(f"{src}: {warn}", UserWarning, stacklevel=3)
    return ScoreResult(src, files, acc.n_rows, total, d, dtype, values, want, time.perf_counter() - t0, spectra,
                       conv, warn)
