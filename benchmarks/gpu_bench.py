"""GPU Gram benchmark (issue 4): every kernel and mode against the torch routes, in one run.

    python benchmarks/gpu_bench.py [--shapes 1000000x4096,4000000x1024] [--dtypes bf16,fp32]
                                   [--out results.json] [--write-dispatch]

Per shape and dtype it times (CUDA events, median of --reps after a warm-up):
  triton-int8 / triton-fp64 / triton-fast   rankme_fast.kernels.triton.gram.gram_update, each mode
  cuda-exact / cuda-fast                    rankme_fast._C_cuda (when built)
  torch-f64-gram                            x.double().T @ x.double()
  torch-gram                                x.T @ x (cuBLAS, the input's dtype)
  svdvals                                   torch.linalg.svdvals(x.float())
and reports TFLOP/s counting N·d² useful flops (the symmetric Gram's multiply-adds ×2 / 2) next to the
dense peaks measured in the same run (8192³ matmuls in bf16, fp32 with and without TF32, fp64).
Accuracy: RankMe of each exact route on a rank-1 and a power-law matrix (20000×512) against the float64
SVD. ``--write-dispatch`` rewrites rankme_fast/backends/dispatch.json from the measured winners.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

import rankme_fast
from rankme_fast import backends
from rankme_fast.backends import cuda as cuda_be
from rankme_fast.backends import triton_gpu
from rankme_fast.demo import make_embeddings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, reps: int) -> dict:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "reps": reps}


def peaks(reps: int) -> dict:
    out = {}
    n = 8192
    for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False),
                           ("tf32", torch.float32, True), ("fp64", torch.float64, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda").to(dt)
        t = timed(lambda a=a: a @ a, reps)["median_s"]
        out[name] = 2 * n**3 / t / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def kernel_routes(x: torch.Tensor) -> dict:
    d = x.shape[1]
    routes = {}
    if triton_gpu.available(x.device)[0]:
        tg = triton_gpu.load()
        for mode in ("int8", "fp64", "fast"):
            g = torch.zeros(tg.padded(d), tg.padded(d), dtype=torch.float64, device=x.device)

            def f(g=g, mode=mode):
                g.zero_()
                tg.gram_update(x, g, mode=mode)
            routes[f"triton-{mode}"] = f
    if cuda_be.available(x.device)[0]:
        for prec in ("exact", "fast"):
            g = torch.zeros(cuda_be.padded(d), cuda_be.padded(d), dtype=torch.float64, device=x.device)

            def f(g=g, prec=prec):
                g.zero_()
                cuda_be.gram_update(x, g, precision=prec)
            routes[f"cuda-{prec}"] = f
    routes["torch-f64-gram"] = lambda: x.double().T @ x.double()
    routes["torch-gram"] = lambda: x.T @ x
    routes["svdvals"] = lambda: torch.linalg.svdvals(x.float())
    return routes


def accuracy() -> dict:
    """RankMe error of each exact GPU route vs the float64 SVD on collapsed / decaying spectra."""
    out = {}
    for kind in ("rank1", "power2"):
        for dt_name in ("fp32", "bf16"):
            z = make_embeddings(20000, 512, kind, dtype=torch.float64, seed=1).to(DTYPES[dt_name])
            ref = rankme_fast.rankme(z, method="svd")
            zc = z.cuda()
            row = {}
            for be in ("triton", "cuda", "torch"):
                if backends.BACKENDS[be].available(zc.device)[0]:
                    row[be] = abs(rankme_fast.rankme(zc, backend=be) - ref) / ref
            row["fast"] = abs(rankme_fast.rankme(zc, precision="fast") - ref) / ref
            g32 = (zc.float().T @ zc.float()).double()
            lam = torch.linalg.eigvalsh(g32).flip(0).clamp_min(0)
            from rankme_fast.metrics import rankme as _rk
            row["fp32-gram"] = abs(float(_rk(lam.sqrt())) - ref) / ref
            out[f"{kind}/{dt_name}"] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1000000x4096,4000000x1024")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma-separated route names to skip (e.g. svdvals)")
    ap.add_argument("--out", default="gpu_results.json")
    ap.add_argument("--write-dispatch", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(sys.modules.get("triton"), "__version__", None), "python": platform.python_version(),
            "rankme_fast": rankme_fast.__version__, "date": datetime.date.today().isoformat()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    res = {"machine": info, "peaks_tflops": peaks(args.reps), "runs": [], "accuracy": accuracy()}
    print(json.dumps(res["machine"]), json.dumps(res["peaks_tflops"]), flush=True)
    for shape in args.shapes.split(","):
        n, d = map(int, shape.split("x"))
        for dt_name in args.dtypes.split(","):
            x = torch.randn(n, d, device="cuda", dtype=torch.float32).to(DTYPES[dt_name])
            for name, fn in kernel_routes(x).items():
                if name in skip:
                    continue
                rec = {"n": n, "d": d, "dtype": dt_name, "route": name}
                try:
                    rec.update(timed(fn, args.reps if name != "svdvals" else 1))
                    rec["useful_tflops"] = n * d * d / rec["median_s"] / 1e12
                except Exception as exc:  # noqa: BLE001 - OOM or a solver failure is a result too
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                torch.cuda.empty_cache()
                res["runs"].append(rec)
                print(json.dumps(rec), flush=True)
            del x
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(res, indent=1))
    if args.write_dispatch:
        write_dispatch(res)
    return 0


def write_dispatch(res: dict) -> None:
    """Order the backends per (precision, dtype) by measured median time (geometric mean over shapes)."""
    path = Path(backends.__file__).with_name("dispatch.json")
    table = json.loads(path.read_text())
    for prec, names in (("exact", {"triton": ("triton-int8", "triton-fp64"), "cuda": ("cuda-exact",)}),
                        ("fast", {"triton": ("triton-fast",), "cuda": ("cuda-fast",)})):
        for dt_name, dt in DTYPES.items():
            score = {}
            for be, routes in names.items():
                ts = [r["median_s"] for r in res["runs"] if r["dtype"] == dt_name and r["route"] in routes
                      and "median_s" in r]
                if ts:
                    score[be] = math.exp(sum(map(math.log, ts)) / len(ts))
            if score:
                table["order"][prec][str(dt).replace("torch.", "")] = sorted(score, key=score.get) + ["torch"]
    table["measured"] = True
    table["source"] = f"benchmarks/gpu_bench.py on {res['machine']['gpu']}, {res['machine']['date']}"
    path.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
