"""torch.distributed reduction of :class:`~rankme_fast.gram.GramAccumulator` state (DESIGN §5).

Each rank accumulates its own shard; then, with Chan's parallel formula,

    μ = Σ_r n_r μ_r / n,        M = Σ_r [ M_r + n_r (μ_r − μ)(μ_r − μ)ᵀ ],

where M_r is rank r's centred scatter matrix. Three collectives, all in float64 except the first:
an all_gather of five integers per rank (d, n, batches, flags, magnitude exponent) — so a rank with a different d, a
poisoned accumulator, one already reduced or one that failed to prepare its part (e.g. out of memory)
is named in an error raised on *every* rank, instead of a hang or a silently wrong sum —, an all_reduce
of the d-vector n_r μ_r, and one all_reduce of the d×d matrices. ``timeout=`` bounds each of them (see
:func:`all_reduce_accumulator`), so a rank that never arrives makes the others raise instead of blocking
for the process group's timeout (torch's default: 30 minutes); on gloo a monitored barrier comes first
and names the missing ranks. Embeddings never leave their rank. Works on any backend (gloo, NCCL: state
on CPU is moved to the current CUDA device for NCCL and back).

Under ``torchrun``::

    # torchrun --nproc-per-node 8 score.py
    import os, torch, torch.distributed as dist, rankme_fast as rf
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # (GPU runs) one GPU per rank
    dist.init_process_group()                      # NCCL on GPUs, gloo on CPUs
    acc = rf.GramAccumulator()
    for batch in my_shard_of_the_data():
        acc.update(model(batch))
    acc.all_reduce()                               # every rank now holds the global state
                                                   # (once: a second call raises on every rank)
    if dist.get_rank() == 0:
        print(acc.rankme(), acc.spectrum(center=True).collapse_auc())
"""
from __future__ import annotations

import datetime
import math
from collections import Counter
from typing import Optional

import torch

_REDUCED = "_reduced"  # set on an accumulator by all_reduce: a copy of the global mean it set as shift
_BROKEN, _REDUCED_FLAG, _FAILED = 1, 2, 4  # bits of the 4th integer of the per-rank gather
NO_EXP = -(1 << 62)  # 5th integer when a rank has no non-zero row (no magnitude)


def _comm_device(group, state_device: torch.device) -> torch.device:
    """Where the collectives run: the state's own device, unless the group cannot reduce tensors there
    (a pure NCCL group and CPU state: then this rank's current CUDA device — call
    ``torch.cuda.set_device(local_rank)`` first, as NCCL itself requires)."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if state_device.type == "cpu" and "nccl" in backend and "gloo" not in backend and "mpi" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return state_device


def _describe_mismatch(ds: list) -> str:
    known = {r: d for r, d in enumerate(ds) if d >= 0}
    common, _ = Counter(known.values()).most_common(1)[0]
    odd = [r for r, d in known.items() if d != common]
    per_rank = ", ".join(f"rank {r}: d={d}" for r, d in known.items())
    return (f"GramAccumulator.all_reduce: the feature dimension differs across ranks ({per_rank}); "
            f"rank{'s' if len(odd) > 1 else ''} {', '.join(map(str, odd))} differ{'' if len(odd) > 1 else 's'} "
            f"from d={common}")


def _timeout_seconds(timeout) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        sec = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        sec = float(timeout)
    else:
        raise TypeError(f"GramAccumulator.all_reduce: timeout must be a datetime.timedelta, a number of seconds or "
                        f"None, got {type(timeout).__name__} {timeout!r}")
    if not (math.isfinite(sec) and sec > 0):
        raise ValueError(f"GramAccumulator.all_reduce: timeout must be a positive, finite duration, got {timeout!r}")
    return sec


def _unscaled_shift(acc) -> Optional[torch.Tensor]:
    """The shift in the rows' own units (the accumulator may store rows rescaled by 2^_log2_scale)."""
    shift = getattr(acc, "_shift", None)
    k = int(getattr(acc, "_log2_scale", 0) or 0)
    return shift if shift is None or k == 0 else torch.ldexp(shift, torch.tensor(-k, device=shift.device))


def _is_reduced(acc) -> bool:
    """Whether ``acc`` holds the result of an earlier all_reduce: its shift is still the global mean that
    call set (``update`` keeps the shift; ``load_state_dict`` of another state replaces it)."""
    mark = getattr(acc, _REDUCED, None)
    shift = _unscaled_shift(acc)
    return (mark is not None and shift is not None and mark.shape == shift.shape and mark.device == shift.device
            and bool(torch.equal(mark, shift)))


