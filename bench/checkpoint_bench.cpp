// wick-bench checkpoint: how long a checkpoint blocks the training loop,
// synchronously (Checkpoint::save) and asynchronously (AsyncCheckpointWriter),
// for the same state in the same run.
//
// The state: a stack of Linear(1024, 1024) layers (float32) and its Adam
// state after one step, sized to `--mb` MiB in all (parameters plus the two
// moments; default 256), as a Trainer checkpoint holds it (model, optimizer,
// RNG). Each round saves it once synchronously and once asynchronously (the
// order alternating), and while the asynchronous write runs the loop takes
// an Adam step on the live state, as training would. Rounds wait for the
// write before the next one: the blocked time is the snapshot's (the host
// copy), as in a run whose checkpoints are further apart than a write takes.
// Summary: async_blocked_ratio = median blocked time of the asynchronous
// save / median time of the synchronous save (goal <= 0.10), both times,
// and the background write's time.

#include "checkpoint_bench.h"

#include <wick/async_checkpoint.h>
#include <wick/checkpoint.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace wick_bench {

void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); },
      16, FTW_DEPTH | FTW_PHYS);
}

namespace {

int64_t tree_bytes(const std::string& dir) {
  static int64_t total = 0;
  total = 0;
  ::nftw(
      dir.c_str(),
      [](const char*, const struct stat* st, int type, struct FTW*) {
        if (type == FTW_F) total += static_cast<int64_t>(st->st_size);
        return 0;
      },
      16, FTW_PHYS);
  return total;
}

}  // namespace

void AsyncCheckpointRounds::run(int rounds, const std::function<double()>& sync_save,
                                const std::function<double()>& async_save,
                                const wick::AsyncCheckpointWriter& writer) {
  const auto async_round = [&](bool timed) {
    const double ms = async_save();
    const auto st = writer.stats();
    snapshot_bytes = st.last_snapshot_bytes;
    if (timed) {
      blocked_ms.push_back(ms);
      snapshot_ms.push_back(st.last_snapshot_s * 1e3);
      write_ms.push_back(st.last_write_s * 1e3);
    } else {
      first_blocked_ms = ms;
    }
  };
  const auto sync_round = [&](bool timed) {
    const double ms = sync_save();
    if (timed) sync_ms.push_back(ms);
  };
  async_round(false);  // untimed: allocates the host buffers
  sync_round(false);
  for (int r = 0; r < rounds; ++r) {
    if (r % 2 == 0) {
      sync_round(true);
      async_round(true);
    } else {
      async_round(true);
      sync_round(true);
    }
  }
}

Json measure_async_checkpoint(const std::function<void(wick::Checkpoint&)>& build,
                              const AsyncCheckpointMeasureOptions& options) {
  TORCH_CHECK(options.rounds >= 1, "measure_async_checkpoint: rounds must be >= 1, got ",
              options.rounds);
  const std::string root = options.dir + "/wick-bench-checkpoint-" + std::to_string(::getpid());
  wick::AsyncCheckpointWriter writer;
  AsyncCheckpointRounds r;
  int64_t checkpoint_bytes = 0;
  int step = 0;
  r.run(
      options.rounds,
      [&] {
        const std::string path = root + "/sync/" + wick::checkpoint_name(++step);
        Stopwatch sw;
        wick::Checkpoint ckpt;
        build(ckpt);
        ckpt.save(path);
        const double ms = sw.wall_s() * 1e3;
        checkpoint_bytes = tree_bytes(path);
        remove_tree(path);
        return ms;
      },
      [&] {
        const std::string path = root + "/async/" + wick::checkpoint_name(++step);
        Stopwatch sw;
        writer.save(path, build);
        const double ms = sw.wall_s() * 1e3;
        if (options.between) options.between();
        writer.wait();
        remove_tree(path);
        return ms;
      },
      writer);
  remove_tree(root);

  Json j;
  j["state_mb"] = static_cast<double>(r.snapshot_bytes) / (1 << 20);
  j["checkpoint_mb"] = static_cast<double>(checkpoint_bytes) / (1 << 20);
  j["sync_save_ms"] = median(r.sync_ms);
  j["async_blocked_ms"] = median(r.blocked_ms);
  j["async_snapshot_ms"] = median(r.snapshot_ms);
  j["async_write_ms"] = median(r.write_ms);
  j["async_blocked_ratio"] = median(r.blocked_ms) / median(r.sync_ms);
  j["async_first_blocked_ms"] = r.first_blocked_ms;
  j["rounds"] = options.rounds;
  j["runs_sync_save_ms"] = r.sync_ms;
  j["runs_async_blocked_ms"] = r.blocked_ms;
  j["runs_async_write_ms"] = r.write_ms;
  return j;
}

