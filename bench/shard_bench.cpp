// wick-bench shard: wick::ShardedDataParallel (ZeRO-1, ZeRO-2, full sharding)
// against wick's DDP and against Python's DDP, ZeroRedundancyOptimizer and
// FSDP2 (fully_shard), in the same run: 2 ranks, Gloo over 127.0.0.1, one
// torch thread per rank, the same model, initial weights, data and optimizer.
//
// The model: Linear(in_dim, width), `blocks` residual blocks
// x + fc2(gelu(fc1(layer_norm(x)))) (fc1 width->hidden, fc2 hidden->width),
// Linear(width, classes); 7.2M parameters at the defaults. Each block is a
// unit of full sharding: the forward runs it through wick::unit_call (Python:
// fully_shard on every block, then on the model). Cross-entropy on random
// data (per rank a generator seeded seed+1+rank: randn inputs, randint
// targets, 8 batches cycled), wick::FusedAdam(lr) against Python's
// Adam(lr, fused=True): both run at::_fused_adam_.
//
// Every run is a fresh pair of processes (rank_processes.h): this binary
// (`shard --rank-child --strategy ...`) for wick's cases, the venv's Python
// running bench/peers/shard_peer.py for Python's. Each rank takes `warmup`
// untimed steps, a barrier, times `steps` steps (phases apart), then reads its
// memory at rest (after the optimizer step) and the loss on a fixed batch.
// Cases alternate, round after round, in a rotating order; a case's figure is
// the median over rounds of the slower rank's.
//
// Summary: vs_python_zero (wick zero1 steps/s over Python ZeRO's), vs_python_fsdp
// (wick full over FSDP2), optimizer_state_ratio (a rank's optimizer state over a
// replica's, per strategy), param_ratio_at_rest (parameter bytes a rank holds
// between steps over a replica's parameter bytes), efficiency_vs_ddp (steps/s
// over wick DDP's), the goals, async_blocked_ratio (an asynchronous
// checkpoint's blocked time over a synchronous save's, of a >= 200 MB state,
// measured by checkpoint_bench.h's measure_async_checkpoint) and
// async_blocked_ratio_sharded (the same for a sharded save on 2 ranks:
// ShardedDataParallel::save_checkpoint_async against save_checkpoint).

#include "bench_common.h"
#include "checkpoint_bench.h"
#include "rank_processes.h"

#include <wick/checkpoint.h>
#include <wick/ddp.h>
#include <wick/distributed.h>
#include <wick/optim.h>
#include <wick/shard.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_set>
#include <vector>

