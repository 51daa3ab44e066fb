"""Streaming file input (``rankme_fast.io`` + ``rankme_fast.scoring``): every reader, shard handling,
chunking, the prefetch thread and the error messages. Every number is checked against the float64
SVD of the same data (``ref_sv``) with the metric formulas written out here in NumPy."""
from __future__ import annotations

import json
import os
import re
import struct
import threading
import time

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast import io as rio
from rankme_fast.scoring import METRICS, score
from tests.conftest import np_metric, np_rankme, powerlaw_matrix, ref_metrics, ref_sv, rel_err, run_python

N, D = 3000, 48
TOL64 = 1e-9  # float64 data: the Gram route is float64-exact, far inside this
TOL = 1e-6  # lower-precision data (the reference sees the same rounded values)
ALL = tuple(METRICS)
PREFETCH_THREAD = "rankme_fast-prefetch"


# ----------------------------------------------------------------------------------------------
# data and references


def make_x(n: int = N, d: int = D, seed: int = 0, offset: float = 0.5) -> np.ndarray:
    return powerlaw_matrix(n, d, seed, offset)


def assert_metrics(res, x, tol, names=None, center=None, eps=1e-7):
    names = tuple(res.metrics) if names is None else names
    assert set(res.metrics) == set(names)
    want = ref_metrics(x, names, center=center, eps=eps)
    for m in names:
        assert rel_err(res.metrics[m], want[m]) <= tol, (m, res.metrics[m], want[m])
        assert res.centered[m] == (METRICS[m] if center is None else center), m


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD]


