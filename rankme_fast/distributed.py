"""torch.distributed reduction of :class:`~rankme_fast.gram.GramAccumulator` state (DESIGN §5).

Each rank accumulates its own shard; then, with Chan's parallel formula,

    μ = Σ_r n_r μ_r / n,        M = Σ_r [ M_r + n_r (μ_r − μ)(μ_r − μ)ᵀ ],

where M_r is rank r's centred scatter matrix. Three collectives, all in float64 except the first:
an all_gather of (d, n) per rank — so a rank with a different d is named in an error raised on *every*
rank, instead of a hang or a silently wrong sum —, an all_reduce of the d-vector n_r μ_r, and one
all_reduce of the d×d matrices. Embeddings never leave their rank. Works on any backend (gloo, NCCL:
state on CPU is moved to the current CUDA device for NCCL and back).

Under ``torchrun``::

    # torchrun --nproc-per-node 8 score.py
    import os, torch, torch.distributed as dist, rankme_fast as rf
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # (GPU runs) one GPU per rank
    dist.init_process_group()                      # NCCL on GPUs, gloo on CPUs
    acc = rf.GramAccumulator()
    for batch in my_shard_of_the_data():
        acc.update(model(batch))
    acc.all_reduce()                               # every rank now holds the global state
                                                   # (call it once: a second call would count rows twice)
    if dist.get_rank() == 0:
        print(acc.rankme(), acc.spectrum(center=True).collapse_auc())
"""
from __future__ import annotations

from collections import Counter

import torch


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


@torch.no_grad()
def all_reduce_accumulator(acc, group=None):
    """In-place global reduction of ``acc`` over ``group``; see the module docstring. Afterwards every
    rank holds the global state, so call it once (a second call would count every row world-size times)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        acc._ensure_ok()
        raise RuntimeError("GramAccumulator.all_reduce: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group() first (e.g. under torchrun)")
    world = dist.get_world_size(group)
    local_dev = acc.device if acc.device is not None else torch.device("cpu")
    dev = _comm_device(group, local_dev)

    broken = acc._broken is not None
    meta = torch.tensor([acc.n_features if acc.n_features is not None else -1, acc.n_rows, acc.n_batches,
                         int(broken)], dtype=torch.int64, device=dev)
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    ds = [int(g[0]) for g in gathered]
    ns = [int(g[1]) for g in gathered]
    bad = [r for r, g in enumerate(gathered) if int(g[3])]
    if bad:  # raised on every rank, so none is left waiting in the next collective
        why = f" ({acc._broken})" if broken else ""
        raise RuntimeError(f"GramAccumulator.all_reduce: the accumulator of rank{'s' if len(bad) > 1 else ''} "
                           f"{', '.join(map(str, bad))} is unusable after an earlier error{why}")
    known = {d for d in ds if d >= 0}
    if len(known) > 1:
        raise ValueError(_describe_mismatch(ds))
    n = sum(ns)
    if n == 0:
        raise ValueError("GramAccumulator.all_reduce: no rank has accumulated any rows")
    d = known.pop()
    if acc.n_features is None or acc._g is None:
        acc._allocate(d, local_dev)

    if acc.n_rows:
        n_r, mu_r, m_r = acc._centered_parts()
        mu_r, m_r = mu_r.to(dev), m_r.to(dev)
    else:
        n_r = 0
        mu_r = torch.zeros(d, dtype=torch.float64, device=dev)
        m_r = torch.zeros(d, d, dtype=torch.float64, device=dev)
    total = mu_r * n_r
    dist.all_reduce(total, group=group)
    mu = total / n
    delta = mu_r - mu
    m_r = m_r + torch.outer(delta, delta) * n_r if n_r else m_r
    dist.all_reduce(m_r, group=group)
    acc._set_centered(n, mu.to(local_dev), m_r.to(local_dev))
    acc.n_batches = sum(int(g[2]) for g in gathered)
    return acc
