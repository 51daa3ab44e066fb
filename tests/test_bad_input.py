"""DESIGN §6: structurally invalid input raises a TypeError/ValueError naming the problem; non-finite
values raise saying how many and where; an all-zero spectrum has no RankMe. Nothing silently passes."""
from __future__ import annotations

import warnings

import re

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast import metrics as M
from tests.conftest import BACKENDS, DTYPES, backend_or_skip, dtype_id, np_rankme, ref_sv, rel_err, require_native

PUBLIC_METRICS = ("rankme", "effective_rank", "collapse_auc", "alpha_req", "stable_rank", "participation_ratio",
                  "nesum")


def _entry_points():
    """Every public function that takes raw embeddings, as (id, callable)."""
    yield "spectrum", rf.spectrum
    for name in PUBLIC_METRICS:
        yield name, getattr(rf, name)
    yield "eigenscore", rf.eigenscore


ENTRY_POINTS = dict(_entry_points())


# ----------------------------------------------------------------------------------------------
# structure: ndim, emptiness


@pytest.mark.parametrize("fn", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((7,), r"expected a 2-D or 3-D tensor .*got shape \(7,\)"),
        ((2, 3, 4, 5), r"expected a 2-D or 3-D tensor .*got shape \(2, 3, 4, 5\)"),
        ((), r"expected a 2-D or 3-D tensor .*got shape \(\)"),
        ((0, 5), r"empty input of shape \(0, 5\)"),
        ((5, 0), r"empty input of shape \(5, 0\)"),
        ((0, 0), r"empty input of shape \(0, 0\)"),
        ((3, 0, 4), r"empty input of shape \(3, 0, 4\)"),
        ((0, 4, 4), r"empty input of shape \(0, 4, 4\)"),
    ],
    ids=["1d", "4d", "0d", "0rows", "0cols", "0x0", "batch_0rows", "batch_0items"],
)
def test_bad_shape(fn, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        ENTRY_POINTS[fn](torch.zeros(shape))


def test_lidar_rejects_3d():
    with pytest.raises(ValueError, match=r"expected a 2-D tensor .*got shape \(2, 6, 3\)"):
        rf.lidar(torch.randn(2, 6, 3), np.arange(2))


# ----------------------------------------------------------------------------------------------
# dtypes and containers


BAD_OBJECTS = [
    ("torch_complex64", lambda: torch.randn(6, 3, dtype=torch.complex64), TypeError, r"complex input is not accepted \(dtype torch.complex64\)"),
    ("numpy_complex128", lambda: np.ones((6, 3), dtype=np.complex128), TypeError, r"complex input is not accepted \(dtype torch.complex128\)"),
    ("torch_int64", lambda: torch.ones(6, 3, dtype=torch.int64), TypeError, r"integer/bool input is not accepted \(dtype torch.int64\)"),
    ("torch_uint8", lambda: torch.ones(6, 3, dtype=torch.uint8), TypeError, r"integer/bool input is not accepted \(dtype torch.uint8\)"),
    ("numpy_int32", lambda: np.ones((6, 3), dtype=np.int32), TypeError, r"integer/bool input is not accepted \(dtype torch.int32\)"),
    ("torch_bool", lambda: torch.ones(6, 3, dtype=torch.bool), TypeError, r"integer/bool input is not accepted \(dtype torch.bool\)"),
    ("numpy_bool", lambda: np.ones((6, 3), dtype=bool), TypeError, r"integer/bool input is not accepted \(dtype torch.bool\)"),
    ("numpy_object", lambda: np.ones((6, 3), dtype=object), TypeError, r"object arrays are not accepted .*shape \(6, 3\) and dtype object"),
    ("numpy_str", lambda: np.array([["a", "b"], ["c", "d"]]), TypeError, r"non-numeric dtype <U1 is not accepted"),
    ("numpy_datetime", lambda: np.zeros((4, 2), dtype="datetime64[s]"), TypeError, r"non-numeric dtype datetime64\[s\]"),
    ("bytes", lambda: b"\x00\x01", TypeError, r"got bytes"),
    ("dict", lambda: {"z": [1.0]}, TypeError, r"got dict"),
    ("none", lambda: None, TypeError, r"got NoneType"),
    ("float", lambda: 3.0, TypeError, r"got float"),
    ("list_of_int_lists", lambda: [[1, 2, 3], [4, 5, 6]], TypeError, r"integer/bool input is not accepted \(dtype torch.int64\)"),
    ("list_of_bool_lists", lambda: [[True, False], [False, True]], TypeError, r"integer/bool input is not accepted \(dtype torch.bool\)"),
    ("list_of_str_lists", lambda: [["a", "b"], ["c", "d"]], TypeError, r"sequence holds non-numeric values \(dtype <U1\)"),
    ("ragged_list", lambda: [[1.0, 2.0], [3.0]], ValueError, r"ragged or malformed nested sequence"),
    ("float8", lambda: torch.zeros(4, 4).to(torch.float8_e4m3fn), TypeError, r"unsupported float dtype torch.float8_e4m3fn"),
]


@pytest.mark.parametrize("fn", ("spectrum", "rankme", "collapse_auc", "eigenscore"))
@pytest.mark.parametrize(("make", "exc", "pattern"), [b[1:] for b in BAD_OBJECTS], ids=[b[0] for b in BAD_OBJECTS])
def test_bad_dtype_or_container(fn, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ENTRY_POINTS[fn](make())


def test_list_of_float_lists_accepted():
    rows = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]
    s = rf.spectrum(rows)
    torch.testing.assert_close(s.singular_values, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), rtol=1e-14, atol=1e-14)
    assert rf.rankme(rows, 0.0) == pytest.approx(float(np.exp(-sum(p * np.log(p) for p in (0.5, 1 / 3, 1 / 6)))), rel=1e-12)


