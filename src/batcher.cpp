#include "wick/batcher.h"

#include <ATen/Parallel.h>
#include <c10/core/TensorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <thread>
#include <typeinfo>

#ifdef __linux__
#include <pthread.h>
#endif

namespace wick {

const char* to_string(Admission admission) {
  switch (admission) {
    case Admission::kAccepted:
      return "accepted";
    case Admission::kQueueFull:
      return "queue_full";
    case Admission::kShutdown:
      return "shutdown";
  }
  return "?";
}

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

namespace detail {
namespace {

std::exception_ptr batcher_error(BatcherError::Kind kind, const std::string& what) {
  return std::make_exception_ptr(BatcherError(kind, what));
}

double micros(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

// The most recent kLatencyWindow samples, overwritten in a ring.
struct LatencyWindow {
  std::vector<double> samples;
  size_t next = 0;
  int64_t count = 0;
  void add(double us) {
    if (samples.size() < BatcherStats::kLatencyWindow) {
      samples.push_back(us);
    } else {
      samples[next] = us;
      next = (next + 1) % BatcherStats::kLatencyWindow;
    }
    ++count;
  }
  LatencySummary summary() const {
    LatencySummary s;
    s.count = count;
    if (samples.empty()) return s;
    std::vector<double> sorted = samples;
    std::sort(sorted.begin(), sorted.end());
    // Nearest rank: the smallest sample with at least q of the samples at or below it.
    auto at = [&](double q) {
      size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
      return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
    };
    s.p50_us = at(0.50);
    s.p95_us = at(0.95);
    s.p99_us = at(0.99);
    s.max_us = sorted.back();
    return s;
  }
};

}  // namespace

struct BatcherCore::State {
  std::mutex mutex;
  std::condition_variable work_cv;  // workers: queue changed or stopping
  std::condition_variable room_cv;  // blocked submitters: room freed or stopping
  std::deque<std::unique_ptr<BatcherJob>> queue;
  bool stopping = false;
  // Mirrors of `queue.size()` and `stopping`, written under `mutex`, read
  // without it by try_submit's early refusal: under overload most requests
  // are refused there, so they never contend for the lock.
  std::atomic<int64_t> queued{0};
  std::atomic<bool> stopping_hint{false};
  std::atomic<int64_t> submitted{0}, rejected{0};
  // Made once: a refused submit() shares it rather than building its message
  // and exception anew (the future's get() still throws a BatcherError).
  std::exception_ptr queue_full_error, shutdown_error;

