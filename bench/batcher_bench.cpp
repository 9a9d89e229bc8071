// wick-bench batcher: what dynamic batching buys a server whose requests come
// one at a time from many clients.
//
// Two models, each behind a wick::InferenceSession (eval mode, InferenceMode,
// warmed up): the Fashion-MNIST CNN of examples/fmnist (conv32-conv64-fc128-
// fc10) and the MLP 784-512-256-10, with seeded random weights, on random
// 1x28x28 images. For each model, three cases:
//   batched    `clients` threads, each sending `requests` images one at a time
//              (submit, wait for the answer, send the next) through a
//              TensorBatcher(max_batch_size, max_delay);
//   unbatched  the same clients and batcher with max_batch_size 1;
//   ceiling    the same session on pre-formed batches of max_batch_size (what
//              the model can do when batching costs nothing);
//   ceiling_1  the same on batches of one: ceiling / ceiling_1 is what batching
//              can gain at most over serving requests singly (a model that is
//              compute-bound at batch 1 gains little however well it batches).
// Throughput is requests per second of wall time; latency is measured by the
// clients (submit() to the answer). Every figure is the median over `repeats`
// rounds (cases alternate within a round). The bound on p99 latency is
// max_delay + 2 x one full batch's compute: a request may arrive just after a
// batch left, wait for it to finish, then for its own.

#include "bench_common.h"

#include <wick/batcher.h>
#include <wick/inference.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
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
  int64_t workers = 1;
  int repeats = 3;
  uint64_t seed = 0;
  std::string models = "cnn,mlp";
};

constexpr double kUnbatchedGoal = 5.0;  // batched / unbatched throughput, at least
constexpr double kCeilingGoal = 0.8;    // batched / ceiling throughput, at least

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

struct ServeRun {
  double requests_per_s = 0, p50_ms = 0, p99_ms = 0, mean_batch = 0;
  int64_t wrong = 0;  // answers that differ from the offline ones
};

// `clients` threads send images[i] for i = c, c + clients, ...; every answer is
// checked, after the clock stopped, against the offline logits (tolerance:
// batch composition may change the last bits). The requests are sliced before
// the clock starts, so the clients' own tensor work is not counted.
ServeRun run_serving(const wick::InferenceSession& session, const torch::Tensor& images,
                     const torch::Tensor& expected, const BatcherBenchOptions& o,
                     int64_t max_batch) {
  wick::TensorBatcher batcher(
      session.batch_fn(),
      wick::BatcherOptions()
          .max_batch_size(max_batch)
          .max_delay(std::chrono::microseconds(max_batch == 1 ? 0 : o.max_delay_us))
          .num_workers(o.workers)
          .max_queue_size(std::max<int64_t>(1024, o.clients)));
  const int64_t n = images.size(0);
  const std::vector<torch::Tensor> requests = images.unbind(0);
  std::vector<torch::Tensor> answers(static_cast<size_t>(n));
  std::vector<std::vector<double>> lat(static_cast<size_t>(o.clients));
  std::atomic<int64_t> wrong{0};
  const auto t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int c = 0; c < o.clients; ++c) {
    clients.emplace_back([&, c] {
      auto& l = lat[static_cast<size_t>(c)];
      l.reserve(static_cast<size_t>(o.requests));
      for (int64_t i = c; i < n; i += o.clients) {
        const auto sent = Clock::now();
        try {
          answers[static_cast<size_t>(i)] = batcher.submit(requests[static_cast<size_t>(i)]).get();
        } catch (...) {
          ++wrong;
          continue;
        }
        l.push_back(std::chrono::duration<double, std::milli>(Clock::now() - sent).count());
      }
    });
  }
  for (auto& t : clients) t.join();
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
  r.mean_batch = batcher.stats().mean_batch_size;
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
  std::vector<double> batched_rps, unbatched_rps, ceiling_rps, ceiling1_rps, batched_p50,
      batched_p99, unbatched_p99, batched_mean_batch, batch_ms;
  int64_t wrong = 0;
};

Json model_line(const std::string& model, const ModelFigures& f, const BatcherBenchOptions& o,
                int threads) {
  Json j;
  j["bench"] = "batcher";
  j["model"] = model;
  j["batched_requests_per_s"] = median(f.batched_rps);
  j["unbatched_requests_per_s"] = median(f.unbatched_rps);
  j["ceiling_requests_per_s"] = median(f.ceiling_rps);
  j["ceiling_1_requests_per_s"] = median(f.ceiling1_rps);
  j["batching_gain_bound"] = median(f.ceiling_rps) / median(f.ceiling1_rps);
  j["batched_vs_unbatched"] = median(f.batched_rps) / median(f.unbatched_rps);
  j["batched_vs_ceiling"] = median(f.batched_rps) / median(f.ceiling_rps);
  j["batched_p50_ms"] = median(f.batched_p50);
  j["batched_p99_ms"] = median(f.batched_p99);
  j["unbatched_p99_ms"] = median(f.unbatched_p99);
  j["batched_mean_batch"] = median(f.batched_mean_batch);
  j["batch_compute_ms"] = median(f.batch_ms);
  j["p99_bound_ms"] = static_cast<double>(o.max_delay_us) / 1000.0 + 2.0 * median(f.batch_ms);
  j["runs_batched_requests_per_s"] = f.batched_rps;
  j["runs_unbatched_requests_per_s"] = f.unbatched_rps;
  j["runs_ceiling_requests_per_s"] = f.ceiling_rps;
  j["runs_batched_p99_ms"] = f.batched_p99;
  j["wrong_answers"] = f.wrong;
  j["threads"] = threads;
  return j;
}

