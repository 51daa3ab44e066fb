"""Issue 14, readers: no file makes ``score`` crash, hang or return a silently wrong number. Each case
is a clear error naming the file (and what is wrong with it), or a correct result checked against the
float64 SVD. Cases that could hang or kill the process run in a child interpreter with a timeout."""
from __future__ import annotations

import json
import os
import re
import struct
import time
import warnings

import numpy as np
import pytest
import torch

from rankme_fast import io as rio
from rankme_fast.scoring import score
from tests.conftest import np_rankme, ref_sv, rel_err, run_python


def rankme_ref(x) -> float:
    return float(np_rankme(ref_sv(np.asarray(x, dtype=np.float64)).numpy()))


def xmat(n=2000, d=8, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.standard_normal((n, d)) * np.linspace(2.0, 0.2, d) + 0.3).astype(np.float32)


def raises_naming(path, exc, pattern, fn, *a, **kw):
    with pytest.raises(exc) as ei:
        fn(*a, **kw)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: ") and re.search(pattern, msg), msg
    return msg


def st_write(path, header_text: str, data: bytes) -> None:
    h = header_text.encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def st_entry(x: np.ndarray, begin: int = 0) -> dict:
    return {"dtype": "F32", "shape": list(x.shape), "data_offsets": [begin, begin + x.nbytes]}


# ----------------------------------------------------------------------------------------------
# item 3: non-regular files (FIFO, socket, device) are refused before open(), which would block


def test_non_regular_files_refused_without_blocking(tmp_path):
    """A FIFO named like every format, alone and inside a shard directory, a socket, a symlink to a
    character device and a FIFO chunk inside a Zarr store: each is refused at once, naming the path."""
    pytest.importorskip("zarr")
    res = run_python("""
        import json, os, socket, numpy as np, zarr
        import rankme_fast as rf
        out = {}
        def attempt(name, src):
            try:
                rf.score(src, progress=False)
                out[name] = "no error"
            except (ValueError, TypeError) as e:
                out[name] = str(e)
        for ext in ("npy", "safetensors", "pt", "h5"):
            os.mkfifo("fifo." + ext)
            attempt(ext, "fifo." + ext)
        os.mkdir("shards")
        np.save("shards/part_1.npy", np.ones((5, 3), np.float32))
        os.mkfifo("shards/part_2.npy")
        attempt("shard", "shards")
        s = socket.socket(socket.AF_UNIX); s.bind("sock.npy")
        attempt("socket", "sock.npy")
        os.symlink("/dev/zero", "zero.npy")
        attempt("device", "zero.npy")
        a = zarr.open_array("z.zarr", mode="w", shape=(20, 4), chunks=(10, 4), dtype="f4")
        a[:] = np.ones((20, 4), np.float32)
        chunk = next(os.path.join(r, f) for r, _, fs in os.walk("z.zarr/c") for f in fs)
        os.remove(chunk); os.mkfifo(chunk)
        attempt("zarr", "z.zarr")
        print(json.dumps(out))
    """, tmp_path, timeout=90)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for ext in ("npy", "safetensors", "pt", "h5"):
        assert out[ext] == (f"fifo.{ext}: is a FIFO, not a regular file; refusing to open it (reading it could "
                            "block forever or never end)"), out[ext]
    assert out["shard"].startswith(os.path.join("shards", "part_2.npy") + ": is a FIFO, not a regular file")
    assert out["socket"].startswith("sock.npy: is a socket, not a regular file")
    assert out["device"].startswith("zero.npy: is a character device, not a regular file")
    assert re.fullmatch(r"z\.zarr: entry z\.zarr/c/.* is a FIFO, not a regular file; refusing to read the store",
                        out["zarr"]), out["zarr"]


def test_symlink_loops_name_the_path(tmp_path):
    for name in ("self.npy", "self.zarr"):
        os.symlink(tmp_path / name, tmp_path / name)
        raises_naming(tmp_path / name, ValueError, r"cannot be read \(Too many levels of symbolic links\)$",
                      score, str(tmp_path / name), progress=False)
    os.symlink(tmp_path / "nowhere.npy", tmp_path / "dangling.npy")
    raises_naming(tmp_path / "dangling.npy", ValueError, r"cannot be read \(No such file or directory\)$",
                  score, str(tmp_path / "dangling.npy"), progress=False)