def mark_reduced(acc) -> None:
    """Record that ``acc`` holds a global (all-reduced) state: the one attribute this module adds."""
    setattr(acc, _REDUCED, _unscaled_shift(acc).clone())


class _Collectives:
    """The collectives of one all_reduce, each bounded by ``timeout`` seconds (None: the group's own)."""

    def __init__(self, group, timeout: Optional[float]):
        import torch.distributed as dist

        self.dist, self.group, self.timeout = dist, group, timeout

    def _run(self, stage: str, fn, *args) -> None:
        if self.timeout is None:
            fn(*args, group=self.group)
            return
        try:
            work = fn(*args, group=self.group, async_op=True)
            done = work.wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise self._timed_out(stage, exc) from exc
        if done is False:
            raise self._timed_out(stage, None)

    def _timed_out(self, stage: str, exc) -> RuntimeError:
        why = f": {str(exc).splitlines()[0].rstrip('.! ')}" if exc is not None and str(exc) else ""
        return RuntimeError(
            f"GramAccumulator.all_reduce: {stage} did not complete within timeout={self.timeout:g} s; a rank of the "
            f"group did not call all_reduce in time (it may have raised or exited earlier){why}. The process "
            f"group is unusable now: destroy it (torch.distributed.destroy_process_group())")

    def barrier(self) -> None:
        """gloo: a monitored barrier first, which names the ranks that did not arrive."""
        if self.timeout is None or str(self.dist.get_backend(self.group)).lower() != "gloo":
            return
        try:
            self.dist.monitored_barrier(self.group, timeout=datetime.timedelta(seconds=self.timeout),
                                        wait_all_ranks=True)
        except RuntimeError as exc:
            raise self._timed_out("the entry barrier", exc) from exc

    def all_gather(self, out: list, t: torch.Tensor) -> None:
        self._run("the all_gather of (d, n) per rank", self.dist.all_gather, out, t)

    def all_reduce(self, t: torch.Tensor, stage: str) -> None:
        self._run(stage, self.dist.all_reduce, t)


def _ranks(rs: list) -> str:
    return f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"


