"""Thread count for the small dense CPU steps (eigensolves, QR, SVD of Gram-sized matrices).

Why: torch's CPU LAPACK is MKL on a GNU OpenMP team whose barriers spin. When another process holds a
core, a team member is descheduled and every barrier of the blocked reduction (``sytrd`` in ``syevd``,
``geqrf``, ``gebrd``: one barrier per panel) waits a whole scheduler slice for it; a 512×512 float64
``eigvalsh`` measured 21 ms quiet and 36 ms – 7.0 s with both cores busy (issue 14). One thread has no
barrier to miss, and for these sizes it is also as fast or faster quiet (``sytrd`` is bandwidth-bound
BLAS-2), so the policy is::

    threads = 1                                     if work ≤ SMALL_WORK  (work ≈ batch · m · k²)
    threads = clamp(cpus − other_runnable, 1, T)   otherwise             (T = torch's own count)

``other_runnable`` is read from ``/proc/loadavg`` (runnable tasks now, minus this one): an instantaneous,
cheap sample, unlike the 1-minute load average, which lags a new load by a minute. Override with
``RANKME_FAST_LINALG_THREADS``: an integer forces that count (capped at T), ``torch`` leaves torch's
setting alone.

Thread safety: ``torch.set_num_threads`` acts on the calling thread's OpenMP ICV and MKL's
thread-local count (``mkl_set_num_threads_local``), so each thread saves and restores its own value and
no lock is held around the solver (several Python threads can be inside at once). Nesting in one thread
is counted: only the outermost level sets and restores. One global side effect remains: torch keeps
the last value set as the default for threads that start their first parallel op later, which is why
the scope wraps only the dense call itself and restores in ``finally``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch

ENV = "RANKME_FAST_LINALG_THREADS"
# ≈ (4/3)·1024³: below this the single-threaded solve took ≤ ~100 ms and never lost to two threads in
# benchmarks/bench_load.py's probe (eigvalsh / qr / svdvals, k ≤ 1024), quiet or loaded.
SMALL_WORK = float(1 << 31)

_local = threading.local()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def other_runnable() -> int:
    """Runnable tasks on the machine right now besides the caller (``/proc/loadavg`` field 4); 0 if unknown."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def _override() -> Optional[str]:
    v = os.environ.get(ENV, "").strip().lower()
    return v or None


def dense_threads(work: float, default: Optional[int] = None) -> int:
    """Threads for a dense step of ``work`` ≈ batch·m·k² flops (policy in the module docstring);
    ``default`` is the caller's torch thread count (``torch.get_num_threads()`` when None)."""
    top = torch.get_num_threads() if default is None else default
    ov = _override()
    if ov == "torch":
        return top
    if ov is not None:
        try:
            return max(1, min(top, int(ov)))
        except ValueError:
            raise ValueError(f"{ENV} must be an integer or 'torch', got {ov!r}") from None
    if top <= 1 or work <= SMALL_WORK:
        return 1
    return max(1, min(top, _cpus() - other_runnable()))


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)`` in this thread (outermost level only), restoring
    the thread's previous count on exit, exceptions included."""
    depth = getattr(_local, "depth", 0)
    if depth:
        _local.depth = depth + 1
        try:
            yield
        finally:
            _local.depth -= 1
        return
    before = torch.get_num_threads()
    changed = n != before
    _local.depth = 1
    try:
        if changed:
            torch.set_num_threads(n)
        yield
    finally:
        _local.depth = 0
        if changed:
            torch.set_num_threads(before)


def _work(shape) -> float:
    if len(shape) < 2:
        return float(shape[0]) if shape else 1.0
    m, k = max(shape[-2], shape[-1]), min(shape[-2], shape[-1])
    batch = 1
    for s in shape[:-2]:
        batch *= s
    return float(batch) * m * k * k


def dense_step(x: torch.Tensor):
    """Scope for a dense LAPACK-style step on ``x`` ((…, m, k)): the policy's thread count on CPU,
    nothing on other devices (their solvers do not use the CPU team)."""
    if x.device.type != "cpu":
        return contextlib.nullcontext()
    return limit_threads(dense_threads(_work(tuple(x.shape))))
