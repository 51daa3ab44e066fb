"""``score``: stream embedding files through a :class:`GramAccumulator` and report spectral metrics.

Memory is O(d²) plus a few chunks, whatever N is; one pass over the data serves every metric, centred
or not (the accumulator yields both Gram matrices), and the d×d eigenproblem is solved once per
centring convention that the requested metrics need.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union


from . import metrics as _m
from ._inputs import check_all_finite
from .gram import GramAccumulator
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

    def as_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        return {"source": self.source, "files": list(self.files), "n_rows": self.n_rows,
                "total_rows": self.total_rows, "n_features": self.n_features, "dtype": self.dtype,
                "metrics": dict(self.metrics), "centered": dict(self.centered), "seconds": round(self.seconds, 4)}


def parse_metrics(metrics: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``"rankme,collapse_auc"`` / a sequence / ``"all"`` -> validated tuple of metric names."""
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    if names == ["all"]:
        return tuple(METRICS)
    if not names or any(not isinstance(m, str) or not m for m in names):
        raise ValueError(f"metrics must be a non-empty list of names from {sorted(METRICS)} (or 'all'), got {metrics!r}")
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                         f"choose from {', '.join(METRICS)} or 'all'")
    return tuple(dict.fromkeys(names))


def _metric(spec, name: str, eps: float) -> float:
    if name == "rankme":
        return spec.rankme(eps)
    return getattr(spec, name)()


def _progress(enabled: Optional[bool], total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; stay usable without it
        return None
    return tqdm(total=total, unit="row", unit_scale=True, desc=desc, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def accumulate(source: Source, *, key: Optional[str] = None, chunk_rows: Optional[int] = None,
               max_rows: Optional[int] = None, progress: Optional[bool] = None, backend: Optional[str] = None,
               num_threads: Optional[int] = None):
    """Stream ``source`` into a new :class:`GramAccumulator`; returns ``(accumulator, readers_info)``."""
    for name, v in (("chunk_rows", chunk_rows), ("max_rows", max_rows)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    readers = open_source(source, key)
    try:
        first = readers[0]
        total = sum(r.n_rows for r in readers)
        if total == 0:
            raise ValueError(f"{source}: holds no rows (shape (0, {first.n_features}))")
        rows = default_chunk_rows(first.n_features, first.dtype) if chunk_rows is None else chunk_rows
        acc = GramAccumulator(first.n_features, backend=backend, num_threads=num_threads)
        want = total if max_rows is None else min(total, max_rows)
        label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else readers[0].path
        bar = _progress(progress, want, os.path.basename(label.rstrip("/" + os.sep)) or label)
        try:
            for r, r0, t in iter_chunks(readers, rows, max_rows):
                try:
                    acc.update(t)
                except ValueError as exc:
                    # names the file and the row (count and shape are those of the chunk being read)
                    check_all_finite(t, name=f"{r.path} (rows {r0}..{r0 + t.shape[0]})", row_offset=r0)
                    raise ValueError(f"{r.path}: rows {r0}..{r0 + t.shape[0]}: {exc}") from None
                if bar is not None:
                    bar.update(t.shape[0])
                del t  # chunks may be views of a file mapping, closed below
        finally:
            if bar is not None:
                bar.close()
        info = ([r.path for r in readers], total, first.n_features, str(first.dtype).replace("torch.", ""))
    finally:
        for r in readers:
            r.close()
    return acc, info


def score(source: Source, metrics: Union[str, Sequence[str]] = DEFAULT_METRICS, *, center: Optional[bool] = None,
          eps: float = _m.RANKME_EPS, key: Optional[str] = None, chunk_rows: Optional[int] = None,
          max_rows: Optional[int] = None, progress: Optional[bool] = None, backend: Optional[str] = None,
          num_threads: Optional[int] = None) -> ScoreResult:
    """Spectral metrics of the embeddings stored in ``source``, streamed with O(d²) memory.

    Args:
        source: a ``.npy``/``.safetensors``/``.pt``/``.h5``/``.zarr`` file, a directory of shards, a glob
            pattern, or a list of those — all rows of all files form one (N, d) matrix (see
            :mod:`rankme_fast.io`).
        metrics: names from :data:`METRICS`, a comma-separated string, or ``"all"``.
        center: None = each metric's reference convention (RankMe uncentred, collapse AUC centred, ...);
            True/False forces one convention for all.
        eps: RankMe's ε.  key: tensor/dataset name inside a multi-tensor file.
        chunk_rows: rows per read (default: ~64 MiB of input).  max_rows: use only the first rows.
        progress: tqdm bar on stderr (None = only when stderr is a terminal).
        backend, num_threads: Gram backend and kernel threads (see :func:`rankme_fast.spectrum`).

    Returns:
        :class:`ScoreResult`. Bad files raise ``ValueError``/``TypeError`` naming the file.
    """
    names = parse_metrics(metrics)
    if center is not None and not isinstance(center, bool):
        raise TypeError(f"center must be None, True or False, got {center!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < 1):
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")  # checked before hours of streaming
    t0 = time.perf_counter()
    acc, (files, total, d, dtype) = accumulate(source, key=key, chunk_rows=chunk_rows, max_rows=max_rows,
                                               progress=progress, backend=backend, num_threads=num_threads)
    want = {m: (METRICS[m] if center is None else center) for m in names}
    src = os.fspath(source) if isinstance(source, (str, os.PathLike)) else ",".join(map(os.fspath, source))
    try:
        spectra = {c: acc.spectrum(center=c) for c in sorted(set(want.values()))}
        values = {m: float(_metric(spectra[c], m, eps)) for m, c in want.items()}
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    return ScoreResult(src, tuple(files), acc.n_rows, total, d, dtype, values, want,
                       time.perf_counter() - t0, spectra)
