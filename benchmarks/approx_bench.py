"""Approximate vs exact spectra at large d on this CPU (issue 5).

    python benchmarks/approx_bench.py [--n 100000] [--d 16384] [--skip exact,sklearn] [--quick]

X: float32 (N, d) Gaussian with column scales k^-0.7 (a power-law spectrum; no d×d rotation, which
would cost as much as the problem). Every route is timed once (wall clock, perf_counter) in one process,
so the ratios compare like with like on this shared machine:
  exact        rankme_fast.spectrum(x)                         float64 Gram + eigvalsh: the reference
  slq          rankme_fast.spectrum(x, method="slq")           default settings (seeds 0 and 1)
Top-32 singular values at increasing effort, for the equal-accuracy comparison:
  randomized   rankme_fast.spectrum(x, method="randomized", k=32, power_iters=p)   p = 2, 4, 8
  lanczos      rankme_fast.spectrum(x, method="lanczos", k=32, tol=t)              t = 1e-3, 1e-6
  svd_lowrank  torch.svd_lowrank(x, q=42, niter=p)                                  p = 2, 4, 8
  sklearn      sklearn.utils.extmath.randomized_svd(x, 32, n_oversamples=10, n_iter=p)  (if installed)
Prints a table per route (time, RankMe and its range, errors against exact) and, for accuracy targets
1e-2 / 1e-4 / 1e-6 on the top-32 σ (max relative error), the fastest setting of each library reaching it.
"""
import argparse
import datetime
import platform
import time

import torch

import rankme_fast as rf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=16_384)
    ap.add_argument("--skip", default="")
    ap.add_argument("--quick", action="store_true", help="one effort level per top-k route")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.n, a.d, generator=g) * torch.arange(1, a.d + 1, dtype=torch.float32) ** -0.7
    print(f"N={a.n} d={a.d} float32, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {datetime.date.today()}", flush=True)
    res = {}

    def run(name, fn):
        if name.split(":")[0] in skip:
            return None
        t = time.perf_counter()
        out = fn()
        res[name] = (time.perf_counter() - t, out)
        print(f"{name}: {res[name][0]:.1f} s", flush=True)
        return out

    ex = run("exact", lambda: rf.spectrum(x))
    for seed in (0, 1):
        run(f"slq:seed={seed}", lambda: rf.spectrum(x, method="slq", seed=seed))
    efforts = (2,) if a.quick else (2, 4, 8)
    for p in efforts:
        run(f"randomized:power_iters={p}", lambda: rf.spectrum(x, method="randomized", k=32, power_iters=p))
    for tol in ((1e-3,) if a.quick else (1e-3, 1e-6)):
        run(f"lanczos:tol={tol:g}", lambda: rf.spectrum(x, method="lanczos", k=32, tol=tol))
    for p in efforts:
        run(f"svd_lowrank:niter={p}", lambda: torch.svd_lowrank(x, q=42, niter=p)[1][:32].double())
    try:
        from sklearn.utils.extmath import randomized_svd
        for p in efforts:
            run(f"sklearn:n_iter={p}", lambda: torch.from_numpy(randomized_svd(
                x.numpy(), 32, n_oversamples=10, n_iter=p, random_state=0)[1]).double())
    except ImportError:
        print("sklearn: not installed")
    ref_rm = ex.rankme() if ex is not None else None
    ref_sv = ex.singular_values[:32] if ex is not None else None
    print("| route | time s | exact time / route | RankMe [range] | RankMe rel. error | max top-32 σ rel. error |")
    print("|---|---|---|---|---|---|")
    sv_err = {}
    for name, (t, out) in res.items():
        ratio = f"{res['exact'][0] / t:.2f}x" if "exact" in res else "-"
        if isinstance(out, torch.Tensor):
            sv, rm, rme = out, "-", "-"
        else:
            sv = out.singular_values[:32]
            r = out.rankme()
            rm = f"{r:.4f}"
            if name != "exact":
                lo, hi = out.rankme_interval()
                rm += f" [{lo:.6g}, {hi:.6g}]"
            rme = f"{abs(r - ref_rm) / ref_rm:.1e}" if ref_rm else "-"
        e = None
        if ref_sv is not None and sv.numel() >= 32:
            e = float(((sv[:32] - ref_sv).abs() / ref_sv).max())
            sv_err[name] = (t, e)
        print(f"| {name} | {t:.1f} | {ratio} | {rm} | {rme} | {'-' if e is None else f'{e:.1e}'} |", flush=True)
    if sv_err:
        print("\nEqual accuracy (top-32 σ): fastest setting of each library reaching the target")
        print("| target | " + " | ".join(("randomized", "lanczos", "svd_lowrank", "sklearn")) + " |")
        print("|---|---|---|---|---|")
        for target in (1e-2, 1e-4, 1e-6):
            cells = []
            for lib in ("randomized", "lanczos", "svd_lowrank", "sklearn"):
                hits = [(t, n) for n, (t, e) in sv_err.items() if n.startswith(lib + ":") and e <= target]
                cells.append(f"{min(hits)[0]:.1f} s ({min(hits)[1].split(':')[1]})" if hits else "not reached")
            print(f"| ≤ {target:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
