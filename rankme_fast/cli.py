"""``rankme-fast`` command line: ``demo`` and ``info`` (``score`` arrives with streaming, issue 3).

Exit codes: 0 ok, 2 bad usage or bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    import torch

    import rankme_fast as rf
    from rankme_fast.demo import make_embeddings, singular_values
    from rankme_fast.metrics import rankme as rankme_of

    n, d = args.rows, args.dim
    print(f"rankme-fast demo: synthetic float32 embeddings {n} x {d} with known singular values", flush=True)
    print(f"{'spectrum':<10} {'f64 SVD':>12} {'exact':>12} {'rel.err':>9} {'time':>8} "
          f"{'fp32 Gram':>12} {'rel.err':>9}")
    worst = 0.0
    for kind in ("flat", "power1", "rank8", "rank1"):
        z = make_embeddings(n, d, kind, dtype=torch.float32, seed=0)
        truth = float(rankme_of(torch.linalg.svdvals(z.double())))
        t0 = time.perf_counter()
        got = rf.rankme(z)
        dt = time.perf_counter() - t0
        naive_g = (z.T @ z).double()
        naive = float(rankme_of(torch.linalg.eigvalsh(naive_g).flip(0).clamp_min(0).sqrt()))
        err = abs(got - truth) / truth
        worst = max(worst, err)
        print(f"{kind:<10} {truth:12.6f} {got:12.6f} {err:9.1e} {dt * 1e3:6.1f}ms {naive:12.6f} "
              f"{abs(naive - truth) / truth:9.1e}")
    s = rf.spectrum(make_embeddings(n, d, "power1", seed=0), center=True)
    print(f"\npower-law spectrum, centred: collapse_auc={s.collapse_auc():.6f} alpha_req={s.alpha_req():.4f} "
          f"stable_rank={s.stable_rank():.4f} participation_ratio={s.participation_ratio():.4f}")
    print(f"backend={s.backend} method={s.method}; worst exact RankMe error {worst:.1e} "
          f"(contract: 1e-4). 'fp32 Gram' = torch float32 x.T@x + eigvalsh, for contrast.")
    return 0 if worst <= 1e-4 else 1


def _info(args) -> int:
    import rankme_fast

    rankme_fast.show_config()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rankme-fast", description="Exact RankMe and spectral metrics of embeddings")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="score built-in synthetic embeddings with known spectra")
    d.add_argument("--rows", type=int, default=20_000)
    d.add_argument("--dim", type=int, default=256)
    d.set_defaults(fn=_demo)
    i = sub.add_parser("info", help="show build configuration and backends (= show_config)")
    i.set_defaults(fn=_info)
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.cmd == "demo" and (args.rows < 1 or args.dim < 1):
            raise ValueError("--rows and --dim must be positive")
        return args.fn(args)
    except (ValueError, TypeError) as exc:
        print(f"rankme-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
