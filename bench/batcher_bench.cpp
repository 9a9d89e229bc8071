// wick-bench batcher: what dynamic batching buys a server whose requests come
// one at a time from many clients, what the batcher costs per request, and
// what it serves when offered more than it can.
//
// Two models, each behind a wick::InferenceSession (eval mode, InferenceMode,
// warmed up): the Fashion-MNIST CNN of examples/fmnist (conv32-conv64-fc128-
// fc10) and the MLP 784-512-256-10, with seeded random weights, on random
// 1x28x28 images. For each model, these cases:
//   batched    `clients` clients, each sending `requests` images one at a time
//              (try_submit, wait for the answer, send the next), driven by
//              --client-threads threads (the cores the workers leave, at
//              least 1) as an RPC server's I/O threads
//              would: a thread sleeps until the after_batch hook posts it once
//              per batch (a batch-level promise), through a
//              TensorBatcher(max_batch_size, preferred_batch_size, max_delay);
//              the batcher's breakdown says where a request's time went;
//   batched_thread_per_client  the same with a thread per client;
//   batched_future  a thread per client with submit() and std::future::get();
//   unbatched  a thread per client (futures) with max_batch_size 1;
//   ceiling    the same session on pre-formed batches of max_batch_size (what
//              the model can do when batching costs nothing), run right before
//              and right after `batched`, whose round's ceiling is their mean;
//   ceiling_1  the same on batches of one: ceiling / ceiling_1 is what batching
//              can gain at most over serving requests singly (a model that is
//              compute-bound at batch 1 gains little however well it batches).
// Throughput is requests per second of wall time; latency is measured by the
// clients (submit() to the answer). Every figure is the median over `repeats`
// rounds (cases alternate within a round), and every ratio the median of the
// rounds' own ratios (the machine's speed drifts between rounds). The bound on
// p99 latency is max_delay + 2 x one full batch's compute: a request may arrive
// just after a batch left, wait for it to finish, then for its own.
//
// overload (the --overload-models, MLP by default): for each level the
// batcher's capacity is measured right before it (a refill thread keeps
// max_queue_size requests in flight, so the queue never runs dry); then paced
// open-loop load
// (load threads offering requests at fixed times, whatever the answers) at
// 2x, 5x and 10x that capacity for --overload-seconds, through try_submit
// with a queue of two batches (--overload-queue), --load-threads (the cores
// the workers leave, at least 1) each
// waking at most every --pace-us (200) to send the arrivals due; then the
// capacity again. Goodput is the served rate over the mean of the two
// capacities; every request is answered exactly once (its callback), or
// refused at admission; served latency (try_submit to the callback) against
// what the configuration promises under overload: max_delay + (queue /
// max_batch + 1) batch times at the level's capacity; RSS sampled every 100 ms.

#include "bench_common.h"

#include <wick/batcher.h>
#include <wick/inference.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <semaphore.h>
#include <wick/meters.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <future>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace wick_bench {

namespace {

using Clock = std::chrono::steady_clock;

struct BatcherBenchOptions {
  int threads = 1;
  int clients = 64;
  int64_t requests = 100;  // per client
  int64_t max_batch = 64;
  int64_t max_delay_us = 2000;
  int64_t preferred_batch = 0;  // -1: max_batch / 2
  int client_threads = 0;       // the threads the batched case's clients run on; 0: cores - workers
  int64_t workers = 1;
  bool wait_when_busy = false;
  int64_t idle_spin_us = -1;  // -1: the batcher's default
  int repeats = 0;            // 0: 5 for the CNN, 15 for the MLP (rounds_for)
  uint64_t seed = 0;
  std::string models = "cnn,mlp";
  std::string cases = "serving,rejection,overload";
  std::string overload_models = "mlp";
  std::vector<double> overload_levels{2, 5, 10};
  double overload_seconds = 30;
  int64_t overload_queue = 0;  // 0: 2 x max_batch
  int load_threads = 0;        // 0: the cores left beside the workers (at least 1)
  int64_t pace_us = 200;
  double capacity_seconds = 3;
};

constexpr double kUnbatchedGoal = 5.0;  // batched / unbatched throughput, at least
constexpr double kCeilingGoal = 0.8;    // batched / ceiling throughput, at least
constexpr double kGoodputGoal = 0.8;    // served / capacity under overload, at least

torch::nn::Sequential make_model(const std::string& name, uint64_t seed) {
  namespace nn = torch::nn;
  torch::manual_seed(seed);
  if (name == "mlp") {
    return nn::Sequential(nn::Flatten(), nn::Linear(784, 512), nn::ReLU(), nn::Linear(512, 256),
                          nn::ReLU(), nn::Linear(256, 10));
  }
  TORCH_CHECK(name == "cnn", "wick-bench batcher: --models takes cnn and mlp, got ", name);
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, 32, 3).padding(1)), nn::ReLU(),
                        nn::MaxPool2d(2), nn::Conv2d(nn::Conv2dOptions(32, 64, 3).padding(1)),
                        nn::ReLU(), nn::MaxPool2d(2), nn::Flatten(), nn::Linear(64 * 7 * 7, 128),
                        nn::ReLU(), nn::Linear(128, 10));
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

// Serving rounds for a model: --repeats, else 5 for the CNN (about 15 s a
// round) and 15 for the MLP (about 2 s a round, each case a tenth of a second:
// more of them keep one slow stretch of the machine out of the median).
int rounds_for(const std::string& model, const BatcherBenchOptions& o) {
  if (o.repeats > 0) return o.repeats;
  return model == "mlp" ? 15 : 5;
}

std::chrono::microseconds idle_spin(const BatcherBenchOptions& o) {
  return o.idle_spin_us >= 0 ? std::chrono::microseconds(o.idle_spin_us)
                             : wick::BatcherOptions().idle_spin();
}

int64_t preferred_batch(const BatcherBenchOptions& o) {
  return o.preferred_batch >= 0 ? o.preferred_batch : o.max_batch / 2;
}

struct ServeRun {
  double requests_per_s = 0, p50_ms = 0, p99_ms = 0, mean_batch = 0, mean_ms = 0;
  int64_t wrong = 0;  // answers that differ from the offline ones
  wick::BatcherBreakdown breakdown;
};

// How a client sends and waits:
//   kTrySubmit  try_submit; the answer's callback posts the semaphore of the
//               client's thread (no future, no allocation);
//   kFuture     submit() and std::future::get().
enum class ClientApi { kTrySubmit, kFuture };

