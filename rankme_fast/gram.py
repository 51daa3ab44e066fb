"""Gram matrices of embedding matrices, exact in float64 (DESIGN §3).

``G = Vᵀ V`` with ``V = Z`` (uncentred) or ``V = Z - 1 μᵀ`` (centred), where Z is N×d. When N < d the
N×N Gram ``V Vᵀ`` is formed instead; both have the same non-zero eigenvalues σ_k².

Centring without cancellation: for N ≥ d the rows are shifted by the mean ``s`` of the first chunk while
accumulating, and the remaining offset is removed exactly at the end,
``G_c = G_s - c cᵀ / N`` with ``c = Σ_r (z_r - s)`` (Chan et al.), so G is never formed from
uncentred data with a large mean. For N < d the exact column means are computed first (float64,
chunked) and subtracted inside the kernel.
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import backends
from ._threads import dense_step

SHIFT_ROWS = 4096  # rows used to estimate the centring shift


@dataclass
class GramResult:
    gram: torch.Tensor  # (K, K) float64, upper triangle valid (full symmetric for the torch backend)
    n_rows: int
    n_features: int
    transposed: bool  # True when the N×N Gram was formed (N < d)
    backend: str
    log2_scale: int = 0  # ``gram`` is that of x·2^log2_scale (σ of x = √eig · 2^-log2_scale)


def abs_max(t: torch.Tensor) -> float:
    """max |t| (NaN if t holds one; 0 when empty) from one min/max reduction: no |t| is materialised (8 GB
    for 1M x 4096 bf16 on a GPU), and unlike the inf-norm it is as cheap as x.abs().max() on small CPU
    tensors (measured: 14 µs vs 200 µs at 2000x64, 31 ms vs 1.1 s at 1M x 256)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(t))
    return float("nan") if lo != lo or hi != hi else max(hi, -lo)


from ._scale import _magnitude_exp, _scale_for_exp, ldexp, scale_exponent  # noqa: E402 (re-exported)


def scaled_copy(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x·2^k, k) for float64 ``x`` whose max |x| is beyond 2^±400 (exact copy; k from one abs_max pass),
    else (x, 0) with no copy: other dtypes cannot square out of float64's range. For the routes that run
    a whole method on the scaled data (fast Gram, approximate methods) and scale σ back by 2^-k."""
    k = scale_exponent(abs_max(x)) if x.dtype == torch.float64 else 0
    return (ldexp(x, k) if k else x), k


def _column_means(x: torch.Tensor) -> torch.Tensor:
    """Exact float64 column means of ``x`` (N×d), converting at most ~32 MiB at a time."""
    n, d = x.shape
    out = torch.empty(d, dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(n, 1))
    for j in range(0, d, step):
        out[j : j + step] = x[:, j : j + step].to(torch.float64).sum(0)
    return out / n


def shift_for(mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The centring shift actually used: the float64 mean rounded to the input's dtype. Any shift
    near the mean avoids cancellation (the remainder is removed exactly); one representable in the
    input's dtype also keeps x − s exactly representable in few bits, which the integer-slicing GPU
    kernel needs to stay error-free on shifted data."""
    return mean.to(dtype).to(torch.float64) if dtype != torch.float64 else mean


def _backend_gram(be, x: torch.Tensor, *, center: bool, **kw) -> tuple[torch.Tensor, bool]:
    """(G, transposed): the k×k view (upper triangle valid) of ``be``'s padded float64 buffer holding the
    Gram of x (N×d) — the N×N one when N < d — or of its centred rows, with the centring of the module
    docstring; ``kw`` goes to ``be.gram_update``."""
    n, d = x.shape
    transposed = n < d
    v = x.T if transposed else x
    k = v.shape[1]
    g = torch.zeros(be.padded(k), be.padded(k), dtype=torch.float64, device=x.device)
    if not center:
        be.gram_update(v, g, **kw)
    elif transposed:
        be.gram_update(v, g, row_shift=_column_means(x), **kw)  # one mean per row of v
    else:
        shift = shift_for(x[: min(n, SHIFT_ROWS)].to(torch.float64).mean(0), x.dtype)
        csum = torch.zeros(k, dtype=torch.float64, device=x.device)
        be.gram_update(v, g, col_sum=csum, col_shift=shift, **kw)
        g[:k, :k].sub_(torch.outer(csum, csum), alpha=1.0 / n)
    return g[:k, :k], transposed


