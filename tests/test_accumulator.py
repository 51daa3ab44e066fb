"""GramAccumulator (DESIGN §4–5): streaming accumulation, merge, checkpointing and input checks.

Every spectrum is compared with the float64 SVD of the *same* (converted) rows the accumulator saw —
``torch.linalg.svdvals``, centred in float64 when asked — and every Gram / mean with the float64
``ZᵀZ`` / centred scatter / column mean of those rows, never with a code path of the package.
Contract (DESIGN §3): σ_k within 1e-6·σ_1; RankMe within 1e-4 relative, 1e-6 where σ_min ≥ 1e-3·σ_1.
Independence of batching / order / merge trees: RankMe and every σ_k within 1e-9 relative of each
other on well-conditioned spectra.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast.gram import GramAccumulator
from rankme_fast.spectrum import EXACT_RANKME_RTOL
from tests.conftest import (
    BACKENDS,
    DTYPES,
    backend_or_skip,
    build,
    dtype_id,
    np_rankme,
    ref_sv,
    rel_err,
    shape_id,
    sv_err,
)

SV_TOL = 1e-6  # every σ_k within 1e-6·σ_1 of the float64 SVD
WELL_CONDITIONED = 1e-3  # σ_min ≥ 1e-3·σ_1 → RankMe within 1e-6
GRAM_TOL = 1e-12  # max |G - G_ref| / max |G_ref|: float64 accumulation of exact products
SPLIT_TOL = 1e-9  # batching / order / merge-tree independence, relative per σ_k and for RankMe

N, D = 3000, 64
SCALE = math.sqrt(N)  # entries O(1/√d·√N/√N): O(0.1–1), so even bfloat16 keeps the structure
BATCHES = (1, 7, 500)  # then the rest: uneven, the first batch (which fixes the shift) a single row
KINDS = ("flat", "power1", "rank8", "rank1")


# ----------------------------------------------------------------------------------------------
# helpers


def stream(acc: GramAccumulator, z, sizes=BATCHES) -> GramAccumulator:
    """Feed the rows of ``z`` in batches of ``sizes`` and then the remainder (if any)."""
    i = 0
    for b in sizes:
        acc.update(z[i : i + b])
        i += b
    if i < z.shape[0]:
        acc.update(z[i:])
    return acc


def ref_gram(z, center: bool) -> torch.Tensor:
    """float64 ZᵀZ, or the centred scatter (Z − 1μᵀ)ᵀ(Z − 1μᵀ) — formed directly, in float64."""
    t = torch.as_tensor(np.ascontiguousarray(z)) if isinstance(z, np.ndarray) else z
    v = t.to(torch.float64)
    if center:
        v = v - v.mean(0, keepdim=True)
    return v.T @ v


def gram_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    assert got.dtype == torch.float64
    return float((got - want).abs().max() / want.abs().max())


def rankme_tol(ref: torch.Tensor) -> float:
    well = float(ref.min()) >= WELL_CONDITIONED * float(ref.max())
    return 1e-6 if well else EXACT_RANKME_RTOL


def check_against_ref(s: rf.Spectrum, ref: torch.Tensor, what: str) -> None:
    sv = s.singular_values
    assert sv.dtype == torch.float64, what
    assert sv.shape == ref.shape, (what, tuple(sv.shape), tuple(ref.shape))
    assert bool((sv[:-1] >= sv[1:]).all()), f"{what}: singular values not descending"
    assert bool((sv >= 0).all()), f"{what}: negative singular value"
    e = sv_err(sv, ref)
    assert e <= SV_TOL, f"{what}: max |σ_k - σ_k^ref| / σ_1 = {e:.3e} > {SV_TOL:g}"
    want = np_rankme(ref.numpy())
    tol = rankme_tol(ref)
    r = rel_err(s.rankme(), want)
    assert r <= tol, f"{what}: RankMe {s.rankme()!r} vs reference {want!r}: rel. error {r:.3e} > {tol:g}"


def _re(text: str) -> str:
    return re.escape(text)


def check_same(a: GramAccumulator, b: GramAccumulator, center: bool, what: str, tol: float = SPLIT_TOL) -> None:
    """Two accumulators of the same rows agree: every σ_k and RankMe within ``tol`` relative."""
    sa, sb = a.spectrum(center).singular_values, b.spectrum(center).singular_values
    assert sa.shape == sb.shape, what
    e = float(((sa - sb).abs() / sb).max())
    assert e <= tol, f"{what}: max_k |σ_k - σ_k'| / σ_k' = {e:.3e} > {tol:g}"
    r = rel_err(a.rankme(center=center), b.rankme(center=center))
    assert r <= tol, f"{what}: RankMe differs by {r:.3e} relative > {tol:g}"
    assert a.n_rows == b.n_rows, what


# ----------------------------------------------------------------------------------------------
# the main grid: backends × dtypes × spectra × centring × offset, streamed in uneven batches


@pytest.mark.parametrize("offset", (0.0, 5.0), ids=("mean0", "offset5"))
@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_matches_reference(matrices, kind, dtype, backend, center, offset):
    backend_or_skip(backend)
    z = matrices.get(kind, (N, D), dtype, scale=SCALE, offset=offset)
    ref = matrices.ref(kind, (N, D), dtype, center=center, scale=SCALE, offset=offset)
    assert float(ref.max()) > 0.0, "the converted matrix lost all its structure"
    acc = stream(GramAccumulator(backend=backend), z)
    what = f"{kind}/{dtype_id(dtype)}/{backend}/center={center}/offset={offset}"

    assert (acc.n_rows, acc.n_features, acc.n_batches, acc.backend) == (N, D, len(BATCHES) + 1, backend)
    assert acc.device == torch.device("cpu")
    s = acc.spectrum(center)
    assert (s.n_rows, s.n_features, s.centered, s.method) == (N, D, center, "gram")
    assert s.exact is True and s.precision == "exact" and s.rankme_rtol == EXACT_RANKME_RTOL
    check_against_ref(s, ref, what)
    assert rel_err(acc.rankme(center=center), np_rankme(ref.numpy())) <= rankme_tol(ref), what

    g = acc.gram(center)
    assert g.shape == (D, D) and gram_err(g.T, g) <= 1e-15, f"{what}: Gram not symmetric"
    e = gram_err(g, ref_gram(z, center))
    assert e <= GRAM_TOL, f"{what}: Gram rel. error {e:.3e}"

    mu = acc.mean()
    want_mu = z.to(torch.float64).mean(0)
    assert mu.dtype == torch.float64 and mu.shape == (D,)
    e_mu = float((mu - want_mu).abs().max())
    assert e_mu <= 1e-13 * (abs(offset) + float(z.to(torch.float64).abs().max())), f"{what}: mean error {e_mu:.3e}"


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_first_batch_single_row(backend, center):
    """Mean 1e4× the spread of the entries: the shift (the first batch, one row) keeps G_s small;
    Z ᵀZ − nμμᵀ formed naively would lose ~8 digits."""
    backend_or_skip(backend)
    z0 = build("power1", 4000, 32, seed=11)
    z = z0 + 1e4 * float(z0.std())
    acc = stream(GramAccumulator(backend=backend), z, sizes=(1, 999, 1000))
    check_against_ref(acc.spectrum(center), ref_sv(z, center), f"offset 1e4·spread/{backend}/center={center}")
    assert gram_err(acc.gram(center), ref_gram(z, center)) <= GRAM_TOL


# ----------------------------------------------------------------------------------------------
# independence of batch sizes, row order and merge trees


def _variants(z: torch.Tensor, backend: str):
    """(name, accumulator) pairs over exactly the rows of z, split/ordered/merged differently."""
    n = z.shape[0]
    new = lambda: GramAccumulator(backend=backend)  # noqa: E731
    yield "batches_1_7_500_rest", stream(new(), z)
    yield "one_batch", new().update(z)
    yield "batches_333", stream(new(), z, sizes=(333,) * (n // 333))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    yield "shuffled_rows", stream(new(), z[perm], sizes=(1000,))
    yield "reversed_rows_numpy", stream(new(), z.numpy()[::-1], sizes=(17, 1200))
    if backend == "cpu":
        yield "one_thread", stream(GramAccumulator(backend=backend, num_threads=1), z, sizes=(250,))
    cuts = (0, 901, 2700, n)
    parts = [z[cuts[i] : cuts[i + 1]] for i in range(3)]

    def acc_of(i, sizes=(64,)):
        return stream(new(), parts[i], sizes=sizes)

    a, b, c = acc_of(0), acc_of(1), acc_of(2)
    yield "merge_((a+b)+c)", a.merge(b).merge(c)
    a, b, c = acc_of(0), acc_of(1), acc_of(2)
    yield "merge_(a+(b+c))", a.merge(b.merge(c))
    a, b, c = acc_of(0, (1,)), acc_of(1, (500,)), acc_of(2, (7,))
    yield "merge_((c+a)+b)", c.merge(a).merge(b)
    # shuffled rows split into three shards, merged into an empty accumulator one by one
    zp = z[perm]
    total = new()
    for lo, hi in ((0, 10), (10, 2500), (2500, n)):
        total.merge(stream(new(), zp[lo:hi], sizes=(3,)))
    yield "merge_into_empty_shuffled", total


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=dtype_id)
@pytest.mark.parametrize("kind", ("flat", "power1"))
def test_batching_order_and_merge_independence(kind, dtype, backend, center):
    backend_or_skip(backend)
    n, d = 4000, 48
    # centred: a mean far from 0 (every variant picks a different shift); uncentred data with such a
    # mean has σ_1/σ_d ~ 1e3 and is not the well-conditioned case this 1e-9 bound is about.
    offset = 5.0 if center else 0.0
    z = build(kind, n, d, seed=3, scale=math.sqrt(n), offset=offset).to(dtype)
    ref = ref_sv(z, center)
    assert float(ref.min()) >= WELL_CONDITIONED * float(ref.max())
    variants = list(_variants(z, backend))
    base_name, base = variants[0]
    check_against_ref(base.spectrum(center), ref, f"{base_name}/{kind}/{dtype_id(dtype)}/{backend}")
    want_mu = z.to(torch.float64).mean(0)
    for name, acc in variants:
        what = f"{name} vs {base_name} ({kind}/{dtype_id(dtype)}/{backend}/center={center})"
        assert acc.n_features == d, what
        check_same(acc, base, center, what)
        check_against_ref(acc.spectrum(center), ref, what)
        assert float((acc.mean() - want_mu).abs().max()) <= 1e-13 * (offset + 1.0), what


# ----------------------------------------------------------------------------------------------
# fewer rows than features


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=dtype_id)
@pytest.mark.parametrize(("shape", "sizes"), [pytest.param((20, 64), (1, 7), id="20x64"),
                                               pytest.param((64, 64), (30,), id="64x64"),
                                               pytest.param((2, 16), (1,), id="2x16")])
def test_fewer_rows_than_features(shape, sizes, dtype, backend, center):
    backend_or_skip(backend)
    n, d = shape
    z = build("power1", n, d, seed=9, offset=2.0 if center else 0.0).to(dtype)
    acc = stream(GramAccumulator(backend=backend), z, sizes=sizes)
    s = acc.spectrum(center)
    assert s.rank_dims == min(n, d) == s.singular_values.shape[0]
    ref = ref_sv(z, center)
    assert ref.shape == (min(n, d),)
    check_against_ref(s, ref, f"{shape_id(shape)}/{dtype_id(dtype)}/{backend}/center={center}")
    assert gram_err(acc.gram(center), ref_gram(z, center)) <= GRAM_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row(backend):
    backend_or_skip(backend)
    x = torch.tensor([[3.0, -4.0, 0.0, 12.0]], dtype=torch.float64)
    acc = GramAccumulator(backend=backend).update(x)
    s = acc.spectrum()
    assert s.singular_values.shape == (1,)
    assert float(s.singular_values[0]) == pytest.approx(13.0, rel=1e-15)
    assert torch.equal(acc.mean(), x[0])
    assert float(acc.gram(center=True).abs().max()) == 0.0


# ----------------------------------------------------------------------------------------------
# merge


def _data(n=600, d=24, seed=21, offset=1.5):
    return build("power1", n, d, seed=seed, offset=offset)


@pytest.mark.parametrize("empty", ("fresh", "n_features", "empty_batch"))
@pytest.mark.parametrize("side", ("empty.merge(full)", "full.merge(empty)"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_with_empty(backend, side, empty):
    backend_or_skip(backend)
    z = _data()
    full = stream(GramAccumulator(backend=backend), z, sizes=(50,))
    e = {"fresh": lambda: GramAccumulator(backend=backend),
         "n_features": lambda: GramAccumulator(24, backend=backend),
         "empty_batch": lambda: GramAccumulator(backend=backend).update(torch.empty(0, 24))}[empty]()
    assert e.n_rows == 0
    before = {c: full.gram(c).clone() for c in (False, True)}
    out = e.merge(full) if side.startswith("empty") else full.merge(e)
    assert out is (e if side.startswith("empty") else full)
    assert out.n_rows == z.shape[0] and out.n_features == 24
    for center in (False, True):
        check_against_ref(out.spectrum(center), ref_sv(z, center), f"{side}/{empty}/center={center}")
        assert gram_err(out.gram(center), ref_gram(z, center)) <= GRAM_TOL
        assert gram_err(out.gram(center), before[center]) <= 1e-14
    assert float((out.mean() - z.mean(0)).abs().max()) <= 1e-14


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_leaves_other_unchanged(backend):
    backend_or_skip(backend)
    za, zb = _data(seed=1), _data(n=300, seed=2, offset=-4.0)
    a = stream(GramAccumulator(backend=backend), za, sizes=(7,))
    b = stream(GramAccumulator(backend=backend), zb, sizes=(1, 100))
    snap = b.state_dict()
    a.merge(b)
    after = b.state_dict()
    assert after.keys() == snap.keys()
    for k, v in snap.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(after[k], v), f"merge modified other's {k}"
        else:
            assert after[k] == v, f"merge modified other's {k}"
    # b still describes zb alone, a describes both
    for center in (False, True):
        check_against_ref(b.spectrum(center), ref_sv(zb, center), "other after merge")
        check_against_ref(a.spectrum(center), ref_sv(torch.cat([za, zb]), center), "self after merge")
    assert a.n_rows == 900 and a.n_batches == 2 + 3  # n_batches adds up both sides' counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_with_itself_counts_rows_twice(backend):
    backend_or_skip(backend)
    z = _data(n=200)
    a = stream(GramAccumulator(backend=backend), z, sizes=(13,))
    a.merge(a)
    zz = torch.cat([z, z])
    assert a.n_rows == 400
    for center in (False, True):
        check_against_ref(a.spectrum(center), ref_sv(zz, center), f"a.merge(a) center={center}")
        assert gram_err(a.gram(center), ref_gram(zz, center)) <= GRAM_TOL


def test_merge_across_backends():
    backend_or_skip("cpu")
    za, zb = _data(seed=4), _data(n=77, seed=5)
    a = stream(GramAccumulator(backend="cpu"), za, sizes=(100,))
    b = stream(GramAccumulator(backend="torch"), zb, sizes=(10,))
    a.merge(b)
    b2 = stream(GramAccumulator(backend="torch"), zb, sizes=(10,))
    b2.merge(stream(GramAccumulator(backend="cpu"), za, sizes=(100,)))
    z = torch.cat([za, zb])
    for center in (False, True):
        check_against_ref(a.spectrum(center), ref_sv(z, center), "cpu.merge(torch)")
        check_same(a, b2, center, "cpu.merge(torch) vs torch.merge(cpu)")


def test_merge_feature_mismatch_raises():
    a = GramAccumulator().update(torch.randn(5, 4, dtype=torch.float64))
    b = GramAccumulator().update(torch.randn(5, 6, dtype=torch.float64))
    g = a.gram().clone()
    with pytest.raises(ValueError, match=r"d=6.*d=4"):
        a.merge(b)
    with pytest.raises(ValueError, match=r"d=4.*d=6"):
        b.merge(a)
    with pytest.raises(ValueError, match=r"d=6.*d=4"):
        GramAccumulator(4).merge(b)
    assert a.n_rows == 5 and torch.equal(a.gram(), g), "a failed merge changed the accumulator"


@pytest.mark.parametrize("other", [torch.zeros(3, 4), np.zeros((3, 4)), None, "acc", {"n_rows": 0}],
                         ids=("tensor", "ndarray", "None", "str", "dict"))
def test_merge_non_accumulator_raises(other):
    a = GramAccumulator().update(torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"merge expects a GramAccumulator, got " + type(other).__name__):
        a.merge(other)
    assert a.n_rows == 5


# ----------------------------------------------------------------------------------------------
# state_dict / load_state_dict


def _save_load(sd: dict, path) -> dict:
    torch.save(sd, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("load_backend", BACKENDS)
@pytest.mark.parametrize("save_backend", BACKENDS)
def test_checkpoint_resume_equals_uninterrupted(tmp_path, save_backend, load_backend):
    backend_or_skip(save_backend)
    backend_or_skip(load_backend)
    z = build("power1", 2500, 40, seed=13, offset=3.0).to(torch.float32)
    first, second = z[:1100], z[1100:]

    uninterrupted = stream(GramAccumulator(backend=load_backend), z, sizes=(1, 599, 500, 700))
    part = stream(GramAccumulator(backend=save_backend), first, sizes=(1, 599))
    sd = _save_load(part.state_dict(), tmp_path / "acc.pt")
    assert sd["n_rows"] == 1100 and sd["n_features"] == 40 and sd["n_batches"] == 3
    resumed = GramAccumulator(backend=load_backend).load_state_dict(sd)
    assert (resumed.n_rows, resumed.n_features, resumed.n_batches) == (1100, 40, 3)
    assert resumed.backend == load_backend
    for center in (False, True):  # the checkpoint alone already describes the first rows
        check_against_ref(resumed.spectrum(center), ref_sv(first, center), f"loaded center={center}")
    stream(resumed, second, sizes=(700,))
    assert (resumed.n_rows, resumed.n_batches) == (uninterrupted.n_rows, uninterrupted.n_batches) == (2500, 5)
    for center in (False, True):
        what = f"{save_backend}->{load_backend} center={center}"
        check_same(resumed, uninterrupted, center, what, tol=1e-12)
        assert gram_err(resumed.gram(center), uninterrupted.gram(center)) <= 1e-14, what
        check_against_ref(resumed.spectrum(center), ref_sv(z, center), what)
        assert gram_err(resumed.gram(center), ref_gram(z, center)) <= GRAM_TOL, what
    assert float((resumed.mean() - z.to(torch.float64).mean(0)).abs().max()) <= 1e-13


def test_state_dict_contents_are_plain():
    z = _data(n=50, d=6)
    sd = GramAccumulator().update(z).state_dict()
    assert sd["format"] == "rankme_fast.GramAccumulator" and sd["version"] == 1
    assert (sd["n_rows"], sd["n_batches"], sd["n_features"]) == (50, 1, 6)
    for k, shape in (("shift", (6,)), ("col_sum", (6,)), ("gram", (6, 6))):
        assert sd[k].dtype == torch.float64 and sd[k].shape == shape
    # the stored pieces reproduce the float64 references: μ = s + c/n, M = G − c cᵀ/n
    n, s, c, g = sd["n_rows"], sd["shift"], sd["col_sum"], sd["gram"]
    assert float((s + c / n - z.mean(0)).abs().max()) <= 1e-14
    assert gram_err(g - torch.outer(c, c) / n, ref_gram(z, True)) <= GRAM_TOL
    # the state dict is a copy: changing it does not touch the accumulator
    acc = GramAccumulator().update(z)
    sd = acc.state_dict()
    sd["gram"].zero_()
    assert gram_err(acc.gram(True), ref_gram(z, True)) <= GRAM_TOL


@pytest.mark.parametrize("n_features", (None, 8))
def test_empty_round_trip(tmp_path, n_features):
    sd = _save_load(GramAccumulator(n_features).state_dict(), tmp_path / "empty.pt")
    assert sd["n_rows"] == 0 and sd["n_features"] == n_features
    acc = GramAccumulator().load_state_dict(sd)
    assert acc.n_rows == 0 and acc.n_features == n_features
    with pytest.raises(ValueError, match="no rows accumulated yet"):
        acc.spectrum()
    z = _data(n=100, d=8)
    acc.update(z)
    for center in (False, True):
        check_against_ref(acc.spectrum(center), ref_sv(z, center), f"after empty load center={center}")
    if n_features is not None:
        with pytest.raises(ValueError, match=r"d=9.*d=8"):
            GramAccumulator().load_state_dict(sd).update(torch.zeros(2, 9))


def _good_state(d=5):
    return GramAccumulator().update(build("flat", 40, d, seed=2, offset=1.0)).state_dict()


def _with(**kw):
    def f(sd):
        sd.update(kw)
        return sd
    return f


def _without(key):
    def f(sd):
        del sd[key]
        return sd
    return f


def _poke(key, value):
    def f(sd):
        sd[key] = sd[key].clone()
        sd[key].view(-1)[1] = value
        return sd
    return f


BAD_STATES = [
    ("format", _with(format="something.else"), r"not a GramAccumulator state \(format='something.else'\)"),
    ("no_format", _without("format"), r"not a GramAccumulator state \(format=None\)"),
    ("version2", _with(version=2), r"unsupported GramAccumulator state version 2 \(this is version 1\)"),
    ("no_version", _without("version"), r"unsupported GramAccumulator state version None"),
    ("n_rows_negative", _with(n_rows=-1), r"state\['n_rows'\] must be a non-negative int, got -1"),
    ("n_rows_float", _with(n_rows=40.0), r"state\['n_rows'\] must be a non-negative int, got 40.0"),
    ("n_rows_bool", _with(n_rows=True), r"state\['n_rows'\] must be a non-negative int, got True"),
    ("n_batches_negative", _with(n_batches=-2), r"state\['n_batches'\] must be a non-negative int"),
    ("n_features_0", _with(n_features=0), r"state\['n_features'\] must be a positive int or None, got 0"),
    ("n_features_missing", _without("n_features"), r"state with rows must hold n_features"),
    ("gram_missing", _without("gram"), r"state with rows must hold n_features, shift, col_sum and gram"),
    ("gram_float32", _with(gram=torch.eye(5, dtype=torch.float32)),
     r"state\['gram'\] must be a float64 tensor of shape \(5, 5\), got torch.float32 \(5, 5\)"),
    ("gram_shape", _with(gram=torch.eye(4, dtype=torch.float64)),
     r"state\['gram'\] must be a float64 tensor of shape \(5, 5\), got torch.float64 \(4, 4\)"),
    ("shift_shape", _with(shift=torch.zeros(6, dtype=torch.float64)),
     r"state\['shift'\] must be a float64 tensor of shape \(5,\)"),
    ("col_sum_list", _with(col_sum=[0.0] * 5), r"state\['col_sum'\] must be a float64 tensor .*got list"),
    ("col_sum_nan", _poke("col_sum", float("nan")), r"state\['col_sum'\] holds NaN/Inf"),
    ("gram_inf", _poke("gram", float("inf")), r"state\['gram'\] holds NaN/Inf"),
    ("shift_nan", _poke("shift", float("nan")), r"state\['shift'\] holds NaN/Inf"),
]


@pytest.mark.parametrize(("mutate", "pattern"), [pytest.param(m, p, id=i) for i, m, p in BAD_STATES])
def test_load_bad_state_raises_and_changes_nothing(tmp_path, mutate, pattern):
    sd = mutate(_save_load(_good_state(), tmp_path / "s.pt"))
    z = _data(n=30, d=5, seed=8)
    acc = GramAccumulator().update(z)
    with pytest.raises(ValueError, match=pattern):
        acc.load_state_dict(sd)
    assert acc.n_rows == 30
    check_against_ref(acc.spectrum(True), ref_sv(z, True), "after a rejected load_state_dict")


def test_load_state_wrong_d_for_accumulator():
    with pytest.raises(ValueError, match=r"state has d=5 but this accumulator was created with d=7"):
        GramAccumulator(7).load_state_dict(_good_state())


@pytest.mark.parametrize("state", [[1, 2], None, "state"], ids=("list", "None", "str"))
def test_load_non_dict_raises_type_error(state):
    with pytest.raises(TypeError, match="load_state_dict expects a dict"):
        GramAccumulator().load_state_dict(state)


def test_load_state_repairs_a_poisoned_accumulator():
    z = _data(n=80, d=5)
    acc = GramAccumulator().update(z[:40])
    ckpt = acc.state_dict()
    bad = z[40:].clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError):
        acc.update(bad)
    with pytest.raises(RuntimeError):
        acc.spectrum()
    acc.load_state_dict(ckpt).update(z[40:])
    for center in (False, True):
        check_against_ref(acc.spectrum(center), ref_sv(z, center), "repaired from checkpoint")


# ----------------------------------------------------------------------------------------------
# bad input


def test_feature_mismatch_names_both_d():
    acc = GramAccumulator().update(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"batch 1: has d=5 features but the accumulator has d=4 \(shape \(3, 5\)\)"):
        acc.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"batch 0: has d=4 features but the accumulator has d=3"):
        GramAccumulator(3).update(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"has d=7 features but the accumulator has d=4"):
        acc.update(torch.empty(0, 7))  # even an empty batch must have the right d
    # the rejected batches changed nothing
    assert acc.n_rows == 5 and acc.n_batches == 1


@pytest.mark.parametrize("when", ("declared", "inferred"))
def test_batch_on_other_device_raises(when):
    x0 = _data(n=7, d=4, seed=30)
    x = _data(n=9, d=4, seed=31)
    acc = GramAccumulator(device="cpu") if when == "declared" else GramAccumulator().update(x0)
    with pytest.raises(ValueError, match=r"batch \d: is on meta but the accumulator lives on cpu; move the batch"):
        acc.update(torch.empty(3, 4, device="meta"))
    acc.update(x)  # the rejected batch changed nothing
    z = x if when == "declared" else torch.cat([x0, x])
    for center in (False, True):
        check_against_ref(acc.spectrum(center), ref_sv(z, center), f"{when} after a rejected device")


def test_accumulator_on_other_device_rejects_cpu_batch():
    acc = GramAccumulator(device="meta")
    assert acc.device == torch.device("meta")
    with pytest.raises(ValueError, match=r"batch 0: is on cpu but the accumulator lives on meta"):
        acc.update(torch.randn(3, 4))
    assert acc.n_rows == 0 and acc.n_features is None


@pytest.mark.parametrize("shape", ((7,), (2, 3, 4), ()), ids=("1d", "3d", "0d"))
def test_wrong_ndim_raises(shape):
    acc = GramAccumulator().update(torch.randn(2, 4))
    pattern = r"expected a 2-D \(rows, features\) batch, got shape " + _re(str(tuple(shape)))
    with pytest.raises(ValueError, match=pattern):
        acc.update(torch.zeros(shape))
    assert acc.n_rows == 2


def test_zero_features_raises():
    with pytest.raises(ValueError, match=r"has 0 features \(shape \(5, 0\)\)"):
        GramAccumulator().update(torch.zeros(5, 0))


@pytest.mark.parametrize("batch", [torch.ones(3, 4, dtype=torch.int64), np.ones((3, 4), dtype=np.int32),
                                   torch.ones(3, 4, dtype=torch.bool), np.ones((3, 4), dtype=np.uint8)],
                         ids=("torch_int64", "numpy_int32", "torch_bool", "numpy_uint8"))
def test_integer_batch_raises_type_error(batch):
    acc = GramAccumulator()
    with pytest.raises(TypeError, match=r"integer/bool input is not accepted"):
        acc.update(batch)
    assert acc.n_rows == 0 and acc.n_features is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_batch_poisons_accumulator(backend):
    backend_or_skip(backend)
    z = _data(n=60, d=5)
    acc = GramAccumulator(backend=backend).update(z[:20]).update(z[20:30])
    other = GramAccumulator(backend=backend).update(z[:20])
    bad = z[30:].clone()
    bad[3, 1] = float("nan")
    bad[5, 4] = float("nan")
    bad[17, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"batch 2: found 3 non-finite values \(2 NaN, 1 Inf\) in input of shape "
                                         r"\(30, 5\), first in row 3"):
        acc.update(bad)
    for name, call in [("update", lambda: acc.update(z[:3])), ("spectrum", lambda: acc.spectrum()),
                       ("gram", lambda: acc.gram(True)), ("mean", lambda: acc.mean()),
                       ("rankme", lambda: acc.rankme()), ("state_dict", lambda: acc.state_dict()),
                       ("merge_into", lambda: acc.merge(other)), ("merge_from", lambda: other.merge(acc)),
                       ("all_reduce", lambda: acc.all_reduce())]:
        with pytest.raises(RuntimeError, match=r"unusable after an earlier error \(batch 2 was not finite\)"):
            call()
    # the healthy accumulator is untouched by the failed merge
    check_against_ref(other.spectrum(), ref_sv(z[:20]), "other after failed merge")


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_batch_whose_squares_overflow_is_scaled_exactly(backend):
    """Squares of 3e200 overflow float64: the rows are accumulated times a power of two instead (issue 14
    item 8), so the spectrum is that of the float64 SVD (formerly an "overflow" error)."""
    backend_or_skip(backend)
    acc = GramAccumulator(backend=backend)
    big = torch.full((3, 4), 1e200, dtype=torch.float64)
    big[1, 2] = -3e200
    big[2, 0] = 2e200
    acc.update(big)
    ref = ref_sv(big * 2.0**-660) * 2.0**660  # an exact power-of-two scaling of the reference
    assert sv_err(acc.spectrum().singular_values, ref[:3]) < 1e-12
    assert rel_err(acc.rankme(), np_rankme(ref.numpy())) < 1e-12


@pytest.mark.parametrize("method", ("spectrum", "gram", "mean", "rankme"))
@pytest.mark.parametrize("state", ("fresh", "n_features", "empty_batch"))
def test_results_before_any_rows_raise(method, state):
    acc = {"fresh": GramAccumulator(), "n_features": GramAccumulator(4),
           "empty_batch": GramAccumulator().update(np.zeros((0, 4)))}[state]
    with pytest.raises(ValueError, match=r"no rows accumulated yet; call update\(\) with data first"):
        getattr(acc, method)()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_changes_nothing(backend):
    backend_or_skip(backend)
    z = _data(n=40, d=6)
    acc = GramAccumulator(backend=backend).update(torch.empty(0, 6, dtype=torch.float16))
    assert (acc.n_rows, acc.n_features, acc.n_batches) == (0, 6, 1)
    acc.update(z[:25])
    before = acc.state_dict()
    acc.update(torch.empty(0, 6))
    acc.update(np.empty((0, 6), dtype=np.float32))
    after = acc.state_dict()
    assert after["n_rows"] == 25 and after["n_batches"] == before["n_batches"] + 2
    for k in ("shift", "col_sum", "gram"):
        assert torch.equal(after[k], before[k]), f"an empty batch changed {k}"
    acc.update(z[25:])
    for center in (False, True):
        check_against_ref(acc.spectrum(center), ref_sv(z, center), f"with empty batches center={center}")


@pytest.mark.parametrize("n_features", (0, -3, True, 2.5, "4"))
def test_bad_n_features_raises(n_features):
    with pytest.raises(ValueError, match=r"n_features must be a positive int or None, got " + _re(repr(n_features))):
        GramAccumulator(n_features)


@pytest.mark.parametrize("backend", ("gpu", "CPU", "numpy", ""))
def test_unknown_backend_raises(backend):
    with pytest.raises(ValueError, match=r"unknown backend " + _re(repr(backend)) + r"; choose one of \['cpu', 'cuda', 'torch', 'triton'\]"):
        GramAccumulator(backend=backend)


# ----------------------------------------------------------------------------------------------
# NumPy batches and non-contiguous torch batches


def _batch_forms(z: torch.Tensor):
    a = z.numpy()
    yield "numpy", lambda s: a[s]
    yield "numpy_fortran", lambda s: np.asfortranarray(a[s])
    yield "numpy_col_stride", lambda s: np.repeat(a[s], 2, axis=1)[:, ::2]
    yield "transposed_view", lambda s: z[s].T.contiguous().T
    yield "row_stride2", lambda s: torch.repeat_interleave(z[s], 2, dim=0)[::2]
    yield "col_stride3", lambda s: torch.repeat_interleave(z[s], 3, dim=1)[:, ::3]
    yield "transposed_col_stride", lambda s: torch.repeat_interleave(z[s].T.contiguous(), 2, dim=0)[::2].T


FORMS = ("numpy", "numpy_fortran", "numpy_col_stride", "transposed_view", "row_stride2", "col_stride3",
         "transposed_col_stride")


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.float16), ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_numpy_and_strided_batches(form, backend, dtype):
    backend_or_skip(backend)
    z = build("power1", 1500, 37, seed=17, offset=2.0).to(dtype)
    make = dict(_batch_forms(z))[form]
    slices = [slice(0, 1), slice(1, 700), slice(700, 1500)]
    batches = [make(s) for s in slices]
    for s, b in zip(slices, batches):  # the batch holds exactly those rows, in a non-trivial layout
        bt = torch.as_tensor(b) if isinstance(b, np.ndarray) else b
        assert torch.equal(bt, z[s])
    got = GramAccumulator(backend=backend)
    for b in batches:
        got.update(b)
    plain = stream(GramAccumulator(backend=backend), z.contiguous(), sizes=(1, 699))
    for center in (False, True):
        what = f"{form}/{backend}/{dtype_id(dtype)}/center={center}"
        check_against_ref(got.spectrum(center), ref_sv(z, center), what)
        assert gram_err(got.gram(center), ref_gram(z, center)) <= GRAM_TOL, what
        # same rows, different layout: agrees with contiguous batches to float64 rounding (relative to σ_1:
        # the uncentred spectrum of offset data spans σ_1/σ_d ~ 1e3)
        sg, sp = got.spectrum(center).singular_values, plain.spectrum(center).singular_values
        assert sv_err(sg, sp) <= 1e-12, what
        assert rel_err(got.rankme(center=center), plain.rankme(center=center)) <= 1e-10, what


def test_partial_state_without_rows_raises_value_error():
    sd = {"format": "rankme_fast.GramAccumulator", "version": 1, "n_rows": 0, "n_batches": 0, "n_features": 4,
          "gram": torch.zeros(4, 4, dtype=torch.float64)}
    acc = GramAccumulator()
    with pytest.raises(ValueError, match=r"not all of shift, col_sum and gram"):
        acc.load_state_dict(sd)
    assert acc.n_features is None and acc.n_rows == 0


def test_merge_counts_batches_of_an_empty_accumulator():
    a = GramAccumulator().update(torch.randn(5, 3, dtype=torch.float64))
    a.merge(GramAccumulator().update(torch.empty(0, 3, dtype=torch.float64)))
    assert a.n_batches == 2 and a.n_rows == 5


def test_uncentred_gram_is_exactly_symmetric():
    z = torch.randn(300, 17, dtype=torch.float64) + 3.0
    acc = GramAccumulator()
    for r0 in range(0, 300, 70):
        acc.update(z[r0 : r0 + 70])
    for center in (False, True):
        g = acc.gram(center)
        assert torch.equal(g, g.T)
        ref = (z - z.mean(0)) if center else z
        assert float((g - ref.T @ ref).abs().max() / (ref.T @ ref).abs().max()) <= 1e-13


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_with_autograd_history_are_not_kept(backend):
    """acc.update(model(x)) outside no_grad must not keep the graph (memory would grow with N)."""
    backend_or_skip(backend)
    lin = torch.nn.Linear(12, 12).double()
    x = torch.randn(400, 12, dtype=torch.float64)
    acc = GramAccumulator(backend=backend)
    for r0 in range(0, 400, 100):
        acc.update(lin(x[r0 : r0 + 100]))
    other = GramAccumulator(backend=backend).update(lin(x[:50]))
    acc.merge(other)
    assert acc._g.grad_fn is None and not acc._g.requires_grad
    sd = acc.state_dict()
    assert not any(t.requires_grad for t in sd.values() if isinstance(t, torch.Tensor))
    with torch.no_grad():
        z = torch.cat([lin(x), lin(x[:50])])
    check_against_ref(acc.spectrum(), ref_sv(z), "autograd batches")


def test_device_with_index_matches_batches():
    acc = GramAccumulator(device="cpu:0")
    z = torch.randn(50, 6, dtype=torch.float64)
    acc.update(z)
    assert acc.device == torch.device("cpu")
    check_against_ref(acc.spectrum(), ref_sv(z), "cpu:0")


def test_interrupted_update_marks_the_accumulator_broken(monkeypatch):
    """An exception inside the kernel call (OOM, Ctrl-C) may leave part of the batch in G: the
    accumulator must refuse further use instead of silently holding a half-added batch."""
    from rankme_fast.backends import torch_ref

    acc = GramAccumulator(backend="torch").update(torch.randn(100, 5, dtype=torch.float64))
    real = torch_ref.gram_update

    def half_then_fail(x, gram, **kw):
        real(x[: x.shape[0] // 2], gram, **kw)
        raise MemoryError("simulated")

    monkeypatch.setattr(torch_ref, "gram_update", half_then_fail)
    with pytest.raises(MemoryError):
        acc.update(torch.randn(100, 5, dtype=torch.float64))
    monkeypatch.setattr(torch_ref, "gram_update", real)
    with pytest.raises(RuntimeError, match=r"batch 1 was interrupted \(MemoryError\)"):
        acc.rankme()


def test_accumulator_pickles_and_deepcopies():
    """The backend module is stored by name, so an accumulator (and a metric holding one) can be copied."""
    import copy
    import pickle

    z = torch.randn(300, 12, dtype=torch.float64)
    acc = GramAccumulator()
    acc.update(z[:200])
    for twin in (copy.deepcopy(acc), pickle.loads(pickle.dumps(acc))):
        assert twin.backend == acc.backend
        twin.update(z[200:])
        assert torch.allclose(twin.gram(), z.T @ z, rtol=1e-12, atol=1e-12)
    assert acc.n_rows == 200  # the original is untouched