// sem_wait, again when a signal interrupts it.
void wait_on(sem_t& sem) {
  while (sem_wait(&sem) != 0 && errno == EINTR) {
  }
}

// A client thread of the kTrySubmit case: it drives one or more clients
// (--client-threads), each with one request in flight. An answer's callback
// stores it in the client's slot and marks the thread; the batcher's
// after_batch hook then posts each marked thread's semaphore once: a thread
// is woken once per batch, after the batch's answers are all in (a
// batch-level promise), not once per answer in the middle of them.
struct ClientThread {
  struct Slot {
    std::atomic<bool> done{false};
    torch::Tensor y;
    bool ok = false;
    int64_t request = -1;
    Clock::time_point sent;
  };
  sem_t answered{};
  std::atomic<bool> marked{false};
  std::vector<Slot> slots;
  explicit ClientThread(size_t clients) : slots(clients) { sem_init(&answered, 0, 0); }
  ~ClientThread() { sem_destroy(&answered); }
  ClientThread(const ClientThread&) = delete;
  ClientThread& operator=(const ClientThread&) = delete;
  void wait() { wait_on(answered); }
  void wake_if_marked() {
    if (marked.exchange(false, std::memory_order_acq_rel)) sem_post(&answered);
  }
};

// `clients` threads send images[i] for i = c, c + clients, ...; every answer is
// checked, after the clock stopped, against the offline logits (tolerance:
// batch composition may change the last bits). The requests are sliced before
// the clock starts, so the clients' own tensor work is not counted.
ServeRun run_serving(const wick::InferenceSession& session, const torch::Tensor& images,
                     const torch::Tensor& expected, const BatcherBenchOptions& o, int64_t max_batch,
                     ClientApi api, int threads) {
  threads = std::max(1, std::min(threads, o.clients));
  std::vector<std::unique_ptr<ClientThread>> client_threads;
  for (int t = 0; api == ClientApi::kTrySubmit && t < threads; ++t) {
    client_threads.push_back(std::make_unique<ClientThread>(
        static_cast<size_t>((o.clients - t + threads - 1) / threads)));
  }
  auto options = wick::BatcherOptions()
                     .max_batch_size(max_batch)
                     .preferred_batch_size(std::min(max_batch, preferred_batch(o)))
                     .max_delay(std::chrono::microseconds(max_batch == 1 ? 0 : o.max_delay_us))
                     .run_waiting_when_busy(!o.wait_when_busy)
                     .idle_spin(idle_spin(o))
                     .num_workers(o.workers)
                     .max_queue_size(std::max<int64_t>(1024, o.clients));
  if (api == ClientApi::kTrySubmit) {
    options.after_batch([&client_threads](int64_t) {
      for (auto& t : client_threads) t->wake_if_marked();
    });
  }
  wick::TensorBatcher batcher(session.batch_fn(), options);
  const int64_t n = images.size(0);
  const std::vector<torch::Tensor> requests = images.unbind(0);
  std::vector<torch::Tensor> answers(static_cast<size_t>(n));
  // Client c sends requests c, c + clients, ..., one at a time; client thread
  // t drives clients t, t + threads, ...
  std::vector<std::vector<double>> lat(static_cast<size_t>(threads));
  std::atomic<int64_t> wrong{0};
  const auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      auto& l = lat[static_cast<size_t>(t)];
      std::vector<int> mine;
      for (int c = t; c < o.clients; c += threads) mine.push_back(c);
      if (api == ClientApi::kFuture) {  // one client per thread here
        for (int c : mine) {
          for (int64_t i = c; i < n; i += o.clients) {
            const auto sent = Clock::now();
            try {
              answers[static_cast<size_t>(i)] =
                  batcher.submit(requests[static_cast<size_t>(i)]).get();
            } catch (...) {
              ++wrong;
              continue;
            }
            l.push_back(std::chrono::duration<double, std::milli>(Clock::now() - sent).count());
          }
        }
        return;
      }
      ClientThread& me = *client_threads[static_cast<size_t>(t)];
      auto send = [&](size_t k, int64_t i) {
        auto& slot = me.slots[k];
        slot.done.store(false, std::memory_order_relaxed);
        slot.request = i;
        slot.sent = Clock::now();
        torch::Tensor x = requests[static_cast<size_t>(i)];
        auto* s = &slot;
        auto* thread = &me;
        const auto a =
            batcher.try_submit(std::move(x), [s, thread](wick::BatcherAnswer<torch::Tensor> r) {
              s->ok = r.ok();
              if (s->ok) s->y = std::move(r).value();
              s->done.store(true, std::memory_order_release);
              thread->marked.store(true, std::memory_order_release);  // after_batch wakes it
            });
        if (a != wick::Admission::kAccepted) {
          ++wrong;
          slot.request = -1;
        }
      };
      size_t in_flight = 0;
      for (size_t k = 0; k < mine.size(); ++k) {
        if (mine[k] < n) {
          send(k, mine[k]);
          in_flight += me.slots[k].request >= 0;
        }
      }
      while (in_flight > 0) {
        me.wait();
        for (size_t k = 0; k < mine.size(); ++k) {
          auto& slot = me.slots[k];
          if (slot.request < 0 || !slot.done.load(std::memory_order_acquire)) continue;
          const int64_t i = slot.request;
          l.push_back(std::chrono::duration<double, std::milli>(Clock::now() - slot.sent).count());
          if (slot.ok) {
            answers[static_cast<size_t>(i)] = std::move(slot.y);
          } else {
            ++wrong;
          }
          slot.request = -1;
          --in_flight;
          if (i + o.clients < n) {
            send(k, i + o.clients);
            in_flight += slot.request >= 0;
          }
        }
      }
    });
  }
  for (auto& t : pool) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  batcher.shutdown();
  for (int64_t i = 0; i < n; ++i) {
    const auto& y = answers[static_cast<size_t>(i)];
    if (y.defined() && !torch::allclose(y, expected[i], 1e-4, 1e-5)) ++wrong;
  }
  std::vector<double> all;
  for (auto& l : lat) all.insert(all.end(), l.begin(), l.end());
  ServeRun r;
  r.requests_per_s = static_cast<double>(n) / wall;
  r.p50_ms = percentile(all, 0.50);
  r.p99_ms = percentile(all, 0.99);
  double sum = 0;
  for (double v : all) sum += v;
  r.mean_ms = all.empty() ? 0 : sum / static_cast<double>(all.size());
  const auto st = batcher.stats();
  r.mean_batch = st.mean_batch_size;
  r.breakdown = st.breakdown;
  r.wrong = wrong.load();
  return r;
}

