"""Streaming readers for embedding files larger than memory, and the prefetching chunk iterator.

Formats (each file holds one 2-D (N, d) float matrix; float16/32/64, bfloat16 where the format has it):

``.npy``           read with ``os.preadv``; header parsed with ``allow_pickle`` never set (object arrays
                   refused), at most 10000 bytes whatever the format version (numpy's bound).
``.safetensors``   read with ``os.preadv``; header parsed here (8-byte length, JSON of at most 100 MiB,
                   duplicate keys refused, every entry checked), so bfloat16 needs no extra package;
                   ``key`` picks the tensor when the file holds several 2-D float tensors.
``.pt`` / ``.pth`` ``torch.load(weights_only=True, mmap=True)``: a tensor or a dict of tensors (``key``);
                   a contiguous tensor's rows are then read with ``os.preadv`` from its zip record.
``.h5`` / ``.hdf5`` with the ``h5py`` extra; ``.zarr`` (a directory store) with the ``zarr`` extra.

A *source* is a path, a directory of shards, a glob pattern, or a list of those; shards are read in
natural order (``part_2`` before ``part_10``) and must agree on d and dtype. Every error names the file.

Only regular files are opened (a FIFO, device or socket named ``x.npy`` would block ``open()`` forever).
Sources whose bytes cannot be the matrix are refused, not read as zeros: HDF5 chunks or Zarr chunks
never written, a contiguous HDF5 dataset with no storage, a ``.pt`` tensor whose strides repeat memory
(``x.expand(10**12, 8)``), sparse, meta and nested tensors.

Memory: ``.npy`` and ``.safetensors`` chunks are read by a prefetch thread (so disk reads overlap the
Gram kernel) with ``os.preadv`` into a few buffers reused once nothing references them; nothing is
memory-mapped, so a file truncated or rewritten while it is read is an error naming it (a short read),
never a SIGBUS, and resident memory stays at a few chunks plus the d×d state however large the file,
whoever else maps it. Chunks whose pages are not in the page cache are read with ``O_DIRECT`` (the disk
writes into the buffer; a read through the page cache costs ~1 CPU-second per GB on a small VM, CPU the
Gram kernel needs): ``RANKME_FAST_DIRECT_IO=auto`` (default), ``on`` or ``off``; file systems without
``O_DIRECT`` (tmpfs, some FUSE) are read through the cache.

``.pt``: the same for zip-format files whose tensor is row-major (contiguous, or a column slice of a
wider tensor: rows at a constant stride), column-major (a saved ``x.T``) or any other 2-D strided view
(read span by span from the storage's record): torch's mapping is dropped once the record's offset is
known; a legacy-format file is loaded into memory.
"""
from __future__ import annotations

import ast
import errno
import glob as _glob
import json
import math
import os
import queue
import re
import stat
import struct
import sys
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
NPY_MAX_HEADER = getattr(np.lib.format, "_MAX_HEADER_SIZE", 10000)  # numpy's bound on v1/v2 headers
ST_MAX_HEADER = 100_000_000  # the safetensors library's bound on its JSON header
# several candidate tensors: one message for both ways of choosing (Python argument, CLI flag)
_CHOOSE_KEY = "choose one with key= (--key on the command line)"

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


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _not_regular(path: str, mode: int) -> ValueError:
    kind = next((k for f, k in _KINDS if f(mode)), "not a regular file")
    return ValueError(f"{path}: is {kind}, not a regular file; refusing to open it (reading it could block "
                      "forever or never end)")


def _stat_regular(path: str) -> os.stat_result:
    """``os.stat`` of a path that must be a regular file (symlinks followed), before anything opens it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


def _open_regular(path: str) -> int:
    """A read-only descriptor of a regular file. O_NONBLOCK makes ``open`` of a FIFO that replaced the
    file since it was checked return at once (it has no effect on regular files); fstat then refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return fd


