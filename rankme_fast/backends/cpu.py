"""Native CPU backend (``rankme_fast._C``): float64 SYRK with the upcast fused into packing.

This module is the one validation layer between Python and the kernel (STYLE.md 2): it checks
dtype, device, sizes and buffer layout, then hands raw pointers and element strides to C++.
The extension is imported on first use only; a failed import is cached and reported.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

NAME = "cpu"
PANEL = 8
_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_module = None
_error: Optional[BaseException] = None


ISAS = ("generic", "avx2", "avx512")
ISA_ENV = "RANKME_FAST_ISA"


def forced_isa() -> Optional[str]:
    """``RANKME_FAST_ISA`` (generic | avx2 | avx512), validated; None when unset (automatic choice)."""
    v = os.environ.get(ISA_ENV, "").strip()
    if not v:
        return None
    if v.lower() not in ISAS:
        raise ValueError(f"{ISA_ENV} must be one of {', '.join(ISAS)} (or unset for the automatic choice), got {v!r}")
    return v.lower()


def load():
    """Import ``rankme_fast._C`` once; return it or None (the error stays in ``load_error()``).
    ``RANKME_FAST_ISA`` naming an instruction set this CPU (or build) lacks raises RuntimeError here,
    before any kernel runs."""
    global _module, _error
    if _module is None and _error is None:
        isa = forced_isa()
        try:
            from .. import _C  # noqa: PLC0415 - lazy by design
        except ImportError as exc:
            _error = exc
            return None
        if isa is not None:
            if os.environ.get(ISA_ENV) != isa:
                os.environ[ISA_ENV] = isa  # the C++ side compares the lower-case name
            if not _C.isa_supported(isa):
                raise RuntimeError(f"{ISA_ENV}={isa}: this CPU (or this build) cannot run the {isa} kernels; "
                                   f"choose one of {', '.join(i for i in ISAS if _C.isa_supported(i))} or unset it")
        _module = _C
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


def _batch_buffer(t: Optional[torch.Tensor], shape, what: str, *, writable: bool) -> tuple:
    """(data_ptr, strides) of an optional float64 CPU tensor of exactly ``shape``; (0, zeros) for None.
    Output buffers must be contiguous (their blocks are written by different threads)."""
    if t is None:
        return 0, (0,) * len(shape)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what} must be a CPU tensor, got one on {t.device}")
    if t.dtype != torch.float64:
        raise ValueError(f"{what} must be float64, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if writable:
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous (strides {t.stride()})")
        # the row-major strides (is_contiguous ignores the reported stride of a size-1 dim)
        st = [1] * len(shape)
        for k in range(len(shape) - 2, -1, -1):
            st[k] = st[k + 1] * max(int(shape[k + 1]), 1)
        return t.data_ptr(), tuple(st)
    return t.data_ptr(), t.stride()


def _rowgram_inputs(x, lengths, num_threads):
    """Checks of the batched row-Gram kernels' input: (module, threads, (B, n, d), lengths, lengths pointer)."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"native CPU backend unavailable: {_error}")
    nt = threads(num_threads)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must be a 3-D (B, n_max, d) tensor, got shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor for the native backend, got one on {x.device}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"x: native CPU backend does not support dtype {x.dtype}")
    B, n, d = x.shape
    len_ptr = 0
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be an int64 torch.Tensor or None, got {type(lengths).__name__}")
        if lengths.device.type != "cpu":
            raise ValueError(f"lengths must be a CPU tensor, got one on {lengths.device}")
        if lengths.dtype != torch.int64:
            raise TypeError(f"lengths must be int64, got {lengths.dtype}")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        lengths = lengths.contiguous()
        if B > 0:
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > n:
                raise ValueError(f"lengths must lie in [0, n_max={n}], got values in [{lo}, {hi}]")
        len_ptr = lengths.data_ptr()
    return mod, nt, (B, n, d), lengths, len_ptr