def test_lidar_and_eigenscore_reject_integer_embeddings():
    with pytest.raises(TypeError, match=r"integer/bool input is not accepted"):
        rf.lidar(np.ones((6, 3), dtype=np.int64), np.repeat(np.arange(3), 2))
    with pytest.raises(TypeError, match=r"complex input is not accepted"):
        rf.eigenscore(torch.ones(3, 4, dtype=torch.complex128))


# ----------------------------------------------------------------------------------------------
# non-finite values


def _with_nonfinite(shape, dtype):
    """Three non-finite values — NaN at rows 7 and 12, +Inf at row 9 — the first one in row 7."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    z[12, 0] = float("nan")
    z[7, min(3, shape[1] - 1)] = float("nan")
    z[9, min(1, shape[1] - 1)] = float("inf")
    return z


NONFINITE_MSG = r"found 3 non-finite values \(2 NaN, 1 Inf\) in input of shape \({n}, {d}\), first in row 7"


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize(("method", "precision"), [("auto", "exact"), ("gram", "exact"), ("svd", "exact"), ("auto", "fast")],
                         ids=("auto", "gram", "svd", "fast"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ((20, 10), (15, 40)), ids=("20x10", "15x40_N_lt_d"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nonfinite_reports_count_and_first_row(dtype, shape, backend, method, precision, center):
    backend_or_skip(backend)
    z = _with_nonfinite(shape, dtype)
    with pytest.raises(ValueError, match=NONFINITE_MSG.format(n=shape[0], d=shape[1])):
        rf.spectrum(z, center=center, method=method, precision=precision, backend=backend)


def test_nonfinite_numpy_and_metric_functions():
    z = _with_nonfinite((20, 10), torch.float32).numpy()
    for name in PUBLIC_METRICS:
        with pytest.raises(ValueError, match=NONFINITE_MSG.format(n=20, d=10)):
            getattr(rf, name)(z)


def test_nonfinite_first_row_beyond_first_scan_block():
    """The finite check scans in row blocks of 2^22/d rows; the first bad row lies in the second block."""
    d = 2000
    z = torch.ones(3000, d, dtype=torch.float32)
    z[2500, 17] = float("-inf")
    z[2900, 3] = float("nan")
    z[2900, 4] = float("nan")
    with pytest.raises(ValueError, match=r"found 3 non-finite values \(2 NaN, 1 Inf\) .*first in row 2500"):
        rf.spectrum(z, method="svd")


@pytest.mark.parametrize(("method", "precision"), [("auto", "exact"), ("svd", "exact"), ("gram", "exact"), ("auto", "fast")],
                         ids=("auto", "svd", "gram", "fast"))
def test_nonfinite_batched_names_item_and_row(method, precision):
    """Batched input: the count is over the whole batch and the place names the batch item."""
    z = torch.randn(3, 10, 4, dtype=torch.float64)
    z[1, 4, 2] = float("nan")
    z[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"found 2 non-finite values \(1 NaN, 1 Inf\) in input of shape \(3, 10, 4\), "
                                         r"first in batch item 1, row 4"):
        rf.spectrum(z, method=method, precision=precision)


def test_nonfinite_lidar_and_eigenscore():
    z = _with_nonfinite((20, 10), torch.float64)
    with pytest.raises(ValueError, match=NONFINITE_MSG.format(n=20, d=10)):
        rf.lidar(z, np.repeat(np.arange(10), 2))
    with pytest.raises(ValueError, match=r"x: item 0 holds \d+ non-finite value\(s\), the first \((nan|inf|-inf)\) in token"):
        rf.eigenscore(z)


# ----------------------------------------------------------------------------------------------
# zero spectra and overflow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ((30, 8), (4, 9)), ids=("30x8", "4x9_N_lt_d"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_all_zero_matrix_has_no_rankme(dtype, shape, backend):
    backend_or_skip(backend)
    z = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=r"RankMe is undefined for an all-zero spectrum"):
        rf.rankme(z, backend=backend)
    with pytest.raises(ValueError, match=r"all-zero"):
        rf.rankme(z, method="svd")
    with pytest.raises(ValueError, match=r"all-zero"):
        rf.effective_rank(z, backend=backend)


@pytest.mark.parametrize("name", ("collapse_auc", "stable_rank", "participation_ratio", "nesum", "effective_rank"))
def test_all_zero_other_metrics(name):
    with pytest.raises(ValueError, match=r"undefined for an all-zero spectrum"):
        getattr(rf, name)(torch.zeros(10, 6))


def test_constant_rows_centre_to_zero():
    z = torch.full((50, 6), 3.25)
    with pytest.raises(ValueError, match=r"collapse AUC is undefined for an all-zero spectrum"):
        rf.collapse_auc(z)  # centred by default
    with pytest.raises(ValueError, match=r"all-zero"):
        rf.rankme(z, center=True)
    assert rf.rankme(z) == pytest.approx(np_rankme(ref_sv(z).numpy()), rel=1e-4)  # uncentred: rank 1, fine


def test_all_zero_batch_item():
    z = torch.randn(3, 10, 4, dtype=torch.float64)
    z[1] = 0.0
    with pytest.raises(ValueError, match=r"all-zero"):
        rf.rankme(z)


def test_zero_singular_values_in_metric_functions():
    with pytest.raises(ValueError, match=r"all-zero"):
        M.rankme(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"all-zero"):
        M.collapse_auc(torch.zeros(2, 5, dtype=torch.float64))
    sv = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"alpha_req: an eigenvalue in the fit range i=2..6 is zero"):
        M.alpha_req(sv, (2, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ("auto", "gram"))
@pytest.mark.parametrize("shape", ((100, 10), (10, 30)), ids=("100x10", "10x30_N_lt_d"))
def test_float64_square_overflow(shape, method, backend):
    """|x| ~ 1e200: the squares overflow float64, so the Gram is formed of an exact power-of-two-scaled copy
    (issue 14, item 8; this used to be a 'rescale the embeddings' error). The value is the float64 SVD's."""
    backend_or_skip(backend)
    z0 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = z0 * 1e200
    got = rf.rankme(z, method=method, backend=backend)
    assert rel_err(got, np_rankme(torch.linalg.svdvals(z0).numpy())) < 1e-9  # RankMe is scale-invariant


