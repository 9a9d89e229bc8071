// wick-fmnist: trains an MLP or a small CNN on Fashion-MNIST with wick's
// Trainer, then evaluates it on the test set.
//
//   wick-fmnist --model cnn --epochs 2                 # ~0.91 test accuracy
//   wick-fmnist --model mlp --precision bf16 --accum 4 --json
//   wick-fmnist --model cnn --checkpoint-dir runs/a/checkpoints --resume latest
//   torchrun --standalone --nproc_per_node=2 --no-python wick-fmnist --ddp --threads 1
//   wick-fmnist --model cnn --epochs 2 --serve 64      # then serve the test set to 64 clients
//
// Prints a summary a person can read and, last, one JSON line for machines.

#include <wick/wick.h>

#include "serve.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <memory>
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
  std::string run_dir = "runs/fmnist";
  std::string checkpoint_dir;  // default <run_dir>/checkpoints
  std::string resume;
  int64_t checkpoint_every = 0;
  int64_t max_steps = -1;
  int64_t val_size = 5000;
  uint64_t seed = 1;
  double clip = 0.0;
  std::string schedule = "cosine";
  std::string optimizer = "fused-adam";
  bool progress = true;
  bool json = false;
  bool ddp = false;
  std::string device = "cpu";
  fmnist::ServeOptions serve;
};

torch::nn::Sequential make_model(const std::string& name) {
  namespace nn = torch::nn;
  if (name == "mlp") {
    return nn::Sequential(nn::Flatten(), nn::Linear(784, 512), nn::ReLU(), nn::Linear(512, 256), nn::ReLU(),
                          nn::Linear(256, 10));
  }
  if (name == "cnn") {
    return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, 32, 3).padding(1)), nn::ReLU(),
                          nn::MaxPool2d(2),  // 32x14x14
                          nn::Conv2d(nn::Conv2dOptions(32, 64, 3).padding(1)), nn::ReLU(),
                          nn::MaxPool2d(2),  // 64x7x7
                          nn::Flatten(), nn::Linear(64 * 7 * 7, 128), nn::ReLU(), nn::Linear(128, 10));
  }
  throw std::invalid_argument("--model must be mlp or cnn, got " + name);
}

