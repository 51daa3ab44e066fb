"""Float64 FMA throughput of this machine: the peak the exact-Gram kernel is measured against (issue 17).

    python benchmarks/fma_peak.py [--isa avx512|avx2|generic|auto] [--seconds 0.5] [--json]

For the ISA the kernel dispatches to (``auto``: ``rankme_fast.show_config()``'s kernel isa; needs gcc), a
small C program keeps 12 independent FMA chains in registers (``vfmadd231pd`` on zmm / ymm; the generic
build multiplies and adds 2-wide SSE2 vectors, counted as 2 flops per lane) and reports GFLOP/s
(2 flops per FMA lane) on one thread and on every CPU at once (one pthread each, all started together,
summed) — on machines whose vCPUs are SMT siblings the second number is well below cores × the first.
``peak()`` is what benchmarks/test_bench_exact.py calls so every table reports the kernel's efficiency.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

_SRC = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(USE_ZMM) || defined(USE_YMM)
#include <immintrin.h>
#endif
#if defined(USE_ZMM)
typedef __m512d V; enum { LANES = 8 };
static inline V fma_(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
static inline V set1(double x) { return _mm512_set1_pd(x); }
static double sum(V v) { return _mm512_reduce_add_pd(v); }
#define FLOPS_PER_OP 2
#elif defined(USE_YMM)
typedef __m256d V; enum { LANES = 4 };
static inline V fma_(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
static inline V set1(double x) { return _mm256_set1_pd(x); }
static double sum(V v) { double t[4]; _mm256_storeu_pd(t, v); return t[0] + t[1] + t[2] + t[3]; }
#define FLOPS_PER_OP 2
#else
typedef double V __attribute__((vector_size(16))); enum { LANES = 2 };
static inline V fma_(V a, V b, V c) { return a * b + c; }
static inline V set1(double x) { V v = {x, x}; return v; }
static double sum(V v) { return v[0] + v[1]; }
#define FLOPS_PER_OP 2
#endif
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
typedef struct { long iters; double secs; double sink; } Job;
static pthread_barrier_t bar;
static void* run(void* p) {
  Job* j = (Job*)p;
  V a0 = set1(1.0), a1 = set1(1.1), a2 = set1(1.2), a3 = set1(1.3), a4 = set1(1.4), a5 = set1(1.5);
  V a6 = set1(1.6), a7 = set1(1.7), a8 = set1(1.8), a9 = set1(1.9), a10 = set1(2.0), a11 = set1(2.1);
  const V b = set1(0.999999), c = set1(1e-7);
  pthread_barrier_wait(&bar);
  double t = now();
  for (long k = 0; k < j->iters; ++k) {
    a0 = fma_(a0, b, c); a1 = fma_(a1, b, c); a2 = fma_(a2, b, c); a3 = fma_(a3, b, c);
    a4 = fma_(a4, b, c); a5 = fma_(a5, b, c); a6 = fma_(a6, b, c); a7 = fma_(a7, b, c);
    a8 = fma_(a8, b, c); a9 = fma_(a9, b, c); a10 = fma_(a10, b, c); a11 = fma_(a11, b, c);
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
  }
  j->secs = now() - t;
  j->sink = sum(a0) + sum(a1) + sum(a2) + sum(a3) + sum(a4) + sum(a5) + sum(a6) + sum(a7) + sum(a8) + sum(a9) +
            sum(a10) + sum(a11);
  return NULL;
}
int main(int argc, char** argv) {
  int nt = atoi(argv[1]); long iters = atol(argv[2]);
  pthread_t th[256]; Job jobs[256];
  if (nt < 1 || nt > 256) return 2;
  pthread_barrier_init(&bar, NULL, nt);
  for (int i = 0; i < nt; ++i) { jobs[i].iters = iters; pthread_create(&th[i], NULL, run, &jobs[i]); }
  double gf = 0, sink = 0;
  for (int i = 0; i < nt; ++i) { pthread_join(th[i], NULL); gf += 12.0 * LANES * FLOPS_PER_OP * iters / jobs[i].secs / 1e9; sink += jobs[i].sink; }
  printf("%.3f %g\n", gf, sink);
  return 0;
}
"""

FLAGS = {"avx512": ["-mavx512f", "-DUSE_ZMM"], "avx2": ["-mavx2", "-mfma", "-DUSE_YMM"], "generic": []}


def _kernel_isa() -> str:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from rankme_fast._config import config  # noqa: PLC0415

    cfg = config()
    txt = str(cfg.get("cpu_extension", ""))
    for isa in ("avx512", "avx2", "generic"):
        if f"isa={isa}" in txt:
            return isa
    return "generic"


def _build(isa: str, tmp: str) -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("fma_peak needs a C compiler (gcc)")
    src = os.path.join(tmp, "fma.c")
    exe = os.path.join(tmp, f"fma_{isa}")
    with open(src, "w") as f:
        f.write(_SRC)
    subprocess.run([cc, "-O3", "-pthread", *FLAGS[isa], src, "-o", exe], check=True, capture_output=True)
    return exe


def peak(isa: str = "auto", seconds: float = 0.5, repeats: int = 3) -> dict:
    """{"isa", "gflops_1thread", "gflops_all", "threads"}: the best of ``repeats`` runs of ~``seconds``."""
    if isa == "auto":
        isa = _kernel_isa()
    if isa not in FLAGS:
        raise ValueError(f"isa must be one of {sorted(FLAGS)} or 'auto', got {isa!r}")
    nt = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="rankme_fma_") as tmp:
        exe = _build(isa, tmp)

        def rate(threads: int) -> float:
            iters = 10_000_000
            gf = float(subprocess.run([exe, str(threads), str(iters)], check=True, capture_output=True,
                                      text=True).stdout.split()[0])
            # scale to about `seconds` of work per thread, then take the best of the repeats
            per = 12 * {"avx512": 16, "avx2": 8, "generic": 4}[isa] * iters / (gf / threads * 1e9)
            iters = max(1_000_000, int(iters * seconds / max(per, 1e-6)))
            return max(float(subprocess.run([exe, str(threads), str(iters)], check=True, capture_output=True,
                                            text=True).stdout.split()[0]) for _ in range(repeats))

        return {"isa": isa, "gflops_1thread": rate(1), "gflops_all": rate(nt), "threads": nt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default="auto", choices=("auto", *FLAGS))
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = peak(a.isa, a.seconds)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['isa']}: float64 FMA peak {r['gflops_1thread']:.1f} GFLOP/s on 1 thread, "
              f"{r['gflops_all']:.1f} GFLOP/s on {r['threads']} threads together")


if __name__ == "__main__":
    main()
