"""Scoring embedding files across torch.distributed ranks: each rank reads a part, one reduction joins them.

The rows of a source (files f_0, f_1, … in the source's order; only the first ``max_rows`` of their
concatenation when given) are split by :func:`plan`:

    at least ``world`` non-empty files:  contiguous groups of whole files, one per rank, minimising the
                                         largest group's row count (the slowest rank's work);
    otherwise:                           contiguous row ranges of the concatenation, ⌈N/P⌉ rows for the
                                         first N mod P ranks, ⌊N/P⌋ for the others (a range may span
                                         files; ranks ≥ N get none when N < P).

:func:`accumulate_distributed` then streams each rank's ranges into its own
:class:`~rankme_fast.gram.GramAccumulator` and joins them with one
:func:`~rankme_fast.distributed.all_reduce_accumulator`, so every rank ends with the state of all N rows —
the same, up to float64 rounding, as :func:`rankme_fast.scoring.accumulate` in one process. Before any
row is read one ``all_gather`` checks that every rank sees the same d, dtype, file count, row counts and
``max_rows``; a second one, after reading, tells every rank whether another one failed. A rank that cannot
open or read its files therefore makes *every* rank raise (naming it), never leaves the others waiting in
the reduction.

Under ``torchrun`` (files are scored on CPU, so the group is gloo)::

    # torchrun --nproc-per-node 4 score.py
    from rankme_fast import dist_score
    dist_score.init_from_env()
    acc, (files, n, d, dtype) = dist_score.accumulate_distributed("shards/")
    if dist_score.is_rank0():
        print(acc.rankme())
"""
from __future__ import annotations

import os
from collections import Counter
from typing import List, Optional, Sequence, Tuple

from .gram import GramAccumulator
from .io import Source, default_chunk_rows, iter_chunks, open_source

_WHO = "accumulate_distributed"
_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")
_owned_group = False  # whether init_from_env created the default group (shutdown() then destroys it)


# -- the split --------------------------------------------------------------------------------------


def _count(name: str, v, *, minimum: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"plan: {name} must be an integer >= {minimum}, got {v!r}")
    return v


def _groups(sizes: Sequence[int], world: int, cap: int) -> List[int]:
    """End indices of ``world`` contiguous non-empty groups of ``sizes`` (len(sizes) ≥ world), each summing to
    at most ``cap`` (≥ max(sizes)) when possible: greedy from the left, except that a group stops once the
    files left are only as many as the ranks left (each of those then gets one file, which fits in cap)."""
    ends, i, n = [], 0, len(sizes)
    for k in range(world):
        left = world - k - 1  # ranks after this one
        if left == 0:
            ends.append(n)
            break
        j, s = i, 0
        while j < n - left and (j == i or s + sizes[j] <= cap):
            s += sizes[j]
            j += 1
        ends.append(j)
        i = j
    return ends


def _fits(sizes: Sequence[int], world: int, cap: int) -> bool:
    ends = _groups(sizes, world, cap)
    starts = [0] + ends[:-1]
    return all(sum(sizes[a:b]) <= cap for a, b in zip(starts, ends))