def wait_no_prefetch_thread(timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return prefetch_threads()


@pytest.fixture(scope="module")
def x64() -> np.ndarray:
    return make_x()


@pytest.fixture(scope="module")
def ref64(x64) -> dict:
    return ref_metrics(x64)


@pytest.fixture(autouse=True)
def _no_thread_left_behind():
    yield
    assert wait_no_prefetch_thread() == [], "a prefetch thread outlived its iterator"


# ----------------------------------------------------------------------------------------------
# .npy


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", ">f4", ">f8", ">f2"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_dtypes_and_orders(tmp_path, x64, dtype, order):
    xs = np.asarray(x64.astype(dtype), order=order)
    assert xs.dtype == np.dtype(dtype) and (xs.flags.f_contiguous if order == "F" else xs.flags.c_contiguous)
    p = tmp_path / "emb.npy"
    np.save(p, xs)
    res = score(str(p), "all", chunk_rows=700, progress=False)
    values = xs.astype(np.float64)  # the reference sees exactly the stored (rounded) values
    assert_metrics(res, values, TOL64 if dtype.endswith("f8") else TOL, names=ALL)
    assert (res.n_rows, res.total_rows, res.n_features) == (N, N, D)
    assert res.dtype == {"f2": "float16", "f4": "float32", "f8": "float64"}[dtype[1:]]
    assert res.files == (str(p),)
    assert res.source == str(p)
    json.dumps(res.as_dict())  # JSON-ready


def test_npy_default_metric_is_uncentred_rankme(tmp_path, x64, ref64):
    p = tmp_path / "emb.npy"
    np.save(p, x64)
    res = score(p, progress=False)  # a pathlib.Path works too
    assert list(res.metrics) == ["rankme"] and res.centered == {"rankme": False}
    assert rel_err(res.metrics["rankme"], ref64["rankme"]) <= TOL64
    # sanity: the centred value really is different on this data, so the convention is observable
    assert rel_err(ref_metrics(x64, ["rankme"], center=True)["rankme"], ref64["rankme"]) > 1e-3


@pytest.mark.parametrize("center", [True, False])
def test_npy_forced_centring(tmp_path, x64, center):
    p = tmp_path / "emb.npy"
    np.save(p, x64)
    res = score(str(p), ["rankme", "collapse_auc", "nesum"], center=center, progress=False)
    assert_metrics(res, x64, TOL64, center=center)
    assert set(res.spectra) == {center}


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_npy_eps(tmp_path, x64, eps):
    p = tmp_path / "emb.npy"
    np.save(p, x64)
    res = score(str(p), "rankme,effective_rank", eps=eps, progress=False)
    s = ref_sv(x64).numpy()
    assert rel_err(res.metrics["rankme"], np_rankme(s, eps)) <= TOL64
    assert rel_err(res.metrics["effective_rank"], np_rankme(s, 0.0)) <= TOL64


def test_npy_spectra_match_reference(tmp_path, x64):
    p = tmp_path / "emb.npy"
    np.save(p, x64.astype(np.float32))
    res = score(str(p), "rankme,collapse_auc", progress=False)
    for c in (False, True):
        want = ref_sv(x64.astype(np.float32), center=c)
        spec = res.spectra[c]
        assert spec.centered is c and spec.n_rows == N and spec.n_features == D
        got = spec.singular_values.to(torch.float64)
        assert got.shape == want.shape == (D,)
        assert float((got - want).abs().max() / want[0]) <= 1e-9


# ----------------------------------------------------------------------------------------------
# .safetensors

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@pytest.mark.parametrize("st_dtype", list(ST_DTYPES))
def test_safetensors_dtypes_and_key(tmp_path, x64, st_dtype):
    st = pytest.importorskip("safetensors.torch")
    dt = ST_DTYPES[st_dtype]
    emb = torch.from_numpy(x64).to(dt)
    other = torch.from_numpy(make_x(N, D, seed=1, offset=0.0)).to(dt)
    p = tmp_path / "multi.safetensors"
    st.save_file({"emb": emb, "other": other, "ids": torch.arange(N)}, str(p), metadata={"note": "x"})
    tol = TOL64 if dt == torch.float64 else TOL
    for key, data in (("emb", emb), ("other", other)):
        res = score(str(p), "rankme,collapse_auc", key=key, chunk_rows=999, progress=False)
        assert res.dtype == str(dt).replace("torch.", "")
        assert_metrics(res, data, tol)
    with pytest.raises(ValueError) as ei:
        score(str(p), progress=False)
    msg = str(ei.value)
    assert str(p) in msg and "'emb'" in msg and "'other'" in msg and "key=" in msg
    with pytest.raises(ValueError, match=r"no tensor named 'nope'.*'emb'.*'ids'.*'other'") as ei:
        score(str(p), key="nope", progress=False)
    assert str(p) in str(ei.value)


def test_safetensors_picks_the_only_2d_float_tensor(tmp_path, x64):
    st = pytest.importorskip("safetensors.torch")
    emb = torch.from_numpy(x64).to(torch.bfloat16)
    p = tmp_path / "one.safetensors"
    st.save_file({"bias": torch.randn(D), "ids": torch.arange(N), "labels": torch.zeros(N, 2, dtype=torch.int64),
                  "emb": emb, "scale": torch.ones(1, dtype=torch.bfloat16)}, str(p))
    res = score(str(p), "all", chunk_rows=512, progress=False)
    assert res.dtype == "bfloat16" and res.n_features == D
    assert_metrics(res, emb, TOL)


def test_safetensors_without_float_matrix(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    p = tmp_path / "none.safetensors"
    st.save_file({"ids": torch.arange(10), "w": torch.randn(5)}, str(p))
    with pytest.raises(ValueError, match=r"no 2-D float tensor") as ei:
        score(str(p), progress=False)
    assert str(p) in str(ei.value)
    with pytest.raises(TypeError, match=r"dtype I64") as ei:  # an integer matrix, asked for by name
        st.save_file({"ids": torch.zeros(10, 3, dtype=torch.int64)}, str(p))
        score(str(p), key="ids", progress=False)
    assert str(p) in str(ei.value)


def _st_parts(tmp_path, x):
    """A valid single-tensor safetensors file written by the library, split into (header dict, data)."""
    st = pytest.importorskip("safetensors.torch")
    p = tmp_path / "good.safetensors"
    st.save_file({"emb": torch.as_tensor(x)}, str(p))
    raw = p.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return raw, json.loads(raw[8 : 8 + hlen]), raw[8 + hlen :]


def _st_write(path, header, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_safetensors_hand_written_file_reads_like_the_library_one(tmp_path):
    x = make_x(500, 12).astype(np.float32)
    _, header, data = _st_parts(tmp_path, x)
    p = tmp_path / "rewritten.safetensors"
    _st_write(p, header, data)
    assert_metrics(score(str(p), "rankme", progress=False), x, TOL)


@pytest.mark.parametrize("case", ["header_length", "tiny", "invalid_json", "not_object", "offsets_past_eof",
                                  "truncated_data", "offsets_mismatch", "entry_not_dict"])
def test_safetensors_corrupt(tmp_path, case):
    x = make_x(500, 12).astype(np.float32)
    raw, header, data = _st_parts(tmp_path, x)
    p = tmp_path / f"{case}.safetensors"
    if case == "header_length":
        p.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
        pat = r"corrupt or truncated .*header length"
    elif case == "tiny":
        p.write_bytes(raw[:5])
        pat = r"not a \.safetensors file"
    elif case == "invalid_json":
        p.write_bytes(raw[:8] + b'{"emb": [' + raw[17:])
        pat = r"corrupt \.safetensors header"
    elif case == "not_object":
        _st_write(p, [1, 2, 3], data)
        pat = r"corrupt \.safetensors header \(not a JSON object\)"
    elif case == "offsets_past_eof":
        n = len(data)
        _st_write(p, {"emb": dict(header["emb"], data_offsets=[n, 2 * n])}, data)
        pat = r"truncated"
    elif case == "truncated_data":
        p.write_bytes(raw[:-100])
        pat = r"truncated"
    elif case == "offsets_mismatch":
        _st_write(p, {"emb": dict(header["emb"], data_offsets=[0, len(data) - 4])}, data)
        pat = r"data_offsets .* do not match shape"
    else:
        _st_write(p, {"emb": "junk"}, data)
        pat = r"corrupt \.safetensors entry 'emb'"
    with pytest.raises(ValueError, match=pat) as ei:
        score(str(p), key="emb" if case == "entry_not_dict" else None, progress=False)
    assert str(p) in str(ei.value)


def test_safetensors_negative_offsets_rejected(tmp_path):
    x = make_x(500, 12).astype(np.float32)
    _, header, data = _st_parts(tmp_path, x)
    p = tmp_path / "neg.safetensors"
    n = len(data)
    _st_write(p, {"emb": dict(header["emb"], data_offsets=[-64, n - 64])}, data)
    with pytest.raises(ValueError) as ei:
        score(str(p), progress=False)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("case", ["string_offsets", "negative_shape"])
def test_safetensors_malformed_entry_names_file(tmp_path, case):
    x = make_x(500, 12).astype(np.float32)
    _, header, data = _st_parts(tmp_path, x)
    p = tmp_path / f"{case}.safetensors"
    if case == "string_offsets":
        entry = dict(header["emb"], data_offsets=[str(v) for v in header["emb"]["data_offsets"]])
    else:
        entry = dict(header["emb"], shape=[-500, -12])
    _st_write(p, {"emb": entry}, data)
    with pytest.raises((ValueError, TypeError)) as ei:
        score(str(p), key="emb", progress=False)
    assert str(p) in str(ei.value)


# ----------------------------------------------------------------------------------------------
# .pt / .pth


def test_pt_plain_tensor(tmp_path, x64):
    t = torch.from_numpy(x64).float()
    p = tmp_path / "emb.pt"
    torch.save(t, p)
    res = score(str(p), "all", chunk_rows=640, progress=False)
    assert res.dtype == "float32"
    assert_metrics(res, t, TOL)
    with pytest.raises(ValueError, match=r"single tensor, key='x' does not apply") as ei:
        score(str(p), key="x", progress=False)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float64])
def test_pt_dict_with_key(tmp_path, x64, dt):
    a = torch.from_numpy(x64).to(dt)
    b = torch.from_numpy(make_x(N, D, seed=3)).to(dt)
    p = tmp_path / "embs.pth"
    torch.save({"a": a, "b": b, "step": 7, "ids": torch.arange(N)}, p)
    tol = TOL64 if dt == torch.float64 else TOL
    for key, data in (("a", a), ("b", b)):
        res = score(str(p), "rankme,collapse_auc", key=key, chunk_rows=1000, progress=False)
        assert res.dtype == str(dt).replace("torch.", "")
        assert_metrics(res, data, tol)
    with pytest.raises(ValueError, match=r"several 2-D tensors \['a', 'b'\].*key=") as ei:
        score(str(p), progress=False)
    assert str(p) in str(ei.value)
    with pytest.raises(ValueError, match=r"no tensor named 'c'") as ei:
        score(str(p), key="c", progress=False)
    assert str(p) in str(ei.value)


def test_pt_dict_picks_the_only_2d_tensor_and_views(tmp_path, x64):
    big = torch.from_numpy(make_x(N, 2 * D, seed=4))
    view = big[:, 5 : 5 + D].t().contiguous().t()  # non-contiguous (column-major) storage
    sliced = big[:, 10 : 10 + D]  # a view into a larger storage: torch.save keeps the storage
    p = tmp_path / "views.pt"
    torch.save({"col_major": view, "bias": torch.randn(D)}, p)
    assert_metrics(score(str(p), "rankme", chunk_rows=333, progress=False), view, TOL64)
    q = tmp_path / "slice.pt"
    torch.save(sliced, q)
    assert_metrics(score(str(q), "rankme,collapse_auc", chunk_rows=333, progress=False), sliced, TOL64)


def test_pt_legacy_format(tmp_path, x64):
    t = torch.from_numpy(x64).half()
    p = tmp_path / "legacy.pt"
    torch.save(t, p, _use_new_zipfile_serialization=False)
    assert_metrics(score(str(p), "rankme", progress=False), t, TOL)


class _Opaque:
    def __init__(self):
        self.v = 3


def test_pt_pickled_object_refused(tmp_path, x64):
    p = tmp_path / "obj.pt"
    torch.save({"emb": torch.from_numpy(x64), "cfg": _Opaque()}, p)
    with pytest.raises(ValueError, match=r"pickle") as ei:
        score(str(p), key="emb", progress=False)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("obj", ["list", "int"])
def test_pt_not_a_tensor(tmp_path, x64, obj):
    p = tmp_path / f"{obj}.pt"
    torch.save([torch.from_numpy(x64)] if obj == "list" else 5, p)
    with pytest.raises(ValueError, match=rf"holds a {obj}; expected a tensor or a dict of tensors") as ei:
        score(str(p), progress=False)
    assert str(p) in str(ei.value)


def test_pt_integer_tensor(tmp_path):
    p = tmp_path / "int.pt"
    torch.save(torch.arange(30).reshape(10, 3), p)
    with pytest.raises(TypeError, match=r"torch.int64") as ei:
        score(str(p), progress=False)
    assert str(p) in str(ei.value)


def test_pt_truncated(tmp_path, x64):
    p = tmp_path / "full.pt"
    torch.save(torch.from_numpy(x64).float(), p)
    raw = p.read_bytes()
    q = tmp_path / "cut.pt"
    q.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"corrupt or truncated \.pt") as ei:
        score(str(q), progress=False)
    assert str(q) in str(ei.value)


