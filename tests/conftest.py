"""Shared fixtures and the independent float64 references for the rankme_fast test suite.

The oracle everywhere is ``torch.linalg.svdvals`` of the float64 copy of the *same* input (after any
dtype conversion), optionally centred in float64 — never a code path of the package itself.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[1]


def _prefer_installed_package() -> None:
    """``python -m pytest`` puts the working directory first on sys.path; run from the repository root
    that would import the *source tree*, which holds no compiled extension, and every native test would
    silently test nothing. Import the installed package when one exists, the source tree otherwise."""
    if "rankme_fast" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
    if importlib.util.find_spec("rankme_fast") is None:
        sys.path[:] = saved


_prefer_installed_package()

import torch  # noqa: E402

import rankme_fast  # noqa: E402
from rankme_fast.demo import SPECTRA, make_embeddings  # noqa: E402

SEED = 20240531
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Spectra built by rankme_fast.demo plus one built here (a few distinct rows repeated many times).
GRID_SPECTRA = tuple(SPECTRA) + ("repeated_rows",)
REPEATED_DISTINCT_ROWS = 5


def dtype_id(dt) -> str:
    return DTYPE_IDS[dt]


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------------------------
# references


def ref_sv(x, center: bool = False) -> torch.Tensor:
    """σ (descending, float64) of x (…, N, d) — the float64 SVD of the input as given, centred in
    float64 over the rows when asked. Accepts torch tensors and NumPy arrays."""
    t = torch.as_tensor(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    z = t.detach().to(torch.float64)
    if center:
        z = z - z.mean(-2, keepdim=True)
    return torch.linalg.svdvals(z)


def np_sv(x, center: bool = False) -> torch.Tensor:
    """σ (descending, float64) from NumPy's LAPACK SVD — an implementation independent of torch's, for
    the routes that *are* torch.linalg.svdvals (method="svd"). Centred in NumPy float64."""
    if isinstance(x, torch.Tensor):
        a = x.detach().to(torch.float64).cpu().numpy()
    elif hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        a = torch.from_dlpack(x).to(torch.float64).numpy()
    else:
        a = np.asarray(x, dtype=np.float64)
    if center:
        a = a - a.mean(-2, keepdims=True)
    return torch.from_numpy(np.linalg.svd(a, compute_uv=False).copy())


def np_rankme(sv, eps: float = 1e-7) -> float:
    """RankMe from DESIGN §2, in NumPy float64: exp(-Σ p log p), p = σ/‖σ‖₁ + ε, 0·log 0 = 0."""
    s = np.asarray(sv, dtype=np.float64)
    p = s / s.sum() + eps
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def np_collapse_auc(sv) -> float:
    """Collapse AUC from DESIGN §2, in NumPy float64: the mean of the normalised cumulative σ."""
    s = np.asarray(sv, dtype=np.float64)
    return float(np.mean(np.cumsum(s) / s.sum()))


def rel_err(got, want) -> float:
    got = float(got)
    want = float(want)
    return abs(got - want) / abs(want)


def sv_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max_k |σ_k - σ_k^ref| / σ_1^ref."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return float((got.to(torch.float64) - want).abs().max() / want.max())


# ----------------------------------------------------------------------------------------------
# matrices with known spectra


def repeated_rows(n: int, d: int, *, distinct: int = REPEATED_DISTINCT_ROWS, seed: int = SEED,
                  dtype=torch.float64, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """N×d matrix made of ``distinct`` random rows, each repeated (in a shuffled order) ~N/distinct
    times: rank ≤ distinct, exactly — a collapsed embedding the way a degenerate encoder produces it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(distinct, d, generator=g, dtype=torch.float64)
    idx = torch.arange(n) % distinct
    idx = idx[torch.randperm(n, generator=g)]
    z = base[idx] * scale
    if offset:
        z = z + offset
    return z.to(dtype)


def build(kind: str, n: int, d: int, *, dtype=torch.float64, seed: int = SEED, scale: float = 1.0,
          offset: float = 0.0) -> torch.Tensor:
    if kind == "repeated_rows":
        return repeated_rows(n, d, seed=seed, dtype=dtype, scale=scale, offset=offset)
    return make_embeddings(n, d, kind, dtype=dtype, seed=seed, scale=scale, offset=offset)


class MatrixCache:
    """Builds each (kind, shape, dtype, scale, offset) matrix once per session, with its reference σ."""

    def __init__(self):
        self._z: dict = {}
        self._ref: dict = {}

    def get(self, kind: str, shape, dtype=torch.float64, *, scale: float = 1.0, offset: float = 0.0,
            seed: int = SEED) -> torch.Tensor:
        key = (kind, tuple(shape), dtype, scale, offset, seed)
        if key not in self._z:
            if dtype == torch.float64:
                self._z[key] = build(kind, *shape, dtype=torch.float64, seed=seed, scale=scale, offset=offset)
            else:
                self._z[key] = self.get(kind, shape, torch.float64, scale=scale, offset=offset, seed=seed).to(dtype)
        return self._z[key]

    def ref(self, kind: str, shape, dtype=torch.float64, *, center: bool = False, **kw) -> torch.Tensor:
        key = (kind, tuple(shape), dtype, center, tuple(sorted(kw.items())))
        if key not in self._ref:
            self._ref[key] = ref_sv(self.get(kind, shape, dtype, **kw), center=center)
        return self._ref[key]


@pytest.fixture(scope="session")
def matrices() -> MatrixCache:
    return MatrixCache()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(SEED)
    np.random.seed(SEED % (2**32))
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


@pytest.fixture
def torch_gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


# ----------------------------------------------------------------------------------------------
# native extension / subprocesses


