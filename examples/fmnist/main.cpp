// wick-fmnist: trains an MLP or a small CNN on Fashion-MNIST with wick's
// Trainer, then evaluates it on the test set.
//
//   wick-fmnist --model cnn --epochs 2                 # ~0.91 test accuracy
//   wick-fmnist --model mlp --precision bf16 --accum 4 --json
//   wick-fmnist --model cnn --checkpoint-dir runs/a/checkpoints --resume latest
//   wick-fmnist --model cnn --checkpoint-every 100 --async-checkpoint  # written in the background
//   torchrun --standalone --nproc_per_node=2 --no-python wick-fmnist --ddp --threads 1
//   torchrun --standalone --nproc_per_node=2 --no-python wick-fmnist --ddp --shard full --threads 1
//   wick-fmnist --quantize --prune 0.5 --json          # int8 beside fp32; 50% pruned + 1 epoch
//   wick-fmnist --model mlp --profile                  # top-10 ops, trace.json, report.html
//   wick-fmnist --model cnn --epochs 2 --serve 64      # then serve the test set to 64 clients
//   wick-fmnist --export-safetensors cnn.safetensors   # weights for Python (docs/interop.md)
//   wick-fmnist --tensorboard runs/fmnist/tb           # then: tensorboard --logdir runs
//   wick-fmnist --serve-model fmnist.pt2 --serve 64    # serve a model exported from Python
//                                                      # (.pt2 or TorchScript), no training
//
// Each run writes to its own runs/fmnist/version_N (or --run-dir DIR); a
// fresh run into a directory holding checkpoints is refused (run_dir.h).
//
// Prints a summary a person can read and, last, one JSON line for machines.

#include <wick/wick.h>

#include "compress.h"
#include "models.h"
#include "profile.h"
#include "run_dir.h"
#include "serve.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#ifdef WICK_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <string>

