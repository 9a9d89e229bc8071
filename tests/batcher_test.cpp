#include <wick/batcher.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "support.h"

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using wick::BatcherError;
using wick::BatcherOptions;
using wick::QueueFullPolicy;
using wick::ShutdownPolicy;
using wick::TensorBatcher;

namespace {

// Request i is the tensor [i, -i]; the model maps a row r to 2 r + 1, so the
// answer names the request: [2i + 1, -2i + 1].
torch::Tensor request(int64_t i) {
  return torch::tensor({static_cast<double>(i), -static_cast<double>(i)}, torch::kFloat64);
}
torch::Tensor expected(int64_t i) {
  return torch::tensor({2.0 * i + 1.0, -2.0 * i + 1.0}, torch::kFloat64);
}

// A model that records every batch it sees (sizes and request ids) and can be
// held at a gate so tests can fill the queue behind a running batch.
struct RecordingModel {
  std::mutex mutex;
  std::vector<int64_t> sizes;
  std::vector<int64_t> seen_ids;
  std::promise<void> entered;  // set when the first batch enters the model
  bool entered_set = false;
  std::shared_future<void> gate;  // the model waits on it when valid

  torch::Tensor operator()(const torch::Tensor& x) {
    {
      std::lock_guard<std::mutex> g(mutex);
      sizes.push_back(x.size(0));
      for (int64_t r = 0; r < x.size(0); ++r) seen_ids.push_back(x[r][0].item<int64_t>());
      if (!entered_set) {
        entered_set = true;
        entered.set_value();
      }
    }
    if (gate.valid()) gate.wait();
    return x * 2 + 1;
  }
};

TensorBatcher::BatchFn recording(RecordingModel& m) {
  return wick::stack_batches([&m](const torch::Tensor& x) { return m(x); });
}

std::string error_of(std::future<torch::Tensor>& f) {
  try {
    f.get();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(DynamicBatcherTest, RejectsBadOptions) {
  auto fn = wick::stack_batches([](const torch::Tensor& x) { return x; });
  EXPECT_THROWS_WITH(TensorBatcher(fn, BatcherOptions().max_batch_size(0)),
                     "DynamicBatcher: max_batch_size must be >= 1, got 0");
  EXPECT_THROWS_WITH(TensorBatcher(fn, BatcherOptions().max_delay(-1us)),
                     "max_delay must be >= 0 us, got -1");
  EXPECT_THROWS_WITH(TensorBatcher(fn, BatcherOptions().max_queue_size(0)),
                     "max_queue_size must be >= 1, got 0");
  EXPECT_THROWS_WITH(TensorBatcher(fn, BatcherOptions().num_workers(0)),
                     "num_workers must be >= 1, got 0");
  EXPECT_THROWS_WITH(TensorBatcher(fn, BatcherOptions().block_timeout(-5us)),
                     "block_timeout must be >= 0 us");
  EXPECT_THROWS_WITH(TensorBatcher(fn, BatcherOptions().request_timeout(-5us)),
                     "request_timeout must be >= 0 us");
  EXPECT_THROWS_WITH(TensorBatcher(fn, BatcherOptions().idle_spin(-1us)),
                     "DynamicBatcher: idle_spin must be >= 0 us, got -1");
}

TEST(DynamicBatcherTest, EachFutureGetsItsOwnResult) {
  RecordingModel model;
  TensorBatcher batcher(recording(model),
                        BatcherOptions().max_batch_size(8).max_delay(2ms).num_workers(2));
  std::vector<std::future<torch::Tensor>> futures;
  for (int64_t i = 0; i < 100; ++i) futures.push_back(batcher.submit(request(i)));
  for (int64_t i = 0; i < 100; ++i)
    EXPECT_TRUE(wick::testing::tensors_equal(futures[i].get(), expected(i))) << i;
  batcher.shutdown();
  auto st = batcher.stats();
  EXPECT_EQ(st.requests_succeeded, 100);
  EXPECT_GT(st.mean_batch_size, 1.0);  // 100 requests in a burst did get merged
}

TEST(DynamicBatcherTest, NoBatchExceedsMaxBatchSize) {
  RecordingModel model;
  TensorBatcher batcher(recording(model), BatcherOptions().max_batch_size(5).max_delay(5ms));
  std::vector<std::thread> clients;
  std::atomic<int64_t> ok{0};
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&, t] {
      for (int64_t i = 0; i < 50; ++i) {
        int64_t id = t * 1000 + i;
        if (wick::testing::tensors_equal(batcher.submit(request(id)).get(), expected(id))) ++ok;
      }
    });
  }
  for (auto& c : clients) c.join();
  batcher.shutdown();
  EXPECT_EQ(ok.load(), 400);
  int64_t total = 0;
  bool full_seen = false;
  for (int64_t s : model.sizes) {
    EXPECT_GE(s, 1);
    EXPECT_LE(s, 5);
    full_seen |= s == 5;
    total += s;
  }
  EXPECT_EQ(total, 400);
  EXPECT_TRUE(full_seen);
  auto st = batcher.stats();
  EXPECT_EQ(st.batches_run, static_cast<int64_t>(model.sizes.size()));
  ASSERT_EQ(st.batch_size_histogram.size(), 6u);
  int64_t from_hist = 0;
  for (size_t n = 0; n < 6; ++n) from_hist += static_cast<int64_t>(n) * st.batch_size_histogram[n];
  EXPECT_EQ(from_hist, 400);
}

TEST(DynamicBatcherTest, LoneRequestWaitsMaxDelayThenRuns) {
  RecordingModel model;
  const auto delay = 20ms;
  TensorBatcher batcher(recording(model), BatcherOptions().max_batch_size(16).max_delay(delay));
  auto t0 = Clock::now();
  auto y = batcher.submit(request(3)).get();
  auto elapsed = Clock::now() - t0;
  EXPECT_TRUE(wick::testing::tensors_equal(y, expected(3)));
  EXPECT_GE(elapsed, delay - 1ms);    // it did wait for company
  EXPECT_LT(elapsed, delay + 250ms);  // max_delay + compute (~µs) + scheduling slack
  auto st = batcher.stats();
  EXPECT_EQ(st.end_to_end.count, 1);
  EXPECT_GE(st.queue_wait.p50_us, 19000.0);
}