def plan(rows: Sequence[int], world: int, rank: int, max_rows: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """The ``(file index, r0, r1)`` row ranges (r0 < r1, rows [r0, r1) of that file) rank ``rank`` of ``world``
    reads, in order; see the module docstring for the split. Deterministic: every rank computes every
    rank's part from the same inputs, and the parts of ranks 0, 1, … concatenated are exactly the first
    ``min(N, max_rows)`` rows of the files, each once, in order.

    Args:
        rows: each file's row count, in the source's order (files with no rows get no range).
        world, rank: the group's size and this rank's index in it (0 ≤ rank < world).
        max_rows: only the first ``max_rows`` rows of the concatenation count (None: all).

    Whole-file mode (at least ``world`` files with rows) gives every rank at least one file and minimises the
    largest rank's row count; row-range mode gives ranks ⌈N/P⌉ or ⌊N/P⌋ rows, the larger share to the lower
    ranks (none to ranks k ≥ N when N < P).
    """
    world = _count("world", world, minimum=1)
    rank = _count("rank", rank, minimum=0)
    if rank >= world:
        raise ValueError(f"plan: rank must be < world = {world}, got {rank}")
    if max_rows is not None:
        _count("max_rows", max_rows, minimum=1)
    counts = [_count(f"rows[{i}]", int(n) if not isinstance(n, bool) and hasattr(n, "__index__") else n, minimum=0)
              for i, n in enumerate(rows)]
    left = sum(counts) if max_rows is None else max_rows
    eff = []  # rows of each file that count
    for n in counts:
        take = min(n, left)
        eff.append(take)
        left -= take
    files = [i for i, n in enumerate(eff) if n > 0]
    total = sum(eff)
    if total == 0:
        return []
    if len(files) >= world:
        sizes = [eff[i] for i in files]
        lo, hi = max(sizes), sum(sizes)  # the smallest cap the greedy split fits in: binary search
        while lo < hi:
            mid = (lo + hi) // 2
            if _fits(sizes, world, mid):
                hi = mid
            else:
                lo = mid + 1
        ends = _groups(sizes, world, lo)
        a = 0 if rank == 0 else ends[rank - 1]
        return [(files[j], 0, sizes[j]) for j in range(a, ends[rank])]
    q, extra = divmod(total, world)  # ranks below `extra` read q + 1 rows, the others q
    g0 = rank * q + min(rank, extra)  # rows [g0, g1) of the concatenation
    g1 = g0 + q + (rank < extra)
    out, base = [], 0
    for i, n in enumerate(eff):
        a, b = max(g0, base), min(g1, base + n)
        if a < b:
            out.append((i, a - base, b - base))
        base += n
    return out


# -- the process group ------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{_WHO}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group() first (or rankme_fast.dist_score.init_from_env() "
                           "under torchrun)")
    return dist


def init_from_env() -> Optional[Tuple[int, int]]:
    """``(rank, world)`` of the default process group, initialising it (gloo: files are scored on CPU,
    ``init_method="env://"``) when the environment is that of a ``torchrun`` worker (WORLD_SIZE > 1, RANK,
    MASTER_ADDR, MASTER_PORT) and no group exists yet; an existing group is used as it is. None when not
    under torchrun (no WORLD_SIZE, or WORLD_SIZE ≤ 1) and no group exists: score in this process alone.

    Raises RuntimeError when WORLD_SIZE > 1 but the rest of the environment is missing or malformed, or
    torch.distributed / gloo is not available (rather than each process scoring everything on its own).
    """
    global _owned_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return None
    try:
        world = int(raw)
    except ValueError:
        raise RuntimeError(f"init_from_env: WORLD_SIZE must be an integer, got {raw!r}") from None
    if world <= 1:
        return None
    missing = [k for k in _ENV if not os.environ.get(k, "").strip()]
    if missing:
        raise RuntimeError(f"init_from_env: WORLD_SIZE={world} but {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set; launch with torchrun "
                           "(or set RANK, MASTER_ADDR and MASTER_PORT)")
    try:
        rank = int(os.environ["RANK"])
    except ValueError:
        raise RuntimeError(f"init_from_env: RANK must be an integer, got {os.environ['RANK']!r}") from None
    if not 0 <= rank < world:
        raise RuntimeError(f"init_from_env: RANK={rank} is outside [0, WORLD_SIZE={world})")
    if not dist.is_available() or not dist.is_gloo_available():
        raise RuntimeError("init_from_env: torch.distributed with the gloo backend is not available in this "
                           "torch build; distributed scoring needs it")
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    _owned_group = True
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Destroy the default process group if :func:`init_from_env` created it (a group the caller made is left
    alone)."""
    global _owned_group
    if not _owned_group:
        return
    import torch.distributed as dist

    _owned_group = False
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_rank0(group=None) -> bool:
    """Whether this process should print: rank 0 of ``group`` (default: the world), or no group at all."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == 0


# -- the distributed accumulation --------------------------------------------------------------------


def _ranks(rs: Sequence[int]) -> str:
    return f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"