namespace wick_bench {

namespace {

struct ShardBenchOptions {
  int64_t steps = 20;
  int64_t warmup = 5;
  int repeats = 3;
  int64_t batch = 64;
  int64_t in_dim = 256;
  int64_t width = 384;
  int64_t hidden = 1536;
  int64_t blocks = 6;
  int64_t classes = 10;
  double lr = 1e-3;
  uint64_t seed = 0;
  int timeout_s = 300;
  std::string cases = "all";
  bool no_python = false;
  bool quick = false;
  bool no_diagnostics = false;
  bool no_sharded_checkpoint = false;
  // Set only in the children.
  bool rank_child = false;
  std::string strategy = "ddp";
  bool diag = false;
  std::string out_dir;
};

constexpr double kVsPythonGoal = 1.0;  // wick's steps/s at least Python's
// A rank's share of the optimizer state and of the parameters at rest: 1/world
// up to the padding of each unit to a multiple of the world size.
constexpr double kShareTolerance = 1.01;

// Each wick case next to its Python counterpart: the rotation of the order from
// round to round keeps them adjacent (but for the pair it splits at the
// wrap), so that a round's pair meets about the same load.
const std::vector<std::string> kAllCases = {"wick_ddp",  "python_ddp",  "wick_zero1", "python_zero",
                                            "wick_full", "python_fsdp", "wick_zero2"};

// ---------------------------------------------------------------------------
// The model (bench/peers/shard_peer.py builds the same one).

struct ShardBlockImpl : torch::nn::Module {
  ShardBlockImpl(int64_t width, int64_t hidden) {
    // Made in this order, as Python's Block: the same draws from the seeded generator.
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    fc1 = register_module("fc1", torch::nn::Linear(width, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, width));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x + fc2(torch::gelu(fc1(norm(x)))); }
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(ShardBlock);

struct ShardModelImpl : torch::nn::Module {
  explicit ShardModelImpl(const ShardBenchOptions& o) {
    in = register_module("in", torch::nn::Linear(o.in_dim, o.width));
    for (int64_t i = 0; i < o.blocks; ++i) {
      blocks.push_back(register_module("block" + std::to_string(i), ShardBlock(o.width, o.hidden)));
    }
    out = register_module("out", torch::nn::Linear(o.width, o.classes));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = in(x);
    for (auto& b : blocks) h = wick::unit_call(*b, [&] { return b->forward(h); });
    return out(h);
  }
  std::vector<std::shared_ptr<torch::nn::Module>> units() const {
    std::vector<std::shared_ptr<torch::nn::Module>> u;
    for (const auto& b : blocks) u.push_back(b.ptr());
    return u;
  }
  torch::nn::Linear in{nullptr}, out{nullptr};
  std::vector<ShardBlock> blocks;
};
TORCH_MODULE(ShardModel);

ShardModel make_model(const ShardBenchOptions& o) {
  torch::manual_seed(o.seed);
  return ShardModel(o);
}

// Bytes of the distinct storages under `tensors`.
int64_t distinct_storage_bytes(const std::vector<torch::Tensor>& tensors) {
  std::unordered_set<const void*> seen;
  int64_t bytes = 0;
  for (const auto& t : tensors) {
    if (!t.defined()) continue;
    const auto* impl = t.storage().unsafeGetStorageImpl();
    if (impl->nbytes() == 0 || !seen.insert(impl).second) continue;
    bytes += static_cast<int64_t>(impl->nbytes());
  }
  return bytes;
}

int64_t peak_rss_kib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss);  // KiB on Linux
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------
// The child: one rank of a wick case.

// Gloo alone on loopback, while the other rank makes the same calls: the
// collectives the strategies use, on the whole model's and one block's size.
Json time_collectives(wick::ProcessGroup& pg, int64_t model_numel, int64_t block_numel) {
  const int64_t world = pg.world_size();
  Json j;
  // Median and best of 10 calls (the best is what a quiet machine gives).
  const auto time_ms = [&](const std::string& key, const std::function<void()>& call) {
    pg.barrier();
    for (int k = 0; k < 2; ++k) call();
    std::vector<double> ms;
    for (int k = 0; k < 10; ++k) {
      const double t0 = now_s();
      call();
      ms.push_back(1e3 * (now_s() - t0));
    }
    j[key + "_ms"] = median(ms);
    j[key + "_min_ms"] = *std::min_element(ms.begin(), ms.end());
  };
  for (const auto& [name, numel] : std::vector<std::pair<std::string, int64_t>>{
           {"model", model_numel}, {"block", block_numel}}) {
    const int64_t shard = (numel + world - 1) / world;
    auto full = torch::ones({shard * world});
    auto part = torch::ones({shard});
    time_ms("allreduce_" + name, [&] { pg.allreduce_sum_async(full)->wait(); });
    time_ms("all_gather_" + name, [&] { pg.all_gather_async(full, part)->wait(); });
    time_ms("reduce_scatter_" + name, [&] { pg.reduce_scatter_sum_async(part, full)->wait(); });
  }
  j["model_numel"] = model_numel;
  j["block_numel"] = block_numel;
  return j;
}

void run_rank_child(const ShardBenchOptions& o) {
  const int threads = set_torch_threads(1);
  auto pg = wick::init_process_group();
  const int64_t rank = pg->rank(), world = pg->world_size();
  const bool ddp_case = o.strategy == "ddp";
  const auto strategy =
      ddp_case ? wick::ShardingStrategy::kZero1 : wick::parse_sharding_strategy(o.strategy);

  auto model = make_model(o);
  int64_t param_numel = 0;
  for (const auto& p : model->parameters()) param_numel += p.numel();
  const int64_t replica_param_bytes = distinct_storage_bytes(model->parameters());

  const int64_t n = 8 * o.batch;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1 + static_cast<uint64_t>(rank));
  const auto x = torch::randn({n, o.in_dim}, gen);
  const auto y = torch::randint(0, o.classes, {n}, gen, torch::kLong);
  auto eval_gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1000);
  const auto x_eval = torch::randn({o.batch, o.in_dim}, eval_gen);
  const auto y_eval = torch::randint(0, o.classes, {o.batch}, eval_gen, torch::kLong);
  double init_loss = 0;
  {
    torch::NoGradGuard no_grad;
    init_loss = torch::nn::functional::cross_entropy(model->forward(x_eval), y_eval).item<double>();
  }

  wick::FusedAdam optimizer(model->parameters(), wick::FusedAdamOptions(o.lr));
  std::unique_ptr<wick::DistributedDataParallel> ddp;
  std::unique_ptr<wick::ShardedDataParallel> sdp;
  if (ddp_case) {
    ddp = std::make_unique<wick::DistributedDataParallel>(model.ptr(), pg);
  } else {
    auto options = wick::ShardingOptions().strategy(strategy);
    if (strategy == wick::ShardingStrategy::kFull) options.units(model->units());
    sdp = std::make_unique<wick::ShardedDataParallel>(model.ptr(), pg, optimizer, options);
  }

  double t_prepare = 0, t_forward = 0, t_backward = 0, t_finalize = 0, t_step = 0;
  const auto step = [&](int64_t i, bool timed) {
    const int64_t b = i % 8;
    auto xb = x.narrow(0, b * o.batch, o.batch);
    auto yb = y.narrow(0, b * o.batch, o.batch);
    const double t0 = now_s();
    if (ddp) ddp->prepare_forward();
    if (sdp) sdp->prepare_forward();
    const double t1 = now_s();
    auto loss = torch::nn::functional::cross_entropy(model->forward(xb), yb);
    const double t2 = now_s();
    loss.backward();
    const double t3 = now_s();
    if (ddp) ddp->finalize_backward();
    if (sdp) sdp->finalize_backward();
    const double t4 = now_s();
    optimizer.step();
    optimizer.zero_grad();
    const double t5 = now_s();
    if (timed) {
      t_prepare += t1 - t0;
      t_forward += t2 - t1;
      t_backward += t3 - t2;
      t_finalize += t4 - t3;
      t_step += t5 - t4;
    }
  };
  for (int64_t i = 0; i < o.warmup; ++i) step(i, false);
  wick::ShardingStats before;
  if (sdp) {
    sdp->reset_peak();
    before = sdp->stats();
  }
  pg->barrier();
  Stopwatch sw;
  for (int64_t i = o.warmup; i < o.warmup + o.steps; ++i) step(i, true);
  const double wall_s = sw.wall_s(), cpu_s = sw.cpu_s();
  const double steps = static_cast<double>(o.steps);
  const double faults = static_cast<double>(sw.minor_faults());

