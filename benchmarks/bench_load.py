"""rf.rankme and friends quiet / with one core busy / with every core busy (issue 14, item 0).

    python benchmarks/bench_load.py --rounds 3 --json benchmarks/results_load/<date>.json

The busy cores are the script's own spinners (``python -c "while True: pass"``, one per busy core),
started before and killed after each condition. Every round runs all three conditions, in a rotated
order, so a drift in the machine's own load (a shared machine) hits every condition alike; each route
is timed ``--reps`` times (median; a route stops early once it has used ``--budget`` seconds) and the
load average and the runnable-task count are recorded as each condition starts. The ratio reported is
busy median / quiet median *of the same round*. Routes (X: 20000×512 float32, power-law columns):

  rankme          rf.rankme(X)                                     the issue's case
  rankme[torch]   the same with RANKME_FAST_LINALG_THREADS=torch   torch's own LAPACK threads (the old route)
  accumulator     GramAccumulator(512), 5 updates of 4000 rows, .rankme()
  randomized      rf.spectrum(X, method="randomized", k=32)
  lanczos         rf.spectrum(X, method="lanczos", k=32)
  slq             rf.spectrum(X, method="slq", probes=8, steps=20, deflate_steps=10, deflate=64)
  batched         rf.rankme(Xb), Xb: (16, 512, 256) float32        LLM-style (B, N, d)
  eigvalsh[T]     torch.linalg.eigvalsh of a 512×512 float64 Gram, T = torch's threads / 1 thread
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rankme_fast as rf  # noqa: E402
from rankme_fast import _threads  # noqa: E402
from rankme_fast._config import cpu_model  # noqa: E402
from native_guard import require_native  # noqa: E402

CONDITIONS = ("quiet", "one_busy", "all_busy")


def make_inputs(n: int, d: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.arange(1, d + 1, dtype=torch.float32) ** -0.7
    xb = torch.randn(16, 512, 256, generator=g)
    v = x[:4 * d].double()
    gram = v.T @ v
    return x, xb, gram


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def routes(x, xb, gram):
    d = x.shape[1]

    def acc():
        a = rf.GramAccumulator(d)
        for i in range(0, x.shape[0], 4000):
            a.update(x[i : i + 4000])
        return a.rankme()

    def torch_threads():
        with env(_threads.ENV, "torch"):
            return rf.rankme(x)

    def eig1():
        with one_thread():
            return torch.linalg.eigvalsh(gram)

    return {
        "rankme": lambda: rf.rankme(x),
        "rankme[torch]": torch_threads,
        "accumulator": acc,
        "randomized": lambda: rf.spectrum(x, method="randomized", k=32),
        "lanczos": lambda: rf.spectrum(x, method="lanczos", k=32),
        # small settings: the defaults (~300 passes here) take ~50 s a call; the route is what is measured
        "slq": lambda: rf.spectrum(x, method="slq", probes=8, steps=20, deflate_steps=10, deflate=64),
        "batched": lambda: rf.rankme(xb),
        f"eigvalsh[{torch.get_num_threads()}]": lambda: torch.linalg.eigvalsh(gram),
        "eigvalsh[1]": eig1,
    }


def time_route(fn, reps: int, budget: float):
    ts = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget and len(ts) >= 1:
            break
    return ts


def spinners(k: int):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def stop(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def steal_seconds():
    """CPU time the hypervisor ran something else on this VM's CPUs (``/proc/stat`` steal, all CPUs), or
    None where not reported: a busy neighbour on the host slows every condition alike but is no load of ours."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_condition(cond: str, rts: dict, reps: int, budget: float, cpus: int):
    k = {"quiet": 0, "one_busy": 1, "all_busy": cpus}[cond]
    procs = spinners(k)
    try:
        time.sleep(0.5 if k else 0.0)  # let the spinners get scheduled
        rec = {"loadavg": os.getloadavg(), "other_runnable": _threads.other_runnable(), "spinners": k,
               "times_s": {}}
        rec["steal_s"] = {}
        for name, fn in rts.items():
            st0 = steal_seconds()
            rec["times_s"][name] = time_route(fn, reps, budget)
            if st0 is not None:  # the hypervisor's time taken from this VM's CPUs, all CPUs together
                rec["steal_s"][name] = round(steal_seconds() - st0, 4)
    finally:
        stop(procs)
    return rec


