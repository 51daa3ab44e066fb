"""GPU Gram routes under pytest-benchmark (issue 4); the full table comes from gpu_bench.py.

Run:  pytest benchmarks/test_bench_gpu.py --benchmark-json=gpu.json       (skips without a CUDA GPU)
Shapes: RANKME_FAST_GPU_SHAPES (default "1000000x4096,4000000x1024"), dtypes bf16 and fp32.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the GPU benchmarks need one", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import gpu_bench  # noqa: E402

SHAPES = [tuple(map(int, s.split("x"))) for s in
          os.environ.get("RANKME_FAST_GPU_SHAPES", "1000000x4096,4000000x1024").split(",")]
ROUTES = ["triton-int8", "triton-fp64", "triton-fast", "cuda-exact", "cuda-fast", "torch-f64-gram", "torch-gram"]


@pytest.fixture(scope="module", params=[(s, dt) for s in SHAPES for dt in ("bf16", "fp32")],
                ids=lambda p: f"{p[0][0]}x{p[0][1]}-{p[1]}")
def routes(request):
    (n, d), dt = request.param
    x = torch.randn(n, d, device="cuda").to(gpu_bench.dtype(dt))
    yield (n, d, dt), gpu_bench.kernel_routes(x)
    del x
    torch.cuda.empty_cache()


@pytest.mark.parametrize("route", ROUTES)
def test_gpu_route(benchmark, routes, route):
    (n, d, dt), fns = routes
    if route not in fns:
        pytest.skip(f"{route} not available on this machine")
    fn = fns[route]
    benchmark.group = f"{n}x{d}-{dt}"
    benchmark.extra_info.update({"n": n, "d": d, "dtype": dt, "useful_flops": n * d * d})

    def run():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert benchmark.stats.stats.median > 0
