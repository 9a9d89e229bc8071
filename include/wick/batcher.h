#pragma once
// DynamicBatcher: requests submitted one at a time from many threads are merged
// into batches, run by a model on worker threads, and answered one by one.
//
//   auto net = ...;  // any callable batch -> batch
//   wick::TensorBatcher batcher(
//       wick::stack_batches([&](const torch::Tensor& x) { return net->forward(x); }),
//       wick::BatcherOptions().max_batch_size(32).max_delay(std::chrono::microseconds(2000)));
//   std::future<torch::Tensor> y = batcher.submit(image);  // any thread
//   torch::Tensor logits = y.get();                          // the result, or the error rethrown
//
// Every request gets exactly one answer: its result, or an exception in its
// future (BatcherError for queue full / deadline / shutdown / cancel, the
// model's own exception when the model threw). See docs/batching.md.

#include <torch/arg.h>
#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace wick {

/// What submit() does when max_queue_size requests are already waiting.
enum class QueueFullPolicy {
  kReject,  ///< the returned future at once carries BatcherError(kQueueFull)
  kBlock,   ///< submit() waits up to block_timeout for room, then rejects as kReject does
};

/// What shutdown() (and the destructor) does with requests still queued.
enum class ShutdownPolicy {
  kDrain,   ///< run them all, then stop
  kCancel,  ///< answer them with BatcherError(kCancelled); batches already running finish
};

struct BatcherOptions {
  /// Most requests in one batch, >= 1. Default 32.
  TORCH_ARG(int64_t, max_batch_size) = 32;
  /// How long the oldest queued request may wait for company before its batch
  /// runs anyway, >= 0 (0: run whatever is queued at once). Default 1 ms.
  TORCH_ARG(std::chrono::microseconds, max_delay) = std::chrono::microseconds(1000);
  /// Most requests waiting (not yet taken into a batch), >= 1. Default 1024.
  TORCH_ARG(int64_t, max_queue_size) = 1024;
  /// See QueueFullPolicy. Default kReject.
  TORCH_ARG(QueueFullPolicy, queue_full_policy) = QueueFullPolicy::kReject;
  /// With kBlock: the longest submit() waits for room, >= 0. Default 1 s.
  TORCH_ARG(std::chrono::microseconds, block_timeout) = std::chrono::microseconds(1000000);
  /// Deadline given to requests submitted without one, measured from submit(),
  /// >= 0; 0 = none. A request past its deadline when a batch is formed is
  /// answered with BatcherError(kDeadlineExceeded) and never run. Default 0.
  TORCH_ARG(std::chrono::microseconds, request_timeout) = std::chrono::microseconds(0);
  /// Worker threads, each running one batch at a time, >= 1 (batches run in
  /// parallel: model replicas, CUDA streams). Default 1.
  TORCH_ARG(int64_t, num_workers) = 1;
  /// See ShutdownPolicy. Default kDrain.
  TORCH_ARG(ShutdownPolicy, shutdown_policy) = ShutdownPolicy::kDrain;
  /// Run the model under c10::InferenceMode (no autograd records). Default true.
  TORCH_ARG(bool, inference_mode) = true;
};

