#include "wick/trainer.h"

#include "batch_mover.h"
#include "module_state.h"

#include <wick/lr_scheduler.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace wick {

// ---------------------------------------------------------------------------
// SupervisedTask

SupervisedTask::SupervisedTask(std::shared_ptr<torch::nn::Module> module, ForwardFn forward,
                               LossFn loss_fn)
    : module_(std::move(module)), forward_(std::move(forward)), loss_fn_(std::move(loss_fn)) {
  TORCH_CHECK(module_ != nullptr, "SupervisedTask: the module is null");
  TORCH_CHECK(forward_ != nullptr, "SupervisedTask: the forward function is empty");
  if (!loss_fn_) {
    loss_fn_ = [](const torch::Tensor& output, const torch::Tensor& target) {
      return torch::nn::functional::cross_entropy(output, target);
    };
  }
}

StepOutput SupervisedTask::training_step(const Batch& batch) {
  return loss_fn_(forward_(batch.data), batch.target);
}

std::map<std::string, torch::Tensor> SupervisedTask::validation_step(const Batch& batch) {
  auto output = forward_(batch.data);
  std::map<std::string, torch::Tensor> metrics{{"loss", loss_fn_(output, batch.target)}};
  const auto& target = batch.target;
  if (output.dim() == 2 && target.dim() == 1 && !c10::isFloatingType(target.scalar_type())) {
    metrics["accuracy"] = output.argmax(1).eq(target).to(torch::kFloat64).mean();
  }
  return metrics;
}

// ---------------------------------------------------------------------------
// seed_everything

uint64_t seed_everything(uint64_t seed) {
  at::manual_seed(seed);  // the CPU generator and every CUDA device's default generator
  std::srand(static_cast<unsigned>(seed));
  return seed;
}

// ---------------------------------------------------------------------------
// Trainer

namespace {

// Clears the Trainer's per-fit pointers however fit() ends.
template <typename F>
struct ScopeExit {
  F f;
  ~ScopeExit() { f(); }
};
template <typename F>
ScopeExit(F) -> ScopeExit<F>;

void check_options(const TrainerOptions& o) {
  TORCH_CHECK(o.max_epochs() >= 1 || o.max_epochs() == -1,
              "Trainer: max_epochs must be >= 1, or -1 (no epoch limit) with max_steps set, got ",
              o.max_epochs());
  TORCH_CHECK(o.max_steps() == -1 || o.max_steps() >= 1,
              "Trainer: max_steps must be -1 (no limit) or >= 1, got ", o.max_steps());
  TORCH_CHECK(o.max_epochs() != -1 || o.max_steps() >= 1,
              "Trainer: max_epochs=-1 (no epoch limit) needs max_steps >= 1, got max_steps=",
              o.max_steps());
  TORCH_CHECK(o.grad_accum_steps() >= 1, "Trainer: grad_accum_steps must be >= 1, got ",
              o.grad_accum_steps());
  TORCH_CHECK(o.log_every_n_steps() >= 1, "Trainer: log_every_n_steps must be >= 1, got ",
              o.log_every_n_steps());
  TORCH_CHECK(o.val_every_n_epochs() >= 0, "Trainer: val_every_n_epochs must be >= 0, got ",
              o.val_every_n_epochs());
  TORCH_CHECK(o.checkpoint_every_n_steps() >= 0,
              "Trainer: checkpoint_every_n_steps must be >= 0, got ", o.checkpoint_every_n_steps());
  TORCH_CHECK(o.max_nonfinite_losses() >= 0,
              "Trainer: max_nonfinite_losses must be >= 0 (0 = off), got ",
              o.max_nonfinite_losses());
  TORCH_CHECK(o.grad_clip_norm() >= 0.0, "Trainer: grad_clip_norm must be >= 0 (0 = off), got ",
              o.grad_clip_norm());
  TORCH_CHECK(o.resume().empty() || !o.checkpoint_dir().empty() || o.resume() != "latest",
              "Trainer: resume=\"latest\" needs checkpoint_dir");
  if (o.precision() != Precision::kFP32 && o.device().has_value()) {
    // Fails early, naming the device, when autocast cannot run there.
    AutocastGuard probe(*o.device(), o.precision());
  }
}

// sums[name] += mean(value) * samples, kept on the device (no sync).
void add_weighted(std::map<std::string, torch::Tensor>& sums, const std::string& name,
                  const torch::Tensor& value, int64_t samples) {
  auto v = value.detach().to(torch::kFloat64).mean() * static_cast<double>(samples);
  auto& sum = sums[name];
  sum = sum.defined() ? sum + v : v;
}

}  // namespace

