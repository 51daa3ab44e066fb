"""The LAPACK thread policy (rankme_fast/_threads.py): restores torch's thread count, is safe under
concurrent Python threads and inside forked DataLoader workers (issue 14, item 0)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import rankme_fast as rf
from rankme_fast import _threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mat(seed: int, n: int = 3000, d: int = 192) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.arange(1, d + 1, dtype=torch.float32) ** -0.5


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_limit_threads_restores(restore_threads):
    before = restore_threads
    with _threads.limit_threads(1):
        assert torch.get_num_threads() == 1
        with _threads.limit_threads(1):  # nested: the inner level neither sets nor restores
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_limit_threads_restores_on_exception(restore_threads):
    before = restore_threads
    with pytest.raises(ZeroDivisionError):
        with _threads.limit_threads(1):
            with _threads.limit_threads(1):
                1 / 0
    assert torch.get_num_threads() == before
    # and the next use in this thread is an outermost level again
    with _threads.limit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_rankme_restores_after_error(restore_threads):
    before = restore_threads
    x = _mat(0, 200, 16).double()
    x[3, 4] = float("nan")
    with pytest.raises(ValueError):
        rf.rankme(x)
    assert torch.get_num_threads() == before
    rf.rankme(_mat(1, 200, 16))
    rf.spectrum(_mat(1, 200, 16), method="svd")
    rf.spectrum(_mat(1, 400, 32), method="lanczos", k=4)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("work,expect_one", [(64.0**3, True), (512.0**3, True), (1e12, False)],
                         ids=["k64", "k512", "huge"])
def test_policy_by_size(monkeypatch, work, expect_one):
    monkeypatch.delenv(_threads.ENV, raising=False)
    monkeypatch.setattr(_threads, "other_runnable", lambda: 0)
    monkeypatch.setattr(_threads, "_cpus", lambda: 8)
    n = _threads.dense_threads(work, default=8)
    assert (n == 1) == expect_one
    assert 1 <= n <= 8


def test_policy_leaves_busy_cores(monkeypatch):
    monkeypatch.delenv(_threads.ENV, raising=False)
    monkeypatch.setattr(_threads, "_cpus", lambda: 4)
    monkeypatch.setattr(_threads, "other_runnable", lambda: 3)
    assert _threads.dense_threads(1e12, default=4) == 1
    monkeypatch.setattr(_threads, "other_runnable", lambda: 1)
    assert _threads.dense_threads(1e12, default=4) == 3
    monkeypatch.setattr(_threads, "other_runnable", lambda: 9)
    assert _threads.dense_threads(1e12, default=4) == 1


def test_policy_override(monkeypatch):
    monkeypatch.setenv(_threads.ENV, "torch")
    assert _threads.dense_threads(1.0, default=6) == 6
    monkeypatch.setenv(_threads.ENV, "2")
    assert _threads.dense_threads(1.0, default=6) == 2
    assert _threads.dense_threads(1e12, default=1) == 1  # never above torch's own count
    monkeypatch.setenv(_threads.ENV, "many")
    with pytest.raises(ValueError, match=_threads.ENV):
        _threads.dense_threads(1.0, default=6)


def test_other_runnable_is_cheap_and_sane():
    n = _threads.other_runnable()
    assert isinstance(n, int) and n >= 0


def test_dense_step_cpu_only():
    ctx = _threads.dense_step(torch.zeros(8, 8, device="meta"))
    with ctx:
        pass  # a non-CPU tensor gets a null scope


def test_concurrent_python_threads(restore_threads):
    before = restore_threads
    xs = [_mat(10 + i) for i in range(4)] + [_mat(20, 400, 600)]  # N < d takes the transposed Gram
    ref = [rf.rankme(x) for x in xs]
    barrier = threading.Barrier(len(xs))

    def work(i):
        barrier.wait(timeout=30)
        return [rf.rankme(xs[i]) for _ in range(3)]

    with ThreadPoolExecutor(len(xs)) as ex:
        futs = [ex.submit(work, i) for i in range(len(xs))]
        got = [f.result(timeout=60) for f in futs]
    for r, vals in zip(ref, got):
        for v in vals:
            assert v == pytest.approx(r, rel=1e-12, abs=0)
    assert torch.get_num_threads() == before


def test_slq_small_products_run_in_the_dense_scope(restore_threads, monkeypatch):
    """Every small product of SLQ's deflated Lanczos (the reorthogonalisation and the projection against the
    deflation basis) runs on one torch thread: on torch's 2-thread spinning team the projection alone was
    5.7x slower with both cores busy (RESULTS.md, issue 14 item 0)."""
    import inspect

    from rankme_fast import approx

    torch.set_num_threads(2)
    seen = []
    orig = torch.Tensor.__matmul__

    def spy(a, b):
        caller = inspect.currentframe().f_back
        if caller is not None and caller.f_code.co_filename == approx.__file__:
            seen.append((caller.f_code.co_name, torch.get_num_threads()))
        return orig(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    s = rf.spectrum(_mat(6, 2000, 96), method="slq", probes=4, steps=12, deflate_steps=8, deflate=16)
    assert s.rankme() > 0
    assert any(name == "proj" for name, _ in seen), seen[:5]
    assert {n for _, n in seen} == {1}, sorted(set(seen))
    assert torch.get_num_threads() == 2


def test_concurrent_threads_batched_and_approx(restore_threads):
    xb = torch.randn(6, 128, 48, generator=torch.Generator().manual_seed(3))
    x = _mat(4, 2000, 128)
    ref_b = rf.rankme(xb)
    ref_s = rf.spectrum(x, method="lanczos", k=8).singular_values

    def work(i):
        if i % 2:
            return rf.rankme(xb)
        return rf.spectrum(x, method="lanczos", k=8).singular_values

    with ThreadPoolExecutor(4) as ex:
        got = [f.result(timeout=60) for f in [ex.submit(work, i) for i in range(8)]]
    for i, g in enumerate(got):
        if i % 2:
            torch.testing.assert_close(g, ref_b, rtol=1e-12, atol=0)
        else:
            torch.testing.assert_close(g, ref_s, rtol=1e-10, atol=0)
    assert torch.get_num_threads() == restore_threads


_FORK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import rankme_fast as rf
    from torch.utils.data import DataLoader, Dataset

    def mat(i):
        g = torch.Generator().manual_seed(100 + i)
        return torch.randn(1500, 160, generator=g) * torch.arange(1, 161, dtype=torch.float32) ** -0.5

    class DS(Dataset):
        def __len__(self):
            return 6
        def __getitem__(self, i):
            return torch.tensor([float(i), rf.rankme(mat(i)), float(rf.rankme(mat(i)[None].repeat(2, 1, 1))[1])],
                                dtype=torch.float64)

    # the parent has run its OpenMP / LAPACK pools (and this package's thread scope) before forking
    ref = [rf.rankme(mat(i)) for i in range(6)]
    rows = torch.cat(list(DataLoader(DS(), batch_size=2, num_workers=2, multiprocessing_context="fork")))
    for i, r, rb in rows.tolist():
        assert abs(r - ref[int(i)]) <= 1e-12 * ref[int(i)], (i, r, ref[int(i)])
        assert abs(rb - ref[int(i)]) <= 1e-9 * ref[int(i)], (i, rb, ref[int(i)])
    print("OK", len(rows))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_dataloader_workers():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=90, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK 6" in p.stdout