// A worker polls the queue for at most idle_spin before it sleeps, and never
// past a request's max_delay: with a poll far longer than the delay, a lone
// request still runs at its max_delay, a full batch at once, the same after a
// batch (the worker polling an empty queue), and shutdown ends a poll at once.
TEST(DynamicBatcherTest, IdleSpinNeverDelaysABatchOrShutdown) {
  for (auto spin : {0us, 200us, std::chrono::microseconds(10s)}) {
    SCOPED_TRACE("idle_spin " + std::to_string(spin.count()) + " us");
    RecordingModel model;
    // run_waiting_when_busy(false): a request sent as the worker comes back
    // from a batch waits for company as one sent to an idle worker does.
    TensorBatcher batcher(
        recording(model),
        BatcherOptions().max_batch_size(4).max_delay(300ms).run_waiting_when_busy(false).idle_spin(
            spin));
    for (int round = 0; round < 2; ++round) {  // the second after the worker polled an empty queue
      auto t0 = Clock::now();
      auto lone = batcher.submit(request(round));
      ASSERT_EQ(lone.wait_for(5s), std::future_status::ready);
      const auto lone_took = Clock::now() - t0;
      EXPECT_GE(lone_took, 299ms);
      EXPECT_LT(lone_took, 300ms + 250ms);
      EXPECT_TRUE(wick::testing::tensors_equal(lone.get(), expected(round)));
      std::vector<std::future<torch::Tensor>> full;
      t0 = Clock::now();
      for (int64_t i = 0; i < 4; ++i) full.push_back(batcher.submit(request(10 + i)));
      for (auto& f : full) ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
      EXPECT_LT(Clock::now() - t0, 200ms);  // did not wait for max_delay
    }
    const auto t0 = Clock::now();
    batcher.shutdown();
    EXPECT_LT(Clock::now() - t0, 1s);
    EXPECT_EQ(model.sizes, std::vector<int64_t>({1, 4, 1, 4}));
  }
}

TEST(DynamicBatcherTest, FullBatchRunsWithoutWaitingForDelay) {
  RecordingModel model;
  TensorBatcher batcher(recording(model), BatcherOptions().max_batch_size(4).max_delay(10s));
  auto t0 = Clock::now();
  std::vector<std::future<torch::Tensor>> fs;
  for (int64_t i = 0; i < 4; ++i) fs.push_back(batcher.submit(request(i)));
  for (int64_t i = 0; i < 4; ++i)
    EXPECT_TRUE(wick::testing::tensors_equal(fs[i].get(), expected(i)));
  EXPECT_LT(Clock::now() - t0, 2s);
  EXPECT_EQ(model.sizes, std::vector<int64_t>({4}));
}

TEST(DynamicBatcherTest, RejectsWhenQueueFull) {
  RecordingModel model;
  std::promise<void> open;
  model.gate = open.get_future().share();
  TensorBatcher batcher(recording(model),
                        BatcherOptions().max_batch_size(1).max_delay(0us).max_queue_size(2));
  auto a = batcher.submit(request(0));
  model.entered.get_future().wait();  // request 0 is in the model, the queue is empty
  auto b = batcher.submit(request(1));
  auto c = batcher.submit(request(2));
  auto d = batcher.submit(request(3));  // third in a queue of 2
  ASSERT_EQ(d.wait_for(0s), std::future_status::ready);
  try {
    d.get();
    ADD_FAILURE() << "expected queue full";
  } catch (const BatcherError& e) {
    EXPECT_EQ(e.kind(), BatcherError::Kind::kQueueFull);
    EXPECT_NE(std::string(e.what()).find("queue full"), std::string::npos) << e.what();
  }
  open.set_value();
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));
  EXPECT_TRUE(wick::testing::tensors_equal(b.get(), expected(1)));
  EXPECT_TRUE(wick::testing::tensors_equal(c.get(), expected(2)));
  EXPECT_EQ(batcher.stats().requests_rejected, 1);
}

TEST(DynamicBatcherTest, BlockingSubmitTimesOutWhenQueueStaysFull) {
  RecordingModel model;
  std::promise<void> open;
  model.gate = open.get_future().share();
  TensorBatcher batcher(recording(model), BatcherOptions()
                                              .max_batch_size(1)
                                              .max_delay(0us)
                                              .max_queue_size(1)
                                              .queue_full_policy(QueueFullPolicy::kBlock)
                                              .block_timeout(50ms));
  auto a = batcher.submit(request(0));
  model.entered.get_future().wait();
  auto b = batcher.submit(request(1));
  auto t0 = Clock::now();
  auto c = batcher.submit(request(2));  // blocks 50 ms, then gives up
  auto waited = Clock::now() - t0;
  EXPECT_GE(waited, 45ms);
  EXPECT_LT(waited, 1s);
  EXPECT_NE(error_of(c).find("queue full"), std::string::npos);
  open.set_value();
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));
  EXPECT_TRUE(wick::testing::tensors_equal(b.get(), expected(1)));
}

TEST(DynamicBatcherTest, BlockingSubmitProceedsWhenRoomFrees) {
  RecordingModel model;
  std::promise<void> open;
  model.gate = open.get_future().share();
  TensorBatcher batcher(recording(model), BatcherOptions()
                                              .max_batch_size(1)
                                              .max_delay(0us)
                                              .max_queue_size(1)
                                              .queue_full_policy(QueueFullPolicy::kBlock)
                                              .block_timeout(5s));
  auto a = batcher.submit(request(0));
  model.entered.get_future().wait();
  auto b = batcher.submit(request(1));
  std::thread opener([&] {
    std::this_thread::sleep_for(30ms);
    open.set_value();
  });
  auto t0 = Clock::now();
  auto c = batcher.submit(request(2));  // blocked until the gate opens and b is taken
  EXPECT_GE(Clock::now() - t0, 25ms);
  opener.join();
  EXPECT_TRUE(wick::testing::tensors_equal(c.get(), expected(2)));
  EXPECT_TRUE(wick::testing::tensors_equal(b.get(), expected(1)));
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));
}

TEST(DynamicBatcherTest, ExpiredRequestIsAnsweredWithErrorAndNeverRun) {
  RecordingModel model;
  std::promise<void> open;
  model.gate = open.get_future().share();
  TensorBatcher batcher(recording(model), BatcherOptions().max_batch_size(4).max_delay(0us));
  auto a = batcher.submit(request(0));
  model.entered.get_future().wait();
  auto b = batcher.submit(request(1), Clock::now() + 10ms);  // expires while a runs
  auto c = batcher.submit(request(2), Clock::now() + 10s);   // does not
  std::this_thread::sleep_for(30ms);
  open.set_value();
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));
  try {
    b.get();
    ADD_FAILURE() << "expected a deadline error";
  } catch (const BatcherError& e) {
    EXPECT_EQ(e.kind(), BatcherError::Kind::kDeadlineExceeded);
    EXPECT_NE(std::string(e.what()).find("deadline exceeded"), std::string::npos);
  }
  EXPECT_TRUE(wick::testing::tensors_equal(c.get(), expected(2)));
  batcher.shutdown();
  EXPECT_EQ(model.seen_ids, std::vector<int64_t>({0, 2}));
  EXPECT_EQ(batcher.stats().requests_expired, 1);
}

