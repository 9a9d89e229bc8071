#pragma once
// Private to wick: moves batches to the training device ahead of use.

#include <wick/data.h>

#include <torch/torch.h>

#include <memory>
#include <optional>

namespace wick::detail {

/// Copies batches to `device` one step ahead of their use. On CUDA (builds
/// with WICK_WITH_CUDA) the host-to-device copy runs on a side stream, so
/// copying batch i+1 overlaps the compute of batch i; ready() makes the
/// current stream wait for the copy and tells the caching allocator the
/// tensors are used there. Elsewhere it is a plain (non-blocking) .to(device).
/// Calls alternate: start(b1), ready(b1), start(b2), ready(b2), ...
class BatchMover {
 public:
  explicit BatchMover(torch::Device device);
  ~BatchMover();
  BatchMover(const BatchMover&) = delete;
  BatchMover& operator=(const BatchMover&) = delete;

  /// Issues the copy of `batch` to the device.
  Batch start(Batch batch);
  /// The source's next batch with its copy started, or nullopt at the epoch's end.
  std::optional<Batch> next(BatchSource& source) {
    auto batch = source.next();
    if (batch.has_value()) batch = start(std::move(*batch));
    return batch;
  }
  /// Makes `batch` (returned by the last start) safe to use on the current stream.
  void ready(Batch& batch);

 private:
  struct Cuda;
  torch::Device device_;
  std::unique_ptr<Cuda> cuda_;  // side stream and event; null off CUDA
};

}  // namespace wick::detail