@torch.no_grad()
def all_reduce_accumulator(acc, group=None, *, timeout=None):
    """In-place global reduction of ``acc`` over ``group``; see the module docstring. Afterwards every
    rank holds the global state; a second call on it raises (on every rank) instead of counting every row
    world-size times.

    Args:
        acc: this rank's :class:`~rankme_fast.gram.GramAccumulator` (possibly without rows).
        group: the torch.distributed process group (default: the world).
        timeout: a ``datetime.timedelta`` or seconds bounding each collective of this call (default None:
            the process group's timeout — torch's default is 30 minutes, or 10 for NCCL). A rank that never
            calls all_reduce (it raised earlier) then makes the others raise RuntimeError naming the timeout
            after about that long (gloo: naming the missing ranks), instead of blocking; afterwards the
            process group is unusable and should be destroyed.

    Raises (on every rank, before any collective could hang on the others): RuntimeError when a rank's
    accumulator is broken (an earlier NaN/interrupted batch), was already all-reduced, or failed to prepare
    its state (e.g. out of memory); ValueError when d differs across ranks or no rank has rows.
    """
    import torch.distributed as dist

    sec = _timeout_seconds(timeout)
    if not (dist.is_available() and dist.is_initialized()):
        acc._ensure_ok()
        raise RuntimeError("GramAccumulator.all_reduce: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group() first (e.g. under torchrun)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local_dev = acc.device if acc.device is not None else torch.device("cpu")
    dev = _comm_device(group, local_dev)
    comm = _Collectives(group, sec)
    comm.barrier()

    # This rank's part, prepared before the first collective: a failure here (out of memory) is flagged
    # in the gather, so every rank raises instead of the others waiting in the d×d all_reduce.
    broken = acc._broken is not None
    reduced = _is_reduced(acc)
    failure: Optional[BaseException] = None
    n_r, mu_r, m_r = 0, None, None
    k_r = getattr(acc, "_log2_scale", 0)
    if not broken and acc.n_rows:
        try:  # in the accumulator's stored units (rows z·2^k_r, always in range); rescaled below
            n_r, mu_r, m_r = acc._centered_parts(None)
            mu_r, m_r = mu_r.to(dev), m_r.to(dev)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below, re-raised here
            failure = exc
    flags = (_BROKEN if broken else 0) | (_REDUCED_FLAG if reduced else 0) | (_FAILED if failure is not None else 0)
    # 5th integer: log2 of a bound on this rank's max |z| (NO_EXP: no non-zero row), so every rank can reduce
    # in one common power-of-two scale — float64 embeddings of 1e±170 neither under- nor overflow
    e_r = getattr(acc, "_max_exp", None)
    meta = torch.tensor([acc.n_features if acc.n_features is not None else -1, acc.n_rows, acc.n_batches, flags,
                         NO_EXP if e_r is None else int(e_r)], dtype=torch.int64, device=dev)
    gathered = [torch.empty_like(meta) for _ in range(world)]
    comm.all_gather(gathered, meta)
    ds = [int(g[0]) for g in gathered]
    ns = [int(g[1]) for g in gathered]
    fl = [int(g[3]) for g in gathered]
    bad = [r for r in range(world) if fl[r] & _BROKEN]
    if bad:  # raised on every rank, so none is left waiting in the next collective
        why = f" ({acc._broken})" if broken else ""
        raise RuntimeError(f"GramAccumulator.all_reduce: the accumulator of {_ranks(bad)} "
                           f"is unusable after an earlier error{why}")
    failed = [r for r in range(world) if fl[r] & _FAILED]
    if failed:
        msg = (f"GramAccumulator.all_reduce: {_ranks(failed)} could not prepare "
               f"{'their' if len(failed) > 1 else 'its'} state for the reduction")
        if failure is not None:
            raise RuntimeError(f"{msg}: {type(failure).__name__}: {failure}") from failure
        raise RuntimeError(f"{msg} (see the log of {'those ranks' if len(failed) > 1 else 'that rank'})")
    again = [r for r in range(world) if fl[r] & _REDUCED_FLAG]
    if again:
        raise RuntimeError(f"GramAccumulator.all_reduce: the accumulator of {_ranks(again)} was already "
                           f"all-reduced (it holds the global state of every rank; reducing it again would count "
                           f"every row {world} times); call all_reduce once per accumulated state")
    known = {d for d in ds if d >= 0}
    if len(known) > 1:
        raise ValueError(_describe_mismatch(ds))
    n = sum(ns)
    if n == 0:
        raise ValueError("GramAccumulator.all_reduce: no rank has accumulated any rows")
    d = known.pop()
    from ._scale import _scale_for_exp, ldexp  # noqa: PLC0415

    exps = [int(g[4]) for g in gathered if int(g[4]) != NO_EXP]
    e_all = max(exps) if exps else None
    k = _scale_for_exp(e_all)  # common units: rows z·2^k (0 unless some rank holds extreme magnitudes)
    if n_r and k != k_r:
        mu_r, m_r = ldexp(mu_r, k - k_r), ldexp(m_r, 2 * (k - k_r))

    total = torch.zeros(d, dtype=torch.float64, device=dev)
    if n_r:
        total.copy_(mu_r * n_r)
    else:  # a rank without rows adds zeros; if it cannot even hold them, NaN tells every rank
        try:
            mu_r = torch.zeros(d, dtype=torch.float64, device=dev)
            m_r = torch.zeros(d, d, dtype=torch.float64, device=dev)
        except (RuntimeError, MemoryError) as exc:
            failure = exc
            total.fill_(float("nan"))
    comm.all_reduce(total, "the all_reduce of the row sums")
    if failure is not None or not bool(torch.isfinite(total).all()):
        msg = (f"GramAccumulator.all_reduce: a rank without rows could not allocate its {d}×{d} float64 "
               "buffer for the reduction")
        if failure is not None:
            raise RuntimeError(f"{msg} (this one, rank {rank}: {type(failure).__name__}: {failure})") from failure
        raise RuntimeError(f"{msg} (see the logs of the ranks without rows)")
    mu = total / n
    delta = mu_r - mu
    m_r = m_r + torch.outer(delta, delta) * n_r if n_r else m_r
    comm.all_reduce(m_r, "the all_reduce of the d×d scatter matrices")
    if acc.n_features is None or acc._g is None:
        acc._allocate(d, local_dev)
    acc._set_centered(n, mu.to(local_dev), m_r.to(local_dev), log2_scale=k, max_exp=e_all)
    acc.n_batches = sum(int(g[2]) for g in gathered)
    mark_reduced(acc)
    return acc
