"""Python side of ``benchmarks/gpu_check.sh`` (issue 11): environment, build check, supervised GPU tests,
report. The probe and bench phases live in ``gpu_bench.py``; conversions in ``gpu_report.py``.

    python benchmarks/gpu_check.py env          --out DIR [--dry-run]
    python benchmarks/gpu_check.py verify-build --out DIR
    python benchmarks/gpu_check.py tests        --out DIR [--budget S] [--shards K] [--timeout S] [-k EXPR] [--dry-run]
    python benchmarks/gpu_check.py report       --out DIR [--write-dispatch]

Run from anywhere: the tests run in the repository root against the *installed* package.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_report  # noqa: E402
from gpu_supervise import Group, run_groups  # noqa: E402

GPU_TEST_FILES = ("tests/test_gpu_kernels.py", "tests/test_triton_normal.py")
OTHER_GPU_K = "cuda or gpu"  # tests elsewhere that need or name a GPU backend
# pytest without the working directory on sys.path (``python -m`` would put the repository root there,
# and its source-tree rankme_fast, without the built modules, would shadow the installed package)
PYTEST = [sys.executable, "-c", "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
          "import pytest; sys.exit(pytest.console_main())"]


def _version(mod: str):
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        return f"not importable ({type(exc).__name__})"


def _cmd(argv: list, timeout: float = 30) -> str:
    if not shutil.which(argv[0]):
        return f"{argv[0]} not found"
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"


def cpu_model() -> str:
    from rankme_fast._config import cpu_model as model  # noqa: PLC0415
    return f"{model()} ({os.cpu_count()} threads)"


def env_info(dry_run: bool) -> dict:
    import torch  # noqa: PLC0415
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": _version("triton"), "cupy": "not imported (the dlpack task reports it)",
            "jax": "not imported (the dlpack task reports it)", "cpu": cpu_model(), "dry_run": dry_run,
            "nvcc": _cmd(["nvcc", "--version"]).splitlines()[-1:] or ["?"]}
    info["nvcc"] = info["nvcc"][0] if info["nvcc"] else "?"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), sm=f"{p.major}{p.minor}", sms=p.multi_processor_count,
                    gpu_mem_gib=round(p.total_memory / 2**30, 1))
        info["driver"] = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[0:1]
        info["driver"] = info["driver"][0] if info["driver"] else "?"
        info["nvidia_smi"] = _cmd(["nvidia-smi", "--query-gpu=name,clocks.max.sm,power.limit,memory.total",
                                   "--format=csv,noheader"])
    else:
        info.update(gpu="none visible to torch", driver="—")
    return info


def verify_build() -> dict:
    """What the installed package loads: both native modules, and whether each GPU backend can run."""
    import torch  # noqa: PLC0415
    import rankme_fast  # noqa: PLC0415
    from rankme_fast import backends  # noqa: PLC0415
    out = {"package": rankme_fast.__file__}
    for mod in ("_C", "_C_cuda", "_build_info"):
        try:
            m = __import__(f"rankme_fast.{mod}", fromlist=["x"])
            out[mod] = getattr(m, "__file__", "loaded")
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"MISSING: {type(exc).__name__}: {exc}"
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out["backends"] = backends.describe(dev)
    return out


def collect(selection: list, k: str = "") -> list:
    argv = [*PYTEST, "--collect-only", "-q", "-p", "no:cacheprovider", *selection]
    if k:
        argv += ["-k", k]
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": _pythonpath()})
    ids = [ln.strip() for ln in res.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
    if res.returncode not in (0, 5) and not ids:
        raise RuntimeError(f"test collection failed (rc={res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return ids


def _pythonpath() -> str:
    # benchmarks/ for the plugin; the package itself comes from site-packages (the installed build)
    return os.pathsep.join([str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


def gpu_test_ids(k: str = "") -> list:
    ids = collect(list(GPU_TEST_FILES), k)
    others = collect(["tests"], f"({OTHER_GPU_K})" + (f" and ({k})" if k else ""))
    seen = set(ids)
    return ids + [i for i in others if i not in seen]


def run_tests(out: Path, budget: float, shards: int, per_test: float, k: str, dry_run: bool, log=print) -> dict:
    t0 = time.monotonic()
    ids = gpu_test_ids(k)
    res = {"phase": "tests", "collected": len(ids)}
    if dry_run:
        res.update(records=[{"id": i, "status": "not run", "reason": "dry run: no GPU"} for i in ids],
                   seconds=round(time.monotonic() - t0, 1))
        (out / "tests.json").write_text(json.dumps(res, indent=1))
        return res
    # round-robin shards: each file's tests spread over the shards, so Triton compiles run in parallel
    parts = [ids[s::shards] for s in range(max(1, shards))]
    xml_dir = out / "tests_work"

    def make_cmd(shard_no):
        def cmd(todo, progress):
            xml = xml_dir / f"pytest-shard{shard_no}-{int(time.time() * 1000) % 10**8}.xml"
            return ([*PYTEST, "-p", "gpu_pytest_plugin", "-p", "no:cacheprovider", "-rA",
                     f"--junitxml={xml}", *todo],
                    {"GPU_CHECK_PROGRESS": str(progress), "PYTHONPATH": _pythonpath()})
        return cmd
    groups = [Group(f"shard{s}", [(i, per_test) for i in part], make_cmd(s)) for s, part in enumerate(parts) if part]
    cwd = os.getcwd()
    os.chdir(ROOT)  # pytest's rootdir and conftest
    try:
        recs = run_groups(groups, workdir=xml_dir, deadline=t0 + budget, parallel=len(groups), log=log)
    finally:
        os.chdir(cwd)
    res.update(records=[recs[i] for i in ids], seconds=round(time.monotonic() - t0, 1))
    (out / "tests.json").write_text(json.dumps(res, indent=1))
    return res


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def assemble(out: Path) -> dict:
    """results.json from the phase files gpu_check.sh left in ``out``."""
    res = {"machine": _load(out / "env.json") or {}, "phases": []}
    try:
        for line in (out / "phases.jsonl").read_text().splitlines():
            if line.strip():
                res["phases"].append(json.loads(line))
    except OSError:
        pass
    for sec in ("tests", "probe", "bench"):
        d = _load(out / f"{sec}.json")
        if d is not None:
            res[sec] = d
    b = _load(out / "build.json")
    if b is not None:
        res["build"] = b
    return res


def report(out: Path, write_dispatch: bool) -> int:
    res = assemble(out)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "results.md").write_text(gpu_report.to_markdown(res))
    (out / "tests.xml").write_text(gpu_report.to_junit(gpu_report.records(res, "tests")))
    table_path = ROOT / "rankme_fast" / "backends" / "dispatch.json"
    table = json.loads(table_path.read_text())
    new = gpu_report.dispatch_from_results(res, table)
    (out / "dispatch.json").write_text(json.dumps(new, indent=2) + "\n")
    if write_dispatch and new["measured"]:
        table_path.write_text(json.dumps(new, indent=2) + "\n")
    text = gpu_report.summary(res)
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "verify-build", "tests", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        if name in ("env", "tests"):
            p.add_argument("--dry-run", action="store_true")
    t = sub.choices["tests"]
    t.add_argument("--budget", type=float, default=120.0)
    t.add_argument("--shards", type=int, default=4)
    t.add_argument("--timeout", type=float, default=150.0, help="seconds per test (a first Triton compile included)")
    t.add_argument("-k", default="")
    sub.choices["report"].add_argument("--write-dispatch", action="store_true",
                                       help="also rewrite rankme_fast/backends/dispatch.json (when measured)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.cmd == "env":
        info = env_info(a.dry_run)
        (a.out / "env.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info))
        return 0
    if a.cmd == "verify-build":
        info = verify_build()
        (a.out / "build.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
        import torch  # noqa: PLC0415
        missing = [m for m in ("_C", "_C_cuda") if str(info[m]).startswith("MISSING")]
        if missing:
            print(f"build check FAILED: {', '.join(missing)} not importable from the installed package", file=sys.stderr)
            return 1
        if torch.cuda.is_available() and not info["backends"]["cuda"].startswith("available"):
            print(f"build check FAILED: cuda backend {info['backends']['cuda']}", file=sys.stderr)
            return 1
        return 0
    if a.cmd == "tests":
        res = run_tests(a.out, a.budget, a.shards, a.timeout, a.k, a.dry_run)
        c = gpu_report.counts(res["records"])
        print(f"tests: {res['collected']} collected; " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
        return 0 if not any(s in c for s in ("failed", "error", "timeout", "crashed")) else 1
    return report(a.out, a.write_dispatch)


if __name__ == "__main__":
    raise SystemExit(main())
