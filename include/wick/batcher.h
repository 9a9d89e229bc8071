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
//   // Or without a future or an exception: a status now, the answer in a callback.
//   wick::Admission a = batcher.try_submit(std::move(image), [](wick::BatcherAnswer<torch::Tensor>
//   r) {
//     if (r.ok()) send(r.value());  // on a worker thread; keep it short
//   });
//   if (a != wick::Admission::kAccepted) shed();  // kQueueFull / kShutdown: `image` is still yours
//
// Every request gets exactly one answer: its result, or an error (BatcherError
// for queue full / deadline / shutdown / cancel, the model's own exception when
// the model threw): in its future, or in its callback, or (try_submit refusing
// it) as the Admission returned. See docs/batching.md.

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
  /// An idle worker runs a batch of this many requests as soon as that many
  /// are queued, without waiting for max_batch_size or max_delay (Triton's
  /// preferred batch size); requests that came meanwhile wait for the next
  /// batch. A worker back from a batch (run_waiting_when_busy) or one whose
  /// max_delay ran out still takes up to max_batch_size. 0: max_batch_size.
  /// With as many one-at-a-time clients as max_batch_size, half of it splits
  /// them into two groups: one is computed while the other is answered and
  /// resubmits. >= 0 and <= max_batch_size. Default 0.
  TORCH_ARG(int64_t, preferred_batch_size) = 0;
  /// How long the oldest queued request may wait for company before its batch
  /// runs anyway, >= 0 (0: run whatever is queued at once). Default 1 ms.
  TORCH_ARG(std::chrono::microseconds, max_delay) = std::chrono::microseconds(1000);
  /// A worker that finishes a batch and finds requests already queued runs
  /// them at once (true), instead of waiting up to max_delay for a full batch
  /// (false). They arrived while it was busy, so they have waited already, and
  /// the next ones arrive while it runs these: the batches follow the load, and
  /// clients who are answered resubmit while the model works on the others'
  /// requests. An idle worker waits for company up to max_delay either way.
  /// Default true.
  TORCH_ARG(bool, run_waiting_when_busy) = true;
  /// How long a worker with no batch to run yet polls the queue (yielding its
  /// core to any other runnable thread) before it sleeps on it: after a batch
  /// with the queue empty, or while a batch fills toward its size before
  /// max_delay (never past it). A worker that sleeps gives up its core: the
  /// next batch waits for its wake-up and may start on cold caches (on a
  /// 2-core VM, 64 closed-loop clients of a 0.7 ms MLP: queue time 14 against
  /// 17-18 us a request, and the model's batch at 0.98 of its back-to-back
  /// time against 1.04-1.11 in one comparison, no clear difference in
  /// another). Polling costs at most this much CPU per idle spell, as ONNX
  /// Runtime's spinning intra-op threads do. >= 0 (0: sleep at once).
  /// Default 200 us.
  TORCH_ARG(std::chrono::microseconds, idle_spin) = std::chrono::microseconds(200);
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
  /// parallel: model replicas, CUDA streams). On Linux each is named
  /// "wick-batcher" (top -H, perf, gdb). Default 1.
  TORCH_ARG(int64_t, num_workers) = 1;
  /// See ShutdownPolicy. Default kDrain.
  TORCH_ARG(ShutdownPolicy, shutdown_policy) = ShutdownPolicy::kDrain;
  /// Run the model under c10::InferenceMode (no autograd records). Default true.
  TORCH_ARG(bool, inference_mode) = true;
  /// Called on the worker once every request of a batch has been answered
  /// (futures set, callbacks returned; the requests it refused as expired
  /// just before included), with the number answered: one place per batch to
  /// flush what the callbacks buffered (a socket's writes), or to wake all the
  /// batch's waiting clients with one call instead of one each. Not called
  /// for requests a kCancel shutdown cancels. Must not throw. Default none.
  TORCH_ARG(std::function<void(int64_t)>, after_batch) = nullptr;
};

/// What try_submit did with a request.
enum class Admission {
  kAccepted,   ///< queued: its callback will be called exactly once
  kQueueFull,  ///< refused at once: max_queue_size requests are waiting (never blocks)
  kShutdown,   ///< refused: shutdown() has been called
};