def row_gram_batch(
    x: torch.Tensor,
    gram: torch.Tensor,
    *,
    lengths: Optional[torch.Tensor] = None,
    row_sum: Optional[torch.Tensor] = None,
    row_shift: Optional[torch.Tensor] = None,
    col_shift: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,
    _kernel: int = 0,
    _block: int = 0,
) -> None:
    """Per-item float64 Gram of the ROWS of a batch of short-fat items, added in place.

    For item ``b`` with ``L = lengths[b]`` (``n_max`` when ``lengths`` is None) and
    ``V[i, j] = float64(x[b, i, j]) - row_shift[b, i] - col_shift[b, j]`` (i < L, all j < d)::

        gram[b, :L, :L] += V @ V.T        # both triangles, float64 accumulation
        row_sum[b, :L]  += V.sum(1)       # if row_sum is given

    Entries outside ``[:L]`` are never written and rows ``i >= L`` of ``x`` are never read (padding
    may hold NaN). The upcast is fused into the kernel: nothing is copied, for any strides of ``x``
    (the last dim contiguous is the fast path; other strides are gathered element by element and give
    bit-identical results). Threads take whole items (biggest first), so the result's bits do not
    depend on ``num_threads``; a batch smaller than the thread count runs on fewer threads.

    Args:
        x: (B, n_max, d) float64/float32/float16/bfloat16 CPU tensor, any strides.
        gram: contiguous float64 CPU tensor of shape (B, n_max, n_max), updated in place.
        lengths: optional int64 CPU tensor (B,) with 0 <= lengths[b] <= n_max (copied if not contiguous).
        row_sum: optional contiguous float64 CPU tensor (B, n_max), updated in place.
        row_shift: optional float64 CPU tensor (B, n_max), any strides (an ``expand`` is fine).
        col_shift: optional float64 CPU tensor (B, d), any strides (e.g. ``mu.expand(B, d)``).
        num_threads: kernel threads (None: the default, see ``threads()``).
        _kernel, _block: test/tuning hooks (0 = automatic; _kernel 1 = row-pair dot kernel, 2 = panel kernel).
    """
    mod, nt, (B, n, d), lengths, len_ptr = _rowgram_inputs(x, lengths, num_threads)
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    g_ptr, g_st = _batch_buffer(gram, (B, n, n), "gram", writable=True)
    rs_ptr, rs_st = _batch_buffer(row_sum, (B, n), "row_sum", writable=True)
    rsh_ptr, rsh_st = _batch_buffer(row_shift, (B, n), "row_shift", writable=False)
    csh_ptr, csh_st = _batch_buffer(col_shift, (B, d), "col_shift", writable=False)
    if isinstance(_kernel, bool) or _kernel not in (0, 1, 2):
        raise ValueError(f"_kernel must be 0, 1 or 2, got {_kernel!r}")
    if isinstance(_block, bool) or not isinstance(_block, int) or _block < 0:
        raise ValueError(f"_block must be a non-negative int, got {_block!r}")
    if B == 0 or n == 0 or d == 0:
        return
    sb, sr, sc = x.stride()
    mod.row_gram_batch(
        x.data_ptr(), _DTYPE_CODES[x.dtype], B, n, d, sb, sr, sc,
        len_ptr, rsh_ptr, rsh_st[0], rsh_st[1], csh_ptr, csh_st[0], csh_st[1],
        g_ptr, g_st[0], g_st[1], rs_ptr, rs_st[0], nt, _block, _kernel,
    )


