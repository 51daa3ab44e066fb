"""Hidden-state metrics for LLMs, batched over prompts: EigenScore, LLM-Check, matrix entropy / eRank /
Diff-eRank and matrix-based Rényi (α-) entropy.

Each metric is a function of one small spectrum per *item* (a prompt's K sampled answers, or its tokens).
Every function takes

* a ``(B, n, d)`` tensor (B items of n rows each),
* a list of ``(n_i, d)`` tensors (ragged), or
* a padded ``(B, n_max, d)`` tensor with ``lengths`` (B,): rows ``i >= lengths[b]`` are never read, so the
  padding may hold anything (zeros, garbage, NaN),

in any float dtype (bfloat16 included), on CPU or CUDA, as torch / NumPy / DLPack, and returns a float64
tensor (B,) on the input's device; a single 2-D ``(n, d)`` item returns a float.

**Engine.** No Python loop per item: items are bucketed by length (lengths within 25 % or 16 rows of the
bucket's shortest; a bucket is cut in chunks of ≤ 32 MiB of float64 Grams and ≤ 32 MiB of input copies) and each
chunk's n×n Grams of the rows are computed at once in float64 — on CPU by the native batched row-Gram
kernel (``rankme_fast._C``, the upcast fused into the kernel, threads across items; the float64 copy
below where the extension is missing), elsewhere as a batched float64 matmul of the chunk's float64 copy.
Centring is applied to the Gram in float64: over features, ``G − r rᵀ/d`` with the row sums ``r``; over
tokens, the rows are first shifted by the item's first token (removing large shared components, e.g.
LLMs' massive activations, exactly) and the Gram is then double-centred. Log-determinants (EigenScore,
LLM-Check) of CPU items of up to 512 rows skip the buckets: one call of the row-Gram kernel for all of them
(a ragged list read item by item where it lies, a padded tensor in place), whose thread factorises each item
right after its Gram (Cholesky of G − r rᵀ/d + ridge·I, blocked above 64 rows; no Gram tensor, no copy). Longer
or non-CPU items take the buckets and a batched Cholesky; spectra (the entropies) come from a batched float64
``eigvalsh``; padded rows of a bucket get a unit diagonal / a sentinel eigenvalue below the item's spectrum
and are dropped.

**Definitions** (float64 throughout; per item):

* ``eigenscore`` (Chen et al., ICLR 2024, "INSIDE"): Z (K×d), C = covariance with rows as variables (each row
  centred over its d features, ÷ (d − 1)). ``convention="inside"`` (default, the authors' code): mean of
  log10 of the eigenvalues of C + αI; ``"paper"``: the same with the natural log (the paper's (1/K) log det,
  and what ``rf.eigenscore`` returned before this module: ``convention="paper"`` keeps it); ``"lm-polygraph"``:
  C = Z J Zᵀ without the 1/(d − 1), natural log.
* ``llm_check_hidden_score`` (Sriramanan et al., NeurIPS 2024): T (n×d tokens), T_c = each row centred over
  its features; mean over i = 1..n of ln(λ_i + α), λ the n eigenvalues of T_c T_cᵀ (zeros included when n > d).
* ``matrix_entropy`` (Wei et al., NeurIPS 2024, Diff-eRank): Z = T minus its mean over tokens, rows
  L2-normalised, λ = σ²(Z)/Σσ², H = −Σ λ ln λ (0·ln 0 = 0); ``erank = exp(H)``;
  ``diff_erank(base, trained) = erank(base) − erank(trained)``.
* ``alpha_entropy`` (Skean et al. 2025, "Layer by Layer"): centre over tokens (``center``), rows
  L2-normalised, A = ZZᵀ/tr(ZZᵀ), S_α = ln Σ λ_i^α / (1 − α), −Σ λ ln λ at α = 1. ``clamp=True`` clamps the
  Gram elementwise at 0 first, as the Layer-by-Layer code does — not a spectral quantity of Z any more.
  ``normalization``: ``"raw"``, ``"maxEntropy"`` (÷ min(ln n, ln d)), ``"logN"`` (÷ ln n), ``"logD"`` (÷ ln d).

**Degenerate items.** EigenScore and LLM-Check are defined on a zero spectrum (every row equal: each
eigenvalue is 0, the score is log α). For the entropies a row whose centred norm is zero to rounding
(≤ 8(d + n)·2⁻⁵³ of the item's largest shifted squared norm) stays a zero row under normalisation, and an item
with *no* non-zero row (all rows equal with centring, e.g. n = 1, or all zero) has no spectrum to normalise:
a ValueError names the item. Eigenvalues of the normalised Gram within rounding of 0 (≤ 8·n·2⁻⁵³·λ_max) or
made negative by rounding or ``clamp`` count as 0 (for α < 1, λ^α of a rounding-level λ would count). Non-finite values raise a ValueError naming the item and the token.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ._inputs import to_torch
from ._threads import dense_step

_CHUNK_BYTES = 64 << 20
# Items up to this many rows take the native Gram + Cholesky epilogue, all in one kernel call (row by row up to
# 64 rows, blocked above: on Zen 4 one 512-row factorisation ~1.3 ms against 4.4 ms for torch's batched
# Cholesky, which runs MKL per matrix; and no Gram tensors, copies or length buckets). Longer items take
# buckets of float64 Grams and torch's Cholesky (the per-thread scratch grows as rows²).
_NATIVE_LOGDET_MAX = 512
_U = 2.0 ** -53
EIGENSCORE_CONVENTIONS = ("inside", "paper", "lm-polygraph")
NORMALIZATIONS = ("raw", "maxEntropy", "logN", "logD")


# ---------------------------------------------------------------------------------------------- input


class _Items:
    """B items of (n_b, d) rows: a padded (B, n_max, d) tensor + lengths, or a list of 2-D tensors."""

    def __init__(self, x: Any, lengths: Any, name: str):
        self.name = name
        self.single = False
        if isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_array(v) for v in x):
            if lengths is not None:
                raise ValueError(f"{name}: lengths= goes with a padded (B, n_max, d) tensor, not with a list of "
                                 "items (each item's length is its own first dimension)")
            items = []
            for i, v in enumerate(x):
                t = to_torch(v, name=f"{name}[{i}]")
                if t.ndim != 2:
                    raise ValueError(f"{name}[{i}]: expected a 2-D (n, d) item (rows = tokens or answers, columns "
                                     f"= features), got shape {tuple(t.shape)}")
                if t.shape[0] == 0 or t.shape[1] == 0:
                    raise ValueError(f"{name}[{i}]: empty item of shape {tuple(t.shape)}; need at least one row "
                                     "and one feature")
                items.append(t)
            d, dev = items[0].shape[1], items[0].device
            for i, t in enumerate(items):
                if t.shape[1] != d:
                    raise ValueError(f"{name}[{i}]: has {t.shape[1]} features, item 0 has {d}; every item "
                                     "needs the same d")
                if t.device != dev:
                    raise ValueError(f"{name}[{i}]: is on {t.device}, item 0 on {dev}; put every item on one device")
            self.items, self.padded = items, None
            self.dtype = _common_dtype([t.dtype for t in items])
            self.d, self.device, self.B = d, dev, len(items)
            self.lengths = torch.tensor([t.shape[0] for t in items], dtype=torch.int64)
            return
        if isinstance(x, (list, tuple)) and len(x) == 0:
            raise ValueError(f"{name}: empty list of items")
        t = to_torch(x, name=name)
        if t.ndim in (2, 3) and 0 in t.shape:
            raise ValueError(f"{name}: empty input of shape {tuple(t.shape)}; need at least one row and one feature "
                             "(and one item)")
        if t.ndim == 2:
            if lengths is not None:
                raise ValueError(f"{name}: lengths= needs a padded (B, n_max, d) tensor, got one 2-D item of shape "
                                 f"{tuple(t.shape)}")
            t = t.unsqueeze(0)
            self.single = True
        if t.ndim != 3:
            raise ValueError(f"{name}: expected a 2-D or 3-D tensor ((n, d) for one item, (B, n, d) for a batch) or a "
                             f"list of (n_i, d) items, got shape {tuple(t.shape)}")
        if 0 in t.shape:
            raise ValueError(f"{name}: empty input of shape {tuple(t.shape)}; need at least one row and one feature "
                             "(and one item)")
        self.items, self.padded = None, t
        self.dtype, self.d, self.device, self.B = t.dtype, t.shape[2], t.device, t.shape[0]
        self.lengths = _check_lengths(lengths, t.shape[0], t.shape[1], name)

    def gather(self, idx: torch.Tensor, nb: int) -> torch.Tensor:
        """Items ``idx`` (CPU int64, ascending within a run) as one (b, nb, d) tensor of ``self.dtype``
        (a view when they are consecutive rows of a padded tensor with nb = n_max)."""
        if self.padded is not None:
            p = self.padded
            i0 = int(idx[0])
            if nb == p.shape[1] and bool((idx == torch.arange(i0, i0 + idx.numel())).all()):
                return p[i0:i0 + idx.numel()]
            return p[idx.to(p.device), :nb]
        out = torch.empty(idx.numel(), nb, self.d, dtype=self.dtype, device=self.device)  # padding never read
        for j, i in enumerate(idx.tolist()):
            t = self.items[i]
            out[j, : t.shape[0]] = t
        return out

    def rows(self, b: int) -> torch.Tensor:
        """The valid rows of item ``b`` (for error messages)."""
        if self.padded is not None:
            return self.padded[b, : int(self.lengths[b])]
        return self.items[b]

    def out(self, v: torch.Tensor):
        if self.single:
            return float(v[0])
        return v.to(self.device)


def _is_array(v) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray)) or hasattr(v, "__dlpack__")


def _common_dtype(dtypes):
    out = dtypes[0]
    for dt in dtypes[1:]:
        if dt != out:
            out = torch.promote_types(out, dt)
            if out in (torch.float16, torch.bfloat16) and {torch.float16, torch.bfloat16} <= set(dtypes):
                out = torch.float32  # f16 and bf16 together: float32 holds both exactly
    return out


def _check_lengths(lengths, b: int, n_max: int, name: str) -> torch.Tensor:
    if lengths is None:
        return torch.full((b,), n_max, dtype=torch.int64)
    if isinstance(lengths, torch.Tensor):
        lt = lengths.detach()
    else:
        arr = np.asarray(lengths)
        if arr.dtype == object or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"lengths: need integers, got dtype {arr.dtype}")
        lt = torch.from_numpy(arr.astype(np.int64, copy=False)) if arr.size else torch.zeros(0, dtype=torch.int64)
    if lt.is_floating_point() or lt.is_complex() or lt.dtype == torch.bool:
        raise TypeError(f"lengths: need integer lengths, got dtype {lt.dtype}")
    if lt.ndim != 1 or lt.shape[0] != b:
        raise ValueError(f"lengths: need one length per item of {name}, shape ({b},), got {tuple(lt.shape)}")
    lt = lt.to(torch.int64).cpu()
    bad = (lt < 1) | (lt > n_max)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"lengths: item {i} has length {int(lt[i])}, outside [1, {n_max}] (the padded tensor "
                         f"{name} holds {n_max} rows per item)")
    return lt


# ---------------------------------------------------------------------------------------------- engine


def _buckets(lengths: torch.Tensor, d: int, copy_itemsize: int):
    """(idx, nb) chunks: items sorted by length, bucketed (nb ≤ max(1.25·shortest, shortest + 16)), cut so a
    chunk's float64 Grams (with the centring's temporaries, 3 of them) and its input copy each stay under
    _CHUNK_BYTES / 2."""
    order = torch.argsort(lengths, stable=True)
    ls = lengths[order].tolist()
    i, n = 0, len(ls)
    while i < n:
        top = max(int(math.ceil(ls[i] * 1.25)), ls[i] + 16)
        j = i
        while j < n and ls[j] <= top:
            j += 1
        nb = ls[j - 1]
        step = _CHUNK_BYTES // 2 // (3 * nb * nb * 8)
        if copy_itemsize:
            step = min(step, _CHUNK_BYTES // 2 // (nb * d * copy_itemsize))
        step = max(1, step)
        for k in range(i, j, step):
            idx = order[k: min(j, k + step)]
            yield torch.sort(idx).values, nb
        i = j


def _native():
    from .backends import cpu  # noqa: PLC0415
    mod = cpu.load()
    if mod is None or not hasattr(mod, "row_gram_batch") or not hasattr(cpu, "row_logdet_batch"):
        return None
    return cpu


def _grams(x: torch.Tensor, lens: torch.Tensor, center: Optional[str], items: _Items, idx: torch.Tensor):
    """Float64 n×n Grams (b, nb, nb) of the valid rows of chunk ``x`` (b, nb, d), centred over ``"features"``
    (each row minus its mean), over ``"tokens"`` (each feature minus its mean over the item's rows) or not
    (None); zero outside each item's [:L, :L]. Also returns the valid-row mask (b, nb) and the diagonal
    of the uncentred (shifted) Gram, the scale for zero-row tests."""
    b, nb, d = x.shape
    valid = torch.arange(nb)[None, :] < lens[:, None]
    dev = x.device
    cpu = _native() if dev.type == "cpu" else None
    shift = x[:, 0, :].to(torch.float64) if center == "tokens" else None
    if cpu is not None:
        g = torch.zeros(b, nb, nb, dtype=torch.float64)
        rs = torch.zeros(b, nb, dtype=torch.float64)
        cpu.row_gram_batch(x, g, lengths=lens, row_sum=rs, col_shift=shift)
    else:
        vm = valid.to(dev)
        v = torch.where(vm[:, :, None], x, torch.zeros((), dtype=x.dtype, device=dev)).to(torch.float64)
        if shift is not None:
            v = torch.where(vm[:, :, None], v - shift[:, None, :], v.new_zeros(()))
        g = v @ v.transpose(1, 2)
        rs = v.sum(-1)
        del v
    if not bool(torch.isfinite(torch.diagonal(g, dim1=1, dim2=2)).all()) or not bool(torch.isfinite(rs).all()):
        _raise_nonfinite(items, idx, lens)
    raw_diag = torch.diagonal(g, dim1=1, dim2=2).clone()
    vf = valid.to(device=g.device, dtype=torch.float64)
    if center == "features":
        g.baddbmm_(rs[:, :, None], rs[:, None, :], alpha=-1.0 / d)  # in place: G − r rᵀ/d
    elif center == "tokens":
        m = vf / lens.to(device=g.device, dtype=torch.float64)[:, None]
        c = (g @ m[:, :, None]).squeeze(-1)  # c_i = mean_j G_ij over the valid j
        s = (c * m).sum(-1)  # mean of the valid block
        g = g - c[:, :, None] * vf[:, None, :] - vf[:, :, None] * c[:, None, :] + s[:, None, None] * vf[:, :, None] * vf[:, None, :]
    return g, valid.to(g.device), raw_diag


def _raise_nonfinite(items: _Items, idx: torch.Tensor, lens: torch.Tensor):
    for i in idx.tolist():
        r = items.rows(i)
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            tok, feat = (int(v) for v in bad.nonzero()[0])
            val = float(r[tok, feat])
            n_bad = int(bad.sum())
            raise ValueError(f"{items.name}: item {i} holds {n_bad} non-finite value(s), the first ({val}) in token "
                             f"(row) {tok}, feature {feat}")
    raise ValueError(f"{items.name}: the squares of the rows of items {idx.tolist()[:8]} overflow float64 (values "
                     "beyond ~1e154); rescale the hidden states")


def _native_logdet(items: _Items, idx: torch.Tensor, ridge: float):
    """Mean ln λ(G_c + ridge·I) of CPU items ``idx`` (ascending), G_c = the rows' Gram centred over the features:
    one call of the native row-Gram kernel with its Cholesky epilogue on G − r rᵀ/d for all of them (no Gram
    tensor, no copy of the items, no Python per item; a padded tensor is read with the other items' lengths
    set to 0, a list item by item where it lies). Items whose matrix is not numerically SPD (ridge below the
    Gram's rounding) take ``_logdet_mean``."""
    cpu = _native()
    d = items.d
    if items.padded is not None:
        lens = items.lengths.clone()
        if idx.numel() != items.B:
            skip = torch.ones(items.B, dtype=torch.bool)
            skip[idx] = False
            lens[skip] = 0
        val, info = cpu.row_logdet_batch(items.padded, lengths=lens, scale=1.0 / d, ridge=ridge)
        val, info = val[idx], info[idx]
    else:
        ts = []
        for i in idx.tolist():
            t = items.items[i]
            if t.dtype != items.dtype:
                t = t.to(items.dtype)
            if not cpu.rows_contiguous(t):
                t = t.contiguous()
            ts.append(t)
        val, info = cpu.row_logdet_list(ts, scale=1.0 / d, ridge=ridge)
    if bool((info == 2).any()):
        _raise_nonfinite(items, idx[info == 2], items.lengths[idx[info == 2]])
    bad = (info == 1).nonzero().flatten()
    if bad.numel():
        bi = idx[bad]
        lens = items.lengths[bi]
        nb = int(lens.max())
        xc = items.gather(bi, nb)
        g = torch.zeros(bi.numel(), nb, nb, dtype=torch.float64)
        rs = torch.zeros(bi.numel(), nb, dtype=torch.float64)
        cpu.row_gram_batch(xc, g, lengths=lens, row_sum=rs)
        g.baddbmm_(rs[:, :, None], rs[:, None, :], alpha=-1.0 / d)
        valid = torch.arange(nb)[None, :] < lens[:, None]
        val[bad] = _logdet_mean(g, ridge, valid, lens)
    return val


def _each_chunk(x: Any, lengths: Any, name: str, center: Optional[str], fn, logdet=None):
    """Runs ``fn(G, valid, lens, raw_diag, idx, d)`` -> (b,) float64 over every chunk; returns (B,) in item order.
    ``logdet = (ridge(d), post(v, d))`` (with ``center="features"``): on CPU with the native kernels each chunk
    of at most _NATIVE_LOGDET_MAX rows is ``post(_native_logdet(..., ridge(d)), d)`` instead, the same quantity
    as ``fn`` computes."""
    items = _Items(x, lengths, name)
    out = torch.empty(items.B, dtype=torch.float64)
    copy_isz = torch.empty((), dtype=items.dtype).element_size()
    if items.device.type != "cpu" or _native() is None:
        copy_isz += 8  # the float64 copy of the chunk
    elif items.padded is not None and bool((items.lengths == items.padded.shape[1]).all()):
        copy_isz = 0  # every chunk is a view of consecutive items (no copy): only the Grams bound a chunk
    native_logdet = logdet is not None and center == "features" and items.device.type == "cpu" and _native() is not None
    rest = None  # the items the chunks below compute (None: all)
    if native_logdet:
        ridge = logdet[0](items.d)
        short = (items.lengths <= _NATIVE_LOGDET_MAX).nonzero().flatten()
        if short.numel():
            out[short] = logdet[1](_native_logdet(items, short, ridge), items.d)
        rest = (items.lengths > _NATIVE_LOGDET_MAX).nonzero().flatten()
        if not rest.numel():
            return items, out
    for idx, nb in _buckets(items.lengths if rest is None else items.lengths[rest], items.d, copy_isz):
        if rest is not None:
            idx = rest[idx]
        lens = items.lengths[idx]
        xc = items.gather(idx, nb)
        g, valid, raw = _grams(xc, lens, center, items, idx)
        del xc
        out[idx] = fn(g, valid, lens.to(g.device), raw, idx, items.d).double().cpu()
    return items, out


def _logdet_mean(g: torch.Tensor, ridge: float, valid: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Mean over each item's L valid rows of ln λ(G + ridge·I) for SPD valid blocks; overwrites ``g``
    (the padding's diagonal becomes 1, so its rows add ln 1 = 0)."""
    m = g
    di = torch.diagonal(m, dim1=1, dim2=2)
    di.add_(ridge)
    if not bool(valid.all()):
        di.masked_fill_(~valid, 1.0)
    with dense_step(m):
        chol, info = torch.linalg.cholesky_ex(m)
    if bool((info != 0).any()):  # not numerically SPD (α below rounding of the Gram): the eigenvalues
        with dense_step(m):
            lam = torch.linalg.eigvalsh(m)
        return torch.where(lam > 0, lam, lam.new_full((), float("nan"))).log().sum(-1) / lens
    return 2.0 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(-1) / lens


def _check_alpha(alpha, what="alpha", strictly_positive=True):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"{what} must be a real number, got {type(alpha).__name__} {alpha!r}")
    a = float(alpha)
    if not math.isfinite(a) or (a <= 0 if strictly_positive else a < 0):
        raise ValueError(f"{what} must be a finite number > 0, got {alpha}")
    return a


# ---------------------------------------------------------------------------------------------- metrics


def eigenscore(x: Any, *, alpha: float = 1e-3, convention: str = "inside", lengths: Any = None):
    """EigenScore (Chen et al., ICLR 2024, INSIDE) per item: the mean log-eigenvalue of the covariance of the
    item's K generations (rows) + αI. See the module docstring for the three ``convention`` values;
    ``"paper"`` is what ``rf.eigenscore`` returned before (natural log, ÷ (d − 1)).

    Args:
        x: (B, K, d), a list of (K_i, d), a padded (B, K_max, d) with ``lengths``, or one (K, d) item (→ float).
        alpha: the ridge α > 0.
        convention: ``"inside"`` (log10, the authors' code; default), ``"paper"`` (ln), ``"lm-polygraph"``
            (ln, C = Z J Zᵀ without 1/(d − 1)).
    """
    a = _check_alpha(alpha)
    if convention not in EIGENSCORE_CONVENTIONS:
        raise ValueError(f"convention must be one of {EIGENSCORE_CONVENTIONS}, got {convention!r}")

    def post(v, d):
        if convention == "lm-polygraph":
            return v
        v = v - math.log(d - 1)
        return v / math.log(10.0) if convention == "inside" else v

    def ridge(d):
        if convention == "lm-polygraph":
            return a
        if d < 2:
            raise ValueError(f"eigenscore needs d >= 2 features to form a covariance, got d = {d} "
                             "(convention='lm-polygraph' has no 1/(d - 1))")
        # ln det(G/(d−1) + αI)/L = ln det(G + α(d−1)I)/L − ln(d−1): no scaled copy of the Grams
        return a * (d - 1)

    def fn(g, valid, lens, raw, idx, d):
        return post(_logdet_mean(g, ridge(d), valid, lens), d)

    items, out = _each_chunk(x, lengths, "x", "features", fn, logdet=(ridge, post))
    return items.out(out)


def llm_check_hidden_score(x: Any, *, alpha: float = 1e-3, lengths: Any = None):
    """LLM-Check's hidden score (Sriramanan et al., NeurIPS 2024) per item T (n×d tokens): the mean over the n
    eigenvalues λ of T_c T_cᵀ (rows centred over their features; zeros included when n > d) of ln(λ + α)."""
    a = _check_alpha(alpha)

    def fn(g, valid, lens, raw, idx, d):
        return _logdet_mean(g, a, valid, lens)

    items, out = _each_chunk(x, lengths, "x", "features", fn, logdet=(lambda d: a, lambda v, d: v))
    return items.out(out)


def _normalised_spectrum(g, valid, lens, raw, idx, d, clamp: bool, what: str):
    """λ/Σλ of the row-normalised Gram (b, nb) (padding and negative eigenvalues as 0) and the number of
    non-zero rows per item."""
    b, nb, _ = g.shape
    dg = torch.diagonal(g, dim1=1, dim2=2)
    scale = raw.clamp(min=0).amax(-1, keepdim=True)
    tol = 8.0 * (d + lens[:, None].to(g.dtype)) * _U * scale
    nz = valid & (dg > tol)
    cnt = nz.sum(-1)
    if bool((cnt == 0).any()):
        bad = idx[(cnt == 0).cpu()].tolist()
        raise ValueError(f"{what}: item {bad[0]} has no row left after centring (all its rows are equal, "
                         f"e.g. n = 1 with centring, or zero), so there is no spectrum to normalise" + (f" (items {bad[:8]})" if len(bad) > 1 else ""))
    inv = torch.where(nz, dg.clamp(min=1e-300).rsqrt(), dg.new_zeros(()))
    a = g * inv[:, :, None] * inv[:, None, :]
    if clamp:
        a = a.clamp(min=0)
    gersh = a.abs().sum(-1).amax(-1)  # |λ| ≤ max row sum: the sentinel goes below every eigenvalue
    di = torch.diagonal(a, dim1=1, dim2=2)
    di[~valid] = -(1.0 + 2.0 * gersh)[:, None].expand(b, nb)[~valid]
    with dense_step(a):
        lam = torch.linalg.eigvalsh(a)  # ascending: each item's L eigenvalues are the last L
    keep = torch.arange(nb, device=g.device)[None, :] >= (nb - lens)[:, None]
    # eigenvalues within rounding of 0 are 0 (for α < 1, λ^α of a rounding-level λ ~ 1e-17 would count)
    floor = 8.0 * nb * _U * lam[:, -1:].clamp(min=0)
    lam = torch.where(keep & (lam > floor), lam, lam.new_zeros(()))
    return lam / cnt[:, None].to(lam.dtype), cnt


def _shannon(p: torch.Tensor) -> torch.Tensor:
    return -torch.where(p > 0, p * p.clamp(min=1e-300).log(), p.new_zeros(())).sum(-1)


def matrix_entropy(x: Any, *, lengths: Any = None):
    """Matrix entropy (Wei et al., NeurIPS 2024) per item T (n×d tokens): Z = T minus its mean over tokens,
    rows L2-normalised, λ = σ²(Z)/Σσ², H = −Σ λ ln λ (natural log)."""
    def fn(g, valid, lens, raw, idx, d):
        p, _ = _normalised_spectrum(g, valid, lens, raw, idx, d, False, "matrix_entropy")
        return _shannon(p)

    items, out = _each_chunk(x, lengths, "x", "tokens", fn)
    return items.out(out)


def erank(x: Any, *, lengths: Any = None):
    """Effective rank exp(H) of the matrix entropy H (:func:`matrix_entropy`), per item."""
    v = matrix_entropy(x, lengths=lengths)
    return math.exp(v) if isinstance(v, float) else v.exp()


def diff_erank(base: Any, trained: Any, *, lengths: Any = None):
    """Diff-eRank (Wei et al., NeurIPS 2024): erank(base) − erank(trained) per item, for the same prompts'
    hidden states from the base (untrained) and the trained model (the feature dimensions may differ;
    ``lengths`` applies to both)."""
    a = erank(base, lengths=lengths)
    b = erank(trained, lengths=lengths)
    if isinstance(a, float) != isinstance(b, float) or (not isinstance(a, float) and a.shape != b.shape):
        raise ValueError(f"diff_erank: base and trained need the same items, got {_count(a)} and {_count(b)}")
    return a - b if isinstance(a, float) else a - b.to(a.device)


def _count(v) -> str:
    return "one item" if isinstance(v, float) else f"{v.shape[0]} items"


def alpha_entropy(x: Any, *, alpha: float = 1.0, center: bool = True, clamp: bool = False,
                  normalization: str = "raw", lengths: Any = None):
    """Matrix-based Rényi α-entropy of the tokens' Gram (Skean et al. 2025, "Layer by Layer") per item:
    rows (centred over tokens when ``center``) L2-normalised, A = ZZᵀ/tr(ZZᵀ), S_α = ln Σ λ^α / (1 − α)
    (−Σ λ ln λ at α = 1). ``clamp=True`` clamps the normalised Gram at 0 elementwise first, as the
    Layer-by-Layer code does (then S_α is no longer a function of Z's spectrum). ``normalization``:
    ``"raw"``, ``"maxEntropy"`` (÷ min(ln n, ln d)), ``"logN"`` (÷ ln n), ``"logD"`` (÷ ln d)."""
    a = _check_alpha(alpha)
    for nm, v in (("center", center), ("clamp", clamp)):
        if not isinstance(v, bool):
            raise TypeError(f"{nm} must be a bool, got {type(v).__name__} {v!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def fn(g, valid, lens, raw, idx, d):
        p, _ = _normalised_spectrum(g, valid, lens, raw, idx, d, clamp, "alpha_entropy")
        if a == 1.0:
            s = _shannon(p)
        else:
            s = torch.where(p > 0, p.clamp(min=1e-300) ** a, p.new_zeros(())).sum(-1).log() / (1.0 - a)
        if normalization == "raw":
            return s
        ln_n = lens.to(torch.float64).log()
        ln_d = torch.full_like(ln_n, math.log(d))
        div = {"maxEntropy": torch.minimum(ln_n, ln_d), "logN": ln_n, "logD": ln_d}[normalization]
        if bool((div == 0).any()):
            i = int(idx[(div == 0).cpu()][0])
            raise ValueError(f"alpha_entropy: normalization={normalization!r} divides item {i}'s entropy by "
                             f"{'ln n' if normalization == 'logN' else 'ln d' if normalization == 'logD' else 'min(ln n, ln d)'}"
                             f" = 0 (n = {int(lens[(idx == i).nonzero()[0, 0]])}, d = {d}); use normalization='raw'")
        return s / div

    items, out = _each_chunk(x, lengths, "x", "tokens" if center else None, fn)
    return items.out(out)


__all__: Sequence[str] = ("eigenscore", "llm_check_hidden_score", "matrix_entropy", "erank", "diff_erank",
                          "alpha_entropy")