struct CeilingRun {
  double requests_per_s = 0, batch_ms = 0;
};

// The same images on pre-formed batches of max_batch, in order, run on a
// fresh thread as the batcher's worker is (a thread's first torch ops may see
// other thread-pool settings than the main thread's).
CeilingRun run_ceiling_here(const wick::InferenceSession& session, const torch::Tensor& images,
                            int64_t max_batch) {
  const int64_t n = images.size(0);
  std::vector<torch::Tensor> batches;
  for (int64_t s = 0; s < n; s += max_batch)
    batches.push_back(images.narrow(0, s, std::min(max_batch, n - s)));
  std::vector<double> full_batch_ms;
  const auto t0 = Clock::now();
  for (const auto& b : batches) {
    const auto b0 = Clock::now();
    session.run(b);
    if (b.size(0) == max_batch) {
      full_batch_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - b0).count());
    }
  }
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  return CeilingRun{static_cast<double>(n) / wall,
                    full_batch_ms.empty() ? 0.0 : median(full_batch_ms)};
}

CeilingRun run_ceiling(const wick::InferenceSession& session, const torch::Tensor& images,
                       int64_t max_batch) {
  CeilingRun r;
  std::exception_ptr error;
  std::thread t([&] {
    try {
      r = run_ceiling_here(session, images, max_batch);
    } catch (...) {
      error = std::current_exception();
    }
  });
  t.join();
  if (error) std::rethrow_exception(error);
  return r;
}

struct ModelFigures {
  std::vector<double> batched_rps, future_rps, tpc_rps, unbatched_rps, ceiling_rps, ceiling1_rps,
      batched_p50, batched_p99, future_p99, tpc_p99, unbatched_p99, batched_mean_batch, batch_ms;
  std::vector<ServeRun> batched_runs, tpc_runs;
  int64_t wrong = 0;
};

// Where a batched request's time went, per request, microseconds: the
// batcher's stages and the client's wake-up (its own latency less the
// batcher's, i.e. from the callback posting to the client running again).
Json breakdown_json(const ServeRun& r) {
  const auto& b = r.breakdown;
  Json j;
  j["queue"] = b.queue_us;
  j["handoff"] = b.handoff_us;
  j["collate"] = b.collate_us;
  j["model"] = b.model_us;
  j["split"] = b.split_us;
  j["answer"] = b.answer_us;
  const double batcher =
      b.queue_us + b.handoff_us + b.collate_us + b.model_us + b.split_us + b.answer_us;
  j["wakeup"] = std::max(0.0, 1e3 * r.mean_ms - batcher);
  j["client_mean"] = 1e3 * r.mean_ms;
  return j;
}

Json model_line(const std::string& model, const ModelFigures& f, const BatcherBenchOptions& o,
                int threads) {
  Json j;
  j["bench"] = "batcher";
  j["model"] = model;
  j["batched_requests_per_s"] = median(f.batched_rps);
  j["batched_future_requests_per_s"] = median(f.future_rps);
  j["batched_thread_per_client_requests_per_s"] = median(f.tpc_rps);
  j["unbatched_requests_per_s"] = median(f.unbatched_rps);
  j["ceiling_requests_per_s"] = median(f.ceiling_rps);
  j["ceiling_1_requests_per_s"] = median(f.ceiling1_rps);
  // Ratios are the median of each round's own ratio: a round's cases run
  // back to back (a fraction of a second for the MLP), while this machine's
  // speed drifts by tens of percent over seconds (measured: the MLP's
  // pre-formed batches at 75k-100k requests/s from one half second to the
  // next), which a ratio of medians taken from different rounds would carry.
  j["batching_gain_bound"] = median_ratio(f.ceiling_rps, f.ceiling1_rps);
  j["batched_vs_unbatched"] = median_ratio(f.batched_rps, f.unbatched_rps);
  j["batched_vs_ceiling"] = median_ratio(f.batched_rps, f.ceiling_rps);
  j["batched_future_vs_ceiling"] = median_ratio(f.future_rps, f.ceiling_rps);
  j["batched_thread_per_client_vs_ceiling"] = median_ratio(f.tpc_rps, f.ceiling_rps);
  j["batched_p50_ms"] = median(f.batched_p50);
  j["batched_p99_ms"] = median(f.batched_p99);
  j["batched_future_p99_ms"] = median(f.future_p99);
  j["batched_thread_per_client_p99_ms"] = median(f.tpc_p99);
  j["unbatched_p99_ms"] = median(f.unbatched_p99);
  j["batched_mean_batch"] = median(f.batched_mean_batch);
  j["client_threads"] = std::max(1, std::min(o.client_threads, o.clients));
  j["batch_compute_ms"] = median(f.batch_ms);
  j["p99_bound_ms"] = static_cast<double>(o.max_delay_us) / 1000.0 + 2.0 * median(f.batch_ms);
  // The breakdown of the round whose throughput is the median.
  size_t mid = 0;
  for (size_t i = 0; i < f.batched_runs.size(); ++i) {
    if (f.batched_runs[i].requests_per_s == median(f.batched_rps)) mid = i;
  }
  if (!f.batched_runs.empty()) j["batched_breakdown_us"] = breakdown_json(f.batched_runs[mid]);
  for (size_t i = 0; i < f.tpc_runs.size(); ++i) {
    if (f.tpc_runs[i].requests_per_s == median(f.tpc_rps))
      j["batched_thread_per_client_breakdown_us"] = breakdown_json(f.tpc_runs[i]);
  }
  j["runs_batched_requests_per_s"] = f.batched_rps;
  j["runs_batched_future_requests_per_s"] = f.future_rps;
  j["runs_batched_thread_per_client_requests_per_s"] = f.tpc_rps;
  j["runs_unbatched_requests_per_s"] = f.unbatched_rps;
  j["runs_ceiling_requests_per_s"] = f.ceiling_rps;
  std::vector<double> per_round;
  for (size_t i = 0; i < std::min(f.batched_rps.size(), f.ceiling_rps.size()); ++i)
    per_round.push_back(f.batched_rps[i] / f.ceiling_rps[i]);
  j["runs_batched_vs_ceiling"] = per_round;
  j["runs_batched_p99_ms"] = f.batched_p99;
  j["wrong_answers"] = f.wrong;
  j["threads"] = threads;
  return j;
}