  mutable std::mutex stats_mutex;
  BatcherStats stats;
  LatencyWindow queue_wait, end_to_end;
  // Sums behind BatcherStats::breakdown, in nanoseconds over `stage_requests`.
  int64_t stage_requests = 0, answered_requests = 0;
  double queue_ns = 0, handoff_ns = 0, collate_ns = 0, model_ns = 0, split_ns = 0, answer_ns = 0;
};

namespace {

thread_local BatchStages* t_batch_stages = nullptr;

double nanos(Clock::duration d) { return std::chrono::duration<double, std::nano>(d).count(); }

}  // namespace

BatchStages* current_batch_stages() { return t_batch_stages; }

BatcherCore::BatcherCore(BatcherOptions options, std::function<void(BatcherJobs&)> run)
    : options_(std::move(options)), run_(std::move(run)), state_(std::make_unique<State>()) {
  TORCH_CHECK(options_.max_batch_size() >= 1, "DynamicBatcher: max_batch_size must be >= 1, got ",
              options_.max_batch_size());
  TORCH_CHECK(options_.max_delay().count() >= 0, "DynamicBatcher: max_delay must be >= 0 us, got ",
              options_.max_delay().count());
  TORCH_CHECK(options_.max_queue_size() >= 1, "DynamicBatcher: max_queue_size must be >= 1, got ",
              options_.max_queue_size());
  TORCH_CHECK(options_.idle_spin().count() >= 0, "DynamicBatcher: idle_spin must be >= 0 us, got ",
              options_.idle_spin().count());
  TORCH_CHECK(options_.block_timeout().count() >= 0,
              "DynamicBatcher: block_timeout must be >= 0 us, got ",
              options_.block_timeout().count());
  TORCH_CHECK(options_.request_timeout().count() >= 0,
              "DynamicBatcher: request_timeout must be >= 0 us (0 = none), got ",
              options_.request_timeout().count());
  TORCH_CHECK(options_.num_workers() >= 1, "DynamicBatcher: num_workers must be >= 1, got ",
              options_.num_workers());
  TORCH_CHECK(options_.preferred_batch_size() >= 0 &&
                  options_.preferred_batch_size() <= options_.max_batch_size(),
              "DynamicBatcher: preferred_batch_size must be in [0, max_batch_size = ",
              options_.max_batch_size(), "], got ", options_.preferred_batch_size());
  TORCH_CHECK(run_, "DynamicBatcher: the batch function must not be empty");
  state_->stats.batch_size_histogram.assign(static_cast<size_t>(options_.max_batch_size()) + 1, 0);
  state_->queue_full_error =
      batcher_error(BatcherError::Kind::kQueueFull, "DynamicBatcher: queue full (max_queue_size " +
                                                        std::to_string(options_.max_queue_size()) +
                                                        "), request rejected");
  state_->shutdown_error = batcher_error(BatcherError::Kind::kShutdown,
                                         "DynamicBatcher: shut down, request not accepted");
  workers_.reserve(static_cast<size_t>(options_.num_workers()));
  try {
    for (int64_t i = 0; i < options_.num_workers(); ++i)
      workers_.emplace_back([this] { worker_loop(); });
  } catch (...) {
    shutdown();
    throw;
  }
}

BatcherCore::~BatcherCore() {
  try {
    shutdown();
  } catch (...) {
    // A destructor never throws; shutdown only throws if a thread cannot be joined.
  }
}

Admission BatcherCore::enqueue_locked(std::unique_ptr<BatcherJob>& job,
                                      std::unique_lock<std::mutex>& lock) {
  auto& s = *state_;
  if (s.stopping) return Admission::kShutdown;
  if (s.queue.size() >= static_cast<size_t>(options_.max_queue_size()))
    return Admission::kQueueFull;
  s.queue.push_back(std::move(job));
  const size_t size = s.queue.size();
  s.queued.store(static_cast<int64_t>(size), std::memory_order_relaxed);
  lock.unlock();
  // Workers wait either for a first request or for a (preferred) batch.
  if (size == 1 || size >= fill_target()) s.work_cv.notify_all();
  return Admission::kAccepted;
}

void BatcherCore::submit(std::unique_ptr<BatcherJob> job) {
  auto& s = *state_;
  const auto now = Clock::now();
  job->enqueued = now;
  if (!job->deadline && options_.request_timeout().count() > 0)
    job->deadline = now + options_.request_timeout();
  s.submitted.fetch_add(1, std::memory_order_relaxed);
  std::unique_lock<std::mutex> lock(s.mutex);
  const auto max_queue = static_cast<size_t>(options_.max_queue_size());
  if (!s.stopping && s.queue.size() >= max_queue &&
      options_.queue_full_policy() == QueueFullPolicy::kBlock) {
    s.room_cv.wait_for(lock, options_.block_timeout(),
                       [&] { return s.stopping || s.queue.size() < max_queue; });
  }
  const Admission a = enqueue_locked(job, lock);
  if (a == Admission::kAccepted) return;
  lock.unlock();
  s.rejected.fetch_add(1, std::memory_order_relaxed);
  job->fail(a == Admission::kShutdown ? s.shutdown_error : s.queue_full_error);
}

Admission BatcherCore::admission_hint() {
  auto& s = *state_;
  Admission a = Admission::kAccepted;
  if (s.stopping_hint.load(std::memory_order_acquire)) {
    a = Admission::kShutdown;
  } else if (s.queued.load(std::memory_order_relaxed) >= options_.max_queue_size()) {
    a = Admission::kQueueFull;
  }
  if (a != Admission::kAccepted) {
    s.submitted.fetch_add(1, std::memory_order_relaxed);
    s.rejected.fetch_add(1, std::memory_order_relaxed);
  }
  return a;
}

Admission BatcherCore::try_submit(std::unique_ptr<BatcherJob>& job) {
  auto& s = *state_;
  const auto now = Clock::now();
  job->enqueued = now;
  if (!job->deadline && options_.request_timeout().count() > 0)
    job->deadline = now + options_.request_timeout();
  s.submitted.fetch_add(1, std::memory_order_relaxed);
  std::unique_lock<std::mutex> lock(s.mutex);
  const Admission a = enqueue_locked(job, lock);
  if (a != Admission::kAccepted) s.rejected.fetch_add(1, std::memory_order_relaxed);
  return a;
}

size_t BatcherCore::fill_target() const {
  const int64_t preferred = options_.preferred_batch_size();
  return static_cast<size_t>(preferred > 0 ? preferred : options_.max_batch_size());
}

void BatcherCore::worker_loop() {
#ifdef __linux__
  // Named for top -H, perf, gdb and /proc/<pid>/task/*/comm (wick-bench reads
  // the workers' scheduler statistics through it).
  pthread_setname_np(pthread_self(), "wick-batcher");
#endif
  // Torch's intra-op thread count, as ATen's own threads take it: OpenMP's
  // team size is per thread, so MKL and oneDNN called from this thread would
  // otherwise use every core, whatever torch::set_num_threads said.
  at::init_num_threads();
  auto& s = *state_;
  const auto max_batch = static_cast<size_t>(options_.max_batch_size());
  const size_t target = fill_target();
  BatcherJobs batch, expired;
  batch.reserve(max_batch);
  bool busy = false;  // this worker has just run a batch, and no idle wait came since
  // Polls the queue's size, without its lock, until `enough` of it, shutdown,
  // or `until`; yields the core on each look (idle_spin).
  auto poll = [&s](size_t enough, Clock::time_point until) {
    while (static_cast<size_t>(s.queued.load(std::memory_order_relaxed)) < enough &&
           !s.stopping_hint.load(std::memory_order_relaxed) && Clock::now() < until) {
      std::this_thread::yield();
    }
  };
  const auto spin = options_.idle_spin();
  for (;;) {
    bool polled_empty = false;  // once per idle spell; then the worker sleeps
    batch.clear();
    expired.clear();
    Clock::time_point taken;
    {
      std::unique_lock<std::mutex> lock(s.mutex);
      size_t take = max_batch;
      for (;;) {
        if (s.queue.empty()) {
          if (s.stopping) return;
          busy = false;
          if (spin.count() > 0 && !polled_empty) {
            polled_empty = true;
            lock.unlock();
            poll(1, Clock::now() + spin);
            lock.lock();
            continue;
          }
          s.work_cv.wait(lock);
          continue;
        }
        // Back from a batch with requests waiting: they run now (run_waiting_when_busy).
        if (busy && options_.run_waiting_when_busy()) break;
        const auto due = s.queue.front()->enqueued + options_.max_delay();
        if (!s.stopping && Clock::now() < due) {
          if (s.queue.size() < target) {
            if (spin.count() > 0) {
              lock.unlock();
              poll(target, std::min(due, Clock::now() + spin));
              lock.lock();
              if (s.stopping || s.queue.size() >= target || Clock::now() >= due) continue;
            }
            s.work_cv.wait_until(lock, due);
            continue;
          }
          // The preferred batch is there before the delay ran out: run just it,
          // and leave whoever came meanwhile to the next batch.
          take = target;
        }
        break;
      }
      taken = Clock::now();
      // Requests past their deadline leave the queue without taking a place
      // in the batch.
      while (!s.queue.empty() && batch.size() < take) {
        auto job = std::move(s.queue.front());
        s.queue.pop_front();
        if (job->deadline && *job->deadline <= taken) {
          expired.push_back(std::move(job));
        } else {
          batch.push_back(std::move(job));
        }
      }
      s.queued.store(static_cast<int64_t>(s.queue.size()), std::memory_order_relaxed);
      const bool more = !s.queue.empty();
      lock.unlock();
      if (options_.queue_full_policy() == QueueFullPolicy::kBlock) s.room_cv.notify_all();
      if (more) s.work_cv.notify_all();
    }
    if (!expired.empty()) {
      {
        std::lock_guard<std::mutex> g(s.stats_mutex);
        s.stats.requests_expired += static_cast<int64_t>(expired.size());
      }
      auto error = batcher_error(BatcherError::Kind::kDeadlineExceeded,
                                 "DynamicBatcher: deadline exceeded before the request was run");
      for (auto& j : expired) j->fail(error);
    }
    if (batch.empty()) {
      if (!expired.empty() && options_.after_batch())
        after_batch(static_cast<int64_t>(expired.size()));
      continue;
    }

    busy = true;
    BatchStages stages;
    std::exception_ptr error;
    const auto started = Clock::now();
    t_batch_stages = &stages;
    try {
      if (options_.inference_mode()) {
        c10::InferenceMode guard;
        run_(batch);
      } else {
        run_(batch);
      }
    } catch (...) {
      error = std::current_exception();
    }
    t_batch_stages = nullptr;
    const auto done = Clock::now();
    const auto n = static_cast<double>(batch.size());
    {
      std::lock_guard<std::mutex> g(s.stats_mutex);
      auto& st = s.stats;
      ++st.batches_run;
      ++st.batch_size_histogram[batch.size()];
      (error ? st.requests_failed : st.requests_succeeded) += static_cast<int64_t>(batch.size());
      for (auto& j : batch) {
        s.queue_wait.add(micros(taken - j->enqueued));
        s.end_to_end.add(micros(done - j->enqueued));
        s.queue_ns += nanos(taken - j->enqueued);
      }
      s.stage_requests += static_cast<int64_t>(batch.size());
      s.handoff_ns += n * nanos(started - taken);
      const double batch_ns = nanos(done - started);
      if (stages.reported) {
        const double other =
            batch_ns - static_cast<double>(stages.collate_ns + stages.model_ns + stages.split_ns);
        s.collate_ns += n * static_cast<double>(stages.collate_ns);
        s.model_ns += n * (static_cast<double>(stages.model_ns) + std::max(0.0, other));
        s.split_ns += n * static_cast<double>(stages.split_ns);
      } else {
        s.model_ns += n * batch_ns;
      }
    }
    double answer_ns = 0;
    for (auto& j : batch) {
      if (error) {
        j->fail(error);
      } else {
        j->complete();
      }
      answer_ns += nanos(Clock::now() - done);
    }
    if (options_.after_batch()) after_batch(static_cast<int64_t>(batch.size() + expired.size()));
    {
      std::lock_guard<std::mutex> g(s.stats_mutex);
      s.answer_ns += answer_ns;
      s.answered_requests += static_cast<int64_t>(batch.size());
    }
  }
}

void BatcherCore::after_batch(int64_t answered) noexcept {
  try {
    options_.after_batch()(answered);
  } catch (...) {
    // Documented as must-not-throw; a throwing hook must not end the worker.
  }
}

void BatcherCore::shutdown() {
  auto& s = *state_;
  std::deque<std::unique_ptr<BatcherJob>> cancelled;
  {
    std::lock_guard<std::mutex> g(s.mutex);
    s.stopping = true;
    s.stopping_hint.store(true, std::memory_order_release);
    if (options_.shutdown_policy() == ShutdownPolicy::kCancel) {
      cancelled.swap(s.queue);
      s.queued.store(0, std::memory_order_relaxed);
    }
  }
  s.work_cv.notify_all();
  s.room_cv.notify_all();
  if (!cancelled.empty()) {
    {
      std::lock_guard<std::mutex> g(s.stats_mutex);
      s.stats.requests_cancelled += static_cast<int64_t>(cancelled.size());
    }
    auto error =
        batcher_error(BatcherError::Kind::kCancelled, "DynamicBatcher: cancelled by shutdown");
    for (auto& j : cancelled) j->fail(error);
  }
  // From inside the batch function a worker cannot join itself: intake is
  // stopped above, and the destructor joins later.
  const auto self = std::this_thread::get_id();
  for (const auto& t : workers_) {
    if (t.get_id() == self) return;
  }
  std::call_once(joined_, [&] {
    for (auto& t : workers_) {
      if (t.joinable()) t.join();
    }
  });
}

BatcherStats BatcherCore::stats() const {
  auto& s = *state_;
  std::lock_guard<std::mutex> g(s.stats_mutex);
  BatcherStats out = s.stats;
  out.requests_submitted = s.submitted.load(std::memory_order_relaxed);
  out.requests_rejected = s.rejected.load(std::memory_order_relaxed);
  int64_t requests = 0;
  for (size_t n = 0; n < out.batch_size_histogram.size(); ++n) {
    requests += static_cast<int64_t>(n) * out.batch_size_histogram[n];
  }
  out.mean_batch_size = out.batches_run > 0
                            ? static_cast<double>(requests) / static_cast<double>(out.batches_run)
                            : 0;
  out.queue_wait = s.queue_wait.summary();
  out.end_to_end = s.end_to_end.summary();
  auto& b = out.breakdown;
  b.requests = s.stage_requests;
  if (s.stage_requests > 0) {
    const double per = 1e-3 / static_cast<double>(s.stage_requests);
    b.queue_us = s.queue_ns * per;
    b.handoff_us = s.handoff_ns * per;
    b.collate_us = s.collate_ns * per;
    b.model_us = s.model_ns * per;
    b.split_us = s.split_ns * per;
  }
  if (s.answered_requests > 0)
    b.answer_us = s.answer_ns * 1e-3 / static_cast<double>(s.answered_requests);
  return out;
}

}  // namespace detail

namespace {

// Request indices grouped by a key, groups in order of first appearance.
template <class Key>
std::vector<std::vector<size_t>> group_by(const std::vector<torch::Tensor>& xs, Key key) {
  std::vector<decltype(key(xs[0]))> keys;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < xs.size(); ++i) {
    auto k = key(xs[i]);
    auto it = std::find(keys.begin(), keys.end(), k);
    if (it == keys.end()) {
      keys.push_back(std::move(k));
      groups.push_back({i});
    } else {
      groups[static_cast<size_t>(it - keys.begin())].push_back(i);
    }
  }
  return groups;
}

void check_rows(const torch::Tensor& out, size_t n, const char* fn) {
  TORCH_CHECK(out.defined() && out.dim() >= 1 && out.size(0) == static_cast<int64_t>(n),
              "DynamicBatcher ", fn, ": the model must return [B, ...] with B = ", n,
              " (the batch's requests), got ", out.defined() ? out.sizes() : c10::IntArrayRef{});
}

}  // namespace

namespace {

int64_t elapsed_ns(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(to - from).count();
}

bool same_kind(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.device() == b.device();
}

// [B, ...] from requests of one shape, dtype and device. On the CPU the rows
// are copied straight into one fresh tensor (torch::stack costs an unsqueeze
// and a dispatch per request); elsewhere torch::stack.
torch::Tensor collate(const std::vector<torch::Tensor>& xs, const std::vector<size_t>* members) {
  const size_t b = members ? members->size() : xs.size();
  const auto& first = xs[members ? (*members)[0] : 0];
  auto at = [&](size_t k) -> const torch::Tensor& { return xs[members ? (*members)[k] : k]; };
  if (first.device().is_cpu() && !first.is_quantized() && first.layout() == torch::kStrided) {
    std::vector<int64_t> shape{static_cast<int64_t>(b)};
    shape.insert(shape.end(), first.sizes().begin(), first.sizes().end());
    torch::Tensor out = torch::empty(shape, first.options());
    const size_t row_bytes = static_cast<size_t>(first.numel()) * first.element_size();
    auto* dst = static_cast<char*>(out.data_ptr());
    for (size_t k = 0; k < b; ++k) {
      const auto& x = at(k);
      if (x.is_contiguous()) {
        if (row_bytes > 0) std::memcpy(dst + k * row_bytes, x.data_ptr(), row_bytes);
      } else {
        out[static_cast<int64_t>(k)].copy_(x);
      }
    }
    return out;
  }
  std::vector<torch::Tensor> rows;
  rows.reserve(b);
  for (size_t k = 0; k < b; ++k) rows.push_back(at(k));
  return torch::stack(rows);
}

// The rows of `out`, one tensor per request. Under InferenceMode each row is
// made directly, a plain TensorImpl over out's storage at the row's offset:
// unbind dispatches a select per row (measured: 22 us for 64 rows against
// 6 us, a fifth of the MLP's per-batch batcher cost). An inference tensor's
// views carry no autograd or version-counter state, so the rows are the same
// tensors unbind would give. Anything else (autograd on, a tensor subclass,
// quantized, sparse, conjugate, negative or zero tensors) goes through unbind.
std::vector<torch::Tensor> split_rows(const torch::Tensor& out) {
  const c10::TensorImpl* impl = out.unsafeGetTensorImpl();
  const bool plain = c10::InferenceMode::is_enabled() && out.is_inference() &&
                     typeid(*impl) == typeid(c10::TensorImpl) && out.layout() == torch::kStrided &&
                     !out.is_quantized() && !out.is_conj() && !out.is_neg() &&
                     !out._is_zerotensor() && out.has_storage();
  if (!plain) return out.unbind(0);
  const auto sizes = out.sizes().slice(1);
  const auto strides = out.strides().slice(1);
  const int64_t rows = out.size(0), step = out.stride(0), offset = out.storage_offset();
  std::vector<torch::Tensor> result;
  result.reserve(static_cast<size_t>(rows));
  for (int64_t k = 0; k < rows; ++k) {
    auto row = c10::make_intrusive<c10::TensorImpl>(c10::Storage(out.storage()), out.key_set(),
                                                    out.dtype());
    row->set_sizes_and_strides(sizes, strides, offset + k * step);
    result.emplace_back(std::move(row));
  }
  return result;
}

}  // namespace

TensorBatcher::BatchFn stack_batches(std::function<torch::Tensor(const torch::Tensor&)> model) {
  TORCH_CHECK(model, "stack_batches: the model must not be empty");
  return [model = std::move(model)](std::vector<torch::Tensor>&& xs) {
    detail::BatchStages* stages = detail::current_batch_stages();
    std::vector<torch::Tensor> results(xs.size());
    if (xs.empty()) return results;
    // One model call per shape; the usual case, every request alike, needs no grouping.
    const bool alike = std::all_of(xs.begin() + 1, xs.end(),
                                   [&](const torch::Tensor& x) { return same_kind(x, xs[0]); });
    std::vector<std::vector<size_t>> groups;
    if (!alike) {
      groups = group_by(xs, [](const torch::Tensor& x) {
        return std::make_tuple(x.sizes().vec(), x.scalar_type(), x.device());
      });
    }
    const size_t calls = alike ? 1 : groups.size();
    for (size_t g = 0; g < calls; ++g) {
      const std::vector<size_t>* members = alike ? nullptr : &groups[g];
      const size_t b = alike ? xs.size() : members->size();
      const auto t0 = Clock::now();
      torch::Tensor batch = collate(xs, members);
      const auto t1 = Clock::now();
      torch::Tensor out = model(batch);
      const auto t2 = Clock::now();
      check_rows(out, b, "stack_batches");
      std::vector<torch::Tensor> rows = split_rows(out);
      for (size_t k = 0; k < b; ++k) results[alike ? k : (*members)[k]] = std::move(rows[k]);
      if (stages != nullptr) {
        const auto t3 = Clock::now();
        stages->reported = true;
        stages->collate_ns += elapsed_ns(t0, t1);
        stages->model_ns += elapsed_ns(t1, t2);
        stages->split_ns += elapsed_ns(t2, t3);
      }
    }
    return results;
  };
}

TensorBatcher::BatchFn pad_batches(std::function<torch::Tensor(const PaddedBatch&)> model,
                                   bool unpad_outputs, double pad_value) {
  TORCH_CHECK(model, "pad_batches: the model must not be empty");
  return [model = std::move(model), unpad_outputs, pad_value](std::vector<torch::Tensor>&& xs) {
    detail::BatchStages* stages = detail::current_batch_stages();
    for (const auto& x : xs) {
      TORCH_CHECK(x.dim() >= 1,
                  "pad_batches: each request must have >= 1 dims (the sequence first), got ",
                  x.dim());
    }
    std::vector<torch::Tensor> results(xs.size());
    auto groups = group_by(xs, [](const torch::Tensor& x) {
      return std::make_pair(x.sizes().slice(1).vec(), x.scalar_type());
    });
    for (const auto& g : groups) {
      const auto t0 = Clock::now();
      const auto b = static_cast<int64_t>(g.size());
      int64_t longest = 0;
      for (size_t i : g) longest = std::max(longest, xs[i].size(0));
      const auto& first = xs[g[0]];
      std::vector<int64_t> shape{b, longest};
      for (int64_t d = 1; d < first.dim(); ++d) shape.push_back(first.size(d));
      PaddedBatch batch;
      batch.data = torch::full(shape, pad_value, first.options());
      batch.mask = torch::zeros({b, longest}, first.options().dtype(torch::kBool));
      batch.lengths = torch::empty({b}, torch::TensorOptions().dtype(torch::kInt64));
      auto lengths = batch.lengths.accessor<int64_t, 1>();
      for (int64_t k = 0; k < b; ++k) {
        const auto& x = xs[g[static_cast<size_t>(k)]];
        const int64_t len = x.size(0);
        batch.data[k].narrow(0, 0, len).copy_(x);
        batch.mask[k].narrow(0, 0, len).fill_(true);
        lengths[k] = len;
      }
      batch.lengths = batch.lengths.to(first.device());
      const auto t1 = Clock::now();
      torch::Tensor out = model(batch);
      const auto t2 = Clock::now();
      check_rows(out, g.size(), "pad_batches");
      if (unpad_outputs) {
        TORCH_CHECK(out.dim() >= 2 && out.size(1) == longest,
                    "pad_batches: with unpad_outputs the model must ",
                    "return [B, T, ...] with T = ", longest, " (the longest request), got ",
                    out.sizes());
      }
      for (int64_t k = 0; k < b; ++k) {
        const auto i = g[static_cast<size_t>(k)];
        results[i] = unpad_outputs ? out[k].narrow(0, 0, xs[i].size(0)) : out[k];
      }
      if (stages != nullptr) {
        const auto t3 = Clock::now();
        stages->reported = true;
        stages->collate_ns += elapsed_ns(t0, t1);
        stages->model_ns += elapsed_ns(t1, t2);
        stages->split_ns += elapsed_ns(t2, t3);
      }
    }
    return results;
  };
}

}  // namespace wick
