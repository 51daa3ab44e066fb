"""Native CPU backend (``rankme_fast._C``): float64 SYRK with the upcast fused into packing.

This module is the one validation layer between Python and the kernel (STYLE.md 2): it checks
dtype, device, sizes and buffer layout, then hands raw pointers and element strides to C++.
The extension is imported on first use only; a failed import is cached and reported.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

NAME = "cpu"
PANEL = 8
_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_module = None
_error: Optional[BaseException] = None


def load():
    """Import ``rankme_fast._C`` once; return it or None (the error stays in ``load_error()``)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            from .. import _C  # noqa: PLC0415 - lazy by design
            _module = _C
        except ImportError as exc:
            _error = exc
    return _module


def load_error() -> Optional[BaseException]:
    load()
    return _error


def available(device: torch.device):
    if torch.device(device).type != "cpu":
        return False, f"the native CPU kernel cannot read {torch.device(device).type} memory"
    if load() is None:
        return False, f"extension rankme_fast._C not importable ({_error})"
    return True, f"isa={_module.gram_isa()}"


def padded(n: int) -> int:
    return (n + PANEL - 1) // PANEL * PANEL


def max_threads() -> int:
    """The most kernel threads one call may ask for: 4 per CPU, at least 256 (each thread costs a stack
    and, for small d, a private d×d float64 buffer; more than this is a typo, not a tuning)."""
    return max(256, 4 * (os.cpu_count() or 1))


def check_threads(n, what: str = "num_threads") -> int:
    """``n`` as a thread count in [1, max_threads()]: TypeError for a non-int (bool and str included),
    ValueError out of range — never a silent default (0 and −1 are not "auto": pass None)."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            import numpy as np
            ok = isinstance(n, np.integer)
        except ImportError:  # pragma: no cover - numpy is a dependency
            ok = False
        if not ok:
            raise TypeError(f"{what} must be a positive int or None, got {type(n).__name__} {n!r}")
        n = int(n)
    if not 1 <= n <= max_threads():
        raise ValueError(f"{what} must be between 1 and {max_threads()} (4 per CPU, at least 256), got {n}")
    return n


def default_threads() -> int:
    """``RANKME_FAST_NUM_THREADS`` if set (validated like ``num_threads``), else torch's thread count."""
    env = os.environ.get("RANKME_FAST_NUM_THREADS")
    if env is not None and env.strip():
        try:
            n = int(env)
        except ValueError:  # reported below, with the text as given
            n = 0
        if n < 1:
            raise ValueError(f"RANKME_FAST_NUM_THREADS must be a positive integer, got {env!r}")
        return check_threads(n, "RANKME_FAST_NUM_THREADS")
    return min(max(1, torch.get_num_threads()), max_threads())


def threads(num_threads) -> int:
    """The kernel's thread count: ``num_threads`` validated, or the default when it is None."""
    return default_threads() if num_threads is None else check_threads(num_threads)


def _vec(t: Optional[torch.Tensor], n: int, what: str) -> int:
    if t is None:
        return 0
    if t.dtype != torch.float64 or t.device.type != "cpu" or t.ndim != 1 or t.shape[0] != n or not t.is_contiguous():
        raise ValueError(f"{what}: need a contiguous float64 CPU vector of length {n}, got {t.dtype} {tuple(t.shape)}")
    return t.data_ptr()