TEST(DynamicBatcherTest, RequestTimeoutOptionSetsDeadlines) {
  RecordingModel model;
  std::promise<void> open;
  model.gate = open.get_future().share();
  TensorBatcher batcher(recording(model),
                        BatcherOptions().max_batch_size(4).max_delay(0us).request_timeout(10ms));
  auto a = batcher.submit(request(0));
  model.entered.get_future().wait();
  auto b = batcher.submit(request(1));
  std::this_thread::sleep_for(30ms);
  open.set_value();
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));
  EXPECT_NE(error_of(b).find("deadline exceeded"), std::string::npos);
  batcher.shutdown();
  EXPECT_EQ(model.seen_ids, std::vector<int64_t>({0}));
}

TEST(DynamicBatcherTest, ModelErrorFailsItsBatchAndServingContinues) {
  std::atomic<int> calls{0};
  auto fn = wick::stack_batches([&](const torch::Tensor& x) {
    ++calls;
    for (int64_t r = 0; r < x.size(0); ++r) {
      TORCH_CHECK(x[r][0].item<int64_t>() != 2, "model refuses request 2");
    }
    return x * 2 + 1;
  });
  TensorBatcher batcher(fn, BatcherOptions().max_batch_size(4).max_delay(5s));
  std::vector<std::future<torch::Tensor>> fs;
  for (int64_t i = 0; i < 4; ++i) fs.push_back(batcher.submit(request(i)));  // one full batch
  for (auto& f : fs) EXPECT_NE(error_of(f).find("model refuses request 2"), std::string::npos);
  std::vector<std::future<torch::Tensor>> later;
  for (int64_t i = 10; i < 14; ++i) later.push_back(batcher.submit(request(i)));
  for (int64_t i = 0; i < 4; ++i)
    EXPECT_TRUE(wick::testing::tensors_equal(later[i].get(), expected(10 + i)));
  EXPECT_EQ(calls.load(), 2);
  auto st = batcher.stats();
  EXPECT_EQ(st.requests_failed, 4);
  EXPECT_EQ(st.requests_succeeded, 4);
}

TEST(DynamicBatcherTest, WrongResultCountFailsTheBatch) {
  wick::DynamicBatcher<int, int> batcher([](std::vector<int>&& xs) { return std::vector<int>{1}; },
                                         BatcherOptions().max_batch_size(2).max_delay(5s));
  auto a = batcher.submit(1);
  auto b = batcher.submit(2);
  EXPECT_THROWS_WITH(a.get(), "batch function returned 1 results for 2 requests");
  EXPECT_THROWS_WITH(b.get(), "batch function returned 1 results for 2 requests");
}

TEST(DynamicBatcherTest, ShutdownDrainsPendingRequests) {
  RecordingModel model;
  std::promise<void> open;
  model.gate = open.get_future().share();
  TensorBatcher batcher(recording(model), BatcherOptions().max_batch_size(4).max_delay(0us));
  auto a = batcher.submit(request(0));
  model.entered.get_future().wait();
  std::vector<std::future<torch::Tensor>> pending;
  for (int64_t i = 1; i <= 10; ++i) pending.push_back(batcher.submit(request(i)));
  std::thread stopper([&] { batcher.shutdown(); });
  std::this_thread::sleep_for(20ms);
  open.set_value();
  stopper.join();
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));
  for (int64_t i = 1; i <= 10; ++i)
    EXPECT_TRUE(wick::testing::tensors_equal(pending[i - 1].get(), expected(i)));
  auto late = batcher.submit(request(99));
  try {
    late.get();
    ADD_FAILURE() << "expected a shutdown error";
  } catch (const BatcherError& e) {
    EXPECT_EQ(e.kind(), BatcherError::Kind::kShutdown);
  }
}

TEST(DynamicBatcherTest, ShutdownCancelsPendingRequests) {
  RecordingModel model;
  std::promise<void> open;
  model.gate = open.get_future().share();
  TensorBatcher batcher(
      recording(model),
      BatcherOptions().max_batch_size(4).max_delay(0us).shutdown_policy(ShutdownPolicy::kCancel));
  auto a = batcher.submit(request(0));
  model.entered.get_future().wait();
  std::vector<std::future<torch::Tensor>> pending;
  for (int64_t i = 1; i <= 10; ++i) pending.push_back(batcher.submit(request(i)));
  std::thread stopper([&] { batcher.shutdown(); });
  pending.back().wait();  // answered by shutdown while the model still holds request 0
  open.set_value();
  stopper.join();
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));  // the running batch finishes
  for (auto& f : pending) EXPECT_NE(error_of(f).find("cancelled by shutdown"), std::string::npos);
  EXPECT_EQ(model.seen_ids, std::vector<int64_t>({0}));
  EXPECT_EQ(batcher.stats().requests_cancelled, 10);
}

TEST(DynamicBatcherTest, DestructorAnswersEveryPendingRequest) {
  std::vector<std::future<torch::Tensor>> fs;
  {
    TensorBatcher batcher(wick::stack_batches([](const torch::Tensor& x) {
                            std::this_thread::sleep_for(1ms);
                            return x * 2 + 1;
                          }),
                          BatcherOptions().max_batch_size(3).max_delay(50ms));
    for (int64_t i = 0; i < 20; ++i) fs.push_back(batcher.submit(request(i)));
  }  // drains and joins
  for (int64_t i = 0; i < 20; ++i) {
    ASSERT_EQ(fs[i].wait_for(0s), std::future_status::ready);
    EXPECT_TRUE(wick::testing::tensors_equal(fs[i].get(), expected(i)));
  }
}