def _check_logdet_options(scale, ridge, _kernel):
    if isinstance(_kernel, bool) or _kernel not in (0, 1, 2):
        raise ValueError(f"_kernel must be 0, 1 or 2, got {_kernel!r}")
    for what, v in (("scale", scale), ("ridge", ridge)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ValueError(f"{what} must be a finite number, got {v!r}")


def rows_contiguous(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor's rows lie one after another (what :func:`row_logdet_list` reads)."""
    return t.stride()[1] == 1 and (t.shape[0] <= 1 or t.stride()[0] == t.shape[1])


def row_logdet_batch(
    x: torch.Tensor,
    *,
    lengths: Optional[torch.Tensor] = None,
    scale: float = 0.0,
    ridge: float = 0.0,
    num_threads: Optional[int] = None,
    _kernel: int = 0,
) -> tuple:
    """The EigenScore / LLM-Check log-determinant fused into the row-Gram kernel: per item ``b`` with
    ``L = lengths[b]``, V its rows upcast to float64, ``G = V Vᵀ`` and ``r = V·1`` (as :func:`row_gram_batch`
    computes them), ``ln det(G − scale·r rᵀ + ridge·I) / L`` by a float64 Cholesky factorisation, run by the
    item's thread right after its Gram (no Gram tensor is made; ``scale = 1/d`` centres each row over its d
    features). Returns ``(out, info)``: float64 (B,) and int64 (B,) with info 0 = done, 1 = the matrix is not
    numerically positive definite (out NaN), 2 = a non-finite diagonal entry of G or entry of r (out NaN);
    an item of length 0 gives 0.

    Args:
        x: (B, n_max, d) float64/float32/float16/bfloat16 CPU tensor, any strides, d > 0.
        lengths: optional int64 CPU tensor (B,) in [0, n_max] (rows past it are never read).
        scale, ridge: finite floats.
        num_threads: kernel threads (None: the default, see ``threads()``).
        _kernel: test hook as in :func:`row_gram_batch` (0 automatic, 1 dot, 2 panel kernel).
    """
    mod, nt, (B, n, d), lengths, len_ptr = _rowgram_inputs(x, lengths, num_threads)
    _check_logdet_options(scale, ridge, _kernel)
    if d == 0:
        raise ValueError(f"x must have at least one feature (column), got shape {tuple(x.shape)}")
    out = torch.empty(B, dtype=torch.float64)
    info = torch.empty(B, dtype=torch.int64)
    if B == 0:
        return out, info
    sb, sr, sc = x.stride()
    mod.row_gram_batch(
        x.data_ptr(), _DTYPE_CODES[x.dtype], B, n, d, sb, sr, sc, len_ptr, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, nt, 0, _kernel, out.data_ptr(), info.data_ptr(), float(scale), float(ridge),
    )
    return out, info


def row_logdet_list(
    items,
    *,
    scale: float = 0.0,
    ridge: float = 0.0,
    num_threads: Optional[int] = None,
    _kernel: int = 0,
) -> tuple:
    """:func:`row_logdet_batch` of a ragged list of (n_i, d) items in one call, none copied: the kernel reads
    each item where it lies (threads take whole items, longest first). Every item must be a CPU tensor of one
    supported dtype and one d with contiguous rows (the caller converts the others). Returns ``(out, info)``
    as :func:`row_logdet_batch` does."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"native CPU backend unavailable: {_error}")
    nt = threads(num_threads)
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("items must be a non-empty list of 2-D tensors")
    t0 = items[0]
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise TypeError(f"items[{i}] must be a 2-D torch.Tensor, got {type(t).__name__}"
                            f"{' of shape ' + str(tuple(t.shape)) if isinstance(t, torch.Tensor) else ''}")
        if t.device.type != "cpu" or t.dtype != t0.dtype or t.shape[1] != t0.shape[1]:
            raise ValueError(f"items[{i}]: every item must be a CPU tensor of dtype {t0.dtype} with "
                             f"{t0.shape[1]} columns, got {t.dtype} {tuple(t.shape)} on {t.device}")
        if not rows_contiguous(t):
            raise ValueError(f"items[{i}]: rows must be contiguous (call .contiguous()), got strides {t.stride()}")
    if t0.dtype not in _DTYPE_CODES:
        raise TypeError(f"items: native CPU backend does not support dtype {t0.dtype}")
    _check_logdet_options(scale, ridge, _kernel)
    d = t0.shape[1]
    if d == 0:
        raise ValueError("items must have at least one feature (column)")
    B = len(items)
    lengths = torch.tensor([t.shape[0] for t in items], dtype=torch.int64)
    ptrs = torch.tensor([t.data_ptr() if t.shape[0] else 0 for t in items], dtype=torch.int64)
    out = torch.empty(B, dtype=torch.float64)
    info = torch.empty(B, dtype=torch.int64)
    mod.row_gram_batch(
        0, _DTYPE_CODES[t0.dtype], B, int(lengths.max()), d, 0, d, 1, lengths.data_ptr(), 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, nt, 0, _kernel, out.data_ptr(), info.data_ptr(), float(scale), float(ridge),
        item_x=ptrs.data_ptr(),
    )
    return out, info
