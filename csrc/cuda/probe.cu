// Minimal CUDA translation unit proving the optional CUDA build path (issue 2). The fused Gram
// kernels arrive in issue 4; this module only reports what the runtime sees.
#include <cuda_runtime.h>

#include "rankme/cuda_probe.h"

namespace rankme {

__global__ void fill_kernel(double* out, double v, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = v;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

// Fills n doubles on the device with v and copies them back; returns a cudaError_t value.
int cuda_selftest(double v, int n, double* host_out) {
  double* d = nullptr;
  cudaError_t e = cudaMalloc(&d, sizeof(double) * n);
  if (e != cudaSuccess) return static_cast<int>(e);
  fill_kernel<<<(n + 255) / 256, 256>>>(d, v, n);
  e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaMemcpy(host_out, d, sizeof(double) * n, cudaMemcpyDeviceToHost);
  cudaFree(d);
  return static_cast<int>(e);
}

}  // namespace rankme
