"""The one-shot GPU check (benchmarks/gpu_check.sh, issue 11) without a GPU: the supervisor's crash and
hang handling with toy workers, the results -> Markdown / dispatch.json / JUnit conversions on a recorded
(synthetic) sample, and the script's dry run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_report  # noqa: E402
from gpu_supervise import Group, run_groups  # noqa: E402

SAMPLE = json.loads((Path(__file__).parent / "data" / "gpu_results_sample.json").read_text())
TABLE = json.loads((ROOT / "rankme_fast" / "backends" / "dispatch.json").read_text())

TOY_WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from gpu_supervise import emit
    progress, ids = sys.argv[2], sys.argv[3:]
    for i in ids:
        emit(progress, {"event": "start", "id": i})
        if i.startswith("crash"):
            os._exit(139)                      # as a segfaulting kernel would
        if i.startswith("hang"):
            time.sleep(3600)                   # as a deadlocked kernel would
        if i.startswith("raise"):
            emit(progress, {"event": "end", "id": i, "status": "error", "error": "ValueError: bad"})
            continue
        emit(progress, {"event": "end", "id": i, "status": "ok", "value": len(i), "pid": os.getpid()})
""")


def _toy_group(tmp_path, name, ids, timeout=30.0, script=TOY_WORKER):
    worker = tmp_path / "toy_worker.py"
    worker.write_text(script)

    def cmd(todo, progress):
        return [sys.executable, str(worker), str(BENCH), str(progress), *todo], {}
    return Group(name, [(i, timeout) for i in ids], cmd)


def test_supervisor_survives_crash_and_hang(tmp_path):
    ids = ["a", "crash-1", "b", "hang-1", "c", "raise-1", "d"]
    g = _toy_group(tmp_path, "g", ids, timeout=3.0)
    t0 = time.monotonic()
    recs = run_groups([g], workdir=tmp_path / "w", deadline=t0 + 60, log=lambda _: None)
    assert [recs[i]["status"] for i in ids] == ["ok", "crashed", "ok", "timeout", "ok", "error", "ok"]
    assert "exit" in recs["crash-1"]["reason"] and "139" in recs["crash-1"]["reason"]
    assert "3 s" in recs["hang-1"]["reason"]
    assert recs["d"]["value"] == 1
    # a fresh worker after each crash/hang: three processes in all
    assert len({recs[i]["pid"] for i in ("a", "b", "c", "d")}) == 3 and g.launches == 3
    assert time.monotonic() - t0 < 30  # the hang cost its timeout, not the deadline


def test_supervisor_deadline_and_dead_start(tmp_path):
    hang = _toy_group(tmp_path, "slow", ["a", "hang-2", "b"], timeout=100.0)
    t0 = time.monotonic()
    recs = run_groups([hang], workdir=tmp_path / "w", deadline=t0 + 3, log=lambda _: None)
    assert recs["a"]["status"] == "ok"
    assert recs["hang-2"]["status"] == "timeout" and "phase budget" in recs["hang-2"]["reason"]
    assert recs["b"]["status"] == "not run" and "budget" in recs["b"]["reason"]
    # a worker that dies before its first item is not restarted in a loop
    broken = _toy_group(tmp_path, "broken", ["x", "y"], script="import sys; sys.exit(3)\n")
    recs = run_groups([broken], workdir=tmp_path / "w2", deadline=time.monotonic() + 30, log=lambda _: None)
    assert {recs[i]["status"] for i in ("x", "y")} == {"error"} and broken.launches == 1
    assert "code 3 before starting" in recs["x"]["reason"]


def test_supervisor_runs_groups_in_parallel(tmp_path):
    groups = [_toy_group(tmp_path, f"s{k}", [f"t{k}-{j}" for j in range(3)]) for k in range(3)]
    recs = run_groups(groups, workdir=tmp_path / "w", deadline=time.monotonic() + 60, parallel=3, log=lambda _: None)
    assert len(recs) == 9 and all(r["status"] == "ok" for r in recs.values())
    assert len({r["pid"] for r in recs.values()}) == 3


def test_markdown_from_sample():
    md = gpu_report.to_markdown(SAMPLE)
    # ratios and rates computed from the sample's numbers
    n, d = 1_000_000, 4096
    assert f"| triton-int8 | 200.0 | {n * d * d / 0.2 / 1e12:.1f} |" in md
    assert "| 4.50× | 0.30× |" in md  # 0.9 / 0.2 and 0.06 / 0.2
    pct = 100 * (2 * n * 9 * 528 * 128 * 128) / 0.2 / 1e12 / 1600
    assert f"{pct:.0f}% of int8" in md
    assert "| rank1 bf16 | raw | torch | 5e-05 | 2e-06 | **missed** |" in md
    assert "| cupy | fp32 | True | 0 |" in md
    assert "estimated 41.0 s per call" in md  # the svdvals cap, with its reason
    assert "| `tests/test_triton_normal.py::test_e` | crashed |" in md
    assert "| end-to-end exact RankMe, 1000000x4096 bf16 | 300ms | ≤ 150ms | no (missed by 2.00×) |" in md
    assert "| exact Gram vs svdvals, 1000000x4096 bf16 | 40× | ≥ 20× | yes |" in md