def exact_gram(
    x: torch.Tensor, *, center: bool, backend: Optional[str] = None, num_threads: Optional[int] = None,
    scaled: bool = False,
) -> GramResult:
    """Float64-exact Gram of a validated 2-D tensor ``x`` (N×d).

    Float64 data whose max |x| is outside [2^-400, 2^400] is squared as a copy x·2^k (exact, k from
    :func:`scale_exponent`), so tiny or huge inputs neither underflow nor overflow; other dtypes cannot get
    there (float32's range squared fits float64) and are never copied. Such data is recognised after the
    fact from the Gram's diagonal (largest G_jj outside (2^-700, 2^1000), or not finite: O(d)), so the
    common case pays no extra pass over x. With ``scaled`` the Gram of x·2^k is returned and k is in
    ``log2_scale`` (σ = √eig·2^-k stays exact where the Gram itself is not representable); otherwise the
    Gram is scaled back (rounded where it under- or overflows)."""
    n, d = x.shape
    be = backends.select(backend, x.device, dtype=x.dtype, shape=(n, d))
    g, transposed = _backend_gram(be, x, center=center, num_threads=num_threads)
    k = 0
    if x.dtype == torch.float64:
        top = float(torch.diagonal(g).max())
        if not (DIAG_LOW < top < DIAG_HIGH):  # 0 (all squares underflowed, or zero data), inf, NaN (then k = 0)
            k = scale_exponent(abs_max(x))
            if k:
                g, transposed = _backend_gram(be, ldexp(x, k), center=center, num_threads=num_threads)
    if k and not scaled:
        g, k = ldexp(g, -2 * k), 0
    return GramResult(g, n, d, transposed, be.NAME, k)


# exact_gram looks at max |x| (one pass) only when the largest diagonal entry Σ x_j² is outside
# (DIAG_LOW, DIAG_HIGH): data whose squares stayed well inside float64's range never gets there
DIAG_LOW, DIAG_HIGH = 2.0**-700, 2.0**1000