def _disagreement(what: str, values: Sequence) -> Optional[str]:
    """None when every rank has the same value; else "rank 1 sees d = 64, rank 0 d = 32": the ranks away from
    the most common value first (ties: that of the lowest rank), then those holding it."""
    if len(set(map(repr, values))) <= 1:
        return None
    by = {}
    for r, v in enumerate(values):
        by.setdefault(repr(v), []).append(r)
    common = Counter(repr(v) for v in values).most_common()
    ref = min((k for k, c in common if c == common[0][1]), key=lambda k: by[k][0])
    others = [k for k in by if k != ref]
    parts = [f"{_ranks(by[k])} see{'' if len(by[k]) > 1 else 's'} {what} = {k}" for k in others]
    parts.append(f"{_ranks(by[ref])} {what} = {ref}")
    return ", ".join(parts)


def _check_same(headers: Sequence[dict], label: str) -> None:
    problems = []
    for what, key in (("d", "d"), ("dtype", "dtype"), ("the number of files", "n_files"), ("max_rows", "max_rows")):
        msg = _disagreement(what, [h[key] for h in headers])
        if msg:
            problems.append(msg)
    if not problems:  # same file count: name the first file whose row count differs
        rows = [h["rows"] for h in headers]
        for i in range(len(rows[0])):
            msg = _disagreement(f"rows of file {i} ({headers[0]['names'][i]})", [r[i] for r in rows])
            if msg:
                problems.append(msg)
                break
    if problems:
        raise ValueError(f"{_WHO}: the ranks see different sources for {label}: {'; '.join(problems)}; every "
                         "rank must see the same files (same d, dtype and rows) and pass the same max_rows")


def _gather(dist, group, world: int, obj) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_failures(gathered: Sequence[dict], rank: int, failure: Optional[BaseException], stage: str) -> None:
    """Raise on every rank if one failed: that rank re-raises its own exception (the message
    :func:`rankme_fast.scoring.accumulate` would give), the others one of the same kind naming it."""
    bad = [r for r, g in enumerate(gathered) if g["error"] is not None]
    if not bad:
        return
    if failure is not None:
        raise failure
    kinds = {gathered[r]["error"][0] for r in bad}
    kind = {"ValueError": ValueError, "TypeError": TypeError}.get(kinds.pop(), RuntimeError) if len(kinds) == 1 \
        else RuntimeError
    why = "; ".join(f"rank {r}: {gathered[r]['error'][0]}: {gathered[r]['error'][1]}" for r in bad)
    raise kind(f"{_WHO}: {_ranks(bad)} failed {stage} (this is rank {rank}): {why}")


def _error(exc: Optional[BaseException]):
    return None if exc is None else (type(exc).__name__, str(exc))


class _Range:
    """Rows [base, base + n_rows) of a reader, as a reader of its own (for :func:`iter_chunks`)."""

    def __init__(self, reader, r0: int, r1: int, index: int = 0):
        self.inner, self.base, self.n_rows, self.index = reader, r0, r1 - r0, index
        self.path, self.n_features, self.dtype = reader.path, reader.n_features, reader.dtype

    def read(self, r0: int, r1: int):
        return self.inner.read(self.base + r0, self.base + r1)

    def done(self, r0: int, r1: int) -> None:
        self.inner.done(self.base + r0, self.base + r1)

    def close(self) -> None:
        self.inner.close()


def _stream(accs: Sequence[GramAccumulator], ranges: Sequence[_Range], chunk_rows: int, bar, starts: Sequence[int],
            row_index=None, split_seed: Optional[int] = None) -> None:
    """Stream ``ranges`` into ``accs`` as :func:`rankme_fast.scoring.accumulate` does (the same chunk
    handling: :func:`~rankme_fast._rows.feed_chunk`)."""
    from ._rows import feed_chunk  # noqa: PLC0415
    for r, r0, t in iter_chunks(ranges, chunk_rows):
        fed = feed_chunk(accs, r.path, r.base + r0, starts[r.index] + r.base + r0, t, row_index, split_seed)
        del t  # chunks may be views of a file mapping, closed below
        if bar is not None and fed:
            bar.update(fed)