  Json j;
  j["rank"] = rank;
  j["world_size"] = world;
  j["backend"] = pg->backend_name();
  j["impl"] = "wick";
  j["case"] = o.strategy;
  j["threads"] = threads;
  j["parameters"] = param_numel;
  j["ms_per_step"] = 1e3 * wall_s / steps;
  j["cpu_ms_per_step"] = 1e3 * cpu_s / steps;
  j["page_faults_per_step"] = faults / steps;
  j["prepare_ms_per_step"] = 1e3 * t_prepare / steps;
  j["forward_ms_per_step"] = 1e3 * t_forward / steps;
  j["backward_ms_per_step"] = 1e3 * t_backward / steps;
  j["finalize_ms_per_step"] = 1e3 * t_finalize / steps;
  j["step_ms_per_step"] = 1e3 * t_step / steps;

  // Memory at rest: after the optimizer step, before the next prepare_forward.
  // The stats' figures, and (as a check on them) the distinct storages the
  // module's parameters and the optimizer's shards hold.
  std::vector<torch::Tensor> held = model->parameters();
  if (sdp) {
    const auto shards = sdp->sharded_parameters();
    held.insert(held.end(), shards.begin(), shards.end());
  }
  j["measured_param_bytes_at_rest"] = distinct_storage_bytes(held);
  j["replica_param_bytes"] = replica_param_bytes;
  if (sdp) {
    const auto st = sdp->stats();
    j["optimizer_state_bytes"] = st.optimizer_state_bytes;
    j["shard_bytes"] = st.shard_bytes;
    j["gathered_param_bytes"] = st.gathered_param_bytes;
    // ZeRO's shards are slices of its whole parameters (counted once);
    // full sharding's are copies, beside nothing gathered at rest.
    j["param_bytes_at_rest"] =
        o.strategy == "full" ? st.gathered_param_bytes + st.shard_bytes : st.gathered_param_bytes;
    j["peak_gathered_param_bytes"] = st.peak_gathered_param_bytes;
    j["num_units"] = st.num_units;
    j["padding_numel"] = st.padding_numel;
    j["all_gathers_per_step"] = static_cast<double>(st.all_gathers - before.all_gathers) / steps;
    j["prefetched_all_gathers_per_step"] =
        static_cast<double>(st.prefetched_all_gathers - before.prefetched_all_gathers) / steps;
    j["reduce_scatters_per_step"] =
        static_cast<double>(st.reduce_scatters - before.reduce_scatters) / steps;
    j["allreduces_per_step"] = static_cast<double>(st.allreduces - before.allreduces) / steps;
  } else {
    j["optimizer_state_bytes"] = wick::optimizer_state_bytes(optimizer);
    j["shard_bytes"] = nullptr;
    j["gathered_param_bytes"] = replica_param_bytes;
    j["param_bytes_at_rest"] = replica_param_bytes;
    j["num_units"] = ddp->stats().num_buckets;
  }
  j["peak_rss_kib"] = peak_rss_kib();

  {
    torch::NoGradGuard no_grad;
    if (ddp) ddp->prepare_forward();
    if (sdp) sdp->prepare_forward();
    j["check_loss"] =
        torch::nn::functional::cross_entropy(model->forward(x_eval), y_eval).item<double>();
  }
  j["init_loss"] = init_loss;
  j["steps"] = o.steps;
  j["warmup"] = o.warmup;

  if (o.diag && world > 1) {
    // What bounds a step: Gloo's collectives alone, and the same training
    // steps with no wrapper and no communication (a replica on each rank,
    // both ranks computing at once).
    const int64_t block_numel = [&] {
      int64_t k = 0;
      for (const auto& p : model->blocks.front()->parameters()) k += p.numel();
      return k;
    }();
    j["collectives"] = time_collectives(*pg, param_numel, block_numel);
    auto plain = make_model(o);
    wick::FusedAdam plain_opt(plain->parameters(), wick::FusedAdamOptions(o.lr));
    double fb = 0, st = 0;
    const auto plain_step = [&](int64_t i, bool timed) {
      const int64_t b = i % 8;
      const double t0 = now_s();
      torch::nn::functional::cross_entropy(plain->forward(x.narrow(0, b * o.batch, o.batch)),
                                           y.narrow(0, b * o.batch, o.batch))
          .backward();
      const double t1 = now_s();
      plain_opt.step();
      plain_opt.zero_grad();
      const double t2 = now_s();
      if (timed) {
        fb += t1 - t0;
        st += t2 - t1;
      }
    };
    for (int64_t i = 0; i < std::min<int64_t>(o.warmup, 2); ++i) plain_step(i, false);
    pg->barrier();
    Stopwatch plain_sw;
    for (int64_t i = 0; i < o.steps; ++i) plain_step(i, true);
    j["no_comm_ms_per_step"] = 1e3 * plain_sw.wall_s() / steps;
    j["no_comm_forward_backward_ms_per_step"] = 1e3 * fb / steps;
    j["no_comm_optimizer_ms_per_step"] = 1e3 * st / steps;
    pg->barrier();
  }

  const std::string path = o.out_dir + "/rank" + std::to_string(rank) + ".json";
  std::ofstream out(path);
  TORCH_CHECK(out, "wick-bench shard: cannot write ", path);
  out << j.dump() << "\n";
}