Trainer::Trainer(TrainerOptions options) : options_(std::move(options)) { check_options(options_); }

Trainer::~Trainer() = default;

Trainer& Trainer::add_callback(std::shared_ptr<Callback> callback) {
  TORCH_CHECK(callback != nullptr, "Trainer: add_callback got a null callback");
  TORCH_CHECK(task_ == nullptr, "Trainer: add_callback during fit");
  if (callback->has_state()) {
    for (const auto& other : callbacks_) {
      TORCH_CHECK(!other->has_state() || other->name() != callback->name(),
                  "Trainer: two stateful callbacks named '", callback->name(),
                  "'; their checkpoint state would collide");
    }
  }
  callbacks_.push_back(std::move(callback));
  return *this;
}

template <typename F>
void Trainer::each_callback(F&& f) {
  const bool main = is_main();
  for (auto& cb : callbacks_) {
    if (main || !cb->main_rank_only() || (sdp_ && cb->every_rank_when_sharded())) f(*cb);
  }
}

Task& Trainer::task() {
  TORCH_CHECK(task_ != nullptr, "Trainer: task() is only available during fit");
  return *task_;
}

torch::optim::Optimizer& Trainer::optimizer() {
  TORCH_CHECK(optimizer_ != nullptr, "Trainer: optimizer() is only available during fit");
  return *optimizer_;
}

void Trainer::request_stop(const std::string& reason) {
  if (stop_reason_.empty()) stop_reason_ = reason.empty() ? "stop requested" : reason;
}

std::string Trainer::fingerprint() const {
  // Only what changes the numbers of steps already taken: extending
  // max_epochs or changing logging on resume is fine, changing these is not.
  const auto& o = options_;
  const auto& s = o.scaler();
  std::ostringstream out;
  out << "grad_accum_steps=" << o.grad_accum_steps() << ";precision=" << to_string(o.precision())
      << ";grad_clip_norm=" << o.grad_clip_norm() << ";seed=" << o.seed()
      << ";deterministic=" << o.deterministic();
  // A sharded checkpoint reloads on any number of ranks (keep the global
  // batch to continue the same run); a replicated one on as many as wrote it.
  if (!o.sharding().has_value()) out << ";world_size=" << world_size();
  if (o.precision() == Precision::kFP16) {
    out << ";scaler.growth_factor=" << s.growth_factor()
        << ";scaler.backoff_factor=" << s.backoff_factor()
        << ";scaler.growth_interval=" << s.growth_interval() << ";scaler.enabled=" << s.enabled();
  }
  return out.str();
}

namespace {

std::map<std::string, std::string> split_fingerprint(const std::string& fp) {
  std::map<std::string, std::string> kv;
  std::istringstream in(fp);
  std::string item;
  while (std::getline(in, item, ';')) {
    auto eq = item.find('=');
    kv[item.substr(0, eq)] = eq == std::string::npos ? "" : item.substr(eq + 1);
  }
  return kv;
}

std::string fingerprint_diff(const std::string& saved, const std::string& now) {
  auto a = split_fingerprint(saved), b = split_fingerprint(now);
  std::ostringstream out;
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    if (it == b.end()) {
      out << " " << k << ": " << v << " in the checkpoint, absent now;";
    } else if (it->second != v) {
      out << " " << k << ": " << v << " in the checkpoint, " << it->second << " now;";
    }
  }
  for (const auto& [k, v] : b) {
    if (!a.count(k)) out << " " << k << ": absent in the checkpoint, " << v << " now;";
  }
  return out.str();
}

}  // namespace

