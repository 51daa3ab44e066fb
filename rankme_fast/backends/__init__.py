"""Backend registry: which implementation of the Gram update runs.

Each backend implements the same op (``gram_update``, see :mod:`rankme_fast.backends.torch_ref`); the
pure-torch one is both the universal fallback and the oracle in tests. ``backend="auto"`` (or unset)
picks from the device and what was built, quietly falling back; an explicit name — argument or the
``RANKME_FAST_BACKEND`` environment variable — raises if that backend cannot run.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import cpu, torch_ref

BACKENDS = {"torch": torch_ref, "cpu": cpu}
ENV_VAR = "RANKME_FAST_BACKEND"


def _explicit(name: str, device: torch.device):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
    mod = BACKENDS[name]
    ok, why = mod.available(device)
    if not ok:
        raise RuntimeError(f"backend {name!r} was requested but cannot run on {device}: {why}")
    return mod


def select(name: Optional[str], device: torch.device):
    """Return the backend module for ``device``; ``name`` None/'auto' consults ``RANKME_FAST_BACKEND``."""
    if name in (None, "auto"):
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            return _explicit(env, device)
        if cpu.available(device)[0]:
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