TEST(DynamicBatcherTest, ManyThreadsNoLostOrDuplicatedAnswer) {
  constexpr int kThreads = 64;
  constexpr int64_t kPerThread = 1000;
  std::mutex seen_mutex;
  std::vector<int> seen_count(kThreads * kPerThread, 0);  // times the model saw each id
  auto fn = wick::stack_batches([&](const torch::Tensor& x) {
    auto ids = x.select(1, 0).to(torch::kInt64);
    {
      std::lock_guard<std::mutex> g(seen_mutex);
      auto acc = ids.accessor<int64_t, 1>();
      for (int64_t r = 0; r < acc.size(0); ++r) ++seen_count[static_cast<size_t>(acc[r])];
    }
    return x * 2 + 1;
  });
  TensorBatcher batcher(fn, BatcherOptions()
                                .max_batch_size(64)
                                .max_delay(200us)
                                .num_workers(2)
                                .max_queue_size(256)
                                .queue_full_policy(QueueFullPolicy::kBlock)
                                .block_timeout(10s));
  std::atomic<int64_t> correct{0}, wrong{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < kThreads; ++t) {
    clients.emplace_back([&, t] {
      // Each client keeps a few requests in flight, like a pipelined RPC client.
      std::deque<std::pair<int64_t, std::future<torch::Tensor>>> inflight;
      auto settle = [&] {
        auto& [id, f] = inflight.front();
        auto y = f.get();
        (y[0].item<double>() == 2.0 * id + 1 && y[1].item<double>() == -2.0 * id + 1 ? correct
                                                                                     : wrong)++;
        inflight.pop_front();
      };
      for (int64_t i = 0; i < kPerThread; ++i) {
        int64_t id = t * kPerThread + i;
        inflight.emplace_back(id, batcher.submit(request(id)));
        if (inflight.size() >= 4) settle();
      }
      while (!inflight.empty()) settle();
    });
  }
  for (auto& c : clients) c.join();
  batcher.shutdown();
  EXPECT_EQ(correct.load(), kThreads * kPerThread);
  EXPECT_EQ(wrong.load(), 0);
  int64_t not_once = 0;
  for (int c : seen_count) not_once += c != 1;
  EXPECT_EQ(not_once, 0);
  auto st = batcher.stats();
  EXPECT_EQ(st.requests_succeeded, kThreads * kPerThread);
  EXPECT_EQ(st.requests_rejected + st.requests_failed + st.requests_expired + st.requests_cancelled,
            0);
  EXPECT_LE(st.end_to_end.p50_us, st.end_to_end.p95_us);
  EXPECT_LE(st.end_to_end.p95_us, st.end_to_end.p99_us);
  EXPECT_LE(st.end_to_end.p99_us, st.end_to_end.max_us);
  std::printf("[ stats    ] %lld batches, mean size %.1f, e2e p50 %.0f us p99 %.0f us\n",
              static_cast<long long>(st.batches_run), st.mean_batch_size, st.end_to_end.p50_us,
              st.end_to_end.p99_us);
}

TEST(DynamicBatcherTest, PadsVariableLengthSequencesWithMask) {
  std::mutex m;
  std::vector<torch::Tensor> masks;
  // A per-position model: y = 10 x + 1 where real, 0 at padding; also records the mask.
  auto fn = wick::pad_batches(
      [&](const wick::PaddedBatch& b) {
        {
          std::lock_guard<std::mutex> g(m);
          masks.push_back(b.mask.clone());
        }
        EXPECT_EQ(b.lengths.sum().item<int64_t>(), b.mask.sum().item<int64_t>());
        return (b.data * 10 + 1) * b.mask.unsqueeze(-1).to(b.data.dtype());
      },
      /*unpad_outputs=*/true, /*pad_value=*/-7.0);
  TensorBatcher batcher(fn, BatcherOptions().max_batch_size(3).max_delay(5s));
  auto x0 = torch::arange(6, torch::kFloat64).reshape({3, 2});   // length 3
  auto x1 = torch::arange(2, torch::kFloat64).reshape({1, 2});   // length 1
  auto x2 = torch::arange(10, torch::kFloat64).reshape({5, 2});  // length 5
  auto f0 = batcher.submit(x0), f1 = batcher.submit(x1), f2 = batcher.submit(x2);
  EXPECT_TRUE(wick::testing::tensors_equal(f0.get(), x0 * 10 + 1));
  EXPECT_TRUE(wick::testing::tensors_equal(f1.get(), x1 * 10 + 1));
  EXPECT_TRUE(wick::testing::tensors_equal(f2.get(), x2 * 10 + 1));
  ASSERT_EQ(masks.size(), 1u);
  auto expected_mask =
      torch::tensor({1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1}).reshape({3, 5}).to(torch::kBool);
  EXPECT_TRUE(wick::testing::tensors_equal(masks[0], expected_mask));
}

TEST(DynamicBatcherTest, DifferentShapesInOneBatchRunSeparately) {
  RecordingModel model;
  TensorBatcher batcher(recording(model), BatcherOptions().max_batch_size(3).max_delay(5s));
  auto f0 = batcher.submit(request(0));
  auto f1 = batcher.submit(torch::full({3}, 5.0, torch::kFloat64));
  auto f2 = batcher.submit(request(2));
  EXPECT_TRUE(wick::testing::tensors_equal(f0.get(), expected(0)));
  EXPECT_TRUE(wick::testing::tensors_equal(f1.get(), torch::full({3}, 11.0, torch::kFloat64)));
  EXPECT_TRUE(wick::testing::tensors_equal(f2.get(), expected(2)));
  EXPECT_EQ(model.sizes, std::vector<int64_t>({2, 1}));
}

// The example in docs/batching.md, kept here so it is known to compile and work.
TEST(DynamicBatcherTest, DocExample) {
  torch::manual_seed(0);
  torch::nn::Linear net(4, 3);
  net->eval();

  wick::TensorBatcher batcher(
      wick::stack_batches([&](const torch::Tensor& x) { return net->forward(x); }),
      wick::BatcherOptions()
          .max_batch_size(16)
          .max_delay(std::chrono::microseconds(500))
          .max_queue_size(256)
          .queue_full_policy(wick::QueueFullPolicy::kBlock)
          .block_timeout(std::chrono::milliseconds(100))
          .request_timeout(std::chrono::milliseconds(50))
          .num_workers(2));

  auto inputs = torch::randn({64, 4});
  std::vector<std::future<torch::Tensor>> answers(64);
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c) {  // 4 clients, 16 requests each
    clients.emplace_back([&, c] {
      for (int64_t i = c * 16; i < (c + 1) * 16; ++i) answers[i] = batcher.submit(inputs[i]);
    });
  }
  for (auto& t : clients) t.join();

  torch::NoGradGuard no_grad;
  auto reference = net->forward(inputs);  // the offline, one-batch answer
  for (int64_t i = 0; i < 64; ++i) {
    try {
      torch::Tensor y = answers[i].get();  // row i of some batch's output
      WICK_EXPECT_CLOSE(y, reference[i], 1e-5, 1e-6);
    } catch (const wick::BatcherError& e) {  // queue full, deadline, shutdown
      ADD_FAILURE() << "request " << i << " refused: " << e.what();
    }
  }
  batcher.shutdown();
  wick::BatcherStats s = batcher.stats();
  EXPECT_EQ(s.requests_succeeded, 64);
  EXPECT_GE(s.batches_run, 4);  // at most 16 per batch
}