void Trainer::save_checkpoint(const std::string& path,
                              const std::map<std::string, std::string>& meta,
                              const std::function<void()>& after_write) {
  TORCH_CHECK(task_ != nullptr && optimizer_ != nullptr,
              "Trainer: save_checkpoint is only available during fit");
  auto build = [&](Checkpoint& ckpt) {
    if (!sdp_) {  // sharded: every rank writes its own shards (below)
      ckpt.put_module("model", task_->module());
      ckpt.put_optimizer("optimizer", *optimizer_);
    }
    if (scaler_) ckpt.put("scaler", [&](auto& a) { scaler_->save(a); });
    for (const auto& cb : callbacks_) {
      if (cb->has_state()) ckpt.put("callback." + cb->name(), [&](auto& a) { cb->save(a); });
    }
    ckpt.put_rng_state();
    TrainState s = state_;
    if (epoch_done_) {  // the epoch and its validation are complete: resume at the next one
      s.epoch += 1;
      s.batch_in_epoch = 0;
    }
    ckpt.set_train_state(s);
    ckpt.set_fingerprint(fingerprint());
    // Where a sharded run stands in its epoch, for a resume on another number
    // of ranks (load_checkpoint maps batch_in_epoch through it).
    if (batches_per_epoch_) {
      ckpt.set_meta("batches_per_epoch", std::to_string(*batches_per_epoch_));
    }
    for (const auto& [k, v] : meta) ckpt.set_meta(k, v);
  };
  if (sdp_ && options_.async_checkpoint()) {
    // Collective: every rank is here, snapshots its shards and writes them in
    // the background; rank 0 commits them.
    if (!checkpoint_writer_) checkpoint_writer_ = std::make_unique<AsyncCheckpointWriter>();
    sdp_->save_checkpoint_async(*checkpoint_writer_, path, build, after_write);
    return;
  }
  if (sdp_) {
    // Collective: every rank is here, and writes its shards itself.
    Checkpoint ckpt;
    build(ckpt);
    sdp_->save_checkpoint(ckpt, path);
    if (after_write) after_write();
    return;
  }
  if (options_.async_checkpoint()) {
    if (!checkpoint_writer_) checkpoint_writer_ = std::make_unique<AsyncCheckpointWriter>();
    checkpoint_writer_->save(path, build, after_write);
    return;
  }
  Checkpoint ckpt;
  build(ckpt);
  ckpt.save(path);
  if (after_write) after_write();
}

AsyncCheckpointStats Trainer::async_checkpoint_stats() const {
  return checkpoint_writer_ ? checkpoint_writer_->stats() : checkpoint_stats_;
}

void Trainer::close_checkpoint_writer(c10::Error* failing) {
  if (!checkpoint_writer_) return;
  try {
    checkpoint_writer_->wait();
  } catch (const std::exception& e) {
    // fit is already failing: the background write's failure goes with that
    // error rather than being lost.
    const std::string msg =
        c10::str("besides, a background checkpoint write failed: ", detail::message_of(e));
    if (failing != nullptr) {
      failing->add_context(msg);
    } else {
      TORCH_WARN("Trainer: fit failed; ", msg);
    }
  }
  checkpoint_stats_ = checkpoint_writer_->stats();
  checkpoint_writer_.reset();
}