# ----------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"method": "eig"}, ValueError, r"method must be one of \('auto', 'svd', 'gram', 'randomized', 'lanczos', 'slq'\), got 'eig'"),
        ({"method": "SVD"}, ValueError, r"method must be one of .*got 'SVD'"),
        ({"precision": "double"}, ValueError, r"precision must be one of \('exact', 'fast'\), got 'double'"),
        ({"precision": None}, ValueError, r"precision must be one of .*got None"),
        ({"backend": "tpu"}, ValueError,
         r"unknown backend 'tpu'; choose one of \['cpu', 'cuda', 'torch', 'triton'\] or 'auto'"),
        ({"backend": "CUDA"}, ValueError, r"unknown backend 'CUDA'"),
    ],
    ids=("method_eig", "method_case", "precision_double", "precision_none", "backend_tpu", "backend_case"),
)
@pytest.mark.parametrize("fn", ("spectrum", "rankme", "collapse_auc"))
def test_bad_option_names(fn, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ENTRY_POINTS[fn](torch.randn(50, 4), **kwargs)


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [((50, 4), {"method": "svd"}), ((50, 4), {"precision": "fast"}), ((3, 50, 4), {}), ((3, 50, 4), {"method": "svd"})],
    ids=("2d_svd", "2d_fast", "3d_auto", "3d_svd"),
)
def test_unknown_backend_rejected_on_every_route(shape, kwargs):
    """A misspelt explicit backend is an error whichever decomposition route ends up running."""
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'"):
        rf.spectrum(torch.randn(shape), backend="tpu", **kwargs)


