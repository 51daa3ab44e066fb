"""``compare``: score several models / checkpoints the same way, rank them, and measure how well each metric
predicts a downstream label (Garrido et al. use RankMe to pick hyper-parameters and checkpoints without
labels; model-selection papers report Kendall's τ / weighted τ between the metric and the downstream result).

Each *source* is one model: an array, a file, a shard directory, a glob or a list of files (all its rows are
one matrix). With ``max_rows`` every source is scored on a seeded random subset of ``max_rows`` rows, drawn
with ``numpy.random.default_rng(seed).choice(n_rows, max_rows, replace=False)``: the same indices for
every source with the same number of rows (e.g. embeddings of one evaluation set by several checkpoints);
sources of different lengths each get their own subset from the same seed.

Correlations (``labels`` given) are those of ``scipy.stats`` — ``spearmanr``, ``kendalltau`` (τ-b) and
``weightedtau`` with its defaults (hyperbolic weights on the rank, which make the top models count most) —
between each metric and the labels' *goodness*: the labels themselves when higher is better, their negation
with ``higher_is_better=False`` (e.g. an error rate), so a positive τ always means "the metric agrees".
``top1_regret`` = the best label minus the label of the model the metric ranks first (in the label's own
units, ≥ 0; with ties for first place, the mean over the tied models). A metric ranks the models by
decreasing value (every metric here grows with the spread of the spectrum).
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import metrics as _m
from .scoring import ScoreResult, parse_metrics, score

CI_LEVEL = 0.95


@dataclass
class CompareResult:
    """Result of :func:`compare`.

    Attributes:
        names: model names, in the order given.  metrics: the metric names (the first one ranks).
        table: one dict per model, best first by the first metric: ``name, n_rows, d, <metric>..., rank``
            (competition ranking: ties share the smaller rank), plus ``label`` when labels were given and
            ``<metric>_ci`` = (low, high) with ``bootstrap``.
        correlations: metric -> {"spearman", "kendall", "weighted_tau", "top1_regret", "n"} (labels only).
        results: name -> the :class:`~rankme_fast.scoring.ScoreResult` of that model.
        labels: name -> label (or None).  higher_is_better: the labels' orientation.
        intervals: name -> metric -> (low, high), the row-bootstrap percentile interval at ``CI_LEVEL``.
        warnings: convergence warnings per model (``convergence=True``).
    """

    names: List[str]
    metrics: List[str]
    table: List[dict]
    correlations: Dict[str, dict]
    results: Dict[str, ScoreResult] = field(repr=False)
    labels: Optional[Dict[str, float]] = None
    higher_is_better: bool = True
    intervals: Dict[str, Dict[str, tuple]] = field(default_factory=dict)
    warnings: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready (no tensors); NaN becomes None."""
        return _jsonable({"models": self.table, "metrics": self.metrics, "correlations": self.correlations,
                          "higher_is_better": self.higher_is_better,
                          "convergence": {n: r.convergence for n, r in self.results.items() if r.convergence},
                          "warnings": self.warnings})

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    def to_csv(self, path) -> None:
        cols = ["rank", "name", "n_rows", "d"] + self.metrics + (["label"] if self.labels else [])
        if self.intervals:
            cols += [f"{m}_ci_low" for m in self.metrics] + [f"{m}_ci_high" for m in self.metrics]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for row in self.table:
                out = [row.get(c) for c in cols[: 4 + len(self.metrics) + (1 if self.labels else 0)]]
                if self.intervals:
                    out += [row[f"{m}_ci"][0] for m in self.metrics] + [row[f"{m}_ci"][1] for m in self.metrics]
                w.writerow(out)

    def table_str(self) -> str:
        """The ranked table (and the correlations) as text."""
        heads = ["rank", "name", "rows", "d"] + self.metrics + (["label"] if self.labels else [])
        rows = []
        for r in self.table:
            cells = [str(r["rank"]), r["name"], str(r["n_rows"]), str(r["d"])]
            for m in self.metrics:
                c = _fmt(r[m])
                if self.intervals:
                    lo, hi = r[f"{m}_ci"]
                    c += f" [{_fmt(lo)}, {_fmt(hi)}]"
                cells.append(c)
            if self.labels:
                cells.append(_fmt(r["label"]))
            rows.append(cells)
        widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(heads)]
        lines = ["  ".join(h.ljust(w) if i == 1 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
        lines += ["  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                  for cells in rows]
        if self.correlations:
            orient = "higher is better" if self.higher_is_better else "lower is better"
            lines.append(f"\nhow well each metric predicts the labels ({orient}; n = models with a label):")
            lines.append(f"{'metric':<20} {'spearman':>9} {'kendall':>9} {'weighted_tau':>13} {'top1_regret':>12} {'n':>4}")
            for m, c in self.correlations.items():
                lines.append(f"{m:<20} {_fmt(c['spearman'], 4):>9} {_fmt(c['kendall'], 4):>9} "
                             f"{_fmt(c['weighted_tau'], 4):>13} {_fmt(c['top1_regret']):>12} {c['n']:>4}")
        return "\n".join(lines)

    def plot(self, path=None, metric: Optional[str] = None):
        """Spectra of every model (log-log, σ_k/σ_1) and, with labels, ``metric`` (default: the first)
        against the label with Kendall's τ in the legend; writes a PNG to ``path`` when given; returns the
        matplotlib Figure."""
        from .plot import compare_figure  # noqa: PLC0415

        return compare_figure(self, path=path, metric=metric)


def _fmt(v, digits: int = 6) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.{digits}g}"


def _jsonable(o):
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


def default_names(sources: Sequence[Any]) -> List[str]:
    """A name per source: the shortest path suffix that tells the paths apart (``ckpt_10.npy``, or
    ``run_a/ckpt.npy`` and ``run_b/ckpt.npy``); ``model_<i>`` for in-memory arrays."""
    paths = []
    for i, s in enumerate(sources):
        if isinstance(s, (str, os.PathLike)):
            paths.append(os.path.normpath(os.fspath(s)).split(os.sep))
        elif isinstance(s, (list, tuple)) and s and all(isinstance(v, (str, os.PathLike)) for v in s):
            paths.append(os.path.normpath(os.fspath(s[0])).split(os.sep) + ["+"])
        else:
            paths.append(None)
    names = []
    for i, p in enumerate(paths):
        if p is None:
            names.append(f"model_{i}")
            continue
        k = 1
        while k < len(p) and any(q is not None and q != p and q[-k:] == p[-k:] for q in paths):
            k += 1
        names.append("/".join(p[-k:]))
    return names


def _check_names(names, n: int) -> List[str]:
    if isinstance(names, str):
        names = [v.strip() for v in names.split(",")]
    names = list(names)
    if len(names) != n:
        raise ValueError(f"names: got {len(names)} names for {n} sources")
    if any(not isinstance(v, str) or not v for v in names):
        raise ValueError(f"names must be non-empty strings, got {names!r}")
    dup = sorted({v for v in names if names.count(v) > 1})
    if dup:
        raise ValueError(f"names must be unique; repeated: {', '.join(dup)}")
    return names


def _check_labels(labels, names: List[str]) -> Dict[str, float]:
    if isinstance(labels, Mapping):
        lab = dict(labels)
        unknown = sorted(str(k) for k in lab if k not in names)
        missing = [n for n in names if n not in lab]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"labels name unknown models: {', '.join(unknown)}")
            if missing:
                parts.append(f"models without a label: {', '.join(missing)}")
            raise ValueError("; ".join(parts) + f" (the models are: {', '.join(names)})")
    else:
        vals = list(labels)
        if len(vals) != len(names):
            raise ValueError(f"labels: got {len(vals)} labels for {len(names)} models (give a sequence in the "
                             "order of the sources, or a dict name -> label)")
        lab = dict(zip(names, vals))
    out = {}
    for k, v in lab.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"labels: the label of {k!r} must be a number, got {type(v).__name__} {v!r}")
        if not math.isfinite(float(v)):
            raise ValueError(f"labels: the label of {k!r} is {v}; labels must be finite")
        out[k] = float(v)
    return out