# ----------------------------------------------------------------------------------------------
# .h5 / .zarr


def test_hdf5(tmp_path, x64):
    h5py = pytest.importorskip("h5py")
    other = make_x(N, D, seed=5)
    p = tmp_path / "emb.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("grp/emb", data=x64.astype(np.float32), chunks=(256, D))
        f.create_dataset("ids", data=np.arange(N))
    res = score(str(p), "all", chunk_rows=700, progress=False)  # the only 2-D dataset, nested
    assert res.dtype == "float32"
    assert_metrics(res, x64.astype(np.float32), TOL)
    q = tmp_path / "two.hdf5"
    with h5py.File(q, "w") as f:
        f.create_dataset("a", data=x64)
        f.create_dataset("b", data=other.astype(">f8"))  # big-endian storage
    for key, data in (("a", x64), ("b", other)):
        assert_metrics(score(str(q), "rankme,collapse_auc", key=key, chunk_rows=1234, progress=False), data, TOL64)
    with pytest.raises(ValueError, match=r"several 2-D datasets \['a', 'b'\]") as ei:
        score(str(q), progress=False)
    assert str(q) in str(ei.value)
    with pytest.raises(ValueError, match=r"no dataset named 'zz'") as ei:
        score(str(q), key="zz", progress=False)
    assert str(q) in str(ei.value)


def test_hdf5_not_hdf5(tmp_path):
    pytest.importorskip("h5py")
    p = tmp_path / "junk.h5"
    p.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(ValueError, match=r"not a readable HDF5 file") as ei:
        score(str(p), progress=False)
    assert str(p) in str(ei.value)


