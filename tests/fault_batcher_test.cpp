// Fault injection for the DynamicBatcher (issues 9 and 20): offered 10x the
// requests per second it can serve, from many client threads, it keeps memory
// bounded (its queue is bounded: max_queue_size, the excess refused at once),
// answers every request exactly once (a result or the refusal), and every
// result is its own request's. Two ways of submitting, both paced (each client
// on a fixed schedule, as independent users would):
//   submit():     a future per request, refusals as BatcherError(kQueueFull)
//                 in the future (issue 9's run);
//   try_submit(): a status per request, refusals as Admission::kQueueFull,
//                 answers in callbacks; the queue holds two batches, so the
//                 served requests keep their latency (issue 20).
//
// The capacity is measured first, in the same process and conditions: a
// closed loop of clients that always keep the batcher busy (kBlock), for 1 s.
// Then clients offer 10x that rate open-loop (each on a fixed schedule, as
// independent users would) for a few seconds (2.5 s in the normal suite; 30 s
// with WICK_SLOW_TESTS=1, which scripts/test sets), while a thread samples
// the process's RSS every 50 ms.
//
// With submit() on a 2-core machine the served rate under overload falls far
// below the capacity: building, submitting, rejecting and catching one
// request costs its client ~5 us of CPU (measured: 140-190k rejections/s for
// the whole process), so 10x a capacity of ~25k req/s is more than the cores
// can offer and serve at once; the model's worker gets what CPU is left. With
// try_submit a refusal costs tens of nanoseconds and no allocation, and the
// served rate stays near the capacity (wick-bench batcher's overload case
// measures it against the 0.8 goal; here a loose floor of 0.1 catches a
// collapse (issue 20 measured 0.014) without failing on a loaded machine). The checks are the ones
// overload must not break: memory, one answer each.

#include <wick/wick.h>

#include "support.h"

#include <malloc.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr int64_t kIn = 32, kHidden = 1024;
constexpr int kClients = 16;
constexpr auto kPace = std::chrono::microseconds(500);  // a client's shortest sleep

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

/// The small model: 30 -> 1024 -> 1024 -> 32, about 4.3 MFLOP per request.
torch::nn::Sequential make_model() {
  torch::manual_seed(7);
  return torch::nn::Sequential(torch::nn::Linear(kIn - 2, kHidden), torch::nn::ReLU(),
                               torch::nn::Linear(kHidden, kHidden), torch::nn::ReLU(),
                               torch::nn::Linear(kHidden, kIn));
}

/// Request `id`: [id, -id, 30 values that depend on id].
torch::Tensor request(int64_t id) {
  auto x = torch::empty({kIn});
  float* p = x.data_ptr<float>();
  p[0] = static_cast<float>(id);
  p[1] = -static_cast<float>(id);
  for (int64_t j = 2; j < kIn; ++j)
    p[j] = static_cast<float>(std::sin(0.37 * static_cast<double>(id) + j));
  return x;
}

/// The served model: answers [tag (2 values), model(x without the tag) (32 values)], and
/// counts how many times it saw each id (an id seen twice would be a request
/// run twice).
struct Served {
  torch::nn::Sequential model = make_model();
  std::mutex mutex;
  std::vector<uint8_t> seen;
  int64_t out_of_range = 0;

  explicit Served(size_t max_ids) : seen(max_ids, 0) { model->eval(); }

  wick::TensorBatcher::BatchFn batch_fn() {
    return wick::stack_batches([this](const torch::Tensor& x) {
      auto ids = x.select(1, 0).to(torch::kInt64);
      {
        std::lock_guard<std::mutex> g(mutex);
        auto acc = ids.accessor<int64_t, 1>();
        for (int64_t r = 0; r < acc.size(0); ++r) {
          const auto id = static_cast<size_t>(acc[r]);
          if (id < seen.size()) {
            seen[id] = static_cast<uint8_t>(std::min(255, seen[id] + 1));
          } else {
            ++out_of_range;
          }
        }
      }
      return torch::cat({x.narrow(1, 0, 2), model->forward(x.narrow(1, 2, kIn - 2))}, 1);
    });
  }
};

wick::BatcherOptions served_options() {
  // The defaults, spelled out: the queue holds at most 1024 waiting requests.
  return wick::BatcherOptions()
      .max_batch_size(32)
      .max_delay(1000us)
      .max_queue_size(1024)
      .num_workers(1);
}

