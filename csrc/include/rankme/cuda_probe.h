#pragma once
namespace rankme {
int cuda_device_count();
int cuda_runtime_version();
int cuda_selftest(double v, int n, double* host_out);
}  // namespace rankme
