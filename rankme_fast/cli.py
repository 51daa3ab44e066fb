"""``rankme-fast`` command line.

``score PATH...``  metrics of embedding files (each PATH — a file, a shard directory or a quoted glob —
                   is one matrix), streamed with O(d²) memory; a table, or one JSON object per PATH per
                   line with ``--json``.
``bench [PATH]``   race every strategy and peer's route (time, memory, accuracy) on PATH or on a
                   synthetic matrix with a known spectrum; a table, ``--json``, ``--csv``, ``--plot``.
``info``           build configuration and backends (= ``rankme_fast.show_config()``).
``demo``           synthetic embeddings with known spectra: exact vs true RankMe.

Exit codes: 0 ok, 2 bad usage, bad input or an unreadable file (one line on stderr), 1 out of memory
(one line on stderr) or a closed output pipe (nothing on stderr), 130 interrupted (Ctrl-C / SIGINT:
one line, no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _demo(args) -> int:
    import torch

    import rankme_fast as rf
    from rankme_fast.demo import make_embeddings
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

    # The same matrix as 3 .npy shards on disk, streamed the way `rankme-fast score DIR` does.
    import os
    import tempfile

    import numpy as np

    z = make_embeddings(n, d, "power1", dtype=torch.float32, seed=0)
    with tempfile.TemporaryDirectory(prefix="rankme_fast_demo_") as tmp:
        for i, part in enumerate(torch.tensor_split(z, 3)):
            np.save(os.path.join(tmp, f"part_{i}.npy"), part.numpy())
        res = rf.score(tmp, "rankme,collapse_auc", chunk_rows=max(1, n // 7), progress=False)
    mem = rf.rankme(z)
    rel = abs(res.metrics["rankme"] - mem) / mem
    print(f"streamed from 3 .npy shards: rankme={res.metrics['rankme']:.6f} (in memory {mem:.6f}, rel.diff "
          f"{rel:.1e}) collapse_auc={res.metrics['collapse_auc']:.6f}")
    return 0 if worst <= 1e-4 and rel <= 1e-9 else 1


def _fmt(v: float) -> str:
    return f"{v:.6f}" if abs(v) < 1e6 else f"{v:.6g}"


def _score(args) -> int:
    import json

    from rankme_fast.scoring import METRICS, parse_metrics, score

    names = parse_metrics(args.metrics)
    center = True if args.center else (False if args.no_center else None)
    progress = False if args.quiet else None
    want = {m: (METRICS[m] if center is None else center) for m in names}
    heads = ["path", "rows", "d", "dtype"] + [m + ("(c)" if center is None and want[m] else "") for m in names]
    widths = [max(4, *(len(p) for p in args.paths)), 10, 6, 8] + [max(12, len(h)) for h in heads[4:]]
    if not args.json:
        print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))
              + "  " + "time".rjust(8), flush=True)
    for path in args.paths:  # one row as soon as each PATH is done
        res = score(path, names, center=center, eps=args.eps, key=args.key, chunk_rows=args.chunk_rows,
                    max_rows=args.max_rows, progress=progress)
        if args.json:
            print(json.dumps(res.as_dict()), flush=True)
            continue
        cells = [path, str(res.n_rows), str(res.n_features), res.dtype] + [_fmt(res.metrics[m]) for m in names]
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
              + "  " + f"{res.seconds:.2f}s".rjust(8), flush=True)
    if not args.json and center is None and any(want.values()):
        print("(c) = centred spectrum, the metric's reference convention; --center / --no-center force one")
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _eps(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and v < 1):
        raise argparse.ArgumentTypeError(f"eps must be in [0, 1), got {text!r}")
    return v


def _shape(text: str) -> tuple:
    try:
        n, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 20000x512, got {text!r}") from None
    if n < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return n, d


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def _bench(args) -> int:
    import importlib

    _b = importlib.import_module("rankme_fast.bench")  # the package attribute `bench` is the function

    if args.list:
        import torch  # noqa: PLC0415

        from rankme_fast import backends  # noqa: PLC0415
        dev = args.device or "cpu"
        for r in _b.routes(dev):
            ok, why = r.available(dev)
            print(f"{r.name:<24} {r.kind:<5} {'exact' if r.exact else 'approx':<7} "
                  f"{'available' if ok else 'unavailable: ' + why:<14}  {r.description}")
        shown = {r.name for r in _b.routes(dev)}
        for name in _b.route_names(dev):
            if name not in shown:
                be = name[5:-1]
                print(f"{name:<24} ours  exact   unavailable: {backends.BACKENDS[be].available(torch.device(dev))[1]}")
        return 0
    if args.plot:
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("matplotlib") is None:
            raise RuntimeError("--plot needs matplotlib: pip install 'rankme_fast[plot]'")
    res = _b.bench(args.path, shape=args.shape, dtype=args.dtype, spectrum=args.spectrum,
                   strategies=args.strategies, repeats=args.repeats, device=args.device, center=args.center,
                   seed=args.seed, timeout=args.timeout, progress=None if not args.json else False)
    if args.json:
        print(res.to_json())
    else:
        print(res.table())
    if args.csv:
        res.to_csv(args.csv)
    if args.plot:
        res.plot(args.plot)
    return 0


def _info(args) -> int:
    import rankme_fast

    rankme_fast.show_config()
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors: one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _main(argv) -> int:
    p = _Parser(prog="rankme-fast", description="Exact RankMe and spectral metrics of embeddings")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sc = sub.add_parser("score", help="metrics of embedding files (.npy, .safetensors, .pt, .h5, .zarr, shard dirs)",
                        description="Stream each PATH (a file, a directory of shards, or a quoted glob) "
                                    "through a float64 Gram accumulator and print its metrics.")
    sc.add_argument("paths", nargs="+", metavar="PATH")
    sc.add_argument("--metrics", default="rankme",
                    help="comma-separated: rankme, effective_rank, stable_rank, collapse_auc, alpha_req, "
                         "participation_ratio, nesum, or 'all' (default: rankme)")
    cg = sc.add_mutually_exclusive_group()
    cg.add_argument("--center", action="store_true", help="centre the embeddings for every metric")
    cg.add_argument("--no-center", action="store_true", help="no centring for any metric")
    sc.add_argument("--eps", type=_eps, default=1e-7, help="RankMe epsilon (default 1e-7)")
    sc.add_argument("--key", default=None, help="tensor/dataset name inside multi-tensor files")
    sc.add_argument("--json", action="store_true", help="one JSON object per PATH per line")
    sc.add_argument("--chunk-rows", type=_positive_int, default=None, help="rows per read (default ~64 MiB)")
    sc.add_argument("--max-rows", type=_positive_int, default=None, help="use only the first N rows of each PATH")
    sc.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    sc.set_defaults(fn=_score)
    d = sub.add_parser("demo", help="score built-in synthetic embeddings with known spectra")
    d.add_argument("--rows", type=int, default=20_000)
    d.add_argument("--dim", type=int, default=256)
    d.set_defaults(fn=_demo)
    b = sub.add_parser("bench", help="race every SVD strategy and peer's route on a file or a synthetic matrix",
                       description="Time, memory and accuracy of every way to get the spectrum of one (N, d) "
                                   "matrix: PATH, or a synthetic matrix with a known spectrum.")
    b.add_argument("path", nargs="?", default=None, metavar="PATH")
    b.add_argument("--shape", type=_shape, default=None, help="synthetic N x d (default 20000x512)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    b.add_argument("--spectrum", default="power1",
                   choices=("flat", "power1", "power2", "exp", "rank1", "rank8", "rank8+noise"))
    b.add_argument("--strategies", default=None, help="comma-separated names (see --list) or 'all' (default)")
    b.add_argument("--repeats", type=_positive_int, default=3)
    b.add_argument("--device", choices=("cpu", "cuda"), default=None)
    b.add_argument("--center", action="store_true", help="centre the columns first")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--timeout", type=_positive_float, default=None,
                   help="skip routes predicted to take longer than this many seconds")
    b.add_argument("--json", action="store_true", help="one JSON object with a 'rows' list")
    b.add_argument("--csv", default=None, metavar="FILE", help="also write the rows as CSV")
    b.add_argument("--plot", default=None, metavar="FILE.png", help="seconds vs RankMe error (needs matplotlib)")
    b.add_argument("--list", action="store_true", help="list every strategy and route, and exit")
    b.set_defaults(fn=_bench)
    i = sub.add_parser("info", help="show build configuration and backends (= show_config)")
    i.set_defaults(fn=_info)
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.cmd == "demo" and (args.rows < 1 or args.dim < 1):
            raise ValueError("--rows and --dim must be positive")
        if args.cmd == "bench" and args.path is not None and args.shape is not None:
            raise ValueError("give a PATH or --shape, not both")
        return args.fn(args)
    except BrokenPipeError:
        raise  # handled in main()
    except (ValueError, TypeError, OSError, RuntimeError) as exc:  # bad input, unreadable file, bad setup
        msg = " ".join(str(exc).split())  # one line
        print(f"rankme-fast: error: {msg}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        detail = " ".join(str(exc).split())
        print(f"rankme-fast: error: out of memory{': ' + detail if detail else ''} (exit code 1); for score, "
              "read fewer rows at a time (--chunk-rows) — its memory is O(d²) plus one chunk", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """After a closed output pipe (``rankme-fast ... | head``): point fd 1 at /dev/null so that the
    interpreter's final flush of what is still buffered does not print a second BrokenPipeError."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real stdout: nothing will be flushed there
        pass


def main(argv=None) -> int:
    """The ``rankme-fast`` console script; returns the exit code (see the module docstring). Every
    import of torch and the rest of the package happens inside, so Ctrl-C at any point — while
    parsing, importing or computing — exits 130 with one line, never a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        try:
            print("rankme-fast: interrupted", file=sys.stderr)
        except (OSError, KeyboardInterrupt):
            pass
        return 130
    except BrokenPipeError:  # e.g. `rankme-fast score ... | head`: the reader is gone, stop quietly
        _silence_stdout()
        return 1

if __name__ == "__main__":
    sys.exit(main())