/// Requests per second the batcher serves when it is never idle: kClients
/// clients each keeping 8 requests in flight (kBlock: none rejected), for
/// `seconds` after a short warm-up.
double measure_capacity(double seconds) {
  Served served(1 << 22);
  wick::TensorBatcher batcher(
      served.batch_fn(),
      served_options().queue_full_policy(wick::QueueFullPolicy::kBlock).block_timeout(10s));
  std::atomic<int64_t> next_id{0}, served_in_window{0};
  std::atomic<bool> measuring{false}, stop{false};
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&] {
      std::deque<std::future<torch::Tensor>> inflight;
      while (!stop.load()) {
        while (inflight.size() < 8)
          inflight.push_back(batcher.submit(request(next_id++ % (1 << 22))));
        inflight.front().get();
        inflight.pop_front();
        if (measuring.load()) ++served_in_window;
      }
      for (auto& f : inflight) f.get();
    });
  }
  std::this_thread::sleep_for(300ms);
  served_in_window = 0;
  measuring = true;
  const auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  const int64_t n = served_in_window.load();
  const double elapsed = seconds_since(t0);
  stop = true;
  for (auto& c : clients) c.join();
  return static_cast<double>(n) / elapsed;
}

enum class Api { kSubmit, kTrySubmit };

struct OverloadFigures {
  double capacity = 0, target = 0, offered = 0, served = 0;
  int64_t submitted = 0, succeeded = 0, rejected = 0, other_errors = 0;
  double p50_ms = 0, p99_ms = 0, queue_wait_p99_ms = 0;
  double rss_start_mb = 0, rss_peak_mb = 0, rss_end_mb = 0, rss_quarter_mb = 0;
};