// ---------------------------------------------------------------- overload

struct OverloadRun {
  double factor = 0, target_rps = 0, offered_rps = 0, served_rps = 0, goodput = 0;
  int64_t offered = 0, served = 0, rejected_full = 0, rejected_other = 0, failed = 0;
  int64_t answered_twice = 0, answered_but_refused = 0, accepted_unanswered = 0;
  double p50_ms = 0, p99_ms = 0, max_ms = 0;
  double rss_start_mb = 0, rss_quarter_mb = 0, rss_peak_mb = 0, rss_end_mb = 0;
  double cpu_cores = 0;  // the process's CPU time over the level's wall time
  double mean_batch = 0;
  // Where the worker's time went during the load: on a CPU, waiting in a run
  // queue for one (preempted by another thread of this machine), and the
  // machine's steal (its hypervisor running other guests).
  double worker_run_s = 0, worker_wait_s = 0, steal_s = 0;
  // Served requests: when each was sent (microseconds after the start) and its
  // latency, for the late ones' timing once the level's bound is known.
  std::vector<uint32_t> sent_us;
  std::vector<float> latency_ms;
};

// The served requests later than `bound_ms`, and in how many distinct 100 ms
// stretches of the level they were sent: a stall (the worker descheduled, the
// machine slowed) makes a few stretches late; a batcher that falls behind,
// many.
struct Lateness {
  int64_t late = 0, windows = 0, windows_total = 0;
};

Lateness lateness(const OverloadRun& r, double bound_ms, double seconds) {
  Lateness l;
  std::vector<bool> hit(static_cast<size_t>(std::ceil(seconds * 10)) + 1, false);
  for (size_t i = 0; i < r.latency_ms.size(); ++i) {
    if (r.latency_ms[i] <= bound_ms) continue;
    ++l.late;
    const size_t w = std::min<size_t>(hit.size() - 1, r.sent_us[i] / 100000);
    l.windows += hit[w] ? 0 : 1;
    hit[w] = true;
  }
  l.windows_total = static_cast<int64_t>(hit.size()) - 1;
  return l;
}

// The overload case's queue: --overload-queue, else two batches (one waiting
// while one runs, so the worker never waits for the load's next wake-up).
int64_t overload_queue(const BatcherBenchOptions& o) {
  return o.overload_queue > 0 ? o.overload_queue : 2 * o.max_batch;
}

// What the configuration promises a served request under overload: the queue
// is full, so it waits for the queue ahead of it (max_queue_size /
// max_batch_size batches) and its own batch, plus max_delay, at the batch
// time of the level (max_batch_size over the capacity measured around it).
double overload_p99_bound_ms(const BatcherBenchOptions& o, double capacity) {
  const double batch_ms = 1000.0 * static_cast<double>(o.max_batch) / capacity;
  const double batches_ahead =
      static_cast<double>(overload_queue(o)) / static_cast<double>(o.max_batch);
  return static_cast<double>(o.max_delay_us) / 1000.0 + (batches_ahead + 1.0) * batch_ms;
}

wick::BatcherOptions overload_options(const BatcherBenchOptions& o) {
  return wick::BatcherOptions()
      .max_batch_size(o.max_batch)
      .max_delay(std::chrono::microseconds(o.max_delay_us))
      .run_waiting_when_busy(!o.wait_when_busy)
      .idle_spin(idle_spin(o))
      .num_workers(o.workers)
      .max_queue_size(overload_queue(o))
      .queue_full_policy(wick::QueueFullPolicy::kReject);
}

