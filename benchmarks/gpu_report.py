"""Turn a GPU check's results (``results.json``) into Markdown, a dispatch table, JUnit XML, a summary.

Pure functions of the results dictionary, no torch and no GPU: the CI tests run them on a recorded
sample (``tests/data/gpu_results_sample.json``). The dictionary has ``machine``, ``phases`` (one entry per
phase of gpu_check.sh) and ``tests`` / ``probe`` / ``bench`` (each ``{"records": [...]}``, one record per
test or task id with a ``status``), as written by ``gpu_check.py report``.
"""
from __future__ import annotations

import json
import math
from xml.sax.saxutils import escape, quoteattr

# Targets of issue 11 on the H200
TARGETS = {"exact_vs_torch_fp64": 3.0, "exact_vs_svdvals": 20.0, "fast_vs_xtx": 1.3, "e2e_ms": 150.0,
           "int8_pct": 65.0, "eig_ms": 35.0}
EXACT_ROUTE = {"triton": {"float64": "triton-fp64", "*": "triton-int8"}, "cuda": {"*": "cuda-exact"},
               "torch": {"*": "torch-fp64-chunks"}}
FAST_ROUTE = {"triton": {"*": "triton-fast"}, "cuda": {"*": "cuda-fast"}}
DT_LONG = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def records(res: dict, section: str) -> list:
    return list((res.get(section) or {}).get("records") or [])


def by_id(res: dict, section: str) -> dict:
    return {r["id"]: r for r in records(res, section)}


def counts(recs: list) -> dict:
    out: dict = {}
    for r in recs:
        out[r.get("status", "?")] = out.get(r.get("status", "?"), 0) + 1
    return out


def _ms(s) -> str:
    return "—" if s is None else (f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}")


def _g(v, fmt="{:.3g}") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _why(r: dict) -> str:
    msg = r.get("reason") or r.get("error") or (r.get("message") or "").strip().splitlines()[-1:] or [""]
    msg = msg[0] if isinstance(msg, list) else msg
    return msg.replace("|", "/").replace("\n", " ")[:120]


def peaks(res: dict) -> dict:
    """Measured dense peaks (TFLOP/s or TOPS) by name."""
    return {r["id"].split("/")[1]: r["tflops"] for r in records(res, "bench")
            if r["id"].startswith("peak/") and r.get("status") == "ok"}


def _gmean(vals: list) -> float:
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def gram_rows(res: dict) -> dict:
    """{(n, d, dtype): {route: record}} of the Gram benchmark."""
    out: dict = {}
    for r in records(res, "bench"):
        p = r["id"].split("/")
        if p[0] == "gram":
            n, d = map(int, p[1].split("x"))
            out.setdefault((n, d, p[2]), {})[p[3]] = r
        elif p[0] == "svd":
            n, d = map(int, p[1].split("x"))
            out.setdefault((n, d, p[2]), {})["svdvals"] = r
    return out


