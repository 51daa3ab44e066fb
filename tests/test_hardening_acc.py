"""Hardening of the float64 Gram (issue 14, items 7, 8, 12, 15): threads, tiny and huge magnitudes,
tampered checkpoints and a d×d Gram that cannot fit.

References are independent: NumPy / ``torch.linalg.svdvals`` in float64 of the *same* rows, for tiny or
huge rows of those rows multiplied by a power of two 2^k (an exact operation), whose σ are then 2^-k
times the reference's.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

import rankme_fast as rf
from rankme_fast.gram import GramAccumulator
from tests.conftest import BACKENDS, backend_or_skip, np_rankme, rel_err

# ----------------------------------------------------------------------------------------------
# 7. threads


def _threaded_updates(acc: GramAccumulator, chunks, n_threads: int) -> None:
    barrier = threading.Barrier(n_threads)
    errors = []

    def work(part):
        try:
            barrier.wait()
            for c in part:
                acc.update(c)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(chunks[i::n_threads],)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "update threads hung"
    assert not errors, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_updates_give_the_single_thread_gram(backend):
    """Several threads updating one accumulator: every row counted once, G as from one thread (the
    kernels release the GIL, so without the lock rows were lost or doubled: RankMe 12.724 vs 12.859)."""
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(12_000, 48, dtype=torch.float64, generator=gen) * torch.logspace(0, -2, 48, dtype=torch.float64)
    z += 3.0
    chunks = list(z.split(250))
    want = z.T @ z
    zc = z - z.mean(0)
    want_c = zc.T @ zc
    want_rankme = np_rankme(torch.linalg.svdvals(zc).numpy())
    for trial in range(4):
        acc = GramAccumulator(backend=backend, num_threads=2)
        _threaded_updates(acc, chunks, n_threads=6)
        assert acc.n_rows == z.shape[0] and acc.n_batches == len(chunks), trial
        assert float((acc.gram() - want).abs().max() / want.abs().max()) < 1e-12, trial
        assert float((acc.gram(center=True) - want_c).abs().max() / want_c.abs().max()) < 1e-10, trial
        assert rel_err(acc.rankme(center=True), want_rankme) < 1e-9, trial


def test_concurrent_merge_reads_and_updates_do_not_deadlock():
    """a.merge(b) and b.merge(a) at once (lock-order inversion), a self-merge, and state reads while
    updates run: all finish and the row counts add up."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4000, 16, dtype=torch.float64, generator=gen)
    a = GramAccumulator().update(z[:2000])
    b = GramAccumulator().update(z[2000:])
    errors = []
    stop = threading.Event()

    def run(f):
        try:
            f()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        while not stop.is_set():
            sd = a.state_dict()
            GramAccumulator().load_state_dict(sd)  # every snapshot is a consistent, valid state
            a.spectrum()

    jobs = [lambda: [a.merge(b) for _ in range(20)], lambda: [b.merge(a) for _ in range(20)],
            lambda: [a.update(z[:100]) for _ in range(20)]]
    rd = threading.Thread(target=run, args=(reader,))
    rd.start()
    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    stop.set()
    rd.join(timeout=120)
    assert not any(th.is_alive() for th in threads + [rd]), "deadlock"
    assert not errors, errors
    a.merge(a)  # self-merge under the (reentrant) lock
    assert a.n_rows % 100 == 0 and a.n_rows > 4000


# ----------------------------------------------------------------------------------------------
# 8. tiny and huge magnitudes


def _base(n=2000, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=torch.float64, generator=gen) * torch.logspace(0, -3, d, dtype=torch.float64)


