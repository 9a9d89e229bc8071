#include "parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <exception>

#include <dlfcn.h>

// ThreadSanitizer cannot see libgomp's hand-offs (futexes in uninstrumented
// code): the job's release before the team starts, each thread's acquire and
// release around its chunk, and the acquire after the team ends tell it.
#if defined(__SANITIZE_THREAD__)
#define WICK_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define WICK_TSAN 1
#endif
#endif
#ifdef WICK_TSAN
#include <sanitizer/tsan_interface.h>
#define WICK_TSAN_RELEASE(p) __tsan_release(p)
#define WICK_TSAN_ACQUIRE(p) __tsan_acquire(p)
#else
#define WICK_TSAN_RELEASE(p) (void)(p)
#define WICK_TSAN_ACQUIRE(p) (void)(p)
#endif

namespace wick::detail {
namespace {

// libgomp's entry points, as GCC's `#pragma omp parallel` calls them (a
// stable ABI since GCC 4.9).
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpInt = int (*)();

struct Gomp {
  GompParallel parallel = nullptr;
  OmpInt thread_num = nullptr;
  OmpInt num_threads = nullptr;
  bool ok() const { return parallel && thread_num && num_threads; }
};

// The OpenMP runtime LibTorch runs its own parallel loops on: torch's
// libgomp, loaded with libtorch_cpu, found among the process's symbols.
// LibTorch built with OpenMP calls omp_get_max_threads() for
// at::get_num_threads(), so torch::set_num_threads sizes this runtime's team.
const Gomp& gomp() {
  static const Gomp g = [] {
    Gomp r;
    r.parallel = reinterpret_cast<GompParallel>(::dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    r.thread_num = reinterpret_cast<OmpInt>(::dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
    r.num_threads = reinterpret_cast<OmpInt>(::dlsym(RTLD_DEFAULT, "omp_get_num_threads"));
    return r;
  }();
  return g;
}

struct Job {
  Job(int64_t b, int64_t e, int64_t g, const std::function<void(int64_t, int64_t)>& fn)
      : begin(b), end(e), grain(g), f(&fn) {}
  int64_t begin, end, grain;
  const std::function<void(int64_t, int64_t)>* f;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
};

// Each thread of the team: its chunk, as ATen's invoke_parallel splits.
void run_chunk_of(Job& job) {
  const Gomp& g = gomp();
  int64_t threads = g.num_threads();
  if (job.grain > 0) {
    threads = std::min(threads, (job.end - job.begin + job.grain - 1) / job.grain);
  }
  const int64_t tid = g.thread_num();
  const int64_t chunk = (job.end - job.begin + threads - 1) / threads;
  const int64_t b = job.begin + tid * chunk;
  if (tid >= threads || b >= job.end) return;
  try {
    c10::ParallelGuard guard(true);
    (*job.f)(b, std::min(job.end, b + chunk));
  } catch (...) {
    if (!job.failed.test_and_set()) job.error = std::current_exception();
  }
}

void run_chunk(void* data) {
  WICK_TSAN_ACQUIRE(data);
  run_chunk_of(*static_cast<Job*>(data));
  WICK_TSAN_RELEASE(data);
}

}  // namespace

bool parallel_for_available() { return gomp().ok(); }

void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f) {
  if (begin >= end) return;
  const int threads = at::get_num_threads();
  const bool parallel = end - begin > std::max<int64_t>(grain, 1) && threads > 1 &&
                        !at::in_parallel_region() && gomp().ok();
  if (!parallel) {
    c10::ParallelGuard guard(true);
    f(begin, end);
    return;
  }
  Job job(begin, end, grain, f);
  // The team of torch's size, as ATen's own loops take it (a num_threads that
  // varies from call to call makes libgomp rebuild its pool, pytorch#32008);
  // threads beyond the chunks return at once.
  WICK_TSAN_RELEASE(&job);
  gomp().parallel(&run_chunk, &job, 0, 0);
  WICK_TSAN_ACQUIRE(&job);
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace wick::detail