def _check_store_tree(root: str) -> None:
    """Every entry of a directory store (Zarr) is a regular file or a directory: a FIFO chunk would
    block the read forever, a symlink loop fails deep inside the library without naming the store."""
    seen = set()
    todo = [root]
    while todo:
        top = todo.pop()
        try:
            st = os.stat(top)
        except OSError as exc:
            raise ValueError(f"{root}: entry {top} cannot be read ({exc.strerror or exc})") from None
        if (st.st_dev, st.st_ino) in seen:
            raise ValueError(f"{root}: entry {top} is a directory seen before (a symlink loop)")
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = list(os.scandir(top))
        except OSError as exc:
            raise ValueError(f"{root}: entry {top} cannot be listed ({exc.strerror or exc})") from None
        for e in entries:
            try:
                if e.is_dir():  # follows symlinks
                    todo.append(e.path)
                    continue
                if e.is_file():
                    continue
                mode = os.stat(e.path).st_mode
            except OSError as exc:
                raise ValueError(f"{root}: entry {e.path} cannot be read ({exc.strerror or exc})") from None
            raise ValueError(f"{root}: entry {e.path} is {next((k for f, k in _KINDS if f(mode)), 'not a regular file')}"
                             ", not a regular file; refusing to read the store")


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _short(v, n: int = 120) -> str:
    """repr(v), clipped: a corrupt header may hold a list of millions of items."""
    return _clip(repr(v), n)


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


_tls = threading.local()  # the prefetch thread's buffer pool (see iter_chunks)


class _BufferPool:
    """Chunk buffers of one ``iter_chunks`` run. A buffer is handed out again only when nothing but the
    pool references it (the consumer dropped every tensor viewing it), so a chunk that is kept stays
    valid; otherwise a new buffer is made. Holding at most ``cap`` buffers bounds resident memory."""

    def __init__(self, cap: int):
        self.cap = cap
        self.bufs: List[np.ndarray] = []

    def get(self, nbytes: int) -> np.ndarray:
        for i in range(len(self.bufs)):
            # references: the list, and getrefcount's argument; any tensor/view of it adds one
            if sys.getrefcount(self.bufs[i]) == 2 and self.bufs[i].nbytes >= nbytes:
                return self.bufs[i][:nbytes]
        buf = np.empty(nbytes, dtype=np.uint8)
        if len(self.bufs) < self.cap:
            self.bufs.append(buf)
        elif self.bufs:  # replace an idle buffer that was too small, if any
            for i in range(len(self.bufs)):
                if sys.getrefcount(self.bufs[i]) == 2:
                    self.bufs[i] = buf
                    break
        return buf


DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: a multiple of the logical block size
DIRECT_MIN_BYTES = 1 << 20  # smaller reads are not worth a second descriptor
CACHED_ENOUGH = 0.9  # a chunk with at least this fraction of its pages in the page cache is copied from there


def direct_io_mode() -> str:
    """``RANKME_FAST_DIRECT_IO``: ``auto`` (default: chunks not in the page cache are read with O_DIRECT),
    ``off`` (always through the page cache) or ``on`` (O_DIRECT whenever the file system allows it)."""
    v = os.environ.get("RANKME_FAST_DIRECT_IO", "auto").strip().lower()
    table = {"auto": "auto", "": "auto", "off": "off", "0": "off", "false": "off", "no": "off",
             "on": "on", "1": "on", "true": "on", "yes": "on"}
    if v not in table:
        raise ValueError(f"RANKME_FAST_DIRECT_IO={os.environ['RANKME_FAST_DIRECT_IO']!r}: expected auto, on or off")
    return table[v]


class _Mincore:
    """Fraction of a file range that is in the page cache: mmap without touching a page (no fault, so
    no SIGBUS even if the file shrinks), ``mincore``, ``munmap``. ``None`` when it cannot tell."""

    _libc = None

    @classmethod
    def fraction(cls, fd: int, off: int, nbytes: int) -> Optional[float]:
        if cls._libc is None:
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                libc.mmap.restype = ctypes.c_void_p
                libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_long]
                libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
                cls._libc = (ctypes, libc, os.sysconf("SC_PAGE_SIZE"))
            except (OSError, AttributeError, ValueError):
                cls._libc = False
        if not cls._libc or nbytes <= 0:
            return None
        ctypes, libc, page = cls._libc
        a0 = off // page * page
        length = off + nbytes - a0
        addr = libc.mmap(None, length, 0x1, 0x1, fd, a0)  # PROT_READ, MAP_SHARED
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            npages = (length + page - 1) // page
            vec = np.zeros(npages, dtype=np.uint8)
            if libc.mincore(addr, length, vec.ctypes.data) != 0:
                return None
            return float(np.count_nonzero(vec & 1)) / npages
        finally:
            libc.munmap(addr, length)


