"""``rankme_fast.bench``: race every strategy and every peer's route on the caller's own data.

Each route computes singular values of the same (N, d) matrix; per route we report the median / min / max
seconds over ``repeats`` runs (CUDA synchronised), the peak extra memory (CPU: a thread sampling this
process's resident set every 2 ms, minus the RSS before the run — so allocations shorter than that may be
missed; CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the run), RankMe and its
relative error against the float64 reference (the float64 SVD where it fits in time and memory, else our
exact Gram, labelled as such) and, for synthetic input, against the known truth; max |σ_k − σ_k^ref|/σ_1
over the σ the route computed; whether it is exact; and a ``status``. A route predicted (from the
strategy registry's cost model, calibrated by the exact Gram's own run) to exceed ``timeout`` or to need
more than a quarter of the free memory is skipped with the reason, not run.

Ours: ``gram`` ``gram[<backend>]`` ``gram-fast`` ``svd`` ``randomized`` ``lanczos`` ``slq``. Peers:
``torch-svdvals-fp32`` ``torch-svdvals-fp64`` ``torch-gram-fp32`` (``x.T @ x`` + eigvalsh: what most
hand-written code does) ``torch-gram-fp64`` (a ``x.double()`` copy) ``torch-svd-lowrank`` ``torch-lobpcg``
and, when installed, ``sklearn-randomized-svd`` ``sklearn-pca`` ``cupy-svd``.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from . import backends
from . import strategies as _strategies
from . import metrics as _m

SPECTRUM_ALIASES = {"rank8+noise": "rank8_noise"}
SPECTRUM_CHOICES = ("flat", "power1", "power2", "exp", "rank1", "rank8", "rank8+noise")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEFAULT_SHAPE = (20_000, 512)
TOPK = 32  # the top-k routes (ours and the peers') compute this many σ


@dataclass
class Route:
    name: str
    kind: str  # "ours" | "peer"
    exact: bool
    description: str
    run: Callable  # (x, center) -> singular values tensor, or a Spectrum / ApproxSpectrum
    cost: Callable  # (n, d, itemsize, device) -> _strategies.Cost
    available: Callable = lambda device: (True, "")
    applicable: Callable = lambda n, d, center: (True, "")  # whether the route applies to this input


@dataclass
class Row:
    name: str
    kind: str
    exact: bool
    status: str
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    repeats: int = 0
    peak_mem_bytes: Optional[int] = None
    rankme: Optional[float] = None
    rankme_rel_err: Optional[float] = None
    rankme_rel_err_truth: Optional[float] = None
    sigma_err: Optional[float] = None
    n_sigma: Optional[int] = None
    interval: Optional[list] = None
    estimate_s: Optional[float] = None
    note: str = ""


@dataclass
class BenchResult:
    """Rows of one race plus what it ran on; ``table()``, ``to_json()``, ``to_csv(path)``, ``plot(path)``."""
    rows: list
    n: int
    d: int
    dtype: str
    device: str
    center: bool
    source: str
    reference: str
    reference_rankme: float
    truth_rankme: Optional[float]
    memory_method: str
    machine: dict = field(default_factory=dict)

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchResult":
        """Inverse of :meth:`to_dict` (e.g. to re-plot a saved JSON)."""
        d = dict(d)
        d["rows"] = [Row(**r) for r in d["rows"]]
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)

    def to_csv(self, path) -> None:
        cols = list(Row.__dataclass_fields__)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in asdict(r).items()})

    def table(self) -> str:
        head = (f"rankme-fast bench: {self.source}, {self.n} x {self.d} {self.dtype} on {self.device}"
                f"{', centred' if self.center else ''}; reference: {self.reference} (RankMe {self.reference_rankme:.6g})"
                + (f"; truth RankMe {self.truth_rankme:.6g}" if self.truth_rankme is not None else ""))
        cols = ("strategy", "kind", "exact", "median s", "min s", "max s", "peak MiB", "RankMe", "rel.err",
                "vs truth", "max dσ/σ1", "status")
        lines = [head, "  ".join(f"{c:>10}" if i else f"{c:<22}" for i, c in enumerate(cols))]

        def f(v, fmt):
            return "-" if v is None else fmt.format(v)
        for r in self.rows:
            cells = (r.name, r.kind, "yes" if r.exact else "no", f(r.median_s, "{:.4g}"), f(r.min_s, "{:.4g}"),
                     f(r.max_s, "{:.4g}"), f(None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20, "{:.1f}"),
                     f(r.rankme, "{:.6g}"), f(r.rankme_rel_err, "{:.2e}"), f(r.rankme_rel_err_truth, "{:.2e}"),
                     f(r.sigma_err, "{:.2e}"), r.status)
            lines.append("  ".join(f"{c:>10}" if i else f"{c:<22}" for i, c in enumerate(cells)))
        lines.append(f"memory: {self.memory_method}")
        return "\n".join(lines)

    def plot(self, path) -> None:
        from .plot import bench_pareto  # noqa: PLC0415 - matplotlib is optional
        bench_pareto(self, path)


# ------------------------------------------------------------------------------------------------
# routes


def _center(x: torch.Tensor, center: bool, dtype=None) -> torch.Tensor:
    v = x if dtype is None else x.to(dtype)
    return v - v.mean(0) if center else v


def _eig_sv(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(g.double() if g.dtype != torch.float64 else g).flip(0).clamp_min(0).sqrt()


def _gram_of(v: torch.Tensor) -> torch.Tensor:
    return v.T @ v if v.shape[0] >= v.shape[1] else v @ v.T


def _ours(name: str, backend: Optional[str] = None) -> Route:
    from .api import spectrum  # noqa: PLC0415
    strat = _strategies.get(name)
    topk = name in ("randomized", "lanczos")
    opts = {"k": TOPK} if topk else {}
    method, precision = ("gram", "fast") if name == "gram-fast" else (name, "exact")

    def run(x, center):
        kw = {"k": min(TOPK, min(x.shape))} if topk else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a refinement / cost note is not a result
            return spectrum(x, center=center, method=method, precision=precision, backend=backend, **kw)

    def avail(device):
        if backend is None:
            return True, ""
        return backends.BACKENDS[backend].available(torch.device(device))
    label = f"gram[{backend}]" if backend else name
    return Route(label, "ours", strat.exact, strat.description, run,
                 lambda n, d, it, dev: strat.cost(n, d, it, dev, opts), avail)


def _peer_routes() -> list:
    def svd_cost(copy_itemsize):
        def c(n, d, it, dev):
            base = _strategies.estimate("svd", n, d, it, dev)
            return _strategies.Cost(base.flops, base.bytes_read, copy_itemsize * n * d + 8.0 * min(n, d) ** 2)
        return c

    def gram_cost(copy_itemsize):
        def c(n, d, it, dev):
            base = _strategies.estimate("gram", n, d, it, dev)
            return _strategies.Cost(base.flops * 2, base.bytes_read, copy_itemsize * n * d + 8.0 * min(n, d) ** 2)
        return c

    def lowrank_cost(n, d, it, dev):
        return _strategies.estimate("randomized", n, d, it, dev, k=TOPK)

    def lobpcg_cost(n, d, it, dev):
        base = _strategies.estimate("gram", n, d, it, dev)
        return _strategies.Cost(base.flops + 200.0 * min(n, d) ** 2 * 3 * TOPK, base.bytes_read, base.extra_bytes)

    def lobpcg(x, center):
        v = _center(x, center, torch.float32)
        g = _gram_of(v)
        k = min(TOPK, max(1, g.shape[0] // 3 - 1))
        lam, _ = torch.lobpcg(g, k=k, largest=True, niter=200, tol=1e-7)
        return lam.double().clamp_min(0).sqrt().sort(descending=True).values

    def lowrank(x, center):
        v = _center(x, center, torch.float32)
        q = min(TOPK + 10, min(v.shape))
        _, s, _ = torch.svd_lowrank(v, q=q, niter=2)
        return s.double()[:TOPK]

    def have(mod):
        def a(device):
            try:
                __import__(mod)
            except Exception as exc:  # noqa: BLE001
                return False, f"{mod} not installed ({type(exc).__name__})"
            return True, ""
        return a

    def sk_rsvd(x, center):
        from sklearn.utils.extmath import randomized_svd  # noqa: PLC0415
        v = _center(x, center, torch.float32).cpu().numpy()
        _, s, _ = randomized_svd(v, n_components=min(TOPK, min(v.shape)), random_state=0)
        return torch.as_tensor(s, dtype=torch.float64)

    def sk_pca(x, center):
        from sklearn.decomposition import PCA  # noqa: PLC0415
        v = x.to(torch.float32).cpu().numpy()
        p = PCA(n_components=min(TOPK, min(v.shape)), random_state=0).fit(v)
        return torch.as_tensor(p.singular_values_, dtype=torch.float64)

    def cupy_svd(x, center):
        import cupy as cp  # noqa: PLC0415
        v = _center(x, center, torch.float32)
        s = cp.linalg.svd(cp.asarray(v), compute_uv=False)
        return torch.as_tensor(cp.asnumpy(s), dtype=torch.float64)

    def cupy_avail(device):
        ok, why = have("cupy")(device)
        if ok and device != "cuda":
            return False, "cupy-svd runs on a CUDA device (use --device cuda)"
        return ok, why

    return [
        Route("torch-svdvals-fp32", "peer", False, "torch.linalg.svdvals(x.float())",
              lambda x, c: torch.linalg.svdvals(_center(x, c, torch.float32)).double(), svd_cost(4)),
        Route("torch-svdvals-fp64", "peer", True, "torch.linalg.svdvals(x.double())",
              lambda x, c: torch.linalg.svdvals(_center(x, c, torch.float64)), svd_cost(8)),
        Route("torch-gram-fp32", "peer", False, "x.T @ x in float32 + eigvalsh (what most hand-written code does)",
              lambda x, c: _eig_sv(_gram_of(_center(x, c, torch.float32))), gram_cost(4)),
        Route("torch-gram-fp64", "peer", True, "x.double() copy, x.T @ x + eigvalsh",
              lambda x, c: _eig_sv(_gram_of(_center(x, c, torch.float64))), gram_cost(8)),
        Route("torch-svd-lowrank", "peer", False, f"torch.svd_lowrank(x, q={TOPK}+10, niter=2): top {TOPK}",
              lowrank, lowrank_cost),
        Route("torch-lobpcg", "peer", False, f"torch.lobpcg on the float32 Gram: top {TOPK}", lobpcg, lobpcg_cost,
              applicable=lambda n, d, center: (min(n, d) >= 6, "torch.lobpcg needs a Gram of size >= 3x the "
                                               f"eigenpairs it finds (this one is {min(n, d)})")),
        Route("sklearn-randomized-svd", "peer", False, f"sklearn.utils.extmath.randomized_svd: top {TOPK}", sk_rsvd,
              lowrank_cost, have("sklearn")),
        Route("sklearn-pca", "peer", False, f"sklearn PCA(n_components={TOPK}) (always centres)", sk_pca,
              lowrank_cost, have("sklearn"),
              applicable=lambda n, d, center: (center, "PCA always centres the columns: race it with center=True "
                                                       "(--center)")),
        Route("cupy-svd", "peer", False, "cupy.linalg.svd(compute_uv=False) in float32", cupy_svd, svd_cost(4),
              cupy_avail),
    ]


def routes(device: str = "cpu") -> list:
    """Every route, ours first (``gram[<backend>]`` for each backend available on ``device``)."""
    out = [_ours("gram")]
    for be in ("cpu", "torch", "triton", "cuda"):
        if backends.BACKENDS[be].available(torch.device(device))[0] and not (be == "triton" and device == "cpu"):
            out.append(_ours("gram", be))
    out += [_ours(n) for n in ("gram-fast", "svd", "randomized", "lanczos", "slq")]
    return out + _peer_routes()


def route_names(device: str = "cpu") -> list:
    names = ["gram"] + [f"gram[{b}]" for b in ("cpu", "torch", "triton", "cuda")]
    return names + ["gram-fast", "svd", "randomized", "lanczos", "slq"] + [r.name for r in _peer_routes()]


# ------------------------------------------------------------------------------------------------
# measuring


class _RssSampler:
    """Peak resident set of this process while running, sampled by a thread every 2 ms (/proc/self/statm)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self.page
        except (OSError, ValueError, IndexError):
            return 0

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.base)