def dispatch_from_results(res: dict, table: dict) -> dict:
    """A new ``dispatch.json`` from the measured Gram times: per precision and input dtype, the backends
    ordered by the geometric mean (over the measured shapes) of the route each one really runs in that
    precision; ``torch`` stays in the list (it never fails), and backends without a successful run at
    every measured shape go after the measured ones, in their old order. Dtypes not measured keep their
    old order and are named in ``unmeasured``."""
    new = json.loads(json.dumps(table))
    rows = gram_rows(res)
    measured_keys, unmeasured = [], []
    for prec, routes in (("exact", EXACT_ROUTE), ("fast", FAST_ROUTE)):
        for dt_long, old in table["order"][prec].items():
            cand = {}
            for be in old:
                rmap = routes.get(be)
                if rmap is None:  # torch in fast mode: its float64 chunks are the exact route
                    rmap = EXACT_ROUTE["torch"] if be == "torch" else None
                if rmap is not None:
                    cand[be] = rmap.get(dt_long, rmap["*"])

            def ok(k, route):
                rec = rows[k].get(route, {})
                return rec.get("status") == "ok" and bool(rec.get("median_s"))
            # the shapes at which this dtype was measured at all; a backend must have run at every one
            shapes = [k for k in rows if DT_LONG.get(k[2]) == dt_long and any(ok(k, r) for r in cand.values())]
            score = {be: _gmean([rows[k][route]["median_s"] for k in shapes]) for be, route in cand.items()
                     if shapes and all(ok(k, route) for k in shapes)}
            if not score or set(score) == {"torch"}:
                unmeasured.append(f"{prec}/{dt_long}")
                continue
            ranked = sorted(score, key=score.get)
            new["order"][prec][dt_long] = ranked + [b for b in old if b not in ranked]
            measured_keys.append(f"{prec}/{dt_long}")
    new["measured"] = bool(measured_keys)
    m = res.get("machine", {})
    new["source"] = (f"benchmarks/gpu_check.sh on {m.get('gpu', '?')}, {m.get('date', '?')}: backends ordered by the "
                     f"measured median time of the route each runs (geometric mean over "
                     f"{sorted({f'{n}x{d}' for n, d, _ in rows})})")
    new["measured_keys"] = measured_keys
    new["unmeasured"] = unmeasured
    return new


def targets(res: dict) -> list:
    """(target, value, goal, met, note) for every target of issue 11 that the results can speak to."""
    rows = gram_rows(res)
    pk = peaks(res)
    out = []
    for (n, d, dt), r in sorted(rows.items()):
        def t(route):
            rec = r.get(route, {})
            return rec.get("median_s") if rec.get("status") == "ok" else None
        ex = t("triton-fp64" if dt == "fp64" else "triton-int8")
        tag = f"{n}x{d} {dt}"
        for base, goal_key, label in (("torch-f64-gram", "exact_vs_torch_fp64", "exact Gram vs x.double().T@x.double()"),
                                      ("svdvals", "exact_vs_svdvals", "exact Gram vs svdvals")):
            b = t(base)
            if ex and b:
                out.append((f"{label}, {tag}", b / ex, TARGETS[goal_key], b / ex >= TARGETS[goal_key], "×"))
        fast, xtx = t("triton-fast"), t("torch-gram")
        if fast and xtx:
            out.append((f"fast Gram vs x.T@x, {tag}", xtx / fast, TARGETS["fast_vs_xtx"], xtx / fast >= TARGETS["fast_vs_xtx"], "×"))
        i8 = r.get("triton-int8", {})
        if i8.get("status") == "ok" and pk.get("int8") and i8.get("executed_ops"):
            pct = 100 * i8["executed_ops"] / i8["median_s"] / 1e12 / pk["int8"]
            out.append((f"int8 Gram % of int8 peak, {tag}", pct, TARGETS["int8_pct"], pct >= TARGETS["int8_pct"], "%"))
        e2e = t("e2e-exact")
        if e2e and (n, d, dt) == (1_000_000, 4096, "bf16"):
            ms = e2e * 1e3
            out.append((f"end-to-end exact RankMe, {tag}", ms, TARGETS["e2e_ms"], ms <= TARGETS["e2e_ms"], "ms"))
    eig = by_id(res, "bench").get("eig/4096/gpu", {})
    if eig.get("status") == "ok":
        ms = eig["median_s"] * 1e3
        out.append(("float64 eigensolve d=4096 on GPU", ms, TARGETS["eig_ms"], ms <= TARGETS["eig_ms"], "ms"))
    return out


