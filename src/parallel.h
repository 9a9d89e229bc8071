#pragma once
// Private to wick: a parallel loop on torch's intra-op threads.
//
// at::parallel_for is a header template whose parallel branch exists only
// where the includer is compiled with OpenMP (_OPENMP defines
// INTRA_OP_PARALLEL in ATen/ParallelOpenMP.h); wick is not, and cannot mix
// in another compiler's OpenMP runtime, so at::parallel_for in wick's own
// code ran every loop on the calling thread. This one runs on the OpenMP
// runtime LibTorch already loaded (libgomp, found at run time), with
// torch's intra-op thread count, as at::parallel_for does inside LibTorch.

#include <cstdint>
#include <functional>

namespace wick::detail {

/// Splits [begin, end) into at most at::get_num_threads() chunks of at least
/// `grain` items and runs f(chunk_begin, chunk_end) on torch's intra-op
/// threads (the calling thread among them); serially when the range is not
/// above `grain`, inside another parallel region, with one thread, or where
/// no OpenMP runtime of LibTorch is found. Rethrows the first exception of a
/// chunk. at::in_parallel_region() is true inside f.
void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f);

/// Whether parallel_for can run on more than one thread in this process.
bool parallel_for_available();

}  // namespace wick::detail