def _sv_of(res) -> tuple:
    """(σ tensor, RankMe, interval or None) of a route's result."""
    from .spectrum import ApproxSpectrum, Spectrum  # noqa: PLC0415
    if isinstance(res, ApproxSpectrum):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = res.rankme_interval()
        return res.singular_values.cpu(), res.rankme(), [lo, hi]
    if isinstance(res, Spectrum):
        sv = res.singular_values.cpu()
    else:
        sv = res.detach().double().cpu()
    return sv, float(_m.rankme(sv)), None


def _free(device: str) -> int:
    return _strategies.free_memory(device)


def _input(source, shape, dtype, spectrum_kind, device, seed):
    """(x, description, truth σ or None)."""
    from .demo import make_embeddings, singular_values  # noqa: PLC0415
    if source is None:
        n, d = shape or DEFAULT_SHAPE
        if n < 1 or d < 1:
            raise ValueError(f"shape must be positive, got {n}x{d}")
        kind = SPECTRUM_ALIASES.get(spectrum_kind, spectrum_kind)
        if kind not in SPECTRUM_ALIASES.values() and spectrum_kind not in SPECTRUM_CHOICES:
            raise ValueError(f"unknown spectrum {spectrum_kind!r}; choose one of {', '.join(SPECTRUM_CHOICES)}")
        x = make_embeddings(n, d, kind, dtype=DTYPES[dtype], seed=seed)
        return x.to(device), f"synthetic {spectrum_kind} spectrum (seed {seed})", singular_values(kind, min(n, d))
    if isinstance(source, (str, os.PathLike)):
        from .io import default_chunk_rows, iter_chunks, open_source  # noqa: PLC0415
        readers = open_source(source)
        try:
            n = sum(r.n_rows for r in readers)
            d = readers[0].n_features
            need = 2 * n * d * torch.empty((), dtype=readers[0].dtype).element_size()
            if need > _free("cpu") // 2:
                raise ValueError(f"{source}: {n}x{d} needs ~{need / 2**30:.1f} GiB in memory to race every route; "
                                 "race a row subset (rankme-fast score streams files of any size)")
            parts = [c.clone() for _, _, c in iter_chunks(readers, default_chunk_rows(d, readers[0].dtype))]
        finally:
            for r in readers:
                r.close()
        if not parts:
            raise ValueError(f"{source}: no rows")
        return torch.cat(parts).to(device), str(source), None
    from ._inputs import as_tensor  # noqa: PLC0415
    return as_tensor(source).to(device), "the given matrix", None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(source: Any = None, *, shape: Optional[tuple] = None, dtype: str = "float32", spectrum: str = "power1",
          strategies: Optional[Any] = None, repeats: int = 3, device: Optional[str] = None, center: bool = False,
          seed: int = 0, timeout: Optional[float] = None, progress: Optional[bool] = None) -> BenchResult:
    """Race strategies and peers' routes on ``source`` (a path, an array / tensor) or on a synthetic matrix
    of ``shape`` with a known ``spectrum``; see the module docstring for what each row reports.

    Args:
        strategies: names (list or comma-separated), ``"all"`` or None (= all).
        repeats: timed runs per route (≥ 1). timeout: skip routes predicted to exceed it (seconds).
        device: "cpu" | "cuda" (default: where ``source`` lives, else cpu).
    """
    import rankme_fast as _rf  # noqa: PLC0415
    names_all = route_names()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if strategies in (None, "all"):
        want = None
    else:
        want = [s.strip() for s in (strategies.split(",") if isinstance(strategies, str) else strategies) if s.strip()]
        bad = [s for s in want if s not in names_all]
        if bad or not want:
            raise ValueError(f"unknown strategies {bad or want}; choose from {', '.join(names_all)} or 'all'")
    if device is None:
        device = "cuda" if isinstance(source, torch.Tensor) and source.is_cuda else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA GPU")
    x, desc, truth = _input(source, shape, dtype, spectrum, device, seed)
    if x.ndim != 2:
        raise ValueError(f"bench needs one (N, d) matrix, got shape {tuple(x.shape)}")
    n, d = x.shape
    rs = [r for r in routes(device) if want is None or r.name in want]
    if want is not None:
        missing = [w for w in want if w not in {r.name for r in rs}]
        for w in missing:  # a backend not available here: say so in its row
            rs.append(Route(w, "ours", True, "", None, None, lambda dev, w=w: (False, f"{w}: backend unavailable on {device}")))
    # the exact Gram runs first: it calibrates the cost model and is the fallback reference
    rs.sort(key=lambda r: 0 if r.name == "gram" else 1)
    it = x.element_size()
    mem_method = ("torch.cuda.max_memory_allocated above the allocation before each run" if device == "cuda" else
                  "peak resident set of this process above its size before each run, sampled every 2 ms by a thread")
    gram_est = _strategies.estimate("gram", n, d, it, device).seconds(device)
    svd_est = _strategies.estimate("svd", n, d, it, device).seconds(device)
    calib = None
    ref_sv, ref_label = None, None
    ref_route = next((r for r in _peer_routes() if r.name == "torch-svdvals-fp64"), None)
    rows = []
    bar = None
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415
            bar = tqdm(total=len(rs), desc="bench", unit="route", file=sys.stderr)
        except ImportError:
            bar = None
    results: dict = {}
    try:
        for r in rs:
            if bar is not None:
                bar.set_postfix_str(r.name)
            row = Row(r.name, r.kind, r.exact, "ok")
            ok, why = r.available(device)
            if ok:
                ok, why = r.applicable(n, d, center)
            if not ok:
                row.status = f"skipped: {why}"
            else:
                cost = r.cost(n, d, it, device)
                est = cost.seconds(device) * (calib or 1.0)
                row.estimate_s = est
                free = _free(device)
                if cost.extra_bytes > free / 4:
                    row.status = (f"skipped: needs ~{cost.extra_bytes / 2**30:.2f} GiB extra, more than a quarter of "
                                  f"the {free / 2**30:.1f} GiB free")
                elif timeout is not None and r.name != "gram" and (calib := calib or _calibrate(x, device)) \
                        and cost.seconds(device) * calib > timeout:
                    est = row.estimate_s = cost.seconds(device) * calib
                    row.status = f"skipped: predicted {est:.3g} s > timeout {timeout:g} s"
                else:
                    # a warm-up run where it is cheap (predicted < 2 s) and always for gram, which runs first
                    _run_route(r, row, x, center, repeats, device, results, warm=calib is None or est < 2.0)
                    if r.name == "gram" and row.status == "ok":
                        calib = row.median_s / max(gram_est, 1e-12)
            rows.append(row)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    # rows in the order asked for (or the registry's); the exact Gram only *ran* first
    order = want if want is not None else [r.name for r in routes(device)]
    rows.sort(key=lambda r: order.index(r.name) if r.name in order else len(order))
    # reference: the float64 SVD where it fits in time and memory, else our exact Gram
    if "torch-svdvals-fp64" in results:
        ref_sv, ref_label = results["torch-svdvals-fp64"], "float64 SVD (torch.linalg.svdvals of x.double())"
    else:
        fits_mem = 8 * n * d < _free(device) / 4
        fits_time = timeout is None or calib is None or svd_est * calib <= timeout
        if fits_mem and fits_time and ref_route is not None:
            ref_sv, ref_label = ref_route.run(x, center).cpu(), "float64 SVD (torch.linalg.svdvals of x.double())"
        elif "gram" in results:
            ref_sv, ref_label = results["gram"], "our exact float64 Gram (the float64 SVD did not fit in time/memory)"
        else:
            sp = _rf.spectrum(x, center=center)
            ref_sv, ref_label = sp.singular_values.cpu(), "our exact float64 Gram"
    ref_rk = float(_m.rankme(ref_sv))
    # synthetic input: σ = the named spectrum exactly before rounding to dtype (RankMe is scale-free);
    # centring changes the spectrum, so there is no truth then
    truth_rk = float(_m.rankme(truth)) if truth is not None and not center else None
    for row in rows:
        sv = results.get(row.name)
        if sv is None or row.rankme is None:
            continue
        row.rankme_rel_err = abs(row.rankme - ref_rk) / ref_rk
        if truth_rk is not None:
            row.rankme_rel_err_truth = abs(row.rankme - truth_rk) / truth_rk
        k = min(len(sv), len(ref_sv))
        row.sigma_err = float((sv[:k] - ref_sv[:k]).abs().max() / ref_sv[0]) if k else None
        row.n_sigma = len(sv)
    from ._config import cpu_model, kernel_isa  # noqa: PLC0415
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "rankme_fast": getattr(_rf, "__version__", "?"), "python": platform.python_version(),
               "date": datetime.date.today().isoformat(), "isa": kernel_isa()}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return BenchResult(rows, n, d, dtype if source is None else str(x.dtype).replace("torch.", ""), device, center,
                       desc, ref_label, ref_rk, truth_rk, mem_method, machine)