void Trainer::load_checkpoint(const std::string& path) {
  TORCH_CHECK(task_ != nullptr && optimizer_ != nullptr,
              "Trainer: load_checkpoint is only available during fit (set TrainerOptions::resume)");
  auto ckpt = Checkpoint::load(path);
  TORCH_CHECK(ckpt.fingerprint() == fingerprint(), "Trainer: checkpoint ", path,
              " was written with other training options:",
              fingerprint_diff(ckpt.fingerprint(), fingerprint()),
              " resuming would not continue the same run");
  if (sdp_) {
    sdp_->load_checkpoint(ckpt);  // any world size and strategy
  } else {
    TORCH_CHECK(!ckpt.meta("sharding").has_value(), "Trainer: checkpoint ", path,
                " is sharded; resume it with TrainerOptions::sharding");
    ckpt.restore_module("model", task_->module());
    ckpt.restore_optimizer("optimizer", *optimizer_);
  }
  if (scaler_) ckpt.get("scaler", [&](auto& a) { scaler_->load(a); });
  for (const auto& cb : callbacks_) {
    // A callback added since the checkpoint starts from its own fresh state.
    if (cb->has_state() && ckpt.has("callback." + cb->name())) {
      ckpt.get("callback." + cb->name(), [&](auto& a) { cb->load(a); });
    }
  }
  ckpt.restore_rng_state();
  state_ = ckpt.train_state();
  // Sharded, the run may continue on another number of ranks, whose epochs
  // have another number of batches: the same place in the epoch is the same
  // fraction of it, when that is a whole number of batches.
  const auto saved_batches = ckpt.meta("batches_per_epoch");
  if (sdp_ && saved_batches && batches_per_epoch_ && state_.batch_in_epoch > 0) {
    const int64_t before = std::stoll(*saved_batches), now = *batches_per_epoch_;
    if (before != now) {
      const int64_t scaled = state_.batch_in_epoch * now;
      TORCH_CHECK(scaled % before == 0, "Trainer: checkpoint ", path, " stopped after batch ",
                  state_.batch_in_epoch, " of ", before, " in epoch ", state_.epoch,
                  "; this run's epochs have ", now,
                  " batches per rank, so that place is not a batch boundary here; resume from "
                  "a checkpoint at an epoch's end, or keep the number of samples per step");
      state_.batch_in_epoch = scaled / before;
    }
  }
}

FitResult Trainer::fit(Task& task, torch::optim::Optimizer& optimizer, BatchSource& train,
                       BatchSource* val) {
  TORCH_CHECK(task_ == nullptr, "Trainer: fit is already running");
  checkpoint_stats_ = {};
  try {
    FitResult result = run_fit(task, optimizer, train, val);
    close_checkpoint_writer(nullptr);  // idle: run_fit waited for the last write
    return result;
  } catch (c10::Error& e) {
    close_checkpoint_writer(&e);
    throw;
  } catch (...) {
    close_checkpoint_writer(nullptr);
    throw;
  }
}