def gram_update(
    x: torch.Tensor,
    gram: torch.Tensor,
    *,
    col_sum: Optional[torch.Tensor] = None,
    row_shift: Optional[torch.Tensor] = None,
    col_shift: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,
    chunk_rows: int = 0,
) -> None:
    """``gram += Vᵀ V`` (upper triangle) for ``x`` of shape (rows, cols), any float dtype and strides.

    ``gram`` must be a contiguous float64 CPU tensor of shape (padded(cols), padded(cols)) whose
    padding is zero; ``col_sum`` (cols,) receives the column sums of V.
    """
    mod = load()
    if mod is None:
        raise RuntimeError(f"native CPU backend unavailable: {_error}")
    nt = threads(num_threads)  # validated even for an empty batch: a bad value fails on the first call
    if x.ndim != 2:
        raise ValueError(f"gram_update expects a 2-D tensor, got shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"native CPU backend got a tensor on {x.device}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"native CPU backend does not support dtype {x.dtype}")
    rows, cols = x.shape
    cp = padded(cols)
    if gram.dtype != torch.float64 or gram.device.type != "cpu" or tuple(gram.shape) != (cp, cp) or not gram.is_contiguous():
        raise ValueError(f"gram buffer must be contiguous float64 CPU of shape ({cp}, {cp}), got {gram.dtype} {tuple(gram.shape)}")
    if rows == 0:
        return
    sr, sc = x.stride()
    mod.gram_update(
        x.data_ptr(), _DTYPE_CODES[x.dtype], rows, cols, sr, sc,
        _vec(row_shift, rows, "row_shift"), _vec(col_shift, cols, "col_shift"),
        gram.data_ptr(), cp, _vec(col_sum, cols, "col_sum"),
        nt, int(chunk_rows),
    )


def _module_for(x: torch.Tensor, what: str):
    """The loaded extension, after checking that ``x`` is a 2-D CPU tensor of a supported dtype."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"native CPU backend unavailable: {_error}")
    if x.ndim != 2 or x.device.type != "cpu":
        raise ValueError(f"{what} expects a 2-D CPU tensor, got shape {tuple(x.shape)} on {x.device}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"native CPU backend does not support dtype {x.dtype}")
    return mod


def normal_apply(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    col_shift: Optional[torch.Tensor] = None,
    single_precision: bool = True,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """``Vᵀ (V W)`` with V = X − 1 col_shiftᵀ, reading X once (fused normal operator).

    Args:
        x: (N, d) float64/32/16 or bfloat16 CPU tensor, any strides.
        w: (d, k) block of vectors (any float dtype; used in float64 / float32).
        col_shift: optional (d,) float64 shift (a centred operator without forming Z − 1μᵀ).
        single_precision: float32 products and sums within blocks of ≤ 256 rows, float64 across blocks
            (relative error ~1e-7·|V|ᵀ|V||W|); False: float64 throughout.
    Returns: (d, k) float64.
    """
    mod = _module_for(x, "normal_apply")
    nt = threads(num_threads)
    rows, cols = x.shape
    if w.ndim != 2 or w.shape[0] != cols or w.shape[1] < 1 or not w.is_floating_point() or w.device.type != "cpu":
        raise ValueError(f"w must be a (d={cols}, k) float CPU tensor, got {w.dtype} {tuple(w.shape)} on {w.device}")
    w64 = w.to(torch.float64).contiguous()
    out = torch.zeros(cols, w.shape[1], dtype=torch.float64)
    if rows == 0:
        return out
    sr, sc = x.stride()
    mod.normal_apply(x.data_ptr(), _DTYPE_CODES[x.dtype], rows, cols, sr, sc, _vec(col_shift, cols, "col_shift"),
                     w64.data_ptr(), w64.shape[1], out.data_ptr(), bool(single_precision),
                     nt)
    return out


def sum_squares(x: torch.Tensor, *, col_shift: Optional[torch.Tensor] = None, num_threads: Optional[int] = None) -> float:
    """Σ_rc (x[r, c] − col_shift[c])² in float64, one pass over x (tr VᵀV); non-finite input gives a
    non-finite result."""
    mod = _module_for(x, "sum_squares")
    nt = threads(num_threads)
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return 0.0
    sr, sc = x.stride()
    return float(mod.sum_squares(x.data_ptr(), _DTYPE_CODES[x.dtype], rows, cols, sr, sc,
                                 _vec(col_shift, cols, "col_shift"), nt))