def to_markdown(res: dict) -> str:
    m = res.get("machine", {})
    L = ["# GPU check", "",
         f"{m.get('gpu', 'no GPU')} · driver {m.get('driver', '?')} · CUDA {m.get('cuda', '?')} · torch {m.get('torch', '?')} · "
         f"Triton {m.get('triton', '?')} · CuPy {m.get('cupy', '?')} · JAX {m.get('jax', '?')} · Python {m.get('python', '?')} · "
         f"{m.get('cpu', '?')} · {m.get('date', '?')}", ""]
    if m.get("dry_run"):
        L += ["**Dry run: nothing ran on a GPU; every number below is absent by design.**", ""]
    L += ["## Phases", "", "| phase | status | seconds | note |", "|---|---|---|---|"]
    for ph in res.get("phases", []):
        L.append(f"| {ph['phase']} | {ph['status']} | {_g(ph.get('seconds'), '{:.0f}')} | {ph.get('reason', '')} |")
    t = records(res, "tests")
    if t:
        c = counts(t)
        L += ["", "## Tests", "", " · ".join(f"{k}: {v}" for k, v in sorted(c.items())), ""]
        bad = [r for r in t if r["status"] in ("failed", "error", "timeout", "crashed")]
        if bad:
            L += ["| test | status | reason |", "|---|---|---|"]
            L += [f"| `{r['id']}` | {r['status']} | {(r.get('reason') or r.get('message') or '').splitlines()[-1:][0][:150] if (r.get('reason') or r.get('message')) else ''} |"
                  for r in bad]
    pr = records(res, "probe")
    if pr:
        shp = next((f"{r['n']}×{r['d']}" for r in pr if "n" in r), "")
        L += ["", f"## Kernel probe (one launch each at {shp})", "",
              "| probe | status | max err / max G_ii | kernels (regs / spills / shared B / warps / stages; PTX) |", "|---|---|---|---|"]
        for r in pr:
            ks = "; ".join(
                f"{k.get('kernel')}: {k.get('n_regs')}/{k.get('n_spills')}/{k.get('shared')}/{k.get('num_warps')}/{k.get('num_stages')}"
                + "".join(f" {f}" for f in ("wgmma", "s8", "mma_f64", "fma_f64", "div_full_f32") if k.get(f))
                for k in r.get("kernels", []))
            err = r.get("max_rel_err_vs_fp64", r.get("max_rel_err_k16"))
            L.append(f"| {r['id']} | {r['status']} {_why(r)} | {_g(err)} | {ks} |")
    pk = peaks(res)
    if pk:
        L += ["", "## Dense peaks measured in this run (square matmuls, TFLOP/s; int8: TOPS)", "", "| " + " | ".join(pk) + " |",
              "|" + "---|" * len(pk), "| " + " | ".join(f"{v:.0f}" for v in pk.values()) + " |"]
    rows = gram_rows(res)
    for (n, d, dt), r in sorted(rows.items()):
        L += ["", f"## Gram {n:,}×{d:,} {dt}", "",
              "| route | median ms | useful TFLOP/s | executed % of peak | max err / max G_ii | vs x.double() Gram | vs x.T@x | note |",
              "|---|---|---|---|---|---|---|---|"]
        f64 = r.get("torch-f64-gram", {}).get("median_s") if r.get("torch-f64-gram", {}).get("status") == "ok" else None
        xtx = r.get("torch-gram", {}).get("median_s") if r.get("torch-gram", {}).get("status") == "ok" else None
        for route, rec in r.items():
            if route == "reference":
                continue
            med = rec.get("median_s") if rec.get("status") == "ok" else None
            pct = None
            if med and rec.get("executed_ops") and pk.get(rec.get("peak")):
                pct = 100 * rec["executed_ops"] / med / 1e12 / pk[rec["peak"]]
            note = _why(rec) if rec.get("status") != "ok" else (
                f"{rec.get('backend', '')} RankMe {_g(rec.get('rankme'), '{:.6g}')}, err {_g(rec.get('rankme_rel_err_vs_reference'))}"
                if route.startswith("e2e") else (f"{rec.get('reps')} reps" if rec.get("reps", 5) < 5 else ""))
            L.append(f"| {route} | {_ms(med)} | {_g(n * d * d / med / 1e12 if med else None, '{:.1f}')} | "
                     f"{_g(pct, '{:.0f}%')}{' of ' + rec['peak'] if pct else ''} | {_g(rec.get('max_rel_err_vs_fp64'))} | "
                     f"{_g(f64 / med if med and f64 else None, '{:.2f}×')} | {_g(xtx / med if med and xtx else None, '{:.2f}×')} | "
                     f"{rec.get('status') if rec.get('status') != 'ok' else ''} {note} |")
    b = by_id(res, "bench")
    eig = [r for i, r in b.items() if i.startswith("eig/")]
    if eig:
        L += ["", "## float64 eigensolve", "", "| d | where | median ms | note |", "|---|---|---|---|"]
        for r in eig:
            _, d, where = r["id"].split("/")
            L.append(f"| {d} | {where} | {_ms(r.get('median_s') if r.get('status') == 'ok' else None)} | "
                     f"{_why(r) if r.get('status') != 'ok' else ('threads ' + str(r['threads']) if 'threads' in r else 'vs CPU ' + _g(r.get('max_rel_diff_vs_cpu')))} |")
    acc = [r for i, r in b.items() if i.startswith("acc/")]
    if acc:
        shp = next((f"{r['n']:,}×{r['d']:,}" for r in acc if "n" in r), "")
        L += ["", f"## Accuracy on collapsed input, {shp} (DESIGN §3: RankMe ≤ 1e-4, σ ≤ 1e-6·σ₁, vs the float64 SVD)", "",
              "| input | centring | route | RankMe rel err | max σ err / σ₁ | contract |", "|---|---|---|---|---|---|"]
        for r in acc:
            if r.get("status") != "ok":
                L.append(f"| {r['id']} | | | {r['status']} {_why(r)} | | |")
                continue
            for cname, case in r["cases"].items():
                for route, row in case["routes"].items():
                    if "skipped" in row:
                        continue
                    c = row.get("contract")
                    L.append(f"| {r['kind']} {r['dtype']} | {cname} | {route} | {_g(row['rankme_rel_err'])} | "
                             f"{_g(row['sigma_err_over_s1'])} | {'—' if c is None else ('met' if c else '**missed**')} |")
    nm = [r for i, r in b.items() if i.startswith("normal/")]
    if nm:
        shp = nm[0]["id"].split("/")[1].replace("x", "×")
        L += ["", f"## Normal operator Xᵀ(XW), k = 16, and SLQ ({shp} bf16)", "",
              "| route | median ms | note |", "|---|---|---|"]
        for r in nm:
            route = r["id"].split("/")[-1]
            med = r.get("median_s") if r.get("status") == "ok" else None
            note = _why(r) if r.get("status") != "ok" else ""
            if route == "slq":
                note = f"RankMe {_g(r.get('rankme'), '{:.6g}')}, interval {r.get('interval')}"
            elif route == "exact":
                note = (f"RankMe {_g(r.get('rankme'), '{:.6g}')}; SLQ {_g(r.get('slq_speedup'), '{:.2f}')}× faster, "
                        f"err {_g(r.get('slq_rel_err'))}, interval contains: {r.get('slq_interval_contains')}")
            elif "max_rel_err_vs_fp64" in r:
                note = f"err {_g(r['max_rel_err_vs_fp64'])}"
            L.append(f"| {route} | {_ms(med)} | {note} |")
    dl = [r for i, r in b.items() if i.startswith("dlpack/")]
    if dl:
        L += ["", "## DLPack", "", "| library | dtype | zero-copy | RankMe vs torch copy |", "|---|---|---|---|"]
        for r in dl:
            if r.get("status") != "ok":
                L.append(f"| {r['id'].split('/')[1]} | | {r['status']}: {_why(r)} | |")
                continue
            for dt, c in r["cases"].items():
                L.append(f"| {r['lib']} | {dt} | {c['zero_copy']} | {_g(c['rankme_rel_diff_vs_torch_copy'])} |")
    race = [r for i, r in b.items() if i.startswith("race/") and r.get("status") == "ok"]
    for r in race:
        rows = r["bench"]["rows"]
        L += ["", f"## rankme-fast bench on the GPU: {r['n']:,}×{r['d']:,} float32 {r['spectrum']} "
                  f"(reference: {r['bench']['reference']})", "",
              "| route | exact | median s | peak extra MiB | RankMe rel. err | status |", "|---|---|---|---|---|---|"]
        for row in rows:
            mib = None if row.get("peak_mem_bytes") is None else row["peak_mem_bytes"] / 2**20
            L.append(f"| {row['name']} | {'yes' if row['exact'] else 'no'} | {_g(row.get('median_s'), '{:.4g}')} | "
                     f"{_g(mib, '{:.0f}')} | {_g(row.get('rankme_rel_err'), '{:.1e}')} | {row['status'].replace('|', '/')} |")
    tg = targets(res)
    if tg:
        L += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for name, val, goal, met, unit in tg:
            by = "" if met else (f" (missed by {val / goal:.2f}×)" if unit in ("ms",) else f" (missed: {val / goal:.2f} of goal)")
            L.append(f"| {name} | {val:.3g}{unit if unit != '×' else '×'} | {'≤' if unit == 'ms' else '≥'} {goal:g}{unit} | {'yes' if met else 'no' + by} |")
    return "\n".join(L) + "\n"


