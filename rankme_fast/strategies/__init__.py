"""Strategies: each way of obtaining a spectrum, behind one registry.

A :class:`Strategy` declares its name, whether it is exact, what it accepts (2-D / batched 3-D / a path /
devices), its options, and a :class:`Cost` estimate (flops, bytes of X read, extra memory, passes) for
an (N, d) input of a given item size on a device. :func:`rankme_fast.spectrum` validates once and runs
the one chosen here; ``method="auto"`` chooses from these estimates and ``rtol``
(:func:`choose`); ``rankme_fast.bench`` races them all. One small module per strategy:

========== ===== ============================================================================
name       exact how
========== ===== ============================================================================
svd        yes   ``torch.linalg.svdvals`` of a float64 copy (batched for (B, N, d))
gram       yes   float64-exact streaming Gram (backend-aware: native CPU, Triton/CUDA, torch) + eigvalsh
gram-fast  no    float32 Gram (+ a refinement pass below the float32 noise floor), RankMe within 1e-2
randomized no    Halko–Martinsson–Tropp top-k on the fused normal operator + exact Σσ²
lanczos    no    block Lanczos top-k to a residual tolerance + exact Σσ²
slq        no    stochastic Lanczos quadrature on the deflated operator, with an interval
========== ===== ============================================================================

The cost model is a model: flops at a nominal rate plus bytes at a nominal bandwidth per device
(``RATES``). It ranks strategies and flags defaults that would cost more than the exact route; it is not
a timing (``rankme-fast bench`` measures those).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

# nominal (flop/s, byte/s) per device: only ratios between strategies matter
RATES = {"cpu": (5e10, 1e10), "cuda": (5e13, 3e12)}
NAMES = ("svd", "gram", "gram-fast", "randomized", "lanczos", "slq")


@dataclass(frozen=True)
class Cost:
    """Estimated work of one strategy on one input."""
    flops: float
    bytes_read: float
    extra_bytes: float
    passes: int = 1

    def seconds(self, device: str = "cpu") -> float:
        f, b = RATES.get(device, RATES["cpu"])
        return self.flops / f + self.bytes_read / b


@dataclass(frozen=True)
class Strategy:
    name: str
    exact: bool
    description: str
    cost: Callable  # (n, d, itemsize, device, options) -> Cost
    run: Callable  # (t, *, center, backend, rtol, precision, **options) -> Spectrum | ApproxSpectrum
    batched: bool = False  # accepts (B, N, d)
    path: bool = False  # accepts a file / shard directory / glob (streamed)
    devices: tuple = ("cpu", "cuda")
    options: tuple = ()
    notes: tuple = field(default_factory=tuple)


_REGISTRY: dict = {}


def registry() -> dict:
    """{name: Strategy}, in the order of :data:`NAMES` (modules imported on first use)."""
    if not _REGISTRY:
        for name in NAMES:
            mod = importlib.import_module(f".{name.replace('-', '_')}", __name__)
            _REGISTRY[name] = mod.STRATEGY
    return _REGISTRY


def get(name: str) -> Strategy:
    reg = registry()
    if name not in reg:
        raise ValueError(f"unknown strategy {name!r}; choose one of {list(reg)}")
    return reg[name]


def estimate(name: str, n: int, d: int, itemsize: int = 4, device: str = "cpu", **options) -> Cost:
    return get(name).cost(n, d, itemsize, device, options)


def free_memory(device: str = "cpu") -> int:
    """Bytes free on ``device`` (RAM for the CPU), for the ¼-of-free-memory rules."""
    if device == "cuda":
        import torch  # noqa: PLC0415
        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else 0
    try:
        import psutil  # noqa: PLC0415 - optional
        return int(psutil.virtual_memory().available)
    except ImportError:
        if hasattr(os, "sysconf"):
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return 1 << 40


def choose(n: int, d: int, *, ndim: int = 2, itemsize: int = 4, device: str = "cpu", precision: str = "exact",
           rtol: Optional[float] = None) -> tuple:
    """(strategy name, reason) for ``method="auto"``.

    Exact unless the caller accepts ``rtol`` ≥ ``AUTO_SLQ_RTOL`` (1e-2, what SLQ's defaults are tuned
    for) and the exact Gram is large: min(N, d) ≥ ``AUTO_SLQ_MIN_D``, or its float64 Gram would take more
    than a quarter of the free memory, or SLQ's estimate is under half of the Gram's. Batched input goes
    to the batched SVD; ``precision="fast"`` to the float32 Gram."""
    _sp = importlib.import_module("rankme_fast.spectrum")  # the module's constants, read at call time
    if precision == "fast":
        return "gram-fast", "precision='fast'"
    if ndim == 3:
        return "svd", "batched input: one batched float64 SVD"
    if rtol is not None and rtol >= _sp.AUTO_SLQ_RTOL:
        k = min(n, d)
        gram = estimate("gram", n, d, itemsize, device)
        slq = estimate("slq", n, d, itemsize, device)
        if k >= _sp.AUTO_SLQ_MIN_D:
            return "slq", f"rtol={rtol:g} and min(N, d) = {k} ≥ {_sp.AUTO_SLQ_MIN_D}"
        if gram.extra_bytes > free_memory(device) // 4:
            return "slq", f"rtol={rtol:g} and the float64 Gram ({gram.extra_bytes / 2**30:.1f} GiB) > ¼ of free memory"
        if slq.seconds(device) < 0.5 * gram.seconds(device):
            return "slq", (f"rtol={rtol:g} and SLQ's estimate ({slq.seconds(device):.3g} s) < half the exact "
                           f"Gram's ({gram.seconds(device):.3g} s)")
    return "gram", "exact float64 Gram"