class _RawReader(Reader):
    """Shared machinery of the formats whose payload is a plain array at a byte offset of the file.

    Rows are read with ``os.preadv`` into buffers (no mapping): a file that shrinks while it is read gives
    a short read, reported as an error naming the file, where a mapping would kill the process with
    SIGBUS. Pages read stay in the page cache only, so resident memory does not grow with the file.

    Row-major chunks that are not in the page cache are read with ``O_DIRECT`` (``direct_io_mode``):
    the disk writes straight into the buffer, which costs ~0.07 CPU-s per GB where a read through the
    page cache costs ~1 CPU-s per GB (measured on this project's 2-core VM), CPU the Gram kernel needs;
    chunks already cached are copied from the cache. ``bytes_direct`` / ``bytes_cached`` count both."""

    _fd: Optional[int] = None
    _dfd: Optional[int] = None  # the O_DIRECT descriptor; -1: the file system refused O_DIRECT
    bytes_direct: int = 0
    bytes_cached: int = 0

    def _layout(self, offset: int, np_dtype: np.dtype, fortran: bool, file_size: int) -> None:
        self._np_dtype = np_dtype
        self._fortran = fortran
        need = self.n_rows * self.n_features * np_dtype.itemsize
        if offset + need > file_size:
            raise ValueError(f"{self.path}: truncated: header promises {self.n_rows} x {self.n_features} "
                             f"{np_dtype} ({need} bytes from offset {offset}) but the file has {file_size} bytes")
        self._offset = offset
        self._need = need
        self._native = np_dtype.byteorder in ("=", "|", "<" if np.little_endian else ">")

    def _open(self) -> None:
        fd = _open_regular(self.path)
        try:
            size = os.fstat(fd).st_size
            if size < self._offset + self._need:
                raise ValueError(f"{self.path}: truncated since it was opened (now {size} bytes, need "
                                 f"{self._offset + self._need})")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._start_counts()

    def _start_counts(self) -> None:
        self._direct = direct_io_mode() if hasattr(os, "O_DIRECT") else "off"
        self.bytes_direct = self.bytes_cached = 0

    def _direct_fd(self) -> Optional[int]:
        """A second descriptor of the *same* file as ``_fd`` (reopened through /proc/self/fd, so a path
        renamed over or replaced since cannot be read instead), opened with O_DIRECT; None if refused."""
        if self._dfd is None:
            self._dfd = -1
            proc = f"/proc/self/fd/{self._fd}"
            flags = os.O_RDONLY | os.O_DIRECT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            try:
                dfd = os.open(proc if os.path.exists(proc) else self.path, flags)
            except OSError:  # EINVAL: the file system has no O_DIRECT (tmpfs, some FUSE); or gone
                return None
            a, b = os.fstat(dfd), os.fstat(self._fd)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and stat.S_ISREG(a.st_mode):
                self._dfd = dfd
            else:  # not the file being read (replaced at its path): read through the cache
                os.close(dfd)
        return self._dfd if self._dfd >= 0 else None

    def _want_direct(self, off: int, nbytes: int) -> bool:
        if self._direct == "off" or nbytes < DIRECT_MIN_BYTES or off % self._np_dtype.itemsize:
            return False
        if self._direct == "auto":
            frac = _Mincore.fraction(self._fd, off, nbytes)
            if frac is None or frac >= CACHED_ENOUGH:
                return False
        return self._direct_fd() is not None

    def _pread_direct(self, pool, off: int, nbytes: int, r0: int, r1: int) -> Optional[np.ndarray]:
        """Read bytes [off, off + nbytes) with O_DIRECT into an aligned pool buffer and return the view of
        exactly those bytes; None when the file system refuses (the caller reads through the cache)."""
        a = DIRECT_ALIGN
        a0, a1 = off // a * a, -(-(off + nbytes) // a) * a
        span = a1 - a0
        raw = pool.get(span + a) if pool is not None else np.empty(span + a, dtype=np.uint8)
        s = (-raw.ctypes.data) % a
        region = raw[s:s + span]
        view = memoryview(region).cast("B")
        pos, need = 0, off + nbytes - a0
        while pos < need:
            try:
                n = os.preadv(self._dfd, [view[pos:]], a0 + pos)
            except OSError as exc:
                if pos == 0 and exc.errno == errno.EINVAL:
                    os.close(self._dfd)  # alignment this file system does not take: never again
                    self._dfd = -1
                    return None
                raise ValueError(f"{self.path}: {self.what}rows {r0}..{r1} unreadable ({exc.strerror or exc})") from None
            if n <= 0 or (pos + n < need and n % a):  # end of file before the rows end
                size = os.fstat(self._fd).st_size
                raise ValueError(f"{self.path}: truncated while being read: rows {r0}..{r1} need bytes up to "
                                 f"{off + nbytes} but the file now has {size} bytes (rewritten or cut "
                                 "by another process?)")
            pos += n
        self.bytes_direct += nbytes
        return region[off - a0:off - a0 + nbytes]

    def _pread(self, buf: np.ndarray, off: int, r0: int, r1: int) -> None:
        view = memoryview(buf).cast("B")
        pos = 0
        while pos < len(view):
            try:
                n = os.preadv(self._fd, [view[pos:]], off + pos)
            except OSError as exc:
                raise ValueError(f"{self.path}: {self.what}rows {r0}..{r1} unreadable ({exc.strerror or exc})") from None
            if n == 0:
                size = os.fstat(self._fd).st_size
                raise ValueError(f"{self.path}: truncated while being read: rows {r0}..{r1} need bytes up to "
                                 f"{off + len(view)} but the file now has {size} bytes (rewritten or cut "
                                 "by another process?)")
            pos += n

    def _read(self, r0: int, r1: int) -> torch.Tensor:
        m, d, dt = r1 - r0, self.n_features, self._np_dtype
        nbytes = m * d * dt.itemsize
        pool = getattr(_tls, "pool", None)
        if self._fortran:  # column j of rows [r0, r1) is one contiguous span
            buf = pool.get(nbytes) if pool is not None else np.empty(nbytes, dtype=np.uint8)
            cols = buf.view(dt).reshape(d, m)
            for j in range(d):
                self._pread(cols[j], self._offset + (j * self.n_rows + r0) * dt.itemsize, r0, r1)
            out = np.empty((m, d), dtype=dt.newbyteorder("="))
            out[...] = cols.T
        elif getattr(self, "_strides", None) is not None:  # any other strided view: read the span it touches
            s0, s1 = self._strides
            span = ((m - 1) * s0 + (d - 1) * s1 + 1) * dt.itemsize
            if span > max(GENERAL_VIEW_SPAN, 8 * nbytes):
                raise ValueError(f"{self.path}: {self.what}is a view with strides {self._strides} (neither row- nor "
                                 f"column-major): reading rows {r0}..{r1} would read {span} bytes of its storage "
                                 f"for {nbytes} bytes of values; save x.contiguous() (or read fewer rows at a "
                                 "time, --chunk-rows)")
            raw = np.empty(span, dtype=np.uint8)
            self._pread(raw, self._offset + r0 * s0 * dt.itemsize, r0, r1)
            out = np.lib.stride_tricks.as_strided(raw.view(dt), shape=(m, d), strides=(s0 * dt.itemsize,
                                                                                    s1 * dt.itemsize)).copy()
            t = torch.from_numpy(out)
            return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t
        elif getattr(self, "_row_stride", d) != d:  # padded rows (a column slice): read the span, keep d of each
            rs = self._row_stride
            span = ((m - 1) * rs + d) * dt.itemsize
            raw = np.empty(span, dtype=np.uint8)
            self._pread(raw, self._offset + r0 * rs * dt.itemsize, r0, r1)
            out = np.lib.stride_tricks.as_strided(raw.view(dt), shape=(m, d), strides=(rs * dt.itemsize,
                                                                                    dt.itemsize)).copy()
            t = torch.from_numpy(out)
            return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t
        else:
            off = self._offset + r0 * d * dt.itemsize
            got = self._pread_direct(pool, off, nbytes, r0, r1) if self._want_direct(off, nbytes) else None
            if got is None:
                buf = pool.get(nbytes) if pool is not None else np.empty(nbytes, dtype=np.uint8)
                self._pread(buf, off, r0, r1)
                self.bytes_cached += nbytes
                got = buf
                if self._direct == "off" and r1 < self.n_rows and hasattr(os, "posix_fadvise"):
                    # start reading the next chunk from disk (with direct I/O on, a cold chunk is read
                    # past the cache instead)
                    os.posix_fadvise(self._fd, off + nbytes, min(nbytes, self._offset + self._need - off - nbytes),
                                     os.POSIX_FADV_WILLNEED)
            out = got.view(dt).reshape(m, d)
            if not self._native:
                out = out.byteswap(inplace=True).view(dt.newbyteorder("="))
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        dfd, self._dfd = self._dfd, None
        if fd is not None:
            os.close(fd)
        if dfd is not None and dfd >= 0:
            os.close(dfd)


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
            if hlen > NPY_MAX_HEADER:  # the bound numpy applies to v1/v2 headers, before parsing anything
                raise ValueError(f"header of {hlen} bytes exceeds the {NPY_MAX_HEADER}-byte limit")
            d = ast.literal_eval(fh.read(hlen).decode("utf-8"))
            if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
                raise ValueError(f"header is not a dict with keys descr, fortran_order, shape: {d!r}")
            if not isinstance(d["shape"], tuple) or not isinstance(d["fortran_order"], bool):
                raise ValueError(f"bad shape or fortran_order in {d!r}")
            return d["shape"], d["fortran_order"], np.lib.format.descr_to_dtype(d["descr"])
    except (ValueError, SyntaxError, EOFError, TypeError, struct.error, UnicodeDecodeError, RecursionError,
            MemoryError) as exc:
        raise ValueError(f"{path}: corrupt .npy header ({type(exc).__name__}: {_clip(str(exc), 300)})") from None
    raise ValueError(f"{path}: unsupported .npy format version {version[0]}.{version[1]}")