def to_junit(recs: list, suite: str = "rankme_fast-gpu") -> str:
    """JUnit XML of the supervised test records (written from the records, so tests of a killed pytest
    process are in it too)."""
    c = counts(recs)
    fails = c.get("failed", 0) + c.get("timeout", 0) + c.get("crashed", 0)
    errs = c.get("error", 0)
    skips = c.get("skipped", 0) + c.get("not run", 0)
    out = ['<?xml version="1.0" encoding="utf-8"?>',
           f'<testsuites><testsuite name={quoteattr(suite)} tests="{len(recs)}" failures="{fails}" errors="{errs}" '
           f'skipped="{skips}">']
    for r in recs:
        nodeid = r["id"]
        path, _, name = nodeid.partition("::")
        attrs = f'classname={quoteattr(path.replace("/", ".").removesuffix(".py"))} name={quoteattr(name or nodeid)} time="{r.get("seconds", 0) or 0}"'
        msg = r.get("reason") or r.get("message") or ""
        st = r.get("status")
        if st == "passed":
            out.append(f"<testcase {attrs}/>")
        elif st in ("skipped", "not run"):
            out.append(f"<testcase {attrs}><skipped message={quoteattr(msg[:500])}/></testcase>")
        elif st == "error":
            out.append(f"<testcase {attrs}><error message={quoteattr(msg[:200])}>{escape(msg)}</error></testcase>")
        else:
            out.append(f"<testcase {attrs}><failure message={quoteattr((st + ': ' + msg)[:200])}>{escape(msg + chr(10) + r.get('log_tail', ''))}</failure></testcase>")
    out.append("</testsuite></testsuites>")
    return "\n".join(out) + "\n"


