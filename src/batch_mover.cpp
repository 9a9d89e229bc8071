#include "batch_mover.h"

#ifdef WICK_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <optional>

namespace wick::detail {

namespace {

torch::Tensor to_device(const torch::Tensor& t, const torch::Device& device) {
  if (!t.defined() || t.device() == device) return t;
  return t.to(device, /*non_blocking=*/true);
}

}  // namespace

#ifdef WICK_WITH_CUDA
struct BatchMover::Cuda {
  c10::cuda::CUDAStream stream;
  at::cuda::CUDAEvent copied;
  bool pending = false;
};
#else
struct BatchMover::Cuda {};
#endif

BatchMover::BatchMover(torch::Device device) : device_(device) {
#ifdef WICK_WITH_CUDA
  if (device_.is_cuda()) {
    const auto index = device_.has_index() ? device_.index() : c10::cuda::current_device();
    cuda_ =
        std::make_unique<Cuda>(Cuda{c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index),
                                    at::cuda::CUDAEvent(), false});
  }
#endif
}

BatchMover::~BatchMover() = default;

Batch BatchMover::start(Batch batch) {
#ifdef WICK_WITH_CUDA
  if (cuda_ && batch.data.device() != device_) {
    // The copy may only read the host tensors once the current stream has
    // finished what it enqueued before (they can be outputs of earlier work).
    auto current = c10::cuda::getCurrentCUDAStream(cuda_->stream.device_index());
    at::cuda::CUDAEvent before;
    before.record(current);
    before.block(cuda_->stream);
    c10::cuda::CUDAStreamGuard guard(cuda_->stream);
    batch.data = to_device(batch.data, device_);
    batch.target = to_device(batch.target, device_);
    cuda_->copied.record(cuda_->stream);
    cuda_->pending = true;
    return batch;
  }
#endif
  batch.data = to_device(batch.data, device_);
  batch.target = to_device(batch.target, device_);
  return batch;
}

void BatchMover::ready(Batch& batch) {
#ifdef WICK_WITH_CUDA
  if (cuda_ && cuda_->pending) {
    auto current = c10::cuda::getCurrentCUDAStream(cuda_->stream.device_index());
    cuda_->copied.block(current);
    // Allocated on the side stream, used on this one: keep the memory from
    // being reused before this stream is done with it.
    if (batch.data.is_cuda()) batch.data.record_stream(current);
    if (batch.target.defined() && batch.target.is_cuda()) batch.target.record_stream(current);
    cuda_->pending = false;
  }
#endif
}

}  // namespace wick::detail