class NpyReader(_RawReader):
    def __init__(self, path: str):
        self.path = path
        with open(_open_regular(path), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            shape, fortran, dt = _read_npy_header(fh, path)
            self.dtype = _float_dtype_or_raise(path, dt)
            self._check_shape(shape)
            self._layout(fh.tell(), dt, bool(fortran), size)
        extra = size - self._offset - self._need
        if extra:
            warnings.warn(f"{path}: {extra} bytes after the {self.n_rows} x {self.n_features} array the header "
                          "describes are ignored (an overwritten header?)", UserWarning, stacklevel=4)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"duplicate key {_short(k)}")
        out[k] = v
    return out


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsReader(_RawReader):
    """The header is checked as the ``safetensors`` library checks it: a JSON object of at most 100 MB
    without duplicate keys, ``__metadata__`` a str -> str map, every other entry a dict with a string
    ``dtype``, a ``shape`` list and two ``data_offsets`` of non-negative integers (begin <= end)."""

    def __init__(self, path: str, key: Optional[str] = None):
        self.path = path
        with open(_open_regular(path), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a .safetensors file (only {size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(size - 8, ST_MAX_HEADER):
                raise ValueError(f"{path}: corrupt or truncated .safetensors file (header length {hlen} bytes, "
                                 f"file {size} bytes, limit {ST_MAX_HEADER})")
            try:
                # nesting is bounded by the interpreter's recursion limit (RecursionError, caught here);
                # a valid header nests 3 deep
                header = json.loads(fh.read(hlen).decode("utf-8"), object_pairs_hook=_no_duplicates)
            except _DuplicateKey as exc:
                raise ValueError(f"{path}: corrupt .safetensors header ({exc}; the safetensors library "
                                 "refuses it, and which tensor is meant is ambiguous)") from None
            except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError; an int of > 4300 digits
                raise ValueError(f"{path}: corrupt .safetensors header ({_clip(str(exc), 200)})") from None
            except RecursionError:
                raise ValueError(f"{path}: corrupt .safetensors header (JSON nested too deeply)") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt .safetensors header (not a JSON object)")
        meta_ = header.get("__metadata__", {})
        if not isinstance(meta_, dict) or not all(isinstance(v, str) for v in meta_.values()):
            raise ValueError(f"{path}: corrupt .safetensors header (__metadata__ must map strings to strings, "
                             f"got {_short(meta_)})")
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, meta in entries.items():
            self._check_entry(name, meta)
        name = self._pick(entries, key)
        meta = entries[name]
        st_dtype, shape, (b, e) = meta["dtype"], meta["shape"], meta["data_offsets"]
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

    def _check_entry(self, name: str, meta) -> None:
        bad = f"{self.path}: corrupt .safetensors entry {_short(name)}: "
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
            raise ValueError(bad + f"expected an object with dtype, shape and data_offsets, got {_short(meta)}")
        if not isinstance(meta["dtype"], str):
            raise ValueError(bad + f"dtype must be a string, got {_short(meta['dtype'])}")
        shape, offs = meta["shape"], meta["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(v) for v in shape):
            raise ValueError(bad + f"shape must be a list of non-negative integers, got {_short(shape)}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_count(v) for v in offs) or offs[0] > offs[1]:
            raise ValueError(bad + f"shape {_short(shape)} and data_offsets {_short(offs)} must be non-negative "
                             "integers with begin <= end")

    def _pick(self, entries: dict, key: Optional[str]) -> str:
        if key is not None:
            if key not in entries:
                raise ValueError(f"{self.path}: no tensor named {key!r}; it holds {sorted(entries)}")
            return key
        cands = [k for k, v in entries.items() if len(v["shape"]) == 2 and v["dtype"] in _ST_DTYPES]
        if len(cands) == 1:
            return cands[0]
        if not cands:
            raise ValueError(f"{self.path}: no 2-D float tensor found (tensors: "
                             f"{ {k: (v['dtype'], v['shape']) for k, v in entries.items()} })")
        raise ValueError(f"{self.path}: holds several 2-D float tensors {sorted(cands)}; {_CHOOSE_KEY}")


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
    raise ValueError(f"{path}: holds several 2-D {kind}s {sorted(cands)}; {_CHOOSE_KEY}")


GENERAL_VIEW_SPAN = 256 << 20  # bytes of storage one chunk of a scattered .pt view may read


def _pt_layout(t: torch.Tensor) -> Optional[str]:
    """"C" for rows of contiguous values at a constant row stride ≥ d (contiguous, or a column slice of a
    wider tensor), "F" for column-major (x.T saved), None otherwise."""
    if t.ndim != 2:
        return None
    n, d = t.shape
    if (t.stride(1) == 1 or d == 1) and (t.stride(0) >= d or n == 1):
        return "C"
    if t.stride(0) == 1 and t.stride(1) == n and n > 1:
        return "F"
    return None


class PtReader(_RawReader):
    """``torch.load(weights_only=True, mmap=True)`` parses the file and checks the tensor; the rows of a
    row-major tensor (contiguous or with padded rows), a column-major one or any other 2-D strided view (a
    zip-format file stores the storage as one uncompressed record) are then read with ``os.preadv`` from
    its offset in the file, and torch's mapping is dropped, so a file that shrinks while it is read is an
    error, not a SIGBUS. A view whose rows are scattered over its storage reads the span each chunk
    touches (refused beyond max(GENERAL_VIEW_SPAN, 8 × the chunk)). The legacy format, loaded into memory,
    is copied from the tensor torch returns."""

    _t = None

    def __init__(self, path: str, key: Optional[str] = None):
        self.path = path
        self._key = key
        t = self._load()
        self._check_tensor(t)
        if t.is_complex() or not t.is_floating_point() or t.dtype not in (torch.float64, torch.float32,
                                                                             torch.float16, torch.bfloat16):
            raise TypeError(f"{path}: {self.what}has dtype {t.dtype}; use float16/32/64 or bfloat16")
        self.dtype = t.dtype
        self._check_shape(t.shape)
        self._check_strides(t)

    def _check_tensor(self, t: torch.Tensor) -> None:
        """Only a dense CPU tensor holds the matrix: refuse nested (no shape), sparse/quantized layouts and
        meta tensors (no data was saved) before any of them reaches shape checks or slicing."""
        bad = f"{self.path}: {self.what}"
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            raise ValueError(bad + f"is a {type(t).__name__} (a tensor subclass); save a plain tensor")
        if t.is_nested:
            raise ValueError(bad + "is a nested tensor; save a dense (rows, features) tensor")
        if t.layout != torch.strided:
            raise ValueError(bad + f"has layout {t.layout}; save a dense tensor (x.to_dense())")
        if t.is_quantized:
            raise TypeError(bad + f"is quantized ({t.dtype}); save float16/32/64 or bfloat16")
        if t.device.type != "cpu":
            raise ValueError(bad + f"is on device {t.device.type!r} (a meta tensor holds no data); save the "
                             "values")

    def _check_strides(self, t: torch.Tensor) -> None:
        """A view whose strides repeat memory (``x.expand(10**12, 8)`` is saved as stride 0) describes far
        more rows than the file holds: it is not data, refuse it rather than stream it."""
        sizes, strides = list(t.shape), list(t.stride())
        dims = sorted((st, sz) for sz, st in zip(sizes, strides) if sz > 1)
        overlap = any(st == 0 for st, _ in dims) or (len(dims) == 2 and dims[1][0] < dims[0][0] * dims[0][1])
        if overlap:
            raise ValueError(f"{self.path}: {self.what}is a view with strides {tuple(strides)} for shape "
                             f"{tuple(sizes)} that repeats the same memory (e.g. x.expand(...)): its "
                             f"{t.untyped_storage().nbytes()} stored bytes are not {t.numel()} values; save "
                             "x.contiguous() or x.clone()")

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
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, KeyError,
                AttributeError, IndexError, RecursionError, MemoryError, struct.error) as exc:
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
        _stat_regular(self.path)
        t = self._load()
        self._check_tensor(t)
        if t.dtype != self.dtype or tuple(t.shape) != (self.n_rows, self.n_features):
            raise ValueError(f"{self.path}: changed since it was opened")
        self._check_strides(t)
        fd = _open_regular(self.path)
        try:
            # row-major (rows possibly padded: a column slice of a wider tensor), column-major (a saved x.T) or
            # any other 2-D strided view: all read with preadv from the storage's record in the file
            layout = _pt_layout(t)
            if layout is None and t.ndim == 2:
                layout = "S"
            use = layout is not None and t.numel() and sys.byteorder == "little"  # zip records are little-endian
            off = self._file_offset(t, os.fstat(fd)) if use else None
        except BaseException:
            os.close(fd)
            raise
        if off is None:
            os.close(fd)
            self._t = t
            return
        isz = t.element_size()
        self._fd, self._t = fd, None  # drops torch's mapping of the file
        self._start_counts()
        self._np_dtype = np.dtype(f"<u{isz}") if self.dtype == torch.bfloat16 else np.dtype(
            {torch.float16: "<f2", torch.float32: "<f4", torch.float64: "<f8"}[self.dtype])
        self._offset = off + t.storage_offset() * isz
        self._fortran, self._native = layout == "F", True
        self._row_stride = t.stride(0) if layout == "C" else self.n_features  # elements between rows
        self._strides = (t.stride(0), t.stride(1)) if layout == "S" else None
        if layout == "S":
            span = (self.n_rows - 1) * t.stride(0) + (self.n_features - 1) * t.stride(1) + 1
        else:
            span = (self.n_rows - 1) * self._row_stride + self.n_features if layout == "C" else t.numel()
        self._need = span * isz

    def _file_offset(self, t: torch.Tensor, st: os.stat_result) -> Optional[int]:
        """Offset in the file of the storage that torch mapped: the mapping holding its first byte
        (``/proc/self/maps``: same device and inode as the file opened for reading), confirmed to be the
        start of an uncompressed zip record at least as long as the storage. None where unknown."""
        ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        try:
            with open("/proc/self/maps") as fh:
                maps = fh.read().splitlines()
        except OSError:
            return None
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        off = None
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[4] != str(st.st_ino) or parts[3] != dev:
                continue
            a, b = (int(v, 16) for v in parts[0].split("-"))
            if a <= ptr < b:
                off = ptr - a + int(parts[2], 16)
                break
        if off is None:
            return None
        import zipfile

        try:
            with zipfile.ZipFile(self.path) as zf, open(self.path, "rb") as fh:
                for zi in zf.infolist():
                    if zi.compress_type != zipfile.ZIP_STORED or zi.file_size < nbytes:
                        continue
                    fh.seek(zi.header_offset)
                    h = fh.read(30)
                    if len(h) == 30 and h[:4] == b"PK\x03\x04":
                        n, m = struct.unpack("<HH", h[26:30])
                        if zi.header_offset + 30 + n + m == off:
                            return off
        except (OSError, zipfile.BadZipFile, ValueError):
            return None
        return None

    def _read(self, r0: int, r1: int) -> torch.Tensor:
        if self._fd is not None:
            return super()._read(r0, r1)
        return self._t[r0:r1].clone(memory_format=torch.contiguous_format)

    def _release(self) -> None:
        self._t = None
        super()._release()


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
            try:
                f.visititems(lambda n, o: sets.__setitem__(n, o) if isinstance(o, _h5py().Dataset) else None)
            except (RuntimeError, OSError, KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}: corrupt HDF5 file: cannot list its datasets "
                                 f"({type(exc).__name__}: {_clip(str(exc), 300)})") from None
            self._name = _pick_from_mapping(path, sets, key, "dataset")
            ds = sets[self._name]
            self.what = f"dataset {self._name!r} "
            try:
                dt, shape = ds.dtype, ds.shape
            except (RuntimeError, OSError, KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}: {self.what}corrupt header ({type(exc).__name__}: {exc})") from None
            self.dtype = _float_dtype_or_raise(path, dt, self.what)
            self._check_shape(shape)
            self._check_written(ds)
        finally:
            f.close()

    def _check_written(self, ds) -> None:
        """Rows that were never written read as the fill value; they are not data. Chunked datasets: every
        chunk must be allocated; contiguous ones: the storage must exist. (A contiguous dataset gets all
        its storage on the first write, so a partly written one cannot be told from zeros.)"""
        n, d = self.n_rows, self.n_features
        if n == 0:
            return
        try:
            if ds.is_virtual:
                return  # storage lives in other files, checked by HDF5 when read
            if ds.chunks is None:
                if ds.id.get_storage_size() == 0 and ds.id.get_offset() is None and ds.external is None:
                    raise ValueError(f"{self.path}: {self.what}rows 0..{n} were never written (no storage "
                                     "allocated); they would read as the fill value")
                return
            c0, c1 = ds.chunks
            per_row, nrb = -(-d // c1), -(-n // c0)
            want, got = nrb * per_row, ds.id.get_num_chunks()
            if got >= want:
                return
            have: dict = {}
            if hasattr(ds.id, "chunk_iter"):
                ds.id.chunk_iter(lambda info: have.__setitem__(info.chunk_offset[0] // c0,
                                                              have.get(info.chunk_offset[0] // c0, 0) + 1))
            else:  # pragma: no cover - HDF5 < 1.12.3
                for i in range(got):
                    rb = ds.id.get_chunk_info(i).chunk_offset[0] // c0
                    have[rb] = have.get(rb, 0) + 1
        except (RuntimeError, OSError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path}: {self.what}corrupt chunk index ({type(exc).__name__}: {exc})") from None
        rb = next(i for i in range(nrb) if have.get(i, 0) < per_row)
        raise ValueError(f"{self.path}: {self.what}{want - got} of its {want} chunks were never written (first "
                         f"missing: rows {rb * c0}..{min(n, (rb + 1) * c0)}); unwritten rows would read as the "
                         "fill value, not data")

    def _file(self):
        _stat_regular(self.path)
        try:
            return _h5py().File(self.path, "r")
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{self.path}: not a readable HDF5 file ({exc})") from None

    def _open(self) -> None:
        self._f = self._file()
        try:
            self._ds = self._f[self._name]
        except (KeyError, RuntimeError, OSError) as exc:
            raise ValueError(f"{self.path}: {self.what}changed since it was opened ({exc})") from None

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
        self._check_written(arr)

    def _check_written(self, arr) -> None:
        """A missing chunk reads as the fill value: refuse it (zarr 3 also skips writing a chunk that
        equals the fill value everywhere unless ``write_empty_chunks=True``). Chunk files are looked up in
        order and the search stops at the first missing one, so an empty store of 10^12 rows is refused
        at once; a complete one costs one ``stat`` per chunk (per shard for sharded arrays)."""
        if self.n_rows == 0:
            return
        enc = getattr(getattr(arr, "metadata", None), "encode_chunk_key", None)
        if enc is None:  # pragma: no cover - zarr 2: count through the library (lists every key)
            try:
                want, got = int(arr.nchunks), int(arr.nchunks_initialized)
            except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
                raise ValueError(f"{self.path}: {self.what}cannot count its chunks ({type(exc).__name__}: {exc})") from None
            if got < want:
                raise ValueError(f"{self.path}: {self.what}{want - got} of its {want} chunks were never written; "
                                 "missing chunks would read as the fill value, not data")
            return
        self._chunk_grid = (enc, getattr(arr, "shards", None) or arr.chunks,
                            os.path.join(self.path, *[p for p in str(getattr(arr, "path", "") or "").split("/") if p]))
        self._check_chunks(0, self.n_rows)

    _chunk_grid = None

    def _check_chunks(self, r0: int, r1: int) -> None:
        """Every chunk file holding rows [r0, r1) exists (checked again before each read: a chunk deleted
        meanwhile would otherwise read as fill values)."""
        if self._chunk_grid is None:
            return
        enc, (c0, c1), base = self._chunk_grid
        n_rb, n_cb = -(-self.n_rows // c0), -(-self.n_features // c1)
        for rb in range(r0 // c0, -(-r1 // c0)):
            for cb in range(n_cb):
                key = enc((rb, cb))
                if not os.path.isfile(os.path.join(base, *key.split("/"))):
                    raise ValueError(
                        f"{self.path}: {self.what}chunk {key!r} (rows {rb * c0}..{min(self.n_rows, (rb + 1) * c0)}) "
                        f"of its {n_rb * n_cb} chunks is missing (never written, or deleted); a missing chunk would "
                        "read as the fill value, not data (write it, or create the array with "
                        "write_empty_chunks=True if it is all fill value)")

    def _array(self):
        import zarr

        _check_store_tree(self.path)
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
        self._check_chunks(r0, r1)
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
        if os.path.lexists(path):
            _stat_regular(path)  # a dangling symlink or a symlink loop: says which
        raise ValueError(f"{path}: no such file or directory")
    if low.endswith(ZARR_EXT) or _is_zarr_dir(path):
        return ZarrReader(path, key)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory")
    _stat_regular(path)  # before anything opens it: open() of a FIFO blocks until a writer appears
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
            if os.path.lexists(p):
                _stat_regular(p)  # a dangling symlink or a symlink loop: says which
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
        _tls.pool = _BufferPool(cap=max(1, prefetch) + 2)  # queued + being read + being consumed
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
