"""Row-level helpers shared by :mod:`rankme_fast.scoring` and :mod:`rankme_fast.dist_score`: the seeded
convergence levels of rows, row subsets, feeding a chunk into accumulators, the progress bar."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import numpy as np
import torch

from ._inputs import check_all_finite
from .gram import GramAccumulator


# Convergence (``score(..., convergence=True)``): every row gets a level from a hash of its global index and
# the seed — 0 with probability 1/8, 1 with 1/8, 2 with 1/4, 3 with 1/2 — and each level has its own
# accumulator, so the nested random subsets "levels <= k" (about N/8, N/4, N/2 and N rows) come from one
# pass, whatever the order of the source (a sorted file is subsampled, not cut) and however it is chunked.
LEVEL_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def _unit_hash(idx: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (index, seed) -> uniform float64 in [0, 1); vectorised, chunking-independent."""
    with np.errstate(over="ignore"):
        z = idx.astype(np.uint64) + np.uint64((int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def row_levels(g0: int, n: int, seed: int) -> np.ndarray:
    """Levels (uint8, 0..3) of the rows with global indices g0 .. g0+n-1 (see LEVEL_FRACTIONS)."""
    u = _unit_hash(np.arange(g0, g0 + n, dtype=np.uint64), seed)
    return np.searchsorted(np.asarray(LEVEL_FRACTIONS[:3]), u, side="right").astype(np.uint8)


def _check_row_index(row_index, total: int) -> np.ndarray:
    idx = np.asarray(row_index)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"row_index must be a 1-D array of integer row indices, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx[0] < 0 or idx[-1] >= total or bool((np.diff(idx) <= 0).any())):
        raise ValueError(f"row_index must be sorted, unique and in [0, {total}), got {idx[:4].tolist()}...")
    return idx


def select_rows(t: torch.Tensor, g0: int, row_index=None):
    """The rows of chunk ``t`` (source rows g0..) whose global indices are in the sorted ``row_index``, and
    those indices (None without a ``row_index``: every row)."""
    if row_index is None:
        return t, None
    lo, hi = np.searchsorted(row_index, [g0, g0 + t.shape[0]])
    gi = row_index[lo:hi]
    return t.index_select(0, torch.from_numpy(gi - g0).to(t.device)), gi


def feed_chunk(accs: Sequence[GramAccumulator], path: str, r0: int, g0: int, t: torch.Tensor, row_index=None,
               split_seed: Optional[int] = None) -> int:
    """Add chunk ``t`` (rows r0.. of the file ``path``, rows g0.. of the source) to ``accs[0]`` — or, with
    ``split_seed``, each row to the accumulator of its level — keeping only the rows in ``row_index`` when
    given; returns the number of rows added. A non-finite value raises a ValueError naming the file and row."""
    n = t.shape[0]
    t, gi = select_rows(t, g0, row_index)
    if t.shape[0] == 0:
        return 0
    parts = [(accs[0], t)]
    if split_seed is not None:
        lv = torch.from_numpy(_unit_levels(g0, n, gi, split_seed)).to(t.device)
        parts = [(accs[k], t[lv == k]) for k in range(len(accs))]
    for a, part in parts:
        if part.shape[0] == 0:
            continue
        try:
            a.update(part)
        except ValueError as exc:
            # names the file and the row (count and shape are those of the chunk being read)
            check_all_finite(t, name=f"{path} (rows {r0}..{r0 + n})", row_offset=r0)
            raise ValueError(f"{path}: rows {r0}..{r0 + n}: {exc}") from None
    return t.shape[0]


def _unit_levels(g0: int, n: int, gi, seed: int) -> np.ndarray:
    if gi is None:
        return row_levels(g0, n, seed)
    u = _unit_hash(np.asarray(gi, dtype=np.uint64), seed)
    return np.searchsorted(np.asarray(LEVEL_FRACTIONS[:3]), u, side="right").astype(np.uint8)


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
