"""Streaming readers for embedding files larger than memory, and the prefetching chunk iterator.

Formats (each file holds one 2-D (N, d) float matrix; float16/32/64, bfloat16 where the format has it):

``.npy``           memory-mapped; header parsed with ``allow_pickle`` never set (object arrays refused).
``.safetensors``   memory-mapped; header parsed here (8-byte length, JSON), so bfloat16 needs no extra
                   package; ``key`` picks the tensor when the file holds several 2-D float tensors.
``.pt`` / ``.pth`` ``torch.load(weights_only=True, mmap=True)``: a tensor or a dict of tensors (``key``).
``.h5`` / ``.hdf5`` with the ``h5py`` extra; ``.zarr`` (a directory store) with the ``zarr`` extra.

A *source* is a path, a directory of shards, a glob pattern, or a list of those; shards are read in
natural order (``part_2`` before ``part_10``) and must agree on d and dtype. Every error names the file.

Memory: chunks are copied out of the mapping by a prefetch thread (so disk reads overlap the Gram
kernel) and the consumed pages are released with ``madvise(MADV_DONTNEED)``; resident memory stays at a
few chunks plus the d×d state however large the file. ``.pt`` pages are mapped by torch and released by
the OS under memory pressure only.
"""
from __future__ import annotations

import ast
import glob as _glob
import json
import math
import mmap
import os
import queue
import re
import struct
import threading
import warnings
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

NPY_EXT = (".npy",)
SAFETENSORS_EXT = (".safetensors",)
PT_EXT = (".pt", ".pth")
HDF5_EXT = (".h5", ".hdf5")
ZARR_EXT = (".zarr",)
SUPPORTED_EXT = NPY_EXT + SAFETENSORS_EXT + PT_EXT + HDF5_EXT + ZARR_EXT
CHUNK_BYTES = 64 << 20  # input bytes per chunk: amortises the per-call cost of the kernel (its private
# per-thread Gram copies are zeroed and reduced once per call), small enough for a bounded RSS
PAGE = mmap.PAGESIZE

_NP_FLOATS = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
              np.dtype(np.float64): torch.float64}
_ST_DTYPES = {"F64": (torch.float64, np.dtype("<f8")), "F32": (torch.float32, np.dtype("<f4")),
              "F16": (torch.float16, np.dtype("<f2")), "BF16": (torch.bfloat16, np.dtype("<u2"))}

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _is_zarr_dir(p: str) -> bool:
    return os.path.isdir(p) and (p.rstrip("/").endswith(".zarr") or any(
        os.path.exists(os.path.join(p, m)) for m in ("zarr.json", ".zarray", ".zgroup")))


class Reader:
    """One file: ``n_rows``, ``n_features``, ``dtype``; ``read(r0, r1)`` returns the (r1−r0, d) rows as a
    tensor (called from the prefetch thread). Headers are validated when the reader is created, then
    the file is closed again: files are (re)opened on first ``read`` and closed by ``close()``, so a
    source of thousands of shards holds only the one or two being read open."""

    path: str
    n_rows: int
    n_features: int
    dtype: torch.dtype
    what: str = ""
    _is_open: bool = False

    def read(self, r0: int, r1: int) -> torch.Tensor:
        if not self._is_open:
            self._open()
            self._is_open = True
        return self._read(r0, r1)

    def _open(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, r0: int, r1: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def done(self, r0: int, r1: int) -> None:
        """Called once the consumer has finished with the chunk of rows [r0, r1)."""

    def close(self) -> None:
        self._is_open = False
        self._release()

    def _release(self) -> None:
        pass

    def _check_shape(self, shape) -> None:
        shape = tuple(shape)
        if len(shape) != 2:
            raise ValueError(f"{self.path}: {self.what}expected a 2-D (rows, features) array, got shape {shape}")
        if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0 for v in shape):
            raise ValueError(f"{self.path}: {self.what}corrupt header: shape {shape} must hold non-negative integers")
        if shape[1] == 0:
            raise ValueError(f"{self.path}: {self.what}has 0 features (shape {shape})")
        self.n_rows, self.n_features = int(shape[0]), int(shape[1])