def _ref(x: torch.Tensor, center: bool):
    """(σ of x, RankMe) from the float64 SVD of x·2^k, k bringing max |x| to [0.5, 1) (exact)."""
    k = -math.frexp(float(x.abs().max()))[1]
    y = x * 2.0**(k // 2) * 2.0**(k - k // 2)  # two exact factors, neither overflowing
    if center:
        y = y - y.mean(0)
    sv = torch.linalg.svdvals(y)
    return sv, k, np_rankme(sv.numpy())


def _check(spec, x, center, what):
    sv_ref, k, r_ref = _ref(x, center)
    sv = spec.singular_values
    # σ exactly rescaled: σ·2^k matches the SVD of x·2^k
    scaled = sv * 2.0**(k // 2) * 2.0**(k - k // 2)
    err = float((scaled - sv_ref).abs().max() / sv_ref.max())
    assert err < 1e-9, f"{what}: max |σ_k·2^k − σ_k^ref| / σ_1 = {err:.3e}"
    r = spec.rankme()
    assert rel_err(r, r_ref) < 1e-9, f"{what}: RankMe {r!r} vs {r_ref!r}"


EXPONENTS = list(range(150, 171)) + list(range(-170, -149))


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
def test_tiny_and_huge_in_memory(center):
    base = _base()
    for e in EXPONENTS:
        x = base * 10.0**-e
        _check(rf.spectrum(x, center=center, method="gram"), x, center, f"in memory e={e}")


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
def test_tiny_and_huge_fast_precision(center):
    """precision="fast" on float64 beyond 2^±400: the float32 chunks were scaled but their float64 sums
    under/overflowed ("all-zero spectrum" at 1e-165); now an exact 2^k copy. Within the fast contract."""
    import warnings  # noqa: PLC0415

    base = _base()
    for e in (160, 165, 170, -160, -165, -170):
        x = base * 10.0**-e
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the refinement-pass notice
            s = rf.spectrum(x, center=center, precision="fast")
        sv_ref, k, r_ref = _ref(x, center)
        assert rel_err(s.rankme(), r_ref) < 1e-6, e
        assert rel_err(float(s.singular_values[0]) * 2.0**(k // 2) * 2.0**(k - k // 2), float(sv_ref[0])) < 1e-6, e


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_and_huge_streamed(backend, center):
    backend_or_skip(backend)
    base = _base() + 0.5
    for e in EXPONENTS:
        x = base * 10.0**-e
        acc = GramAccumulator(backend=backend)
        for c in x.split(700):
            acc.update(c)
        _check(acc.spectrum(center), x, center, f"streamed e={e}")
        mu = acc.mean()
        assert float((mu - x.mean(0)).abs().max() / x.mean(0).abs().max()) < 1e-12, e


@pytest.mark.parametrize("amax", (1e-300, 3e-310, 1e300, 1e306), ids=("1e-300", "subnormal", "1e300", "1e306"))
def test_extreme_magnitudes_are_not_an_all_zero_spectrum(amax):
    base = _base(n=300, d=8)
    x = base / base.abs().max() * amax
    assert bool((x != 0).any())
    _check(rf.spectrum(x, method="gram"), x, False, f"in memory amax={amax}")
    _check(GramAccumulator().update(x).spectrum(), x, False, f"streamed amax={amax}")


def test_singular_values_beyond_float64_are_a_clear_error():
    x = torch.full((300, 4), 1.7e308, dtype=torch.float64)  # σ_1 = 1.7e308·√1200: not a float64
    with pytest.raises(ValueError, match=r"largest singular value exceeds float64's range"):
        rf.spectrum(x, method="gram")
    with pytest.raises(ValueError, match=r"singular values overflow float64"):
        GramAccumulator().update(x).spectrum()


def test_uncentred_gram_and_mean_are_unscaled():
    """Where the Gram is representable its entries are those of x, scaled internally or not."""
    x = _base(n=500, d=6) * 2.0**-450  # scaled inside (|x| < 2^-400), squares ~2^-900: representable
    acc = GramAccumulator().update(x[:200]).update(x[200:])
    want = x.T @ x
    assert float((acc.gram() - want).abs().max() / want.abs().max()) < 1e-12
    assert float((acc.mean() - x.mean(0)).abs().max() / x.mean(0).abs().max()) < 1e-12


def test_mixed_magnitudes_in_one_stream():
    """Tiny rows first (they pick a scale), then ordinary ones (the state is rescaled exactly): the
    spectrum of all rows; and tiny rows after ordinary ones are negligible, as in float64."""
    tiny, normal = _base(n=600, d=12, seed=1) * 1e-165, _base(n=600, d=12, seed=2)
    both = torch.cat([tiny, normal])
    acc = GramAccumulator().update(tiny).update(normal)
    _check(acc.spectrum(), both, False, "tiny then normal")
    acc2 = GramAccumulator().update(torch.zeros(5, 12, dtype=torch.float64)).update(tiny)
    _check(acc2.spectrum(), torch.cat([torch.zeros(5, 12, dtype=torch.float64), tiny]), False, "zeros then tiny")
    f32 = GramAccumulator().update(tiny).update(normal.to(torch.float32))
    _check(f32.spectrum(), torch.cat([tiny, normal.to(torch.float32).to(torch.float64)]), False, "tiny then f32")


def test_merge_of_differently_scaled_accumulators():
    tiny, huge, normal = (_base(n=400, d=10, seed=s) for s in (4, 5, 6))
    tiny, huge = tiny * 1e-160, huge * 1e160
    a = GramAccumulator().update(tiny)
    b = GramAccumulator().update(tiny * 1e-5)
    a.merge(b)
    _check(a.spectrum(True), torch.cat([tiny, tiny * 1e-5]), True, "tiny + tinier")
    c = GramAccumulator().update(normal)
    c.merge(GramAccumulator().update(huge))
    _check(c.spectrum(), torch.cat([normal, huge]), False, "normal + huge")
    h = GramAccumulator().update(huge)
    h.merge(GramAccumulator().update(normal))
    _check(h.spectrum(), torch.cat([huge, normal]), False, "huge + normal")


@pytest.mark.parametrize("e", (160, -160, 135))
def test_scaled_state_round_trip(tmp_path, e):
    x = _base(n=800, d=9) * 10.0**-e
    acc = GramAccumulator().update(x[:300])
    sd = acc.state_dict()
    if abs(e) == 160:  # unscaled Gram not representable: saved scaled, with its exponent
        assert sd.get("log2_scale", 0) != 0
    else:
        assert "log2_scale" not in sd
    torch.save(sd, tmp_path / "s.pt")
    back = GramAccumulator().load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    back.update(x[300:])
    _check(back.spectrum(True), x, True, f"resumed e={e}")


# ----------------------------------------------------------------------------------------------
# 12. tampered states


def _state(n=100, d=6, seed=9, offset=2.0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, dtype=torch.float64, generator=gen) + offset
    return GramAccumulator().update(z).state_dict()


def _asymmetric(sd):
    g = sd["gram"].clone()
    g[0, 3] += 0.3 * float(g[0, 0])
    sd["gram"] = g
    return sd


def _set(**kw):
    def f(sd):
        sd.update(kw)
        return sd
    return f


def _neg_diag(sd):
    g = sd["gram"].clone()
    g[2, 2] = -1.0
    sd["gram"] = g
    return sd


def _big_offdiag(sd):
    g = sd["gram"].clone()
    v = 2.0 * math.sqrt(float(g[1, 1] * g[4, 4]))
    g[1, 4] = g[4, 1] = v
    sd["gram"] = g
    return sd


def _big_colsum(sd):
    c = sd["col_sum"].clone()
    c[3] = 1.01 * math.sqrt(sd["n_rows"] * float(sd["gram"][3, 3]))
    sd["col_sum"] = c
    return sd


def _zero_rows(sd):
    sd["n_rows"] = 0
    return sd


TAMPERED = [
    ("asymmetric", _asymmetric, r"state\['gram'\] is not symmetric"),
    ("n_rows_1_for_100_rows", _set(n_rows=1), r"(rank > n_rows = 1|col_sum'\] is inconsistent with n_rows = 1)"),
    ("n_rows_0_nonzero", _zero_rows, r"n_rows = 0 but a non-zero state\['shift'\]"),
    ("n_rows_2_70", _set(n_rows=2**70), r"state\['n_rows'\] = 1180591620717411303424 exceeds int64"),
    ("n_batches_2_64", _set(n_batches=2**64), r"state\['n_batches'\] = .* exceeds int64"),
    ("negative_diagonal", _neg_diag, r"negative diagonal entry \(gram\[2, 2\]"),
    ("cauchy_schwarz", _big_offdiag, r"not positive semi-definite"),
    ("col_sum_too_big", _big_colsum, r"col_sum'\] is inconsistent with n_rows = 100.*col_sum\[3\]"),
    ("log2_scale_bool", _set(log2_scale=True), r"state\['log2_scale'\] must be an int"),
    ("log2_scale_huge", _set(log2_scale=5000), r"state\['log2_scale'\] must be an int"),
]


@pytest.mark.parametrize(("mutate", "pattern"), [pytest.param(m, p, id=i) for i, m, p in TAMPERED])
def test_tampered_state_is_rejected(mutate, pattern):
    sd = mutate(_state())
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(30, 6, dtype=torch.float64, generator=gen)
    acc = GramAccumulator().update(z)
    with pytest.raises(ValueError, match=pattern):
        acc.load_state_dict(sd)
    assert acc.n_rows == 30  # unchanged
    assert float((acc.gram() - z.T @ z).abs().max()) < 1e-10


def test_rank_check_catches_few_rows_claimed():
    sd = _state(n=40, d=30, offset=0.0)
    sd["n_rows"] = 10
    with pytest.raises(ValueError, match=r"rank > n_rows = 10"):
        GramAccumulator().load_state_dict(sd)


def _merged_state(z, parts):
    acc = GramAccumulator()
    for p in np.array_split(np.arange(z.shape[0]), parts):
        acc.merge(GramAccumulator().update(z[p]))
    return acc.state_dict()


@pytest.mark.parametrize("case", ("single_row", "few_rows_many_features", "constant_column", "merged",
                                  "merged_few_rows", "large_offset", "zero_rows_with_d"))
def test_honest_states_are_accepted(case):
    """States the accumulator itself writes pass the checks, near their limits included."""
    gen = torch.Generator().manual_seed(11)
    if case == "single_row":
        z = torch.randn(1, 20, dtype=torch.float64, generator=gen)
        sd = GramAccumulator().update(z).state_dict()
    elif case == "few_rows_many_features":  # rank check near equality: equal singular values
        q, _ = torch.linalg.qr(torch.randn(64, 5, dtype=torch.float64, generator=gen))
        z = q.T * 3.0
        sd = GramAccumulator().update(z).state_dict()
    elif case == "constant_column":
        z = torch.randn(300, 7, dtype=torch.float64, generator=gen)
        z[:, 2] = 0.1
        sd = GramAccumulator().update(z[:3]).update(z[3:]).state_dict()
    elif case == "merged":
        z = torch.randn(500, 9, dtype=torch.float64, generator=gen) + 1e3
        z[:, 4] = 7.3
        sd = _merged_state(z, 7)
    elif case == "merged_few_rows":
        z = torch.randn(6, 40, dtype=torch.float64, generator=gen)
        sd = _merged_state(z, 3)
    elif case == "large_offset":
        z = torch.randn(200, 5, dtype=torch.float64, generator=gen) * 1e-6 + 1e6
        sd = GramAccumulator().update(z[:1]).update(z[1:]).state_dict()
    else:
        z = None
        sd = GramAccumulator(4).update(torch.zeros(0, 4)).state_dict()
    back = GramAccumulator().load_state_dict(sd)
    assert back.n_rows == sd["n_rows"]
    if z is not None:
        want = torch.linalg.svdvals(z - z.mean(0))
        got = back.spectrum(True).singular_values
        assert float((got - want[: got.shape[0]]).abs().max()) <= 1e-6 * float(want.max()) + 1e-9


# ----------------------------------------------------------------------------------------------
# 15. a d×d Gram that does not fit


def test_gram_too_large_for_memory_is_a_clear_error(monkeypatch):
    from rankme_fast import strategies

    monkeypatch.setattr(strategies, "free_memory", lambda device="cpu": 10**9)
    acc = GramAccumulator()
    z = torch.randn(50, 20_000)
    with pytest.raises(ValueError, match=r"d×d float64 Gram of d=20000 features needs 3\.2 GB but only 1 GB "
                                         r"is free.*rf\.rankme.*approximate method"):
        acc.update(z)
    assert acc.n_features is None and acc.n_rows == 0  # nothing changed: still usable
    acc.update(z[:, :100])
    assert acc.n_rows == 50
    # the in-memory route of the same matrix forms the 50×50 Gram
    assert rel_err(rf.rankme(z), np_rankme(torch.linalg.svdvals(z.double()).numpy())) < 1e-6


def test_streaming_a_wide_file_names_the_memory_needed(tmp_path):
    """The reported case: 50×100000 float32 (20 MB) would need an 80 GB d×d Gram."""
    from rankme_fast import strategies

    if strategies.free_memory("cpu") > 8e10:
        pytest.skip("this machine has 80 GB free")
    path = tmp_path / "wide.npy"
    np.save(path, np.random.default_rng(0).standard_normal((50, 100_000), dtype=np.float32))
    with pytest.raises(ValueError, match=r"needs 80 GB"):
        rf.score(path, progress=False)


def test_failed_allocation_marks_the_accumulator_broken(monkeypatch):
    from rankme_fast import strategies
    from rankme_fast.backends import torch_ref

    monkeypatch.setattr(strategies, "free_memory", lambda device="cpu": 1 << 62)
    monkeypatch.setattr(torch_ref, "padded", lambda n: 1_000_000)  # 8 TB: the allocator refuses
    acc = GramAccumulator(backend="torch")
    with pytest.raises(RuntimeError, match=r"allocating its 1000000×1000000 float64 Gram .* failed.*now unusable"):
        acc.update(torch.randn(4, 3))
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"unusable after an earlier error \(allocating"):
        acc.update(torch.randn(4, 3))


def test_out_of_memory_during_update_marks_the_accumulator_broken(monkeypatch):
    from rankme_fast.backends import torch_ref

    acc = GramAccumulator(backend="torch").update(torch.randn(10, 3, dtype=torch.float64))

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch_ref, "gram_update", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"batch 1: OutOfMemoryError while being added.*now unusable"):
        acc.update(torch.randn(10, 3, dtype=torch.float64))
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"batch 1 was interrupted \(OutOfMemoryError\)"):
        acc.rankme()


@pytest.mark.parametrize("center", (False, True), ids=("raw", "centred"))
def test_spectrum_of_a_wide_file_uses_the_small_gram(tmp_path, center):
    """rf.spectrum(path) of an N < d file reads the rows (6 MB) and forms the N×N Gram instead of
    streaming into a d×d one (7.2 GB)."""
    z = np.random.default_rng(1).standard_normal((50, 30_000), dtype=np.float32)
    z[:, :10] *= 30.0
    path = tmp_path / "wide.npy"
    np.save(path, z)
    s = rf.spectrum(path, center=center)
    zt = torch.from_numpy(z).double()
    want = torch.linalg.svdvals(zt - zt.mean(0) if center else zt)
    assert s.singular_values.shape == (50,)
    assert float((s.singular_values - want).abs().max() / want.max()) < 1e-6  # DESIGN §3 contract
    assert rel_err(s.rankme(), np_rankme(want.numpy())) < 1e-6


def test_wide_file_with_nan_names_the_file(tmp_path):
    z = np.ones((5, 40), dtype=np.float32)
    z[3, 7] = np.nan
    path = tmp_path / "bad.npy"
    np.save(path, z)
    with pytest.raises(ValueError, match=r"bad\.npy.*1 non-finite|bad\.npy.*NaN|bad\.npy.*row 3"):
        rf.spectrum(path)


@pytest.mark.parametrize("e", (165, -165))
def test_score_of_a_tiny_or_huge_file(tmp_path, e):
    """The path route streams through the accumulator, so it scales too."""
    x = _base(n=1500, d=16) * 10.0**-e
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    res = rf.score(path, "rankme", chunk_rows=400, progress=False)
    _, _, want = _ref(x, False)
    assert rel_err(res.metrics["rankme"], want) < 1e-9


def test_common_case_has_no_extra_pass_or_copy(monkeypatch):
    """float32 batches: no min/max pass at all; float64 batches of ordinary magnitude: no scaled copy."""
    import rankme_fast.gram as gm

    real_ldexp = gm.ldexp

    def no_scaling(t, k, **kw):
        assert k == 0, "an ordinary batch was scaled"
        return real_ldexp(t, k, **kw)

    def no_pass(t):
        raise AssertionError("abs_max called on a float32 batch")

    z = torch.randn(300, 10)
    monkeypatch.setattr(gm, "abs_max", no_pass)
    monkeypatch.setattr(gm, "ldexp", no_scaling)
    acc = GramAccumulator().update(z[:100]).update(z[100:])
    monkeypatch.setattr(gm, "abs_max", lambda t: 1.0 if t.dtype == torch.float64 else no_pass(t))
    acc.rankme()
    rf.spectrum(z.double(), method="gram")
    GramAccumulator().update(z.double()).spectrum(True)


# ----------------------------------------------------------------------------------------------
# constructor validation and the once-only all_reduce through the accumulator's own method


@pytest.mark.parametrize(("num_threads", "exc"), [(0, ValueError), (-1, ValueError), (2**40, ValueError),
                                                  ("2", TypeError), (True, TypeError), (2.0, TypeError)])
def test_num_threads_is_validated_at_construction(num_threads, exc):
    with pytest.raises(exc, match="num_threads"):
        GramAccumulator(num_threads=num_threads)


ONCE_SCRIPT = r"""
import datetime, os, socket, torch, torch.distributed as dist
from rankme_fast.gram import GramAccumulator
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=30))
z = torch.randn(300, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
acc = GramAccumulator().update(z[:200])
acc.all_reduce(timeout=10)                    # the method passes timeout= through
extra = GramAccumulator().update(z[200:])
acc.merge(extra)                              # still a global state plus more rows
assert acc.n_rows == 300 and torch.allclose(acc.gram(), z.T @ z, rtol=1e-12)
try:
    acc.all_reduce(timeout=10)
except RuntimeError as e:
    print("REFUSED", e)
fresh = GramAccumulator().load_state_dict(acc.state_dict())   # a reloaded state may be reduced again
fresh.all_reduce(timeout=datetime.timedelta(seconds=10))
print("ROWS", fresh.n_rows)
dist.destroy_process_group()
"""


def test_all_reduce_once_also_after_a_merge(tmp_path):
    from tests.conftest import run_python  # noqa: PLC0415

    out = run_python(ONCE_SCRIPT, tmp_path, timeout=120).stdout
    assert "REFUSED" in out and "already" in out.split("REFUSED", 1)[1].splitlines()[0], out
    assert "ROWS 300" in out


@pytest.mark.parametrize("e", (170, -170))
def test_every_metric_at_extreme_magnitudes(e):
    """σ ~ 1e∓170: metrics that square σ (stable rank, participation ratio, NEsum) normalise by σ_1 first
    (they gave NaN); every metric equals its value on the unscaled data."""
    base = _base()
    for name in ("rankme", "effective_rank", "collapse_auc", "alpha_req", "stable_rank", "participation_ratio",
                 "nesum"):
        fn = getattr(rf, name)
        want = fn(base)
        got = fn(base * 10.0**-e)
        assert math.isfinite(got) and rel_err(got, want) < 1e-9, (name, got, want)


@pytest.mark.parametrize("method", ("randomized", "lanczos", "slq"))
@pytest.mark.parametrize("e", (165, -165))
def test_approximate_methods_at_extreme_magnitudes(method, e):
    """Approximate methods on float64 beyond 2^±400 run on the exact copy x·2^k and say so (log2_scale):
    the same estimate and interval as on the unscaled data (power-of-two scaling commutes with every
    float operation short of under/overflow), instead of a false 'all-zero' or overflow error."""
    import warnings  # noqa: PLC0415

    base = _base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # costlier-than-exact notices at these sizes
        ref = rf.spectrum(base, method=method, seed=3)
        s = rf.spectrum(base * 10.0**-e, method=method, seed=3)
    assert ref.log2_scale == 0 and s.log2_scale != 0 and any("x·2^" in n for n in s.notes)
    assert rel_err(s.rankme(), ref.rankme()) < 1e-12
    lo, hi = s.rankme_interval()
    lo0, hi0 = ref.rankme_interval()
    assert rel_err(lo, lo0) < 1e-12 and rel_err(hi, hi0) < 1e-12
    sv = s.singular_values * 2.0 ** (-s.log2_scale // 2) * 2.0 ** (-s.log2_scale - (-s.log2_scale // 2))
    assert rel_err(float(sv[0]), float(ref.singular_values[0]) * 10.0**-e) < 1e-12
