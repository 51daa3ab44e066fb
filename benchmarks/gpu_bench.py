"""GPU benchmark and kernel probe (issue 11): every GPU route timed, checked and compared, crash-proof.

    python benchmarks/gpu_bench.py probe --out DIR [--budget S]      # one launch per kernel: metadata + error
    python benchmarks/gpu_bench.py bench --out DIR [--budget S] [--only PREFIX,...] [--reps 5]
    python benchmarks/gpu_bench.py plan [probe|bench]                # the task ids, in run order

Each task has an id such as ``gram/1000000x4096/bf16/triton-int8``; tasks run in the order of
:func:`bench_plan` (most valuable first) inside worker processes watched by :mod:`gpu_supervise`, so a
kernel that crashes or hangs is recorded as such and the rest are still timed. Results go to
``DIR/<phase>.json``; ``gpu_check.py report`` turns them into Markdown and a dispatch table.

What is measured (CUDA events after a warm-up, median of ``--reps``; TFLOP/s count N·d² useful flops,
i.e. the symmetric Gram's multiply-adds; ``executed_ops`` what the kernel really issues, against the
dense peak of the same run):
  peak/{bf16,fp16,tf32,fp32,fp64,int8}     8192³ matmuls (``torch._int_mm`` for int8)
  acc/{rank8n,rank1}/{bf16,fp32}           100,000×1024: RankMe and σ error of every exact route vs the
                                           float64 SVD of the same input (DESIGN §3 contract), raw + centred
  gram/NxD/DT/ROUTE                        triton-int8|fp64|fast, cuda-exact|fast, torch-fp64-chunks (the
                                           torch backend), torch-f64-gram (x.double().T @ x.double()),
                                           torch-gram (x.T @ x, cuBLAS), e2e-exact|e2e-fast (rf.rankme),
                                           each exact route's Gram checked against a float64 reference
  eig/D/{gpu,cpu,gpu-eigh}                 float64 eigensolve of a D×D Gram, GPU vs CPU
  normal/100000x16384/bf16/...             Triton normal operator vs x.T @ (x @ w); SLQ vs exact RankMe
  dlpack/{cupy,jax}                        arrays taken zero-copy (data pointer compared)
  svd/NxD/DT                               torch.linalg.svdvals(x.float()), skipped past a time cap
  race/NxD/SPECTRUM                        rf.bench on a CUDA tensor (the GPU rows of the strategy race)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_supervise import Group, emit, run_groups  # noqa: E402

# GPU_BENCH_DEVICE=cpu GPU_BENCH_SMALL=1 TRITON_INTERPRET=1: the same tasks on tiny shapes on the CPU
# (Triton under its interpreter) -- a pre-flight check of this script's code paths, run in CI, so that
# scarce GPU minutes are not spent on a typo. It measures nothing.
DEV = os.environ.get("GPU_BENCH_DEVICE", "cuda")
SMALL = os.environ.get("GPU_BENCH_SMALL", "") == "1"
BENCH_SHAPES = ((1_000_000, 4096), (4_000_000, 1024)) if not SMALL else ((300, 130), (520, 64))
BENCH_DTYPES = ("bf16", "fp32")
GRAM_ROUTES = ("reference", "triton-int8", "triton-fp64", "triton-fast", "cuda-exact", "cuda-fast",
               "torch-fp64-chunks", "torch-f64-gram", "torch-gram", "e2e-exact", "e2e-fast")
EXACT_ROUTES = ("triton-int8", "triton-fp64", "cuda-exact", "torch-fp64-chunks", "torch-f64-gram")
NORMAL_SHAPE = (100_000, 16_384) if not SMALL else (200, 70)
ACC_SHAPE = (100_000, 1024) if not SMALL else (300, 40)
EIG_DIMS = (4096, 1024) if not SMALL else (64, 32)
PEAK_N = 8192 if not SMALL else 64
SVD_CAP_S = 30.0
RACE_SHAPE = (200_000, 2048) if not SMALL else (300, 24)
PROBE_SHAPE = (40_000, 4096) if not SMALL else (150, 130)  # two int8 chunks of 32768 rows, 528 upper tiles


def probe_plan() -> list:
    """(id, timeout) of the probe phase: one launch of each kernel configuration at a real shape."""
    ids = [f"probe/triton-{m}/{dt}" for m, dt in (("int8", "bf16"), ("int8", "fp32"), ("fp64", "fp32"),
                                                  ("fast", "bf16"), ("fast", "fp32"), ("fast", "fp32-shifted"))]
    ids += ["probe/normal-fp64/bf16", "probe/normal-fp32/bf16", "probe/cuda-exact/fp32", "probe/cuda-fast/bf16"]
    return [(i, 90.0) for i in ids]


def bench_plan() -> list:
    """(id, timeout) of the bench phase, most valuable first (a short budget still yields the key
    numbers): peaks, the DESIGN §3 accuracy check, the 1M×4096 bf16 Gram grid (the end-to-end target),
    the eigensolve, normal operator + SLQ, DLPack, then the rest of the shape × dtype grid and svdvals."""
    out = [(f"peak/{p}", 30.0) for p in ("bf16", "int8", "fp64", "tf32", "fp32", "fp16")]
    out += [(f"acc/{k}/{dt}", 120.0) for k in ("rank8n", "rank1") for dt in ("bf16", "fp32")]
    grid = [(n, d, dt) for n, d in BENCH_SHAPES for dt in BENCH_DTYPES]
    n, d, dt = grid[0]
    out += [(f"gram/{n}x{d}/{dt}/{r}", 90.0) for r in GRAM_ROUTES]
    out += [(f"eig/{dd}/{w}", 120.0) for dd in EIG_DIMS for w in ("gpu", "gpu-eigh", "cpu")]
    nn, dd = NORMAL_SHAPE
    out += [(f"normal/{nn}x{dd}/bf16/{r}", 120.0) for r in ("triton-fp64-k16", "triton-fp32-k16", "torch-fp32-k16",
                                                            "torch-bf16-k16", "torch-fp64-k16", "slq", "exact")]
    out += [("dlpack/cupy", 60.0), ("dlpack/jax", 90.0)]
    for n, d, dt in grid[1:]:
        out += [(f"gram/{n}x{d}/{dt}/{r}", 90.0) for r in GRAM_ROUTES]
    out += [(f"svd/{n}x{d}/{dt}", SVD_CAP_S * 8 + 60) for n, d, dt in grid]
    # the GPU rows of RESULTS.md's `rankme-fast bench` tables (issue 12): the same race on a CUDA tensor
    out += [(f"race/{RACE_SHAPE[0]}x{RACE_SHAPE[1]}/{spec}", 240.0) for spec in ("rank8+noise", "power1")]
    return out


ISOLATED = ("dlpack/jax",)


def group_of(tid: str) -> str:
    """Tasks of one group share their input in the worker (the matrix of one shape and dtype)."""
    p = tid.split("/")
    return "/".join(p[:3]) if p[0] in ("gram", "normal", "acc", "svd", "probe", "race") else "/".join(p[:2])


# ------------------------------------------------------------------------------------------------
# worker side (imports torch)


def _torch():
    import torch  # noqa: PLC0415
    return torch


def dtype(name: str):
    torch = _torch()
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]


def _sync() -> None:
    if DEV == "cuda":
        _torch().cuda.synchronize()


def timed(fn, reps: int = 5, cap_s: float = float("inf")) -> dict:
    """CUDA-event time of ``fn``: one warm-up (compiles, allocator), then ``reps`` runs (fewer when the
    warm-up says they would pass ``cap_s``); median, min, max in seconds."""
    torch = _torch()
    t0 = time.perf_counter()
    fn()
    _sync()
    warm = time.perf_counter() - t0
    if warm * reps > cap_s:
        reps = max(1, int(cap_s // max(warm, 1e-9)))
    if DEV != "cuda":
        return {**_cpu_timed(fn, reps, warm=False), "warmup_s": round(warm, 4)}
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        _sync()
        ts.append(a.elapsed_time(b) / 1e3)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "reps": reps,
            "warmup_s": round(warm, 4)}


def _cpu_timed(fn, reps: int, warm: bool = True) -> dict:
    if warm:
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "reps": reps}


class Worker:
    """Runs task ids in order; holds the current group's matrices between its tasks."""

    def __init__(self, reps: int):
        self.reps = reps
        self.group = None
        self.cache: dict = {}

    def enter(self, group: str) -> None:
        if group != self.group:
            self.cache.clear()
            torch = _torch()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.group = group

    # -------------------------------------------------------------------------- data
    def matrix(self, n: int, d: int, dt: str, seed: int = 0):
        key = ("x", n, d, dt)
        if key not in self.cache:
            torch = _torch()
            gen = torch.Generator(device=DEV).manual_seed(seed)
            self.cache[key] = torch.randn(n, d, device=DEV, generator=gen).to(dtype(dt))
        return self.cache[key]

    def reference_gram(self, x):
        """float64 XᵀX in row chunks (cuBLAS DGEMM on float64 chunks: no 8·N·d-byte copy)."""
        key = ("ref", tuple(x.shape), x.dtype)
        if key not in self.cache:
            torch = _torch()
            d = x.shape[1]
            g = torch.zeros(d, d, dtype=torch.float64, device=x.device)
            step = max(1, (1 << 28) // d)
            for r0 in range(0, x.shape[0], step):
                v = x[r0:r0 + step].double()
                g.addmm_(v.T, v)
            self.cache[key] = g
        return self.cache[key]

    # -------------------------------------------------------------------------- tasks
    def run(self, tid: str) -> dict:
        kind = tid.split("/")[0]
        torch = _torch()
        if DEV == "cuda" and kind != "dlpack" and not torch.cuda.is_available():
            return {"status": "skipped", "reason": "no CUDA GPU visible to torch"}
        return getattr(self, "task_" + kind)(*tid.split("/")[1:])

    def task_peak(self, name):
        torch = _torch()
        n = PEAK_N
        gen = torch.Generator(device=DEV).manual_seed(0)
        if name == "int8":
            if not hasattr(torch, "_int_mm"):
                return {"status": "skipped", "reason": "torch._int_mm missing in this torch"}
            a = torch.randint(-64, 64, (n, n), device=DEV, dtype=torch.int8, generator=gen)
            b = torch.randint(-64, 64, (n, n), device=DEV, dtype=torch.int8, generator=gen).T.contiguous().T

            def f():
                torch._int_mm(a, b)
        else:
            dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32,
                  "fp64": torch.float64}[name]
            a = torch.randn(n, n, device=DEV, generator=gen).to(dt)

            def f():
                torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
                try:
                    a @ a
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = False
        rec = timed(f, self.reps)
        return {"status": "ok", **rec, "tflops": 2 * n**3 / rec["median_s"] / 1e12}

    def _gram_fn(self, route, x):
        """(function, output getter, executed ops, peak name) of one Gram route on x."""
        torch = _torch()
        from rankme_fast.backends import cuda as cuda_be, torch_ref, triton_gpu  # noqa: PLC0415
        n, d = x.shape
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[x.dtype]
        if route.startswith("triton-"):
            ok, why = triton_gpu.available(x.device)
            if not ok:
                return why
            tg = triton_gpu.load()
            mode = route.split("-")[1]
            p = tg.padded(d)
            g = torch.zeros(p, p, dtype=torch.float64, device=x.device)

            def f():
                g.zero_()
                tg.gram_update(x, g, mode=mode)
            if mode == "int8":
                s = tg._DTYPE_SLICES[x.dtype]
                bm = tg.int8_config()["BM"]
                tiles = (p // bm) * (p // bm + 1) // 2
                n_pad = -(-n // 64) * 64
                return f, lambda: g[:d, :d], 2 * n_pad * s * s * tiles * bm * bm, "int8"
            cfg = tg.float_config(mode, x.dtype, False)
            tiles = (p // cfg["BM"]) * (p // cfg["BM"] + 1) // 2
            ex = 2 * n * tiles * cfg["BM"] ** 2
            if mode == "fp64":
                return f, lambda: g[:d, :d], ex, "fp64"
            return f, lambda: g[:d, :d], (ex if dt in ("bf16", "fp16") else 3 * ex), ("bf16" if dt in ("bf16", "fp16") else "tf32")
        if route.startswith("cuda-"):
            ok, why = cuda_be.available(x.device)
            if not ok:
                return why
            prec = route.split("-")[1]
            p = cuda_be.padded(d)
            g = torch.zeros(p, p, dtype=torch.float64, device=x.device)

            def f():
                g.zero_()
                cuda_be.gram_update(x, g, precision=prec)
            tiles = (p // cuda_be.TILE) * (p // cuda_be.TILE + 1) // 2
            ex = 2 * n * tiles * cuda_be.TILE ** 2
            peak = "fp64" if prec == "exact" else ("bf16" if dt in ("bf16", "fp16") else "tf32")
            return f, lambda: g[:d, :d], (ex if peak != "tf32" else 3 * ex), peak
        if route == "torch-fp64-chunks":
            g = torch.zeros(d, d, dtype=torch.float64, device=x.device)

            def f():
                g.zero_()
                torch_ref.gram_update(x, g)
            return f, lambda: g, 2 * n * d * d, "fp64"
        if route == "torch-f64-gram":
            box = {}

            def f():
                xd = x.double()
                box["g"] = xd.T @ xd
                del xd
            return f, lambda: box["g"], 2 * n * d * d, "fp64"
        if route == "torch-gram":
            box = {}

            def f():
                box["g"] = x.T @ x
            return f, lambda: box["g"].double(), 2 * n * d * d, ("fp32" if dt == "fp32" else "bf16")
        raise ValueError(f"unknown Gram route {route!r}")

    def task_gram(self, shape, dt, route):
        torch = _torch()
        import rankme_fast as rf  # noqa: PLC0415
        from rankme_fast import metrics  # noqa: PLC0415
        n, d = map(int, shape.split("x"))
        x = self.matrix(n, d, dt)
        if route == "reference":
            t0 = time.perf_counter()
            ref = self.reference_gram(x)
            _sync()
            lam = torch.linalg.eigvalsh(ref).flip(0).clamp_min(0)
            self.cache[("ref_rankme", n, d, dt)] = float(metrics.rankme(lam.sqrt().cpu()))
            return {"status": "ok", "seconds": time.perf_counter() - t0, "rankme": self.cache[("ref_rankme", n, d, dt)],
                    "note": "float64 DGEMM over float64 row chunks; the yardstick of the Gram errors below"}
        base = {"n": n, "d": d, "dtype": dt, "route": route, "useful_flops": n * d * d}
        if route.startswith("e2e-"):
            prec = route.split("-")[1]
            box = {}

            def f():  # what rf.rankme(x, precision=prec) does, keeping the Spectrum to say which backend ran
                box["s"] = rf.spectrum(x, precision=prec)
                box["v"] = box["s"].rankme()
            import warnings  # noqa: PLC0415
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rec = timed(f, self.reps)
            out = {"status": "ok", **base, **rec, "rankme": box["v"], "backend": box["s"].backend,
                   "warnings": sorted({str(m.message)[:200] for m in caught})[:3]}
            ref = self.cache.get(("ref_rankme", n, d, dt))
            if ref is not None:
                out["rankme_rel_err_vs_reference"] = abs(box["v"] - ref) / ref
            return out
        spec = self._gram_fn(route, x)
        if isinstance(spec, str):
            return {"status": "skipped", **base, "reason": spec}
        f, get, executed, peak = spec
        rec = timed(f, self.reps)
        out = {"status": "ok", **base, **rec, "executed_ops": executed, "peak": peak,
               "useful_tflops": n * d * d / rec["median_s"] / 1e12}
        ref = self.cache.get(("ref", (n, d), x.dtype))
        if ref is not None:
            g = get()
            up = torch.triu(torch.ones(d, d, dtype=torch.bool, device=x.device))
            err = float((g - ref).abs()[up].max()) / float(ref.diagonal().max())
            out["max_rel_err_vs_fp64"] = err
        return out

    def task_eig(self, dim, where):
        torch = _torch()
        d = int(dim)
        key = ("spd", d)
        if key not in self.cache:
            gen = torch.Generator(device=DEV).manual_seed(3)
            a = torch.randn(2 * d, d, device=DEV, dtype=torch.float64, generator=gen)
            a *= torch.logspace(0, -6, d, device=DEV, dtype=torch.float64)  # a decaying spectrum
            self.cache[key] = a.T @ a
        g = self.cache[key]
        if where == "cpu":
            gc = g.cpu()
            rec = _cpu_timed(lambda: torch.linalg.eigvalsh(gc), 3 if d >= 4096 else 5)
            return {"status": "ok", "d": d, **rec, "threads": torch.get_num_threads()}
        fn = torch.linalg.eigvalsh if where == "gpu" else torch.linalg.eigh
        rec = timed(lambda: fn(g), self.reps)
        lam = torch.linalg.eigvalsh(g).cpu()
        ref = torch.linalg.eigvalsh(g.cpu())
        return {"status": "ok", "d": d, **rec, "max_rel_diff_vs_cpu": float((lam - ref).abs().max() / ref.abs().max())}

    def task_acc(self, kind, dt):
        """DESIGN §3 on collapsed input at 100,000×1024: every exact route vs the float64 SVD."""
        torch = _torch()
        import rankme_fast as rf  # noqa: PLC0415
        from rankme_fast import backends, metrics  # noqa: PLC0415
        from rankme_fast.demo import singular_values  # noqa: PLC0415
        n, d = ACC_SHAPE
        gen = torch.Generator(device=DEV).manual_seed(1)
        sv = singular_values("rank8_noise" if kind == "rank8n" else kind, d).to(DEV)
        q = torch.linalg.qr(torch.randn(n, d, device=DEV, dtype=torch.float64, generator=gen)).Q
        w = torch.linalg.qr(torch.randn(d, d, device=DEV, dtype=torch.float64, generator=gen)).Q
        x = ((q * (sv * math.sqrt(n))) @ w.T).to(dtype(dt))
        del q, w
        rows = {}
        for center in (False, True):
            v = x.double()
            if center:
                v = v - v.mean(0)
            ref = torch.linalg.svdvals(v).cpu()  # float64 SVD of the same (rounded) input
            del v
            ref_rk = float(metrics.rankme(ref))
            routes = {}
            for be in ("triton", "cuda", "torch"):
                if not backends.BACKENDS[be].available(x.device)[0]:
                    routes[be] = {"skipped": backends.BACKENDS[be].available(x.device)[1]}
                    continue
                modes = ("int8", "fp64") if be == "triton" else (None,)
                for mode in modes:
                    name = be if mode is None else f"{be}-{mode}"
                    if mode:
                        os.environ["RANKME_FAST_TRITON_MODE"] = mode
                    try:
                        s = rf.spectrum(x, center=center, backend=be)
                    finally:
                        os.environ.pop("RANKME_FAST_TRITON_MODE", None)
                    routes[name] = _acc_row(s.singular_values.cpu(), ref, ref_rk, exact=True)
            s = rf.spectrum(x, center=center)
            routes["auto"] = dict(_acc_row(s.singular_values.cpu(), ref, ref_rk, exact=True), backend=s.backend)
            import warnings  # noqa: PLC0415
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                s = rf.spectrum(x, center=center, precision="fast")
            routes["fast"] = dict(_acc_row(s.singular_values.cpu(), ref, ref_rk, exact=False), backend=s.backend)
            v = x.float() - (x.float().mean(0) if center else 0)
            lam = torch.linalg.eigvalsh((v.T @ v).double()).flip(0).clamp_min(0)
            routes["fp32-gram"] = _acc_row(lam.sqrt().cpu(), ref, ref_rk, exact=False)
            routes["fp32-svd"] = _acc_row(torch.linalg.svdvals(v).double().cpu(), ref, ref_rk, exact=False)
            rows["centred" if center else "raw"] = {"reference_rankme": ref_rk, "routes": routes}
        ok = all(r.get("contract", True) for c in rows.values() for r in c["routes"].values())
        return {"status": "ok", "n": n, "d": d, "dtype": dt, "kind": kind, "contract_met": ok, "cases": rows}

    def task_normal(self, shape, dt, route):
        torch = _torch()
        import rankme_fast as rf  # noqa: PLC0415
        from rankme_fast.backends import torch_ref, triton_gpu  # noqa: PLC0415
        n, d = map(int, shape.split("x"))
        x = self.matrix(n, d, dt, seed=2)
        gen = torch.Generator(device=DEV).manual_seed(4)
        w = torch.randn(d, 16, device=DEV, dtype=torch.float64, generator=gen)
        base = {"n": n, "d": d, "dtype": dt, "route": route}
        if route.startswith("triton-"):
            if not triton_gpu.available(x.device)[0]:
                return {"status": "skipped", **base, "reason": triton_gpu.available(x.device)[1]}
            from rankme_fast.kernels.triton import normal  # noqa: PLC0415
            mode = route.split("-")[1]
            box = {}
            rec = timed(lambda: box.__setitem__("y", normal.normal_apply(x, w, mode=mode)), self.reps)
            ref = torch_ref.normal_apply(x, w)
            err = float((box["y"] - ref).abs().max() / ref.abs().max())
            return {"status": "ok", **base, **rec, "max_rel_err_vs_fp64": err, "bytes_x": x.numel() * x.element_size()}
        if route == "torch-fp32-k16":
            xf = x.float()
            w32 = w.float()
            rec = timed(lambda: xf.T @ (xf @ w32), self.reps)
            return {"status": "ok", **base, **rec, "note": "x.float() made once, outside the timing"}
        if route == "torch-bf16-k16":
            wb = w.to(x.dtype)
            rec = timed(lambda: x.T @ (x @ wb), self.reps)
            return {"status": "ok", **base, **rec}
        if route == "torch-fp64-k16":
            rec = timed(lambda: torch_ref.normal_apply(x, w), self.reps, cap_s=30)
            return {"status": "ok", **base, **rec}
        box = {}
        if route == "slq":
            def f():
                box["s"] = rf.spectrum(x, method="slq", seed=0)
                box["v"] = box["s"].rankme()
            rec = timed(f, 3, cap_s=60)
            lo, hi = box["s"].rankme_interval()
            self.cache["slq"] = (rec["median_s"], box["v"], lo, hi)
            return {"status": "ok", **base, **rec, "rankme": box["v"], "interval": [lo, hi]}
        if route == "exact":
            def f():
                box["v"] = rf.rankme(x)
            rec = timed(f, 3, cap_s=60)
            out = {"status": "ok", **base, **rec, "rankme": box["v"]}
            if "slq" in self.cache:
                t, v, lo, hi = self.cache["slq"]
                out.update(slq_speedup=rec["median_s"] / t, slq_rel_err=abs(v - box["v"]) / box["v"],
                           slq_interval_contains=lo <= box["v"] <= hi)
            return out
        raise ValueError(f"unknown normal route {route!r}")

    def task_svd(self, shape, dt):
        torch = _torch()
        n, d = map(int, shape.split("x"))
        x = self.matrix(n, d, dt)
        sub = x[: max(d, n // 16)].float()
        torch.linalg.svdvals(sub[: 2 * d])  # solver warm-up
        _sync()
        t0 = time.perf_counter()
        torch.linalg.svdvals(sub)
        _sync()
        est = (time.perf_counter() - t0) * n / sub.shape[0]
        del sub
        base = {"n": n, "d": d, "dtype": dt, "route": "svdvals", "useful_flops": n * d * d}
        if est > SVD_CAP_S:
            return {"status": "skipped", **base, "estimate_s": est,
                    "reason": f"estimated {est:.1f} s per call from a {n // 16}-row subset > cap {SVD_CAP_S:g} s"}
        rec = timed(lambda: torch.linalg.svdvals(x.float()), 5, cap_s=SVD_CAP_S * 4)
        return {"status": "ok", **base, **rec, "estimate_s": est}

    def task_race(self, shape, spec):
        """rf.bench on the GPU: every strategy and peer route, 3 repeats, routes predicted > 60 s skipped."""
        import rankme_fast as rf  # noqa: PLC0415
        n, d = map(int, shape.split("x"))
        res = rf.bench(shape=(n, d), spectrum=spec, device=DEV, repeats=3, timeout=60, progress=False)
        return {"status": "ok", "n": n, "d": d, "spectrum": spec, "bench": res.to_dict()}

    def task_dlpack(self, lib):
        torch = _torch()
        import rankme_fast as rf  # noqa: PLC0415
        from rankme_fast._inputs import as_tensor  # noqa: PLC0415
        if not torch.cuda.is_available():
            return {"status": "skipped", "reason": "no CUDA GPU visible to torch"}
        out = {"status": "ok", "lib": lib, "cases": {}}
        if lib == "cupy":
            try:
                import cupy as cp  # noqa: PLC0415
            except Exception as exc:  # noqa: BLE001
                return {"status": "skipped", "reason": f"cupy not importable: {exc}"}
            a = cp.random.standard_normal((100_000, 1024), dtype=cp.float32)
            h = a.astype(cp.float16)
            cases = {"fp32": (a, a.data.ptr), "fp16": (h, h.data.ptr)}
        else:
            try:
                import jax  # noqa: PLC0415
                import jax.numpy as jnp  # noqa: PLC0415
            except Exception as exc:  # noqa: BLE001
                return {"status": "skipped", "reason": f"jax not importable: {exc}"}
            gpus = [dv for dv in jax.devices() if dv.platform == "gpu"]
            if not gpus:
                return {"status": "skipped", "reason": f"jax sees no GPU ({jax.devices()})"}
            a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (100_000, 1024), dtype=jnp.float32), gpus[0])
            b = a.astype(jnp.bfloat16)
            cases = {"fp32": (a, a.unsafe_buffer_pointer()), "bf16": (b, b.unsafe_buffer_pointer())}
        for name, (arr, ptr) in cases.items():
            t = as_tensor(arr)
            ref = rf.rankme(t.clone())
            got = rf.rankme(arr)
            out["cases"][name] = {"zero_copy": bool(t.is_cuda and t.data_ptr() == ptr), "rankme": got,
                                  "rankme_rel_diff_vs_torch_copy": abs(got - ref) / ref}
        out["ok"] = all(c["zero_copy"] and c["rankme_rel_diff_vs_torch_copy"] < 1e-12 for c in out["cases"].values())
        return out

    def task_probe(self, kernel, dt):
        """One launch of a kernel configuration at PROBE_SHAPE: its error vs float64 and, for Triton, the
        compiled kernels' registers, spills, shared memory and the PTX instructions that matter."""
        torch = _torch()
        from rankme_fast.backends import cuda as cuda_be, triton_gpu  # noqa: PLC0415
        n, d = PROBE_SHAPE
        shifted = dt.endswith("-shifted")
        x = self.matrix(n, d, dt.replace("-shifted", ""), seed=6)
        out = {"n": n, "d": d, "dtype": dt, "kernel": kernel}
        if kernel.startswith("normal-"):
            if not triton_gpu.available(x.device)[0]:
                return {"status": "skipped", **out, "reason": triton_gpu.available(x.device)[1]}
            from rankme_fast.backends import torch_ref  # noqa: PLC0415
            from rankme_fast.kernels.triton import normal  # noqa: PLC0415
            gen = torch.Generator(device=DEV).manual_seed(4)
            cs = x[:100].double().mean(0)
            for k in (16, 64):
                w = torch.randn(d, k, device=DEV, dtype=torch.float64, generator=gen)
                y = normal.normal_apply(x, w, col_shift=cs, mode=kernel.split("-")[1])
                ref = torch_ref.normal_apply(x, w, col_shift=cs)
                out[f"max_rel_err_k{k}"] = float((y - ref).abs().max() / ref.abs().max())
            out["kernels"] = triton_kernel_info(normal)
            return {"status": "ok", **out}
        cs = x[:100].double().mean(0) if shifted else None
        if kernel.startswith("triton-"):
            if not triton_gpu.available(x.device)[0]:
                return {"status": "skipped", **out, "reason": triton_gpu.available(x.device)[1]}
            tg = triton_gpu.load()
            p = tg.padded(d)
            g = torch.zeros(p, p, dtype=torch.float64, device=x.device)
            tg.gram_update(x, g, col_shift=cs, mode=kernel.split("-")[1])
            out["kernels"] = triton_kernel_info(tg)
        else:
            ok, why = cuda_be.available(x.device)
            if not ok:
                return {"status": "skipped", **out, "reason": why}
            p = cuda_be.padded(d)
            g = torch.zeros(p, p, dtype=torch.float64, device=x.device)
            cuda_be.gram_update(x, g, col_shift=cs, precision=kernel.split("-")[1])
            out["resource_usage"] = cuda_resource_usage()
        _sync()
        v = x.double() - (cs if cs is not None else 0)
        ref = v.T @ v
        up = torch.triu(torch.ones(d, d, dtype=torch.bool, device=x.device))
        out["max_rel_err_vs_fp64"] = float((g[:d, :d] - ref).abs()[up].max()) / float(ref.diagonal().max())
        return {"status": "ok", **out}


def _acc_row(sv, ref, ref_rk, *, exact: bool) -> dict:
    from rankme_fast import metrics  # noqa: PLC0415
    k = min(len(sv), len(ref))
    rk = float(metrics.rankme(sv))
    row = {"rankme": rk, "rankme_rel_err": abs(rk - ref_rk) / ref_rk,
           "sigma_err_over_s1": float((sv[:k] - ref[:k]).abs().max() / ref[0])}
    if exact:
        row["contract"] = row["rankme_rel_err"] <= 1e-4 and row["sigma_err_over_s1"] <= 1e-6
    return row


def triton_kernel_info(module) -> list:
    """Registers, spills, shared memory and PTX features of every compiled kernel of a Triton module
    (``JITFunction.device_caches``: internal, read defensively)."""
    out = []
    for name in dir(module):
        fn = getattr(module, name)
        caches = getattr(fn, "device_caches", None)
        if not caches:
            continue
        for entry in list(caches.values()):
            cache = entry[0] if isinstance(entry, tuple) else entry
            for ck in list(getattr(cache, "values", lambda: [])()):
                rec = {"kernel": name}
                try:
                    if hasattr(ck, "_init_handles"):
                        ck._init_handles()
                    md = ck.metadata
                    ptx = ck.asm.get("ptx", "") if hasattr(ck, "asm") else ""
                    rec.update(n_regs=getattr(ck, "n_regs", None), n_spills=getattr(ck, "n_spills", None),
                               shared=getattr(md, "shared", None), num_warps=getattr(md, "num_warps", None),
                               num_stages=getattr(md, "num_stages", None),
                               wgmma="wgmma" in ptx, s8=".s8" in ptx, mma_f64="mma.sync.aligned.m8n8k4" in ptx and ".f64" in ptx,
                               fma_f64="fma.rn.f64" in ptx, div_full_f32="div.full.f32" in ptx)
                except Exception as exc:  # noqa: BLE001 - internal API differs between Triton versions
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
                out.append(rec)
    return out


def cuda_resource_usage() -> str:
    """cuobjdump's per-kernel registers/shared/stack of the installed _C_cuda module, when available."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    try:
        from rankme_fast import _C_cuda  # noqa: PLC0415
    except ImportError as exc:
        return f"_C_cuda not importable: {exc}"
    tool = shutil.which("cuobjdump")
    if not tool:
        return "cuobjdump not found"
    res = subprocess.run([tool, "--dump-resource-usage", _C_cuda.__file__], capture_output=True, text=True, timeout=60)
    return "\n".join(ln.strip() for ln in res.stdout.splitlines() if "REG" in ln or "Function" in ln)[:4000]


def worker_main(ids: list, progress: str, reps: int) -> int:
    w = Worker(reps)
    for tid in ids:
        emit(progress, {"event": "start", "id": tid})
        t0 = time.perf_counter()
        try:
            w.enter(group_of(tid))
            rec = w.run(tid)
        except Exception as exc:  # noqa: BLE001 - an OOM or a kernel error is a result too
            rec = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:600],
                   "traceback": traceback.format_exc()[-2000:]}
            try:
                _torch().cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
        rec.setdefault("wall_s", round(time.perf_counter() - t0, 3))
        emit(progress, {"event": "end", "id": tid, **rec})
    return 0


# ------------------------------------------------------------------------------------------------
# phase driver (no torch import: the supervisor only starts workers)


def plan_groups(plan: list, reps: int, env_extra: dict, single: bool = False) -> list:
    """One supervised group per phase: a worker runs the tasks in order and a crash restarts it after
    the task that crashed. Probes get a process each (a bad launch must not poison the next probe),
    except with ``single`` (the dry run, where nothing is launched)."""
    def cmd(ids, progress):
        return [sys.executable, str(Path(__file__).resolve()), "worker", "--progress", str(progress),
                "--reps", str(reps), *ids], env_extra
    if plan and plan[0][0].startswith("probe/") and not single:
        return [Group(tid, [(tid, to)], cmd) for tid, to in plan]
    if single:
        return [Group("bench", list(plan), cmd)]
    # JAX gets a process of its own (its CUDA runtime next to torch's is the likeliest crash), in order
    groups, cur = [], []
    for item in plan:
        if item[0] in ISOLATED:
            if cur:
                groups.append(Group(f"bench{len(groups)}", cur, cmd))
            groups.append(Group(item[0].replace("/", "-"), [item], cmd))
            cur = []
        else:
            cur.append(item)
    if cur:
        groups.append(Group(f"bench{len(groups)}", cur, cmd))
    return groups


def run_phase(phase: str, out_dir: Path, budget: float, only: list, reps: int, dry_run: bool = False, log=print) -> dict:
    plan = probe_plan() if phase == "probe" else bench_plan()
    if only:
        plan = [(i, t) for i, t in plan if any(i.startswith(p) for p in only)]
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    records = run_groups(plan_groups(plan, reps, env, single=dry_run), workdir=out_dir / f"{phase}_work", deadline=t0 + budget, log=log)
    recs = [records[i] for i, _ in plan]
    for r in recs:
        log(f"  {r['status']:>8}  {r['id']}" + (f"  ({r.get('reason') or r.get('error')})" if r["status"] not in ("ok",) else ""))
    res = {"phase": phase, "seconds": round(time.monotonic() - t0, 1), "budget_s": budget, "records": recs}
    (out_dir / f"{phase}.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "bench"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--budget", type=float, default=150.0, help="seconds for the whole phase")
        p.add_argument("--only", default="", help="comma-separated id prefixes (e.g. gram/1000000x4096/bf16,peak)")
        p.add_argument("--reps", type=int, default=5)
        p.add_argument("--dry-run", action="store_true", help="one worker for every task (nothing runs on a GPU)")
    pl = sub.add_parser("plan")
    pl.add_argument("phase", choices=("probe", "bench"), default="bench", nargs="?")
    wk = sub.add_parser("worker")
    wk.add_argument("--progress", required=True)
    wk.add_argument("--reps", type=int, default=5)
    wk.add_argument("ids", nargs="*")
    a = ap.parse_args(argv)
    if a.cmd == "worker":
        return worker_main(a.ids, a.progress, a.reps)
    if a.cmd == "plan":
        for tid, to in (probe_plan() if a.phase == "probe" else bench_plan()):
            print(f"{tid}\t{to:g}")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    res = run_phase(a.cmd, a.out, a.budget, [s for s in a.only.split(",") if s], a.reps, a.dry_run)
    bad = [r for r in res["records"] if r["status"] in ("error", "crashed", "timeout")]
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------
# kept for benchmarks/test_bench_gpu.py (pytest-benchmark view of the same Gram routes)


def kernel_routes(x) -> dict:
    w = Worker(1)
    out = {}
    for route in GRAM_ROUTES[1:9]:
        spec = w._gram_fn(route, x)
        if not isinstance(spec, str):
            out[route] = spec[0]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