def test_zarr(tmp_path, x64):
    zarr = pytest.importorskip("zarr")
    other = make_x(N, D, seed=6)
    p = str(tmp_path / "arr.zarr")
    a = zarr.open_array(p, mode="w", shape=(N, D), chunks=(256, D), dtype="f4")
    a[:] = x64.astype(np.float32)
    res = score(p, "all", chunk_rows=700, progress=False)
    assert res.dtype == "float32" and res.n_rows == N
    assert_metrics(res, x64.astype(np.float32), TOL)
    with pytest.raises(ValueError, match=r"single Zarr array, key='x' does not apply"):
        score(p, key="x", progress=False)
    g = str(tmp_path / "grp.zarr")
    grp = zarr.open_group(g, mode="w")
    for name, data in (("a", x64), ("b", other)):
        arr = grp.create_array(name, shape=data.shape, chunks=(500, D), dtype="f8")
        arr[:] = data
    ids = grp.create_array("ids", shape=(N,), dtype="i8")
    ids[:] = np.arange(N)
    for key, data in (("a", x64), ("b", other)):
        assert_metrics(score(g, "rankme,collapse_auc", key=key, chunk_rows=777, progress=False), data, TOL64)
    with pytest.raises(ValueError, match=r"several 2-D arrays \['a', 'b'\]") as ei:
        score(g, progress=False)
    assert g in str(ei.value)


# ----------------------------------------------------------------------------------------------
# sources: directories of shards, globs, lists

SHARD_ROWS = {"part_1": 700, "part_2": 800, "part_3": 650, "part_10": 850}  # natural order; sums to N
NATURAL = ["part_1", "part_2", "part_3", "part_10"]


@pytest.fixture
def shard_dir(tmp_path, x64):
    """x64 split into part_1, part_2, part_3, part_10 (.npy, float64) in natural order."""
    d = tmp_path / "shards"
    d.mkdir()
    r0 = 0
    for name in NATURAL:
        n = SHARD_ROWS[name]
        np.save(d / f"{name}.npy", x64[r0 : r0 + n])
        r0 += n
    assert r0 == N
    return d


def test_directory_of_shards(shard_dir, x64, ref64):
    res = score(str(shard_dir), "all", chunk_rows=300, progress=False)
    assert [os.path.basename(f) for f in res.files] == [f"{n}.npy" for n in NATURAL]  # not lexicographic
    assert res.n_rows == res.total_rows == N
    for m in ALL:
        assert rel_err(res.metrics[m], ref64[m]) <= TOL64, m
    single = shard_dir.parent / "single.npy"
    np.save(single, x64)
    one = score(str(single), "all", progress=False)
    for m in ALL:
        assert rel_err(res.metrics[m], one.metrics[m]) <= TOL64, m


def test_glob_and_list_sources(shard_dir, ref64):
    res = score(str(shard_dir / "part_*.npy"), "rankme", chunk_rows=512, progress=False)
    assert [os.path.basename(f) for f in res.files] == [f"{n}.npy" for n in NATURAL]
    assert rel_err(res.metrics["rankme"], ref64["rankme"]) <= TOL64
    shuffled = [shard_dir / "part_3.npy", str(shard_dir / "part_10.npy"), shard_dir / "part_1.npy",
                str(shard_dir / "part_2.npy")]
    res = score(shuffled, "rankme,collapse_auc", chunk_rows=512, progress=False)
    assert res.files == tuple(os.fspath(p) for p in shuffled)  # a list is read in the order given
    assert res.source == ",".join(os.fspath(p) for p in shuffled)
    for m in ("rankme", "collapse_auc"):
        assert rel_err(res.metrics[m], ref64[m]) <= TOL64, m
    # a list may mix a glob, a directory and files
    mixed = [str(shard_dir / "part_[12].npy"), str(shard_dir / "part_3.npy"), str(shard_dir / "part_10.npy")]
    res = score(mixed, "rankme", progress=False)
    assert [os.path.basename(f) for f in res.files] == [f"{n}.npy" for n in NATURAL]
    assert rel_err(res.metrics["rankme"], ref64["rankme"]) <= TOL64


@pytest.mark.parametrize("max_rows", [1, 699, 700, 701, 1600, 2999, N, N + 10])
def test_max_rows_across_shards_in_natural_order(shard_dir, x64, max_rows):
    res = score(str(shard_dir), "rankme,stable_rank", chunk_rows=256, max_rows=max_rows, progress=False)
    n = min(max_rows, N)
    assert res.n_rows == n and res.total_rows == N
    # with lexicographic order part_10 would come second and these rows would differ
    want = ref_sv(x64[:n]).numpy()
    assert want.shape == (min(n, D),)
    assert rel_err(res.metrics["rankme"], np_rankme(want)) <= (TOL64 if n >= D else 1e-6)
    assert rel_err(res.metrics["stable_rank"], np_metric(want, "stable_rank")) <= TOL64


def test_mixed_formats_in_one_directory(tmp_path, x64, ref64):
    st = pytest.importorskip("safetensors.torch")
    h5py = pytest.importorskip("h5py")
    x32 = x64.astype(np.float32)
    d = tmp_path / "mixed"
    d.mkdir()
    parts = {}
    r0 = 0
    for name in NATURAL:
        parts[name] = x32[r0 : r0 + SHARD_ROWS[name]]
        r0 += SHARD_ROWS[name]
    np.save(d / "part_1.npy", parts["part_1"])
    st.save_file({"emb": torch.from_numpy(parts["part_2"].copy())}, str(d / "part_2.safetensors"))
    torch.save(torch.from_numpy(parts["part_3"].copy()), d / "part_3.pt")
    with h5py.File(d / "part_10.h5", "w") as f:
        f.create_dataset("emb", data=parts["part_10"])
    res = score(str(d), "rankme,collapse_auc", chunk_rows=300, max_rows=None, progress=False)
    assert [os.path.basename(f) for f in res.files] == ["part_1.npy", "part_2.safetensors", "part_3.pt",
                                                         "part_10.h5"]
    assert_metrics(res, x32, TOL)
    # max_rows crossing from the .safetensors shard into the .pt shard
    res = score(str(d), "rankme", chunk_rows=300, max_rows=1600, progress=False)
    assert res.n_rows == 1600
    assert_metrics(res, x32[:1600], TOL)


