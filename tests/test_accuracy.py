"""DESIGN §3 accuracy contract: spectra × dtypes × shapes × backends × methods against the float64 SVD.

precision="exact": RankMe within 1e-4 relative of the float64 SVD *of the same (converted) input* on
every spectrum, within 1e-6 where σ_min ≥ 1e-3·σ_1; every σ_k within 1e-6·σ_1. The tier is read off
the reference spectrum itself, so it holds for every dtype (the reference sees the converted input).
precision="fast": RankMe within FAST_RANKME_RTOL, and the Spectrum says it is not exact.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast.spectrum import EXACT_RANKME_RTOL, FAST_RANKME_RTOL
from tests.conftest import (
    BACKENDS,
    DTYPES,
    GRID_SPECTRA,
    backend_or_skip,
    build,
    np_sv,
    dtype_id,
    np_rankme,
    ref_sv,
    rel_err,
    shape_id,
    sv_err,
)

SV_TOL = 1e-6  # every σ_k within 1e-6·σ_1
WELL_CONDITIONED = 1e-3  # σ_min ≥ 1e-3·σ_1 → RankMe within 1e-6
# (method, backend): the Gram on each backend, and the float64 SVD (which uses no Gram backend). "auto"
# resolves to the Gram on every grid shape: tested once in test_auto_is_the_gram, not across the grid.
ROUTES = tuple(("gram", b) for b in BACKENDS) + (("svd", None),)
ROUTE_IDS = tuple(m if b is None else f"{m}-{b}" for m, b in ROUTES)
# method="svd" is float64 LAPACK: it must agree with NumPy's float64 SVD (an independent implementation)
# to float64 rounding, far inside the contract (a float32 SVD would miss this by ~1e-7·σ_1)
SVD_SV_TOL = 1e-10
SVD_RANKME_TOL = 1e-9
# centring a mean 1e4x the spread leaves rounding noise of its own (measured ≤ 4.4e-10·σ_1 on rank-5 data,
# where NumPy's and torch's centring round differently); still 100x below a float32 route's error
SVD_SV_TOL_CENTRED = 1e-9
SVD_RANKME_TOL_CENTRED = 1e-8

# (N, d): tall, N < d, d = 1, N = 1, N not a multiple of any chunk size, many chunks.
SHAPES = ((3000, 64), (257, 300), (1000, 1), (1, 50), (5003, 40), (12000, 40))


def rankme_tol(ref: torch.Tensor) -> float:
    """The contract's tier for this reference spectrum."""
    well = float(ref.min()) >= WELL_CONDITIONED * float(ref.max())
    return 1e-6 if well else EXACT_RANKME_RTOL


def check_exact(s: rf.Spectrum, ref: torch.Tensor, what: str) -> None:
    assert s.singular_values.dtype == torch.float64, what
    assert s.singular_values.shape == ref.shape, (what, tuple(s.singular_values.shape), tuple(ref.shape))
    sv = s.singular_values
    assert bool((sv[..., :-1] >= sv[..., 1:]).all()), f"{what}: singular values not descending"
    assert bool((sv >= 0).all()), f"{what}: negative singular value"
    e_sv = sv_err(sv, ref)
    assert e_sv <= SV_TOL, f"{what}: max |σ_k - σ_k^ref| / σ_1 = {e_sv:.3e} > {SV_TOL:g}"
    want = np_rankme(ref.numpy())
    tol = rankme_tol(ref)
    e = rel_err(s.rankme(), want)
    assert e <= tol, f"{what}: RankMe {s.rankme()!r} vs reference {want!r}: rel. error {e:.3e} > {tol:g}"


def check_route(s: rf.Spectrum, x, ref: torch.Tensor, method: str, center: bool, what: str) -> None:
    """The contract against the float64 SVD; for method="svd" also float64 agreement with NumPy's SVD."""
    check_exact(s, ref, what)
    if method == "svd":
        want = np_sv(x, center=center)
        e_sv = sv_err(s.singular_values, want)
        tol = SVD_SV_TOL_CENTRED if center else SVD_SV_TOL
        assert e_sv <= tol, f"{what}: svd route vs NumPy float64 SVD: {e_sv:.3e} > {tol:g}"
        e = rel_err(s.rankme(), np_rankme(want.numpy()))
        tol = SVD_RANKME_TOL_CENTRED if center else SVD_RANKME_TOL
        assert e <= tol, f"{what}: svd route RankMe vs NumPy: {e:.3e} > {tol:g}"