// The child of the sharded checkpoint case: full sharding of `layers`
// Linear(side, side) units (5 x 2048 x 2048 = 21M parameters: 240 MiB of
// parameters and Adam state in all, 120 MiB per rank; --quick: 2 x 256 x 256),
// one step taken so the optimizer has state. Each round saves once with
// ShardedDataParallel::save_checkpoint and once with save_checkpoint_async
// (a training step runs while the background write does, then
// wait_checkpoint), the order alternating, after an untimed round of each.
// Per round: the caller's time in each call (blocked), and the background
// write's time.
void run_checkpoint_child(const ShardBenchOptions& o) {
  set_torch_threads(1);
  auto pg = wick::init_process_group();
  const int64_t rank = pg->rank();
  const int64_t side = o.quick ? 256 : 2048, layers = o.quick ? 2 : 5;
  const int rounds = o.quick ? 2 : 5;  // timed pairs
  torch::manual_seed(o.seed);
  auto model = std::make_shared<torch::nn::Module>();
  std::vector<torch::nn::Linear> linears;
  std::vector<std::shared_ptr<torch::nn::Module>> units;
  for (int64_t i = 0; i < layers; ++i) {
    linears.push_back(
        model->register_module("fc" + std::to_string(i), torch::nn::Linear(side, side)));
    units.push_back(linears.back().ptr());
  }
  int64_t numel = 0;
  for (const auto& p : model->parameters()) numel += p.numel();
  wick::FusedAdam optimizer(model->parameters(), wick::FusedAdamOptions(1e-4));
  wick::ShardedDataParallel sdp(
      model, pg, optimizer,
      wick::ShardingOptions().strategy(wick::ShardingStrategy::kFull).units(units));
  const auto x = torch::randn({8, side});
  const auto step = [&] {
    sdp.prepare_forward();
    auto h = x;
    for (auto& l : linears) h = wick::unit_call(*l, [&] { return l->forward(h); });
    h.square().mean().backward();
    sdp.finalize_backward();
    optimizer.step();
    optimizer.zero_grad();
  };
  step();

  const std::string root = o.out_dir + "/ckpt";
  wick::AsyncCheckpointWriter writer;
  AsyncCheckpointRounds r;
  int64_t k = 0;
  const auto done_with = [&](const std::string& path) {
    pg->barrier();
    if (rank == 0) remove_tree(path);
  };
  r.run(
      rounds,
      [&] {
        const std::string path = root + "/" + wick::checkpoint_name(++k);
        pg->barrier();
        Stopwatch sw;
        wick::Checkpoint ckpt;
        ckpt.set_train_state({k, 0, 0, 0});
        sdp.save_checkpoint(ckpt, path);
        const double ms = sw.wall_s() * 1e3;
        done_with(path);
        return ms;
      },
      [&] {
        const std::string path = root + "/" + wick::checkpoint_name(++k);
        pg->barrier();
        Stopwatch sw;
        sdp.save_checkpoint_async(writer, path, [&](wick::Checkpoint& c) {
          c.set_train_state({k, 0, 0, 0});
        });
        const double ms = sw.wall_s() * 1e3;
        step();  // training goes on meanwhile
        sdp.wait_checkpoint(writer);
        done_with(path);
        return ms;
      },
      writer);
  Json j;
  j["rank"] = rank;
  j["parameters"] = numel;
  j["total_state_mb"] = 12.0 * static_cast<double>(numel) / (1 << 20);  // fp32 + Adam's 2
  j["rank_state_mb"] = static_cast<double>(r.snapshot_bytes) / (1 << 20);
  j["sync_save_ms"] = r.sync_ms;
  j["async_blocked_ms"] = r.blocked_ms;
  j["async_snapshot_ms"] = r.snapshot_ms;
  j["async_write_ms"] = r.write_ms;
  j["async_first_blocked_ms"] = r.first_blocked_ms;
  const std::string path = o.out_dir + "/rank" + std::to_string(rank) + ".json";
  std::ofstream out(path);
  TORCH_CHECK(out, "wick-bench shard: cannot write ", path);
  out << j.dump() << "\n";
}

// The sharded checkpoint case's figures: per round the slower rank's, then
// medians.
Json sharded_checkpoint_figures(const std::vector<Json>& ranks) {
  const auto per_round_max = [&](const char* key) {
    std::vector<double> v;
    for (const auto& r : ranks) {
      const auto& xs = r.at(key);
      if (v.size() < xs.size()) v.resize(xs.size(), 0.0);
      for (size_t i = 0; i < xs.size(); ++i) v[i] = std::max(v[i], xs[i].get<double>());
    }
    return v;
  };
  const auto sync = per_round_max("sync_save_ms"), blocked = per_round_max("async_blocked_ms");
  std::vector<double> ratios;
  for (size_t i = 0; i < sync.size() && i < blocked.size(); ++i)
    ratios.push_back(blocked[i] / sync[i]);
  Json j;
  j["strategy"] = "full";
  j["ranks"] = ranks.size();
  j["total_state_mb"] = ranks.front()["total_state_mb"];
  double rank_state = 0;
  for (const auto& r : ranks) rank_state = std::max(rank_state, r["rank_state_mb"].get<double>());
  j["rank_state_mb"] = rank_state;
  j["sync_save_ms"] = median(sync);
  j["async_blocked_ms"] = median(blocked);
  j["async_snapshot_ms"] = median(per_round_max("async_snapshot_ms"));
  j["async_write_ms"] = median(per_round_max("async_write_ms"));
  j["async_blocked_ratio"] = median(blocked) / median(sync);
  j["runs_ratio"] = ratios;
  j["runs_sync_save_ms"] = sync;
  j["runs_async_blocked_ms"] = blocked;
  return j;
}

// ---------------------------------------------------------------------------
// The parent.

struct ShardCase {
  std::string name;                     // wick_ddp, ..., python_fsdp
  std::vector<std::vector<Json>> runs;  // [round][rank]

