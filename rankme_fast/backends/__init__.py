"""Backend registry: which implementation of the Gram update runs.

Each backend implements the same op (``gram_update``, see :mod:`rankme_fast.backends.torch_ref`) and
says how large its Gram buffer must be (``padded``); the pure-torch one is both the universal fallback
and the oracle in tests. ``backend="auto"`` (or unset) picks from the device, dtype, problem size and
what was built, quietly falling back: CPU tensors -> the native ``cpu`` kernel; CUDA tensors -> the
order in ``dispatch.json`` (rewritten from GPU benchmark measurements), with problems below its
``min_work`` (N·d² multiply-adds) left to torch, where a kernel launch or a Triton compile would cost
more than it saves. An explicit name — argument or the ``RANKME_FAST_BACKEND`` environment variable
— raises if that backend cannot run.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import torch

from . import cpu, cuda, torch_ref, triton_gpu

BACKENDS = {"torch": torch_ref, "cpu": cpu, "cuda": cuda, "triton": triton_gpu}
ENV_VAR = "RANKME_FAST_BACKEND"
_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


DISPATCH_PATH = Path(__file__).with_name("dispatch.json")
PRECISIONS = ("exact", "fast")


def load_dispatch(path) -> dict:
    """Read and validate a GPU preference table; every error is a ValueError naming ``path``.

    Schema: ``{"order": {"exact": {DTYPE: [BACKEND, ...]}, "fast": {...}}, "min_work": N·d² (optional,
    ≥ 0), "measured": bool (optional, default false), "source": str (optional)}`` with DTYPE one of
    float64/float32/float16/bfloat16 (float32 required: the fallback for the others) and each list a
    non-empty, duplicate-free list of backend names; other keys (``_about``…) are free. ``benchmarks/gpu_check.py --write-dispatch`` writes the
    repository's ``rankme_fast/backends/dispatch.json`` (the source tree, not an installed copy)."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the GPU dispatch table is not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: the GPU dispatch table is not UTF-8 text ({exc})") from None

    def bad(why: str):
        return ValueError(f"{path}: invalid GPU dispatch table: {why}")

    if not isinstance(table, dict):
        raise bad(f"expected a JSON object, got {type(table).__name__}")
    mw = table.get("min_work", 0)
    if isinstance(mw, bool) or not isinstance(mw, (int, float)) or not (0 <= mw < float("inf")):
        raise bad(f"'min_work' must be a finite number >= 0, got {mw!r}")
    order = table.get("order")
    if not isinstance(order, dict):
        raise bad("missing 'order' (an object {precision: {dtype: [backend, ...]}})" if order is None
                  else f"'order' must be an object, got {type(order).__name__}")
    for prec in PRECISIONS:
        if prec not in order:
            raise bad(f"'order' has no {prec!r} entry")
    for prec, per_dtype in order.items():
        if prec not in PRECISIONS:
            raise bad(f"unknown precision {prec!r} in 'order' (expected {list(PRECISIONS)})")
        if not isinstance(per_dtype, dict) or "float32" not in per_dtype:
            raise bad(f"order[{prec!r}] must be an object with at least a 'float32' entry, got {per_dtype!r}")
        for dt, names in per_dtype.items():
            where = f"order[{prec!r}][{dt!r}]"
            if dt not in _DTYPE_NAMES.values():
                raise bad(f"unknown dtype {dt!r} in order[{prec!r}] (expected {sorted(_DTYPE_NAMES.values())})")
            if not isinstance(names, list) or not names:
                raise bad(f"{where} must be a non-empty list of backend names, got {names!r}")
            unknown = [n for n in names if n not in BACKENDS]
            if unknown:
                raise bad(f"{where} names unknown backends {unknown} (expected some of {sorted(BACKENDS)})")
            if len(set(names)) != len(names):
                raise bad(f"{where} lists a backend twice: {names}")
    if not isinstance(table.setdefault("measured", False), bool):
        raise bad(f"'measured' must be true or false, got {table['measured']!r}")
    if not isinstance(table.setdefault("source", "unknown"), str):
        raise bad(f"'source' must be a string, got {table['source']!r}")
    return table


@functools.lru_cache(maxsize=1)
def dispatch_table() -> dict:
    """The GPU preference table (``dispatch.json`` next to this file), validated by :func:`load_dispatch`."""
    return load_dispatch(DISPATCH_PATH)


def _explicit(name: str, device: torch.device):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
    mod = BACKENDS[name]
    ok, why = mod.available(device)
    if not ok:
        raise RuntimeError(f"backend {name!r} was requested but cannot run on {device}: {why}")
    return mod


def gpu_order(dtype: Optional[torch.dtype], shape: Optional[tuple], precision: str = "exact") -> list:
    """Backend names to try, best first, for a CUDA tensor of ``dtype``/``shape`` (rows, cols)."""
    table = dispatch_table()
    if shape is not None:
        rows, cols = shape[-2], shape[-1]
        k, m = (rows, cols) if rows >= cols else (cols, rows)  # the Gram is min(N, d)-sized
        if k * m * m < float(table.get("min_work", 0)):
            return ["torch"]
    order = table["order"][precision if precision in table["order"] else "exact"]
    return list(order.get(_DTYPE_NAMES.get(dtype, "float32"), order["float32"]))


def select(name: Optional[str], device: torch.device, *, dtype: Optional[torch.dtype] = None,
           shape: Optional[tuple] = None, precision: str = "exact"):
    """Return the backend module for ``device``; ``name`` None/'auto' consults ``RANKME_FAST_BACKEND``."""
    if name in (None, "auto"):
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            return _explicit(env, device)
        dev = torch.device(device)
        if dev.type == "cuda":
            for cand in gpu_order(dtype, shape, precision):
                mod = BACKENDS[cand]
                if mod.available(dev)[0]:
                    return mod
            return torch_ref
        if cpu.available(dev)[0]:
            return cpu
        return torch_ref
    return _explicit(name, device)


def describe(device: torch.device = torch.device("cpu")) -> dict:
    """What each backend says about itself on ``device`` (for show_config)."""
    out = {}
    for n, mod in BACKENDS.items():
        ok, why = mod.available(device)
        out[n] = "available" + (f" ({why})" if why else "") if ok else f"unavailable: {why}"
    return out