def _ranks_desc(values: List[float]) -> List[int]:
    """Competition ranks (1 = largest; ties share the smaller rank; NaN last)."""
    key = [(-v if not math.isnan(v) else math.inf) for v in values]
    return [1 + sum(1 for k2 in key if k2 < k) for k in key]


def correlations(metric_values: Sequence[float], labels: Sequence[float], higher_is_better: bool = True) -> dict:
    """Spearman ρ, Kendall τ-b and weighted τ (``scipy.stats``, defaults) between the metric and the labels'
    goodness, the top-1 regret, and n. Needs scipy (the ``[stats]``/``[test]`` extra)."""
    try:
        from scipy import stats  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("correlations need scipy: pip install 'rankme_fast[stats]'") from None
    x = np.asarray(metric_values, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    good = y if higher_is_better else -y
    n = int(x.size)
    if n < 2:
        raise ValueError(f"correlations need at least two models with a label, got {n}")
    nan = float("nan")
    if np.isnan(x).any() or np.ptp(x) == 0 or np.ptp(good) == 0:
        sp = kd = wt = nan  # undefined: a constant (or undefined) metric or label ranks nothing
    else:
        sp = float(stats.spearmanr(x, good)[0])
        kd = float(stats.kendalltau(x, good)[0])
        wt = float(stats.weightedtau(x, good)[0])
    if np.isnan(x).all():
        regret = nan
    else:
        top = np.flatnonzero(x == np.nanmax(x))
        regret = float(np.mean(good.max() - good[top]))
    return {"spearman": sp, "kendall": kd, "weighted_tau": wt, "top1_regret": regret, "n": n}


def _subset(source, max_rows: Optional[int], seed: int, key) -> Optional[np.ndarray]:
    if max_rows is None:
        return None
    from .io import open_source  # noqa: PLC0415

    readers = open_source(source, key)
    try:
        total = sum(r.n_rows for r in readers)
    finally:
        for r in readers:
            r.close()
    if total <= max_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=max_rows, replace=False)).astype(np.int64)