  bool python() const { return name.rfind("python_", 0) == 0; }
  std::string kind() const { return name.substr(name.find('_') + 1); }
  // Per round, the slowest rank's value of `key` (the ranks wait for each other).
  std::vector<double> per_round_max(const char* key) const {
    std::vector<double> v;
    for (const auto& round : runs) {
      double m = 0;
      for (const auto& r : round) {
        if (r.contains(key) && r[key].is_number()) m = std::max(m, r[key].get<double>());
      }
      v.push_back(m);
    }
    return v;
  }
  double med(const char* key) const { return median(per_round_max(key)); }
  // The largest of the ranks' values of `key` in the first round (memory figures,
  // the same in every round); null when absent.
  Json max_over_ranks(const char* key) const {
    Json best = nullptr;
    for (const auto& r : runs.front()) {
      if (!r.contains(key) || !r[key].is_number()) continue;
      if (best.is_null() || r[key].get<double>() > best.get<double>()) best = r[key];
    }
    return best;
  }
  const Json& rank0() const { return runs.front().front(); }
};

// The run and model options both kinds of children take, as flags.
std::vector<std::string> run_args(const ShardBenchOptions& o) {
  return {"--steps",  std::to_string(o.steps),  "--warmup",  std::to_string(o.warmup),
          "--batch",  std::to_string(o.batch),  "--in-dim",  std::to_string(o.in_dim),
          "--width",  std::to_string(o.width),  "--hidden",  std::to_string(o.hidden),
          "--blocks", std::to_string(o.blocks), "--classes", std::to_string(o.classes),
          "--lr",     Json(o.lr).dump(),        "--seed",    std::to_string(o.seed)};
}

std::vector<std::string> wick_args(const ShardBenchOptions& o, const std::string& strategy,
                                   const std::string& dir, bool diag) {
  std::vector<std::string> a = {"/proc/self/exe", "shard", "--rank-child", "--strategy", strategy};
  const auto run = run_args(o);
  a.insert(a.end(), run.begin(), run.end());
  a.insert(a.end(), {"--out-dir", dir});
  if (diag) a.emplace_back("--diag");
  return a;
}

std::vector<std::string> python_args(const ShardBenchOptions& o, const GlobalOptions& global,
                                     const std::string& kind, const std::string& dir) {
  std::vector<std::string> a = {global.resolved_python(),
                                global.resolved_peers_dir() + "/shard_peer.py", "--case", kind};
  const auto run = run_args(o);
  a.insert(a.end(), run.begin(), run.end());
  a.insert(a.end(), {"--threads", "1", "--timeout", std::to_string(o.timeout_s), "--out-dir", dir});
  return a;
}

Json ratio_or_null(const Json& num, const Json& den) {
  if (!num.is_number() || !den.is_number() || den.get<double>() <= 0) return nullptr;
  return num.get<double>() / den.get<double>();
}

Json case_line(const ShardCase& c, const ShardCase* ddp, const Json& replica_state,
               const ShardBenchOptions& o) {
  Json j;
  j["bench"] = "shard";
  j["case"] = c.name;
  j["impl"] = c.python() ? "python" : "wick";
  j["ranks"] = c.rank0()["world_size"];
  j["threads_per_rank"] = c.rank0()["threads"];
  j["backend"] = c.rank0()["backend"];
  const double ms = c.med("ms_per_step");
  j["ms_per_step"] = ms;
  j["steps_per_s"] = 1e3 / ms;
  j["samples_per_s"] = 1e3 * static_cast<double>(2 * o.batch) / ms;
  if (ddp != nullptr) j["efficiency_vs_ddp"] = ddp->med("ms_per_step") / ms;
  j["cpu_ms_per_step"] = c.med("cpu_ms_per_step");
  j["page_faults_per_step"] = c.med("page_faults_per_step");
  for (const char* phase : {"prepare_ms_per_step", "forward_ms_per_step", "backward_ms_per_step",
                            "finalize_ms_per_step", "step_ms_per_step"}) {
    if (c.rank0().contains(phase)) j[phase] = c.med(phase);
  }
  j["optimizer_state_bytes"] = c.max_over_ranks("optimizer_state_bytes");
  j["optimizer_state_ratio"] = ratio_or_null(j["optimizer_state_bytes"], replica_state);
  j["param_bytes_at_rest"] = c.max_over_ranks("param_bytes_at_rest");
  j["replica_param_bytes"] = c.rank0()["replica_param_bytes"];
  j["param_ratio_at_rest"] = ratio_or_null(j["param_bytes_at_rest"], j["replica_param_bytes"]);
  for (const char* key :
       {"shard_bytes", "gathered_param_bytes", "measured_param_bytes_at_rest",
        "peak_gathered_param_bytes", "num_units", "all_gathers_per_step",
        "prefetched_all_gathers_per_step", "reduce_scatters_per_step", "allreduces_per_step"}) {
    if (c.rank0().contains(key)) j[key] = c.max_over_ranks(key);
  }
  j["peak_rss_mib"] = c.med("peak_rss_kib") / 1024.0;
  j["init_loss"] = c.rank0()["init_loss"];
  j["check_loss"] = c.rank0()["check_loss"];
  for (const char* key : {"no_comm_ms_per_step", "no_comm_forward_backward_ms_per_step",
                          "no_comm_optimizer_ms_per_step"}) {
    if (c.rank0().contains(key)) j[key] = c.med(key);
  }
  if (c.rank0().contains("collectives")) {
    // Per figure, the median over rounds of rank 0's.
    Json coll = Json::object();
    for (const auto& item : c.rank0()["collectives"].items()) {
      std::vector<double> v;
      for (const auto& round : c.runs)
        v.push_back(round.front()["collectives"][item.key()].get<double>());
      coll[item.key()] = median(v);
    }
    j["collectives"] = coll;
  }
  j["parameters"] = c.rank0()["parameters"];
  j["batch_per_rank"] = o.batch;
  j["steps"] = o.steps;
  j["warmup"] = o.warmup;
  j["repeats"] = c.runs.size();
  j["runs_ms_per_step"] = c.per_round_max("ms_per_step");
  return j;
}