def test_targets_from_sample():
    tg = {name: (val, met) for name, val, _, met, _ in gpu_report.targets(SAMPLE)}
    assert tg["exact Gram vs x.double().T@x.double(), 1000000x4096 bf16"] == pytest.approx((4.5, True))
    assert tg["exact Gram vs x.double().T@x.double(), 1000000x4096 fp32"] == pytest.approx((2.25, False))
    assert tg["fast Gram vs x.T@x, 1000000x4096 bf16"] == pytest.approx((1.5, True))
    assert tg["float64 eigensolve d=4096 on GPU"] == pytest.approx((80.0, False))


def test_dispatch_from_sample():
    new = gpu_report.dispatch_from_results(SAMPLE, TABLE)
    assert new["measured"] is True and "SAMPLE-GPU" in new["source"]
    # bf16 exact: triton-int8 0.2 s < torch-fp64-chunks 1.0 s < cuda-exact 1.6 s
    assert new["order"]["exact"]["bfloat16"] == ["triton", "torch", "cuda"]
    # fp32 exact: cuda-exact 0.3 s beats triton-int8 0.4 s
    assert new["order"]["exact"]["float32"] == ["cuda", "triton", "torch"]
    # fp32 fast: cuda-fast crashed, so it goes after the measured ones (torch included)
    assert new["order"]["fast"]["float32"] == ["triton", "torch", "cuda"]
    # nothing measured for float64/float16: kept as they were, and said so
    for key in ("exact/float64", "exact/float16", "fast/float16"):
        prec, dt = key.split("/")
        assert new["order"][prec][dt] == TABLE["order"][prec][dt] and key in new["unmeasured"]
    assert set(new["measured_keys"]) == {"exact/bfloat16", "exact/float32", "fast/bfloat16", "fast/float32"}
    assert new["min_work"] == TABLE["min_work"]
    # the table the package reads accepts it
    for prec in ("exact", "fast"):
        for order in new["order"][prec].values():
            assert "torch" in order and set(order) <= {"triton", "cuda", "torch"}


def test_dispatch_without_measurements_stays_unmeasured():
    new = gpu_report.dispatch_from_results({"machine": {}, "bench": {"records": []}}, TABLE)
    assert new["measured"] is False and new["order"] == TABLE["order"]


def test_junit_from_sample():
    recs = gpu_report.records(SAMPLE, "tests")
    root = ET.fromstring(gpu_report.to_junit(recs))
    suite = root.find("testsuite")
    assert suite.get("tests") == "7" and suite.get("failures") == "3" and suite.get("errors") == "1"
    assert suite.get("skipped") == "2"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["test_b"].find("failure") is not None
    assert "timeout" in cases["test_d"].find("failure").get("message")
    assert cases["test_c"].find("skipped").get("message") == "CuPy not installed"
    assert cases["test_a[x]"].get("classname") == "tests.test_gpu_kernels"


def test_summary_names_every_failure():
    text = gpu_report.summary(SAMPLE)
    for needle in ("failed: tests/test_gpu_kernels.py::test_b", "crashed: gram/1000000x4096/fp32/cuda-fast",
                   "error: peak/fp16", "phase bench   timeout", "target MISS end-to-end exact RankMe"):
        assert needle in text, needle


def test_bench_plan_order_and_ids():
    import gpu_bench  # noqa: PLC0415
    plan = [i for i, _ in gpu_bench.bench_plan()]
    assert len(plan) == len(set(plan))
    assert plan[0].startswith("peak/") and plan.index("gram/1000000x4096/bf16/triton-int8") < plan.index("svd/1000000x4096/bf16")
    for shape in ("1000000x4096", "4000000x1024"):
        for dt in ("bf16", "fp32"):
            for r in ("triton-int8", "triton-fp64", "triton-fast", "cuda-exact", "cuda-fast", "torch-fp64-chunks",
                      "torch-f64-gram", "torch-gram", "e2e-exact"):
                assert f"gram/{shape}/{dt}/{r}" in plan
    assert {"dlpack/cupy", "dlpack/jax", "normal/100000x16384/bf16/slq", "eig/4096/gpu", "eig/4096/cpu"} <= set(plan)
    assert gpu_bench.group_of("gram/1000000x4096/bf16/triton-int8") == "gram/1000000x4096/bf16"