/// "accepted", "queue_full", "shutdown".
const char* to_string(Admission admission);

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

/// Where the requests that ran spent their time, mean microseconds per request
/// since the batcher started. The stages follow each other: queue + handoff +
/// collate + model + split + answer is the mean of submit() to the answer.
struct BatcherBreakdown {
  int64_t requests = 0;   ///< requests counted (those that reached the model)
  double queue_us = 0;    ///< submit() to its batch being taken from the queue
  double handoff_us = 0;  ///< batch taken to the batch function called (inputs moved out)
  /// The batch's inputs merged into one (stack_batches / pad_batches; 0 for a batch function of
  /// your own, whose whole time counts as model_us).
  double collate_us = 0;
  double model_us = 0;  ///< the model call(s)
  double split_us = 0;  ///< the output cut into the requests' results
  /// The batch function's end to this request's answer being delivered (future set, callback
  /// returned): the requests of a batch are answered one after the other.
  double answer_us = 0;
};

struct BatcherStats {
  static constexpr size_t kLatencyWindow = 65536;
  int64_t requests_submitted = 0;  ///< every submit() and try_submit() call
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
  BatcherBreakdown breakdown;
};

namespace detail {

/// One queued request, type-erased so the queue and workers live in batcher.cpp.
struct BatcherJob {
  virtual ~BatcherJob() = default;
  virtual void fail(std::exception_ptr error) = 0;  // answer with an error
  virtual void complete() = 0;                      // answer with the result stored by run
  std::chrono::steady_clock::time_point enqueued;
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

using BatcherJobs = std::vector<std::unique_ptr<BatcherJob>>;

/// Where stack_batches / pad_batches report the stages of a batch they run;
/// the worker reads it after the batch function returns. Null outside a worker.
struct BatchStages {
  int64_t collate_ns = 0, model_ns = 0, split_ns = 0;
  bool reported = false;
};
BatchStages* current_batch_stages();

/// Queue, worker threads, deadlines, shutdown and stats. `run` stores each
/// job's result (complete() sends it) or throws, which fails the whole batch.
class BatcherCore {
 public:
  BatcherCore(BatcherOptions options, std::function<void(BatcherJobs&)> run);
  ~BatcherCore();
  BatcherCore(const BatcherCore&) = delete;
  BatcherCore& operator=(const BatcherCore&) = delete;

  /// Queues the job or answers it with BatcherError (queue full, shut down);
  /// kBlock waits for room first.
  void submit(std::unique_ptr<BatcherJob> job);
  /// Whether try_submit would refuse now, without locking: the cheap early
  /// refusal (kAccepted when there may be room).
  Admission admission_hint();
  /// Queues the job (never waits) or refuses it; a refused job is not answered.
  Admission try_submit(std::unique_ptr<BatcherJob>& job);
  void shutdown();
  BatcherStats stats() const;
  const BatcherOptions& options() const { return options_; }

 private:
  struct State;
  void worker_loop();
  void after_batch(int64_t answered) noexcept;
  size_t fill_target() const;  // the queue length an idle worker waits for
  Admission enqueue_locked(std::unique_ptr<BatcherJob>& job, std::unique_lock<std::mutex>& lock);
  BatcherOptions options_;
  std::function<void(BatcherJobs&)> run_;
  std::unique_ptr<State> state_;
  std::vector<std::thread> workers_;
  std::once_flag joined_;
};

}  // namespace detail

/// A request's answer as try_submit's callback receives it: the result, or the
/// error (the model's exception, BatcherError kDeadlineExceeded or kCancelled).
template <class Out>
class BatcherAnswer {
 public:
  explicit BatcherAnswer(Out value) : value_(std::move(value)) {}
  explicit BatcherAnswer(std::exception_ptr error) : error_(std::move(error)) {}

  bool ok() const noexcept { return error_ == nullptr; }
  /// The result; rethrows the error when there is none.
  Out& value() & {
    if (error_) std::rethrow_exception(error_);
    return *value_;
  }
  Out&& value() && {
    if (error_) std::rethrow_exception(error_);
    return std::move(*value_);
  }
  /// The error, or null.
  const std::exception_ptr& error() const noexcept { return error_; }