/// The error a future carries when the batcher, not the model, refused a request.
class BatcherError : public std::runtime_error {
 public:
  enum class Kind { kQueueFull, kDeadlineExceeded, kShutdown, kCancelled };
  BatcherError(Kind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

/// Percentiles of a latency, in microseconds, over the most recent
/// BatcherStats::kLatencyWindow requests (0 when there are none).
struct LatencySummary {
  int64_t count = 0;
  double p50_us = 0, p95_us = 0, p99_us = 0, max_us = 0;
};

struct BatcherStats {
  static constexpr size_t kLatencyWindow = 65536;
  int64_t requests_submitted = 0;  ///< every submit() call
  int64_t requests_succeeded = 0;  ///< answered with a result
  int64_t requests_failed = 0;     ///< answered with the model's error
  int64_t requests_rejected = 0;   ///< queue full, or submitted after shutdown
  int64_t requests_expired = 0;    ///< past their deadline, not run
  int64_t requests_cancelled = 0;  ///< dropped by a kCancel shutdown
  int64_t batches_run = 0;         ///< model calls (a failed one included)
  /// batch_size_histogram[n]: batches of n requests; size max_batch_size + 1.
  std::vector<int64_t> batch_size_histogram;
  double mean_batch_size = 0;
  LatencySummary queue_wait;  ///< submit() to being taken into a batch
  LatencySummary end_to_end;  ///< submit() to the answer (run requests only)
};

namespace detail {

/// One queued request, type-erased so the queue and workers live in batcher.cpp.
struct BatcherJob {
  virtual ~BatcherJob() = default;
  virtual void fail(std::exception_ptr error) = 0;  // set the future's exception
  virtual void complete() = 0;                      // set the future's value (stored by run)
  std::chrono::steady_clock::time_point enqueued;
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

using BatcherJobs = std::vector<std::unique_ptr<BatcherJob>>;

/// Queue, worker threads, deadlines, shutdown and stats. `run` stores each
/// job's result (complete() sends it) or throws, which fails the whole batch.
class BatcherCore {
 public:
  BatcherCore(BatcherOptions options, std::function<void(BatcherJobs&)> run);
  ~BatcherCore();
  BatcherCore(const BatcherCore&) = delete;
  BatcherCore& operator=(const BatcherCore&) = delete;

  void submit(std::unique_ptr<BatcherJob> job);
  void shutdown();
  BatcherStats stats() const;
  const BatcherOptions& options() const { return options_; }

 private:
  struct State;
  void worker_loop();
  BatcherOptions options_;
  std::function<void(BatcherJobs&)> run_;
  std::unique_ptr<State> state_;
  std::vector<std::thread> workers_;
  std::once_flag joined_;
};

}  // namespace detail

/// Batches requests of type In into calls of `batch_fn`, which turns the
/// batch's inputs (in queue order) into exactly as many outputs, same order.
/// Collation and splitting live in batch_fn: stack_batches / pad_batches make
/// one for tensors; write your own for other types.
template <class In, class Out>
class DynamicBatcher {
 public:
  using BatchFn = std::function<std::vector<Out>(std::vector<In>&&)>;

  /// Validates `options` (throws c10::Error) and starts the workers.
  DynamicBatcher(BatchFn batch_fn, BatcherOptions options = {})
      : core_(std::move(options), [fn = std::move(batch_fn)](detail::BatcherJobs& jobs) {
          std::vector<In> inputs;
          inputs.reserve(jobs.size());
          for (auto& j : jobs) inputs.push_back(std::move(static_cast<Job&>(*j).input));
          std::vector<Out> outputs = fn(std::move(inputs));
          if (outputs.size() != jobs.size()) {
            throw std::runtime_error("DynamicBatcher: batch function returned " +
                                     std::to_string(outputs.size()) + " results for " +
                                     std::to_string(jobs.size()) + " requests");
          }
          for (size_t i = 0; i < jobs.size(); ++i)
            static_cast<Job&>(*jobs[i]).output = std::move(outputs[i]);
        }) {}

  /// Queues `input`; thread-safe. The future holds the result or the error.
  /// Uses options().request_timeout as the deadline (none when 0).
  std::future<Out> submit(In input) { return submit_impl(std::move(input), std::nullopt); }

  /// Queues `input` with an absolute deadline (overrides request_timeout).
  std::future<Out> submit(In input, std::chrono::steady_clock::time_point deadline) {
    return submit_impl(std::move(input), deadline);
  }

  /// Stops intake (later submits are answered with BatcherError(kShutdown)),
  /// drains or cancels the queue per shutdown_policy, and joins the workers.
  /// Idempotent. Called from inside the batch function it only stops intake
  /// (and cancels per policy); the destructor then joins.
  void shutdown() { core_.shutdown(); }

  BatcherStats stats() const { return core_.stats(); }
  const BatcherOptions& options() const { return core_.options(); }

 private:
  struct Job : detail::BatcherJob {
    In input;
    std::optional<Out> output;
    std::promise<Out> promise;
    void fail(std::exception_ptr error) override { promise.set_exception(std::move(error)); }
    void complete() override { promise.set_value(std::move(*output)); }
  };

  std::future<Out> submit_impl(In input,
                               std::optional<std::chrono::steady_clock::time_point> deadline) {
    auto job = std::make_unique<Job>();
    job->input = std::move(input);
    job->deadline = deadline;
    auto future = job->promise.get_future();
    core_.submit(std::move(job));
    return future;
  }

  detail::BatcherCore core_;
};

/// What a padding model receives: `data` [B, T, ...] with each request's
/// sequence (its first dim) at the front of its row and `pad_value` after it;
/// `mask` bool [B, T], true at real positions; `lengths` int64 [B].
struct PaddedBatch {
  torch::Tensor data;
  torch::Tensor mask;
  torch::Tensor lengths;
};

using TensorBatcher = DynamicBatcher<torch::Tensor, torch::Tensor>;

/// Batch function for equal-shape requests: stacks them into [B, ...], calls
/// `model`, which must return [B, ...], and answers request i with row i.
/// Requests of different shapes or dtypes in one batch run as separate model
/// calls, one per shape, so a stray shape never fails its neighbours.
TensorBatcher::BatchFn stack_batches(std::function<torch::Tensor(const torch::Tensor&)> model);

/// Batch function for variable-length sequences (dim 0 of each request, >= 1
/// dims): pads them to the longest into a PaddedBatch. `model` returns [B, ...];
/// request i gets row i, cut to its length along dim 0 when `unpad_outputs`
/// (then the output must be [B, T, ...]). Requests whose trailing shape or
/// dtype differ run as separate model calls.
TensorBatcher::BatchFn pad_batches(std::function<torch::Tensor(const PaddedBatch&)> model,
                                   bool unpad_outputs = false, double pad_value = 0.0);

}  // namespace wick
