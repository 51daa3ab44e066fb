"""Native CUDA backend (``rankme_fast._C_cuda``): the C++ fused Gram of ``csrc/cuda/gram.cu``.

The one validation layer before device pointers cross into C++ (STYLE.md 2): dtype, device, sizes and
buffer layout are checked here; torch's current stream on the tensor's device is passed in, so the
kernels order correctly with the caller's work. Exact mode = float64 tiles on DMMA for every dtype;
fast mode = bf16/fp16 tensor cores (unshifted) or 3xTF32. Imported on first use; failures cached.
"""
from __future__ import annotations

from typing import Optional

import torch

NAME = "cuda"
TILE = 64
_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_module = None
_error: Optional[BaseException] = None


def load():
    global _module, _error
    if _module is None and _error is None:
        try:
            from .. import _C_cuda  # noqa: PLC0415 - lazy by design
            _module = _C_cuda
        except ImportError as exc:
            _error = exc
    return _module


def available(device: torch.device):
    dev = torch.device(device)
    if dev.type != "cuda":
        return False, f"the CUDA kernels cannot read {dev.type} memory"
    if load() is None:
        return False, f"extension rankme_fast._C_cuda not built/importable ({_error})"
    if not torch.cuda.is_available() or _module.device_count() < 1:
        return False, "no CUDA device visible to the CUDA runtime"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return False, f"the kernels are built for sm_80/sm_90 (DMMA, bf16 wmma); this GPU is sm_{major}{minor}"
    return True, ""


def padded(n: int) -> int:
    return (n + TILE - 1) // TILE * TILE


def _ptr(t: Optional[torch.Tensor], n: int, dev: torch.device, what: str) -> int:
    if t is None:
        return 0
    if t.dtype != torch.float64 or t.device != dev or t.ndim != 1 or t.shape[0] != n or not t.is_contiguous():
        raise ValueError(f"{what}: need a contiguous float64 vector of length {n} on {dev}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


def gram_update(
    x: torch.Tensor,
    gram: torch.Tensor,
    *,
    col_sum: Optional[torch.Tensor] = None,
    row_shift: Optional[torch.Tensor] = None,
    col_shift: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,  # noqa: ARG001 - uniform signature
    precision: str = "exact",
    scale: float = 1.0,
) -> None:
    """``gram += VᵀV`` (upper tiles), ``gram`` (padded(C), padded(C)) contiguous float64 on x's GPU."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"CUDA backend unavailable: {_error}")
    if x.ndim != 2:
        raise ValueError(f"gram_update expects a 2-D tensor, got shape {tuple(x.shape)}")
    if x.device.type != "cuda":
        raise ValueError(f"CUDA backend got a tensor on {x.device}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"CUDA backend does not support dtype {x.dtype}")
    if precision not in ("exact", "fast"):
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    rows, cols = x.shape
    p = padded(cols)
    if (gram.dtype != torch.float64 or gram.device != x.device or tuple(gram.shape) != (p, p)
            or not gram.is_contiguous()):
        raise ValueError(f"gram buffer must be contiguous float64 of shape ({p}, {p}) on {x.device}, "
                         f"got {gram.dtype} {tuple(gram.shape)} on {gram.device}")
    if rows == 0:
        return
    dev = x.device
    nt = p // TILE
    iu = torch.triu_indices(nt, nt, device=dev).to(torch.int32)
    ti, tj = iu[0].contiguous(), iu[1].contiguous()
    n_tiles = ti.numel()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    block = 16 if precision == "exact" else 32
    splits = max(1, min(-(-4 * sms // n_tiles), -(-rows // (block * 64))))
    per = -(-rows // splits)
    splits = -(-rows // per)
    ws = torch.empty(splits * n_tiles * TILE * TILE, dtype=torch.float64, device=dev)
    cws = torch.empty(splits * cols, dtype=torch.float64, device=dev) if col_sum is not None else None
    with torch.cuda.device(dev):  # the launch must target x's GPU, whatever the current device is
        mod.gram_update(
            x.data_ptr(), _DTYPE_CODES[x.dtype], rows, cols, x.stride(0), x.stride(1),
            _ptr(row_shift, rows, dev, "row_shift"), _ptr(col_shift, cols, dev, "col_shift"),
            gram.data_ptr(), p, _ptr(col_sum, cols, dev, "col_sum"), ti.data_ptr(), tj.data_ptr(), n_tiles,
            splits, per, ws.data_ptr(), 0 if cws is None else cws.data_ptr(), 0 if precision == "exact" else 1,
            float(scale), torch.cuda.current_stream(dev).cuda_stream,
        )