FitResult Trainer::run_fit(Task& task, torch::optim::Optimizer& optimizer, BatchSource& train,
                           BatchSource* val) {
  TORCH_CHECK(!optimizer.param_groups().empty(), "Trainer: the optimizer has no parameter groups");
  const auto start = std::chrono::steady_clock::now();
  task_ = &task;
  optimizer_ = &optimizer;
  ScopeExit clear{[this] {
    ddp_.reset();  // removes its autograd hooks from the parameters
    sdp_.reset();  // and leaves the module whole
    task_ = nullptr;
    optimizer_ = nullptr;
  }};

  device_ = resolve_device(task);
  if (options_.deterministic()) {
    at::globalContext().setDeterministicAlgorithms(true, false);
    // cuBLAS is deterministic only with a fixed workspace configuration, and
    // under deterministic algorithms LibTorch refuses every CUDA matmul while
    // CUBLAS_WORKSPACE_CONFIG is unset. The user's own setting is kept.
    if (device_.is_cuda()) ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  }
  if (options_.device().has_value()) task.module().to(device_);
  params_.clear();
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) params_.push_back(p);
  }
  scaler_ = options_.precision() == Precision::kFP16
                ? std::make_unique<AmpScaler>(options_.scaler())
                : nullptr;
  accumulator_ = std::make_unique<GradAccumulator>(options_.grad_accum_steps());
  state_ = TrainState{};
  stop_reason_.clear();
  epoch_done_ = false;
  nonfinite_losses_ = 0;
  last_logs_.clear();
  last_val_metrics_.clear();
  last_val_step_ = -1;
  batches_per_epoch_ = train.size();

  if (!options_.checkpoint_dir().empty()) {
    bool have = std::any_of(callbacks_.begin(), callbacks_.end(),
                            [](const auto& cb) { return cb->name() == "Checkpointer"; });
    if (!have) {
      callbacks_.push_back(
          std::make_shared<Checkpointer>(CheckpointerOptions(options_.checkpoint_dir())
                                             .every_n_steps(options_.checkpoint_every_n_steps())
                                             .keep_last_k(options_.keep_last_k())));
    }
  }

  if (options_.sharding().has_value()) {
    // Before a resume: a sharded checkpoint restores into the shards. Also
    // in a world of one, which can resume what more ranks wrote.
    auto pg =
        options_.process_group() ? options_.process_group() : std::make_shared<ProcessGroup>();
    sdp_ = std::make_unique<ShardedDataParallel>(task.module().shared_from_this(), pg, optimizer,
                                                 *options_.sharding());
    params_ = sdp_->sharded_parameters();  // the optimizer's, now
    if (scaler_) scaler_->set_process_group(pg);
  }

  if (!options_.resume().empty()) {
    std::string path = options_.resume();
    if (path == "latest") {
      auto latest = latest_checkpoint(options_.checkpoint_dir());
      TORCH_CHECK(latest.has_value(), "Trainer: resume=\"latest\" but ", options_.checkpoint_dir(),
                  " holds no complete checkpoint");
      path = *latest;
    }
    load_checkpoint(path);
  } else {
    torch::manual_seed(options_.seed());
  }

  if (world_size() > 1 && !sdp_) {
    // After a resume, so every rank starts from rank 0's (restored) parameters.
    ddp_ = std::make_unique<DistributedDataParallel>(task.module().shared_from_this(),
                                                     options_.process_group(), options_.ddp());
  }

  reset_log_window();
  each_callback([&](Callback& cb) { cb.on_fit_start(*this); });
  if (options_.max_steps() > 0 && state_.step >= options_.max_steps()) request_stop("max_steps");
  const bool unlimited_epochs = options_.max_epochs() < 0;
  while ((unlimited_epochs || state_.epoch < options_.max_epochs()) && !stop_requested()) {
    const int64_t samples_before = state_.samples_seen;
    // A resume from a checkpoint written after an epoch's last batch (before
    // its end) finds that epoch's batches all consumed: not an empty source.
    const bool resumed_inside = state_.batch_in_epoch > 0;
    run_epoch(train, val);
    // Without an epoch limit only max_steps ends fit: an epoch without a
    // batch would repeat forever.
    TORCH_CHECK(!unlimited_epochs || stop_requested() || resumed_inside ||
                    state_.samples_seen > samples_before,
                "Trainer: max_epochs=-1 (no epoch limit), but the training source yielded no "
                "batches in epoch ",
                state_.epoch - 1, "; max_steps=", options_.max_steps(), " cannot be reached");
  }
  if (steps_since_log_ > 0) emit_logs();
  // Stopped inside an epoch: its validation never ran, so validate the final
  // weights once (unless the last validation already saw them).
  if (options_.val_at_fit_end() && val != nullptr && options_.val_every_n_epochs() > 0 &&
      state_.batch_in_epoch > 0 && last_val_step_ != state_.step) {
    run_validation(task, *val, /*with_callbacks=*/true);
  }
  if (stop_reason_.empty()) stop_reason_ = "max_epochs";
  each_callback([&](Callback& cb) { cb.on_fit_end(*this); });
  // fit returns once the last checkpoint is on disk, or raises why it is not
  // (sharded: on every rank, whichever rank's write failed).
  if (checkpoint_writer_) {
    if (sdp_) {
      sdp_->wait_checkpoint(*checkpoint_writer_);
    } else {
      checkpoint_writer_->wait();
    }
  }

  FitResult result;
  result.state = state_;
  result.last_logs = last_logs_;
  result.last_val_metrics = last_val_metrics_;
  result.stop_reason = stop_reason_;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