void run_batcher_bench(const BatcherBenchOptions& o, const GlobalOptions& global) {
  TORCH_CHECK(o.clients >= 1, "wick-bench batcher: --clients must be >= 1, got ", o.clients);
  TORCH_CHECK(o.requests >= 1, "wick-bench batcher: --requests must be >= 1, got ", o.requests);
  TORCH_CHECK(o.max_batch >= 1, "wick-bench batcher: --max-batch must be >= 1, got ", o.max_batch);
  TORCH_CHECK(o.max_delay_us >= 0, "wick-bench batcher: --max-delay-us must be >= 0, got ",
              o.max_delay_us);
  TORCH_CHECK(o.repeats >= 1, "wick-bench batcher: --repeats must be >= 1, got ", o.repeats);
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();

  std::vector<std::string> models;
  for (size_t start = 0; start <= o.models.size();) {
    size_t comma = o.models.find(',', start);
    if (comma == std::string::npos) comma = o.models.size();
    if (comma > start) models.push_back(o.models.substr(start, comma - start));
    start = comma + 1;
  }
  TORCH_CHECK(!models.empty(), "wick-bench batcher: --models is empty");

  Json s;
  s["bench"] = "batcher";
  s["summary"] = true;
  bool first = true;
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
    for (int r = 0; r < o.repeats; ++r) {
      auto ceiling = [&] {
        auto c = run_ceiling(session, images, o.max_batch);
        f.ceiling_rps.push_back(c.requests_per_s);
        f.batch_ms.push_back(c.batch_ms);
        f.ceiling1_rps.push_back(run_ceiling(session, images, 1).requests_per_s);
      };
      auto batched = [&] {
        auto b = run_serving(session, images, expected, o, o.max_batch);
        f.batched_rps.push_back(b.requests_per_s);
        f.batched_p50.push_back(b.p50_ms);
        f.batched_p99.push_back(b.p99_ms);
        f.batched_mean_batch.push_back(b.mean_batch);
        f.wrong += b.wrong;
      };
      auto unbatched = [&] {
        auto u = run_serving(session, images, expected, o, 1);
        f.unbatched_rps.push_back(u.requests_per_s);
        f.unbatched_p99.push_back(u.p99_ms);
        f.wrong += u.wrong;
      };
      if (r % 2 == 0) {
        ceiling();
        batched();
        unbatched();
      } else {
        unbatched();
        batched();
        ceiling();
      }
    }
    Json line = model_line(name, f, o, threads);
    out.emit(line);
    TORCH_CHECK(f.wrong == 0, "wick-bench batcher: ", f.wrong, " answers of the ", name,
                " model differ from its offline outputs");
    // The summary's headline figures are the first model's (the CNN by default).
    const std::string suffix = first ? "" : "_" + name;
    for (const char* k : {"batched_vs_unbatched", "batched_vs_ceiling"}) s[k + suffix] = line[k];
    s["p99_ms" + suffix] = line["batched_p99_ms"];
    s["p99_bound_ms" + suffix] = line["p99_bound_ms"];
    s["batching_gain_bound" + suffix] = line["batching_gain_bound"];
    if (first) {
      s["model"] = name;
      s["unbatched_goal_met"] = line["batched_vs_unbatched"].get<double>() >= kUnbatchedGoal;
      s["ceiling_goal_met"] = line["batched_vs_ceiling"].get<double>() >= kCeilingGoal;
      s["p99_goal_met"] =
          line["batched_p99_ms"].get<double>() <= line["p99_bound_ms"].get<double>();
    }
    first = false;
  }
  s["clients"] = o.clients;
  s["requests_per_client"] = o.requests;
  s["max_batch"] = o.max_batch;
  s["max_delay_us"] = o.max_delay_us;
  s["workers"] = o.workers;
  s["threads"] = threads;
  s["repeats"] = o.repeats;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_batcher_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<BatcherBenchOptions>();
  CLI::App* sub = app.add_subcommand("batcher",
                                     "DynamicBatcher: 64 one-at-a-time clients, batched vs "
                                     "unbatched vs pre-formed batches (CNN, MLP)");
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
  sub->add_option("--repeats", o->repeats, "rounds; figures are medians")->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the weights and the images")->capture_default_str();
  sub->add_option("--models", o->models,
                  "comma-separated: cnn, mlp (the first gives the summary's headline)")
      ->capture_default_str();
  sub->callback([o, global] { run_batcher_bench(*o, *global); });
}

}  // namespace wick_bench