@pytest.mark.parametrize("name", ("cuda", "triton"))
def test_gpu_backend_on_cpu_tensor_raises(monkeypatch, name):
    """An explicit GPU backend for CPU data is an error naming why (never a silent fallback)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=rf"backend '{name}' was requested but cannot run on cpu: "
                                           r".*(cannot read cpu memory|need a CUDA device)"):
        rf.spectrum(torch.randn(50, 4), backend=name)


@pytest.mark.parametrize("eps", (-1e-7, float("nan"), float("inf"), 1.0, 5), ids=("negative", "nan", "inf", "one", "5"))
def test_bad_rankme_eps(eps):
    """One rule for the Python API and the CLI's --eps: 0 <= eps < 1."""
    with pytest.raises(ValueError, match=r"eps must be in \[0, 1\), got "):
        rf.rankme(torch.randn(50, 4), eps)


@pytest.mark.parametrize("index_range", ((0, 10), (10, 5), (-1, 3)), ids=str)
def test_bad_alpha_req_range(index_range):
    with pytest.raises(ValueError, match=r"index_range must be \(first, last\) with 1 <= first <= last"):
        rf.alpha_req(torch.randn(200, 20), index_range)


def test_alpha_req_range_beyond_k():
    with pytest.raises(ValueError, match=r"alpha_req needs at least 2 eigenvalues in the index range \(5, 100\), but K = 5"):
        rf.alpha_req(torch.randn(200, 5))


@pytest.mark.parametrize("value", ("nope", "TPU", "torch,cpu"))
def test_backend_env_var_unknown(monkeypatch, value):
    monkeypatch.setenv("RANKME_FAST_BACKEND", value)
    with pytest.raises(ValueError, match=r"unknown backend '.*'; choose one of \['cpu', 'cuda', 'torch', 'triton'\]"):
        rf.rankme(torch.randn(50, 4))


@pytest.mark.parametrize("value", ("torch", "cpu", "auto", " Torch "))
def test_backend_env_var_known(monkeypatch, value):
    if value.strip().lower() == "cpu":
        require_native()
    monkeypatch.setenv("RANKME_FAST_BACKEND", value)
    z = torch.randn(50, 4, dtype=torch.float64)
    s = rf.spectrum(z)
    expected = value.strip().lower()
    if expected != "auto":
        assert s.backend == expected
    want = torch.linalg.svdvals(z)
    assert float((s.singular_values - want).abs().max()) <= 1e-12 * float(want[0])


def test_backend_env_var_does_not_override_explicit_argument(monkeypatch):
    monkeypatch.setenv("RANKME_FAST_BACKEND", "nope")
    assert rf.spectrum(torch.randn(50, 4), backend="torch").backend == "torch"