void Trainer::run_epoch(BatchSource& train, BatchSource* val) {
  Task& task = *task_;
  epoch_done_ = false;
  train.reset(state_.epoch);
  if (state_.batch_in_epoch > 0) train.skip(state_.batch_in_epoch);
  task.module().train();
  each_callback([&](Callback& cb) { cb.on_epoch_start(*this); });

  // One batch of look-ahead tells whether the current one ends the data, so
  // the accumulator closes a partial last group on it; on CUDA its copy to
  // the device overlaps the current batch's compute.
  detail::BatchMover mover(device_);
  auto next = mover.next(train);
  while (next.has_value() && !stop_requested()) {
    Batch batch = std::move(*next);
    mover.ready(batch);
    next = mover.next(train);
    const int64_t size = task.batch_size(batch);
    const double weight = accumulator_->begin(size, /*ends_data=*/!next.has_value());

    each_callback([&](Callback& cb) { cb.on_batch_start(*this); });
    if (ddp_) {
      // Gradients cross ranks only on the micro-batch that closes the group.
      ddp_->set_sync(accumulator_->sync_gradients());
      ddp_->prepare_forward();
    }
    if (sdp_) {
      sdp_->set_sync(accumulator_->sync_gradients());
      sdp_->prepare_forward();
    }
    StepOutput out = [&] {
      AutocastGuard autocast(device_, options_.precision());
      return task.training_step(batch);
    }();
    TORCH_CHECK(out.loss.defined() && out.loss.numel() == 1,
                "Trainer: training_step must return a scalar loss, got ",
                out.loss.defined() ? out.loss.sizes() : c10::IntArrayRef{});
    if (options_.max_nonfinite_losses() > 0) {
      const double value = out.loss.detach().to(torch::kFloat64).item<double>();
      nonfinite_losses_ = std::isfinite(value) ? 0 : nonfinite_losses_ + 1;
      // Steps count from 1, as in TrainState::step and checkpoint names.
      TORCH_CHECK(nonfinite_losses_ < options_.max_nonfinite_losses(),
                  "Trainer: ", nonfinite_losses_,
                  " consecutive non-finite training losses (max_nonfinite_losses=",
                  options_.max_nonfinite_losses(), "), the last ", value, " at step ",
                  state_.step + 1, " (epoch ", state_.epoch, ", micro-batch ",
                  state_.batch_in_epoch + 1, " of the epoch); stopping");
    }
    torch::Tensor loss = weight == 1.0 ? out.loss : out.loss * weight;
    if (scaler_) loss = scaler_->scale(loss);
    loss.backward();
    if (ddp_) ddp_->finalize_backward();
    if (sdp_) sdp_->finalize_backward();

    // Sample-weighted sums for the logs, on the device: no sync per step. One
    // in-place op (float64 += size * loss) rather than a cast, a product and a sum.
    if (!loss_sum_.defined())
      loss_sum_ = torch::zeros({}, out.loss.options().dtype(torch::kFloat64));
    loss_sum_.add_(out.loss.detach(), static_cast<double>(size));
    for (const auto& [name, value] : out.scalars) add_weighted(scalar_sums_, name, value, size);
    samples_since_log_ += size;
    state_.batch_in_epoch += 1;
    state_.samples_seen += size;
    each_callback([&](Callback& cb) { cb.on_batch_end(*this); });

    if (accumulator_->end(params_)) {
      optimizer_step();
      const auto step_end = std::chrono::steady_clock::now();
      step_times_.add(std::chrono::duration<double>(step_end - last_step_end_).count());
      last_step_end_ = step_end;
      state_.step += 1;
      steps_since_log_ += 1;
      if (state_.step % options_.log_every_n_steps() == 0) emit_logs();
      if (options_.max_steps() > 0 && state_.step >= options_.max_steps())
        request_stop("max_steps");
      each_callback([&](Callback& cb) { cb.on_step_end(*this); });
    }
  }
  if (stop_requested() && next.has_value()) return;  // stopped inside the epoch
  if (steps_since_log_ > 0) emit_logs();  // the epoch's tail, so its last logs are its own

  if (val != nullptr && options_.val_every_n_epochs() > 0 &&
      (state_.epoch + 1) % options_.val_every_n_epochs() == 0) {
    run_validation(task, *val, /*with_callbacks=*/true);
  }
  epoch_done_ = true;
  each_callback([&](Callback& cb) { cb.on_epoch_end(*this); });
  state_.epoch += 1;
  state_.batch_in_epoch = 0;
  epoch_done_ = false;
}