def _as_source(s, i: int):
    """Arrays become in-memory sources (:mod:`rankme_fast.io` reads files; an array is scored directly)."""
    if isinstance(s, (str, os.PathLike)) or (isinstance(s, (list, tuple)) and s
                                              and all(isinstance(v, (str, os.PathLike)) for v in s)):
        return s, False
    from ._inputs import to_torch  # noqa: PLC0415

    t = to_torch(s, name=f"sources[{i}]")
    if t.ndim != 2:
        raise ValueError(f"sources[{i}]: expected a 2-D (N, d) array, got shape {tuple(t.shape)}")
    return t, True


def _score_array(t: torch.Tensor, names, center, eps, row_index, convergence, seed, src: str) -> ScoreResult:
    """:func:`score` of an in-memory (N, d) array: the array is one chunk, rows 0.. of the source (the
    same subset and convergence levels as a file with those rows)."""
    import time  # noqa: PLC0415

    from ._rows import LEVEL_FRACTIONS, feed_chunk  # noqa: PLC0415
    from .gram import GramAccumulator  # noqa: PLC0415
    from .scoring import finish  # noqa: PLC0415

    t0 = time.perf_counter()
    n, d = t.shape
    accs = [GramAccumulator(d) for _ in (LEVEL_FRACTIONS if convergence else (1,))]
    feed_chunk(accs, src, 0, 0, t, row_index, seed if convergence else None)
    acc, levels = (None, accs) if convergence else (accs[0], None)
    return finish(acc, levels, names, center, eps, src, (), n, d, str(t.dtype).replace("torch.", ""), t0)