def summarize(rounds, names):
    out = {}
    for name in names:
        per = {}
        for cond in CONDITIONS:
            meds = [statistics.median(r[cond]["times_s"][name]) for r in rounds]
            ratios = [statistics.median(r[cond]["times_s"][name]) / statistics.median(r["quiet"]["times_s"][name])
                      for r in rounds]
            best_quiet = min(statistics.median(r["quiet"]["times_s"][name]) for r in rounds)
            # on a shared machine a round's "quiet" can itself be loaded: the best quiet median is the
            # steadier reference, and the worst busy median the number that matters to a user
            per[cond] = {"median_s": meds, "ratio_to_quiet": ratios, "max_ratio": max(ratios),
                         "max_ratio_to_best_quiet": max(meds) / best_quiet, "worst_median_s": max(meds)}
        out[name] = per
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per route per condition before stopping")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--only", default="", help="comma-separated route names")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    x, xb, gram = make_inputs(a.n, a.d)
    rts = routes(x, xb, gram)
    if a.only:
        keep = set(a.only.split(","))
        rts = {k: v for k, v in rts.items() if k in keep}
    for fn in rts.values():  # warm-up: extension load, first-touch, thread pools
        fn()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpus": cpus, "torch": torch.__version__, "rankme_fast": rf.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "blas": [ln.strip() for ln in torch.__config__.parallel_info().splitlines()
                 if "MKL" in ln or "OpenMP" in ln or "backend" in ln],
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "GOMP_SPINCOUNT", _threads.ENV)},
        "shape": [a.n, a.d], "batched_shape": list(xb.shape), "reps": a.reps, "budget_s": a.budget,
    }
    print(f"{info['cpu']}, {cpus} cpus, torch {info['torch']} ({torch.get_num_threads()} threads), {info['date']}",
          flush=True)
    rounds = []
    t_all = time.perf_counter()
    for r in range(a.rounds):
        order = CONDITIONS[r % 3:] + CONDITIONS[: r % 3]
        rec = {}
        for cond in order:
            rec[cond] = run_condition(cond, rts, a.reps, a.budget, cpus)
            la = rec[cond]["loadavg"][0]
            print(f"round {r} {cond:9s} load1 {la:5.2f} runnable {rec[cond]['other_runnable']}: " +
                  "  ".join(f"{k} {statistics.median(v) * 1e3:.0f}ms" for k, v in rec[cond]["times_s"].items()),
                  flush=True)
        rounds.append(rec)
    summ = summarize(rounds, list(rts))
    print(f"\nbusy/quiet ratio per round (same-round quiet median), {time.perf_counter() - t_all:.0f} s total")
    print(f"{'route':16s} {'quiet ms':>22s} {'one busy':>20s} {'all busy':>20s}   worst ms (quiet/one/all)"
          "  worst/best-quiet (one/all)")
    for name, per in summ.items():
        q = " ".join(f"{m * 1e3:6.0f}" for m in per["quiet"]["median_s"])
        o = " ".join(f"{x:5.2f}" for x in per["one_busy"]["ratio_to_quiet"])
        b = " ".join(f"{x:5.2f}" for x in per["all_busy"]["ratio_to_quiet"])
        w = "/".join(f"{per[c]['worst_median_s'] * 1e3:.0f}" for c in CONDITIONS)
        wb = "/".join(f"{per[c]['max_ratio_to_best_quiet']:.2f}" for c in ("one_busy", "all_busy"))
        print(f"{name:16s} {q:>22s} {o:>20s} {b:>20s}   {w:>22s}  {wb}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"info": info, "rounds": rounds, "summary": summ}, f, indent=1)
        print("wrote", a.json)


if __name__ == "__main__":
    require_native(__file__)
    main()