@pytest.mark.skipif(sys.platform != "linux", reason="gpu_check.sh is a Linux bash script")
def test_gpu_check_dry_run(tmp_path):
    """The whole script without a GPU: every phase runs its control flow and skips with a reason."""
    import torch  # noqa: PLC0415
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the dry run is for machines without one")
    import rankme_fast  # noqa: PLC0415
    env = dict(os.environ, GPU_CHECK_PROBE_S="120", GPU_CHECK_BENCH_S="120", GPU_CHECK_TESTS_S="240", GPU_CHECK_TOTAL_S="600",
               PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(Path(rankme_fast.__file__).resolve().parents[1])]
                                          + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    phases = {p["phase"]: p for p in map(json.loads, (out / "phases.jsonl").read_text().splitlines())}
    assert list(phases) == ["env", "build", "probe", "tests", "bench", "report"]
    assert phases["env"]["status"] == "passed" and phases["report"]["status"] == "passed"
    for p in ("build", "probe", "tests", "bench"):
        assert phases[p]["status"] == "skipped" and "dry run" in phases[p]["reason"], phases[p]
    results = json.loads((out / "results.json").read_text())
    bench = results["bench"]["records"]
    import gpu_bench  # noqa: PLC0415
    assert [r["id"] for r in bench] == [i for i, _ in gpu_bench.bench_plan()]
    assert all(r["status"] == "skipped" and "no CUDA GPU" in r["reason"] for r in bench)
    assert results["tests"]["collected"] > 300  # the GPU test selection resolves
    assert "**Dry run: nothing ran on a GPU" in (out / "results.md").read_text()
    assert ET.parse(out / "tests.xml").getroot().find("testsuite").get("tests") == str(results["tests"]["collected"])
    assert json.loads((out / "dispatch.json").read_text())["measured"] is False
    summary = (out / "summary.txt").read_text()
    assert "failed" not in summary and "crashed" not in summary
    assert "gpu_check.log" in {p.name for p in out.iterdir()}


def _smoke(tmp_path, phase):
    """gpu_bench's own pre-flight: every task of a phase on tiny CPU shapes (Triton interpreted)."""
    import rankme_fast  # noqa: PLC0415
    env = dict(os.environ, GPU_BENCH_DEVICE="cpu", GPU_BENCH_SMALL="1", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(Path(rankme_fast.__file__).resolve().parents[1])]
                                          + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    res = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), phase, "--out", str(tmp_path), "--budget", "600",
                          "--reps", "1"], env=env, capture_output=True, text=True, timeout=900)
    recs = {r["id"]: r for r in json.loads((tmp_path / f"{phase}.json").read_text())["records"]}
    bad = {i: r for i, r in recs.items() if r["status"] not in ("ok", "skipped")}
    assert not bad and res.returncode == 0, (bad, res.stdout[-2000:])
    for i, r in recs.items():  # only what needs CUDA hardware or its libraries may skip
        if r["status"] == "skipped":
            assert "cuda" in i or i.startswith("dlpack/"), (i, r["reason"])
    return recs


def test_bench_tasks_preflight_on_cpu(tmp_path):
    recs = _smoke(tmp_path, "bench")
    for i, r in recs.items():
        if i.startswith("gram/") and i.split("/")[-1] in ("triton-int8", "triton-fp64", "torch-fp64-chunks", "torch-f64-gram"):
            assert r["max_rel_err_vs_fp64"] < 1e-7, (i, r)  # exact routes against the float64 reference Gram
        if i.startswith("gram/") and i.endswith("/e2e-exact"):
            assert r["rankme_rel_err_vs_reference"] < 1e-9, (i, r)
        if i.startswith("acc/"):
            assert r["contract_met"], r
            assert {"triton-int8", "triton-fp64", "torch", "auto"} <= set(r["cases"]["raw"]["routes"])
    assert recs["normal/200x70/bf16/triton-fp64-k16"]["max_rel_err_vs_fp64"] < 1e-12
    ex = recs["normal/200x70/bf16/exact"]
    assert ex["slq_rel_err"] < 0.05 and "slq_speedup" in ex
    md = gpu_report.to_markdown({"machine": {}, "bench": {"records": list(recs.values())}})
    assert "## Gram 300×130 bf16" in md and "## Accuracy on collapsed input, 300×40" in md


def test_probe_tasks_preflight_on_cpu(tmp_path):
    recs = _smoke(tmp_path, "probe")
    for i, r in recs.items():
        if r["status"] == "ok" and i.startswith("probe/triton-"):
            tol = {"int8": 1e-6, "fp64": 1e-13, "fast": 1e-5}[i.split("/")[1].split("-")[1]]
            assert r["max_rel_err_vs_fp64"] < tol, (i, r)
        if r["status"] == "ok" and i.startswith("probe/normal-fp64"):
            assert r["max_rel_err_k16"] < 1e-12 and r["max_rel_err_k64"] < 1e-12


def test_bench_groups_isolate_jax_in_order():
    import gpu_bench  # noqa: PLC0415
    plan = gpu_bench.bench_plan()
    groups = gpu_bench.plan_groups(plan, 5, {})
    flat = [i for g in groups for i, _ in g.items]
    assert flat == [i for i, _ in plan]  # same order, nothing lost
    jax = [g for g in groups if any(i == "dlpack/jax" for i, _ in g.items)]
    assert len(jax) == 1 and len(jax[0].items) == 1
    assert len(gpu_bench.plan_groups(gpu_bench.probe_plan(), 5, {})) == len(gpu_bench.probe_plan())
    assert len(gpu_bench.plan_groups(plan, 5, {}, single=True)) == 1
