"""Benchmark fixtures: machine/version info attached to every pytest-benchmark record."""
import datetime
import os
import platform

import pytest
import torch


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import rankme_fast
    from rankme_fast.backends import cpu as native

    mod = native.load()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rankme_fast": rankme_fast.__version__,
        "kernel_isa": mod.gram_isa() if mod else "none",
        "date": datetime.date.today().isoformat(),
    }


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: ARG001
    machine_info.update(globals()["machine_info"]())


@pytest.fixture(scope="session")
def dgemm_rate():
    """Sustained float64 GEMM rate (flop/s, 2mnk counting) of this machine in this run: median of 5
    4096³ products (~1 s each, so turbo bursts and short stalls do not dominate)."""
    import statistics
    import time

    a = torch.randn(4096, 4096, dtype=torch.float64)
    a @ a
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        ts.append(time.perf_counter() - t)
    return 2 * 4096**3 / statistics.median(ts)