def test_zarr_symlink_loops_name_the_store(tmp_path):
    zarr = pytest.importorskip("zarr")
    for case in ("eloop", "dir_cycle"):
        p = tmp_path / f"{case}.zarr"
        a = zarr.open_array(str(p), mode="w", shape=(20, 4), chunks=(10, 4), dtype="f4")
        a[:] = xmat(20, 4)
        if case == "eloop":
            os.symlink(p / "c" / "loop_b", p / "c" / "loop_a")
            os.symlink(p / "c" / "loop_a", p / "c" / "loop_b")
            raises_naming(p, ValueError, r"entry .*/c/loop_[ab] cannot be read \(Too many levels of symbolic links\)",
                          score, str(p), progress=False)
        else:
            os.symlink(p / "c", p / "c" / "again")
            raises_naming(p, ValueError, r"entry .*/c/again is a directory seen before \(a symlink loop\)",
                          score, str(p), progress=False)


# ----------------------------------------------------------------------------------------------
# item 2: header size and nesting bounds


def test_npy_v3_header_size_bounded(tmp_path):
    """A 2 MB version-3 header (a huge list) is refused before it is parsed, like a v1/v2 one."""
    x = xmat(10, 4)
    body = ("{'descr': '<f4', 'fortran_order': False, 'shape': (10, 4), 'junk': [" + "0, " * 700_000 + "]}")
    body = (body + " " * (-(len(body) + 13) % 64) + "\n").encode()
    p = tmp_path / "big_v3.npy"
    p.write_bytes(b"\x93NUMPY\x03\x00" + struct.pack("<I", len(body)) + body + x.tobytes())
    t = time.perf_counter()
    raises_naming(p, ValueError, rf"^{re.escape(str(p))}: corrupt \.npy header \(ValueError: header of "
                  rf"{len(body)} bytes exceeds the 10000-byte limit\)$", score, str(p), progress=False)
    assert time.perf_counter() - t < 2.0
    # the same oversized header in a v2 file: numpy's own bound, also naming the file
    q = tmp_path / "big_v2.npy"
    q.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(body)) + body + x.tobytes())
    raises_naming(q, ValueError, r"corrupt \.npy header .*Header info length", score, str(q), progress=False)


def test_npy_deeply_nested_or_huge_number_header(tmp_path):
    x = xmat(10, 4)
    for name, shape in (("nested", "(" * 3000 + ")" * 3000), ("digits", "(" + "9" * 5000 + ", 4)")):
        head = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + "}"
        head = (head + " " * (-(len(head) + 11) % 64) + "\n").encode()
        p = tmp_path / f"{name}.npy"
        p.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(head)) + head + x.tobytes())
        raises_naming(p, ValueError, r"corrupt \.npy header", score, str(p), progress=False)


def test_safetensors_json_bomb_and_huge_numbers(tmp_path):
    x = xmat(50, 4)
    p = tmp_path / "bomb.safetensors"
    st_write(p, "[" * 100_000 + "]" * 100_000, x.tobytes())
    raises_naming(p, ValueError, r"^.*: corrupt \.safetensors header \(JSON nested too deeply\)$",
                  score, str(p), progress=False)
    q = tmp_path / "digits.safetensors"
    st_write(q, '{"emb": {"dtype": "F32", "shape": [' + "9" * 5000 + ', 4], "data_offsets": [0, 800]}}', x.tobytes())
    raises_naming(q, ValueError, r"corrupt \.safetensors header \(Exceeds the limit \(4300 digits\)",
                  score, str(q), progress=False)


# ----------------------------------------------------------------------------------------------
# item 10 (and 14): safetensors headers checked as the safetensors library checks them


def test_safetensors_duplicate_key_refused(tmp_path):
    x = xmat(1000, 8)
    half = st_entry(x[:500])
    p = tmp_path / "dup.safetensors"
    st_write(p, '{"emb": %s, "emb": %s}' % (json.dumps(st_entry(x)), json.dumps(half)), x.tobytes())
    raises_naming(p, ValueError, r"corrupt \.safetensors header \(duplicate key 'emb'; the safetensors library "
                  r"refuses it", score, str(p), progress=False)
    dup_meta = tmp_path / "dupmeta.safetensors"
    st_write(dup_meta, '{"__metadata__": {"a": "1", "a": "2"}, "emb": %s}' % json.dumps(st_entry(x)), x.tobytes())
    raises_naming(dup_meta, ValueError, r"duplicate key 'a'", score, str(dup_meta), progress=False)
    # the well-formed file scores all 1000 rows, exactly
    good = tmp_path / "good.safetensors"
    st_write(good, json.dumps({"emb": st_entry(x)}), x.tobytes())
    res = score(str(good), progress=False)
    assert res.n_rows == 1000 and rel_err(res.metrics["rankme"], rankme_ref(x)) <= 1e-9