/// Offers 10x the measured capacity for `seconds` and checks every answer.
void run_overload(double seconds, Api api) {
  // ctest runs this binary with MALLOC_ARENA_MAX=1 (tests/CMakeLists.txt).
  // With glibc's default (up to 8 arenas per core) the 16 client threads
  // allocate requests that the worker frees, and the arenas' fragmentation
  // grew RSS steadily (+22 MiB from a quarter to the end of a 30 s run,
  // failing the bound below); with one arena the same run stayed flat after
  // its first quarter (399 MiB throughout). That is glibc's cost, not a leak
  // of wick's: a leak of 100 bytes a request would still add hundreds of MiB.
  OverloadFigures fig;
  fig.capacity = measure_capacity(1.0);
  ASSERT_GT(fig.capacity, 0);
  fig.target = 10 * fig.capacity;

  // Every id is offered once; room for 1.5x the target (clients catch up when late, never beyond
  // schedule).
  const auto max_ids = static_cast<size_t>(1.5 * fig.target * seconds) + 1024;
  Served served(max_ids);
  std::vector<uint8_t> outcome(max_ids, 0);  // 1 result, 2 rejected (queue full), 3 any other error
  std::vector<std::pair<torch::Tensor, torch::Tensor>>
      samples[kClients];  // every 997th result, checked after
  std::atomic<int64_t> next_id{0}, wrong{0};

  // RSS every 50 ms, from just before the clients start to after the last
  // answer. Each reading follows malloc_trim(0), which returns the arena's
  // free pages to the kernel: RSS then counts live memory, not glibc's slack.
  // Without it one arena still grew RSS by 25 MiB from a quarter to the end
  // of a run (1 MiB/s, steadily) while other runs of the same binary stayed
  // flat; a leak is live memory and still shows.
  std::vector<std::pair<double, int64_t>> rss;
  std::atomic<bool> sampling{true};
  const auto t0 = Clock::now();
  std::thread sampler([&] {
    while (sampling.load()) {
      ::malloc_trim(0);
      rss.emplace_back(seconds_since(t0), wick::host_memory().rss_bytes);
      std::this_thread::sleep_for(50ms);
    }
  });

  // try_submit's answers: each callback counts itself (1 for a result, 3 for
  // an error), so a missing or second answer shows. Declared before the
  // batcher: its workers run the callbacks until shutdown() has drained.
  std::vector<std::atomic<uint8_t>> callbacks(api == Api::kTrySubmit ? max_ids : 0);
  std::mutex sample_mutex;
  std::vector<float> e2e_ms;
  // An answer is its own request's (the tag echoed); every 997th is kept to
  // be checked against the model below.
  auto check = [&](int c, int64_t id, const torch::Tensor& y) {
    if (y.size(0) != kIn + 2 || y[0].item<float>() != static_cast<float>(id) ||
        y[1].item<float>() != -static_cast<float>(id)) {
      ++wrong;
    } else if (id % 997 == 0) {
      std::lock_guard<std::mutex> g(sample_mutex);
      samples[c].emplace_back(request(id), y.narrow(0, 2, kIn));
    }
  };
  {
    // kReject; try_submit with a queue of two batches: a served request waits
    // at most for those, not for a thousand others.
    wick::TensorBatcher batcher(served.batch_fn(), api == Api::kSubmit
                                                       ? served_options()
                                                       : served_options().max_queue_size(64));
    const auto interval = std::chrono::duration<double>(kClients / fig.target);
    const auto start = Clock::now() + 20ms;
    const auto end =
        start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    std::vector<std::thread> clients;
    for (int c = 0; c < kClients; ++c) {
      clients.emplace_back([&, c] {
        std::deque<std::pair<int64_t, std::future<torch::Tensor>>> inflight;
        auto settle = [&](std::pair<int64_t, std::future<torch::Tensor>>& item) {
          const int64_t id = item.first;
          auto& slot = outcome[static_cast<size_t>(id)];
          try {
            auto y = item.second.get();
            slot = 1;
            check(c, id, y);
          } catch (const wick::BatcherError& e) {
            slot = e.kind() == wick::BatcherError::Kind::kQueueFull ? 2 : 3;
          } catch (...) {
            slot = 3;
          }
        };
        // Client c offers requests at start + (k * kClients + c) * interval, k = 0, 1, ...
        auto next = start + std::chrono::duration_cast<Clock::duration>(interval * c / kClients);
        const auto step = std::chrono::duration_cast<Clock::duration>(interval);
        // Late (a loaded machine), a client catches up at once, but never past
        // the end. It sleeps at most once per kPace: each wake-up sends the
        // arrivals due by then (at 10x capacity an arrival per client every
        // ~60 us would otherwise cost a wake-up each, and the clients' wake-ups
        // alone took the worker's CPU).
        auto woke = Clock::now();
        while (next < end && Clock::now() < end) {
          if (next > Clock::now()) {
            std::this_thread::sleep_until(std::max(next, woke + kPace));
            woke = Clock::now();
          }
          next += step;
          const int64_t id = next_id++;
          if (static_cast<size_t>(id) >= outcome.size()) break;
          if (api == Api::kTrySubmit) {
            torch::Tensor x = request(id);
            const auto sent = Clock::now();
            const auto a = batcher.try_submit(
                std::move(x), [&, c, id, sent](wick::BatcherAnswer<torch::Tensor> answer) {
                  const float ms =
                      std::chrono::duration<float, std::milli>(Clock::now() - sent).count();
                  if (answer.ok()) {
                    check(c, id, answer.value());
                    std::lock_guard<std::mutex> g(sample_mutex);
                    e2e_ms.push_back(ms);
                  }
                  callbacks[static_cast<size_t>(id)].fetch_add(answer.ok() ? 1 : 3);
                });
            // Refused: settled at once, nothing else happens to it.
            outcome[static_cast<size_t>(id)] = a == wick::Admission::kAccepted    ? 4
                                               : a == wick::Admission::kQueueFull ? 2
                                                                                  : 3;
            continue;
          }
          std::pair<int64_t, std::future<torch::Tensor>> item(id, batcher.submit(request(id)));
          // A rejection is answered before submit returns: settled at once,
          // so the client holds only what the batcher holds.
          if (item.second.wait_for(0s) == std::future_status::ready) {
            settle(item);
          } else {
            inflight.push_back(std::move(item));
          }
          // Settle what is answered, oldest first, without waiting.
          while (!inflight.empty() &&
                 inflight.front().second.wait_for(0s) == std::future_status::ready) {
            settle(inflight.front());
            inflight.pop_front();
          }
        }
        for (auto& item : inflight) settle(item);
      });
    }
    for (auto& c : clients) c.join();
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    batcher.shutdown();  // drains: every accepted request's callback has run
    auto st = batcher.stats();
    fig.submitted = std::min<int64_t>(next_id.load(), static_cast<int64_t>(max_ids));
    if (api == Api::kTrySubmit) {
      // Accepted (4): exactly one callback, which says how it was answered.
      for (size_t id = 0; id < static_cast<size_t>(fig.submitted); ++id) {
        const uint8_t n = callbacks[id].load();
        if (outcome[id] == 4) {
          outcome[id] = n == 1 ? 1 : n == 3 ? 3 : 5;  // 5: unanswered or answered twice
        } else if (n != 0) {
          outcome[id] = 5;  // refused, yet answered
        }
      }
      std::sort(e2e_ms.begin(), e2e_ms.end());
      if (!e2e_ms.empty()) {
        fig.p50_ms = e2e_ms[e2e_ms.size() / 2];
        fig.p99_ms = e2e_ms[std::min(e2e_ms.size() - 1, e2e_ms.size() * 99 / 100)];
      }
    } else {
      fig.p50_ms = st.end_to_end.p50_us / 1e3;
      fig.p99_ms = st.end_to_end.p99_us / 1e3;
    }
    fig.offered = static_cast<double>(fig.submitted) / seconds;
    fig.queue_wait_p99_ms = st.queue_wait.p99_us / 1e3;
    EXPECT_EQ(st.requests_submitted, fig.submitted);
    EXPECT_EQ(st.requests_failed + st.requests_expired + st.requests_cancelled, 0);
    for (size_t id = 0; id < static_cast<size_t>(fig.submitted); ++id) {
      fig.succeeded += outcome[id] == 1;
      fig.rejected += outcome[id] == 2;
      fig.other_errors += outcome[id] == 3 || outcome[id] == 5;
    }
    EXPECT_EQ(st.requests_succeeded, fig.succeeded);
    EXPECT_EQ(st.requests_rejected, fig.rejected);
    fig.served = static_cast<double>(fig.succeeded) / elapsed;
  }
  sampling = false;
  sampler.join();

  // Every future resolved: a result or a queue-full rejection, nothing else.
  EXPECT_EQ(fig.succeeded + fig.rejected, fig.submitted);
  EXPECT_EQ(fig.other_errors, 0);
  EXPECT_GT(fig.rejected, 0) << "10x the capacity never filled the queue";
  EXPECT_GT(fig.succeeded, 0);
  // Each answer its own request's (the tag echoed), each request run at most
  // once, exactly the answered ones run.
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(served.out_of_range, 0);
  int64_t run_twice = 0, run_but_rejected = 0, answered_not_run = 0;
  for (size_t id = 0; id < static_cast<size_t>(fig.submitted); ++id) {
    run_twice += served.seen[id] > 1;
    run_but_rejected += served.seen[id] == 1 && outcome[id] != 1;
    answered_not_run += served.seen[id] == 0 && outcome[id] == 1;
  }
  EXPECT_EQ(run_twice, 0);
  EXPECT_EQ(run_but_rejected, 0);
  EXPECT_EQ(answered_not_run, 0);
  // The sampled answers against the model run on the request alone (a batch
  // of one) in float64: float32 GEMMs of other batch sizes sum in other orders.
  int64_t checked = 0;
  {
    auto model = make_model();
    model->eval();
    model->to(torch::kFloat64);
    torch::NoGradGuard no_grad;
    for (const auto& per_client : samples) {
      for (const auto& [x, y] : per_client) {
        const auto expected =
            model->forward(x.narrow(0, 2, kIn - 2).to(torch::kFloat64).unsqueeze(0)).squeeze(0);
        EXPECT_TRUE(wick::testing::tensors_close(y.to(torch::kFloat64), expected, 1e-4, 1e-5));
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 0);
  // The clients offered far more than the batcher can serve (at least 3x: a
  // loaded machine delays the client threads too). With submit() the served
  // rate is a figure, not a check: on 2 cores the clients' own work (building,
  // submitting, rejecting and catching 10x the requests) takes CPU time from
  // the model's worker, so it falls far below the capacity. With try_submit
  // it must not collapse (the bench holds it to 0.8 on a quiet machine).
  EXPECT_GT(fig.offered, 3 * fig.capacity);
  if (api == Api::kTrySubmit) EXPECT_GT(fig.served, 0.1 * fig.capacity);

  // Bounded memory: the peak stays within 64 MiB of the start, and from a
  // quarter of the run to its end RSS grows by less than 16 MiB (a leak of
  // even 100 bytes a request would grow by more: 0.75 * offered * 100 B).
  ASSERT_GE(rss.size(), 4u);
  const double mb = 1.0 / (1 << 20);
  fig.rss_start_mb = static_cast<double>(rss.front().second) * mb;
  fig.rss_end_mb = static_cast<double>(rss.back().second) * mb;
  for (const auto& [t, r] : rss) {
    fig.rss_peak_mb = std::max(fig.rss_peak_mb, static_cast<double>(r) * mb);
    if (t <= 0.02 + seconds / 4) fig.rss_quarter_mb = static_cast<double>(r) * mb;
  }
  std::string series;
  for (int k = 1, i = 0; k <= 10; ++k) {
    const double t = 0.02 + seconds * k / 10;
    while (i + 1 < static_cast<int>(rss.size()) && rss[static_cast<size_t>(i) + 1].first <= t) ++i;
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%s%.0f", k == 1 ? "" : " ",
                  static_cast<double>(rss[static_cast<size_t>(i)].second) * mb);
    series += buf;
  }
  if (wick::testing::kAddressSanitizer) {
    // Measured under ASan: +144 MiB peak and +113 MiB from a quarter to the
    // end, which is its quarantine filling with the rejected requests'
    // freed allocations. LeakSanitizer checks this process for leaks at exit.
    std::printf("[ note     ] AddressSanitizer build: RSS bounds not checked (quarantine)\n");
  } else {
    EXPECT_LT(fig.rss_peak_mb - fig.rss_start_mb, 64.0);
    EXPECT_LT(fig.rss_end_mb - fig.rss_quarter_mb, 16.0);
  }

  std::printf(
      "[ figures  ] %s, overload %.1f s: capacity %.0f req/s, target 10x = %.0f req/s, offered "
      "%.0f "
      "req/s "
      "(%lld requests from %d threads), served %.0f req/s (%lld), rejected queue-full %lld "
      "(%.1f%%), other errors "
      "%lld, wrong answers %lld, run twice %lld; end-to-end p50 %.2f ms p99 %.2f ms, queue wait "
      "p99 %.2f ms; "
      "RSS start %.1f MiB, at 1/4 %.1f MiB, peak %.1f MiB, end %.1f MiB (each tenth of the run: %s "
      "MiB); %lld answers "
      "checked against batch-of-1\n",
      api == Api::kSubmit ? "submit()" : "try_submit()", seconds, fig.capacity, fig.target,
      fig.offered, static_cast<long long>(fig.submitted), kClients, fig.served,
      static_cast<long long>(fig.succeeded), static_cast<long long>(fig.rejected),
      100.0 * static_cast<double>(fig.rejected) /
          static_cast<double>(std::max<int64_t>(1, fig.submitted)),
      static_cast<long long>(fig.other_errors), static_cast<long long>(wrong.load()),
      static_cast<long long>(run_twice), fig.p50_ms, fig.p99_ms, fig.queue_wait_p99_ms,
      fig.rss_start_mb, fig.rss_quarter_mb, fig.rss_peak_mb, fig.rss_end_mb, series.c_str(),
      static_cast<long long>(checked));
}

class FaultBatcherTest : public wick::testing::SeededTest {};

bool slow_tests() {
  const char* slow = std::getenv("WICK_SLOW_TESTS");
  return slow != nullptr && std::string(slow) == "1";
}

TEST_F(FaultBatcherTest, TenTimesCapacityBriefly) { run_overload(2.5, Api::kSubmit); }

TEST_F(FaultBatcherTest, TenTimesCapacityBrieflyThroughTrySubmit) {
  run_overload(2.5, Api::kTrySubmit);
}

// The 30-second runs: with WICK_SLOW_TESTS=1 (scripts/test sets it).
TEST_F(FaultBatcherTest, TenTimesCapacityFor30Seconds) {
  if (!slow_tests()) GTEST_SKIP() << "set WICK_SLOW_TESTS=1 to run";
  run_overload(30.0, Api::kSubmit);
}

TEST_F(FaultBatcherTest, TenTimesCapacityFor30SecondsThroughTrySubmit) {
  if (!slow_tests()) GTEST_SKIP() << "set WICK_SLOW_TESTS=1 to run";
  run_overload(30.0, Api::kTrySubmit);
}

}  // namespace