void Trainer::optimizer_step() {
  // A background checkpoint write that failed stops training here. Sharded:
  // at the next save or fit's end, where every rank raises it together.
  if (checkpoint_writer_ && !sdp_) checkpoint_writer_->check();
  if (scaler_ && options_.grad_clip_norm() > 0.0) scaler_->unscale_(*optimizer_);
  if (options_.grad_clip_norm() > 0.0) {
    last_grad_norm_ = sdp_ ? sdp_->clip_grad_norm_(options_.grad_clip_norm())
                           : torch::nn::utils::clip_grad_norm_(params_, options_.grad_clip_norm());
  }
  bool stepped = true;
  if (scaler_) {
    stepped = scaler_->step(*optimizer_);
    scaler_->update();
  } else {
    optimizer_->step();
  }
  optimizer_->zero_grad();
  last_step_skipped_ = !stepped;
}

void Trainer::reset_log_window() {
  loss_sum_ = torch::Tensor();
  scalar_sums_.clear();
  samples_since_log_ = 0;
  steps_since_log_ = 0;
  log_window_start_ = std::chrono::steady_clock::now();
  last_step_end_ = log_window_start_;
  step_times_.clear();
}

void Trainer::emit_logs() {
  const auto now = std::chrono::steady_clock::now();
  const double seconds = std::chrono::duration<double>(now - log_window_start_).count();
  Metrics logs;
  if (samples_since_log_ > 0) {
    const double n = static_cast<double>(samples_since_log_);
    logs["train/loss"] = loss_sum_.item<double>() / n;
    for (const auto& [name, sum] : scalar_sums_) logs["train/" + name] = sum.item<double>() / n;
    if (seconds > 0.0) logs["train/samples_per_s"] = n / seconds;
  }
  logs["lr"] = get_lrs(*optimizer_).front();
  logs["step"] = static_cast<double>(state_.step);
  logs["epoch"] = static_cast<double>(state_.epoch);
  if (options_.grad_clip_norm() > 0.0) logs["train/grad_norm"] = last_grad_norm_;
  if (scaler_) {
    logs["amp/scale"] = scaler_->get_scale();
    logs["amp/skipped_steps"] = static_cast<double>(scaler_->skipped_steps());
  }
  if (options_.log_system_metrics()) add_system_metrics(logs);
  if (options_.flops_per_sample() > 0 && options_.peak_flops() > 0 &&
      logs.count("train/samples_per_s")) {
    logs["train/mfu"] =
        mfu(logs["train/samples_per_s"] * static_cast<double>(world_size()),
            options_.flops_per_sample(), options_.peak_flops() * static_cast<double>(world_size()));
  }
  last_logs_ = logs;
  reset_log_window();
  each_callback([&](Callback& cb) { cb.on_log(*this, logs); });
}