@pytest.mark.parametrize(("entry", "pattern"), [
    (5, r"entry 'junk': expected an object with dtype, shape and data_offsets, got 5"),
    ({"dtype": "F32", "shape": [2]}, r"entry 'junk': expected an object with dtype, shape and data_offsets"),
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, r"entry 'junk': dtype must be a string, got \['F32'\]"),
    ({"dtype": "F32", "shape": 5, "data_offsets": [0, 8]}, r"entry 'junk': shape must be a list of non-negative integers, got 5"),
    ({"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]}, r"entry 'junk': shape must be a list"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8]}, r"entry 'junk': shape \[2\] and data_offsets \[8\] must be"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"entry 'junk': .*begin <= end"),
])
def test_safetensors_bad_entry_beside_a_good_one(tmp_path, entry, pattern):
    x = xmat(100, 4)
    p = tmp_path / "mixed.safetensors"
    st_write(p, json.dumps({"emb": st_entry(x), "junk": entry}), x.tobytes())
    for key in (None, "emb"):  # refused even when the good tensor is asked for by name
        raises_naming(p, ValueError, r"corrupt \.safetensors " + pattern, score, str(p), key=key, progress=False)


def test_safetensors_bad_metadata(tmp_path):
    x = xmat(100, 4)
    for meta in ({"a": 1}, ["x"]):
        p = tmp_path / "meta.safetensors"
        st_write(p, json.dumps({"__metadata__": meta, "emb": st_entry(x)}), x.tobytes())
        raises_naming(p, ValueError, r"__metadata__ must map strings to strings", score, str(p), progress=False)


# ----------------------------------------------------------------------------------------------
# item 14: .pt tensors that are not dense data, corrupt HDF5


@pytest.mark.parametrize(("case", "exc", "pattern"), [
    ("sparse", ValueError, r"has layout torch\.sparse_coo; save a dense tensor \(x\.to_dense\(\)\)"),
    ("sparse_csr", ValueError, r"has layout torch\.sparse_csr"),
    ("meta", ValueError, r"is on device 'meta' \(a meta tensor holds no data\)"),
    ("nested", ValueError, r"is a nested tensor; save a dense \(rows, features\) tensor"),
    ("expand", ValueError, r"is a view with strides \(0, 1\) for shape \(1000000000000, 8\) that repeats the "
                           r"same memory .*its 32 stored bytes are not 8000000000000 values"),
    ("overlap", ValueError, r"is a view with strides \(1, 1\) for shape \(1000, 8\)"),
    ("dict_sparse", ValueError, r"tensor 'emb' has layout torch\.sparse_coo"),
])
def test_pt_tensors_that_are_not_data(tmp_path, case, exc, pattern):
    base = torch.from_numpy(xmat(1000, 8))
    obj = {"sparse": lambda: base.to_sparse(), "sparse_csr": lambda: base.to_sparse_csr(),
           "meta": lambda: torch.empty(1000, 8, device="meta"),
           "nested": lambda: torch.nested.nested_tensor([base[:3], base[:5]]),
           "expand": lambda: torch.ones(1, 8).expand(10**12, 8),
           "overlap": lambda: torch.ones(2000).as_strided((1000, 8), (1, 1)),
           "dict_sparse": lambda: {"emb": base.to_sparse()}}[case]
    p = tmp_path / f"{case}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-tensor prototype warning
        torch.save(obj(), p)
    t = time.perf_counter()
    raises_naming(p, exc, pattern, score, str(p), progress=False)
    assert time.perf_counter() - t < 10


def test_pt_strided_views_that_are_data_score_correctly(tmp_path):
    """A saved transpose or a row-strided slice is real data: scored exactly (not refused)."""
    x = torch.from_numpy(xmat(800, 8)).double()
    for name, t in (("transposed", x.t().contiguous().t()), ("every_other_row", torch.cat([x, x])[::2])):
        p = tmp_path / f"{name}.pt"
        torch.save(t, p)
        res = score(str(p), chunk_rows=300, progress=False)
        assert rel_err(res.metrics["rankme"], rankme_ref(t.numpy())) <= 1e-9, name


def test_hdf5_corrupt_object_header_names_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = xmat(200, 8)
    p = tmp_path / "g.h5"
    with h5py.File(p, "w") as f:
        for i in range(3):
            f.create_dataset(f"grp/e{i}", data=x, chunks=(50, 8))
    raw = bytearray(p.read_bytes())
    raw[128:144] = b"\xff" * 16  # inside the root group's object header: visiting the tree fails
    q = tmp_path / "corrupt.h5"
    q.write_bytes(bytes(raw))
    raises_naming(q, ValueError, r"corrupt HDF5 file: cannot list its datasets \(RuntimeError: .*visitation",
                  score, str(q), key="grp/e0", progress=False)


# ----------------------------------------------------------------------------------------------
# items 9 and 5: chunks never written are not zeros; 10^12 rows in a tiny file are not data


MISSING = r"is missing \(never written, or deleted\)"


def test_zarr_missing_chunk_refused(tmp_path):
    zarr = pytest.importorskip("zarr")
    x = xmat(2000, 8)
    p = tmp_path / "z.zarr"
    a = zarr.open_array(str(p), mode="w", shape=x.shape, chunks=(100, 8), dtype="f4")
    a[:] = x
    res = score(str(p), progress=False)
    assert rel_err(res.metrics["rankme"], rankme_ref(x)) <= 1e-9
    chunk = [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f != "zarr.json"]
    assert len(chunk) == 20
    os.remove(next(c for c in chunk if c.endswith(os.path.join("c", "3", "0"))))
    raises_naming(p, ValueError, rf"^.*: chunk 'c/3/0' \(rows 300\.\.400\) of its 20 chunks {MISSING}; a "
                  r"missing chunk would read as the fill value, not data", score, str(p), progress=False)
    q = tmp_path / "half.zarr"
    b = zarr.open_array(str(q), mode="w", shape=x.shape, chunks=(100, 8), dtype="f4")
    b[:1000] = x[:1000]
    raises_naming(q, ValueError, rf"chunk 'c/10/0' \(rows 1000\.\.1100\) of its 20 chunks {MISSING}",
                  score, str(q), progress=False)
    # a chunk deleted after the store was opened (between two reads): an error, not fill values
    z = tmp_path / "later.zarr"
    zarr.open_array(str(z), mode="w", shape=x.shape, chunks=(100, 8), dtype="f4")[:] = x
    readers = rio.open_source(str(z))
    with pytest.raises(ValueError, match=rf"chunk 'c/12/0' \(rows 1200\.\.1300\) of its 20 chunks {MISSING}"):
        for _, r0, _t in rio.iter_chunks(readers, 400, prefetch=1):
            if r0 == 0:
                os.remove(z / "c" / "12" / "0")
    v2 = tmp_path / "v2.zarr"  # zarr format 2 keys ("3.0"), and a sharded array (one file per shard)
    c = zarr.open_array(str(v2), mode="w", shape=x.shape, chunks=(100, 8), dtype="f4", zarr_format=2)
    c[:] = x
    assert rel_err(score(str(v2), progress=False).metrics["rankme"], rankme_ref(x)) <= 1e-9
    os.remove(v2 / "3.0")
    raises_naming(v2, ValueError, rf"chunk '3\.0' \(rows 300\.\.400\) of its 20 chunks {MISSING}",
                  score, str(v2), progress=False)
    sh = tmp_path / "sharded.zarr"
    e = zarr.create_array(str(sh), shape=x.shape, chunks=(100, 8), shards=(500, 8), dtype="f4")
    e[:] = x
    assert rel_err(score(str(sh), chunk_rows=333, progress=False).metrics["rankme"], rankme_ref(x)) <= 1e-9
    os.remove(sh / "c" / "2" / "0")
    raises_naming(sh, ValueError, rf"chunk 'c/2/0' \(rows 1000\.\.1500\) of its 4 chunks {MISSING}",
                  score, str(sh), progress=False)
    g = tmp_path / "grp.zarr"  # an array inside a group: the chunk is looked up under the array's path
    grp = zarr.open_group(str(g), mode="w")
    arr = grp.create_array("sub/emb", shape=x.shape, chunks=(500, 4), dtype="f4")
    arr[:1500] = x[:1500]
    raises_naming(g, ValueError, r"array 'sub/emb' chunk 'c/3/0' \(rows 1500\.\.2000\) of its 8 "
                  rf"chunks {MISSING}", score, str(g), progress=False)


def test_hdf5_unwritten_rows_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = xmat(2000, 8)
    p = tmp_path / "partial.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("chunked", shape=x.shape, dtype="f4", chunks=(100, 8))[:1000] = x[:1000]
        f.create_dataset("chunked_cols", shape=x.shape, dtype="f4", chunks=(500, 4))[:, :4] = x[:, :4]
        f.create_dataset("contiguous", shape=x.shape, dtype="f4")
        f.create_dataset("full", data=x, chunks=(128, 8), compression="gzip")
        f.create_dataset("full_contiguous", data=x)
    raises_naming(p, ValueError, r"dataset 'chunked' 10 of its 20 chunks were never written \(first missing: "
                  r"rows 1000\.\.1100\); unwritten rows would read as the fill value", score, str(p), key="chunked",
                  progress=False)
    raises_naming(p, ValueError, r"dataset 'chunked_cols' 4 of its 8 chunks were never written \(first missing: "
                  r"rows 0\.\.500\)", score, str(p), key="chunked_cols", progress=False)
    raises_naming(p, ValueError, r"dataset 'contiguous' rows 0\.\.2000 were never written \(no storage allocated\)",
                  score, str(p), key="contiguous", progress=False)
    for key in ("full", "full_contiguous"):
        res = score(str(p), key=key, chunk_rows=333, progress=False)
        assert res.n_rows == 2000 and rel_err(res.metrics["rankme"], rankme_ref(x)) <= 1e-9, key


def test_sources_claiming_1e12_rows_refused_fast(tmp_path):
    """A stored expand and empty stores of 10^12 rows: refused in seconds (they used to stream forever)."""
    pytest.importorskip("zarr")
    pytest.importorskip("h5py")
    res = run_python("""
        import json, time, torch, zarr, h5py
        import rankme_fast as rf
        torch.save(torch.ones(1, 8).expand(10**12, 8), "expand.pt")
        zarr.open_array("empty.zarr", mode="w", shape=(10**12, 16), chunks=(100000, 16), dtype="f4")
        with h5py.File("empty.h5", "w") as f:
            f.create_dataset("chunked", shape=(10**12, 16), dtype="f4", chunks=(100000, 16))
            f.create_dataset("contiguous", shape=(10**12, 16), dtype="f4")
        out = {}
        for src, key in (("expand.pt", None), ("empty.zarr", None), ("empty.h5", "chunked"), ("empty.h5", "contiguous")):
            t = time.perf_counter()
            try:
                rf.score(src, key=key, progress=False)
                out[f"{src}:{key}"] = "no error"
            except ValueError as e:
                out[f"{src}:{key}"] = str(e)
            assert time.perf_counter() - t < 20
        print(json.dumps(out))
    """, tmp_path, timeout=120)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["expand.pt:None"].startswith("expand.pt: is a view with strides (0, 1) for shape (1000000000000, 8)")
    assert out["empty.zarr:None"].startswith("empty.zarr: chunk 'c/0/0' (rows 0..100000) of its 10000000 chunks "
                                             "is missing (never written, or deleted)")
    assert out["empty.h5:chunked"].startswith("empty.h5: dataset 'chunked' 10000000 of its 10000000 chunks were "
                                              "never written (first missing: rows 0..100000)")
    assert out["empty.h5:contiguous"].startswith("empty.h5: dataset 'contiguous' rows 0..1000000000000 were never "
                                                 "written")


# ----------------------------------------------------------------------------------------------
# item 1: a file truncated or rewritten while it is read is an error naming it, not SIGBUS


TRUNCATE_CHILD = """
import json, os, numpy as np, torch
import rankme_fast as rf
from rankme_fast import io as rio
from rankme_fast.gram import GramAccumulator
x = np.random.default_rng(0).standard_normal((100_000, 64)).astype(np.float32)  # 25.6 MB
orig, state = GramAccumulator.update, {}
def update(self, t):
    orig(self, t)
    state["calls"] += 1
    if state["calls"] == 3:  # the prefetch thread is reading ahead while the file shrinks
        p = state["path"]
        if state["how"] == "truncate":
            os.truncate(p, os.path.getsize(p) // 3)
        else:  # rewritten in place, as np.save does: cut to 0, then written again (shorter)
            np.save(p, x[:1000]) if p.endswith(".npy") else open(p, "wb").write(b"x" * 1000)
GramAccumulator.update = update
out = {}
wide = torch.from_numpy(np.random.default_rng(1).standard_normal((100_000, 80)).astype(np.float32))
views = {"pt": torch.from_numpy(x),
         "T.pt": torch.from_numpy(np.ascontiguousarray(x.T)).T,  # column-major: a saved x.T
         "slice.pt": wide[:, 8:72],                                # rows padded: a column slice
         "S.pt": torch.from_numpy(np.concatenate([x, x], 1))[:, ::2]}  # neither: strides (2d, 2)
for fmt in ("npy", "safetensors", "pt", "T.pt", "slice.pt", "S.pt"):
    for how in ("truncate", "rewrite"):
        p = f"{how}.{fmt}"
        if fmt == "npy":
            np.save(p, x)
        elif fmt.endswith("pt"):
            torch.save({"ids": torch.arange(10), "emb": views[fmt]}, p)
            r = rio.open_reader(p)
            r.read(0, 1)
            assert r._fd is not None and r._t is None, "the .pt tensor is not read with preadv"
            r.close()
        else:
            from safetensors.torch import save_file
            save_file({"emb": torch.from_numpy(x)}, p)
        state.update(calls=0, path=p, how=how)
        try:
            rf.score(p, chunk_rows=2000, progress=False)
            out[p] = "finished without error"
        except ValueError as e:
            out[p] = str(e)
print(json.dumps(out))
"""


@pytest.mark.parametrize("direct", ("off", "on"))
def test_file_shrinking_while_read_is_a_clean_error(tmp_path, direct):
    """Each of .npy / .safetensors / .pt, truncated or rewritten shorter while ``score`` reads it: a
    ValueError naming the file (all in one child: a SIGBUS would kill it with rc -7); through the page
    cache and with O_DIRECT (every chunk, however small, where the file system takes it)."""
    pytest.importorskip("safetensors")
    code = TRUNCATE_CHILD.replace("from rankme_fast.gram import GramAccumulator",
                                  "from rankme_fast.gram import GramAccumulator\nrio.DIRECT_MIN_BYTES = 1")
    res = run_python(code, tmp_path, env_extra={"RANKME_FAST_DIRECT_IO": direct}, check=False, timeout=120)
    assert res.returncode == 0, f"rc={res.returncode} (-7 = SIGBUS)\n{res.stdout}\n{res.stderr[-2000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out) == 12
    for p, msg in out.items():
        assert re.fullmatch(rf"{re.escape(p)}: (tensor 'emb' )?truncated while being read: rows \d+\.\.\d+ need "
                            r"bytes up to \d+ but the file now has \d+ bytes \(rewritten or cut by another "
                            r"process\?\)", msg), msg


@pytest.mark.parametrize("layout", ("transposed", "column_slice", "row_slice_of_transposed", "every_other_column"))
def test_strided_pt_tensors_are_read_exactly(tmp_path, layout):
    """A saved x.T (column-major), a column slice of a wider tensor (padded rows) and views that are neither
    (every other row of x.T, every other column) are all read with preadv from the file, never from torch's
    mapping (a shrinking file is then an error, not a SIGBUS). Same RankMe as the contiguous tensor."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3000, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 40, dtype=torch.float64)
    if layout == "transposed":
        t = base.T.contiguous().T
    elif layout == "column_slice":
        t = torch.cat([base, base[:, :9]], 1)[:, 3:43]
    elif layout == "row_slice_of_transposed":  # neither row- nor column-major: strides (2, n)
        t = base.T.contiguous().T[::2]
    else:  # strides (2d, 2): every other column of [base, other] (full rank)
        other = torch.randn(3000, 40, generator=g, dtype=torch.float64)
        t = torch.cat([base, other], 1)[:, ::2]
    p = tmp_path / "x.pt"
    torch.save(t, p)
    r = rio.open_reader(str(p))
    r.read(0, 1)
    assert r._fd is not None and r._t is None
    r.close()
    got = score(str(p), metrics="rankme", chunk_rows=700, progress=False)
    want = np_rankme(ref_sv(t.contiguous()).numpy())
    assert rel_err(got.metrics["rankme"], want) < 1e-9


def test_rss_bounded_while_another_process_maps_the_file(tmp_path):
    """Nothing is mapped: resident memory grows by a few chunk buffers only, even when another process
    holds every page of the file mapped (a MAP_PRIVATE mapping would have counted them all)."""
    x = np.random.default_rng(1).standard_normal((500_000, 32)).astype(np.float32)  # 64 MB
    p = tmp_path / "big.npy"
    np.save(p, x)
    want = rankme_ref(x)
    import mmap

    with open(p, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        np.frombuffer(mm, np.uint8)[::4096].sum()  # every page resident and mapped here
        res = run_python(f"""
            import json, re, rankme_fast as rf
            def vm(k):
                return int(re.search(k + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10
            rf.score({str(p)!r}, chunk_rows=100, progress=False)  # warm-up: kernels, threads, allocator
            base = vm("VmRSS")
            r = rf.score({str(p)!r}, chunk_rows=20_000, progress=False)
            print(json.dumps([r.metrics["rankme"], vm("VmHWM") - base]))
        """, tmp_path, timeout=120)
        del mm
    val, grew = json.loads(res.stdout.strip().splitlines()[-1])
    assert rel_err(val, want) <= 1e-6
    assert grew < 24 << 20, grew  # 4-5 buffers of 2.56 MB, not the 64 MB file


def test_kept_chunks_are_not_overwritten_by_buffer_reuse(tmp_path):
    x = xmat(5000, 16)
    p = tmp_path / "k.npy"
    np.save(p, x)
    readers = rio.open_source(str(p))
    kept = [t for _, _, t in rio.iter_chunks(readers, 300)]  # all kept: no buffer may be reused
    dropped = [t.sum().item() for _, _, t in rio.iter_chunks(readers, 300)]  # each dropped: reused
    for r in readers:
        r.close()
    assert torch.equal(torch.cat(kept), torch.from_numpy(x))
    assert np.allclose(dropped, [x[i:i + 300].sum(dtype=np.float64) for i in range(0, 5000, 300)], rtol=1e-5)


def test_scattered_pt_view_beyond_the_span_bound_is_refused(tmp_path, monkeypatch):
    """A view whose chunk of rows spans far more storage than it holds (every other row of a saved x.T: each
    row touches every column of the storage) reads that span; beyond the bound it is a clear error naming
    the file and the remedy, never a huge read."""
    base = torch.randn(2000, 16, dtype=torch.float64)
    t = base.T.contiguous().T[::2]  # strides (2, 2000)
    p = tmp_path / "s.pt"
    torch.save(t, p)
    monkeypatch.setattr(rio, "GENERAL_VIEW_SPAN", 4096)
    r = rio.open_reader(str(p))
    try:
        got = r.read(0, 1000)  # the span (~256 KB) is within 8 x the chunk's 128 KB: read
        assert torch.equal(got, t[:1000])
        with pytest.raises(ValueError, match=r"s\.pt: is a view with strides \(2, 2000\) \(neither row- nor "
                                             r"column-major\).*save x\.contiguous\(\)"):
            r.read(0, 10)  # 10 rows (1.3 KB) would read ~256 KB of storage
    finally:
        r.close()


# ----------------------------------------------------------------------------------------------
# item 1, the cost of reading: chunks not in the page cache are read with O_DIRECT (no page-cache CPU)


def _direct_chunks(path, chunk_rows, **kw):
    readers = rio.open_source(str(path), **kw)
    got = torch.cat([t.clone() for _, _, t in rio.iter_chunks(readers, chunk_rows)])
    return got, sum(r.bytes_direct for r in readers), sum(r.bytes_cached for r in readers)


def _write_fmt(tmp_path, fmt, x):
    if fmt == "npy":
        p = tmp_path / "d.npy"
        np.save(p, x)
    elif fmt == "safetensors":  # a header length that is not a multiple of the 4096-byte alignment
        p = tmp_path / "d.safetensors"
        st_write(p, json.dumps({"__metadata__": {"pad": "y" * 37}, "emb": st_entry(x)}), x.tobytes())
    else:
        p = tmp_path / "d.pt"
        torch.save({"ids": torch.arange(7), "emb": torch.from_numpy(x)}, p)
    return p


@pytest.mark.parametrize("fmt", ("npy", "safetensors", "pt"))
def test_direct_io_reads_the_exact_rows(tmp_path, monkeypatch, fmt):
    """RANKME_FAST_DIRECT_IO=on: the rows come through O_DIRECT reads of aligned spans (data offsets that are
    not aligned, a last chunk that ends mid-block) and equal the array; RankMe equals the float64 SVD's."""
    x = xmat(3001, 37, seed=5)
    p = _write_fmt(tmp_path, fmt, x)
    monkeypatch.setenv("RANKME_FAST_DIRECT_IO", "on")
    monkeypatch.setattr(rio, "DIRECT_MIN_BYTES", 1)
    if not _o_direct_ok(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT (the fallback is tested separately)")
    kw = {"key": "emb"} if fmt != "npy" else {}
    got, direct, cached = _direct_chunks(p, 700, **kw)
    assert torch.equal(got, torch.from_numpy(x))
    assert direct == x.nbytes and cached == 0
    res = score(str(p), metrics="rankme", chunk_rows=700, progress=False, **kw)
    assert rel_err(res.metrics["rankme"], rankme_ref(x)) < 1e-9


def _o_direct_ok(d) -> bool:
    probe = os.path.join(str(d), "probe_direct")
    with open(probe, "wb") as fh:
        fh.write(b"\0" * 8192)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


def test_direct_io_auto_follows_the_page_cache(tmp_path, monkeypatch):
    """auto (the default): a chunk whose pages are (mostly) in the page cache is copied from it, one that
    is not is read with O_DIRECT; off: always through the cache. The residency probe is stubbed so the
    choice is tested whatever the file system does with eviction requests."""
    x = xmat(4000, 64, seed=6)
    p = tmp_path / "a.npy"
    np.save(p, x)
    monkeypatch.setattr(rio, "DIRECT_MIN_BYTES", 1)
    if not _o_direct_ok(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT (the fallback is tested separately)")
    seen = []
    for env, frac, want_direct in (("auto", 1.0, False), ("auto", 0.95, False), ("auto", 0.2, True),
                                   ("auto", None, False), ("off", 0.0, False), ("on", 1.0, True)):
        monkeypatch.setenv("RANKME_FAST_DIRECT_IO", env)
        monkeypatch.setattr(rio._Mincore, "fraction", classmethod(lambda cls, fd, off, n, f=frac: f))
        got, direct, cached = _direct_chunks(p, 1000)
        assert torch.equal(got, torch.from_numpy(x))
        seen.append((env, frac, direct, cached))
        assert (direct, cached) == ((x.nbytes, 0) if want_direct else (0, x.nbytes)), seen


def test_direct_io_auto_after_real_eviction(tmp_path, monkeypatch):
    """The real residency probe (mincore): the file just written is cached and copied; once evicted with
    POSIX_FADV_DONTNEED it is read with O_DIRECT, and the result is the same."""
    x = xmat(6000, 64, seed=7)
    p = tmp_path / "e.npy"
    np.save(p, x)
    monkeypatch.setenv("RANKME_FAST_DIRECT_IO", "auto")
    monkeypatch.setattr(rio, "DIRECT_MIN_BYTES", 1)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        n = os.fstat(fd).st_size
        warm = rio._Mincore.fraction(fd, 0, n)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        cold = rio._Mincore.fraction(fd, 0, n)
    finally:
        os.close(fd)
    if warm is None or warm < 0.99 or cold is None or cold > 0.1 or not _o_direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: page-cache residency cannot be controlled here (cached {warm} after write, "
                    f"{cold} after POSIX_FADV_DONTNEED) or no O_DIRECT")
    got, direct, cached = _direct_chunks(p, 1500)
    assert torch.equal(got, torch.from_numpy(x))
    assert direct == x.nbytes and cached == 0
    got, direct, cached = _direct_chunks(p, 1500)  # O_DIRECT left the pages uncached: direct again
    assert direct == x.nbytes


def test_direct_io_refused_by_the_file_system_falls_back(tmp_path, monkeypatch):
    """A file system without O_DIRECT (tmpfs, some FUSE: EINVAL at open) or one that refuses the alignment
    (EINVAL at the first read): the chunks are read through the page cache, the rows are exact."""
    import errno

    x = xmat(3000, 40, seed=8)
    p = tmp_path / "f.npy"
    np.save(p, x)
    monkeypatch.setenv("RANKME_FAST_DIRECT_IO", "on")
    monkeypatch.setattr(rio, "DIRECT_MIN_BYTES", 1)
    real_open, real_preadv = os.open, os.preadv

    def open_no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(rio.os, "open", open_no_direct)
    got, direct, cached = _direct_chunks(p, 700)
    assert torch.equal(got, torch.from_numpy(x)) and (direct, cached) == (0, x.nbytes)
    monkeypatch.setattr(rio.os, "open", real_open)
    if not _o_direct_ok(tmp_path):
        return
    direct_fds = set()

    def open_track(path, flags, *a):
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def preadv_einval(fd, bufs, off, *a):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, off, *a)

    monkeypatch.setattr(rio.os, "open", open_track)
    monkeypatch.setattr(rio.os, "preadv", preadv_einval)
    got, direct, cached = _direct_chunks(p, 700)
    assert direct_fds and torch.equal(got, torch.from_numpy(x)) and (direct, cached) == (0, x.nbytes)


def test_direct_io_mode_is_validated(tmp_path, monkeypatch):
    x = xmat(100, 4)
    p = tmp_path / "v.npy"
    np.save(p, x)
    monkeypatch.setenv("RANKME_FAST_DIRECT_IO", "sometimes")
    with pytest.raises(ValueError, match=r"RANKME_FAST_DIRECT_IO='sometimes': expected auto, on or off"):
        score(str(p), metrics="rankme", progress=False)
    for ok in ("AUTO", "0", "true", " on "):
        monkeypatch.setenv("RANKME_FAST_DIRECT_IO", ok)
        assert rel_err(score(str(p), metrics="rankme", progress=False).metrics["rankme"], rankme_ref(x)) < 1e-9


def test_direct_io_reads_the_file_that_was_opened(tmp_path, monkeypatch):
    """A file replaced at its path (``os.replace``) after reading started: the O_DIRECT descriptor is a reopen
    of the descriptor already held (the same inode), so every row comes from the file that was opened,
    never from its replacement."""
    x = xmat(3000, 32, seed=9)
    p = tmp_path / "r.npy"
    np.save(p, x)
    monkeypatch.setenv("RANKME_FAST_DIRECT_IO", "on")
    monkeypatch.setattr(rio, "DIRECT_MIN_BYTES", 1 << 40)
    if not _o_direct_ok(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    r = rio.open_reader(str(p))
    try:
        first = r.read(0, 100).clone()  # through the cache: the O_DIRECT descriptor is not open yet
        assert r.bytes_direct == 0
        other = tmp_path / "other.npy"
        np.save(other, -x)
        os.replace(other, p)
        monkeypatch.setattr(rio, "DIRECT_MIN_BYTES", 1)  # the O_DIRECT descriptor opens now, after the swap
        rest = r.read(100, 3000).clone()
        assert r.bytes_direct > 0
    finally:
        r.close()
    assert torch.equal(torch.cat([first, rest]), torch.from_numpy(x))
