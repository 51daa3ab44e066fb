"""Benchmark fixtures: machine/version info attached to every pytest-benchmark record."""
import datetime
import os

import pytest
import torch


def machine_info() -> dict:
    import rankme_fast
    from rankme_fast._config import cpu_model, kernel_isa

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rankme_fast": rankme_fast.__version__,
        "kernel_isa": kernel_isa(),
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