def test_directory_ignores_other_files_with_warning(shard_dir, ref64):
    (shard_dir / "README.txt").write_text("notes")
    (shard_dir / ".hidden.npy").write_bytes(b"garbage")  # hidden entries are skipped silently
    with pytest.warns(UserWarning, match=r"ignoring 1 entries .*README\.txt"):
        res = score(str(shard_dir), "rankme", progress=False)
    assert len(res.files) == 4
    assert rel_err(res.metrics["rankme"], ref64["rankme"]) <= TOL64


def test_expand_natural_order(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    names = ["emb_10.npy", "emb_9.npy", "emb_100.npy", "emb_1.npy", "emb_2.npy"]
    for n in names:
        np.save(d / n, np.ones((2, 2)))
    want = [str(d / n) for n in ["emb_1.npy", "emb_2.npy", "emb_9.npy", "emb_10.npy", "emb_100.npy"]]
    assert rio.expand(str(d)) == want
    assert rio.expand(str(d / "emb_*.npy")) == want


# ----------------------------------------------------------------------------------------------
# chunking


@pytest.mark.parametrize("dtype", ["<f8", "<f2"])
def test_chunk_rows_independence(tmp_path, x64, dtype):
    xs = x64.astype(dtype)
    p = tmp_path / "emb.npy"
    np.save(p, xs)
    results = {c: score(str(p), "all", chunk_rows=c, progress=False) for c in (7, 100, 5000, None)}
    want = ref_metrics(xs.astype(np.float64))
    tol = TOL64 if dtype == "<f8" else TOL
    for c, res in results.items():
        for m in ALL:
            assert rel_err(res.metrics[m], want[m]) <= tol, (c, m)
            assert rel_err(res.metrics[m], results[None].metrics[m]) <= 1e-9, (c, m)


def test_chunk_rows_across_shards(shard_dir, ref64):
    for c in (7, 699, 701, 4000):
        res = score(str(shard_dir), "rankme,collapse_auc,alpha_req", chunk_rows=c, progress=False)
        for m in res.metrics:
            assert rel_err(res.metrics[m], ref64[m]) <= TOL64, (c, m)


@pytest.mark.parametrize("max_rows", [49, 1000, 2500])
def test_max_rows_single_file(tmp_path, x64, max_rows):
    p = tmp_path / "emb.npy"
    np.save(p, x64.astype(np.float32))
    res = score(str(p), "rankme,collapse_auc,participation_ratio", chunk_rows=333, max_rows=max_rows,
                progress=False)
    assert res.n_rows == max_rows and res.total_rows == N
    assert_metrics(res, x64.astype(np.float32)[:max_rows], TOL)


@pytest.mark.parametrize("kw", [{"chunk_rows": 0}, {"chunk_rows": -3}, {"max_rows": 0}, {"chunk_rows": 2.5},
                                {"max_rows": True}])
def test_bad_chunk_arguments(shard_dir, kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer"):
        score(str(shard_dir), progress=False, **kw)


# ----------------------------------------------------------------------------------------------
# bad files: every error names the file


def _npy(tmp_path, name, arr, **kw):
    p = tmp_path / name
    np.save(p, arr, **kw)
    return p


@pytest.mark.parametrize(
    ("case", "exc", "pattern"),
    [
        ("truncated", ValueError, r"truncated: header promises 3000 x 48 float32"),
        ("bad_magic", ValueError, r"not a \.npy file or corrupt header"),
        ("bad_header", ValueError, r"corrupt \.npy header"),
        ("object", ValueError, r"pickled Python objects"),
        ("int", TypeError, r"integer/bool dtype int64"),
        ("bool", TypeError, r"integer/bool dtype bool"),
        ("complex", TypeError, r"complex dtype complex128"),
        ("1d", ValueError, r"expected a 2-D \(rows, features\) array, got shape \(10,\)"),
        ("3d", ValueError, r"expected a 2-D \(rows, features\) array, got shape \(2, 3, 4\)"),
        ("0cols", ValueError, r"has 0 features"),
        ("0rows", ValueError, r"holds no rows"),
    ],
)
def test_bad_npy(tmp_path, x64, case, exc, pattern):
    if case in ("truncated", "bad_magic", "bad_header"):
        p = _npy(tmp_path, "good.npy", x64.astype(np.float32))
        raw = p.read_bytes()
        p = tmp_path / f"{case}.npy"
        if case == "truncated":
            p.write_bytes(raw[: len(raw) - 4096])
        elif case == "bad_magic":
            p.write_bytes(b"\x00JUNK!" + raw[6:])
        else:
            p.write_bytes(raw[:10] + b"{'descr': <f4, garbage" + raw[32:])
    elif case == "object":
        p = _npy(tmp_path, "obj.npy", np.array([[1.0, "a"], [2.0, "b"]], dtype=object), allow_pickle=True)
    else:
        arr = {"int": np.arange(20).reshape(10, 2), "bool": np.ones((4, 2), dtype=bool),
               "complex": np.ones((4, 2), dtype=np.complex128), "1d": np.ones(10), "3d": np.ones((2, 3, 4)),
               "0cols": np.ones((5, 0)), "0rows": np.ones((0, 5))}[case]
        p = _npy(tmp_path, f"{case}.npy", arr)
    with pytest.raises(exc, match=pattern) as ei:
        score(str(p), progress=False)
    assert str(p) in str(ei.value)


def test_bad_shard_names_file_in_directory(shard_dir):
    """The bad shard, not the directory, is named; the good shards opened before it are closed."""
    np.save(shard_dir / "part_5.npy", np.arange(10).reshape(5, 2))
    with pytest.raises(TypeError) as ei:
        score(str(shard_dir), progress=False)
    assert str(shard_dir / "part_5.npy") in str(ei.value)


def test_shards_with_different_d(tmp_path, x64):
    a = _npy(tmp_path, "a_1.npy", x64[:100])
    b = _npy(tmp_path, "a_2.npy", x64[100:200, :40])
    with pytest.raises(ValueError, match=r"has d=40 features but .* has d=48; all shards must have the same d") as ei:
        score(str(tmp_path / "a_*.npy"), progress=False)
    assert str(a) in str(ei.value) and str(b) in str(ei.value)


def test_shards_with_different_dtype(tmp_path, x64):
    a = _npy(tmp_path, "a_1.npy", x64[:100].astype(np.float32))
    b = _npy(tmp_path, "a_2.npy", x64[100:200].astype(np.float16))
    with pytest.raises(ValueError, match=r"dtype float16 .* float32.*same dtype") as ei:
        score([str(a), str(b)], progress=False)
    assert str(a) in str(ei.value) and str(b) in str(ei.value)


def test_source_errors(tmp_path, x64):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"directory holds no .*\.npy") as ei:
        score(str(empty), progress=False)
    assert str(empty) in str(ei.value)
    csv = tmp_path / "emb.csv"
    csv.write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'") as ei:
        score(str(csv), progress=False)
    assert str(csv) in str(ei.value)
    missing = tmp_path / "missing.npy"
    with pytest.raises(ValueError, match=r"no such file or directory") as ei:
        score(str(missing), progress=False)
    assert str(missing) in str(ei.value)
    pattern = str(tmp_path / "nothing_*.npy")
    with pytest.raises(ValueError, match=r"no files match this pattern") as ei:
        score(pattern, progress=False)
    assert pattern in str(ei.value)
    with pytest.raises(ValueError, match=r"no input paths given"):
        score([], progress=False)
    with pytest.raises(TypeError, match=r"expected a path"):
        score(x64, progress=False)  # data, not a path
    p = _npy(tmp_path, "emb.npy", x64)
    with pytest.raises(ValueError, match=r"key='k' does not apply") as ei:
        score(str(p), key="k", progress=False)
    assert str(p) in str(ei.value)
    with pytest.raises(ValueError, match=r"unknown metric 'rank_mee'"):
        score(str(p), "rank_mee", progress=False)


@pytest.mark.parametrize("chunk_rows", [7, 100, None])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_in_shard_names_file_and_row(shard_dir, x64, chunk_rows, bad):
    y = x64[700:1500].copy()
    y[523, 17] = bad
    y[700, 3] = bad
    np.save(shard_dir / "part_2.npy", y)
    with pytest.raises(ValueError) as ei:
        score(str(shard_dir), chunk_rows=chunk_rows, progress=False)
    msg = str(ei.value)
    assert str(shard_dir / "part_2.npy") in msg
    assert re.search(r"first in row 523\b", msg), msg  # the row inside that file, not inside the chunk
    m = re.search(r"\((\d+) NaN, (\d+) Inf\)", msg)
    assert m, msg
    n_nan, n_inf = int(m.group(1)), int(m.group(2))
    assert (n_nan >= 1 and n_inf == 0) if np.isnan(bad) else (n_inf >= 1 and n_nan == 0), msg


def test_reader_error_surfaces_through_score(shard_dir, monkeypatch):
    orig = rio.NpyReader.read

    def flaky(self, r0, r1):
        if self.path.endswith("part_3.npy") and r0 >= 200:
            raise OSError(f"{self.path}: simulated disk error at row {r0}")
        return orig(self, r0, r1)

    monkeypatch.setattr(rio.NpyReader, "read", flaky)
    with pytest.raises(OSError, match=r"part_3\.npy: simulated disk error at row 200"):
        score(str(shard_dir), chunk_rows=100, progress=False)


# ----------------------------------------------------------------------------------------------
# the prefetch iterator


class _ArrayReader(rio.Reader):
    """An in-memory reader (optionally slow / failing) to drive ``iter_chunks`` directly."""

    def __init__(self, name, arr, fail_at=None, delay=0.0):
        self.path = name
        self.arr = torch.as_tensor(arr)
        self.n_rows, self.n_features = self.arr.shape
        self.dtype = self.arr.dtype
        self.fail_at = fail_at
        self.delay = delay
        self.reads = []

    def read(self, r0, r1):
        self.reads.append((r0, r1))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_at is not None and r0 <= self.fail_at < r1:
            raise RuntimeError(f"{self.path}: boom at {self.fail_at}")
        return self.arr[r0:r1].clone()


@pytest.mark.parametrize(("chunk_rows", "max_rows"), [(333, None), (1, None), (700, 1500), (5000, None),
                                                      (64, 1), (650, 2150)])
def test_iter_chunks_covers_rows_in_order(shard_dir, x64, chunk_rows, max_rows):
    readers = rio.open_source(str(shard_dir))
    if chunk_rows == 1:  # one-row chunks: keep it small
        readers = readers[:1]
        readers[0].n_rows = 50
    try:
        total = sum(r.n_rows for r in readers)
        want_rows = total if max_rows is None else min(total, max_rows)
        got = []
        for r, r0, t in rio.iter_chunks(readers, chunk_rows, max_rows):
            assert threading.current_thread().name != PREFETCH_THREAD
            assert t.dtype == torch.float64 and t.shape[1] == D and 1 <= t.shape[0] <= chunk_rows
            got.append((r.path, r0, t))
        # order: by file (natural order), then by r0; chunks never straddle files
        offsets = {r.path: o for r, o in zip(readers, np.cumsum([0] + [r.n_rows for r in readers]))}
        pos = 0
        for path, r0, t in got:
            assert offsets[path] + r0 == pos
            pos += t.shape[0]
        assert pos == want_rows
        cat = torch.cat([t for _, _, t in got])
        assert torch.equal(cat, torch.from_numpy(x64[:want_rows]))
    finally:
        for r in readers:
            r.close()


def test_iter_chunks_plan_is_exact():
    a = _ArrayReader("a", torch.arange(10.0).reshape(5, 2))
    b = _ArrayReader("b", torch.arange(10.0, 24.0).reshape(7, 2))
    empty = _ArrayReader("e", torch.zeros(0, 2))
    got = [(r.path, r0, t.shape[0]) for r, r0, t in rio.iter_chunks([a, empty, b], 3, max_rows=10)]
    assert got == [("a", 0, 3), ("a", 3, 2), ("b", 0, 3), ("b", 3, 2)]
    assert a.reads == [(0, 3), (3, 5)] and b.reads == [(0, 3), (3, 5)] and empty.reads == []
    with pytest.raises(ValueError, match=r"chunk_rows must be >= 1"):
        next(rio.iter_chunks([a], 0))


def test_iter_chunks_reader_exception_surfaces():
    a = _ArrayReader("good", torch.randn(30, 4, dtype=torch.float64))
    b = _ArrayReader("bad", torch.randn(30, 4, dtype=torch.float64), fail_at=17)
    seen = []
    with pytest.raises(RuntimeError, match=r"^bad: boom at 17$"):
        for r, r0, t in rio.iter_chunks([a, b], 5):
            seen.append((r.path, r0))
    # everything before the failing chunk was delivered, in order, and nothing after it
    assert seen == [("good", r0) for r in [0] for r0 in range(0, 30, 5)] + [("bad", 0), ("bad", 5), ("bad", 10)]
    assert wait_no_prefetch_thread() == []


@pytest.mark.parametrize("how", ["break", "close", "consumer_raises"])
def test_iter_chunks_early_exit_stops_thread(how):
    r = _ArrayReader("slow", torch.randn(10_000, 4, dtype=torch.float64), delay=0.001)
    it = rio.iter_chunks([r], 10, prefetch=2)
    first = next(it)
    assert first[1] == 0
    assert len(prefetch_threads()) == 1
    time.sleep(0.05)  # let the worker fill the queue and block on put
    if how == "break":
        for i, _ in enumerate(it):
            if i == 2:
                break
        del it
    elif how == "close":
        it.close()
    else:
        with pytest.raises(KeyError):
            for _ in it:
                raise KeyError("consumer failed")
        del it
    assert wait_no_prefetch_thread(timeout=2.0) == []
    # the worker stopped long before reading all 1000 chunks (it reads at most prefetch+2 ahead)
    assert len(r.reads) < 50



@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_chunks_outlive_their_reader(tmp_path, fmt):
    """A chunk the consumer keeps must stay valid after the reader is closed (run in a child process:
    the failure mode is a segfault)."""
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    res = run_python(f"""
        import numpy as np, torch
        from rankme_fast import io as rio
        x = np.random.default_rng(0).random((1000, 8)).astype(np.float32)
        if "{fmt}" == "npy":
            np.save("a.npy", x)
        else:
            from safetensors.torch import save_file
            save_file({{"emb": torch.from_numpy(x)}}, "a.safetensors")
        readers = rio.open_source("a.{fmt}")
        kept = [t for _, _, t in rio.iter_chunks(readers, 100)]
        for r in readers:
            r.close()
        print(repr(float(torch.cat(kept).double().sum())), repr(float(x.astype(np.float64).sum())))
    """, tmp_path, check=False, timeout=120)
    assert res.returncode == 0, f"rc={res.returncode} (-11 = SIGSEGV)\n{res.stderr[-2000:]}"
    got, want = map(float, res.stdout.split())
    assert got == want


def test_score_error_traceback_locals_are_safe(tmp_path):
    """After score() raises on a NaN, the chunk tensors referenced by the traceback frames must still
    be readable (loggers, pytest -l, debuggers render frame locals); the readers were closed already."""
    res = run_python("""
        import traceback
        import numpy as np
        import rankme_fast as rf
        x = np.random.default_rng(0).random((1000, 8)).astype(np.float32)
        x[950, 2] = np.nan
        np.save("nan.npy", x)
        try:
            rf.score("nan.npy", chunk_rows=100, progress=False)
        except ValueError as e:
            exc = e
        print("row 950" in str(exc))
        te = traceback.TracebackException.from_exception(exc, capture_locals=True)
        print(len("".join(te.format())) > 0)
    """, tmp_path, check=False, timeout=120)
    assert res.returncode == 0, f"rc={res.returncode} (-11 = SIGSEGV)\n{res.stderr[-2000:]}"
    assert res.stdout.split() == ["True", "True"]


def test_score_error_leaves_no_thread(shard_dir):
    y = np.load(shard_dir / "part_1.npy")
    y[5, 0] = np.nan
    np.save(shard_dir / "part_1.npy", y)
    with pytest.raises(ValueError, match=r"row 5\b"):
        score(str(shard_dir), chunk_rows=10, progress=False)  # fails on the first chunk of many
    assert wait_no_prefetch_thread(timeout=2.0) == []


# ----------------------------------------------------------------------------------------------
# progress bar


def test_progress_bar_on_stderr(tmp_path, x64, ref64, capsys):
    p = tmp_path / "withbar.npy"
    np.save(p, x64)
    res = score(str(p), "rankme", chunk_rows=500, progress=True)
    err = capsys.readouterr().err
    assert "withbar.npy" in err and "row" in err, err
    assert rel_err(res.metrics["rankme"], ref64["rankme"]) <= TOL64


def test_no_progress_bar(tmp_path, x64, ref64, capsys):
    p = tmp_path / "nobar.npy"
    np.save(p, x64)
    res = score(str(p), "rankme", chunk_rows=500, progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    assert rel_err(res.metrics["rankme"], ref64["rankme"]) <= TOL64
    res = score(str(p), "rankme", chunk_rows=500)  # default: only on a terminal; capsys is not one
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
def test_spectrum_and_metrics_of_a_path_stream(tmp_path, center):
    """rf.spectrum / rf.rankme / rf.collapse_auc accept a path (file or shard directory) and stream it."""
    g = np.random.default_rng(11)
    x = (g.standard_normal((2500, 24)) * np.linspace(3.0, 0.1, 24) + 2.0).astype(np.float32)
    d = tmp_path / "shards"
    d.mkdir()
    for i, part in enumerate(np.array_split(x, 3)):
        np.save(d / f"part_{i}.npy", part)
    np.save(tmp_path / "all.npy", x)
    ref = ref_sv(x, center).numpy()
    for src in (str(tmp_path / "all.npy"), str(d)):
        s = rf.spectrum(src, center=center)
        assert s.centered is center and s.n_rows == 2500 and s.n_features == 24
        assert float(np.abs(s.singular_values.numpy() - ref).max()) <= 1e-9 * ref[0]
        assert rel_err(rf.rankme(src, center=center), np_rankme(ref)) <= 1e-9
    with pytest.raises(ValueError, match=r"use method='auto' or 'gram' and precision='exact'"):
        rf.spectrum(str(d), precision="fast")


def _npy_v3(path, x: np.ndarray) -> None:
    """Write a format-3.0 .npy by hand (numpy writes 3.0 only for unicode field names)."""
    head = repr({"descr": np.lib.format.dtype_to_descr(x.dtype), "fortran_order": False, "shape": x.shape})
    pad = 64 - (len(b"\x93NUMPY") + 2 + 4 + len(head.encode()) + 1) % 64
    body = (head + " " * pad + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x03\x00" + struct.pack("<I", len(body)) + body + x.tobytes())


def test_npy_format_version_3(tmp_path):
    x = np.random.default_rng(3).standard_normal((300, 9)).astype(np.float32)
    p = tmp_path / "v3.npy"
    _npy_v3(p, x)
    assert np.array_equal(np.load(p), x)  # numpy agrees the file is valid
    assert rel_err(score(str(p), progress=False).metrics["rankme"], np_rankme(ref_sv(x).numpy())) <= 1e-9


def test_npy_negative_shape_names_the_file(tmp_path):
    x = np.ones((4, 8), np.float32)
    p = tmp_path / "neg.npy"
    np.save(p, x)
    raw = p.read_bytes().replace(b"(4, 8)", b"(-1, 8)", 1)
    p.write_bytes(raw)
    with pytest.raises(ValueError, match=re.escape(str(p)) + r": corrupt header: shape \(-1, 8\)"):
        score(str(p), progress=False)


def test_npy_trailing_bytes_warn(tmp_path):
    x = np.random.default_rng(4).standard_normal((40, 6)).astype(np.float32)
    p = tmp_path / "trail.npy"
    np.save(p, x)
    with open(p, "ab") as f:
        f.write(b"\0" * 96)
    with pytest.warns(UserWarning, match=r"96 bytes after the 40 x 6 array"):
        res = score(str(p), progress=False)
    assert res.n_rows == 40
    assert rel_err(res.metrics["rankme"], np_rankme(ref_sv(x).numpy())) <= 1e-9


def test_many_shards_with_few_file_descriptors(tmp_path):
    """Shards are opened one (or two) at a time: 300 shards score under a 64-descriptor limit."""
    x = np.random.default_rng(5).standard_normal((1200, 7)).astype(np.float32)
    d = tmp_path / "many"
    d.mkdir()
    for i, part in enumerate(np.array_split(x, 300)):
        np.save(d / f"s{i}.npy", part)
    code = f"""
import resource, json, rankme_fast as rf
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
r = rf.score({str(d)!r}, progress=False, chunk_rows=3)
print(json.dumps([r.n_rows, r.metrics["rankme"]]))
"""
    out = run_python(code, tmp_path)
    n, val = json.loads(out.stdout.strip().splitlines()[-1])
    assert n == 1200
    assert rel_err(val, np_rankme(ref_sv(x).numpy())) <= 1e-9


def test_nested_zarr_group(tmp_path):
    zarr = pytest.importorskip("zarr")
    x = np.random.default_rng(6).standard_normal((200, 5))
    root = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    sub = root.create_group("sub")
    arr = sub.create_array("emb", shape=x.shape, dtype="f8") if hasattr(sub, "create_array") else \
        sub.create_dataset("emb", shape=x.shape, dtype="f8")
    arr[:] = x
    want = np_rankme(ref_sv(x).numpy())
    assert rel_err(score(str(tmp_path / "g.zarr"), progress=False).metrics["rankme"], want) <= 1e-9
    assert rel_err(score(str(tmp_path / "g.zarr"), key="sub/emb", progress=False).metrics["rankme"], want) <= 1e-9


def test_score_arguments_checked_before_streaming(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.ones((10, 3), np.float32))
    with pytest.raises(TypeError, match=r"center must be None, True or False, got 'no'"):
        score(str(p), center="no", progress=False)
    with pytest.raises(ValueError, match=r"eps must be a number in \[0, 1\), got 2"):
        score(str(p), eps=2, progress=False)


def test_metric_errors_name_the_source(tmp_path):
    p = tmp_path / "zeros.npy"
    np.save(p, np.zeros((10, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape(str(p)) + r": .*all-zero"):
        score(str(p), progress=False)
