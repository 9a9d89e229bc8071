// wick-bench ddp: weak scaling of wick::DistributedDataParallel on this
// machine's CPUs: 2 ranks (one thread each) against 1 rank (one thread), the
// same batch per rank, on the MLP 784-512-256-10 and the CNN of
// examples/fmnist. Efficiency = throughput(2) / (2 x throughput(1)), with
// throughput = samples per second summed over the ranks.
//
// Every run is a fresh set of child processes of this binary
// (/proc/self/exe ddp --rank-child ...), with torchrun's variables for a
// 2-rank Gloo group over 127.0.0.1, or none for the 1-rank baseline (a world
// of one: the same DDP-wrapped loop, whose collectives are no-ops). Each
// child sets one torch thread, takes `warmup` untimed steps, times `steps`
// steps, and writes its figures (JSON) into a scratch folder that the parent
// reads. Runs of one model's cases alternate, round after round, and every
// figure is the median over the rounds.
//
// The loop is the hand-written one of docs/ddp.md (prepare_forward, forward,
// cross_entropy, zero_grad, backward, finalize_backward, step), with
// wick::FusedAdam(lr 1e-3) on random data (randn inputs, randint targets,
// a different stream per rank).

#include "bench_common.h"
#include "rank_processes.h"

#include <wick/ddp.h>
#include <wick/distributed.h>
#include <wick/optim.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace wick_bench {

