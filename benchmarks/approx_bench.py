"""Approximate vs exact spectra at large d on this CPU (issue 5).

    python benchmarks/approx_bench.py [--n 100000] [--d 16384] [--skip exact,sklearn]

X: float32 (N, d) Gaussian with column scales k^-0.7 (a power-law spectrum; no d×d rotation, which
would cost as much as the problem). Routes, each timed once (wall clock, perf_counter) in one process:
  exact        rankme_fast.spectrum(x)                  float64 Gram + eigvalsh: the reference
  slq          rankme_fast.spectrum(x, method="slq")    default settings
  randomized   rankme_fast.spectrum(x, method="randomized", k=32)
  lanczos      rankme_fast.spectrum(x, method="lanczos", k=32)
  svd_lowrank  torch.svd_lowrank(x, q=42, niter=2)      top-32 σ
  sklearn      sklearn.utils.extmath.randomized_svd(x, 32, n_oversamples=10, n_iter=2)  (if installed)
Reports time, RankMe (or its range) and the relative errors of RankMe and of the top-32 σ against exact.
"""
import argparse
import datetime
import time

import torch

import rankme_fast as rf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=16_384)
    ap.add_argument("--skip", default="")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.n, a.d, generator=g) * torch.arange(1, a.d + 1, dtype=torch.float32) ** -0.7
    print(f"N={a.n} d={a.d} float32, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{datetime.date.today()}", flush=True)
    res = {}

    def run(name, fn):
        if name in skip:
            return None
        t = time.perf_counter()
        out = fn()
        res[name] = (time.perf_counter() - t, out)
        print(f"{name}: {res[name][0]:.1f} s", flush=True)
        return out

    ex = run("exact", lambda: rf.spectrum(x))
    run("slq", lambda: rf.spectrum(x, method="slq"))
    run("randomized", lambda: rf.spectrum(x, method="randomized", k=32))
    run("lanczos", lambda: rf.spectrum(x, method="lanczos", k=32))
    run("svd_lowrank", lambda: torch.svd_lowrank(x, q=42, niter=2)[1][:32].double())
    try:
        from sklearn.utils.extmath import randomized_svd
        run("sklearn", lambda: torch.from_numpy(randomized_svd(x.numpy(), 32, n_oversamples=10, n_iter=2,
                                                               random_state=0)[1]).double())
    except ImportError:
        print("sklearn: not installed")
    ref_rm = ex.rankme() if ex is not None else None
    ref_sv = ex.singular_values[:32] if ex is not None else None
    print("| route | time s | exact time / route | RankMe | RankMe rel. error | max top-32 σ rel. error |")
    print("|---|---|---|---|---|---|")
    for name, (t, out) in res.items():
        ratio = f"{res['exact'][0] / t:.2f}x" if "exact" in res else "-"
        if isinstance(out, torch.Tensor):
            sv, rm, rme = out, "-", "-"
        else:
            sv = out.singular_values[:32]
            r = out.rankme()
            rm = f"{r:.4f}" if name in ("exact", "slq") else f"{r:.4f} [{out.rankme_interval()[0]:.4g}, {out.rankme_interval()[1]:.4g}]"
            if name == "slq":
                lo, hi = out.rankme_interval()
                rm += f" [{lo:.4g}, {hi:.4g}]"
            rme = f"{abs(r - ref_rm) / ref_rm:.1e}" if ref_rm else "-"
        sve = f"{float(((sv[:32] - ref_sv[: sv.numel()]).abs() / ref_sv[: sv.numel()]).max()):.1e}" if (
            ref_sv is not None and sv.numel() >= 1) else "-"
        print(f"| {name} | {t:.1f} | {ratio} | {rm} | {rme} | {sve} |", flush=True)


if __name__ == "__main__":
    main()