def accumulate_distributed(source: Source, *, key: Optional[str] = None, chunk_rows: Optional[int] = None,
                           max_rows: Optional[int] = None, progress: Optional[bool] = None,
                           backend: Optional[str] = None, num_threads: Optional[int] = None, group=None,
                           row_index=None, split_seed: Optional[int] = None):
    """:func:`rankme_fast.scoring.accumulate` split across the ranks of ``group`` (default: the world).

    Every rank opens ``source`` (headers only); one all_gather checks that all see the same d, dtype, file
    count, row counts and ``max_rows`` (ValueError on every rank naming the ranks and their values, before
    any row is read); each rank streams its :func:`plan` ranges (chunks of ``chunk_rows`` rows, default
    ~64 MiB) into its own accumulator; a second all_gather makes every rank raise if one could not read (the
    failing rank raises its own error, as ``scoring.accumulate`` would, the others one naming it); then one
    :func:`~rankme_fast.distributed.all_reduce_accumulator` gives every rank the state of all rows. A rank
    with no rows to read still takes part in every collective.

    Args: as :func:`rankme_fast.scoring.accumulate` (``progress``: a bar on rank 0 only, counting its rows;
        ``row_index`` and ``split_seed`` as there — with ``split_seed`` the four level accumulators are
        returned, each all-reduced), plus ``group``, a torch.distributed process group; collectives use its timeout. For an NCCL group
        call ``torch.cuda.set_device(local_rank)`` first (the gathers of Python objects need it).

    Returns:
        ``(accumulator, (files, total_rows, d, dtype))``, identical on every rank; ``files`` are all the
        source's files (as this rank names them), ``total_rows`` all their rows (not only ``max_rows``).

    Raises RuntimeError when torch.distributed is not initialised; otherwise on every rank or none.
    """
    dist = _dist()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else (
        ",".join(map(os.fspath, source)) if isinstance(source, (list, tuple)) else repr(source))
    readers: list = []
    header, failure = None, None
    try:
        for name, v in (("chunk_rows", chunk_rows), ("max_rows", max_rows)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        readers = open_source(source, key)
        first = readers[0]
        header = {"d": first.n_features, "dtype": str(first.dtype).replace("torch.", ""), "n_files": len(readers),
                  "rows": [r.n_rows for r in readers], "max_rows": max_rows,
                  "names": [os.path.basename(r.path.rstrip("/" + os.sep)) or r.path for r in readers]}
    except Exception as exc:  # noqa: BLE001 - reported to every rank below, re-raised here
        failure = exc
    acc = None
    try:
        gathered = _gather(dist, group, world, {"error": _error(failure), "header": header})
        _raise_failures(gathered, rank, failure, f"to open {label}")
        _check_same([g["header"] for g in gathered], label)
        first, total = readers[0], sum(r.n_rows for r in readers)
        if total == 0:  # the same on every rank (checked above)
            raise ValueError(f"{source}: holds no rows (shape (0, {first.n_features}))")
        try:
            rows = default_chunk_rows(first.n_features, first.dtype) if chunk_rows is None else chunk_rows
            n_acc = 1 if split_seed is None else 4
            accs = [GramAccumulator(first.n_features, backend=backend, num_threads=num_threads) for _ in range(n_acc)]
            acc = accs
            idx = None
            if row_index is not None:
                from ._rows import _check_row_index  # noqa: PLC0415
                idx = _check_row_index(row_index, total)
            starts = [0]
            for r in readers:
                starts.append(starts[-1] + r.n_rows)
            ranges = [_Range(readers[i], r0, r1, i) for i, r0, r1 in plan(header["rows"], world, rank, max_rows)]
            mine = sum(r.n_rows for r in ranges)
            desc = os.path.basename(label.rstrip("/" + os.sep)) or label
            from ._rows import _progress  # noqa: PLC0415
            bar = _progress(progress, mine, f"{desc} (rank 0 of {world})") if rank == 0 and mine else None
            try:
                _stream(accs, ranges, rows, bar, starts, idx, split_seed)
            finally:
                if bar is not None:
                    bar.close()
        except Exception as exc:  # noqa: BLE001 - reported to every rank below, re-raised here
            failure = exc
        gathered = _gather(dist, group, world, {"error": _error(failure)})
        _raise_failures(gathered, rank, failure, f"to read its rows of {label}")
        info = ([r.path for r in readers], total, first.n_features, str(first.dtype).replace("torch.", ""))
    finally:
        for r in readers:
            r.close()
    from .distributed import all_reduce_accumulator  # noqa: PLC0415 - torch.distributed only when used

    for a in acc:
        all_reduce_accumulator(a, group)
    return (acc[0] if split_seed is None else acc), info