TEST(DynamicBatcherTest, WorkersRunBatchesInParallel) {
  std::atomic<int> inside{0}, most{0};
  auto fn = wick::stack_batches([&](const torch::Tensor& x) {
    int now = ++inside;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
    // Hold the batch until the other worker is inside too (or give up after 2 s).
    auto until = Clock::now() + 2s;
    while (inside.load() < 2 && Clock::now() < until) std::this_thread::sleep_for(100us);
    std::this_thread::sleep_for(5ms);
    --inside;
    return x * 2 + 1;
  });
  TensorBatcher batcher(fn, BatcherOptions().max_batch_size(1).max_delay(0us).num_workers(2));
  auto a = batcher.submit(request(0));
  auto b = batcher.submit(request(1));
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));
  EXPECT_TRUE(wick::testing::tensors_equal(b.get(), expected(1)));
  EXPECT_EQ(most.load(), 2);
}

TEST(DynamicBatcherTest, UserBatchFunctionForOtherTypes) {
  // Strings in, lengths out: the batch function does its own collate and split.
  std::vector<size_t> batch_sizes;
  wick::DynamicBatcher<std::string, size_t> batcher(
      [&](std::vector<std::string>&& words) {
        batch_sizes.push_back(words.size());
        std::vector<size_t> lengths;
        for (const auto& w : words) lengths.push_back(w.size());
        return lengths;
      },
      BatcherOptions().max_batch_size(3).max_delay(5s));
  auto a = batcher.submit("a");
  auto b = batcher.submit("three");
  auto c = batcher.submit("seven");
  auto d = batcher.submit(std::string(11, 'x'));
  batcher.shutdown();  // drains d alone
  EXPECT_EQ(a.get(), 1u);
  EXPECT_EQ(b.get(), 5u);
  EXPECT_EQ(c.get(), 5u);
  EXPECT_EQ(d.get(), 11u);
  EXPECT_EQ(batch_sizes, std::vector<size_t>({3, 1}));
  auto st = batcher.stats();
  EXPECT_EQ(st.batch_size_histogram, std::vector<int64_t>({0, 1, 0, 1}));
  EXPECT_DOUBLE_EQ(st.mean_batch_size, 2.0);
}

TEST(DynamicBatcherTest, ShutdownFromInsideTheBatchFunctionStopsIntake) {
  TensorBatcher* self = nullptr;
  std::promise<void> called;
  auto fn = wick::stack_batches([&](const torch::Tensor& x) {
    self->shutdown();  // must not deadlock
    called.set_value();
    return x * 2 + 1;
  });
  TensorBatcher batcher(fn, BatcherOptions().max_batch_size(1).max_delay(0us));
  self = &batcher;
  auto a = batcher.submit(request(0));
  EXPECT_TRUE(wick::testing::tensors_equal(a.get(), expected(0)));
  called.get_future().wait();
  auto late = batcher.submit(request(1));
  EXPECT_NE(error_of(late).find("shut down"), std::string::npos);
}

// ---------------------------------------------------------------- try_submit

namespace {

// What a try_submit callback saw: every answer by request id, under a lock.
struct Answers {
  std::mutex mutex;
  std::condition_variable cv;
  std::map<int64_t, std::vector<std::string>> by_id;  // "ok" or the error's what()
  std::map<int64_t, torch::Tensor> values;
  std::map<int64_t, BatcherError::Kind> kinds;
  int64_t count = 0;

  TensorBatcher::Callback callback(int64_t id) {
    return [this, id](wick::BatcherAnswer<torch::Tensor> a) {
      std::lock_guard<std::mutex> g(mutex);
      if (a.ok()) {
        by_id[id].push_back("ok");
        values[id] = std::move(a).value();
      } else {
        try {
          std::rethrow_exception(a.error());
        } catch (const BatcherError& e) {
          by_id[id].push_back(e.what());
          kinds[id] = e.kind();
        } catch (const std::exception& e) {
          by_id[id].push_back(e.what());
        }
      }
      ++count;
      cv.notify_all();
    };
  }
  void wait_for(int64_t n) {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return count >= n; });
  }
};

}  // namespace

TEST(DynamicBatcherTest, TrySubmitAnswersEachCallbackOnceWithItsResult) {
  RecordingModel model;
  TensorBatcher batcher(recording(model),
                        BatcherOptions().max_batch_size(8).max_delay(1ms).num_workers(2));
  Answers answers;
  for (int64_t i = 0; i < 100; ++i) {
    auto x = request(i);
    ASSERT_EQ(batcher.try_submit(std::move(x), answers.callback(i)), wick::Admission::kAccepted);
    EXPECT_FALSE(x.defined());  // taken
  }
  answers.wait_for(100);
  batcher.shutdown();
  ASSERT_EQ(answers.by_id.size(), 100u);
  for (int64_t i = 0; i < 100; ++i) {
    EXPECT_EQ(answers.by_id[i], std::vector<std::string>({"ok"})) << i;
    EXPECT_TRUE(wick::testing::tensors_equal(answers.values[i], expected(i))) << i;
  }
  auto st = batcher.stats();
  EXPECT_EQ(st.requests_submitted, 100);
  EXPECT_EQ(st.requests_succeeded, 100);
  EXPECT_GT(st.mean_batch_size, 1.0);
}

// The admission path under overload: a status, no exception, no future, and
// the refused input and callback handed back untouched.
TEST(DynamicBatcherTest, TrySubmitRefusesWithAStatusAndLeavesTheRequestWithTheCaller) {
  RecordingModel model;
  std::promise<void> open;
  model.gate = open.get_future().share();
  TensorBatcher batcher(recording(model), BatcherOptions()
                                              .max_batch_size(1)
                                              .max_delay(0us)
                                              .max_queue_size(2)
                                              .queue_full_policy(QueueFullPolicy::kBlock)
                                              .block_timeout(10s));
  Answers answers;
  auto first = request(0);
  ASSERT_EQ(batcher.try_submit(std::move(first), answers.callback(0)), wick::Admission::kAccepted);
  model.entered.get_future().wait();  // request 0 runs; the queue is empty
  for (int64_t i = 1; i <= 2; ++i) {
    auto x = request(i);
    ASSERT_EQ(batcher.try_submit(std::move(x), answers.callback(i)), wick::Admission::kAccepted);
  }
  // Full: refused at once, even under kBlock (try_submit never waits).
  auto x = request(3);
  TensorBatcher::Callback cb = answers.callback(3);
  const auto t0 = Clock::now();
  for (int k = 0; k < 1000; ++k) {
    ASSERT_EQ(batcher.try_submit(std::move(x), std::move(cb)), wick::Admission::kQueueFull);
  }
  EXPECT_LT(Clock::now() - t0, 1s);
  ASSERT_TRUE(x.defined());
  EXPECT_TRUE(wick::testing::tensors_equal(x, request(3)));  // still the caller's
  ASSERT_TRUE(static_cast<bool>(cb));                        // not moved from, not called
  open.set_value();
  answers.wait_for(3);
  // Room again: the same request and callback go through.
  ASSERT_EQ(batcher.try_submit(std::move(x), std::move(cb)), wick::Admission::kAccepted);
  answers.wait_for(4);
  batcher.shutdown();
  auto late = request(9);
  EXPECT_EQ(batcher.try_submit(std::move(late), answers.callback(9)), wick::Admission::kShutdown);
  EXPECT_TRUE(late.defined());
  {
    std::lock_guard<std::mutex> g(answers.mutex);
    EXPECT_EQ(answers.count, 4);
    EXPECT_EQ(answers.by_id.count(9), 0u);
    for (int64_t i = 0; i <= 3; ++i) EXPECT_EQ(answers.by_id[i], std::vector<std::string>({"ok"}));
  }
  auto st = batcher.stats();
  EXPECT_EQ(st.requests_rejected, 1001);
  EXPECT_EQ(st.requests_submitted, 1005);
  EXPECT_EQ(st.requests_succeeded, 4);
  EXPECT_STREQ(wick::to_string(wick::Admission::kQueueFull), "queue_full");
}