namespace {

struct DdpBenchOptions {
  int64_t cnn_steps = 60;
  int64_t mlp_steps = 200;
  int64_t warmup = 10;
  int repeats = 3;
  int64_t batch = 64;
  double small_bucket_mb = 0.5;
  double lr = 1e-3;
  uint64_t seed = 0;
  int timeout_s = 300;
  std::string models = "cnn,mlp";
  // Set only in the children.
  bool rank_child = false;
  std::string model = "cnn";
  double bucket_cap_mb = 25.0;
  int64_t steps = 0;
  std::string out_dir;
};

constexpr double kEfficiencyGoal = 0.8;  // on the CNN, at least
constexpr double kDefaultBucketMb = 25.0;

torch::nn::Sequential make_model(const std::string& name) {
  namespace nn = torch::nn;
  if (name == "mlp") {
    nn::Linear fc1(784, 512);
    nn::Linear fc2(512, 256);
    nn::Linear fc3(256, 10);
    return nn::Sequential(nn::Flatten(), fc1, nn::ReLU(), fc2, nn::ReLU(), fc3);
  }
  TORCH_CHECK(name == "cnn", "wick-bench ddp: --model must be mlp or cnn, got ", name);
  nn::Conv2d conv1(nn::Conv2dOptions(1, 32, 3).padding(1));
  nn::Conv2d conv2(nn::Conv2dOptions(32, 64, 3).padding(1));
  nn::Linear fc1(64 * 7 * 7, 128);
  nn::Linear fc2(128, 10);
  return nn::Sequential(conv1, nn::ReLU(), nn::MaxPool2d(2), conv2, nn::ReLU(), nn::MaxPool2d(2),
                        nn::Flatten(), fc1, nn::ReLU(), fc2);
}

int64_t count_parameters(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------
// The child: one rank's run.

void run_rank_child(const DdpBenchOptions& o) {
  const int threads = set_torch_threads(1);
  auto pg = wick::init_process_group();
  const int64_t rank = pg->rank(), world = pg->world_size();
  torch::manual_seed(o.seed);
  auto model = make_model(o.model);
  wick::DistributedDataParallel ddp(
      model.ptr(), pg, wick::DistributedDataParallelOptions().bucket_cap_mb(o.bucket_cap_mb));
  wick::FusedAdam optimizer(model->parameters(), wick::FusedAdamOptions(o.lr));

  // A small dataset of random batches, cycled through; each rank its own stream.
  constexpr int64_t kBatches = 8;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1 + static_cast<uint64_t>(rank));
  const std::vector<int64_t> shape = o.model == "cnn"
                                         ? std::vector<int64_t>{kBatches * o.batch, 1, 28, 28}
                                         : std::vector<int64_t>{kBatches * o.batch, 784};
  const auto x = torch::randn(shape, gen);
  const auto y = torch::randint(0, 10, {kBatches * o.batch}, gen, torch::kLong);

  double backward_s = 0, finalize_s = 0;
  int64_t in_backward_sum = 0;
  std::vector<double> backward_end;  // per timed step, on the machine's monotonic clock
  const auto step = [&](int64_t i, bool timed) {
    const int64_t b = i % kBatches;
    auto xb = x.narrow(0, b * o.batch, o.batch);
    auto yb = y.narrow(0, b * o.batch, o.batch);
    auto loss = torch::nn::functional::cross_entropy(ddp.forward(model, xb), yb);
    optimizer.zero_grad();
    const double t0 = now_s();
    loss.backward();
    const double t1 = now_s();
    ddp.finalize_backward();
    const double t2 = now_s();
    optimizer.step();
    if (timed) {
      backward_s += t1 - t0;
      finalize_s += t2 - t1;
      backward_end.push_back(t1);
      in_backward_sum += ddp.stats().last_buckets_launched_in_backward;
    }
  };
  for (int64_t i = 0; i < o.warmup; ++i) step(i, false);
  pg->barrier();
  Stopwatch sw;
  for (int64_t i = 0; i < o.steps; ++i) step(i, true);
  const double wall_s = sw.wall_s(), cpu_s = sw.cpu_s();
  const auto stats = ddp.stats();

  Json j;
  j["rank"] = rank;
  j["world_size"] = world;
  j["backend"] = pg->backend_name();
  j["threads"] = threads;
  j["parameters"] = count_parameters(*model);
  j["ms_per_step"] = 1e3 * wall_s / static_cast<double>(o.steps);
  j["cpu_ms_per_step"] = 1e3 * cpu_s / static_cast<double>(o.steps);
  j["backward_ms_per_step"] = 1e3 * backward_s / static_cast<double>(o.steps);
  j["finalize_ms_per_step"] = 1e3 * finalize_s / static_cast<double>(o.steps);
  j["num_buckets"] = stats.num_buckets;
  j["buckets_in_backward_per_step"] =
      static_cast<double>(in_backward_sum) / static_cast<double>(o.steps);
  j["last_buckets_launched_in_backward"] = stats.last_buckets_launched_in_backward;
  j["buckets_launched_in_finalize"] = stats.buckets_launched_in_finalize;
  j["synced_steps"] = stats.synced_steps;
  std::vector<int64_t> bucket_sizes;
  {
    std::map<std::string, int64_t> numel;
    for (const auto& item : model->named_parameters()) numel[item.key()] = item.value().numel();
    for (const auto& names : ddp.bucket_parameter_names()) {
      int64_t n = 0;
      for (const auto& name : names) n += numel[name];
      bucket_sizes.push_back(n);
    }
  }
  j["bucket_numels"] = bucket_sizes;
  j["backward_end_s"] = backward_end;

  if (world > 1) {
    // The same steps with no communication (under no_sync): the compute time
    // of a step while the other rank computes too, for comparison with the
    // synchronized step.
    {
      auto guard = ddp.no_sync();
      for (int64_t i = 0; i < std::min<int64_t>(o.warmup, 3); ++i) step(i, false);
      pg->barrier();
      Stopwatch nosync;
      for (int64_t i = 0; i < o.steps; ++i) step(i, false);
      j["no_sync_ms_per_step"] = 1e3 * nosync.wall_s() / static_cast<double>(o.steps);
      pg->barrier();
    }
    // Gloo's allreduce on loopback alone: one flat float tensor of the whole
    // model's size, and one of each bucket's size, while the other rank is idle
    // but for the same call.
    const auto time_allreduce = [&](int64_t numel) {
      auto flat = torch::ones({numel});
      for (int k = 0; k < 3; ++k) pg->allreduce_sum_async(flat)->wait();
      std::vector<double> ms;
      for (int k = 0; k < 20; ++k) {
        const double t0 = now_s();
        pg->allreduce_sum_async(flat)->wait();
        ms.push_back(1e3 * (now_s() - t0));
      }
      return median(ms);
    };
    j["allreduce_model_ms"] = time_allreduce(count_parameters(*model));
    std::vector<double> per_bucket;
    for (int64_t n : bucket_sizes) per_bucket.push_back(time_allreduce(n));
    j["allreduce_bucket_ms"] = per_bucket;
  }

  const std::string path = o.out_dir + "/rank" + std::to_string(rank) + ".json";
  std::ofstream out(path);
  TORCH_CHECK(out, "wick-bench ddp: cannot write ", path);
  out << j.dump() << "\n";
}

// ---------------------------------------------------------------------------
// The parent: starts the children and reads what they wrote.

// One run: `world` children (world 1: no torchrun variables, a world of one).
// Returns each rank's JSON; throws with the logs when a child fails.
std::vector<Json> run_children(const DdpBenchOptions& o, const std::string& model, int world,
                               double bucket_mb, int64_t steps) {
  ScratchFolder dir("ddp");
  const std::vector<std::string> args = {"/proc/self/exe",
                                         "ddp",
                                         "--rank-child",
                                         "--model",
                                         model,
                                         "--bucket-cap-mb",
                                         Json(bucket_mb).dump(),
                                         "--steps",
                                         std::to_string(steps),
                                         "--warmup",
                                         std::to_string(o.warmup),
                                         "--batch",
                                         std::to_string(o.batch),
                                         "--lr",
                                         Json(o.lr).dump(),
                                         "--seed",
                                         std::to_string(o.seed),
                                         "--out-dir",
                                         dir.path};
  return run_rank_processes(args, world, dir.path, o.timeout_s, "the " + model,
                            /*group_of_one=*/false);
}

// One case (model, ranks, bucket size): its runs, one entry per round.
struct DdpCase {
  std::string model;
  int world;
  double bucket_mb;
  std::vector<std::vector<Json>> runs;  // [round][rank]