namespace {

struct Args {
  std::string model = "cnn";
  int64_t epochs = 2;
  int64_t batch_size = 64;
  int64_t accum = 1;
  std::string precision = "fp32";
  double lr = 2e-3;
  int threads = 0;
  std::string data_dir = wick::FashionMNIST::default_root();
  std::string run_dir = "runs/fmnist";  // without --run-dir: the parent of version_N
  bool run_dir_given = false;
  std::string checkpoint_dir;  // default <run_dir>/checkpoints
  std::string resume;
  int64_t checkpoint_every = 0;
  bool async_checkpoint = false;
  int64_t max_steps = -1;
  int64_t val_size = 5000;
  uint64_t seed = 1;
  double clip = 0.0;
  std::string schedule = "cosine";
  std::string optimizer = "fused-adam";
  bool progress = true;
  bool json = false;
  bool ddp = false;
  std::string shard;  // "": replicas (DDP); zero1, zero2, full: sharded
  std::string device = "cpu";
  bool quantize = false;
  double prune = -1;  // fraction of the weights to prune; < 0: no pruning
  bool profile = false;
  std::string init_safetensors;    // start from these weights
  std::string export_safetensors;  // write the trained weights here
  std::string tensorboard;         // event files for TensorBoard here
  fmnist::ServeOptions serve;
  std::string serve_model;    // an exported model to serve instead of training one
  bool device_given = false;  // --device on the command line
};

using fmnist::make_model;

// "cpu", "cuda" or "cuda:N".
torch::Device parse_device(const std::string& text) {
  std::optional<torch::Device> device;
  try {
    device = torch::Device(text);
  } catch (const c10::Error&) {
  }
  TORCH_CHECK(device && (device->is_cpu() || device->is_cuda()) &&
                  !(device->is_cpu() && device->has_index()),
              "--device must be cpu, cuda or cuda:N, got '", text, "'");
  return *device;
}

// The CUDA device's name, e.g. "NVIDIA H200".
std::string gpu_name(const torch::Device& device) {
#ifdef WICK_WITH_CUDA
  return at::cuda::getDeviceProperties(device.index())->name;
#else
  return "unknown (wick built without WICK_WITH_CUDA)";
#endif
}

int64_t count_parameters(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

// --serve-model: no training; the test set (normalized as wick-fmnist's own
// models see it) goes to the exported model through the batcher.
int serve_exported(const Args& args) {
  Args a = args;
  if (a.serve.clients == 0) a.serve.clients = 64;
  wick::InferenceSessionOptions options;
  options.num_threads(a.threads)
      .aoti_runners(a.serve.workers)  // one model instance per batcher worker
      .warmup_shape({a.serve.max_batch, 1, 28, 28});
  // Without --device: where the file puts it (an AOTInductor package: the
  // device it was compiled for).
  if (a.device_given) options.device(parse_device(a.device));
  auto session = wick::InferenceSession::load(a.serve_model, options);
  const auto probe = session.run(torch::zeros({2, 1, 28, 28}));
  TORCH_CHECK(probe.dim() == 2 && probe.size(0) == 2 && probe.size(1) == 10, "--serve-model: '",
              a.serve_model, "' returned ", probe.sizes(),
              " for [2, 1, 28, 28] images; it must return [N, 10] logits");
  wick::FashionMNIST test_set(a.data_dir, wick::FashionMNIST::Split::kTest);
  auto served = fmnist::serve_session(session, test_set.images(), test_set.targets(), a.serve);
  std::printf("serving %s (%s on %s, %d intra-op threads)\n", a.serve_model.c_str(),
              wick::to_string(session.format()).c_str(), session.device().str().c_str(),
              torch::get_num_threads());
  fmnist::print_serve_report(served, a.serve);
  if (a.json) {
    nlohmann::json j;
    j["serve_model"] = a.serve_model;
    j["model_format"] = wick::to_string(session.format());
    j["device"] = session.device().str();
    j["threads"] = torch::get_num_threads();
    j["serve_workers"] = a.serve.workers;
    fmnist::add_serve_fields(j, served, a.serve);
    std::cout << j.dump() << std::endl;
  }
  return 0;
}

int run(Args args) {
  if (args.threads > 0) torch::set_num_threads(args.threads);
  if (!args.serve_model.empty()) return serve_exported(args);
  const auto precision = wick::parse_precision(args.precision);
  // --device cuda: cuda:LOCAL_RANK (cuda:0 without --ddp); cuda:N names the GPU,
  // e.g. to put two ranks on one GPU on purpose.
  const auto requested = parse_device(args.device);
  const bool cuda = requested.is_cuda();
  TORCH_CHECK(!cuda || torch::cuda::is_available(), "--device ", args.device,
              ", but no CUDA device is visible");
  // Under torchrun: one process per rank, each reading its shard; else a world of one.
  auto pg = args.ddp ? wick::init_process_group(wick::ProcessGroupOptions().device(
                           cuda ? std::optional<torch::Device>(requested) : std::nullopt))
                     : std::make_shared<wick::ProcessGroup>();
  const int64_t rank = pg->rank(), world = pg->world_size();
  const bool main_rank = pg->is_main();
  // This run's own directories: a fresh run never meets another's checkpoints (run_dir.h).
  const auto dirs = fmnist::resolve_run_dirs(args.run_dir, args.run_dir_given, args.checkpoint_dir,
                                             args.resume, *pg);
  args.run_dir = dirs.run_dir;
  args.checkpoint_dir = dirs.checkpoint_dir;
  // This rank's device: under --ddp --device cuda the GPU of LOCAL_RANK, as
  // init_process_group chose (it checked the index).
  const torch::Device device =
      !cuda ? torch::Device(torch::kCPU)
      : requested.has_index()
          ? requested
          : torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(pg->local_rank()));
  TORCH_CHECK(!cuda || device.index() < static_cast<int64_t>(torch::cuda::device_count()),
              "--device ", args.device, ", but only ",
              static_cast<int>(torch::cuda::device_count()), " GPU(s) are visible");
  const std::optional<std::string> gpu =
      cuda ? std::optional<std::string>(gpu_name(device)) : std::nullopt;

  // Data: the last val_size training images are held out for validation.
  wick::FashionMNIST train_set(args.data_dir, wick::FashionMNIST::Split::kTrain);
  wick::FashionMNIST test_set(args.data_dir, wick::FashionMNIST::Split::kTest);
  const int64_t n_train = train_set.images().size(0) - args.val_size;
  TORCH_CHECK(args.val_size >= 0 && n_train > 0, "--val-size must be in [0, ",
              train_set.images().size(0), "), got ", args.val_size);
  // On CUDA the data stays in pinned host memory and each batch is copied
  // ahead of its use.
  auto pin = [&](const torch::Tensor& t) { return cuda ? t.pin_memory() : t; };
  auto x = pin(train_set.images()), y = pin(train_set.targets());
  wick::TensorBatchSource train(x.narrow(0, 0, n_train), y.narrow(0, 0, n_train),
                                wick::TensorBatchSourceOptions(args.batch_size)
                                    .shuffle(true)
                                    .seed(args.seed)
                                    .rank(rank)
                                    .world_size(world));
  std::unique_ptr<wick::TensorBatchSource> val;
  if (args.val_size > 0) {
    val = std::make_unique<wick::TensorBatchSource>(
        x.narrow(0, n_train, args.val_size), y.narrow(0, n_train, args.val_size),
        wick::TensorBatchSourceOptions(1000).shuffle(false).rank(rank).world_size(world));
  }
  wick::TensorBatchSource test(
      test_set.images(), test_set.targets(),
      wick::TensorBatchSourceOptions(1000).shuffle(false).rank(rank).world_size(world));

  torch::manual_seed(args.seed);  // the model's initial weights
  auto model = make_model(args.model);
  // Weights from a safetensors file (from wick-fmnist --export-safetensors or
  // Python's safetensors), by the model's named_parameters() names.
  if (!args.init_safetensors.empty()) wick::load_safetensors(args.init_safetensors, *model);
  model->to(device);
  wick::SupervisedTask task(model);
  // wick::FusedAdam runs the update as one ATen kernel (Python's Adam(fused=True));
  // torch::optim::Adam runs eight ops per parameter.
  std::unique_ptr<torch::optim::Optimizer> optimizer_holder;
  if (args.optimizer == "fused-adam") {
    optimizer_holder =
        std::make_unique<wick::FusedAdam>(model->parameters(), wick::FusedAdamOptions(args.lr));
  } else {
    optimizer_holder = std::make_unique<torch::optim::Adam>(model->parameters(),
                                                            torch::optim::AdamOptions(args.lr));
  }
  torch::optim::Optimizer& optimizer = *optimizer_holder;

  const std::string checkpoint_dir =
      args.checkpoint_dir.empty() ? args.run_dir + "/checkpoints" : args.checkpoint_dir;
  wick::Trainer trainer(
      wick::TrainerOptions()
          .max_epochs(args.epochs)
          .max_steps(args.max_steps)
          .grad_accum_steps(args.accum)
          .precision(precision)
          .grad_clip_norm(args.clip)
          .seed(args.seed)
          .log_every_n_steps(50)
          .checkpoint_dir(checkpoint_dir)
          .checkpoint_every_n_steps(args.checkpoint_every)
          .keep_last_k(2)
          .async_checkpoint(args.async_checkpoint)
          .resume(args.resume)
          .process_group(pg)
          .device(device)
          .sharding(args.shard.empty()
                        ? std::nullopt
                        : std::optional<wick::ShardingOptions>(wick::ShardingOptions().strategy(
                              wick::parse_sharding_strategy(args.shard)))));

  const int64_t steps_per_epoch = (*train.size() + args.accum - 1) / args.accum;
  if (args.schedule == "cosine") {
    const int64_t total = args.max_steps > 0 ? args.max_steps : steps_per_epoch * args.epochs;
    trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(
        std::make_shared<wick::CosineWarmupLR>(optimizer, std::min<int64_t>(100, total / 10), total,
                                               /*min_lr_ratio=*/0.05)));
  } else if (args.schedule != "constant") {
    throw std::invalid_argument("--schedule must be cosine or constant, got " + args.schedule);
  }
  auto throughput = std::make_shared<wick::ThroughputMonitor>();
  trainer.add_callback(throughput);
  trainer.add_callback(
      std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(args.run_dir)));
  if (!args.tensorboard.empty()) {
    trainer.add_callback(
        std::make_shared<wick::TensorBoardLogger>(wick::TensorBoardLoggerOptions(args.tensorboard)
                                                      .hparams({{"model", args.model},
                                                                {"lr", args.lr},
                                                                {"batch_size", args.batch_size},
                                                                {"optimizer", args.optimizer},
                                                                {"schedule", args.schedule}})));
  }
  if (args.progress) trainer.add_callback(std::make_shared<wick::ProgressBar>());
  auto profile = args.profile ? std::make_shared<fmnist::ProfileCallback>(args.run_dir) : nullptr;
  if (profile) trainer.add_callback(profile);

  if (main_rank) {
    std::printf(
        "wick-fmnist: %s (%lld parameters), %lld train / %lld val / %lld test images, batch %lld x "
        "%lld, %s, %d threads\n",
        args.model.c_str(), static_cast<long long>(count_parameters(*model)),
        static_cast<long long>(n_train), static_cast<long long>(args.val_size),
        static_cast<long long>(test_set.images().size(0)), static_cast<long long>(args.batch_size),
        static_cast<long long>(args.accum), wick::to_string(precision).c_str(),
        torch::get_num_threads());
    if (gpu) std::printf("on %s (%s)\n", device.str().c_str(), gpu->c_str());
    if (world > 1) {
      std::printf(
          "data-parallel over %lld ranks (%s): %lld training images and batches of %lld per rank\n",
          static_cast<long long>(world), pg->backend_name().c_str(),
          static_cast<long long>((n_train + world - 1) / world),
          static_cast<long long>(args.batch_size));
    }
    std::fflush(stdout);
  }

  auto result = trainer.fit(task, optimizer, train, val.get());
  auto test_metrics = trainer.validate(task, test);
  const double test_accuracy = test_metrics.at("val/accuracy");
  const double test_loss = test_metrics.at("val/loss");
  const std::string hash = wick::parameters_sha256(*model);

  // --prune: one |w| threshold over every Linear and Conv weight, then one
  // epoch of fine-tuning (a quarter of the learning rate) with the masks held.
  std::optional<fmnist::PruneResult> pruned;
  double pruned_accuracy = 0;
  double pruned_accuracy_before_finetune = 0;
  if (args.prune >= 0) {
    pruned = fmnist::prune_and_finetune(
        model, args.prune, [&](std::shared_ptr<wick::Callback> keep_masks) {
          pruned_accuracy_before_finetune = trainer.validate(task, test).at("val/accuracy");
          wick::FusedAdam finetune_optimizer(model->parameters(),
                                             wick::FusedAdamOptions(args.lr / 4));
          wick::Trainer finetune(wick::TrainerOptions()
                                     .max_epochs(1)
                                     .precision(precision)
                                     .seed(args.seed + 1)
                                     .log_every_n_steps(50)
                                     .process_group(pg)
                                     .device(device));
          finetune.add_callback(keep_masks);
          if (args.progress) finetune.add_callback(std::make_shared<wick::ProgressBar>());
          finetune.fit(task, finetune_optimizer, train);
        });
    pruned_accuracy = trainer.validate(task, test).at("val/accuracy");
  }

  // The trained (under --prune: pruned) weights for Python's safetensors and
  // anything that reads it, under the model's named_parameters() names.
  if (!args.export_safetensors.empty() && main_rank) {
    wick::save_safetensors(
        args.export_safetensors, *model,
        {{"format", "pt"},
         {"model", args.model},
         {"producer", "wick-fmnist"},
         {"test_accuracy", std::to_string(pruned ? pruned_accuracy : test_accuracy)}});
  }

  // --quantize: an int8 copy on the CPU beside the fp32 model (the pruned one under --prune).
  std::optional<fmnist::Int8Comparison> int8;
  if (args.quantize && main_rank)
    int8 = fmnist::compare_int8(model, test_set.images(), test_set.targets());

  // Serving: a fresh model loaded from the checkpoint the Trainer wrote last;
  // under --prune the pruned model as it is; with --serve-int8 the int8 copy.
  std::optional<fmnist::ServeReport> served;
  TORCH_CHECK(!args.serve.int8 || args.quantize, "--serve-int8 needs --quantize");
  if (args.serve.clients > 0 && main_rank) {
    if (args.serve.int8) {
      // The int8 model saved as a checkpoint, then loaded by the session into
      // a fresh model quantized the same way (InferenceSessionOptions::transform).
      const std::string int8_path = args.run_dir + "/int8-model";
      wick::Checkpoint ckpt;
      ckpt.put_module("model", *int8->int8_model);
      ckpt.save(int8_path);
      served = fmnist::serve_test_set(make_model(args.model), int8_path,
                                      wick::InferenceSessionOptions().transform(
                                          [](torch::nn::Module& m) { wick::quantize_dynamic(m); }),
                                      test_set.images(), test_set.targets(), args.serve);
    } else if (pruned) {
      served = fmnist::serve_test_set(model, "", wick::InferenceSessionOptions().device(device),
                                      test_set.images(), test_set.targets(), args.serve);
    } else {
      // The checkpoint this run's Checkpointer wrote at the end of fit.
      const std::string own = checkpoint_dir + "/" + wick::checkpoint_name(result.state.step);
      const auto all = wick::list_checkpoints(checkpoint_dir);
      TORCH_CHECK(std::any_of(all.begin(), all.end(),
                              [&](const std::string& p) {
                                return std::filesystem::path(p).filename() ==
                                       std::filesystem::path(own).filename();
                              }),
                  "--serve: this run's last checkpoint ", own, " is missing");
      served = fmnist::serve_test_set(make_model(args.model), own,
                                      wick::InferenceSessionOptions().device(device),
                                      test_set.images(), test_set.targets(), args.serve);
    }
  }

  // Every rank trained on its shard: the run's throughput is the sum over ranks.
  const double train_samples_per_s = throughput->samples_per_s() * static_cast<double>(world);
  if (!main_rank) return 0;
  std::printf("\ntrained %lld steps (%lld epochs) in %.1f s, %.0f samples/s; stopped by %s\n",
              static_cast<long long>(result.state.step), static_cast<long long>(result.state.epoch),
              result.seconds, train_samples_per_s, result.stop_reason.c_str());
  if (!result.last_val_metrics.empty()) {
    std::printf("validation: loss %.4f, accuracy %.4f\n", result.last_val_metrics.at("val/loss"),
                result.last_val_metrics.at("val/accuracy"));
  }
  std::printf("test:       loss %.4f, accuracy %.4f\n", test_loss, test_accuracy);
  if (served) fmnist::print_serve_report(*served, args.serve);
  std::printf("parameters sha256 %s\n", hash.c_str());
  if (pruned) {
    std::printf("\npruned %.1f%% of the Linear and Conv weights (global |w| threshold):\n%s",
                100 * pruned->sparsity, pruned->report.c_str());
    std::printf(
        "pruned test accuracy %.4f before fine-tuning, %.4f after one epoch (unpruned %.4f)\n",
        pruned_accuracy_before_finetune, pruned_accuracy, test_accuracy);
  }
  if (int8) {
    std::printf("\nint8 (wick::quantize_dynamic) beside fp32, on the CPU:\n%s",
                int8->report.c_str());
    std::printf("           accuracy   test set (s)   1 image (ms)\n");
    std::printf("fp32       %8.4f   %12.3f   %12.3f\n", int8->fp32_accuracy, int8->fp32_seconds,
                int8->fp32_latency_ms);
    std::printf("int8       %8.4f   %12.3f   %12.3f\n", int8->int8_accuracy, int8->int8_seconds,
                int8->int8_latency_ms);
    std::printf("int8: %.2fx faster on the test set, Linear weights %.1f%% of fp32\n",
                int8->fp32_seconds / int8->int8_seconds,
                100.0 * static_cast<double>(int8->int8_linear_bytes) /
                    static_cast<double>(int8->fp32_linear_bytes));
  }
  const auto ckpt_stats = trainer.async_checkpoint_stats();
  if (args.async_checkpoint) {
    std::printf(
        "checkpoints: %lld written in the background; the last blocked training %.1f ms (host "
        "copy of %.1f MiB), its write took %.1f ms\n",
        static_cast<long long>(ckpt_stats.saves_completed), 1e3 * ckpt_stats.last_blocked_s,
        static_cast<double>(ckpt_stats.last_snapshot_bytes) / (1 << 20),
        1e3 * ckpt_stats.last_write_s);
  }
  std::printf("metrics in %s/metrics.{jsonl,csv}, checkpoints in %s\n", args.run_dir.c_str(),
              checkpoint_dir.c_str());
  if (profile && profile->ops()) {
    std::printf("\nprofiled %lld steps; top 10 ops by total CPU time:\n%s",
                static_cast<long long>(profile->profiled_steps()),
                profile->ops()->table("cpu_time_total", 10).c_str());
    std::printf("trace in %s (open in ui.perfetto.dev or chrome://tracing)\n",
                profile->trace_path().c_str());
  }
  const std::string report_path = fmnist::write_report(
      args.run_dir, "wick-fmnist " + args.model,
      {{"test accuracy", std::to_string(test_accuracy)},
       {"steps", std::to_string(result.state.step)},
       {"samples/s", std::to_string(static_cast<int64_t>(train_samples_per_s))}},
      profile.get());
  std::printf("report in %s\n", report_path.c_str());

  if (args.json) {
    nlohmann::json j;
    j["run_dir"] = args.run_dir;
    j["model"] = args.model;
    j["precision"] = wick::to_string(precision);
    j["epochs"] = result.state.epoch;
    j["steps"] = result.state.step;
    j["batch_size"] = args.batch_size;
    j["accum"] = args.accum;
    j["optimizer"] = args.optimizer;
    j["threads"] = torch::get_num_threads();
    j["world_size"] = world;
    j["shard"] = args.shard.empty() ? nlohmann::json(nullptr) : nlohmann::json(args.shard);
    j["device"] = args.device;
    j["gpu_name"] = gpu ? nlohmann::json(*gpu) : nlohmann::json(nullptr);
    j["test_accuracy"] = test_accuracy;
    j["test_loss"] = test_loss;
    if (!result.last_val_metrics.empty())
      j["val_accuracy"] = result.last_val_metrics.at("val/accuracy");
    j["train_samples_per_s"] = train_samples_per_s;
    j["train_seconds"] = result.seconds;
    j["params_sha256"] = hash;
    j["stop_reason"] = result.stop_reason;
    j["async_checkpoint"] = args.async_checkpoint;
    if (args.async_checkpoint) {
      j["checkpoints_written"] = ckpt_stats.saves_completed;
      j["checkpoint_blocked_ms"] = 1e3 * ckpt_stats.last_blocked_s;
      j["checkpoint_write_ms"] = 1e3 * ckpt_stats.last_write_s;
    }
    if (pruned) {
      j["pruned_sparsity"] = pruned->sparsity;
      j["pruned_test_accuracy"] = pruned_accuracy;
      j["pruned_test_accuracy_before_finetune"] = pruned_accuracy_before_finetune;
    }
    if (int8) {
      j["fp32_test_accuracy"] = int8->fp32_accuracy;
      j["int8_test_accuracy"] = int8->int8_accuracy;
      j["int8_speedup"] = int8->fp32_seconds / int8->int8_seconds;
      j["int8_size_ratio"] = static_cast<double>(int8->int8_linear_bytes) /
                             static_cast<double>(int8->fp32_linear_bytes);
      j["fp32_latency_ms"] = int8->fp32_latency_ms;
      j["int8_latency_ms"] = int8->int8_latency_ms;
      j["fp32_model_bytes"] = int8->fp32_model_bytes;
      j["int8_model_bytes"] = int8->int8_model_bytes;
    }
    j["report_path"] = report_path;
    if (!args.export_safetensors.empty()) j["safetensors_path"] = args.export_safetensors;
    if (profile) {
      j["trace_path"] = profile->trace_path();
      j["profiled_steps"] = profile->profiled_steps();
    }
    if (served) fmnist::add_serve_fields(j, *served, args.serve);
    std::cout << j.dump() << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  CLI::App app{"wick-fmnist: train and evaluate on Fashion-MNIST with wick"};
  app.add_option("--model", args.model, "mlp (784-512-256-10) or cnn (conv32-conv64-fc128-fc10)")
      ->check(CLI::IsMember({"mlp", "cnn"}))
      ->capture_default_str();
  app.add_option("--epochs", args.epochs, "epochs (-1: no epoch limit; --max-steps ends the run)")
      ->capture_default_str();
  app.add_option("--batch-size", args.batch_size, "samples per micro-batch")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--accum", args.accum, "micro-batches per optimizer step")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--precision", args.precision, "fp32, bf16 or fp16")->capture_default_str();
  app.add_option("--lr", args.lr, "Adam learning rate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--threads", args.threads, "intra-op threads (0: LibTorch's default)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--data-dir", args.data_dir, "directory of the Fashion-MNIST IDX files")
      ->capture_default_str();
  auto* run_dir_option =
      app.add_option("--run-dir", args.run_dir,
                     "this run's directory: metrics, report and by default checkpoints (default: "
                     "a new runs/fmnist/version_N per run; --resume latest: the newest)")
          ->capture_default_str();
  app.add_option("--checkpoint-dir", args.checkpoint_dir,
                 "checkpoint directory (default <run-dir>/checkpoints)");
  app.add_option("--checkpoint-every", args.checkpoint_every,
                 "also checkpoint every N steps (0: per epoch)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--async-checkpoint", args.async_checkpoint,
               "write checkpoints in the background: training blocks only for a host copy of "
               "the state (TrainerOptions::async_checkpoint)");
  app.add_option("--resume", args.resume,
                 "\"latest\" (newest in the checkpoint dir) or a checkpoint path");
  app.add_option("--max-steps", args.max_steps, "stop after N optimizer steps (-1: no limit)");
  app.add_option("--val-size", args.val_size, "training images held out for validation")
      ->capture_default_str();
  app.add_option("--seed", args.seed, "seed of weights and shuffling")->capture_default_str();
  app.add_option("--clip", args.clip, "clip gradient norm (0: off)")->capture_default_str();
  app.add_option("--schedule", args.schedule, "cosine (with warm-up) or constant")
      ->capture_default_str();
  app.add_option("--optimizer", args.optimizer,
                 "fused-adam (wick::FusedAdam) or adam (torch::optim::Adam)")
      ->check(CLI::IsMember({"fused-adam", "adam"}))
      ->capture_default_str();
  app.add_flag("!--no-progress", args.progress, "no progress bar");
  app.add_flag("--json", args.json, "print a final JSON line");
  app.add_option("--device", args.device,
                 "cpu, cuda (under --ddp: the GPU of LOCAL_RANK) or cuda:N (this GPU, also under "
                 "--ddp)")
      ->capture_default_str();
  app.add_flag(
      "--quantize", args.quantize,
      "after training, evaluate an int8 copy (wick::quantize_dynamic) beside fp32 on the CPU");
  app.add_option("--prune", args.prune,
                 "after training, prune this fraction of the Linear and Conv weights (one global "
                 "threshold) "
                 "and fine-tune one epoch")
      ->check(CLI::Range(0.0, 1.0));
  app.add_flag("--profile", args.profile,
               "profile a few training steps (wick::Profiler): top-10 ops, trace.json and the "
               "report's ops table");
  app.add_flag("--ddp", args.ddp,
               "data-parallel: join the process group torchrun describes (RANK, WORLD_SIZE, ...)");
  app.add_option("--shard", args.shard,
                 "shard the training state across the ranks instead of replicating it: zero1 "
                 "(optimizer state), zero2 (and gradients) or full (and parameters); "
                 "checkpoints are then sharded and --resume works on any number of ranks "
                 "(docs/sharding.md)")
      ->check(CLI::IsMember({"zero1", "zero2", "full"}));
  app.add_option("--init-safetensors", args.init_safetensors,
                 "start from the weights in this safetensors file (keys: the model's "
                 "named_parameters() names, docs/interop.md)");
  app.add_option("--export-safetensors", args.export_safetensors,
                 "after training, write the model's weights to this safetensors file");
  app.add_option("--tensorboard", args.tensorboard,
                 "also write TensorBoard event files (every logged metric, the run's options) "
                 "to this directory");
  app.add_option(
         "--serve", args.serve.clients,
         "after training, serve the test set to CLIENTS threads through a DynamicBatcher (0: no)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--serve-max-batch", args.serve.max_batch, "serving: largest batch")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--serve-max-delay-us", args.serve.max_delay_us,
                 "serving: longest wait for a batch to fill, us")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag(
      "--serve-int8", args.serve.int8,
      "serve the int8 copy (needs --quantize) through a quantized checkpoint; each image's "
      "activations are quantized on their own, so served answers are compared with "
      "offline ones bit for bit (serve_int8_differ)");
  app.add_option("--serve-workers", args.serve.workers, "serving: batches run in parallel")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--serve-model", args.serve_model,
                 "instead of training: serve this exported model (AOTInductor .pt2 or "
                 "TorchScript; [N,1,28,28] normalized images -> [N,10] logits) to --serve "
                 "clients (default 64)");
  CLI11_PARSE(app, argc, argv);
  args.device_given = app.count("--device") > 0;
  args.run_dir_given = run_dir_option->count() > 0;
  try {
    return run(args);
  } catch (const c10::Error& e) {
    std::cerr << "wick-fmnist: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "wick-fmnist: " << e.what() << "\n";
  }
  return 1;
}