TEST(DynamicBatcherTest, TrySubmitCallbackCarriesDeadlineModelAndCancelErrors) {
  std::promise<void> open;
  std::shared_future<void> gate = open.get_future().share();
  std::promise<void> entered;
  std::atomic<bool> entered_set{false};
  auto fn = wick::stack_batches([&](const torch::Tensor& x) {
    if (!entered_set.exchange(true)) entered.set_value();
    gate.wait();
    for (int64_t r = 0; r < x.size(0); ++r) {
      TORCH_CHECK(x[r][0].item<int64_t>() != 1, "model refuses request 1");
    }
    return x * 2 + 1;
  });
  Answers answers;
  {
    TensorBatcher batcher(fn, BatcherOptions().max_batch_size(1).max_delay(0us).shutdown_policy(
                                  ShutdownPolicy::kCancel));
    for (int64_t i : {0, 1, 2, 3}) {
      auto x = request(i);
      const auto deadline = i == 2 ? Clock::now() + 5ms : Clock::now() + 1h;
      ASSERT_EQ(batcher.try_submit(std::move(x), answers.callback(i), deadline),
                wick::Admission::kAccepted);
      if (i == 0) entered.get_future().wait();
    }
    std::this_thread::sleep_for(20ms);  // request 2's deadline passes in the queue
    open.set_value();
    answers.wait_for(3);  // 0 answered, 1 failed by the model, 2 expired when taken
    // The destructor cancels 3 if it is still queued.
  }
  answers.wait_for(4);
  std::lock_guard<std::mutex> g(answers.mutex);
  EXPECT_EQ(answers.by_id[0], std::vector<std::string>({"ok"}));
  ASSERT_EQ(answers.by_id[1].size(), 1u);
  EXPECT_NE(answers.by_id[1][0].find("model refuses request 1"), std::string::npos);
  ASSERT_EQ(answers.by_id[2].size(), 1u);
  EXPECT_EQ(answers.kinds[2], BatcherError::Kind::kDeadlineExceeded);
  ASSERT_EQ(answers.by_id[3].size(), 1u);
  EXPECT_TRUE(answers.by_id[3][0] == "ok" || answers.kinds[3] == BatcherError::Kind::kCancelled)
      << answers.by_id[3][0];
  EXPECT_EQ(answers.count, 4);
}

// A callback may submit the next request (an asynchronous client's loop) and
// may throw; neither blocks nor breaks the batcher.
TEST(DynamicBatcherTest, TrySubmitCallbackMaySubmitAgainAndMayThrow) {
  RecordingModel model;
  TensorBatcher batcher(recording(model), BatcherOptions().max_batch_size(4).max_delay(100us));
  std::atomic<int64_t> next{0}, done{0};
  std::promise<void> finished;
  constexpr int64_t kTotal = 500;
  std::function<void()> send = [&] {
    const int64_t id = next++;
    auto x = request(id);
    auto a = batcher.try_submit(std::move(x), [&, id](wick::BatcherAnswer<torch::Tensor> r) {
      EXPECT_TRUE(wick::testing::tensors_equal(r.value(), expected(id)));
      if (++done == kTotal) finished.set_value();
      if (next.load() < kTotal) send();
      if (id % 7 == 0) throw std::runtime_error("a callback's own failure");
    });
    ASSERT_EQ(a, wick::Admission::kAccepted);
  };
  for (int c = 0; c < 8; ++c) send();
  ASSERT_EQ(finished.get_future().wait_for(30s), std::future_status::ready);
  batcher.shutdown();
  EXPECT_EQ(next.load(), kTotal);
  EXPECT_EQ(batcher.stats().requests_succeeded, kTotal);
  EXPECT_EQ(static_cast<int64_t>(model.seen_ids.size()), kTotal);
}

// Where a request's time went: stack_batches reports collation, the model
// and the split; a batch function of your own counts wholly as the model.
TEST(DynamicBatcherTest, StatsBreakDownEachRequestsTime) {
  auto fn = wick::stack_batches([](const torch::Tensor& x) {
    std::this_thread::sleep_for(2ms);
    return x * 2 + 1;
  });
  TensorBatcher batcher(fn, BatcherOptions().max_batch_size(4).max_delay(5ms));
  std::vector<std::future<torch::Tensor>> fs;
  for (int64_t i = 0; i < 16; ++i) fs.push_back(batcher.submit(request(i)));
  for (auto& f : fs) f.get();
  batcher.shutdown();
  auto b = batcher.stats().breakdown;
  EXPECT_EQ(b.requests, 16);
  EXPECT_GE(b.model_us, 1900.0);
  EXPECT_GT(b.collate_us, 0.0);
  EXPECT_GT(b.split_us, 0.0);
  EXPECT_LT(b.collate_us + b.split_us, b.model_us);
  EXPECT_GE(b.queue_us, 0.0);
  EXPECT_GE(b.handoff_us, 0.0);
  EXPECT_GE(b.answer_us, 0.0);

  wick::DynamicBatcher<int, int> own(
      [](std::vector<int>&& xs) {
        std::this_thread::sleep_for(1ms);
        return xs;
      },
      BatcherOptions().max_batch_size(2).max_delay(0us));
  own.submit(1).get();
  own.shutdown();
  auto o = own.stats().breakdown;
  EXPECT_EQ(o.requests, 1);
  EXPECT_EQ(o.collate_us, 0.0);
  EXPECT_EQ(o.split_us, 0.0);
  EXPECT_GE(o.model_us, 900.0);
}