@pytest.mark.parametrize("value", ("0", "-2", "two"))
def test_num_threads_env_var(monkeypatch, value):
    require_native()
    monkeypatch.setenv("RANKME_FAST_NUM_THREADS", value)
    with pytest.raises(ValueError, match=r"RANKME_FAST_NUM_THREADS must be a positive integer, got"):
        rf.rankme(torch.randn(50, 4), backend="cpu")


# ----------------------------------------------------------------------------------------------
# LiDAR and EigenScore arguments


def _views():
    g = torch.Generator().manual_seed(4)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), np.repeat(np.arange(4), 3)


def test_lidar_one_group():
    z, _ = _views()
    with pytest.raises(ValueError, match=r"lidar needs at least 2 distinct groups, got 1"):
        rf.lidar(z, np.zeros(12, dtype=np.int64))


def test_lidar_no_group_with_two_views():
    z, _ = _views()
    with pytest.raises(ValueError, match=r"at least one group with 2 or more views"):
        rf.lidar(z, np.arange(12))


@pytest.mark.parametrize(
    "groups",
    [np.repeat(np.arange(4), 3).astype(np.float64), torch.repeat_interleave(torch.arange(4.0), 3),
     [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0], np.array(["a"] * 6 + ["b"] * 6),
     torch.ones(12, dtype=torch.bool)],
    ids=("numpy_float", "torch_float", "list_float", "numpy_str", "torch_bool"),
)
def test_lidar_non_integer_groups(groups):
    z, _ = _views()
    with pytest.raises(TypeError, match=r"groups: need integer group ids, got dtype"):
        rf.lidar(z, groups)


@pytest.mark.parametrize("groups", [np.repeat(np.arange(4), 2), np.repeat(np.arange(4), 4), np.zeros((12, 1), np.int64)],
                         ids=("too_short", "too_long", "2d"))
def test_lidar_groups_wrong_length(groups):
    z, _ = _views()
    with pytest.raises(ValueError, match=r"groups: need one id per row of x, i.e. shape \(12,\), got"):
        rf.lidar(z, groups)


@pytest.mark.parametrize(("delta", "eps"), [(-1e-4, 1e-8), (1e-4, -1.0)], ids=("neg_delta", "neg_eps"))
def test_lidar_negative_regularisers(delta, eps):
    z, g = _views()
    with pytest.raises(ValueError, match=r"delta and eps must be >= 0"):
        rf.lidar(z, g, delta=delta, eps=eps)


@pytest.mark.parametrize("alpha", (0.0, -1e-3, float("nan")), ids=("zero", "negative", "nan"))
def test_eigenscore_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got"):
        rf.eigenscore(torch.randn(4, 16), alpha=alpha)


def test_eigenscore_one_feature():
    with pytest.raises(ValueError, match=r"eigenscore needs d >= 2 features to form a covariance, got d = 1"):
        rf.eigenscore(torch.randn(4, 1))


def test_inputs_are_not_modified():
    """Validation never writes into the caller's buffer (NaN rows are not zeroed, values not clamped)."""
    z = _with_nonfinite((20, 10), torch.float32)
    before = z.clone()
    with pytest.raises(ValueError):
        rf.rankme(z)
    assert torch.equal(torch.isnan(z), torch.isnan(before))
    assert torch.equal(torch.nan_to_num(z), torch.nan_to_num(before))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w = torch.randn(300, 7)
        w0 = w.clone()
        rf.spectrum(w, center=True, precision="fast")
        rf.spectrum(w, center=True)
        assert torch.equal(w, w0)


@pytest.mark.parametrize("fn", ("spectrum", "rankme", "collapse_auc"))
def test_missing_path_names_the_file(fn, tmp_path):
    """Strings are paths to stream (issue 3); a missing one is a ValueError naming it."""
    missing = str(tmp_path / "embeddings.npy")
    with pytest.raises(ValueError, match=re.escape(missing) + r": no such file or directory"):
        getattr(rf, fn)(missing)


def test_path_is_not_accepted_where_no_streaming_exists():
    with pytest.raises(TypeError, match=r"expected a torch.Tensor, a NumPy array or an object with __dlpack__, got str"):
        rf.eigenscore("embeddings.npy")