  std::string name() const {
    std::ostringstream s;
    s << model << "_" << world << "rank";
    if (world > 1) s << "_bucket" << bucket_mb << "mb";
    return s.str();
  }
  // Per round, the slowest rank's value of `key` (the ranks wait for each other).
  std::vector<double> per_round_max(const char* key) const {
    std::vector<double> v;
    for (const auto& round : runs) {
      double m = 0;
      for (const auto& r : round) m = std::max(m, r.value(key, 0.0));
      v.push_back(m);
    }
    return v;
  }
  double med(const char* key) const { return median(per_round_max(key)); }
  // Per round, the median over steps of how far apart the ranks ended backward
  // (both read the same monotonic clock): time the earlier rank's allreduce
  // waits for the later one.
  double median_backward_end_skew_ms() const {
    std::vector<double> per_round;
    for (const auto& round : runs) {
      if (round.size() < 2) continue;
      const auto a = round[0]["backward_end_s"].get<std::vector<double>>();
      const auto b = round[1]["backward_end_s"].get<std::vector<double>>();
      std::vector<double> d;
      for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
        d.push_back(1e3 * std::abs(a[i] - b[i]));
      if (!d.empty()) per_round.push_back(median(d));
    }
    return per_round.empty() ? 0.0 : median(per_round);
  }
  const Json& rank0() const { return runs.front().front(); }
};

Json case_line(const DdpCase& c, const DdpCase* baseline, int64_t steps, const DdpBenchOptions& o) {
  Json j;
  j["bench"] = "ddp";
  j["case"] = c.name();
  j["model"] = c.model;
  j["ranks"] = c.world;
  j["threads_per_rank"] = c.rank0()["threads"];
  j["backend"] = c.rank0()["backend"];
  j["bucket_cap_mb"] = c.world > 1 ? Json(c.bucket_mb) : Json(nullptr);
  const double ms = c.med("ms_per_step");
  j["ms_per_step"] = ms;
  j["samples_per_s"] = 1e3 * static_cast<double>(c.world * o.batch) / ms;
  if (baseline != nullptr) {
    j["efficiency"] = baseline->med("ms_per_step") / ms;  // (2*b/ms) / (2 * b/ms1)
  }
  j["cpu_ms_per_step"] = c.med("cpu_ms_per_step");
  j["backward_ms_per_step"] = c.med("backward_ms_per_step");
  j["finalize_ms_per_step"] = c.med("finalize_ms_per_step");
  if (c.world > 1) {
    j["no_sync_ms_per_step"] = c.med("no_sync_ms_per_step");
    j["backward_end_skew_ms"] = c.median_backward_end_skew_ms();
    j["allreduce_model_ms"] = c.med("allreduce_model_ms");
    j["allreduce_bucket_ms"] = c.rank0()["allreduce_bucket_ms"];
    j["num_buckets"] = c.rank0()["num_buckets"];
    j["bucket_numels"] = c.rank0()["bucket_numels"];
    j["buckets_in_backward_per_step"] = c.rank0()["buckets_in_backward_per_step"];
    j["buckets_launched_in_finalize"] = c.rank0()["buckets_launched_in_finalize"];
  }
  j["parameters"] = c.rank0()["parameters"];
  j["batch_per_rank"] = o.batch;
  j["steps"] = steps;
  j["warmup"] = o.warmup;
  j["repeats"] = c.runs.size();
  j["runs_ms_per_step"] = c.per_round_max("ms_per_step");
  return j;
}

void run_ddp_bench(const DdpBenchOptions& o, const GlobalOptions& global) {
  if (o.rank_child) {
    TORCH_CHECK(o.steps >= 1, "wick-bench ddp: --steps must be >= 1, got ", o.steps);
    TORCH_CHECK(!o.out_dir.empty(), "wick-bench ddp: --rank-child needs --out-dir");
    run_rank_child(o);
    return;
  }
  TORCH_CHECK(o.cnn_steps >= 1, "wick-bench ddp: --cnn-steps must be >= 1, got ", o.cnn_steps);
  TORCH_CHECK(o.mlp_steps >= 1, "wick-bench ddp: --mlp-steps must be >= 1, got ", o.mlp_steps);
  TORCH_CHECK(o.warmup >= 0, "wick-bench ddp: --warmup must be >= 0, got ", o.warmup);
  TORCH_CHECK(o.repeats >= 1, "wick-bench ddp: --repeats must be >= 1, got ", o.repeats);
  TORCH_CHECK(o.batch >= 1, "wick-bench ddp: --batch must be >= 1, got ", o.batch);
  TORCH_CHECK(o.small_bucket_mb > 0, "wick-bench ddp: --small-bucket-mb must be > 0, got ",
              o.small_bucket_mb);
  TORCH_CHECK(o.models == "cnn,mlp" || o.models == "cnn" || o.models == "mlp",
              "wick-bench ddp: --models must be cnn,mlp, cnn or mlp, got ", o.models);
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();

  Json s;
  s["bench"] = "ddp";
  s["summary"] = true;
  std::vector<std::string> models;
  if (o.models.find("cnn") != std::string::npos) models.push_back("cnn");
  if (o.models.find("mlp") != std::string::npos) models.push_back("mlp");
  for (const auto& model : models) {
    const int64_t steps = model == "cnn" ? o.cnn_steps : o.mlp_steps;
    std::vector<DdpCase> cases = {{model, 1, kDefaultBucketMb, {}},
                                  {model, 2, kDefaultBucketMb, {}},
                                  {model, 2, o.small_bucket_mb, {}}};
    for (int r = 0; r < o.repeats; ++r) {
      // Rotate the order each round, so drifting load hits every case alike.
      for (size_t k = 0; k < cases.size(); ++k) {
        auto& c = cases[(k + static_cast<size_t>(r)) % cases.size()];
        c.runs.push_back(run_children(o, model, c.world, c.bucket_mb, steps));
      }
    }
    for (const auto& c : cases) out.emit(case_line(c, c.world > 1 ? &cases[0] : nullptr, steps, o));
    const double t1 = cases[0].med("ms_per_step");
    s["efficiency_" + model] = t1 / cases[1].med("ms_per_step");
    s["efficiency_" + model + "_small_buckets"] = t1 / cases[2].med("ms_per_step");
    s[model + "_1rank_ms_per_step"] = t1;
    s[model + "_2rank_ms_per_step"] = cases[1].med("ms_per_step");
    s[model + "_2rank_small_buckets_ms_per_step"] = cases[2].med("ms_per_step");
    s[model + "_2rank_no_sync_ms_per_step"] = cases[1].med("no_sync_ms_per_step");
    s[model + "_num_buckets"] = cases[1].rank0()["num_buckets"];
    s[model + "_num_buckets_small"] = cases[2].rank0()["num_buckets"];
    s[model + "_buckets_before_backward_end"] = cases[2].rank0()["buckets_in_backward_per_step"];
    s[model + "_allreduce_model_ms"] = cases[1].med("allreduce_model_ms");
    if (model == "cnn") {
      // The small-bucket CNN case: the default 25 MB makes one bucket of the
      // whole model, which can only start when backward is done.
      s["buckets_before_backward_end"] = cases[2].rank0()["buckets_in_backward_per_step"];
      s["buckets_before_backward_end_case"] = cases[2].name();
    }
  }
  if (s.contains("efficiency_cnn"))
    s["efficiency_goal_met"] = s["efficiency_cnn"].get<double>() >= kEfficiencyGoal;
  s["small_bucket_mb"] = o.small_bucket_mb;
  s["optimizer"] = "wick::FusedAdam";
  s["threads"] = 1;
  s["batch_per_rank"] = o.batch;
  s["cnn_steps"] = o.cnn_steps;
  s["mlp_steps"] = o.mlp_steps;
  s["warmup"] = o.warmup;
  s["repeats"] = o.repeats;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_ddp_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<DdpBenchOptions>();
  CLI::App* sub = app.add_subcommand("ddp",
                                     "DistributedDataParallel weak scaling: 2 ranks x 1 thread vs "
                                     "1 rank x 1 thread, CNN and MLP, FusedAdam");
  sub->add_option("--cnn-steps", o->cnn_steps, "timed steps per CNN run")->capture_default_str();
  sub->add_option("--mlp-steps", o->mlp_steps, "timed steps per MLP run")->capture_default_str();
  sub->add_option("--warmup", o->warmup, "untimed steps before each run's timed ones")
      ->capture_default_str();
  sub->add_option("--repeats", o->repeats, "runs (rounds) of each case; figures are medians")
      ->capture_default_str();
  sub->add_option("--batch", o->batch, "samples per batch per rank")->capture_default_str();
  sub->add_option("--small-bucket-mb", o->small_bucket_mb,
                  "bucket_cap_mb of the second 2-rank case (the first uses the default 25)")
      ->capture_default_str();
  sub->add_option("--lr", o->lr, "Adam's learning rate")->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the model's initialization and of the data")
      ->capture_default_str();
  sub->add_option("--models", o->models, "cnn,mlp, cnn or mlp")->capture_default_str();
  sub->add_option("--timeout", o->timeout_s,
                  "seconds a run's children may take before they are killed")
      ->capture_default_str();
  // The children's options, hidden from --help.
  sub->add_flag("--rank-child", o->rank_child)->group("");
  sub->add_option("--model", o->model)->group("");
  sub->add_option("--bucket-cap-mb", o->bucket_cap_mb)->group("");
  sub->add_option("--steps", o->steps)->group("");
  sub->add_option("--out-dir", o->out_dir)->group("");
  sub->callback([o, global] { run_ddp_bench(*o, *global); });
}

}  // namespace wick_bench