def fast_gram(x: torch.Tensor, *, center: bool, basis: Optional[torch.Tensor] = None) -> GramResult:
    """Float32-accumulated Gram (sgemm on row chunks, chunks summed in float64).

    With ``basis`` (K×m float64, orthonormal columns) the Gram of ``x @ basis`` is returned instead:
    the rotation pass of the refinement, whose near-diagonal result is far less sensitive to float32
    rounding than ``xᵀx`` itself.
    """
    n, d = x.shape
    if basis is None and x.is_cuda:
        res = _fast_gram_gpu(x, center=center)
        if res is not None:
            return res
    transposed = n < d
    v = x.T if transposed else x
    rows, k = v.shape
    shift = None
    if center:
        shift = (_column_means(x) if transposed else x[: min(n, SHIFT_ROWS)].to(torch.float64).mean(0))
    m = k if basis is None else basis.shape[1]
    g = torch.zeros(m, m, dtype=torch.float64, device=x.device)
    csum = torch.zeros(m, dtype=torch.float64, device=x.device)
    b32 = None if basis is None else basis.to(torch.float32)
    step = max(1, (1 << 24) // max(k, 1))
    for r0 in range(0, rows, step):
        c = v[r0 : r0 + step]
        if c.dtype != torch.float64:
            c = c.to(torch.float32)
        if shift is not None:
            c = c - (shift[r0 : r0 + step, None] if transposed else shift[None, :]).to(c.dtype)
        # Scale each chunk by a power of two (exact) so float32 squares neither underflow nor overflow.
        amax = abs_max(c)
        scale = 2.0 ** -math.floor(math.log2(amax)) if amax > 0 and math.isfinite(amax) else 1.0
        c = (c * scale).to(torch.float32)
        if b32 is not None:
            c = c @ b32
        g += (c.T @ c).to(torch.float64) / scale / scale
        if center and not transposed:
            csum += c.sum(0, dtype=torch.float64) / scale
    if center and not transposed:
        g -= torch.outer(csum, csum) / n
    return GramResult(g, n, d, transposed, "torch-fp32")


def _fast_gram_gpu(x: torch.Tensor, *, center: bool) -> Optional[GramResult]:
    """First fast pass on a GPU kernel (Triton / CUDA, tensor cores, fp32 accumulators flushed to
    float64); None when no GPU backend can run, so the caller falls back to chunked sgemm."""
    n, d = x.shape
    be = None
    for name in backends.gpu_order(x.dtype, (n, d), "fast"):
        mod = backends.BACKENDS[name]
        if name != "torch" and mod.available(x.device)[0]:
            be = mod
            break
    if be is None:
        return None
    amax = abs_max(x)
    if not math.isfinite(amax):
        k = min(n, d)
        return GramResult(torch.full((k, k), math.nan, dtype=torch.float64, device=x.device), n, d, n < d,
                          be.NAME + "-fast")
    # power of two keeping squares (times rows) inside float32's range
    scale = 2.0 ** min(126, max(-126, -math.floor(math.log2(amax)))) if amax > 0 else 1.0
    if x.dtype == torch.float16:
        scale = 1.0  # fp16 squares always fit float32, and scaling down would push fp16 values subnormal
    g, transposed = _backend_gram(be, x, center=center, precision="fast", scale=scale)
    return GramResult(_sym_upper(g), n, d, transposed, be.NAME + "-fast")


def eigvals_desc(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric float64 matrix (upper triangle read), descending, negatives clamped to 0."""
    if g.dtype != torch.float64:
        g = g.to(torch.float64)
    try:
        with dense_step(g):  # one LAPACK thread for Gram-sized solves: immune to busy cores (_threads.py)
            lam = torch.linalg.eigvalsh(g, UPLO="U")
        failed = g.device.type != "cpu" and not bool(torch.isfinite(lam).all()) and bool(torch.isfinite(g).all())
    except RuntimeError:  # torch.linalg.LinAlgError included (cuSOLVER syevd fails on some low-rank input)
        if g.device.type == "cpu":
            raise
        failed = True
    if failed:
        warnings.warn("GPU eigensolver failed; retrying on the CPU in float64", RuntimeWarning, stacklevel=2)
        device, g = g.device, g.cpu()
        with dense_step(g):
            lam = torch.linalg.eigvalsh(g, UPLO="U").to(device)
    return lam.flip(-1).clamp_min(0.0)


# ----------------------------------------------------------------------------------------------
# Streaming accumulation (DESIGN §4–5)


def _sym_upper(g: torch.Tensor) -> torch.Tensor:
    """Full symmetric matrix from the upper triangle of ``g`` (the native kernel writes only that)."""
    return torch.triu(g) + torch.triu(g, 1).T


def _normal_device(device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, ``cpu:0`` -> ``cpu``: the form a tensor's ``.device`` has."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cpu":
        return torch.device("cpu")
    return dev


def _reraise(exc: BaseException, msg: str):
    """Raise ``msg`` as the same exception type as ``exc`` (so callers catching an out-of-memory error
    still do), chained to it."""
    try:
        new = type(exc)(msg)
    except Exception:  # an exception type with a different constructor
        new = RuntimeError(msg)
    raise new from exc


def _max_exp(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return a if b is None else b if a is None else max(a, b)


INT64_MAX = (1 << 63) - 1
STATE_SYM_TOL = 1e-12  # max |G − Gᵀ| relative to max G_jj: a saved Gram is exactly symmetric
STATE_PSD_TOL = 1e-9  # |G_ij| ≤ √(G_ii G_jj)(1 + tol) + tol·max G_jj, G_jj ≥ −tol·max G_jj
STATE_SUM_TOL = 1e-6  # c_j²/n ≤ G_jj (1 + tol) + 1e-12·max G_jj; tr(G)² ≤ n‖G‖_F² (1 + tol)


def _check_state(n: int, shift: torch.Tensor, csum: torch.Tensor, g: torch.Tensor) -> None:
    """ValueError unless (n, s, c, G) can be the state of n rows z_r: G = Σ (z_r − s)(z_r − s)ᵀ is
    symmetric with |G_ij|² ≤ G_ii G_jj (its 2×2 minors PSD), c = Σ (z_r − s) obeys Cauchy–Schwarz
    c_j² ≤ n G_jj, rank G ≤ n (checked through tr(G)² ≤ n‖G‖_F²), and n = 0 means all zero — each to
    rounding. O(d²) time, temporaries of ≤ 32 MiB; computed on G scaled by a power of two (no overflow)."""
    if n == 0:
        for key, t in (("shift", shift), ("col_sum", csum), ("gram", g)):
            if bool(t.any()):
                raise ValueError(f"state has n_rows = 0 but a non-zero state[{key!r}] (a state without rows is "
                                 "all zero)")
        return
    d = g.shape[0]
    top = abs_max(torch.diagonal(g))
    if top == 0:
        if bool(g.any()) or bool(csum.any()):
            raise ValueError("state['gram'] has an all-zero diagonal but non-zero entries or col_sum: not the "
                             "state of any rows")
        return
    p = 1 - math.frexp(math.sqrt(top))[1]  # G·2^2p has max |G_jj| in [0.25, 1)
    dg = ldexp(torch.diagonal(g), 2 * p)
    low = float(dg.min())
    if low < -STATE_PSD_TOL:
        j = int(dg.argmin())
        raise ValueError(f"state['gram'] has a negative diagonal entry (gram[{j}, {j}] = {float(g[j, j]):.6g}): "
                         "a Gram matrix has G_jj = Σ (z_rj − s_j)² ≥ 0")
    sq = dg.clamp_min(0).sqrt()
    step = max(1, (1 << 22) // d)
    asym = excess = fro = 0.0
    for r0 in range(0, d, step):
        blk = ldexp(g[r0 : r0 + step], 2 * p)
        asym = max(asym, abs_max(blk - ldexp(g[:, r0 : r0 + step].T, 2 * p)))
        bound = torch.outer(sq[r0 : r0 + step], sq).mul_(1 + STATE_PSD_TOL).add_(STATE_PSD_TOL)
        excess = max(excess, float((blk.abs() - bound).max()))
        fro += float((blk * blk).sum())
    if asym > STATE_SYM_TOL:
        raise ValueError(f"state['gram'] is not symmetric (max |G − Gᵀ| = {asym:.3g} of max G_jj): a Gram matrix "
                         "is symmetric")
    if excess > 0:
        raise ValueError("state['gram'] is not positive semi-definite: some |G_ij|² > G_ii·G_jj (a Gram matrix "
                         "obeys Cauchy–Schwarz)")
    cs = ldexp(csum, p)
    worst = float((cs * cs / n - dg * (1 + STATE_SUM_TOL)).max())
    if worst > 1e-12:
        j = int((cs * cs / n - dg).argmax())
        raise ValueError(f"state['col_sum'] is inconsistent with n_rows = {n} and the Gram diagonal: "
                         f"col_sum[{j}]² / n > gram[{j}, {j}] (Σ_r (z_rj − s_j))² ≤ n·Σ_r (z_rj − s_j)² for any n rows)")
    tr = float(dg.sum())
    if n < d and tr * tr > n * fro * (1 + STATE_SUM_TOL):
        raise ValueError(f"state['gram'] has rank > n_rows = {n}: tr(G)² > n·‖G‖_F² (ratio "
                         f"{tr * tr / (n * fro):.6g}), impossible for the Gram of n rows (rank ≤ n)")


STATE_FORMAT = "rankme_fast.GramAccumulator"
STATE_VERSION = 1


class GramAccumulator:
    """Float64 Gram of the rows of Z = [Z_1; Z_2; …] fed batch by batch, for N far beyond memory.

    State (float64): the row count n, a shift s (the mean of the first batch's first rows), the shifted
    column sums c = Σ_r (z_r − s) and the shifted scatter G = Σ_r (z_r − s)(z_r − s)ᵀ (d×d). From it

        centred Gram    M = G − c cᵀ / n             (no cancellation: s is close to the mean μ)
        uncentred Gram  ZᵀZ = G + s cᵀ + c sᵀ + n s sᵀ
        mean            μ = s + c / n

    so one pass serves metrics of either convention. Partial states combine with Chan's formula
    ``M = M_a + M_b + (n_a n_b / n) (μ_b − μ_a)(μ_b − μ_a)ᵀ`` (:meth:`merge`, :meth:`all_reduce`), so
    the result does not depend on how rows were split into batches, processes or ranks beyond float64
    rounding (tested to 1e-9 relative on well-conditioned spectra). Memory: d² doubles (plus the native
    kernel's per-thread copies for small d), independent of N.

    Args:
        n_features: d, if known in advance (otherwise taken from the first batch).
        device: where the state lives (default: the first batch's device). Batches must be on it.
        backend: Gram backend, "auto" | "cpu" | "torch" (see :mod:`rankme_fast.backends`).
        num_threads: threads of the native CPU kernel (default ``RANKME_FAST_NUM_THREADS`` / torch's).

    >>> acc = GramAccumulator()
    >>> for batch in loader:            # (b, d) tensors / arrays, any float dtype
    ...     acc.update(batch)
    >>> acc.rankme(), acc.spectrum(center=True).collapse_auc()
    """

    def __init__(self, n_features: Optional[int] = None, *, device=None, backend: Optional[str] = None,
                 num_threads: Optional[int] = None):
        if n_features is not None and (not isinstance(n_features, int) or isinstance(n_features, bool)
                                       or n_features < 1):
            raise ValueError(f"n_features must be a positive int or None, got {n_features!r}")
        if backend not in (None, "auto") and backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(backends.BACKENDS)} or 'auto'")
        if num_threads is not None:  # validated now, not at the first batch that reaches the kernel
            num_threads = backends.cpu.check_threads(num_threads)
        self._d: Optional[int] = n_features
        self._device: Optional[torch.device] = None if device is None else _normal_device(device)
        self._backend_name = backend
        self._num_threads = num_threads
        self._be = None
        self.n_rows = 0
        self.n_batches = 0
        self._shift: Optional[torch.Tensor] = None
        self._csum: Optional[torch.Tensor] = None
        self._g: Optional[torch.Tensor] = None  # padded buffer; upper triangle of [:d, :d] valid
        self._broken: Optional[str] = None
        # the state describes the rows z·2^_log2_scale; _max_exp bounds log2 max|z| of the rows seen (None:
        # no non-zero row yet), and _log2_scale == _scale_for_exp(_max_exp) between calls
        self._log2_scale = 0
        self._max_exp: Optional[int] = None
        # update/merge/load_state_dict and state reads hold it: the kernels release the GIL, so two threads
        # would otherwise add into G at once. Reentrant, so a locked method may call another one.
        self._lock = threading.RLock()

    # -- properties ---------------------------------------------------------------------------
    @property
    def n_features(self) -> Optional[int]:
        return self._d

    @property
    def device(self) -> Optional[torch.device]:
        return self._device

    @property
    def backend(self) -> Optional[str]:
        return None if self._be is None else self._be.NAME

    def __repr__(self) -> str:
        return (f"GramAccumulator(n_rows={self.n_rows}, n_features={self._d}, device={self._device}, "
                f"backend={self.backend!r})")

    # copy.deepcopy / pickle: the backend module is stored by name
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_be"] = None if self._be is None else self._be.NAME
        state.pop("_lock", None)  # a lock is not copyable; each copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        name = state.get("_be")
        self.__dict__.update(state)
        self._be = None if name is None else backends.BACKENDS[name]
        self.__dict__.setdefault("_log2_scale", 0)  # pickles from before scaling existed
        self._lock = threading.RLock()
        if "_max_exp" not in state:
            self._max_exp = self._state_exp()

    # -- internals ----------------------------------------------------------------------------
    def _ensure_ok(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"this GramAccumulator is unusable after an earlier error ({self._broken}); "
                               "create a new one (or load_state_dict from a checkpoint)")

    def _allocate(self, d: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
        # a stream's length is unknown: choose as for a large problem of this d
        be = backends.select(self._backend_name, device, dtype=dtype, shape=(1 << 30, d))
        size = be.padded(d)
        need = 8 * (size * size + 2 * d)
        from .strategies import free_memory  # noqa: PLC0415 - only when a state is allocated

        free = free_memory(torch.device(device).type)
        if need > free:  # checked before anything changes: the accumulator stays usable
            raise ValueError(
                f"GramAccumulator: the d×d float64 Gram of d={d} features needs {need / 1e9:.3g} GB but only "
                f"{free / 1e9:.3g} GB is free on {device}; with fewer rows than features score the matrix in "
                "memory instead (rf.rankme / rf.spectrum form the N×N Gram), or use an approximate method "
                "(method='randomized', 'lanczos' or 'slq')")
        try:
            g = torch.zeros(size, size, dtype=torch.float64, device=device)
            csum = torch.zeros(d, dtype=torch.float64, device=device)
            shift = torch.zeros(d, dtype=torch.float64, device=device)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            self._broken = f"allocating its {size}×{size} float64 Gram ({need / 1e9:.3g} GB) failed"
            _reraise(exc, f"GramAccumulator: {self._broken}: {exc}; this accumulator is now unusable")
        self._d, self._device, self._be = d, device, be
        self._g, self._csum, self._shift = g, csum, shift

    def _rescale_state(self, k: int) -> None:
        """Re-express the state for rows z·2^k (k from _scale_for_exp of a bound on the magnitude, so
        the stored values stay in range; parts that underflow are below the rounding of the rest)."""
        delta = k - self._log2_scale
        if delta and self._g is not None:
            ldexp(self._shift, delta, out=self._shift)
            ldexp(self._csum, delta, out=self._csum)
            ldexp(self._g, 2 * delta, out=self._g)
        self._log2_scale = k

    def _state_exp(self) -> Optional[int]:
        """A bound on log2 max|z| of the rows in the state, from |z_j| ≤ |s_j| + √G_jj (None: all zero)."""
        if self._g is None or self.n_rows == 0:
            return None
        diag = float(torch.diagonal(self._g)[: self._d].max())
        e = _magnitude_exp(max(abs_max(self._shift), math.sqrt(max(diag, 0.0))))
        return None if e is None else e + 1 - self._log2_scale  # + 1: the sum of the two bounds

    def _centered_parts(self, log2_scale: Optional[int] = 0):
        """(n, μ, M) with M the full symmetric centred scatter matrix, of the rows z·2^log2_scale: by default
        of z itself (rounded where tiny or huge embeddings leave float64's range), None: of the rows as
        stored (z·2^_log2_scale, always in range)."""
        d, n = self._d, self.n_rows
        g = _sym_upper(self._g[:d, :d])
        mu = self._shift + self._csum / n
        m = g - torch.outer(self._csum, self._csum) / n
        if log2_scale is not None and log2_scale != self._log2_scale:
            delta = log2_scale - self._log2_scale
            mu, m = ldexp(mu, delta), ldexp(m, 2 * delta)
        return n, mu, m

    @torch.no_grad()
    def _set_centered(self, n: int, mu: torch.Tensor, m: torch.Tensor, log2_scale: int = 0,
                      max_exp: Optional[int] = None) -> None:
        """Rebase the state on shift = μ (so c = 0 and G = M), (μ, M) being those of the rows z·2^log2_scale
        (default: of z itself); ``max_exp`` bounds log2 max|z| (default: estimated from μ and M)."""
        d = self._d
        self.n_rows = int(n)
        self._shift.copy_(mu)
        self._csum.zero_()
        self._g.zero_()
        self._g[:d, :d].copy_(m)
        self._log2_scale = log2_scale
        self._max_exp = self._state_exp() if max_exp is None else max_exp
        self._rescale_state(_scale_for_exp(self._max_exp))

    # -- accumulation -------------------------------------------------------------------------
    def update(self, batch) -> "GramAccumulator":
        """Add the rows of ``batch`` (b, d): torch tensor (any strides), NumPy array or DLPack object,
        float64/32/16 or bfloat16. An empty batch (0 rows) is accepted and changes nothing.

        Raises ValueError when d or the device differs from earlier batches, or when the batch holds
        NaN/Inf (count and row); after the latter the accumulator is unusable (its state is poisoned).
        Float64 rows of magnitude outside [2^-400, 2^400] are accumulated as z·2^k (exact; see
        ``_log2_scale``), so tiny or huge embeddings neither underflow nor overflow. Thread-safe: concurrent
        calls are serialised.
        """
        with self._lock:
            return self._update(batch)

    def _update(self, batch) -> "GramAccumulator":
        self._ensure_ok()
        from ._inputs import check_all_finite, to_torch

        name = f"batch {self.n_batches}"
        t = to_torch(batch, name=name).detach()  # statistics only: never keep an autograd graph alive
        if t.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (rows, features) batch, got shape {tuple(t.shape)}")
        rows, d = t.shape
        if d == 0:
            raise ValueError(f"{name}: has 0 features (shape {tuple(t.shape)})")
        if self._d is not None and d != self._d:
            raise ValueError(f"{name}: has d={d} features but the accumulator has d={self._d} "
                             f"(shape {tuple(t.shape)})")
        if self._device is not None and t.device != self._device:
            raise ValueError(f"{name}: is on {t.device} but the accumulator lives on {self._device}; "
                             "move the batch (or create the accumulator with device=...)")
        if self._g is None:
            self._allocate(d, t.device, t.dtype)
        self.n_batches += 1
        if rows == 0:
            return self
        # Only float64 can hold magnitudes whose squares leave float64's range: one min/max pass for it,
        # none for the other dtypes (bounded by their largest finite value).
        if t.dtype == torch.float64:
            e_batch = _magnitude_exp(abs_max(t))
        else:
            e_batch = math.frexp(torch.finfo(t.dtype).max)[1]
        e_all = _max_exp(self._max_exp, e_batch)
        k = _scale_for_exp(e_all)
        try:  # all or nothing: an interruption mid-batch (OOM, Ctrl-C) must not leave a half-added batch
            if k != self._log2_scale:
                self._rescale_state(k)
            self._max_exp = e_all
            x = ldexp(t, k) if k else t  # a copy only for extreme magnitudes
            if self.n_rows == 0:
                self._shift.copy_(shift_for(x[: min(rows, SHIFT_ROWS)].to(torch.float64).mean(0), x.dtype))
            kw = {"num_threads": self._num_threads} if self._be is backends.cpu else {}
            self._be.gram_update(x, self._g, col_sum=self._csum, col_shift=self._shift, **kw)
            self.n_rows += rows
        except BaseException as exc:
            self._broken = f"{name} was interrupted ({type(exc).__name__}) while being added"
            if isinstance(exc, (RuntimeError, MemoryError)):  # out of memory, mostly
                _reraise(exc, f"{name}: {type(exc).__name__} while being added ({exc}); this GramAccumulator "
                              "is now unusable (create a new one, or load_state_dict from a checkpoint)")
            raise
        # O(d) check: a NaN/Inf anywhere in the batch reaches the column sums, an overflowing square
        # reaches the diagonal.
        ok = torch.isfinite(self._csum).all() & torch.isfinite(torch.diagonal(self._g)[:d]).all()
        if not bool(ok):
            self._broken = f"{name} was not finite"
            check_all_finite(t, name=name, row_offset=0)
            self._broken = f"{name}: squares overflow float64"
            raise ValueError(f"{name}: squares of the input overflow float64 (max |x| = "
                             f"{float(t.abs().max()):.3g}); rescale the embeddings")
        return self

    @torch.no_grad()
    def merge(self, other: "GramAccumulator") -> "GramAccumulator":
        """Add the rows accumulated by ``other`` (Chan's parallel formula); ``other`` is unchanged.
        Thread-safe: ``other`` is read under its own lock, then this one is updated under its lock (never
        both locks at once, so ``a.merge(b)`` and ``b.merge(a)`` in two threads cannot deadlock)."""
        self._ensure_ok()
        if not isinstance(other, GramAccumulator):
            raise TypeError(f"merge expects a GramAccumulator, got {type(other).__name__}")
        with other._lock:  # a consistent snapshot of other (new tensors, so it may change afterwards)
            other._ensure_ok()
            od, nb, batches = other._d, other.n_rows, other.n_batches
            if nb:
                _, mub, mb = other._centered_parts(None)
                kb, eb, devb = other._log2_scale, other._max_exp, other._device
        with self._lock:
            self._ensure_ok()
            if od is not None and self._d is not None and od != self._d:
                raise ValueError(f"merge: the other accumulator has d={od}, this one d={self._d}")
            if nb == 0:
                self.n_batches += batches
                return self
            dev = self._device if self._device is not None else devb
            if self._g is None:
                self._allocate(od, dev)
            # both parts in units of the scale that suits the larger magnitude (exact powers of two)
            e = _max_exp(self._max_exp, eb)
            k = _scale_for_exp(e)
            self._rescale_state(k)
            self._max_exp = e
            mub, mb = ldexp(mub.to(dev), k - kb), ldexp(mb.to(dev), 2 * (k - kb))
            from .distributed import _is_reduced, mark_reduced  # noqa: PLC0415 - no torch.distributed import

            was_reduced = _is_reduced(self)
            if self.n_rows == 0:
                self._set_centered(nb, mub, mb, k, e)
            else:
                na, mua, ma = self._centered_parts(None)
                n = na + nb
                delta = mub - mua
                mu = mua + delta * (nb / n)
                self._set_centered(n, mu, ma + mb + torch.outer(delta, delta) * (na / n * nb), k, e)
            if was_reduced:  # still holds a global state: a later all_reduce must still be refused
                mark_reduced(self)
            self.n_batches += batches
            return self

    def all_reduce(self, group=None, *, timeout=None) -> "GramAccumulator":
        """Combine the states of every rank of ``group`` (torch.distributed) in place; afterwards each
        rank holds the global state. One small gather checks that all ranks agree on d (naming the
        ranks that differ), one d-vector all_reduce gives the global mean and one float64 d×d
        all_reduce sums the Chan-corrected scatter matrices — embeddings never leave their rank.
        Once only: a second call (also after more update()s or a merge()) raises on every rank.
        ``timeout`` (seconds or a timedelta; default: the process group's) bounds each collective, so a
        rank that never calls all_reduce is a RuntimeError naming it, not a 30-minute hang."""
        from .distributed import all_reduce_accumulator

        with self._lock:  # a broken accumulator is reported on every rank
            return all_reduce_accumulator(self, group, timeout=timeout)

    # -- results ------------------------------------------------------------------------------
    def _need_rows(self) -> None:
        self._ensure_ok()
        if self.n_rows == 0:
            raise ValueError("GramAccumulator: no rows accumulated yet; call update() with data first")

    def _stored_gram(self, center: bool) -> torch.Tensor:
        """The Gram (or centred scatter) of the stored rows z·2^_log2_scale, full and symmetric."""
        n, s, c = self.n_rows, self._shift, self._csum
        g = _sym_upper(self._g[: self._d, : self._d])
        if center:
            return g - torch.outer(c, c) / n
        sc = torch.outer(s, c)
        return g + (sc + sc.T) + torch.outer(s, s) * n  # every term exactly symmetric

    def mean(self) -> torch.Tensor:
        """Column means μ (d,), float64."""
        with self._lock:
            self._need_rows()
            return ldexp(self._shift + self._csum / self.n_rows, -self._log2_scale)

    def gram(self, center: bool = False) -> torch.Tensor:
        """The d×d float64 Gram matrix ZᵀZ, or the centred scatter (Z − 1μᵀ)ᵀ(Z − 1μᵀ) when ``center``
        (for embeddings scaled internally, rounded where the Gram itself leaves float64's range)."""
        with self._lock:
            self._need_rows()
            return ldexp(self._stored_gram(center), -2 * self._log2_scale)

    def spectrum(self, center: bool = False):
        """:class:`~rankme_fast.Spectrum` of the accumulated rows (K = min(n, d) singular values)."""
        from .spectrum import EXACT_RANKME_RTOL, Spectrum

        with self._lock:
            self._need_rows()
            g = self._stored_gram(center)
            n, d, k2, backend = self.n_rows, self._d, self._log2_scale, self.backend
        if not bool(torch.isfinite(g).all()):
            raise ValueError("GramAccumulator: the Gram matrix overflowed float64; rescale the embeddings")
        k = min(n, d)
        sv = ldexp(eigvals_desc(g)[:k].sqrt(), -k2)  # σ of the stored rows z·2^k2, back to z's scale
        if not bool(torch.isfinite(sv).all()):
            raise ValueError("GramAccumulator: the singular values overflow float64; rescale the embeddings")
        return Spectrum(sv, n, d, bool(center), "gram", backend, "exact", True, EXACT_RANKME_RTOL)

    def rankme(self, eps: float = 1e-7, *, center: bool = False) -> float:
        """RankMe of the accumulated rows (uncentred by default, as in Garrido et al.)."""
        return self.spectrum(center).rankme(eps)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and ints (loadable with ``torch.load(..., weights_only=True)``). For embeddings
        scaled internally (magnitudes outside [2^-400, 2^400]) the tensors are the unscaled ones when those
        are exactly representable; otherwise they are those of the rows z·2^k and ``log2_scale`` = k."""
        with self._lock:
            self._ensure_ok()
            sd = {"format": STATE_FORMAT, "version": STATE_VERSION, "n_rows": int(self.n_rows),
                  "n_batches": int(self.n_batches), "n_features": self._d}
            if self._g is not None:
                d, k = self._d, self._log2_scale
                parts = [self._shift.clone(), self._csum.clone(), _sym_upper(self._g[:d, :d])]
                if k:
                    plain = [ldexp(t, -k * w) for t, w in zip(parts, (1, 1, 2))]
                    if all(torch.equal(ldexp(u, k * w), t) for u, t, w in zip(plain, parts, (1, 1, 2))):
                        parts = plain
                    else:
                        sd["log2_scale"] = k
                sd.update(zip(("shift", "col_sum", "gram"), parts))
            return sd

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> "GramAccumulator":
        """Replace this accumulator's state by ``state`` (from :meth:`state_dict`), validating it: types
        and shapes, finiteness, and that the tensors can be those of ``n_rows`` rows (symmetric PSD-looking
        Gram, column sums within Cauchy–Schwarz of its diagonal, all zero without rows, rank ≤ n_rows)."""
        with self._lock:
            return self._load_state_dict(state)

    def _load_state_dict(self, state: dict) -> "GramAccumulator":
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict expects a dict, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a GramAccumulator state (format={state.get('format')!r})")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported GramAccumulator state version {state.get('version')!r} "
                             f"(this is version {STATE_VERSION})")
        n, d, nb = state.get("n_rows"), state.get("n_features"), state.get("n_batches", 0)
        for key, val in (("n_rows", n), ("n_batches", nb)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"state[{key!r}] must be a non-negative int, got {val!r}")
            if val > INT64_MAX:
                raise ValueError(f"state[{key!r}] = {val} exceeds int64 (2**63 - 1): not a row count")
        scale = state.get("log2_scale", 0)
        if not isinstance(scale, int) or isinstance(scale, bool) or abs(scale) > 1100:
            raise ValueError(f"state['log2_scale'] must be an int in [-1100, 1100], got {scale!r}")
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"state['n_features'] must be a positive int or None, got {d!r}")
        if self._d is not None and d is not None and d != self._d:
            raise ValueError(f"state has d={d} but this accumulator was created with d={self._d}")
        has = [k for k in ("shift", "col_sum", "gram") if k in state]
        if n > 0 and (d is None or len(has) < 3):
            raise ValueError("state with rows must hold n_features, shift, col_sum and gram")
        if 0 < len(has) < 3:
            raise ValueError(f"state holds {has} but not all of shift, col_sum and gram")
        if has and d is None:
            raise ValueError("state holds tensors but n_features is None")
        tensors = {}
        for key, shape in (("shift", (d,)), ("col_sum", (d,)), ("gram", (d, d))):
            if key not in state:
                continue
            t = state[key]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or tuple(t.shape) != shape:
                desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state[{key!r}] must be a float64 tensor of shape {shape}, got {desc}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"state[{key!r}] holds NaN/Inf")
            tensors[key] = t
        if tensors:
            _check_state(n, tensors["shift"], tensors["col_sum"], tensors["gram"])
        if d is None:
            self._broken = None
            self.n_rows, self.n_batches = n, nb
            self._log2_scale, self._max_exp = 0, None
            return self
        dev = self._device if self._device is not None else (
            tensors["gram"].device if "gram" in tensors else torch.device("cpu"))
        if self._g is None or self._d != d:
            self._allocate(d, dev)  # raises before anything changed when d×d does not fit
        self._broken = None
        self.n_rows, self.n_batches = n, nb
        self._g.zero_()
        self._shift.zero_()
        self._csum.zero_()
        if tensors:
            self._shift.copy_(tensors["shift"])
            self._csum.copy_(tensors["col_sum"])
            self._g[:d, :d].copy_(tensors["gram"])
        self._log2_scale = scale if tensors else 0
        self._max_exp = self._state_exp()
        self._rescale_state(_scale_for_exp(self._max_exp))
        return self