// Requests per second the batcher serves when it never waits for work:
// max_queue_size requests are kept in flight by a refill thread, which the
// after_batch hook wakes once per batch to resubmit as many as were answered.
// The requests come from another thread, as under overload (the load threads),
// so the worker does only the batcher's and the model's work; resubmitting
// from the answer callbacks instead would put every submission on the worker
// and understate the capacity (measured: 55-72k against 81k/s served under
// overload on 2 cores).
double measure_capacity(const wick::InferenceSession& session,
                        const std::vector<torch::Tensor>& pool, const BatcherBenchOptions& o) {
  std::atomic<bool> stop{false}, measuring{false};
  std::atomic<int64_t> served{0}, answered{0};
  sem_t batch_done;
  sem_init(&batch_done, 0, 0);
  int64_t next = 0;
  {
    auto options = overload_options(o).after_batch([&](int64_t) { sem_post(&batch_done); });
    wick::TensorBatcher batcher(session.batch_fn(), options);
    auto submit = [&](int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        torch::Tensor x = pool[static_cast<size_t>(next++ % static_cast<int64_t>(pool.size()))];
        (void)batcher.try_submit(std::move(x), [&](wick::BatcherAnswer<torch::Tensor> r) {
          if (measuring.load(std::memory_order_relaxed) && r.ok())
            served.fetch_add(1, std::memory_order_relaxed);
          answered.fetch_add(1, std::memory_order_release);
        });
      }
    };
    std::thread refill([&] {
      submit(batcher.options().max_queue_size());
      while (!stop.load()) {
        wait_on(batch_done);
        submit(answered.exchange(0, std::memory_order_acquire));
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    served = 0;
    measuring = true;
    const auto t0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::duration<double>(o.capacity_seconds));
    const int64_t n = served.load();
    const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    measuring = false;
    stop = true;
    sem_post(&batch_done);
    refill.join();
    batcher.shutdown();
    sem_destroy(&batch_done);
    return static_cast<double>(n) / elapsed;
  }
}

// One overload level: `load_threads` threads offer requests at fixed times
// (thread t the arrivals t, t + T, t + 2T, ... of a schedule at `rate`), each
// through try_submit; an arrival the thread reaches late is sent at once
// (catching up, never beyond the end), and a thread sleeps at least --pace-us
// at a time, sending what fell due meanwhile (so the load costs a wake-up per
// pace, not per arrival). Each callback records its request's answer and
// latency (from try_submit to the callback).
OverloadRun run_overload_level(const wick::InferenceSession& session,
                               const std::vector<torch::Tensor>& pool, const BatcherBenchOptions& o,
                               double capacity, double factor) {
  OverloadRun r;
  r.factor = factor;
  r.target_rps = factor * capacity;
  const double seconds = o.overload_seconds;
  const auto max_ids = static_cast<size_t>(1.05 * r.target_rps * seconds) + 4096;
  // Per request: how try_submit answered (1 accepted, 2 queue full, 3 shut down)
  // and how many times its callback ran (2 ok answers, 1 error answers, counted).
  std::unique_ptr<uint8_t[]> admitted(new uint8_t[max_ids]());
  std::unique_ptr<std::atomic<uint8_t>[]> answers(new std::atomic<uint8_t>[max_ids]);
  for (size_t i = 0; i < max_ids; ++i) answers[i].store(0, std::memory_order_relaxed);
  std::mutex lat_mutex;
  // Served latencies, written in place: the buffer is touched before the
  // load starts, so RSS sampled during it shows the batcher, not this record.
  std::vector<float> latencies(static_cast<size_t>(1.5 * capacity * seconds) + 1024, 0.0f);
  std::vector<uint32_t> sent_at(latencies.size(), 0);
  size_t latency_count = 0;
  std::atomic<int64_t> failed{0};

  // RSS every 100 ms from before the load starts to after the last answer.
  std::vector<std::pair<double, int64_t>> rss;
  std::atomic<bool> sampling{true};
  const auto t0 = Clock::now();
  std::thread sampler([&] {
    while (sampling.load()) {
      rss.emplace_back(std::chrono::duration<double>(Clock::now() - t0).count(),
                       wick::host_memory().rss_bytes);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });

  struct Context {
    std::atomic<uint8_t>* answers;
    std::mutex* lat_mutex;
    std::vector<float>* latencies;
    std::vector<uint32_t>* sent_at;
    size_t* latency_count;
    std::atomic<int64_t>* failed;
    Clock::time_point start;
  } ctx{answers.get(),  &lat_mutex, &latencies,         &sent_at,
        &latency_count, &failed,    Clock::time_point()};
  constexpr int kTimeBits = 26;  // microseconds since the start: 67 s
  double elapsed = 0;
  wick::BatcherStats st;
  {
    wick::TensorBatcher batcher(session.batch_fn(), overload_options(o));
    const SchedSample sched0 = sched_sample("wick-batcher");
    const Stopwatch watch;
    const auto start = Clock::now() + std::chrono::milliseconds(20);
    ctx.start = start;
    const auto end =
        start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    const int threads = o.load_threads;
    const auto step = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(threads / r.target_rps));
    const auto pace =
        std::chrono::duration_cast<Clock::duration>(std::chrono::microseconds(o.pace_us));
    std::vector<std::thread> load;
    std::vector<int64_t> issued(static_cast<size_t>(threads), 0);
    for (int t = 0; t < threads; ++t) {
      load.emplace_back([&, t] {
        auto next = start + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(t / r.target_rps));
        int64_t k = 0;
        for (;;) {
          const auto now = Clock::now();
          if (now >= end) break;
          while (next <= now && next < end) {
            const auto id = static_cast<uint64_t>(k * threads + t);
            if (id >= max_ids) break;
            torch::Tensor x = pool[id % pool.size()];
            const auto us = static_cast<uint64_t>(
                std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start)
                    .count());
            const uint64_t packed = (id << kTimeBits) | (us & ((uint64_t{1} << kTimeBits) - 1));
            const Context* c = &ctx;
            const auto a = batcher.try_submit(
                std::move(x), [c, packed](wick::BatcherAnswer<torch::Tensor> answer) {
                  const auto now_us = static_cast<uint64_t>(
                      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - c->start)
                          .count());
                  const uint64_t sent = packed & ((uint64_t{1} << kTimeBits) - 1);
                  c->answers[packed >> kTimeBits].fetch_add(answer.ok() ? 2 : 1,
                                                            std::memory_order_relaxed);
                  if (!answer.ok()) {
                    ++*c->failed;
                    return;
                  }
                  std::lock_guard<std::mutex> g(*c->lat_mutex);
                  if (*c->latency_count < c->latencies->size()) {
                    (*c->sent_at)[*c->latency_count] = static_cast<uint32_t>(sent);
                    (*c->latencies)[(*c->latency_count)++] =
                        static_cast<float>(now_us - sent) * 1e-3f;
                  }
                });
            admitted[id] = a == wick::Admission::kAccepted    ? 1
                           : a == wick::Admission::kQueueFull ? 2
                                                              : 3;
            ++k;
            next += step;
          }
          if (next >= end) break;
          // At most one wake-up per pace: it sends every arrival due by then.
          std::this_thread::sleep_until(std::max(next, now + pace));
        }
        issued[static_cast<size_t>(t)] = k;
      });
    }
    for (auto& t : load) t.join();
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    r.cpu_cores = watch.cpu_s() / watch.wall_s();
    const SchedSample sched1 = sched_sample("wick-batcher");
    r.worker_run_s = sched1.run_s - sched0.run_s;
    r.worker_wait_s = sched1.wait_s - sched0.wait_s;
    r.steal_s = sched1.steal_s - sched0.steal_s;
    batcher.shutdown();  // drains: every accepted request is answered before this returns
    st = batcher.stats();
    for (int t = 0; t < threads; ++t) {
      for (int64_t k = 0; k < issued[static_cast<size_t>(t)]; ++k) {
        const auto id = static_cast<size_t>(k * threads + t);
        const uint8_t a = admitted[id];
        const uint8_t n = answers[id].load();
        ++r.offered;
        if (a == 1) {
          r.served += n == 2;
          r.accepted_unanswered += n == 0;
          r.answered_twice += n > 2;
        } else {
          (a == 2 ? r.rejected_full : r.rejected_other)++;
          r.answered_but_refused += n != 0;
        }
      }
    }
  }
  sampling = false;
  sampler.join();
  r.failed = failed.load();
  r.offered_rps = static_cast<double>(r.offered) / seconds;
  r.served_rps = static_cast<double>(r.served) / std::max(seconds, elapsed);
  r.goodput = r.served_rps / capacity;
  r.mean_batch = st.mean_batch_size;
  std::vector<double> lat(latencies.begin(),
                          latencies.begin() + static_cast<std::ptrdiff_t>(latency_count));
  r.p50_ms = percentile(lat, 0.50);
  r.p99_ms = percentile(lat, 0.99);
  r.max_ms = lat.empty() ? 0 : *std::max_element(lat.begin(), lat.end());
  latencies.resize(latency_count);
  sent_at.resize(latency_count);
  r.latency_ms = std::move(latencies);
  r.sent_us = std::move(sent_at);
  const double mb = 1.0 / (1 << 20);
  if (!rss.empty()) {
    r.rss_start_mb = static_cast<double>(rss.front().second) * mb;
    r.rss_end_mb = static_cast<double>(rss.back().second) * mb;
    for (const auto& [t, v] : rss) {
      r.rss_peak_mb = std::max(r.rss_peak_mb, static_cast<double>(v) * mb);
      if (t <= 0.02 + seconds / 4) r.rss_quarter_mb = static_cast<double>(v) * mb;
    }
  }
  return r;
}

