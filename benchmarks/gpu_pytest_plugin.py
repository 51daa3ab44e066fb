"""pytest plugin for the supervised GPU test phase: one progress event per test (see gpu_supervise).

Loaded with ``-p gpu_pytest_plugin`` (``benchmarks/`` on ``PYTHONPATH``) and
``GPU_CHECK_PROGRESS=<file>``. Writes ``start`` before each test and ``end`` with the outcome
(passed / failed / error / skipped), its duration and the failure text, so a test that hangs or kills
the process is still attributed and the supervisor can resume after it.
"""
from __future__ import annotations

import os
import time

from gpu_supervise import emit

_PATH = os.environ.get("GPU_CHECK_PROGRESS")
_state: dict = {}


def pytest_report_header(config):  # noqa: ARG001
    try:
        import rankme_fast  # noqa: PLC0415
        where = rankme_fast.__file__
    except ImportError as exc:
        where = f"not importable: {exc}"
    return [f"rankme_fast under test: {where}"]


def pytest_runtest_logstart(nodeid, location):  # noqa: ARG001
    if _PATH:
        _state[nodeid] = {"status": "passed", "t0": time.monotonic(), "message": ""}
        emit(_PATH, {"event": "start", "id": nodeid})


def pytest_runtest_logreport(report):
    st = _state.get(report.nodeid)
    if st is None:
        return
    if report.skipped and st["status"] == "passed":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        st.update(status="skipped", message=str(reason)[:500])
    elif report.failed:
        st.update(status="failed" if report.when == "call" else "error",
                  message=(report.longreprtext or "")[-3000:])


def pytest_runtest_logfinish(nodeid, location):  # noqa: ARG001
    st = _state.pop(nodeid, None)
    if _PATH and st is not None:
        emit(_PATH, {"event": "end", "id": nodeid, "status": st["status"],
                     "seconds": round(time.monotonic() - st["t0"], 3), "message": st["message"]})