int64_t count_parameters(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

int run(const Args& args) {
  if (args.threads > 0) torch::set_num_threads(args.threads);
  const auto precision = wick::parse_precision(args.precision);
  // Under torchrun: one process per rank, each reading its shard; else a world of one.
  TORCH_CHECK(args.device == "cpu" || args.device == "cuda", "--device must be cpu or cuda, got ",
              args.device);
  const bool cuda = args.device == "cuda";
  TORCH_CHECK(!cuda || torch::cuda::is_available(), "--device cuda, but no CUDA device is visible");
  auto pg = args.ddp ? wick::init_process_group(wick::ProcessGroupOptions().device(
                           cuda ? std::optional<torch::Device>(torch::kCUDA) : std::nullopt))
                     : std::make_shared<wick::ProcessGroup>();
  const int64_t rank = pg->rank(), world = pg->world_size();
  const bool main_rank = pg->is_main();

  // Data: the last val_size training images are held out for validation.
  wick::FashionMNIST train_set(args.data_dir, wick::FashionMNIST::Split::kTrain);
  wick::FashionMNIST test_set(args.data_dir, wick::FashionMNIST::Split::kTest);
  const int64_t n_train = train_set.images().size(0) - args.val_size;
  TORCH_CHECK(args.val_size >= 0 && n_train > 0, "--val-size must be in [0, ",
              train_set.images().size(0), "), got ", args.val_size);
  // On CUDA: this rank's GPU; the data stays in pinned host memory and each
  // batch is copied ahead of its use.
  const torch::Device device = cuda ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(pg->local_rank()))
                                    : torch::Device(torch::kCPU);
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
    val = std::make_unique<wick::TensorBatchSource>(x.narrow(0, n_train, args.val_size),
                                                    y.narrow(0, n_train, args.val_size),
                                                    wick::TensorBatchSourceOptions(1000).shuffle(false).rank(rank).world_size(world));
  }
  wick::TensorBatchSource test(test_set.images(), test_set.targets(),
                               wick::TensorBatchSourceOptions(1000).shuffle(false).rank(rank).world_size(world));

  torch::manual_seed(args.seed);  // the model's initial weights
  auto model = make_model(args.model);
  model->to(device);
  wick::SupervisedTask task(model);
  // wick::FusedAdam runs the update as one ATen kernel (Python's Adam(fused=True));
  // torch::optim::Adam runs eight ops per parameter.
  std::unique_ptr<torch::optim::Optimizer> optimizer_holder;
  if (args.optimizer == "fused-adam") {
    optimizer_holder = std::make_unique<wick::FusedAdam>(model->parameters(), wick::FusedAdamOptions(args.lr));
  } else {
    optimizer_holder = std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(args.lr));
  }
  torch::optim::Optimizer& optimizer = *optimizer_holder;

  const std::string checkpoint_dir =
      args.checkpoint_dir.empty() ? args.run_dir + "/checkpoints" : args.checkpoint_dir;
  wick::Trainer trainer(wick::TrainerOptions()
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
                            .resume(args.resume)
                            .process_group(pg)
                            .device(device));

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
  trainer.add_callback(std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(args.run_dir)));
  if (args.progress) trainer.add_callback(std::make_shared<wick::ProgressBar>());

  if (main_rank) {
    std::printf("wick-fmnist: %s (%lld parameters), %lld train / %lld val / %lld test images, batch %lld x %lld, %s, %d threads\n",
              args.model.c_str(), static_cast<long long>(count_parameters(*model)),
              static_cast<long long>(n_train), static_cast<long long>(args.val_size),
              static_cast<long long>(test_set.images().size(0)), static_cast<long long>(args.batch_size),
              static_cast<long long>(args.accum), wick::to_string(precision).c_str(), torch::get_num_threads());
    if (world > 1) {
      std::printf("data-parallel over %lld ranks (%s): %lld training images and batches of %lld per rank\n",
                  static_cast<long long>(world), pg->backend_name().c_str(),
                  static_cast<long long>((n_train + world - 1) / world), static_cast<long long>(args.batch_size));
    }
    std::fflush(stdout);
  }

  auto result = trainer.fit(task, optimizer, train, val.get());
  auto test_metrics = trainer.validate(task, test);
  const double test_accuracy = test_metrics.at("val/accuracy");
  const double test_loss = test_metrics.at("val/loss");
  const std::string hash = wick::parameters_sha256(*model);

  // Serving: a fresh model loaded from the checkpoint the Trainer wrote last.
  std::optional<fmnist::ServeReport> served;
  if (args.serve.clients > 0 && main_rank) {
    const auto latest = wick::latest_checkpoint(checkpoint_dir);
    TORCH_CHECK(latest.has_value(), "--serve: no checkpoint under ", checkpoint_dir);
    served = fmnist::serve_test_set(make_model(args.model), *latest, wick::InferenceSessionOptions().device(device),
                                    test_set.images(), test_set.targets(), args.serve);
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
  std::printf("metrics in %s/metrics.{jsonl,csv}, checkpoints in %s\n", args.run_dir.c_str(), checkpoint_dir.c_str());

  if (args.json) {
    nlohmann::json j;
    j["model"] = args.model;
    j["precision"] = wick::to_string(precision);
    j["epochs"] = result.state.epoch;
    j["steps"] = result.state.step;
    j["batch_size"] = args.batch_size;
    j["accum"] = args.accum;
    j["optimizer"] = args.optimizer;
    j["threads"] = torch::get_num_threads();
    j["world_size"] = world;
    j["device"] = args.device;
    j["test_accuracy"] = test_accuracy;
    j["test_loss"] = test_loss;
    if (!result.last_val_metrics.empty()) j["val_accuracy"] = result.last_val_metrics.at("val/accuracy");
    j["train_samples_per_s"] = train_samples_per_s;
    j["train_seconds"] = result.seconds;
    j["params_sha256"] = hash;
    j["stop_reason"] = result.stop_reason;
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
  app.add_option("--epochs", args.epochs, "epochs")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--batch-size", args.batch_size, "samples per micro-batch")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--accum", args.accum, "micro-batches per optimizer step")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--precision", args.precision, "fp32, bf16 or fp16")->capture_default_str();
  app.add_option("--lr", args.lr, "Adam learning rate")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--threads", args.threads, "intra-op threads (0: LibTorch's default)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--data-dir", args.data_dir, "directory of the Fashion-MNIST IDX files")->capture_default_str();
  app.add_option("--run-dir", args.run_dir, "where metrics (and by default checkpoints) go")->capture_default_str();
  app.add_option("--checkpoint-dir", args.checkpoint_dir, "checkpoint directory (default <run-dir>/checkpoints)");
  app.add_option("--checkpoint-every", args.checkpoint_every, "also checkpoint every N steps (0: per epoch)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--resume", args.resume, "\"latest\" (newest in the checkpoint dir) or a checkpoint path");
  app.add_option("--max-steps", args.max_steps, "stop after N optimizer steps (-1: no limit)");
  app.add_option("--val-size", args.val_size, "training images held out for validation")->capture_default_str();
  app.add_option("--seed", args.seed, "seed of weights and shuffling")->capture_default_str();
  app.add_option("--clip", args.clip, "clip gradient norm (0: off)")->capture_default_str();
  app.add_option("--schedule", args.schedule, "cosine (with warm-up) or constant")->capture_default_str();
  app.add_option("--optimizer", args.optimizer, "fused-adam (wick::FusedAdam) or adam (torch::optim::Adam)")
      ->check(CLI::IsMember({"fused-adam", "adam"}))
      ->capture_default_str();
  app.add_flag("!--no-progress", args.progress, "no progress bar");
  app.add_flag("--json", args.json, "print a final JSON line");
  app.add_option("--device", args.device, "cpu or cuda (under --ddp: the GPU of LOCAL_RANK)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_flag("--ddp", args.ddp, "data-parallel: join the process group torchrun describes (RANK, WORLD_SIZE, ...)");
  app.add_option("--serve", args.serve.clients,
                 "after training, serve the test set to CLIENTS threads through a DynamicBatcher (0: no)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--serve-max-batch", args.serve.max_batch, "serving: largest batch")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--serve-max-delay-us", args.serve.max_delay_us, "serving: longest wait for a batch to fill, us")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--serve-workers", args.serve.workers, "serving: batches run in parallel")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    return run(args);
  } catch (const c10::Error& e) {
    std::cerr << "wick-fmnist: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "wick-fmnist: " << e.what() << "\n";
  }
  return 1;
}