Json overload_line(const std::string& model, const OverloadRun& r, double capacity, double bound_ms,
                   const BatcherBenchOptions& o) {
  Json j;
  j["bench"] = "batcher_overload";
  j["model"] = model;
  j["factor"] = r.factor;
  j["capacity_requests_per_s"] = capacity;
  j["target_requests_per_s"] = r.target_rps;
  j["offered_requests_per_s"] = r.offered_rps;
  j["served_requests_per_s"] = r.served_rps;
  j["goodput_ratio"] = r.goodput;
  j["offered"] = r.offered;
  j["served"] = r.served;
  j["rejected_queue_full"] = r.rejected_full;
  j["rejected_other"] = r.rejected_other;
  j["failed"] = r.failed;
  j["answered_twice"] = r.answered_twice;
  j["answered_but_refused"] = r.answered_but_refused;
  j["accepted_unanswered"] = r.accepted_unanswered;
  j["served_p50_ms"] = r.p50_ms;
  j["served_p99_ms"] = r.p99_ms;
  j["served_max_ms"] = r.max_ms;
  j["p99_bound_ms"] = bound_ms;
  const Lateness late = lateness(r, bound_ms, o.overload_seconds);
  j["served_late"] = late.late;
  j["served_late_fraction"] = r.latency_ms.empty() ? 0.0
                                                   : static_cast<double>(late.late) /
                                                         static_cast<double>(r.latency_ms.size());
  j["late_windows_100ms"] = late.windows;
  j["windows_100ms"] = late.windows_total;
  j["mean_batch"] = r.mean_batch;
  j["process_cpu_cores"] = r.cpu_cores;
  j["worker_cpu_share"] = r.worker_run_s / o.overload_seconds;
  j["worker_run_queue_wait_ms"] = 1e3 * r.worker_wait_s;
  j["steal_ms"] = 1e3 * r.steal_s;
  j["rss_start_mb"] = r.rss_start_mb;
  j["rss_quarter_mb"] = r.rss_quarter_mb;
  j["rss_peak_mb"] = r.rss_peak_mb;
  j["rss_end_mb"] = r.rss_end_mb;
  j["seconds"] = o.overload_seconds;
  j["load_threads"] = o.load_threads;
  j["pace_us"] = o.pace_us;
  j["max_queue_size"] = overload_queue(o);
  return j;
}

// What refusing one request costs its client, nanoseconds of wall time per
// request with the queue held full (the model waits on a gate): submit() and
// the future's BatcherError caught, against try_submit's status. `threads`
// clients refuse at once, as under overload.
struct RejectionCost {
  double submit_ns = 0, try_submit_ns = 0;
};

RejectionCost measure_rejection(int threads, int64_t per_thread) {
  std::promise<void> gate;
  std::shared_future<void> open = gate.get_future().share();
  std::promise<void> entered;
  std::atomic<bool> entered_set{false};
  wick::TensorBatcher batcher(wick::stack_batches([&](const torch::Tensor& x) {
                                if (!entered_set.exchange(true)) entered.set_value();
                                open.wait();
                                return x;
                              }),
                              wick::BatcherOptions()
                                  .max_batch_size(1)
                                  .max_delay(std::chrono::microseconds(0))
                                  .max_queue_size(1));
  auto running = batcher.submit(torch::zeros({4}));
  entered.get_future().wait();
  auto queued = batcher.submit(torch::zeros({4}));  // the queue's one place: full from here
  const torch::Tensor x = torch::zeros({4});
  auto timed = [&](bool try_api) {
    std::atomic<int64_t> refused{0};
    const auto t0 = Clock::now();
    std::vector<std::thread> clients;
    for (int t = 0; t < threads; ++t) {
      clients.emplace_back([&] {
        int64_t n = 0;
        for (int64_t i = 0; i < per_thread; ++i) {
          torch::Tensor request = x;
          if (try_api) {
            n += batcher.try_submit(std::move(request), [](wick::BatcherAnswer<torch::Tensor>) {
            }) == wick::Admission::kQueueFull;
          } else {
            auto f = batcher.submit(std::move(request));
            try {
              f.get();
            } catch (const wick::BatcherError& e) {
              n += e.kind() == wick::BatcherError::Kind::kQueueFull;
            }
          }
        }
        refused += n;
      });
    }
    for (auto& c : clients) c.join();
    const double ns = std::chrono::duration<double, std::nano>(Clock::now() - t0).count();
    TORCH_CHECK(refused.load() == threads * per_thread,
                "wick-bench batcher: rejection: ", refused.load(), " of ", threads * per_thread,
                " refused");
    return ns / static_cast<double>(threads * per_thread);
  };
  RejectionCost c;
  timed(false);  // warm both paths
  timed(true);
  c.submit_ns = timed(false);
  c.try_submit_ns = timed(true);
  gate.set_value();
  running.get();
  queued.get();
  return c;
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  for (size_t start = 0; start <= s.size();) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    if (comma > start) out.push_back(s.substr(start, comma - start));
    start = comma + 1;
  }
  return out;
}

std::string factor_key(double f) {
  std::ostringstream k;
  k << f;
  return k.str() + "x";
}