void run_shard_bench(ShardBenchOptions o, const GlobalOptions& global, const CLI::App& sub) {
  if (o.rank_child) {
    TORCH_CHECK(!o.out_dir.empty(), "wick-bench shard: --rank-child needs --out-dir");
    if (o.strategy == "checkpoint") {
      run_checkpoint_child(o);
    } else {
      run_rank_child(o);
    }
    return;
  }
  if (o.quick) {
    // A smoke run: a small model, few steps, one round (explicit options win).
    const auto unless_given = [&](const char* name, auto& field, auto value) {
      if (sub.count(name) == 0) field = value;
    };
    unless_given("--steps", o.steps, int64_t{3});
    unless_given("--warmup", o.warmup, int64_t{1});
    unless_given("--repeats", o.repeats, 1);
    unless_given("--in-dim", o.in_dim, int64_t{64});
    unless_given("--width", o.width, int64_t{128});
    unless_given("--hidden", o.hidden, int64_t{256});
    unless_given("--blocks", o.blocks, int64_t{2});
  }
  TORCH_CHECK(o.steps >= 1, "wick-bench shard: --steps must be >= 1, got ", o.steps);
  TORCH_CHECK(o.warmup >= 0, "wick-bench shard: --warmup must be >= 0, got ", o.warmup);
  TORCH_CHECK(o.repeats >= 1, "wick-bench shard: --repeats must be >= 1, got ", o.repeats);
  TORCH_CHECK(o.batch >= 1, "wick-bench shard: --batch must be >= 1, got ", o.batch);
  TORCH_CHECK(o.blocks >= 1, "wick-bench shard: --blocks must be >= 1, got ", o.blocks);
  TORCH_CHECK(o.in_dim >= 1 && o.width >= 1 && o.hidden >= 1 && o.classes >= 2,
              "wick-bench shard: --in-dim, --width, --hidden must be >= 1 and --classes >= 2");

  std::vector<std::string> names;
  {
    std::string list = o.cases == "all" ? "" : o.cases;
    if (o.cases == "all") {
      names = kAllCases;
    } else {
      std::stringstream ss(list);
      std::string item;
      while (std::getline(ss, item, ',')) {
        TORCH_CHECK(std::find(kAllCases.begin(), kAllCases.end(), item) != kAllCases.end(),
                    "wick-bench shard: unknown case '", item, "' in --cases (known: wick_ddp, ",
                    "wick_zero1, wick_zero2, wick_full, python_ddp, python_zero, python_fsdp)");
        names.push_back(item);
      }
    }
    if (o.no_python) {
      names.erase(std::remove_if(names.begin(), names.end(),
                                 [](const std::string& n) { return n.rfind("python_", 0) == 0; }),
                  names.end());
    }
    TORCH_CHECK(!names.empty(), "wick-bench shard: no case to run");
  }

  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();
  std::vector<ShardCase> cases;
  for (const auto& n : names) cases.push_back({n, {}});
  for (int r = 0; r < o.repeats; ++r) {
    // Rotate the order each round, so drifting load hits every case alike.
    for (size_t k = 0; k < cases.size(); ++k) {
      auto& c = cases[(k + static_cast<size_t>(r)) % cases.size()];
      ScratchFolder dir("shard");
      const bool diag = !o.no_diagnostics && c.name == "wick_ddp";
      const auto argv = c.python() ? python_args(o, global, c.kind(), dir.path)
                                   : wick_args(o, c.kind(), dir.path, diag);
      const double t0 = now_s();
      c.runs.push_back(run_rank_processes(argv, 2, dir.path, o.timeout_s, c.name));
      std::cerr << "wick-bench shard: round " << r + 1 << "/" << o.repeats << " " << c.name << " "
                << c.runs.back().front().value("ms_per_step", 0.0) << " ms/step (run "
                << now_s() - t0 << " s)\n";
    }
  }

  const auto find = [&](const std::string& n) -> const ShardCase* {
    for (const auto& c : cases) {
      if (c.name == n) return &c;
    }
    return nullptr;
  };
  const ShardCase* wick_ddp = find("wick_ddp");
  const ShardCase* py_ddp = find("python_ddp");
  // A replica's optimizer state: what DDP's optimizer holds (every parameter's).
  const Json wick_replica_state =
      wick_ddp ? wick_ddp->max_over_ranks("optimizer_state_bytes") : Json(nullptr);
  const Json py_replica_state =
      py_ddp ? py_ddp->max_over_ranks("optimizer_state_bytes") : Json(nullptr);

  std::vector<Json> lines;
  for (const auto& c : cases) {
    const ShardCase* ddp = c.python() ? py_ddp : wick_ddp;
    lines.push_back(case_line(c, ddp, c.python() ? py_replica_state : wick_replica_state, o));
    out.emit(lines.back());
  }
  const auto line_of = [&](const std::string& n) -> const Json* {
    for (const auto& l : lines) {
      if (l["case"] == n) return &l;
    }
    return nullptr;
  };
  const auto steps_per_s = [&](const std::string& n) -> Json {
    const Json* l = line_of(n);
    return l ? (*l)["steps_per_s"] : Json(nullptr);
  };

  Json s;
  s["bench"] = "shard";
  s["summary"] = true;
  s["vs_python_zero"] = ratio_or_null(steps_per_s("wick_zero1"), steps_per_s("python_zero"));
  s["vs_python_fsdp"] = ratio_or_null(steps_per_s("wick_full"), steps_per_s("python_fsdp"));
  s["vs_python_ddp"] = ratio_or_null(steps_per_s("wick_ddp"), steps_per_s("python_ddp"));
  s["vs_python_zero_case"] = "wick_zero1 / python_zero";
  s["vs_python_fsdp_case"] = "wick_full / python_fsdp";
  // Less sensitive to load that drifts over the run: the ratio within each
  // round (the pair ran back to back), its median, and the ratio of process
  // CPU time per step (medians).
  for (const auto& [key, wick_name, python_name] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"vs_python_zero", "wick_zero1", "python_zero"},
           {"vs_python_fsdp", "wick_full", "python_fsdp"},
           {"vs_python_ddp", "wick_ddp", "python_ddp"}}) {
    const ShardCase* w = find(wick_name);
    const ShardCase* p = find(python_name);
    if (w == nullptr || p == nullptr) continue;
    const auto wr = w->per_round_max("ms_per_step"), pr = p->per_round_max("ms_per_step");
    std::vector<double> rounds;
    for (size_t r = 0; r < wr.size() && r < pr.size(); ++r) rounds.push_back(pr[r] / wr[r]);
    s[key + "_rounds"] = rounds;
    s[key + "_paired_median"] = median(rounds);
    s[key + "_cpu"] = p->med("cpu_ms_per_step") / w->med("cpu_ms_per_step");
  }
  Json state = Json::object(), at_rest = Json::object(), efficiency = Json::object(),
       py_state = Json::object(), py_at_rest = Json::object(), py_efficiency = Json::object();
  for (const char* st : {"zero1", "zero2", "full"}) {
    if (const Json* l = line_of(std::string("wick_") + st)) {
      state[st] = (*l)["optimizer_state_ratio"];
      at_rest[st] = (*l)["param_ratio_at_rest"];
      efficiency[st] = l->contains("efficiency_vs_ddp") ? (*l)["efficiency_vs_ddp"] : Json(nullptr);
    }
  }
  for (const char* st : {"zero", "fsdp"}) {
    if (const Json* l = line_of(std::string("python_") + st)) {
      py_state[st] = (*l)["optimizer_state_ratio"];
      py_at_rest[st] = (*l)["param_ratio_at_rest"];
      py_efficiency[st] =
          l->contains("efficiency_vs_ddp") ? (*l)["efficiency_vs_ddp"] : Json(nullptr);
    }
  }
  s["optimizer_state_ratio"] = state;
  s["param_ratio_at_rest"] = at_rest;
  s["efficiency_vs_ddp"] = efficiency;
  s["python_optimizer_state_ratio"] = py_state;
  s["python_param_ratio_at_rest"] = py_at_rest;
  s["python_efficiency_vs_ddp"] = py_efficiency;
  // What an asynchronous checkpoint blocks the loop for, against a
  // synchronous save of the same state: a 4096 x 4096 Linear and its Adam
  // state after a step (>= 200 MB; --quick: 8 MB). The writer is
  // AsyncCheckpointWriter (TrainerOptions::async_checkpoint, DDP or one
  // process); the sharded form follows.
  {
    const int64_t side = o.quick ? 512 : 4096;
    torch::nn::Linear state_model(side, side);
    wick::FusedAdam state_opt(state_model->parameters(), wick::FusedAdamOptions(1e-3));
    state_model(torch::randn({2, side})).sum().backward();
    state_opt.step();
    AsyncCheckpointMeasureOptions mo;
    mo.dir = std::filesystem::temp_directory_path().string();
    mo.rounds = o.quick ? 2 : 5;
    mo.between = [&] { state_opt.step(); };
    const Json a = measure_async_checkpoint(
        [&](wick::Checkpoint& ckpt) {
          ckpt.put_module("model", *state_model);
          ckpt.put_optimizer("optimizer", state_opt);
        },
        mo);
    s["async_blocked_ratio"] = a["async_blocked_ratio"];
    s["async_checkpoint"] = {{"state_mb", a["state_mb"]},
                             {"sync_save_ms", a["sync_save_ms"]},
                             {"async_blocked_ms", a["async_blocked_ms"]},
                             {"async_write_ms", a["async_write_ms"]},
                             {"note", "AsyncCheckpointWriter (DDP or one process)"}};
  }
  // The same for a sharded save on 2 ranks (save_checkpoint_async against
  // save_checkpoint, full sharding, >= 200 MB of state in all).
  if (!o.no_sharded_checkpoint) {
    ScratchFolder dir("shard-ckpt");
    std::vector<std::string> argv = {"/proc/self/exe",       "shard",      "--rank-child",
                                     "--strategy",           "checkpoint", "--seed",
                                     std::to_string(o.seed), "--out-dir",  dir.path};
    if (o.quick) argv.emplace_back("--quick");
    const Json c = sharded_checkpoint_figures(
        run_rank_processes(argv, 2, dir.path, o.timeout_s, "sharded checkpoint"));
    s["async_blocked_ratio_sharded"] = c["async_blocked_ratio"];
    s["sharded_async_checkpoint"] = c;
  }

  // Goals.
  const double share = 0.5 * kShareTolerance;  // 1/world, 2 ranks
  Json goals = Json::object();
  if (s["vs_python_zero"].is_number())
    goals["vs_python_zero"] = s["vs_python_zero"].get<double>() >= kVsPythonGoal;
  if (s["vs_python_fsdp"].is_number())
    goals["vs_python_fsdp"] = s["vs_python_fsdp"].get<double>() >= kVsPythonGoal;
  for (const char* key : {"async_blocked_ratio", "async_blocked_ratio_sharded"}) {
    if (s.contains(key) && s[key].is_number()) goals[key] = s[key].get<double>() <= 0.10;
  }
  {
    bool all = !state.empty();
    for (const auto& [k, v] : state.items()) all = all && v.is_number() && v.get<double>() <= share;
    if (!state.empty()) goals["optimizer_state_ratio"] = all;
  }
  if (at_rest.contains("full") && at_rest["full"].is_number())
    goals["param_ratio_at_rest"] = at_rest["full"].get<double>() <= share;
  bool met = !goals.empty();
  for (const auto& [k, v] : goals.items()) met = met && v.get<bool>();
  s["goals"] = goals;
  s["goals_met"] = met;
  s["goal_definitions"] =
      "vs_python_* >= 1; optimizer_state_ratio <= 1/world (x1.01, padding) for every strategy; "
      "param_ratio_at_rest (full) <= 1/world (x1.01); async_blocked_ratio and "
      "async_blocked_ratio_sharded <= 0.10";

  // Same work on both sides: the same initial loss, and the same loss after
  // warmup+steps steps of the same data (within float noise).
  {
    double init_min = std::numeric_limits<double>::infinity(), init_max = -init_min;
    double check_min = init_min, check_max = -init_min;
    for (const auto& l : lines) {
      init_min = std::min(init_min, l["init_loss"].get<double>());
      init_max = std::max(init_max, l["init_loss"].get<double>());
      check_min = std::min(check_min, l["check_loss"].get<double>());
      check_max = std::max(check_max, l["check_loss"].get<double>());
    }
    s["init_loss_spread"] = init_max - init_min;
    s["check_loss_spread"] = check_max - check_min;
    s["check_loss_rel_spread"] = (check_max - check_min) / std::abs(check_max);
    s["same_init_as_python"] = init_max - init_min <= 1e-6 * std::abs(init_max);
    s["same_training_as_python"] = (check_max - check_min) <= 1e-4 * std::abs(check_max);
  }
  if (const Json* l = line_of("wick_ddp"); l != nullptr && l->contains("collectives")) {
    s["collectives"] = (*l)["collectives"];
    s["no_comm_ms_per_step"] = (*l)["no_comm_ms_per_step"];
  }
  s["ms_per_step"] = Json::object();
  for (const auto& l : lines) s["ms_per_step"][l["case"].get<std::string>()] = l["ms_per_step"];
  s["model"] = {{"in_dim", o.in_dim},   {"width", o.width},
                {"hidden", o.hidden},   {"blocks", o.blocks},
                {"classes", o.classes}, {"parameters", lines.front()["parameters"]}};
  s["optimizer"] = "wick::FusedAdam / torch.optim.Adam(fused=True)";
  s["lr"] = o.lr;
  s["ranks"] = 2;
  s["threads_per_rank"] = 1;
  s["batch_per_rank"] = o.batch;
  s["steps"] = o.steps;
  s["warmup"] = o.warmup;
  s["repeats"] = o.repeats;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_shard_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<ShardBenchOptions>();
  CLI::App* sub =
      app.add_subcommand("shard",
                         "ShardedDataParallel (zero1, zero2, full) vs wick DDP and Python's DDP, "
                         "ZeroRedundancyOptimizer and FSDP2: 2 ranks x 1 thread, Gloo");
  sub->add_option("--steps", o->steps, "timed steps per run")->capture_default_str();
  sub->add_option("--warmup", o->warmup, "untimed steps before each run's timed ones")
      ->capture_default_str();
  sub->add_option("--repeats", o->repeats, "runs (rounds) of each case; figures are medians")
      ->capture_default_str();
  sub->add_option("--batch", o->batch, "samples per batch per rank")->capture_default_str();
  sub->add_option("--in-dim", o->in_dim, "input features")->capture_default_str();
  sub->add_option("--width", o->width, "residual stream width")->capture_default_str();
  sub->add_option("--hidden", o->hidden, "hidden width of each block's MLP")->capture_default_str();
  sub->add_option("--blocks", o->blocks, "residual blocks (the units of full sharding)")
      ->capture_default_str();
  sub->add_option("--classes", o->classes, "output classes")->capture_default_str();
  sub->add_option("--lr", o->lr, "Adam's learning rate")->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the initialization and of the data")
      ->capture_default_str();
  sub->add_option("--cases", o->cases,
                  "all, or a comma list of wick_ddp, wick_zero1, wick_zero2, wick_full, "
                  "python_ddp, python_zero, python_fsdp")
      ->capture_default_str();
  sub->add_flag("--no-python", o->no_python, "skip the Python cases");
  sub->add_flag("--quick", o->quick,
                "a smoke run: model 64-128x2(256)-10, 3 steps, 1 warmup, 1 round (explicit "
                "options win)");
  sub->add_flag("--no-diagnostics", o->no_diagnostics,
                "skip the standalone collective and no-communication timings that wick_ddp's "
                "ranks take after their run, every round");
  sub->add_flag("--no-sharded-checkpoint", o->no_sharded_checkpoint,
                "skip the sharded checkpoint case (save_checkpoint_async against "
                "save_checkpoint, 2 ranks, 240 MiB of state)");
  sub->add_option("--timeout", o->timeout_s,
                  "seconds a run's processes may take before they are killed")
      ->capture_default_str();
  // The children's options, hidden from --help.
  sub->add_flag("--rank-child", o->rank_child)->group("");
  sub->add_option("--strategy", o->strategy)->group("");
  sub->add_flag("--diag", o->diag)->group("");
  sub->add_option("--out-dir", o->out_dir)->group("");
  sub->callback([o, global, sub] { run_shard_bench(*o, *global, *sub); });
}

}  // namespace wick_bench