// 64 threads x 1000 requests, half through submit() and half through
// try_submit(): every request answered once, by its own result, run once.
TEST(DynamicBatcherTest, ManyThreadsMixingSubmitAndTrySubmitAnswerEachOnce) {
  constexpr int kThreads = 64;
  constexpr int64_t kPerThread = 1000;
  std::mutex seen_mutex;
  std::vector<int> seen_count(kThreads * kPerThread, 0);
  auto fn = wick::stack_batches([&](const torch::Tensor& x) {
    auto ids = x.select(1, 0).to(torch::kInt64);
    {
      std::lock_guard<std::mutex> g(seen_mutex);
      auto acc = ids.accessor<int64_t, 1>();
      for (int64_t r = 0; r < acc.size(0); ++r) ++seen_count[static_cast<size_t>(acc[r])];
    }
    return x * 2 + 1;
  });
  // A small queue, so try_submit is refused and retried (submit() blocks instead).
  TensorBatcher batcher(fn, BatcherOptions()
                                .max_batch_size(64)
                                .max_delay(200us)
                                .num_workers(2)
                                .max_queue_size(32)
                                .queue_full_policy(QueueFullPolicy::kBlock)
                                .block_timeout(10s));
  std::atomic<int64_t> correct{0}, wrong{0}, answered{0}, refused{0};
  std::vector<std::atomic<int>> answers(kThreads * kPerThread);
  std::vector<std::thread> clients;
  for (int t = 0; t < kThreads; ++t) {
    clients.emplace_back([&, t] {
      std::deque<std::pair<int64_t, std::future<torch::Tensor>>> inflight;
      for (int64_t i = 0; i < kPerThread; ++i) {
        const int64_t id = t * kPerThread + i;
        if (i % 2 == 0) {
          inflight.emplace_back(id, batcher.submit(request(id)));
          if (inflight.size() >= 2) {
            auto& [fid, f] = inflight.front();
            auto y = f.get();
            (y[0].item<double>() == 2.0 * fid + 1 ? correct : wrong)++;
            ++answers[static_cast<size_t>(fid)];
            inflight.pop_front();
          }
          continue;
        }
        auto x = request(id);
        for (;;) {  // full: try again (the caller still holds x)
          const auto a =
              batcher.try_submit(std::move(x), [&, id](wick::BatcherAnswer<torch::Tensor> r) {
                const auto& y = r.value();
                (y[0].item<double>() == 2.0 * id + 1 ? correct : wrong)++;
                ++answers[static_cast<size_t>(id)];
                ++answered;
              });
          if (a == wick::Admission::kAccepted) break;
          ASSERT_EQ(a, wick::Admission::kQueueFull);
          ASSERT_TRUE(x.defined());
          ++refused;
          std::this_thread::yield();
        }
      }
      while (!inflight.empty()) {
        auto& [fid, f] = inflight.front();
        auto y = f.get();
        (y[0].item<double>() == 2.0 * fid + 1 ? correct : wrong)++;
        ++answers[static_cast<size_t>(fid)];
        inflight.pop_front();
      }
    });
  }
  for (auto& c : clients) c.join();
  batcher.shutdown();  // drains: every accepted callback has run when it returns
  EXPECT_EQ(correct.load(), kThreads * kPerThread);
  EXPECT_EQ(wrong.load(), 0);
  int64_t not_once = 0, not_answered_once = 0;
  for (int c : seen_count) not_once += c != 1;
  for (auto& a : answers) not_answered_once += a.load() != 1;
  EXPECT_EQ(not_once, 0);
  EXPECT_EQ(not_answered_once, 0);
  auto st = batcher.stats();
  EXPECT_EQ(st.requests_succeeded, kThreads * kPerThread);
  EXPECT_EQ(st.requests_rejected, refused.load());
  std::printf("[ stats    ] %lld batches, mean size %.1f, %lld refusals retried\n",
              static_cast<long long>(st.batches_run), st.mean_batch_size,
              static_cast<long long>(refused.load()));
}

// A worker back from a batch runs what queued meanwhile at once; with
// run_waiting_when_busy(false) it waits for a full batch or max_delay, as an
// idle worker does.
TEST(DynamicBatcherTest, RequestsQueuedDuringABatchRunAtOnceUnlessToldToWait) {
  for (bool run_waiting : {true, false}) {
    SCOPED_TRACE(run_waiting ? "run_waiting_when_busy" : "wait");
    RecordingModel model;
    std::promise<void> open;
    model.gate = open.get_future().share();
    TensorBatcher batcher(
        recording(model),
        BatcherOptions().max_batch_size(4).max_delay(2s).run_waiting_when_busy(run_waiting));
    std::vector<std::future<torch::Tensor>> first;
    for (int64_t i = 0; i < 4; ++i) first.push_back(batcher.submit(request(i)));  // full: runs
    model.entered.get_future().wait();
    std::vector<std::future<torch::Tensor>> during;
    for (int64_t i = 4; i < 6; ++i) during.push_back(batcher.submit(request(i)));
    const auto t0 = Clock::now();
    open.set_value();
    for (auto& f : first) f.get();
    const bool soon = during[0].wait_for(1s) == std::future_status::ready;
    EXPECT_EQ(soon, run_waiting);
    for (int64_t i = 0; i < 2; ++i)
      EXPECT_TRUE(
          wick::testing::tensors_equal(during[static_cast<size_t>(i)].get(), expected(4 + i)));
    if (!run_waiting) EXPECT_GE(Clock::now() - t0, 1900ms);  // their max_delay
    batcher.shutdown();
    EXPECT_EQ(model.sizes, std::vector<int64_t>({4, 2}));
  }
}

// The try_submit example of docs/batching.md, as it is printed there.
TEST(DynamicBatcherTest, TrySubmitDocExample) {
  torch::manual_seed(0);
  torch::nn::Linear net(4, 3);
  net->eval();
  wick::TensorBatcher batcher(
      wick::stack_batches([&](const torch::Tensor& x) { return net->forward(x); }),
      wick::BatcherOptions().max_batch_size(16).max_queue_size(32));

  auto inputs = torch::randn({100, 4});
  std::vector<torch::Tensor> results(100);
  std::atomic<int64_t> answered{0}, refused{0};
  for (int64_t i = 0; i < 100; ++i) {
    torch::Tensor x = inputs[i];
    wick::Admission a = batcher.try_submit(
        std::move(x), [&results, &answered, i](wick::BatcherAnswer<torch::Tensor> r) {
          if (r.ok()) results[i] = std::move(r).value();  // on a worker thread: keep it short
          ++answered;
        });
    if (a != wick::Admission::kAccepted) ++refused;  // kQueueFull: x is still ours, retry or drop
  }
  batcher.shutdown();  // drains: every accepted request's callback has run

  EXPECT_EQ(answered.load() + refused.load(), 100);
  EXPECT_GT(answered.load(), 0);
  torch::NoGradGuard no_grad;
  auto reference = net->forward(inputs);
  int64_t checked = 0;
  for (int64_t i = 0; i < 100; ++i) {
    if (!results[static_cast<size_t>(i)].defined()) continue;
    WICK_EXPECT_CLOSE(results[static_cast<size_t>(i)], reference[i], 1e-6, 1e-6);
    ++checked;
  }
  EXPECT_EQ(checked, answered.load());
}