namespace {

struct CheckpointBenchOptions {
  int64_t mb = 256;
  int rounds = 5;
  int threads = 1;
  std::string dir = "/tmp";
};

void run_checkpoint_bench(const CheckpointBenchOptions& o, const GlobalOptions& global) {
  const double load_start = load_average_1m();
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);

  // Layers of 1024 x 1024 (+ bias) until parameters and Adam's two moments fill `mb` MiB.
  constexpr int64_t kWidth = 1024;
  const int64_t per_layer = 3 * (kWidth * kWidth + kWidth) * 4;
  const auto layers = std::max<int64_t>(1, (o.mb * (int64_t{1} << 20) + per_layer - 1) / per_layer);
  torch::manual_seed(7);
  torch::nn::Sequential model;
  for (int64_t i = 0; i < layers; ++i) model->push_back(torch::nn::Linear(kWidth, kWidth));
  torch::optim::Adam optimizer(model->parameters(), 1e-4);
  // One step, so the optimizer has its state; the gradients are kept, and
  // each round's step while a write runs changes parameters and moments.
  model->forward(torch::randn({4, kWidth})).pow(2).mean().backward();
  optimizer.step();

  AsyncCheckpointMeasureOptions m;
  m.dir = o.dir;
  m.rounds = o.rounds;
  m.between = [&] { optimizer.step(); };
  Json r = measure_async_checkpoint(
      [&](wick::Checkpoint& ckpt) {
        ckpt.put_module("model", *model);
        ckpt.put_optimizer("optimizer", optimizer);
        ckpt.put_rng_state();
      },
      m);

  Json line;
  line["bench"] = "checkpoint";
  line["case"] = "rounds";
  line["runs_sync_save_ms"] = r["runs_sync_save_ms"];
  line["runs_async_blocked_ms"] = r["runs_async_blocked_ms"];
  line["runs_async_write_ms"] = r["runs_async_write_ms"];
  out.emit(line);

  Json s;
  s["bench"] = "checkpoint";
  s["summary"] = true;
  s["layers"] = layers;
  for (const char* key :
       {"state_mb", "checkpoint_mb", "sync_save_ms", "async_blocked_ms", "async_snapshot_ms",
        "async_write_ms", "async_blocked_ratio", "async_first_blocked_ms"}) {
    s[key] = r[key];
  }
  s["goal_blocked_ratio"] = 0.10;
  s["goal_met"] = r["async_blocked_ratio"].get<double>() <= 0.10;
  s["rounds"] = o.rounds;
  s["threads"] = threads;
  s["dir"] = o.dir;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_checkpoint_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<CheckpointBenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "checkpoint", "blocked time of an asynchronous checkpoint vs a synchronous save");
  sub->add_option("--mb", o->mb, "state size in MiB (parameters + Adam's moments, float32)")
      ->capture_default_str();
  sub->add_option("--rounds", o->rounds, "timed rounds (one save of each kind per round)")
      ->capture_default_str();
  sub->add_option("--threads", o->threads, "torch intra-op threads")->capture_default_str();
  sub->add_option("--dir", o->dir, "where the checkpoints are written (and deleted)")
      ->capture_default_str();
  sub->callback([o, global] { run_checkpoint_bench(*o, *global); });
}

}  // namespace wick_bench