def _calibrate(x: torch.Tensor, device: str) -> float:
    """Seconds per nominal second of the cost model on this machine: the exact Gram timed on a row
    subset (used when the race does not include ``gram`` itself, which otherwise calibrates it)."""
    from .api import spectrum  # noqa: PLC0415
    sub = x[: min(x.shape[0], max(2000, x.shape[0] // 20))]
    spectrum(sub)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    spectrum(sub)
    _sync(device)
    dt = time.perf_counter() - t0
    nominal = _strategies.estimate("gram", sub.shape[0], sub.shape[1], sub.element_size(), device).seconds(device)
    return max(dt, 1e-6) / max(nominal, 1e-12)


def _run_route(r: Route, row: Row, x, center, repeats, device, results, warm: bool = False) -> None:
    ts = []
    peak = 0
    res = None
    try:
        if warm:  # first-call costs (extension loading, allocator, JIT) are not the route's speed
            r.run(x, center)
            _sync(device)
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                res = r.run(x, center)
                _sync(device)
                ts.append(time.perf_counter() - t0)
                peak = max(peak, torch.cuda.max_memory_allocated() - base)
            else:
                with _RssSampler() as s:
                    t0 = time.perf_counter()
                    res = r.run(x, center)
                    ts.append(time.perf_counter() - t0)
                peak = max(peak, s.extra)
    except (RuntimeError, ValueError, TypeError, MemoryError, ImportError) as exc:
        row.status = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        return
    sv, rk, interval = _sv_of(res)
    if not math.isfinite(rk):
        row.status = "failed: non-finite RankMe"
        return
    row.median_s, row.min_s, row.max_s = statistics.median(ts), min(ts), max(ts)
    row.repeats = len(ts)
    row.peak_mem_bytes = int(peak)
    row.rankme = rk
    row.interval = interval
    results[r.name] = sv