def summary(res: dict) -> str:
    """Plain-text end-of-run summary: each phase, then what passed, failed or was skipped."""
    L = ["== GPU check summary =="]
    for ph in res.get("phases", []):
        L.append(f"phase {ph['phase']:<7} {ph['status']:<8} {ph.get('seconds', 0):>6.0f} s  {ph.get('reason', '')}")
    for sec in ("tests", "probe", "bench"):
        recs = records(res, sec)
        if not recs:
            continue
        c = counts(recs)
        L.append(f"{sec}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
        bad = [r for r in recs if r.get("status") in ("failed", "error", "timeout", "crashed")]
        for r in bad[:40]:
            L.append(f"  {r['status']:>8}: {r['id']}  {_why(r)}")
        if len(bad) > 40:
            L.append(f"  ... and {len(bad) - 40} more (results.json)")
        for st in ("skipped", "not run"):
            reasons = counts([{"status": _why(r)[:80]} for r in recs if r.get("status") == st])
            for why, k in sorted(reasons.items(), key=lambda kv: -kv[1])[:6]:
                L.append(f"   {st} ×{k}: {why}")
    for name, val, goal, met, unit in targets(res):
        L.append(f"target {'MET ' if met else 'MISS'} {name}: {val:.3g}{unit} (goal {goal:g}{unit})")
    return "\n".join(L) + "\n"