# ----------------------------------------------------------------------------------------------
# the main grid


@pytest.mark.parametrize(("method", "backend"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", GRID_SPECTRA)
def test_exact_grid(matrices, kind, dtype, shape, backend, method):
    if backend is not None:
        backend_or_skip(backend)
    z = matrices.get(kind, shape, dtype)
    ref = matrices.ref(kind, shape, dtype)
    if float(ref.max()) == 0.0:  # pragma: no cover - a conversion that wiped the matrix out
        pytest.skip("the converted matrix is all zero")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact path has nothing to warn about
        s = rf.spectrum(z, method=method, backend=backend)
    n, d = shape
    assert (s.n_rows, s.n_features, s.centered) == (n, d, False)
    assert s.precision == "exact" and s.exact is True and s.rankme_rtol == EXACT_RANKME_RTOL
    assert s.method == ("svd" if method == "svd" else "gram")
    if method != "svd":
        assert s.backend == backend
    check_route(s, z, ref, method, False, f"{kind}/{dtype_id(dtype)}/{shape_id(shape)}/{backend}/{method}")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_auto_is_the_gram(matrices, shape):
    """method="auto" on in-memory 2-D input of these sizes is the exact Gram, bit for bit."""
    z = matrices.get("power1", shape, torch.float32)
    auto, gram = rf.spectrum(z), rf.spectrum(z, method="gram")
    assert auto.method == "gram" and auto.backend == gram.backend
    assert torch.equal(auto.singular_values, gram.singular_values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ("flat", "rank1", "power2", "repeated_rows"))
def test_public_rankme_matches_spectrum_and_reference(matrices, kind, backend):
    backend_or_skip(backend)
    z = matrices.get(kind, (3000, 64), torch.float32)
    ref = matrices.ref(kind, (3000, 64), torch.float32)
    for eps in (0.0, 1e-7, 1e-5):
        got = rf.rankme(z, eps, backend=backend)
        assert isinstance(got, float)
        want = np_rankme(ref.numpy(), eps)
        # ε = 0 (effective rank) on a rank-deficient spectrum is outside the contract: the float64
        # Gram's tail (~1e-8·σ_1) carries entropy that ε > 0 would swamp; check it loosely there.
        tol = rankme_tol(ref) if eps > 0 or kind == "flat" else 1e-3
        assert rel_err(got, want) <= tol, (eps, got, want)


# ----------------------------------------------------------------------------------------------
# centred metrics with a mean far from zero


CENTER_SHAPES = ((3000, 64), (257, 300), (5003, 40), (1000, 1))


@pytest.mark.parametrize(("method", "backend"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("shape", CENTER_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=dtype_id)
@pytest.mark.parametrize("kind", GRID_SPECTRA)
def test_centered_large_offset(matrices, kind, dtype, shape, backend, method):
    """Column mean 1e4× the spread of the entries: G − nμμᵀ would cancel catastrophically.
    (float16/bfloat16 cannot hold a 1e4 ratio of mean to spread: their 8-11 bit mantissas erase the data.)"""
    if backend is not None:
        backend_or_skip(backend)
    spread = float(matrices.get(kind, shape).std())
    if spread == 0.0:  # N = 1 or a constant matrix: nothing to centre
        pytest.skip("no spread")
    offset = 1e4 * spread
    z = matrices.get(kind, shape, dtype, offset=offset)
    ref = matrices.ref(kind, shape, dtype, center=True, offset=offset)
    s = rf.spectrum(z, center=True, method=method, backend=backend)
    assert s.centered is True
    check_route(s, z, ref, method, True, f"centred {kind}/{dtype_id(dtype)}/{shape_id(shape)}/{backend}/{method}")
    # and the uncentred spectrum of the same data is dominated by the mean: σ_1 ≈ offset·√(N d)
    if method == "gram":
        s0 = rf.spectrum(z, center=False, method=method, backend=backend)
        check_exact(s0, matrices.ref(kind, shape, dtype, center=False, offset=offset), "uncentred with offset")


# ----------------------------------------------------------------------------------------------
# extreme magnitudes


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize(("method", "backend"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("shape", ((3000, 64), (257, 300)), ids=shape_id)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=dtype_id)
@pytest.mark.parametrize("scale", (1e-20, 1e15, 1e30), ids=("1e-20", "1e15", "1e30"))
@pytest.mark.parametrize("kind", ("flat", "rank1", "power2", "rank8_noise"))
def test_exact_extreme_scale(matrices, kind, scale, dtype, shape, backend, method, center):
    if backend is not None:
        backend_or_skip(backend)
    z = matrices.get(kind, shape, dtype, scale=scale)
    ref = matrices.ref(kind, shape, dtype, center=center, scale=scale)
    assert 0.1 * scale < float(ref[0]) < 10 * scale
    s = rf.spectrum(z, center=center, method=method, backend=backend)
    check_route(s, z, ref, method, center, f"scale {scale:g} {kind}/{dtype_id(dtype)}/{shape_id(shape)}/{backend}/{method}")


@pytest.mark.parametrize("shape", ((3000, 64), (257, 300)), ids=shape_id)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=dtype_id)
@pytest.mark.parametrize("scale", (1e-20, 1e15, 1e30), ids=("1e-20", "1e15", "1e30"))
@pytest.mark.parametrize("kind", ("flat", "rank1", "power1"))
def test_fast_extreme_scale(matrices, kind, scale, dtype, shape):
    """precision='fast' promises RankMe within FAST_RANKME_RTOL (and says so in the Spectrum) for any
    valid input: entries of 1e-20- or 1e30-scale float32 data are normal float32 numbers (their
    squares are not, which is the implementation's problem, not the caller's)."""
    z = matrices.get(kind, shape, dtype, scale=scale)
    ref = matrices.ref(kind, shape, dtype, scale=scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = rf.spectrum(z, precision="fast")
    want = np_rankme(ref.numpy())
    e = rel_err(s.rankme(), want)
    assert e <= s.rankme_rtol == FAST_RANKME_RTOL, f"fast RankMe {s.rankme()} vs {want}: rel. error {e:.3e}"


# ----------------------------------------------------------------------------------------------
# a long matrix: N = 1000003 rows crosses every chunk boundary of every backend with a remainder


@pytest.fixture(scope="module")
def million_rows():
    out = {}
    for kind in ("power1", "rank1"):
        z64 = build(kind, 1_000_003, 8, seed=7)
        z = (z64 + 1e3 * float(z64.std())).to(torch.float32)
        out[kind] = (z, ref_sv(z), ref_sv(z, center=True))
    return out


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ("power1", "rank1"))
def test_million_rows(million_rows, kind, backend, center):
    backend_or_skip(backend)
    z, ref_raw, ref_c = million_rows[kind]
    s = rf.spectrum(z, center=center, backend=backend)
    check_exact(s, ref_c if center else ref_raw, f"1000003x8 {kind}/{backend}/center={center}")


# ----------------------------------------------------------------------------------------------
# layouts and foreign containers


def _layouts(z: torch.Tensor):
    """(name, object) pairs holding exactly the values of z (or of a documented slice of it)."""
    yield "transposed_view", z.T.contiguous().T
    yield "row_stride3", z[::3]
    yield "every_other_col", z[:, ::2]
    yield "col_and_row_stride", z.T.contiguous().T[1::2, ::3]
    if z.dtype != torch.bfloat16:  # NumPy has no bfloat16
        a = z.numpy()
        yield "numpy", a
        yield "numpy_fortran", np.asfortranarray(a)
        yield "numpy_neg_rows", a[::-1]
        yield "numpy_neg_cols", a[:, ::-1]
        yield "numpy_neg_both_strided", a[::-2, ::-3]


LAYOUT_NAMES = ("transposed_view", "row_stride3", "every_other_col", "col_and_row_stride", "numpy",
                "numpy_fortran", "numpy_neg_rows", "numpy_neg_cols", "numpy_neg_both_strided")


# NumPy has no bfloat16: the NumPy layouts run for the other three dtypes.
DTYPE_LAYOUTS = [
    pytest.param(dt, lay, id=f"{dtype_id(dt)}-{lay}")
    for dt in DTYPES
    for lay in LAYOUT_NAMES
    if not (dt == torch.bfloat16 and lay.startswith("numpy"))
]


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize("method", ("gram", "svd"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ((2001, 48), (150, 301)), ids=shape_id)
@pytest.mark.parametrize(("dtype", "layout"), DTYPE_LAYOUTS)
def test_noncontiguous_and_numpy(matrices, dtype, layout, shape, backend, method, center):
    backend_or_skip(backend)
    z = matrices.get("power1", shape, dtype, offset=3.0 if center else 0.0)
    views = dict(_layouts(z))
    x = views[layout]
    ref = ref_sv(x, center=center)
    s = rf.spectrum(x, center=center, method=method, backend=backend)
    check_route(s, x, ref, method, center, f"{layout}/{dtype_id(dtype)}/{shape_id(shape)}/{backend}/{method}")
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, views[layout]), "the input was modified"


class DLPackOnly:
    """Exposes nothing but the DLPack protocol (like a CuPy/JAX array would)."""

    def __init__(self, t: torch.Tensor):
        self._t = t

    def __dlpack__(self, *args, **kwargs):
        return self._t.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strided", (False, True), ids=("contiguous", "transposed_view"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dlpack_object(matrices, dtype, strided, backend):
    backend_or_skip(backend)
    z = matrices.get("rank8_noise", (3000, 64), dtype)
    if strided:
        z = z.T.contiguous().T
    obj = DLPackOnly(z)
    assert not isinstance(obj, (torch.Tensor, np.ndarray))
    ref = ref_sv(z)
    check_exact(rf.spectrum(obj, backend=backend), ref, f"dlpack {dtype_id(dtype)}")
    assert rel_err(rf.rankme(obj, backend=backend), np_rankme(ref.numpy())) <= EXACT_RANKME_RTOL


def test_nested_list_of_floats(matrices):
    z = matrices.get("power1", (40, 6))
    ref = ref_sv(z)
    check_exact(rf.spectrum(z.tolist()), ref, "list of lists")
    check_exact(rf.spectrum(tuple(map(tuple, z.tolist()))), ref, "tuple of tuples")


# ----------------------------------------------------------------------------------------------
# precision="fast"


FAST_SHAPES = ((3000, 64), (257, 300), (1000, 1), (1, 50), (5003, 40))


@pytest.mark.parametrize("shape", FAST_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", GRID_SPECTRA)
def test_fast_within_documented_bound(matrices, kind, dtype, shape):
    z = matrices.get(kind, shape, dtype)
    ref = matrices.ref(kind, shape, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = rf.spectrum(z, precision="fast")
    assert s.precision == "fast" and s.exact is False
    assert s.rankme_rtol == FAST_RANKME_RTOL == 1e-2
    assert s.singular_values.dtype == torch.float64 and s.singular_values.shape == ref.shape
    want = np_rankme(ref.numpy())
    e = rel_err(s.rankme(), want)
    assert e <= FAST_RANKME_RTOL, f"fast RankMe {s.rankme()} vs {want}: rel. error {e:.3e}"
    # and the public function with precision="fast" gives the same number
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert rf.rankme(z, precision="fast") == pytest.approx(s.rankme(), rel=1e-12)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("kind", ("rank1", "rank8_noise", "repeated_rows"))
def test_fast_refinement_warns(matrices, kind, dtype):
    z = matrices.get(kind, (3000, 64), dtype)
    with pytest.warns(RuntimeWarning, match=r"precision='fast'.*noise floor.*second float32 pass"):
        s = rf.spectrum(z, precision="fast")
    assert s.method == "gram+refine"
    assert s.exact is False and s.rankme_rtol == FAST_RANKME_RTOL
    assert len(s.notes) == 1 and "noise floor" in s.notes[0]
    ref = matrices.ref(kind, (3000, 64), dtype)
    assert rel_err(s.rankme(), np_rankme(ref.numpy())) <= FAST_RANKME_RTOL


def test_fast_without_refinement_is_quiet(matrices):
    z = matrices.get("flat", (3000, 64), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = rf.spectrum(z, precision="fast")
    assert s.method == "gram" and s.notes == () and s.exact is False
    assert rel_err(s.rankme(), np_rankme(matrices.ref("flat", (3000, 64), torch.float32).numpy())) <= 1e-4


@pytest.mark.parametrize("shape", ((3000, 64), (257, 300)), ids=shape_id)
@pytest.mark.parametrize("kind", GRID_SPECTRA)
def test_fast_centered(matrices, kind, shape):
    spread = float(matrices.get(kind, shape).std())
    z = matrices.get(kind, shape, torch.float32, offset=100 * spread)
    ref = matrices.ref(kind, shape, torch.float32, center=True, offset=100 * spread)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = rf.spectrum(z, center=True, precision="fast")
    assert s.centered and not s.exact
    assert rel_err(s.rankme(), np_rankme(ref.numpy())) <= FAST_RANKME_RTOL


# ----------------------------------------------------------------------------------------------
# batched (B, N, d)


BATCH_SHAPES = ((4, 300, 24), (3, 20, 45), (2, 1, 9), (5, 64, 1))


def _batch(shape, dtype, offset=0.0):
    b, n, d = shape
    kinds = ("power1", "rank1", "flat", "exp", "repeated_rows")
    z = torch.stack([build(kinds[i % len(kinds)], n, d, seed=100 + i) for i in range(b)])
    return (z + offset).to(dtype)


# one row per item centres to exactly zero (no RankMe): centred runs only where N > 1
SHAPE_CENTER = [
    pytest.param(sh, c, id=f"{shape_id(sh)}-{'centred' if c else 'raw'}")
    for sh in BATCH_SHAPES
    for c in (False, True)
    if not (c and sh[1] == 1)
]


@pytest.mark.parametrize("precision", ("exact", "fast"))
@pytest.mark.parametrize("method", ("gram", "svd", "auto"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("shape", "center"), SHAPE_CENTER)
def test_batched(shape, center, dtype, method, precision):
    b, n, d = shape
    z = _batch(shape, dtype, offset=5.0 if center else 0.0)
    ref = ref_sv(z, center=center)  # torch.linalg.svdvals is itself batched: per-item float64 SVD
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = rf.spectrum(z, center=center, method=method, precision=precision)
        r = rf.rankme(z, center=center, method=method, precision=precision)
    assert s.singular_values.shape == (b, min(n, d))
    assert isinstance(r, torch.Tensor) and r.shape == (b,) and r.dtype == torch.float64
    assert torch.equal(r, s.rankme())
    for i in range(b):
        want = np_rankme(ref[i].numpy())
        if precision == "exact":
            assert s.exact is True
            assert sv_err(s.singular_values[i], ref[i]) <= SV_TOL, i
            assert rel_err(r[i], want) <= rankme_tol(ref[i]), (i, float(r[i]), want)
        else:
            assert s.exact is False and s.rankme_rtol == FAST_RANKME_RTOL
            assert rel_err(r[i], want) <= FAST_RANKME_RTOL, (i, float(r[i]), want)


BATCH_LAYOUTS = ("transposed_items", "row_stride2", "numpy_neg_all")


@pytest.mark.parametrize("method", ("auto", "gram"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", BATCH_LAYOUTS)
def test_batched_noncontiguous(layout, backend, method):
    backend_or_skip(backend)
    z = _batch((3, 301, 24), torch.float32)
    x = {
        "transposed_items": z.transpose(1, 2).contiguous().transpose(1, 2),
        "row_stride2": z[:, ::2],
        "numpy_neg_all": z.numpy()[::-1, ::-1, ::-1],
    }[layout]
    ref = ref_sv(x)
    s = rf.spectrum(x, method=method, backend=backend)
    assert s.singular_values.shape == ref.shape
    for i in range(ref.shape[0]):
        assert sv_err(s.singular_values[i], ref[i]) <= SV_TOL, i
        assert rel_err(s.rankme()[i], np_rankme(ref[i].numpy())) <= rankme_tol(ref[i]), i


# ----------------------------------------------------------------------------------------------
# near the edge of the contract (d ≤ 8192 promised; the float64 Gram's tail grows with K)


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
def test_rank1_float32_4096(center):
    """Exactly rank-1 float32 at 4096×4096 (integer factors below 2¹¹: every product is exact in float32),
    so the reference is analytic: σ_1 = ‖a‖‖b‖, σ_2.. = 0, RankMe = exp(−(p_1 log p_1 + (K−1) ε log ε)),
    p_1 = 1 + ε. Where the Gram's rounding tail costs most (measured 4.3e-5 / 4.5e-5 relative, against
    the 1e-4 contract): ≤ 5e-5. ~3 s each on 2 cores."""
    n = d = 4096
    g = torch.Generator().manual_seed(11)
    a = torch.randint(1, 2048, (n,), generator=g, dtype=torch.float64)
    b = torch.randint(1, 2048, (d,), generator=g, dtype=torch.float64)
    z = torch.outer(a, b).to(torch.float32)
    assert torch.equal(z.to(torch.float64), torch.outer(a, b))  # exactly rank 1
    eps = 1e-7
    p1 = 1 + eps
    want = float(np.exp(-(p1 * np.log(p1) + (n - 1) * eps * np.log(eps))))
    s = rf.spectrum(z, center=center)
    if not center:
        assert rel_err(s.singular_values[0], float(a.norm() * b.norm())) < 1e-12
    assert float(s.singular_values[1]) < 1e-6 * float(s.singular_values[0])
    assert rel_err(s.rankme(), want) <= 5e-5