def _float_dtype_or_raise(path: str, dt: np.dtype, what: str = "") -> torch.dtype:
    if dt.hasobject:
        raise ValueError(f"{path}: {what}holds pickled Python objects (dtype {dt}); refusing to unpickle")
    nat = dt.newbyteorder("=") if dt.byteorder not in ("=", "|") else dt
    if nat.kind == "f" and nat in _NP_FLOATS:
        return _NP_FLOATS[nat]
    if dt.kind == "c":
        raise TypeError(f"{path}: {what}complex dtype {dt} is not accepted; store the real embeddings")
    if dt.kind in "iub":
        raise TypeError(f"{path}: {what}integer/bool dtype {dt} is not accepted; store floats so the scale is explicit")
    raise TypeError(f"{path}: {what}unsupported dtype {dt}; use float16, float32, float64 (or bfloat16 in .safetensors)")


class _MappedReader(Reader):
    """Shared machinery of the formats whose payload is a plain array at a byte offset of the file."""

    _mm = None
    _arr = None

    def _layout(self, offset: int, np_dtype: np.dtype, fortran: bool, file_size: int) -> None:
        self._np_dtype = np_dtype
        self._fortran = fortran
        need = self.n_rows * self.n_features * np_dtype.itemsize
        if offset + need > file_size:
            raise ValueError(f"{self.path}: truncated: header promises {self.n_rows} x {self.n_features} "
                             f"{np_dtype} ({need} bytes from offset {offset}) but the file has {file_size} bytes")
        self._offset = offset
        self._need = need
        self._zero_copy = not fortran and np_dtype.byteorder in ("=", "|", "<" if np.little_endian else ">")

    def _open(self) -> None:
        if not self._need:
            return
        with open(self.path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < self._offset + self._need:
                raise ValueError(f"{self.path}: truncated since it was opened (now "
                                 f"{os.fstat(fh.fileno()).st_size} bytes, need {self._offset + self._need})")
            # ACCESS_COPY (MAP_PRIVATE) gives a writable view that torch.from_numpy accepts without a
            # warning; nothing is ever written, so the pages stay shared with the page cache.
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        # frombuffer holds an export of the mapping, so it cannot be unmapped while any chunk view is
        # alive (close() then leaves the unmapping to the garbage collector).
        self._arr = np.frombuffer(self._mm, dtype=self._np_dtype, count=self.n_rows * self.n_features,
                                  offset=self._offset).reshape((self.n_rows, self.n_features),
                                                               order="F" if self._fortran else "C")
        if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            self._mm.madvise(mmap.MADV_SEQUENTIAL)  # larger readahead on page faults

    def _advise(self, advice_name: str, r0: int, r1: int) -> None:
        """madvise the mapped pages of rows [r0, r1): MADV_WILLNEED starts asynchronous reads of the
        whole chunk (range rounded outwards); MADV_DONTNEED drops consumed pages from this process
        (rounded inwards, so a page shared with the next chunk stays; dropped pages stay in the page
        cache), which keeps resident memory independent of the file size."""
        advice = getattr(mmap, advice_name, None)
        if self._mm is None or advice is None or not hasattr(self._mm, "madvise"):
            return
        isz = self._np_dtype.itemsize
        if self._fortran:
            spans = [(self._offset + (j * self.n_rows + r0) * isz, self._offset + (j * self.n_rows + r1) * isz)
                     for j in range(self.n_features)]
        else:
            spans = [(self._offset + r0 * self.n_features * isz, self._offset + r1 * self.n_features * isz)]
        inward = advice_name == "MADV_DONTNEED"
        for a, b in spans:
            if inward:
                a, b = -(-a // PAGE) * PAGE, b // PAGE * PAGE
            else:
                a, b = a // PAGE * PAGE, -(-b // PAGE) * PAGE
            b = min(b, len(self._mm))
            if b > a:
                self._mm.madvise(advice, a, b - a)

    def _read(self, r0: int, r1: int) -> torch.Tensor:
        if self._zero_copy:
            # The Gram kernel reads the mapping directly; this (prefetch) thread only makes sure the
            # pages are resident, so the kernel never waits for the disk and no copy is made.
            self._advise("MADV_WILLNEED", r0, r1)
            row_bytes = self.n_features * self._np_dtype.itemsize
            a = (self._offset + r0 * row_bytes) // PAGE * PAGE
            b = self._offset + r1 * row_bytes
            np.frombuffer(self._mm, dtype=np.uint8, count=b - a, offset=a)[::PAGE].max()  # one byte per page
            t = torch.from_numpy(self._arr[r0:r1])
        else:  # Fortran order or foreign byte order: copy (and convert) here, in the prefetch thread
            out = np.empty((r1 - r0, self.n_features), dtype=self._np_dtype.newbyteorder("="))
            out[...] = self._arr[r0:r1]
            self._advise("MADV_DONTNEED", r0, r1)
            t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def done(self, r0: int, r1: int) -> None:
        if self._zero_copy:
            self._advise("MADV_DONTNEED", r0, r1)

    def _release(self) -> None:
        self._arr = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a chunk is still alive somewhere: unmapped when the last one dies
                pass
            self._mm = None


def _read_npy_header(fh, path: str):
    try:
        version = np.lib.format.read_magic(fh)
    except ValueError as exc:
        raise ValueError(f"{path}: not a .npy file or corrupt header ({exc})") from None
    try:
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fh)
        if version == (3, 0):  # 2.0 layout with a UTF-8 header; numpy has no public reader for it
            (hlen,) = struct.unpack("<I", fh.read(4))
            d = ast.literal_eval(fh.read(hlen).decode("utf-8"))
            if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
                raise ValueError(f"header is not a dict with keys descr, fortran_order, shape: {d!r}")
            if not isinstance(d["shape"], tuple) or not isinstance(d["fortran_order"], bool):
                raise ValueError(f"bad shape or fortran_order in {d!r}")
            return d["shape"], d["fortran_order"], np.lib.format.descr_to_dtype(d["descr"])
    except (ValueError, SyntaxError, EOFError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt .npy header ({exc})") from None
    raise ValueError(f"{path}: unsupported .npy format version {version[0]}.{version[1]}")


class NpyReader(_MappedReader):
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            shape, fortran, dt = _read_npy_header(fh, path)
            self.dtype = _float_dtype_or_raise(path, dt)
            self._check_shape(shape)
            self._layout(fh.tell(), dt, bool(fortran), size)
        extra = size - self._offset - self._need
        if extra:
            warnings.warn(f"{path}: {extra} bytes after the {self.n_rows} x {self.n_features} array the header "
                          "describes are ignored (an overwritten header?)", UserWarning, stacklevel=4)


class SafetensorsReader(_MappedReader):
    def __init__(self, path: str, key: Optional[str] = None):
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a .safetensors file (only {size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(size - 8, 100 << 20):
                raise ValueError(f"{path}: corrupt or truncated .safetensors file (header length {hlen} bytes, "
                                 f"file {size} bytes)")
            try:
                header = json.loads(fh.read(hlen).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: corrupt .safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt .safetensors header (not a JSON object)")
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        name = self._pick(entries, key)
        meta = entries[name]
        try:
            st_dtype, shape, (b, e) = meta["dtype"], list(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt .safetensors entry {name!r}: {meta!r}") from None
        ints = [v for v in [b, e, *shape] if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
        if len(ints) != 2 + len(shape) or not b <= e:
            raise ValueError(f"{path}: corrupt .safetensors entry {name!r}: shape {shape} and data_offsets "
                             f"{[b, e]} must be non-negative integers with begin <= end")
        self.what = f"tensor {name!r} "
        if st_dtype not in _ST_DTYPES:
            raise TypeError(f"{path}: tensor {name!r} has dtype {st_dtype}; use F16, BF16, F32 or F64")
        self.dtype, np_dt = _ST_DTYPES[st_dtype]
        self._check_shape(shape)
        if e - b != self.n_rows * self.n_features * np_dt.itemsize:
            raise ValueError(f"{path}: corrupt .safetensors entry {name!r}: data_offsets {b}..{e} do not "
                             f"match shape {shape} of {st_dtype}")
        self._layout(8 + hlen + b, np_dt, False, size)
        self.key = name

    def _pick(self, entries: dict, key: Optional[str]) -> str:
        if key is not None:
            if key not in entries:
                raise ValueError(f"{self.path}: no tensor named {key!r}; it holds {sorted(entries)}")
            return key
        cands = [k for k, v in entries.items() if isinstance(v, dict) and len(v.get("shape", ())) == 2
                 and v.get("dtype") in _ST_DTYPES]
        if len(cands) == 1:
            return cands[0]
        if not cands:
            raise ValueError(f"{self.path}: no 2-D float tensor found (tensors: "
                             f"{ {k: (v.get('dtype'), v.get('shape')) for k, v in entries.items() if isinstance(v, dict)} })")
        raise ValueError(f"{self.path}: holds several 2-D float tensors {sorted(cands)}; choose one with key=")


def _pick_from_mapping(path: str, items: dict, key: Optional[str], kind: str):
    if key is not None:
        if key not in items:
            raise ValueError(f"{path}: no {kind} named {key!r}; it holds {sorted(items)}")
        return key
    cands = [k for k, v in items.items() if getattr(v, "ndim", None) == 2]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise ValueError(f"{path}: no 2-D {kind} found (it holds {sorted(items)})")
    raise ValueError(f"{path}: holds several 2-D {kind}s {sorted(cands)}; choose one with key=")


class PtReader(Reader):
    def __init__(self, path: str, key: Optional[str] = None):
        self.path = path
        self._key = key
        t = self._load()
        if t.is_complex() or not t.is_floating_point() or t.dtype not in (torch.float64, torch.float32,
                                                                             torch.float16, torch.bfloat16):
            raise TypeError(f"{path}: {self.what}has dtype {t.dtype}; use float16/32/64 or bfloat16")
        self.dtype = t.dtype
        self._check_shape(t.shape)

    def _load(self) -> torch.Tensor:
        import pickle
        import zipfile

        path, key = self.path, self._key
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as exc:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            why = next((ln for ln in lines if "Unsupported global" in ln or "Unsupported operand" in ln),
                       lines[0] if lines else type(exc).__name__)
            raise ValueError(f"{path}: holds pickled Python objects that weights_only loading refuses "
                             f"({why}); save plain tensors (torch.save(tensor) or a dict of tensors)") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ValueError(f"{path}: corrupt or truncated .pt file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if isinstance(obj, dict):
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            name = _pick_from_mapping(path, tensors, key, "tensor")
            self.what = f"tensor {name!r} "
            return tensors[name]
        if isinstance(obj, torch.Tensor):
            if key is not None:
                raise ValueError(f"{path}: holds a single tensor, key={key!r} does not apply")
            return obj
        raise ValueError(f"{path}: holds a {type(obj).__name__}; expected a tensor or a dict of tensors")

    def _open(self) -> None:
        t = self._load()
        if t.dtype != self.dtype or tuple(t.shape) != (self.n_rows, self.n_features):
            raise ValueError(f"{self.path}: changed since it was opened")
        self._t = t

    def _read(self, r0: int, r1: int) -> torch.Tensor:
        return self._t[r0:r1].clone(memory_format=torch.contiguous_format)

    def _release(self) -> None:
        self._t = None


def _h5py():
    try:
        import h5py
    except ImportError:
        return None
    return h5py


class Hdf5Reader(Reader):
    def __init__(self, path: str, key: Optional[str] = None):
        if _h5py() is None:
            raise ValueError(f"{path}: reading HDF5 needs h5py (pip install 'rankme_fast[hdf5]')")
        self.path = path
        f = self._file()
        try:
            sets = {}
            f.visititems(lambda n, o: sets.__setitem__(n, o) if isinstance(o, _h5py().Dataset) else None)
            self._name = _pick_from_mapping(path, sets, key, "dataset")
            ds = sets[self._name]
            self.what = f"dataset {self._name!r} "
            self.dtype = _float_dtype_or_raise(path, ds.dtype, self.what)
            self._check_shape(ds.shape)
        finally:
            f.close()

    def _file(self):
        try:
            return _h5py().File(self.path, "r")
        except OSError as exc:
            raise ValueError(f"{self.path}: not a readable HDF5 file ({exc})") from None

    def _open(self) -> None:
        self._f = self._file()
        self._ds = self._f[self._name]

    def _read(self, r0: int, r1: int) -> torch.Tensor:
        try:
            a = self._ds[r0:r1]
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.path}: {self.what}rows {r0}..{r1} unreadable ({exc})") from None
        return torch.from_numpy(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False)))

    def _release(self) -> None:
        f = getattr(self, "_f", None)
        self._f = self._ds = None
        if f is not None:
            f.close()


def _zarr_arrays(group, prefix: str = "") -> dict:
    """Every array below a Zarr group, by its path (recursive; zarr 2 and 3)."""
    out = {}
    for name, arr in group.arrays():
        out[prefix + name] = arr
    for name, sub in group.groups():
        out.update(_zarr_arrays(sub, prefix + name + "/"))
    return out


class ZarrReader(Reader):
    def __init__(self, path: str, key: Optional[str] = None):
        try:
            import zarr  # noqa: F401
        except ImportError:
            raise ValueError(f"{path}: reading Zarr needs zarr (pip install 'rankme_fast[zarr]')") from None
        self.path = path
        self._key = key
        arr = self._array()
        self.dtype = _float_dtype_or_raise(path, np.dtype(arr.dtype), self.what)
        self._check_shape(arr.shape)

    def _array(self):
        import zarr

        try:
            obj = zarr.open(self.path, mode="r")
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
            raise ValueError(f"{self.path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from None
        if hasattr(obj, "shape"):
            if self._key is not None:
                raise ValueError(f"{self.path}: is a single Zarr array, key={self._key!r} does not apply")
            return obj
        arrays = _zarr_arrays(obj)
        name = _pick_from_mapping(self.path, arrays, self._key, "array")
        self.what = f"array {name!r} "
        return arrays[name]

    def _open(self) -> None:
        self._arr = self._array()

    def _read(self, r0: int, r1: int) -> torch.Tensor:
        try:
            a = np.asarray(self._arr[r0:r1])
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{self.path}: {self.what}rows {r0}..{r1} unreadable ({type(exc).__name__}: {exc})") from None
        return torch.from_numpy(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False)))

    def _release(self) -> None:
        self._arr = None


def open_reader(path: str, key: Optional[str] = None) -> Reader:
    """The reader for one file, chosen by its extension; validates the header (not the data)."""
    low = path.lower().rstrip("/")
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if low.endswith(ZARR_EXT) or _is_zarr_dir(path):
        return ZarrReader(path, key)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory")
    try:
        if low.endswith(NPY_EXT):
            if key is not None:
                raise ValueError(f"{path}: a .npy file holds one array, key={key!r} does not apply")
            return NpyReader(path)
        if low.endswith(SAFETENSORS_EXT):
            return SafetensorsReader(path, key)
        if low.endswith(PT_EXT):
            return PtReader(path, key)
        if low.endswith(HDF5_EXT):
            return Hdf5Reader(path, key)
    except OSError as exc:  # permissions, too many open files, I/O errors
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    raise ValueError(f"{path}: unsupported file type {os.path.splitext(low)[1] or '(no extension)'!r}; "
                     f"supported: {', '.join(SUPPORTED_EXT)}")


def expand(source: Source) -> List[str]:
    """Files of a source: a file, a directory of shards, a glob pattern, or a list of those."""
    if isinstance(source, (str, os.PathLike)):
        items = [source]
    elif isinstance(source, (list, tuple)):
        items = list(source)
        if not items:
            raise ValueError("no input paths given")
    else:
        raise TypeError(f"expected a path, a glob pattern or a list of paths, got {type(source).__name__}")
    files: List[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"expected a path, got {type(item).__name__}")
        p = os.fspath(item)
        if not os.path.exists(p) and any(ch in p for ch in "*?["):
            matches = sorted(_glob.glob(p), key=_natural_key)
            if not matches:
                raise ValueError(f"{p}: no files match this pattern")
            files.extend(matches)
        elif os.path.isdir(p) and not _is_zarr_dir(p):
            names = sorted((n for n in os.listdir(p) if not n.startswith(".")), key=_natural_key)
            keep = [n for n in names if n.lower().endswith(SUPPORTED_EXT)]
            if not keep:
                raise ValueError(f"{p}: directory holds no {'/'.join(SUPPORTED_EXT)} files")
            other = [n for n in names if n not in keep]
            if other:
                warnings.warn(f"{p}: ignoring {len(other)} entries that are not embedding files: "
                              f"{other[:5]}{' ...' if len(other) > 5 else ''}", UserWarning, stacklevel=3)
            files.extend(os.path.join(p, n) for n in keep)
        elif not os.path.exists(p):
            raise ValueError(f"{p}: no such file or directory")
        else:
            files.append(p)
    return files


def open_source(source: Source, key: Optional[str] = None) -> List[Reader]:
    """Open (header only) every file of ``source``; shards must agree on d and dtype."""
    readers: List[Reader] = []
    try:
        for f in expand(source):
            r = open_reader(f, key)
            readers.append(r)
            first = readers[0]
            if r.n_features != first.n_features:
                raise ValueError(f"{r.path}: has d={r.n_features} features but {first.path} has "
                                 f"d={first.n_features}; all shards must have the same d")
            if r.dtype != first.dtype:
                raise ValueError(f"{r.path}: has dtype {str(r.dtype).replace('torch.', '')} but {first.path} has "
                                 f"{str(first.dtype).replace('torch.', '')}; all shards must have the same dtype")
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def default_chunk_rows(n_features: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, CHUNK_BYTES // max(1, n_features * itemsize))


def iter_chunks(readers: Sequence[Reader], chunk_rows: int, max_rows: Optional[int] = None,
                prefetch: int = 2) -> Iterator[tuple]:
    """Yield ``(reader, r0, tensor)`` chunks of at most ``chunk_rows`` rows, in order, while a background
    thread reads up to ``prefetch`` chunks ahead. Stops after ``max_rows`` rows in total."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    plan = []
    left = math.inf if max_rows is None else max_rows
    for r in readers:
        r0 = 0
        while r0 < r.n_rows and left > 0:
            r1 = int(min(r.n_rows, r0 + chunk_rows, r0 + left))
            plan.append((r, r0, r1))
            left -= r1 - r0
            r0 = r1
    last = {}
    for r, _, r1 in plan:
        last[id(r)] = r1
    q: "queue.Queue" = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for r, r0, r1 in plan:
                if stop.is_set() or not put((r, r0, r.read(r0, r1))):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    th = threading.Thread(target=work, name="rankme_fast-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            r, r0, t = item
            n = t.shape[0]
            del item
            yield r, r0, t
            del t
            r.done(r0, r0 + n)
            if r0 + n == last[id(r)]:
                r.close()  # at most the file being consumed and the one being prefetched stay open
    finally:
        stop.set()
        th.join()
