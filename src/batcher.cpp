#include "wick/batcher.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <deque>

namespace wick {
namespace detail {
namespace {

using Clock = std::chrono::steady_clock;

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

  mutable std::mutex stats_mutex;
  BatcherStats stats;
  LatencyWindow queue_wait, end_to_end;
};

BatcherCore::BatcherCore(BatcherOptions options, std::function<void(BatcherJobs&)> run)
    : options_(std::move(options)), run_(std::move(run)), state_(std::make_unique<State>()) {
  TORCH_CHECK(options_.max_batch_size() >= 1, "DynamicBatcher: max_batch_size must be >= 1, got ",
              options_.max_batch_size());
  TORCH_CHECK(options_.max_delay().count() >= 0, "DynamicBatcher: max_delay must be >= 0 us, got ",
              options_.max_delay().count());
  TORCH_CHECK(options_.max_queue_size() >= 1, "DynamicBatcher: max_queue_size must be >= 1, got ",
              options_.max_queue_size());
  TORCH_CHECK(options_.block_timeout().count() >= 0,
              "DynamicBatcher: block_timeout must be >= 0 us, got ",
              options_.block_timeout().count());
  TORCH_CHECK(options_.request_timeout().count() >= 0,
              "DynamicBatcher: request_timeout must be >= 0 us (0 = none), got ",
              options_.request_timeout().count());
  TORCH_CHECK(options_.num_workers() >= 1, "DynamicBatcher: num_workers must be >= 1, got ",
              options_.num_workers());
  TORCH_CHECK(run_, "DynamicBatcher: the batch function must not be empty");
  state_->stats.batch_size_histogram.assign(static_cast<size_t>(options_.max_batch_size()) + 1, 0);
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

void BatcherCore::submit(std::unique_ptr<BatcherJob> job) {
  auto& s = *state_;
  const auto now = Clock::now();
  job->enqueued = now;
  if (!job->deadline && options_.request_timeout().count() > 0)
    job->deadline = now + options_.request_timeout();
  {
    std::lock_guard<std::mutex> g(s.stats_mutex);
    ++s.stats.requests_submitted;
  }
  std::unique_lock<std::mutex> lock(s.mutex);
  const auto max_queue = static_cast<size_t>(options_.max_queue_size());
  if (!s.stopping && s.queue.size() >= max_queue &&
      options_.queue_full_policy() == QueueFullPolicy::kBlock) {
    s.room_cv.wait_for(lock, options_.block_timeout(),
                       [&] { return s.stopping || s.queue.size() < max_queue; });
  }
  std::exception_ptr refused;
  if (s.stopping) {
    refused = batcher_error(BatcherError::Kind::kShutdown,
                            "DynamicBatcher: shut down, request not accepted");
  } else if (s.queue.size() >= max_queue) {
    refused = batcher_error(BatcherError::Kind::kQueueFull,
                            "DynamicBatcher: queue full (max_queue_size " +
                                std::to_string(max_queue) + "), request rejected");
  }
  if (refused) {
    lock.unlock();
    {
      std::lock_guard<std::mutex> g(s.stats_mutex);
      ++s.stats.requests_rejected;
    }
    job->fail(refused);
    return;
  }
  s.queue.push_back(std::move(job));
  const size_t size = s.queue.size();
  lock.unlock();
  // Workers wait either for a first request or for a full batch.
  if (size == 1 || size >= static_cast<size_t>(options_.max_batch_size())) s.work_cv.notify_all();
}

void BatcherCore::worker_loop() {
  auto& s = *state_;
  const auto max_batch = static_cast<size_t>(options_.max_batch_size());
  for (;;) {
    BatcherJobs batch, expired;
    {
      std::unique_lock<std::mutex> lock(s.mutex);
      for (;;) {
        if (s.queue.empty()) {
          if (s.stopping) return;
          s.work_cv.wait(lock);
          continue;
        }
        const auto due = s.queue.front()->enqueued + options_.max_delay();
        if (!s.stopping && s.queue.size() < max_batch && Clock::now() < due) {
          s.work_cv.wait_until(lock, due);
          continue;
        }
        break;
      }
      const auto now = Clock::now();
      while (!s.queue.empty() && batch.size() < max_batch) {
        auto job = std::move(s.queue.front());
        s.queue.pop_front();
        if (job->deadline && *job->deadline <= now) {
          expired.push_back(std::move(job));
        } else {
          batch.push_back(std::move(job));
        }
      }
      const bool more = !s.queue.empty();
      lock.unlock();
      s.room_cv.notify_all();
      if (more) s.work_cv.notify_all();
    }
    const auto taken = Clock::now();
    if (!expired.empty()) {
      {
        std::lock_guard<std::mutex> g(s.stats_mutex);
        s.stats.requests_expired += static_cast<int64_t>(expired.size());
      }
      auto error = batcher_error(BatcherError::Kind::kDeadlineExceeded,
                                 "DynamicBatcher: deadline exceeded before the request was run");
      for (auto& j : expired) j->fail(error);
    }
    if (batch.empty()) continue;

    std::exception_ptr error;
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
    const auto done = Clock::now();
    {
      std::lock_guard<std::mutex> g(s.stats_mutex);
      auto& st = s.stats;
      ++st.batches_run;
      ++st.batch_size_histogram[batch.size()];
      (error ? st.requests_failed : st.requests_succeeded) += static_cast<int64_t>(batch.size());
      for (auto& j : batch) {
        s.queue_wait.add(micros(taken - j->enqueued));
        s.end_to_end.add(micros(done - j->enqueued));
      }
    }
    for (auto& j : batch) {
      if (error) {
        j->fail(error);
      } else {
        j->complete();
      }
    }
  }
}

void BatcherCore::shutdown() {
  auto& s = *state_;
  std::deque<std::unique_ptr<BatcherJob>> cancelled;
  {
    std::lock_guard<std::mutex> g(s.mutex);
    s.stopping = true;
    if (options_.shutdown_policy() == ShutdownPolicy::kCancel) cancelled.swap(s.queue);
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
  int64_t requests = 0;
  for (size_t n = 0; n < out.batch_size_histogram.size(); ++n) {
    requests += static_cast<int64_t>(n) * out.batch_size_histogram[n];
  }
  out.mean_batch_size = out.batches_run > 0
                            ? static_cast<double>(requests) / static_cast<double>(out.batches_run)
                            : 0;
  out.queue_wait = s.queue_wait.summary();
  out.end_to_end = s.end_to_end.summary();
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

TensorBatcher::BatchFn stack_batches(std::function<torch::Tensor(const torch::Tensor&)> model) {
  TORCH_CHECK(model, "stack_batches: the model must not be empty");
  return [model = std::move(model)](std::vector<torch::Tensor>&& xs) {
    std::vector<torch::Tensor> results(xs.size());
    auto groups = group_by(xs, [](const torch::Tensor& x) {
      return std::make_pair(x.sizes().vec(), x.scalar_type());
    });
    for (const auto& g : groups) {
      std::vector<torch::Tensor> members;
      members.reserve(g.size());
      for (size_t i : g) members.push_back(xs[i]);
      torch::Tensor out = model(torch::stack(members));
      check_rows(out, g.size(), "stack_batches");
      for (size_t k = 0; k < g.size(); ++k) results[g[k]] = out[static_cast<int64_t>(k)];
    }
    return results;
  };
}

TensorBatcher::BatchFn pad_batches(std::function<torch::Tensor(const PaddedBatch&)> model,
                                   bool unpad_outputs, double pad_value) {
  TORCH_CHECK(model, "pad_batches: the model must not be empty");
  return [model = std::move(model), unpad_outputs, pad_value](std::vector<torch::Tensor>&& xs) {
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
      torch::Tensor out = model(batch);
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
    }
    return results;
  };
}

}  // namespace wick