void run_batcher_bench(BatcherBenchOptions o, const GlobalOptions& global) {
  TORCH_CHECK(o.clients >= 1, "wick-bench batcher: --clients must be >= 1, got ", o.clients);
  TORCH_CHECK(o.requests >= 1, "wick-bench batcher: --requests must be >= 1, got ", o.requests);
  TORCH_CHECK(o.max_batch >= 1, "wick-bench batcher: --max-batch must be >= 1, got ", o.max_batch);
  TORCH_CHECK(o.max_delay_us >= 0, "wick-bench batcher: --max-delay-us must be >= 0, got ",
              o.max_delay_us);
  TORCH_CHECK(o.repeats >= 0, "wick-bench batcher: --repeats must be >= 0, got ", o.repeats);
  TORCH_CHECK(o.overload_seconds > 0, "wick-bench batcher: --overload-seconds must be > 0, got ",
              o.overload_seconds);
  TORCH_CHECK(o.load_threads >= 0, "wick-bench batcher: --load-threads must be >= 0, got ",
              o.load_threads);
  TORCH_CHECK(o.client_threads >= 0, "wick-bench batcher: --client-threads must be >= 0, got ",
              o.client_threads);
  // By default one core per worker and the rest for the clients or the load:
  // a thread that shares the worker's core preempts it, and can hold the
  // queue's lock while it is preempted itself. More client threads than
  // cores also split 64 closed-loop clients into two halves that alternate
  // (the worker, back from a batch, finds half of them resubmitted), which
  // halves the MLP's batches (measured: 4 threads on 2 cores, mean batch 32).
  const int spare_cores = std::max(
      1, static_cast<int>(std::thread::hardware_concurrency()) - static_cast<int>(o.workers));
  if (o.load_threads == 0) o.load_threads = spare_cores;
  if (o.client_threads == 0) o.client_threads = spare_cores;
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();

  const auto models = split_list(o.models);
  TORCH_CHECK(!models.empty(), "wick-bench batcher: --models is empty");
  const auto cases = split_list(o.cases);
  auto has_case = [&](const char* c) {
    return std::find(cases.begin(), cases.end(), c) != cases.end();
  };
  for (const auto& c : cases) {
    TORCH_CHECK(c == "serving" || c == "overload" || c == "rejection",
                "wick-bench batcher: --cases takes serving, overload and rejection, got ", c);
  }
  const auto overload_models = split_list(o.overload_models);

  Json s;
  s["bench"] = "batcher";
  s["summary"] = true;
  bool first = true;
  bool overload_ok = true;
  for (const auto& name : models) {
    wick::InferenceSession session(make_model(name, o.seed),
                                   wick::InferenceSessionOptions()
                                       .num_threads(threads)
                                       .warmup_shape({o.max_batch, 1, 28, 28})
                                       .warmup_iterations(5));
    auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1);
    const auto images = torch::randn({o.clients * o.requests, 1, 28, 28}, gen);
    const auto expected =
        session.run(images);              // offline answers the served ones are checked against
    session.run(images.narrow(0, 0, 1));  // warms the batch-of-one shapes too
    ModelFigures f;
    const bool serving = has_case("serving");
    const int rounds = rounds_for(name, o);
    for (int r = 0; serving && r < rounds; ++r) {
      auto ceiling_1 = [&] {
        f.ceiling1_rps.push_back(run_ceiling(session, images, 1).requests_per_s);
      };
      // The headline case between two ceilings: its round's ceiling is their
      // mean, as close in time to it as the machine's drift allows.
      auto batched_between_ceilings = [&] {
        const auto before = run_ceiling(session, images, o.max_batch);
        auto b = run_serving(session, images, expected, o, o.max_batch, ClientApi::kTrySubmit,
                             o.client_threads);
        const auto after = run_ceiling(session, images, o.max_batch);
        f.ceiling_rps.push_back(0.5 * (before.requests_per_s + after.requests_per_s));
        f.batch_ms.push_back(0.5 * (before.batch_ms + after.batch_ms));
        f.batched_rps.push_back(b.requests_per_s);
        f.batched_p50.push_back(b.p50_ms);
        f.batched_p99.push_back(b.p99_ms);
        f.batched_mean_batch.push_back(b.mean_batch);
        f.batched_runs.push_back(b);
        f.wrong += b.wrong;
      };
      auto batched_thread_per_client = [&] {
        auto b = run_serving(session, images, expected, o, o.max_batch, ClientApi::kTrySubmit,
                             o.clients);
        f.tpc_rps.push_back(b.requests_per_s);
        f.tpc_p99.push_back(b.p99_ms);
        f.tpc_runs.push_back(b);
        f.wrong += b.wrong;
      };
      auto batched_future = [&] {
        auto b =
            run_serving(session, images, expected, o, o.max_batch, ClientApi::kFuture, o.clients);
        f.future_rps.push_back(b.requests_per_s);
        f.future_p99.push_back(b.p99_ms);
        f.wrong += b.wrong;
      };
      auto unbatched = [&] {
        auto u = run_serving(session, images, expected, o, 1, ClientApi::kFuture, o.clients);
        f.unbatched_rps.push_back(u.requests_per_s);
        f.unbatched_p99.push_back(u.p99_ms);
        f.wrong += u.wrong;
      };
      if (r % 2 == 0) {
        batched_between_ceilings();
        batched_thread_per_client();
        batched_future();
        unbatched();
        ceiling_1();
      } else {
        ceiling_1();
        unbatched();
        batched_future();
        batched_thread_per_client();
        batched_between_ceilings();
      }
    }
    if (serving) {
      Json line = model_line(name, f, o, threads);
      out.emit(line);
      TORCH_CHECK(f.wrong == 0, "wick-bench batcher: ", f.wrong, " answers of the ", name,
                  " model differ from its offline outputs");
      // The summary's headline figures are the first model's (the CNN by default).
      const std::string suffix = first ? "" : "_" + name;
      for (const char* k : {"batched_vs_unbatched", "batched_vs_ceiling",
                            "batched_thread_per_client_vs_ceiling", "batched_future_vs_ceiling"})
        s[k + suffix] = line[k];
      s["p99_ms" + suffix] = line["batched_p99_ms"];
      s["p99_bound_ms" + suffix] = line["p99_bound_ms"];
      s["batching_gain_bound" + suffix] = line["batching_gain_bound"];
      s["breakdown_us" + suffix] = line["batched_breakdown_us"];
      s["ceiling_goal_met" + suffix] = line["batched_vs_ceiling"].get<double>() >= kCeilingGoal;
      s["p99_goal_met" + suffix] =
          line["batched_p99_ms"].get<double>() <= line["p99_bound_ms"].get<double>();
      if (first) {
        s["model"] = name;
        s["unbatched_goal_met"] = line["batched_vs_unbatched"].get<double>() >= kUnbatchedGoal;
      }
      first = false;
    }

    if (has_case("overload") &&
        std::find(overload_models.begin(), overload_models.end(), name) != overload_models.end()) {
      const std::vector<torch::Tensor> pool = images.unbind(0);
      // The capacity is measured right before and right after each level, and
      // the level's goodput is over their mean: on a shared machine the
      // batcher's capacity drifts by tens of percent over minutes, which a
      // single measurement at the start would put into every ratio.
      double capacity = 0;
      for (double factor : o.overload_levels) {
        const double before = measure_capacity(session, pool, o);
        auto r = run_overload_level(session, pool, o, before, factor);
        const double after = measure_capacity(session, pool, o);
        const double level_capacity = 0.5 * (before + after);
        r.goodput = r.served_rps / level_capacity;
        capacity = std::max(capacity, level_capacity);
        const double bound = overload_p99_bound_ms(o, level_capacity);
        Json line = overload_line(name, r, level_capacity, bound, o);
        line["capacity_before_requests_per_s"] = before;
        line["capacity_after_requests_per_s"] = after;
        out.emit(line);
        const std::string key =
            "_" + factor_key(factor) + (name == overload_models[0] ? "" : "_" + name);
        s["goodput_ratio" + key] = r.goodput;
        s["overload_capacity_requests_per_s" + key] = level_capacity;
        s["overload_p99_ms" + key] = r.p99_ms;
        s["overload_p99_bound_ms" + key] = bound;
        s["overload_rss_growth_mb" + key] = r.rss_end_mb - r.rss_quarter_mb;
        const bool once = r.answered_twice == 0 && r.answered_but_refused == 0 &&
                          r.accepted_unanswered == 0 && r.failed == 0;
        s["overload_exactly_once" + key] = once;
        overload_ok = overload_ok && once && r.goodput >= kGoodputGoal && r.p99_ms <= bound;
      }
      s["overload_capacity_requests_per_s" +
        std::string(name == overload_models[0] ? "" : "_" + name)] = capacity;
    }
  }
  if (has_case("rejection")) {
    // Per refused request: one client thread, then four refusing at once.
    for (int t : {1, 4}) {
      const auto c = measure_rejection(t, t == 1 ? 200000 : 100000);
      Json j;
      j["bench"] = "batcher_rejection";
      j["client_threads"] = t;
      j["submit_future_ns"] = c.submit_ns;
      j["try_submit_ns"] = c.try_submit_ns;
      j["ratio"] = c.submit_ns / c.try_submit_ns;
      out.emit(j);
      s["rejection_ns_submit_" + std::to_string(t) + "t"] = c.submit_ns;
      s["rejection_ns_try_submit_" + std::to_string(t) + "t"] = c.try_submit_ns;
    }
  }
  if (has_case("overload")) {
    s["overload_goal_met"] = overload_ok;
    s["overload_seconds"] = o.overload_seconds;
    s["overload_queue"] = overload_queue(o);
    s["load_threads"] = o.load_threads;
    s["pace_us"] = o.pace_us;
  }
  s["clients"] = o.clients;
  s["requests_per_client"] = o.requests;
  s["max_batch"] = o.max_batch;
  s["max_delay_us"] = o.max_delay_us;
  s["preferred_batch"] = preferred_batch(o);
  s["client_threads"] = o.client_threads;
  s["workers"] = o.workers;
  s["run_waiting_when_busy"] = !o.wait_when_busy;
  s["idle_spin_us"] = idle_spin(o).count();
  s["threads"] = threads;
  s["repeats"] = o.repeats;
  for (const auto& name : models) s["rounds_" + name] = rounds_for(name, o);
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_batcher_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<BatcherBenchOptions>();
  CLI::App* sub = app.add_subcommand("batcher",
                                     "DynamicBatcher: 64 one-at-a-time clients, batched vs "
                                     "unbatched vs pre-formed batches (CNN, MLP); overload at "
                                     "2x, 5x, 10x capacity");
  sub->add_option("--threads", o->threads, "intra-op threads for torch")->capture_default_str();
  sub->add_option("--clients", o->clients, "client threads, each with one request in flight")
      ->capture_default_str();
  sub->add_option("--requests", o->requests, "requests per client per case")->capture_default_str();
  sub->add_option("--max-batch", o->max_batch,
                  "the batcher's max_batch_size (and the ceiling's batch)")
      ->capture_default_str();
  sub->add_option("--max-delay-us", o->max_delay_us, "the batcher's max_delay, microseconds")
      ->capture_default_str();
  sub->add_option("--workers", o->workers, "the batcher's num_workers")->capture_default_str();
  sub->add_option("--client-threads", o->client_threads,
                  "threads the batched case drives its --clients clients from (each client one "
                  "request in flight; 0: the cores beside --workers, >= 1); "
                  "batched_thread_per_client gives each client its own")
      ->capture_default_str();
  sub->add_option("--preferred-batch", o->preferred_batch,
                  "the batcher's preferred_batch_size in the serving cases (0: none, -1: "
                  "--max-batch / 2)")
      ->capture_default_str();
  sub->add_flag("--wait-when-busy", o->wait_when_busy,
                "run_waiting_when_busy(false): a worker back from a batch waits for a full batch "
                "or max_delay as an idle one does");
  sub->add_option("--idle-spin-us", o->idle_spin_us,
                  "the batcher's idle_spin, microseconds (-1: its default, 200; 0: a worker "
                  "sleeps at once)")
      ->capture_default_str();
  sub->add_option("--repeats", o->repeats,
                  "serving rounds; figures are medians (0: 5 for the CNN, 15 for the MLP, whose "
                  "rounds take a second)")
      ->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the weights and the images")->capture_default_str();
  sub->add_option("--models", o->models,
                  "comma-separated: cnn, mlp (the first gives the summary's headline)")
      ->capture_default_str();
  sub->add_option("--cases", o->cases, "comma-separated: serving, rejection, overload")
      ->capture_default_str();
  sub->add_option("--overload-models", o->overload_models,
                  "models the overload case runs (of --models)")
      ->capture_default_str();
  sub->add_option("--overload-levels", o->overload_levels,
                  "offered load as multiples of the measured capacity")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--overload-seconds", o->overload_seconds, "seconds of load per level")
      ->capture_default_str();
  sub->add_option("--overload-queue", o->overload_queue,
                  "max_queue_size under overload (0: 2 x --max-batch, two batches)")
      ->capture_default_str();
  sub->add_option("--load-threads", o->load_threads,
                  "threads pacing the overload's arrivals (0: the cores beside --workers, >= 1)")
      ->capture_default_str();
  sub->add_option("--pace-us", o->pace_us,
                  "a load thread's shortest sleep: each wake-up sends the arrivals due by then")
      ->capture_default_str();
  sub->add_option("--capacity-seconds", o->capacity_seconds,
                  "seconds the capacity is measured over (after 0.5 s of warm-up)")
      ->capture_default_str();
  sub->callback([o, global] { run_batcher_bench(*o, *global); });
}

}  // namespace wick_bench
