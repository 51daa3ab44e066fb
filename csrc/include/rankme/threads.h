// Starting worker threads without std::terminate: a std::thread that cannot be created (RLIMIT_NPROC,
// RLIMIT_AS, cgroup pids.max) throws std::system_error, and one escaping a kernel, or a std::thread
// destroyed while joinable, ends the process. run_threads starts as many threads as it can, then runs
// the work on the threads it got, so a failed start costs speed, never the result or the process.
#pragma once
#include <atomic>
#include <exception>
#include <thread>
#include <vector>

namespace rankme {

// Upper bound on the threads a kernel starts, whatever it is asked for (each costs a stack and, for
// the private Gram schedule, a d×d buffer); the Python layer refuses larger requests.
constexpr int kMaxThreads = 4096;

// Calls prepare(n) on this thread, then work(t, n) for t = 0..n-1, work(0, n) on this thread and the
// others on n-1 new ones, where n <= want is 1 + the number of threads that could be started. Workers
// wait (yielding) on a gate until the count is known, so prepare can size barriers and partitions.
// Returns n. work must not throw.
template <class Prepare, class Work>
int run_threads(int want, Prepare&& prepare, Work&& work) {
  if (want < 1) want = 1;
  if (want > kMaxThreads) want = kMaxThreads;
  std::atomic<int> gate{-1};
  auto body = [&](int t) {
    int n;
    while ((n = gate.load(std::memory_order_acquire)) < 0) std::this_thread::yield();
    if (t < n) work(t, n);
  };
  std::vector<std::thread> th;
  int n = 1;
  try {
    th.reserve(static_cast<size_t>(want - 1));
    for (int t = 1; t < want; ++t) {
      th.emplace_back(body, t);
      ++n;
    }
  } catch (const std::exception&) {
    // std::system_error (no thread) or std::bad_alloc: carry on with the n threads we have
  }
  try {
    prepare(n);
  } catch (...) {
    gate.store(0, std::memory_order_release);  // release the started threads with nothing to do
    for (auto& x : th) x.join();
    throw;
  }
  gate.store(n, std::memory_order_release);
  body(0);
  for (auto& x : th) x.join();
  return n;
}

}  // namespace rankme
