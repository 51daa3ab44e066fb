"""Triton backend: the fused Gram kernels of :mod:`rankme_fast.kernels.triton.gram` on CUDA tensors.

Triton is imported on first use only. Without a GPU the kernels still run under ``TRITON_INTERPRET=1``
(set before the first use), which is how the test suite checks them on CPU tensors; the automatic
choice never picks this backend for CPU tensors.

Exact mode = ``int8`` integer slicing for float32/16/bfloat16 input and ``fp64`` tiles for float64
input (override with ``RANKME_FAST_TRITON_MODE=int8|fp64`` — the benchmark compares both).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

NAME = "triton"
TILE = 128
MODE_ENV = "RANKME_FAST_TRITON_MODE"
_module = None
_error: Optional[BaseException] = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load():
    """Import the Triton kernels once; return the module or None (error kept for ``available``)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            from ..kernels.triton import gram  # noqa: PLC0415 - lazy by design
            _module = gram
        except Exception as exc:  # noqa: BLE001 - ImportError, or triton failing to find a backend
            _error = exc
    return _module


def available(device: torch.device):
    dev = torch.device(device)
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        return False, f"Triton kernels need a CUDA device (got {dev.type}; TRITON_INTERPRET=1 runs them on CPU)"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    if load() is None:
        return False, f"triton not importable ({_error})"
    return True, "interpreter" if interpreting() else ""


def padded(n: int) -> int:
    return (n + TILE - 1) // TILE * TILE


def exact_mode(dtype: torch.dtype) -> str:
    env = os.environ.get(MODE_ENV, "").strip().lower()
    if env:
        if env not in ("int8", "fp64"):
            raise ValueError(f"{MODE_ENV} must be 'int8' or 'fp64', got {env!r}")
        return env
    return "fp64" if dtype == torch.float64 else "int8"


def _vec(t: Optional[torch.Tensor], n: int, dev: torch.device, what: str) -> None:
    if t is not None and (t.dtype != torch.float64 or t.device != dev or t.ndim != 1 or t.shape[0] != n
                          or not t.is_contiguous()):
        raise ValueError(f"{what}: need a contiguous float64 vector of length {n} on {dev}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def gram_update(
    x: torch.Tensor,
    gram: torch.Tensor,
    *,
    col_sum: Optional[torch.Tensor] = None,
    row_shift: Optional[torch.Tensor] = None,
    col_shift: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,  # noqa: ARG001 - CPU-only knob, accepted for a uniform signature
    precision: str = "exact",
    scale: float = 1.0,
) -> None:
    """``gram += VᵀV`` (upper tiles) on the GPU; same contract as the other backends, with ``gram`` of
    shape (padded(C), padded(C)) contiguous float64 on ``x``'s device."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"Triton backend unavailable: {_error}")
    if x.ndim != 2:
        raise ValueError(f"gram_update expects a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"Triton backend does not support dtype {x.dtype}")
    rows, cols = x.shape
    if gram.device != x.device:
        raise ValueError(f"gram is on {gram.device} but x is on {x.device}")
    _vec(col_sum, cols, x.device, "col_sum")
    _vec(row_shift, rows, x.device, "row_shift")
    _vec(col_shift, cols, x.device, "col_shift")
    if precision not in ("exact", "fast"):
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    mode = exact_mode(x.dtype) if precision == "exact" else "fast"
    # launch on x's GPU whatever the current device is (CPU tensors: the interpreter)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        mod.gram_update(x, gram, col_sum=col_sum, row_shift=row_shift, col_shift=col_shift, mode=mode, scale=scale)


def normal_apply(x: torch.Tensor, w: torch.Tensor, *, col_shift: Optional[torch.Tensor] = None,
                 single_precision: bool = False) -> torch.Tensor:
    """Fused ``Vᵀ(V W)`` on x's GPU (float64 (d, k) result there); see :mod:`rankme_fast.kernels.triton.normal`."""
    if load() is None:
        raise RuntimeError(f"Triton backend unavailable: {_error}")
    from ..kernels.triton import normal  # noqa: PLC0415 - lazy by design

    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        return normal.normal_apply(x, w, col_shift=col_shift, mode="fp32" if single_precision else "fp64")
