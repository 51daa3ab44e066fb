"""Validation layer: anything array-like -> a checked 2-D/3-D torch tensor.

Every public entry point funnels its data through :func:`as_tensor`, so the rules of DESIGN §6 live in
one place: wrong ndim, empty, complex, non-numeric, integer, masked and non-finite input raise a
``TypeError`` or ``ValueError`` that names the problem, the shape and the dtype.  Nothing is copied unless
the source cannot be viewed by torch (NumPy arrays with negative strides or non-native byte order, e.g.
big-endian ``>f8`` read from a file, Python lists).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    return f"{type(x).__name__} of shape {tuple(shape) if shape is not None else '?'} and dtype {dtype}"


def to_torch(x: Any, *, name: str = "x") -> torch.Tensor:
    """Zero-copy view of ``x`` as a torch tensor (torch, NumPy, ``__dlpack__`` objects, array-likes).

    Copies only what torch cannot view: NumPy arrays with negative strides, and non-native byte order
    (big-endian ``>f4``/``>f8`` on x86/ARM) — converted to the native order with ``.astype``, a full copy
    of the array. NumPy masked arrays are refused (their mask would be ignored)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: NumPy masked arrays are not accepted (got a {_describe(x)} with "
                        f"{int(np.ma.count_masked(x))} masked values): the mask would be silently ignored; "
                        "pass x.filled(value) to fill them, or keep the complete rows with "
                        "x.data[~np.ma.getmaskarray(x).any(axis=1)]")
    elif isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: object arrays are not accepted (got {_describe(x)}); pass a float array")
        if x.dtype.kind not in "fiubc":
            raise TypeError(f"{name}: non-numeric dtype {x.dtype} is not accepted; pass a float array")
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))  # a copy: torch only views native byte order
        if any(s < 0 for s in x.strides):
            x = np.ascontiguousarray(x)  # torch cannot view negative strides
        t = torch.from_numpy(x)
    elif hasattr(x, "__dlpack__"):
        try:
            t = torch.from_dlpack(x)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise TypeError(f"{name}: could not import {_describe(x)} through DLPack: {exc}") from exc
    elif isinstance(x, (list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as exc:
            raise ValueError(f"{name}: ragged or malformed nested sequence: {exc}") from exc
        if arr.dtype.kind not in "fiubc":
            raise TypeError(f"{name}: sequence holds non-numeric values (dtype {arr.dtype})")
        t = torch.from_numpy(arr)
    else:
        raise TypeError(
            f"{name}: expected a torch.Tensor, a NumPy array or an object with __dlpack__, got {type(x).__name__}"
        )
    if t.is_complex():
        raise TypeError(f"{name}: complex input is not accepted (dtype {t.dtype}); pass the real embeddings")
    if t.dtype == torch.bool or not t.is_floating_point():
        raise TypeError(
            f"{name}: integer/bool input is not accepted (dtype {t.dtype}); cast to a float dtype first, "
            "e.g. x.float(), so the scale is explicit"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: unsupported float dtype {t.dtype}; use one of float64/32/16 or bfloat16")
    return t


def as_tensor(x: Any, *, ndim: tuple[int, ...] = (2,), name: str = "x", check_finite: bool = False) -> torch.Tensor:
    """Validate ``x`` as an embedding matrix ``(N, d)`` (or batch ``(B, N, d)`` when 3 is in ``ndim``)."""
    t = to_torch(x, name=name)
    if t.ndim not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise ValueError(f"{name}: expected a {want} tensor (rows = samples, columns = features), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: empty input of shape {tuple(t.shape)}; need at least one row and one feature")
    if check_finite:
        check_all_finite(t, name=name)
    return t


def check_all_finite(t: torch.Tensor, *, name: str = "x", row_offset: int = 0) -> None:
    """Raise ``ValueError`` saying how many non-finite values ``t`` holds and in which row the first one is.

    Scans in row blocks so no full-size mask is ever allocated. ``row_offset`` is added to reported row
    numbers (the position of ``t`` inside a larger stream).
    """
    if t.ndim == 1:
        t = t.unsqueeze(1)
    flat = t.reshape(-1, t.shape[-1]) if t.ndim == 3 else t
    n_bad = 0
    first = None
    n_nan = 0
    step = max(1, (1 << 22) // max(1, flat.shape[1]))
    for r0 in range(0, flat.shape[0], step):
        blk = flat[r0 : r0 + step]
        bad = ~torch.isfinite(blk)
        cnt = int(bad.sum())
        if cnt:
            n_bad += cnt
            n_nan += int(torch.isnan(blk).sum())
            if first is None:
                row = int(bad.any(dim=1).nonzero()[0, 0]) + r0
                first = row
    if n_bad:
        where = f"first in row {first + row_offset}"
        if t.ndim == 3:
            where = f"first in batch item {first // t.shape[1]}, row {first % t.shape[1]}"
        raise ValueError(
            f"{name}: found {n_bad} non-finite values ({n_nan} NaN, {n_bad - n_nan} Inf) in input of shape "
            f"{tuple(t.shape)}, {where}"
        )