def native_module():
    return rankme_fast.backends.cpu.load()


def require_native():
    """Skip (with the reason) when the compiled extension is missing — unless CI demands it."""
    if native_module() is None:
        if os.environ.get("RANKME_FAST_REQUIRE_NATIVE") == "1":
            pytest.fail(f"RANKME_FAST_REQUIRE_NATIVE=1 but rankme_fast._C did not load: "
                        f"{rankme_fast.backends.cpu.load_error()}")
        pytest.skip(f"native extension rankme_fast._C not built/importable: {rankme_fast.backends.cpu.load_error()}")


BACKENDS = ("cpu", "torch")


def backend_or_skip(name: str) -> str:
    if name == "cpu":
        require_native()
    return name


def run_python(code: str, tmp_path, env_extra: dict | None = None, timeout: float = 180,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports the *same* rankme_fast as this process
    (cwd is a temporary directory, so the source tree cannot shadow the installed package)."""
    env = dict(os.environ)
    pkg_parent = str(Path(rankme_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("RANKME_FAST_BACKEND", "RANKME_FAST_DISABLE_AVX512"):
        env.pop(k, None)
    if env_extra:
        env.update(env_extra)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"subprocess failed (rc={res.returncode}):\nSTDOUT:\n{res.stdout}\nSTDERR:\n{res.stderr}"
    return res


# ----------------------------------------------------------------------------------------------
# metric references for the streaming tests (DESIGN §2 formulas in NumPy float64)

# each metric's reference centring (DESIGN §2), written out here independently of the package
REF_CENTER = {"rankme": False, "effective_rank": False, "stable_rank": False, "collapse_auc": True,
              "alpha_req": True, "participation_ratio": True, "nesum": True}


def powerlaw_matrix(n: int, d: int, seed: int = 0, offset: float = 0.5) -> np.ndarray:
    """float64 (n, d): Gaussian rows with a power-law spectrum (σ_k ∝ k^-0.7) in a random basis, plus
    a common mean so the centred and uncentred spectra differ."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    g = rng.standard_normal((n, d)) * np.arange(1, d + 1, dtype=np.float64) ** -0.7
    return g @ q + offset * rng.standard_normal(d)


def np_metric(s, name: str, eps: float = 1e-7) -> float:
    """One DESIGN §2 metric from descending singular values, NumPy float64."""
    s = np.asarray(s, dtype=np.float64)
    lam = s**2  # λ ∝ σ²; every λ-metric below is scale invariant
    if name == "rankme":
        return np_rankme(s, eps)
    if name == "effective_rank":
        return np_rankme(s, 0.0)
    if name == "collapse_auc":
        return float(np.mean(np.cumsum(s) / s.sum()))
    if name == "stable_rank":
        return float(lam.sum() / lam[0])
    if name == "participation_ratio":
        return float(lam.sum() ** 2 / (lam**2).sum())
    if name == "nesum":
        return float(lam.sum() / lam.max())
    if name == "alpha_req":
        hi = min(100, len(s))
        i = np.arange(5, hi + 1, dtype=np.float64)
        return float(np.polyfit(-np.log(i), np.log(lam[4:hi]), 1)[0])
    raise KeyError(name)


def ref_metrics(x, names=tuple(REF_CENTER), center=None, eps: float = 1e-7) -> dict:
    """Reference value of each metric for data ``x`` (NumPy or torch, any float dtype), centred by the
    metric's reference convention (center=None) or as forced."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float64)) if isinstance(x, np.ndarray) else x
    sv = {}
    out = {}
    for m in names:
        c = REF_CENTER[m] if center is None else center
        if c not in sv:
            sv[c] = ref_sv(x, center=c).numpy()
        out[m] = np_metric(sv[c], m, eps)
    return out


# ----------------------------------------------------------------------------------------------
# torch.distributed workers (tests/test_distributed.py, tests/test_dist_score.py)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    """The environment of one gloo worker: rendezvous variables, one OpenMP thread, and the package this
    process imports (the source tree on its PYTHONPATH when nothing is installed)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    for k in ("RANKME_FAST_BACKEND", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    pkg_parent = Path(rankme_fast.__file__).resolve().parents[1]
    if pkg_parent == _ROOT:  # no installed package: this process itself runs the source tree
        env["PYTHONPATH"] = str(pkg_parent) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _launch_ranks_once(cfg: dict, out: Path, worker: Path, world: int, timeout: float):
    import json
    import time

    port = free_port()
    logs, procs = [], []
    try:
        for r in range(world):
            log = open(out / f"rank{r}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(worker), json.dumps(cfg), str(out)],
                                          cwd=str(out), env=rank_env(r, world, port), stdout=log,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                for q in procs:
                    q.wait()
                text = "\n".join(f"--- rank {r}:\n{(out / f'rank{r}.log').read_text()}" for r in range(world))
                pytest.fail(f"distributed workers hung (no exit within {timeout} s):\n{text}")
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
        for log in logs:
            log.close()
    return [p.returncode for p in procs], [(out / f"rank{r}.log").read_text() for r in range(world)]


def launch_ranks(cfg: dict, tmp_path: Path, worker: Path, world: int = 2, timeout: float = 120):
    """Run ``world`` processes of ``worker`` (argv: the JSON of ``cfg``, an output directory) as one gloo
    group; return (return codes, logs, output directory). A hang fails the test after ``timeout`` seconds;
    a port clash is retried."""
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        out.mkdir()
        codes, logs = _launch_ranks_once(cfg, out, worker, world, timeout)
        if not any("address already in use" in log.lower() for log in logs):
            break
    return codes, logs, out