 private:
  std::optional<Out> value_;
  std::exception_ptr error_;
};

/// Batches requests of type In into calls of `batch_fn`, which turns the
/// batch's inputs (in queue order) into exactly as many outputs, same order.
/// Collation and splitting live in batch_fn: stack_batches / pad_batches make
/// one for tensors; write your own for other types.
template <class In, class Out>
class DynamicBatcher {
 public:
  using BatchFn = std::function<std::vector<Out>(std::vector<In>&&)>;
  /// Receives a try_submit request's answer, exactly once, on a worker thread
  /// (or on the thread that calls shutdown() for a cancelled request). It may
  /// submit again; it should not block, since the batch's other requests wait
  /// for it. An exception it throws is caught and dropped.
  using Callback = std::function<void(BatcherAnswer<Out>)>;

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

  /// Queues `input` and returns kAccepted, after which `on_answer` is called
  /// exactly once with the result or the error; or refuses it at once and
  /// returns kQueueFull / kShutdown, leaving `input` and `on_answer` untouched
  /// (neither moved from nor called). Never blocks, never throws for a
  /// refusal, and allocates nothing for one: the admission path for overload.
  /// Uses options().request_timeout as the deadline (none when 0).
  [[nodiscard]] Admission try_submit(In&& input, Callback&& on_answer) {
    return try_submit_impl(std::move(input), std::move(on_answer), std::nullopt);
  }

  /// try_submit with an absolute deadline (overrides request_timeout).
  [[nodiscard]] Admission try_submit(In&& input, Callback&& on_answer,
                                     std::chrono::steady_clock::time_point deadline) {
    return try_submit_impl(std::move(input), std::move(on_answer), deadline);
  }

  /// Stops intake (later submits are answered with BatcherError(kShutdown),
  /// later try_submits refused with kShutdown), drains or cancels the queue per
  /// shutdown_policy, and joins the workers. Idempotent. Called from inside the
  /// batch function or a callback it only stops intake (and cancels per
  /// policy); the destructor then joins.
  void shutdown() { core_.shutdown(); }

  BatcherStats stats() const { return core_.stats(); }
  const BatcherOptions& options() const { return core_.options(); }

 private:
  struct Job : detail::BatcherJob {
    In input;
    std::optional<Out> output;
  };
  struct FutureJob final : Job {
    std::promise<Out> promise;
    void fail(std::exception_ptr error) override { promise.set_exception(std::move(error)); }
    void complete() override { promise.set_value(std::move(*this->output)); }
  };
  struct CallbackJob final : Job {
    Callback callback;
    void fail(std::exception_ptr error) override { deliver(BatcherAnswer<Out>(std::move(error))); }
    void complete() override { deliver(BatcherAnswer<Out>(std::move(*this->output))); }
    void deliver(BatcherAnswer<Out>&& answer) noexcept {
      try {
        callback(std::move(answer));
      } catch (...) {
        // The callback's own failure; the batch's other requests still get theirs.
      }
    }
  };

  std::future<Out> submit_impl(In input,
                               std::optional<std::chrono::steady_clock::time_point> deadline) {
    auto job = std::make_unique<FutureJob>();
    job->input = std::move(input);
    job->deadline = deadline;
    auto future = job->promise.get_future();
    core_.submit(std::move(job));
    return future;
  }

  Admission try_submit_impl(In&& input, Callback&& on_answer,
                            std::optional<std::chrono::steady_clock::time_point> deadline) {
    const Admission early = core_.admission_hint();
    if (early != Admission::kAccepted) return early;  // nothing built, nothing moved
    auto job = std::make_unique<CallbackJob>();
    job->input = std::move(input);
    job->callback = std::move(on_answer);
    job->deadline = deadline;
    std::unique_ptr<detail::BatcherJob> base(std::move(job));
    const Admission a = core_.try_submit(base);
    if (a != Admission::kAccepted) {  // lost a race for the last room: hand both back
      auto& back = static_cast<CallbackJob&>(*base);
      input = std::move(back.input);
      on_answer = std::move(back.callback);
    }
    return a;
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
