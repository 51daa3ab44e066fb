"""``rankme-fast`` command line.

``score PATH...``  metrics of embedding files (each PATH — a file, a shard directory or a quoted glob —
                   is one matrix; ``--each`` scores every file separately), streamed with O(d²) memory; a
                   table, or one JSON object per PATH per line with ``--json``; ``--plot``, ``--convergence``,
                   ``--keep-going``; under ``torchrun`` the reading is split across the ranks.
``compare PATH...`` one model per PATH: a ranked table, correlations with ``--labels``, ``--plot``.
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
    print(f"\npower-law spectrum, centred: collapse_auc={s.collapse_auc():.6f} alpha_req={s.alpha_req((5, min(100, d))):.4f} "
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


def _expand_each(paths):
    """``--each``: every file of every PATH (glob, directory or file) as its own source."""
    from rankme_fast.io import expand

    out = []
    for p in paths:
        out.extend(expand(p))
    return out


def _score(args) -> int:
    import json
    import warnings

    from rankme_fast.scoring import METRICS, parse_metrics, score

    names = parse_metrics(args.metrics)
    center = True if args.center else (False if args.no_center else None)
    progress = False if args.quiet else None
    if args.plot:
        _need_matplotlib("--plot")
        if len(args.paths) > 1 or args.each:
            raise ValueError("--plot draws one source's spectrum; give one PATH (or use `rankme-fast compare "
                             "... --plot` for several)")
    dist = _init_distributed()
    rank0 = dist is None or dist[0] == 0
    paths = _expand_each(args.paths) if args.each else list(args.paths)
    want = {m: (METRICS[m] if center is None else center) for m in names}
    heads = ["path", "rows", "d", "dtype"] + [m + ("(c)" if center is None and want[m] else "") for m in names]
    widths = [max(4, *(len(p) for p in paths)), 10, 6, 8] + [max(12, len(h)) for h in heads[4:]]
    header_done = False
    failures = []
    for path in paths:  # one row as soon as each PATH is done
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                res = score(path, names, center=center, eps=args.eps, key=args.key, chunk_rows=args.chunk_rows,
                            max_rows=args.max_rows, progress=progress if rank0 else False,
                            distributed=dist is not None, convergence=args.convergence, seed=args.seed)
        except (ValueError, TypeError, OSError) as exc:
            if not args.keep_going:
                raise
            failures.append((path, " ".join(str(exc).split())))
            if rank0:
                print(f"rankme-fast: error: {failures[-1][1]} (continuing: --keep-going)", file=sys.stderr, flush=True)
            continue
        if not rank0:
            continue
        for msg in dict.fromkeys(str(w.message) for w in caught):
            print(f"rankme-fast: warning: {msg}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps(res.as_dict()), flush=True)
        else:
            if not header_done:  # after the first source opened: an error in it comes before any table
                print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))
                      + "  " + "time".rjust(8), flush=True)
                header_done = True
            cells = [path, str(res.n_rows), str(res.n_features), res.dtype] + [_fmt(res.metrics[m]) for m in names]
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                  + "  " + f"{res.seconds:.2f}s".rjust(8), flush=True)
            if res.convergence:
                _print_convergence(res, names)
        if args.plot:
            res.plot(args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    if rank0 and not args.json and header_done and center is None and any(want.values()):
        print("(c) = centred spectrum, the metric's reference convention; --center / --no-center force one")
    if failures:
        if rank0:
            print(f"rankme-fast: {len(failures)} of {len(paths)} source(s) failed: "
                  + "; ".join(p for p, _ in failures), file=sys.stderr)
        return 2
    return 0


def _print_convergence(res, names) -> None:
    cols = list(dict.fromkeys(["rankme", *names]))
    print("    convergence (nested seeded random subsets): " + ", ".join(
        f"N/{int(round(1 / c['fraction']))}={c['n_rows']}: "
        + " ".join(f"{m} {_fmt(c['metrics'][m])}" for m in cols if m in c["metrics"]) if c["fraction"] < 1
        else f"N={c['n_rows']}: " + " ".join(f"{m} {_fmt(c['metrics'][m])}" for m in cols if m in c["metrics"])
        for c in res.convergence), flush=True)


def _need_matplotlib(flag: str) -> None:
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError(f"{flag} needs matplotlib: pip install 'rankme_fast[plot]'")


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1): the initialised process group's (rank, world), else None (the group
    is destroyed when the process exits)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    import atexit  # noqa: PLC0415

    from rankme_fast.dist_score import init_from_env, shutdown  # noqa: PLC0415

    got = init_from_env()
    atexit.register(shutdown)
    return got


def _compare(args) -> int:
    import warnings

    import rankme_fast as rf
    from rankme_fast.compare import read_labels

    if args.plot:
        _need_matplotlib("--plot")
    names = None if args.names is None else [v.strip() for v in args.names.split(",")]
    if names is None:
        from rankme_fast.compare import default_names  # noqa: PLC0415
        names = default_names(args.paths)
    labels = None
    if args.labels:
        labels = read_labels(args.labels, args.label_column)
    dist = _init_distributed()
    rank0 = dist is None or dist[0] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        res = rf.compare(list(args.paths), names=names, metrics=args.metrics, labels=labels,
                         higher_is_better=not args.lower_is_better, max_rows=args.max_rows, seed=args.seed,
                         center=True if args.center else (False if args.no_center else None),
                         bootstrap=args.bootstrap, key=args.key, progress=False if args.quiet or not rank0 else None,
                         distributed=dist is not None, convergence=args.convergence)
    if not rank0:
        return 0
    for msg in dict.fromkeys(str(w.message) for w in caught):
        print(f"rankme-fast: warning: {msg}", file=sys.stderr, flush=True)
    if args.json:
        print(res.to_json(), flush=True)
    else:
        print(res.table_str(), flush=True)
    if args.csv:
        res.to_csv(args.csv)
    if args.plot:
        res.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
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
        if "required: COMMAND" in message or "required: cmd" in message:
            message = "give a command: score, compare, bench, info or demo (e.g. rankme-fast score emb.npy)"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _main(argv) -> int:
    p = _Parser(prog="rankme-fast", description="Exact RankMe and spectral metrics of embeddings")
    from rankme_fast import __version__  # noqa: PLC0415

    p.add_argument("--version", action="version", version=f"rankme-fast {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND",
                           title="commands (rankme-fast COMMAND --help for each)")
    sc = sub.add_parser("score", help="metrics of embedding files (.npy, .safetensors, .pt, .h5, .zarr, shard dirs)",
                        description="Stream each PATH through a float64 Gram accumulator and print its metrics. "
                                    "Each PATH is ONE matrix: a file, a directory of shards or a QUOTED glob "
                                    "('shards/*.npy') concatenates all its files' rows; several PATHs (or an "
                                    "unquoted glob the shell expands) are scored separately, one row each. "
                                    "--each scores every file of a glob or directory separately. To rank "
                                    "checkpoints use `rankme-fast compare`. Under torchrun the reading is "
                                    "split across the ranks (rank 0 prints).")
    sc.add_argument("paths", nargs="+", metavar="PATH")
    sc.add_argument("--each", action="store_true", help="score every file of each glob / directory separately")
    sc.add_argument("--keep-going", action="store_true",
                    help="after a bad file, score the rest; exit 2 at the end listing the failures")
    sc.add_argument("--plot", default=None, metavar="FILE.png",
                    help="log-log spectrum with the alpha-ReQ fit, RankMe and effective rank (one PATH; needs matplotlib)")
    sc.add_argument("--convergence", action="store_true",
                    help="also the metrics at ~N/8, N/4, N/2 rows (nested seeded subsets); warn when the last "
                         "doubling moves RankMe by more than 1%%")
    sc.add_argument("--seed", type=int, default=0, help="seed of the --convergence subsets (default 0)")
    sc.add_argument("--metrics", default="rankme",
                    help="comma-separated: rankme, effective_rank, stable_rank, collapse_auc, alpha_req, "
                         "participation_ratio, nesum, or 'all' (default: rankme; any case, dashes or underscores)")
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
    c = sub.add_parser("compare", help="rank models / checkpoints by a metric; correlate it with labels",
                       description="Score each PATH (one model or checkpoint: a file, a shard directory or a "
                                   "quoted glob) the same way, print a ranked table and, with --labels, how "
                                   "well each metric predicts them (Spearman, Kendall tau-b, weighted tau as "
                                   "scipy computes them, top-1 regret).")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--names", default=None, help="comma-separated model names (default: the PATHs' basenames, "
                                                 "or the shortest distinct path suffixes)")
    c.add_argument("--labels", default=None, metavar="FILE.csv|FILE.json",
                   help="downstream result per model name (CSV with a header, or JSON name -> value)")
    c.add_argument("--label-column", default=None, help="the label's column/field when the file has several")
    c.add_argument("--lower-is-better", action="store_true", help="the labels are errors or losses")
    c.add_argument("--metrics", default="rankme", help="as for score; the first one ranks the table")
    c.add_argument("--max-rows", type=_positive_int, default=None,
                   help="score every model on the same seeded random subset of N rows")
    c.add_argument("--seed", type=int, default=0, help="seed of the row subset / bootstrap (default 0)")
    c.add_argument("--bootstrap", type=int, default=0, metavar="B",
                   help="B row-bootstrap replicates: a 95%% interval for every metric value")
    cc = c.add_mutually_exclusive_group()
    cc.add_argument("--center", action="store_true", help="centre the embeddings for every metric")
    cc.add_argument("--no-center", action="store_true", help="no centring for any metric")
    c.add_argument("--convergence", action="store_true", help="warn when a model's RankMe has not converged in N")
    c.add_argument("--key", default=None, help="tensor/dataset name inside multi-tensor files")
    c.add_argument("--json", action="store_true", help="one JSON object")
    c.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    c.add_argument("--plot", default=None, metavar="FILE.png",
                   help="spectra of all models and metric vs label (needs matplotlib)")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    c.set_defaults(fn=_compare)
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