def _bootstrap(source, is_array: bool, names, want, eps, row_index, reps: int, seed: int, key, chunk_rows,
               d: int, estimates: Dict[str, float]) -> Dict[str, tuple]:
    """Row bootstrap of every metric: each replicate repeats every row w ~ Poisson(1) times (the streaming
    form of resampling N rows with replacement); ``reps`` replicates in groups whose Gram states fit in
    256 MiB, one read of the source per group. The interval is the replicates' central CI_LEVEL range
    shifted so that their median is the estimate (duplicated rows bias spectral metrics low)."""
    from ._rows import select_rows  # noqa: PLC0415
    from .gram import GramAccumulator  # noqa: PLC0415
    from .io import default_chunk_rows, iter_chunks, open_source  # noqa: PLC0415
    from .scoring import _metric  # noqa: PLC0415

    group = max(1, min(reps, (256 << 20) // max(1, d * d * 8 * 2)))
    vals: Dict[str, List[float]] = {m: [] for m in names}
    for g0 in range(0, reps, group):
        gn = min(group, reps - g0)
        accs = [GramAccumulator(d) for _ in range(gn)]
        rngs = [np.random.default_rng([seed, 0x5EED, g0 + j]) for j in range(gn)]

        def feed(t: torch.Tensor):
            for a, rng in zip(accs, rngs):
                w = torch.from_numpy(rng.poisson(1.0, size=t.shape[0]))
                if int(w.sum()):
                    a.update(t.repeat_interleave(w.to(t.device), dim=0))

        if is_array:
            t, _ = select_rows(source, 0, row_index)
            feed(t)
        else:
            readers = open_source(source, key)
            try:
                rows = default_chunk_rows(readers[0].n_features, readers[0].dtype) if chunk_rows is None else chunk_rows
                starts, gpos = {}, 0
                for r in readers:
                    starts[id(r)] = gpos
                    gpos += r.n_rows
                for r, r0, t in iter_chunks(readers, rows):
                    t, _ = select_rows(t, starts[id(r)] + r0, row_index)
                    if t.shape[0]:
                        feed(t)
                    del t
            finally:
                for r in readers:
                    r.close()
        for a in accs:
            spectra = {}
            for m, c in want.items():
                try:
                    if c not in spectra:
                        spectra[c] = a.spectrum(center=c)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # e.g. alpha_req's range note, once per replicate
                        vals[m].append(float(_metric(spectra[c], m, eps)))
                except ValueError:
                    vals[m].append(float("nan"))
    lo_q, hi_q = (1 - CI_LEVEL) / 2, 1 - (1 - CI_LEVEL) / 2
    out = {}
    for m, v in vals.items():
        arr = np.asarray(v)
        arr = arr[np.isfinite(arr)]
        if not arr.size:
            out[m] = (math.nan, math.nan)
            continue
        # resampling repeats rows, which lowers spectral metrics (fewer distinct rows): the percentile
        # interval of the replicates is shifted so that their median sits on the estimate
        med, lo, hi = np.quantile(arr, [0.5, lo_q, hi_q])
        out[m] = (float(estimates[m] - (med - lo)), float(estimates[m] + (hi - med)))
    return out


def compare(sources: Sequence[Any], *, names: Union[None, str, Sequence[str]] = None,
            metrics: Union[str, Sequence[str]] = ("rankme",), labels: Union[None, Mapping[str, float], Sequence[float]] = None,
            higher_is_better: bool = True, max_rows: Optional[int] = None, seed: int = 0,
            center: Optional[bool] = None, bootstrap: int = 0, eps: float = _m.RANKME_EPS, key: Optional[str] = None,
            chunk_rows: Optional[int] = None, progress: Optional[bool] = None, distributed: bool = False,
            convergence: bool = False) -> CompareResult:
    """Score every source (one model or checkpoint each) the same way, rank them by the first metric and,
    with ``labels``, measure how well each metric predicts them (see the module docstring).

    Args:
        sources: a sequence of models: arrays/tensors (N, d), files, shard directories, globs, or lists of
            files (one list = one model).
        names: a name per source (a list or a comma-separated string); default: the shortest distinct path
            suffix (``model_<i>`` for arrays).
        metrics: names (any case/dashes) or ``"all"``; the first one ranks the table.
        labels: the downstream result per model — a dict name -> value, or a sequence in source order.
        higher_is_better: the labels' orientation (False for an error rate or a loss).
        max_rows: score every source on the same seeded subset of this many rows (see the module docstring).
        seed: the subset's (and the bootstrap's and convergence's) seed.
        center: as in :func:`rankme_fast.score` (None: each metric's reference convention).
        bootstrap: B > 0 adds a row-bootstrap 95 % percentile interval for every metric value (B more Gram
            passes over each source, in groups whose states fit in 256 MiB).
        convergence: per model, the metrics at about N/8, N/4, N/2, N rows (``results[name].convergence``) and a
            warning when the last doubling still moves RankMe by more than 1 %.
        distributed: split every source's reading across the ranks of the initialised process group.
    """
    if isinstance(sources, (str, os.PathLike)) or not isinstance(sources, Sequence):
        raise TypeError("sources must be a list of models (arrays, files, shard directories, globs or lists of "
                        f"files), got {type(sources).__name__}; a single glob or file is ONE model — pass "
                        "[path1, path2, ...] to compare several")
    if len(sources) < 1:
        raise ValueError("compare needs at least one source")
    for nm, v in (("higher_is_better", higher_is_better), ("distributed", distributed),
                  ("convergence", convergence)):
        if not isinstance(v, bool):
            raise TypeError(f"{nm} must be True or False, got {v!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an integer >= 0 (the number of replicates), got {bootstrap!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer))
                                 or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    mnames = list(parse_metrics(metrics))
    names = default_names(sources) if names is None else _check_names(names, len(sources))
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    lab = None if labels is None else _check_labels(labels, names)
    results: Dict[str, ScoreResult] = {}
    intervals: Dict[str, Dict[str, tuple]] = {}
    warns: Dict[str, str] = {}
    for i, (src, name) in enumerate(zip(sources, names)):
        s, is_array = _as_source(src, i)
        with warnings.catch_warnings():  # convergence warnings are collected per model and issued below
            warnings.filterwarnings("ignore", message=".*probably not enough rows", category=UserWarning)
            if is_array:
                idx = None
                if max_rows is not None and s.shape[0] > max_rows:
                    idx = np.sort(np.random.default_rng(seed).choice(s.shape[0], size=max_rows, replace=False))
                res = _score_array(s, mnames, center, eps, idx, convergence, int(seed), name)
            else:
                idx = _subset(s, max_rows, int(seed), key)
                res = score(s, mnames, center=center, eps=eps, key=key, chunk_rows=chunk_rows, progress=progress,
                            distributed=distributed, convergence=convergence, seed=int(seed), row_index=idx)
        results[name] = res
        if res.convergence_warning:
            warns[name] = res.convergence_warning
        if bootstrap:
            intervals[name] = _bootstrap(s, is_array, mnames, res.centered, eps, idx, int(bootstrap), int(seed),
                                         key, chunk_rows, res.n_features, res.metrics)
    for n_, w in warns.items():
        warnings.warn(f"{n_}: {w}", UserWarning, stacklevel=2)
    first = mnames[0]
    ranks = _ranks_desc([results[n].metrics[first] for n in names])
    table = []
    for n, rk in zip(names, ranks):
        r = results[n]
        row = {"name": n, "n_rows": r.n_rows, "d": r.n_features, **{m: r.metrics[m] for m in mnames}, "rank": rk}
        if lab is not None:
            row["label"] = lab[n]
        for m in (mnames if bootstrap else ()):
            row[f"{m}_ci"] = intervals[n][m]
        table.append(row)
    table.sort(key=lambda row: (row["rank"], names.index(row["name"])))
    corr = {}
    if lab is not None:
        if len(names) < 2:
            raise ValueError("labels need at least two models to correlate with")
        for m in mnames:
            corr[m] = correlations([results[n].metrics[m] for n in names], [lab[n] for n in names], higher_is_better)
    return CompareResult(names, mnames, table, corr, results, lab, higher_is_better, intervals, warns)


def read_labels(path, column: Optional[str] = None, names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Labels from a CSV (a header row; the model name in the column ``name``/``model`` or the first one,
    the label in ``column`` or, when there are exactly two columns, the second) or a JSON file
    (``{"name": value}``, ``{"name": {column: value}}`` or ``[{"name": ..., column: ...}, ...]``)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ValueError(f"{p}: labels file not found")
    if p.lower().endswith(".json"):
        with open(p) as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}: not valid JSON ({exc})") from None
        if isinstance(obj, list):
            if not all(isinstance(r, dict) for r in obj):
                raise ValueError(f"{p}: a JSON list of labels must hold objects with a name and a label")
            obj = {str(r.get("name", r.get("model"))): r for r in obj}
        if not isinstance(obj, dict):
            raise ValueError(f"{p}: expected a JSON object name -> label, got {type(obj).__name__}")
        out = {}
        for k, v in obj.items():
            if isinstance(v, dict):
                cols = [c for c in v if c not in ("name", "model")]
                c = column if column is not None else (cols[0] if len(cols) == 1 else None)
                if c is None:
                    raise ValueError(f"{p}: {k!r} has several fields {cols}; choose one with --label-column")
                if c not in v:
                    raise ValueError(f"{p}: {k!r} has no field {c!r} (fields: {cols})")
                v = v[c]
            out[str(k)] = _number(v, p, k)
        return out
    with open(p, newline="") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ValueError(f"{p}: a labels CSV needs a header row and at least one model")
    head = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in head]
    ni = lower.index("name") if "name" in lower else (lower.index("model") if "model" in lower else 0)
    if column is not None:
        if column not in head:
            raise ValueError(f"{p}: no column {column!r} (columns: {', '.join(head)})")
        li = head.index(column)
    elif len(head) == 2:
        li = 1 - ni
    else:
        raise ValueError(f"{p}: several columns ({', '.join(head)}); choose the label with --label-column")
    out = {}
    for r in rows[1:]:
        if len(r) <= max(ni, li):
            raise ValueError(f"{p}: row {r} has fewer than {max(ni, li) + 1} columns")
        out[r[ni].strip()] = _number(r[li], p, r[ni].strip())
    return out


def _number(v, path, name) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: the label of {name!r} is not a number: {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{path}: the label of {name!r} is {v!r}; labels must be finite")
    return x
