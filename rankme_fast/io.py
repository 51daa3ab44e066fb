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
    """One file: ``n_rows``, ``n_features``, ``dtype``; ``read(r0, r1)`` returns an owned (r1−r0, d)
    tensor (called from the prefetch thread), ``close()`` releases the file."""

    path: str
    n_rows: int
    n_features: int
    dtype: torch.dtype
    what: str = ""

    def read(self, r0: int, r1: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def done(self, r0: int, r1: int) -> None:
        """Called once the consumer has finished with the chunk of rows [r0, r1)."""

    def close(self) -> None:
        pass

    def _check_shape(self, shape) -> None:
        if len(shape) != 2:
            raise ValueError(f"{self.path}: {self.what}expected a 2-D (rows, features) array, got shape {tuple(shape)}")
        if shape[1] == 0:
            raise ValueError(f"{self.path}: {self.what}has 0 features (shape {tuple(shape)})")
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

    def _map(self, offset: int, np_dtype: np.dtype, fortran: bool, file_size: int) -> None:
        self._np_dtype = np_dtype
        self._fortran = fortran
        need = self.n_rows * self.n_features * np_dtype.itemsize
        if offset + need > file_size:
            raise ValueError(f"{self.path}: truncated: header promises {self.n_rows} x {self.n_features} "
                             f"{np_dtype} ({need} bytes from offset {offset}) but the file has {file_size} bytes")
        self._offset = offset
        self._zero_copy = not fortran and np_dtype.byteorder in ("=", "|", "<" if np.little_endian else ">")
        self._mm = None
        self._arr = None
        if need:
            # ACCESS_COPY (MAP_PRIVATE) gives a writable view that torch.from_numpy accepts without a
            # warning; nothing is ever written, so the pages stay shared with the page cache.
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)
            # frombuffer holds an export of the mapping, so it cannot be unmapped while any chunk view
            # is alive (close() then leaves it to the garbage collector).
            self._arr = np.frombuffer(self._mm, dtype=np_dtype, count=self.n_rows * self.n_features,
                                      offset=offset).reshape((self.n_rows, self.n_features),
                                                             order="F" if fortran else "C")
            if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                self._mm.madvise(mmap.MADV_SEQUENTIAL)  # larger readahead on page faults

    def _advise(self, advice_name: str, r0: int, r1: int) -> None:
        """madvise the mapped pages of rows [r0, r1): MADV_WILLNEED starts asynchronous reads of the
        whole chunk; MADV_DONTNEED drops consumed pages from this process (they stay in the page
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
        for a, b in spans:
            a = a // PAGE * PAGE
            b = min(-(-b // PAGE) * PAGE, len(self._mm))
            if b > a:
                self._mm.madvise(advice, a, b - a)

    def read(self, r0: int, r1: int) -> torch.Tensor:
        if self._zero_copy:
            # The Gram kernel reads the mapping directly; this (prefetch) thread only makes sure the
            # pages are resident, so the kernel never waits for the disk and no copy is made.
            self._advise("MADV_WILLNEED", r0, r1)
            row_bytes = self.n_features * self._np_dtype.itemsize
            a = self._offset + r0 * row_bytes
            np.frombuffer(self._mm, dtype=np.uint8, count=(r1 - r0) * row_bytes, offset=a)[::PAGE].max()
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

    def close(self) -> None:
        self._arr = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a chunk is still alive somewhere: unmapped when the last one dies
                pass
            self._mm = None
        self._fh.close()


class NpyReader(_MappedReader):
    def __init__(self, path: str):
        self.path = path
        self._fh = open(path, "rb")
        try:
            size = os.fstat(self._fh.fileno()).st_size
            try:
                version = np.lib.format.read_magic(self._fh)
            except ValueError as exc:
                raise ValueError(f"{path}: not a .npy file or corrupt header ({exc})") from None
            try:
                if version == (1, 0):
                    shape, fortran, dt = np.lib.format.read_array_header_1_0(self._fh)
                elif version == (2, 0):
                    shape, fortran, dt = np.lib.format.read_array_header_2_0(self._fh)
                else:
                    shape, fortran, dt = np.lib.format._read_array_header(self._fh, version)  # noqa: SLF001
            except (ValueError, SyntaxError, EOFError) as exc:
                raise ValueError(f"{path}: corrupt .npy header ({exc})") from None
            self.dtype = _float_dtype_or_raise(path, dt)
            self._check_shape(shape)
            self._map(self._fh.tell(), dt, bool(fortran), size)
        except BaseException:
            self._fh.close()
            raise


class SafetensorsReader(_MappedReader):
    def __init__(self, path: str, key: Optional[str] = None):
        self.path = path
        self._fh = open(path, "rb")
        try:
            size = os.fstat(self._fh.fileno()).st_size
            head = self._fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a .safetensors file (only {size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(size - 8, 100 << 20):
                raise ValueError(f"{path}: corrupt or truncated .safetensors file (header length {hlen} bytes, "
                                 f"file {size} bytes)")
            try:
                header = json.loads(self._fh.read(hlen).decode("utf-8"))
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
            self._map(8 + hlen + b, np_dt, False, size)
            self.key = name
        except BaseException:
            self._fh.close()
            raise

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
        import pickle
        import zipfile

        self.path = path
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
            t = tensors[name]
        elif isinstance(obj, torch.Tensor):
            if key is not None:
                raise ValueError(f"{path}: holds a single tensor, key={key!r} does not apply")
            t = obj
        else:
            raise ValueError(f"{path}: holds a {type(obj).__name__}; expected a tensor or a dict of tensors")
        if t.is_complex() or not t.is_floating_point() or t.dtype not in (torch.float64, torch.float32,
                                                                             torch.float16, torch.bfloat16):
            raise TypeError(f"{path}: {self.what}has dtype {t.dtype}; use float16/32/64 or bfloat16")
        self.dtype = t.dtype
        self._check_shape(t.shape)
        self._t = t

    def read(self, r0: int, r1: int) -> torch.Tensor:
        return self._t[r0:r1].clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._t = None


class Hdf5Reader(Reader):
    def __init__(self, path: str, key: Optional[str] = None):
        try:
            import h5py
        except ImportError:
            raise ValueError(f"{path}: reading HDF5 needs h5py (pip install 'rankme_fast[hdf5]')") from None
        self.path = path
        try:
            self._f = h5py.File(path, "r")
        except OSError as exc:
            raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
        try:
            sets = {}
            self._f.visititems(lambda n, o: sets.__setitem__(n, o) if isinstance(o, h5py.Dataset) else None)
            name = _pick_from_mapping(path, sets, key, "dataset")
            self._ds = sets[name]
            self.what = f"dataset {name!r} "
            self.dtype = _float_dtype_or_raise(path, self._ds.dtype, self.what)
            self._check_shape(self._ds.shape)
        except BaseException:
            self._f.close()
            raise

    def read(self, r0: int, r1: int) -> torch.Tensor:
        try:
            a = self._ds[r0:r1]
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.path}: {self.what}rows {r0}..{r1} unreadable ({exc})") from None
        return torch.from_numpy(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False)))

    def close(self) -> None:
        self._f.close()


class ZarrReader(Reader):
    def __init__(self, path: str, key: Optional[str] = None):
        try:
            import zarr
        except ImportError:
            raise ValueError(f"{path}: reading Zarr needs zarr (pip install 'rankme_fast[zarr]')") from None
        self.path = path
        try:
            obj = zarr.open(path, mode="r")
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
            raise ValueError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from None
        if hasattr(obj, "shape"):
            if key is not None:
                raise ValueError(f"{path}: is a single Zarr array, key={key!r} does not apply")
            arr = obj
        else:
            arrays = dict(obj.arrays()) if hasattr(obj, "arrays") else {}
            name = _pick_from_mapping(path, arrays, key, "array")
            self.what = f"array {name!r} "
            arr = arrays[name]
        self._arr = arr
        self.dtype = _float_dtype_or_raise(path, np.dtype(arr.dtype), self.what)
        self._check_shape(arr.shape)

    def read(self, r0: int, r1: int) -> torch.Tensor:
        try:
            a = np.asarray(self._arr[r0:r1])
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{self.path}: {self.what}rows {r0}..{r1} unreadable ({type(exc).__name__}: {exc})") from None
        return torch.from_numpy(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("="), copy=False)))


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
    except PermissionError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
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
    finally:
        stop.set()
        th.join()