void Trainer::add_system_metrics(Metrics& logs) const {
  constexpr double kMB = 1024.0 * 1024.0;
  if (step_times_.size() > 0) {
    logs["train/step_time_ms_p50"] = 1e3 * step_times_.percentile(50);
    logs["train/step_time_ms_p90"] = 1e3 * step_times_.percentile(90);
    logs["train/step_time_ms_p99"] = 1e3 * step_times_.percentile(99);
  }
  const auto host = host_memory();
  if (host.available) {
    logs["sys/rss_mb"] = static_cast<double>(host.rss_bytes) / kMB;
    logs["sys/peak_rss_mb"] = static_cast<double>(host.peak_rss_bytes) / kMB;
  }
  if (device_.is_cuda()) {
    const int index = device_.has_index() ? device_.index() : 0;
    const auto cuda = cuda_memory(index);
    if (cuda.available) {
      logs["cuda/allocated_mb"] = static_cast<double>(cuda.allocated_bytes) / kMB;
      logs["cuda/reserved_mb"] = static_cast<double>(cuda.reserved_bytes) / kMB;
      logs["cuda/peak_allocated_mb"] = static_cast<double>(cuda.peak_allocated_bytes) / kMB;
    }
    const auto gpu = gpu_stats(index);
    if (gpu.available) {
      logs["gpu/utilization_pct"] = gpu.utilization_pct;
      logs["gpu/memory_used_mb"] = static_cast<double>(gpu.memory_used_bytes) / kMB;
      logs["gpu/power_w"] = gpu.power_w;
      logs["gpu/temperature_c"] = gpu.temperature_c;
    }
  }
}

torch::Device Trainer::resolve_device(Task& task) const {
  if (options_.device().has_value()) return *options_.device();
  const auto params = task.module().parameters();
  return params.empty() ? torch::Device(torch::kCPU) : params.front().device();
}

std::map<std::string, double> Trainer::validate(Task& task, BatchSource& val) {
  if (task_ != &task) device_ = resolve_device(task);  // outside fit: where the model is
  return run_validation(task, val, /*with_callbacks=*/task_ == &task);
}

std::map<std::string, double> Trainer::run_validation(Task& task, BatchSource& val,
                                                      bool with_callbacks) {
  auto& module = task.module();
  const bool was_training = module.is_training();
  module.eval();
  // Sharded: the whole model for the validation's duration, gathered once,
  // so ranks with different numbers of validation batches never wait on
  // each other's per-unit gathers.
  ShardedDataParallel* sharded = task_ == &task ? sdp_.get() : nullptr;
  if (sharded) sharded->gather_full_params();
  ScopeExit reshard{[sharded] {
    if (sharded) sharded->reshard();
  }};
  if (with_callbacks) each_callback([&](Callback& cb) { cb.on_validation_start(*this); });

  std::map<std::string, torch::Tensor> sums;
  int64_t samples = 0;
  {
    torch::NoGradGuard no_grad;
    val.reset(0);
    detail::BatchMover mover(device_);  // as in training: the next batch's copy overlaps this one
    for (auto next = mover.next(val); next.has_value();) {
      Batch batch = std::move(*next);
      mover.ready(batch);
      next = mover.next(val);
      const int64_t size = task.batch_size(batch);
      std::map<std::string, torch::Tensor> metrics;
      {
        AutocastGuard autocast(device_, options_.precision());
        metrics = task.validation_step(batch);
      }
      for (const auto& [name, value] : metrics) add_weighted(sums, name, value, size);
      samples += size;
    }
  }
  TORCH_CHECK(samples > 0, "Trainer: the validation source yielded no batches",
              world_size() > 1 ? c10::str(" on rank ", rank()) : std::string());
  if (world_size() > 1) {
    // Every rank validated its shard: sum the sample-weighted sums and the
    // counts, so the result is the mean over all ranks' samples.
    std::vector<torch::Tensor> totals;
    totals.reserve(sums.size() + 1);
    for (auto& [name, sum] : sums)
      totals.push_back(sum.to(torch::kCPU, torch::kFloat64).reshape({1}));
    totals.push_back(torch::tensor({static_cast<double>(samples)}, torch::kFloat64));
    options_.process_group()->allreduce_sum(totals);
    size_t i = 0;
    for (auto& [name, sum] : sums) sum = totals[i++];
    samples = static_cast<int64_t>(totals.back().item<double>());
  }
  Metrics result;
  for (const auto& [name, sum] : sums) result["val/" + name] = sum.item<double>() / samples;
  module.train(was_training);
  if (with_callbacks) {
    last_val_metrics_ = result;
    last_val_step_ = state_.step;
    each_callback([&](Callback& cb) { cb.on_validation_end(*this, result); });
  }
  return result;
}

}  // namespace wick