// An idle worker runs as soon as preferred_batch_size requests are queued,
// without waiting for max_delay; a worker back from a batch takes what came
// meanwhile, up to max_batch_size; a lone request waits for company. The model
// holds its first batch until released, so what is queued when is known, not
// left to the scheduler (TSan's slowness once let the worker finish before the
// rest were queued, and they then rightly waited the full max_delay).
TEST(DynamicBatcherTest, PreferredBatchSizeRunsWithoutWaitingForAFullBatch) {
  RecordingModel model;
  std::promise<void> release;
  model.gate = release.get_future().share();
  auto entered = model.entered.get_future();
  TensorBatcher batcher(recording(model),
                        BatcherOptions().max_batch_size(8).preferred_batch_size(3).max_delay(10s));
  std::vector<std::future<torch::Tensor>> fs;
  for (int64_t i = 0; i < 3; ++i) fs.push_back(batcher.submit(request(i)));
  ASSERT_EQ(entered.wait_for(5s), std::future_status::ready);  // 3 queued: no 10 s wait
  for (int64_t i = 3; i < 8; ++i) fs.push_back(batcher.submit(request(i)));
  release.set_value();
  for (int64_t i = 0; i < 8; ++i) {
    ASSERT_EQ(fs[static_cast<size_t>(i)].wait_for(5s), std::future_status::ready) << i;
    EXPECT_TRUE(wick::testing::tensors_equal(fs[static_cast<size_t>(i)].get(), expected(i))) << i;
  }
  batcher.shutdown();
  // The preferred 3, then the 5 queued during it at once, more than preferred.
  EXPECT_EQ(model.sizes, std::vector<int64_t>({3, 5}));

  RecordingModel idle_model;
  TensorBatcher idle(recording(idle_model),
                     BatcherOptions().max_batch_size(8).preferred_batch_size(3).max_delay(10s));
  auto lone = idle.submit(request(9));
  EXPECT_EQ(lone.wait_for(200ms), std::future_status::timeout);  // 1 < 3: waits for company
  std::vector<std::future<torch::Tensor>> company;
  for (int64_t i = 10; i < 12; ++i) company.push_back(idle.submit(request(i)));
  ASSERT_EQ(lone.wait_for(5s), std::future_status::ready);
  EXPECT_TRUE(wick::testing::tensors_equal(lone.get(), expected(9)));
  idle.shutdown();
  EXPECT_EQ(idle_model.sizes, std::vector<int64_t>({3}));
  EXPECT_THROWS_WITH(TensorBatcher(recording(idle_model),
                                   BatcherOptions().max_batch_size(4).preferred_batch_size(5)),
                     "preferred_batch_size must be in [0, max_batch_size = 4], got 5");
}

// stack_batches splits the model's output into one row per request: under
// InferenceMode straight over the output's storage, otherwise through unbind.
// Either way each answer is the row unbind would give (values, shape, strides,
// storage), for outputs of 1, 2 and 3 dims, non-contiguous ones included.
TEST(DynamicBatcherTest, AnswersAreTheRowsOfTheModelsOutput) {
  std::vector<std::function<torch::Tensor(const torch::Tensor&)>> models = {
      [](const torch::Tensor& x) { return x.sum(1); },                      // [B]
      [](const torch::Tensor& x) { return x * 2 + 1; },                     // [B, 2]
      [](const torch::Tensor& x) { return (x * 3).t().contiguous().t(); },  // strided
      [](const torch::Tensor& x) {
        return x.unsqueeze(2).expand({-1, -1, 3});
      },  // stride 0
  };
  for (bool inference : {true, false}) {
    for (size_t m = 0; m < models.size(); ++m) {
      auto fn = wick::stack_batches(models[m]);
      std::vector<torch::Tensor> xs;
      for (int64_t i = 0; i < 5; ++i) xs.push_back(request(i));
      torch::Tensor whole = models[m](torch::stack(xs));
      std::vector<torch::Tensor> rows;
      if (inference) {
        c10::InferenceMode guard;
        rows = fn(std::vector<torch::Tensor>(xs));
      } else {
        rows = fn(std::vector<torch::Tensor>(xs));
      }
      ASSERT_EQ(rows.size(), 5u);
      for (int64_t i = 0; i < 5; ++i) {
        const auto& r = rows[static_cast<size_t>(i)];
        SCOPED_TRACE("model " + std::to_string(m) + " row " + std::to_string(i) +
                     (inference ? " inference" : ""));
        EXPECT_EQ(r.sizes(), whole[i].sizes());
        EXPECT_EQ(r.strides(), whole[i].strides());
        EXPECT_EQ(r.is_inference(), inference);
        EXPECT_TRUE(r.is_alias_of(rows[0]));  // one output, shared
        EXPECT_TRUE(wick::testing::tensors_equal(r, whole[i]));
        EXPECT_TRUE(wick::testing::tensors_equal(r.clone() + 0, whole[i] + 0));
      }
    }
  }
}

// after_batch runs once per batch, on the worker, after every request of the
// batch has its answer, with how many were answered.
TEST(DynamicBatcherTest, AfterBatchHookRunsOnceEveryAnswerOfTheBatchIsDelivered) {
  std::atomic<int64_t> callbacks{0}, hook_calls{0}, hook_total{0}, early{0};
  TensorBatcher batcher(
      wick::stack_batches([](const torch::Tensor& x) { return x * 2 + 1; }),
      BatcherOptions().max_batch_size(4).max_delay(5ms).after_batch([&](int64_t answered) {
        ++hook_calls;
        hook_total += answered;
        if (callbacks.load() < hook_total.load()) ++early;
      }));
  for (int64_t i = 0; i < 10; ++i) {
    auto x = request(i);
    ASSERT_EQ(batcher.try_submit(std::move(x),
                                 [&](wick::BatcherAnswer<torch::Tensor> r) {
                                   EXPECT_TRUE(r.ok());
                                   ++callbacks;
                                 }),
              wick::Admission::kAccepted);
  }
  batcher.shutdown();
  EXPECT_EQ(callbacks.load(), 10);
  EXPECT_EQ(hook_total.load(), 10);
  EXPECT_EQ(hook_calls.load(), batcher.stats().batches_run);
  EXPECT_EQ(early.load(), 0);
}
