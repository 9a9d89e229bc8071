#pragma once
// Callbacks: code the Trainer runs at fixed points of the loop, and the ready
// ones (progress bar, metric logs, checkpoints, early stopping, LR schedules,
// throughput).
//
//   trainer.add_callback(std::make_shared<wick::ProgressBar>());
//   trainer.add_callback(std::make_shared<wick::MetricLogger>(MetricLoggerOptions("runs/a")));
//   trainer.add_callback(std::make_shared<wick::EarlyStopping>(
//       EarlyStoppingOptions("val/loss").patience(3)));
//   trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(
//       std::make_shared<wick::CosineWarmupLR>(optimizer, /*warmup=*/100, /*total=*/2000)));
//
// The loop, and where each hook runs:
//   on_fit_start
//   per epoch:   on_epoch_start
//     per micro-batch:  on_batch_start, (forward, backward), on_batch_end
//     per optimizer step (group of micro-batches): on_step_end; on_log every log_every_n_steps
//     on_epoch_end (after the epoch's validation, if any)
//     validation: on_validation_start, on_validation_end(metrics)
//   on_fit_end
// Callbacks with state (has_state) are saved in every checkpoint under
// "callback.<name()>" and restored on resume.

#include <torch/torch.h>

#include <wick/lr_scheduler.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace wick {

class Trainer;
using Metrics = std::map<std::string, double>;

class Callback {
 public:
  virtual ~Callback() = default;
  /// Name of the callback; the key of its state in checkpoints (unique among
  /// a Trainer's stateful callbacks).
  virtual std::string name() const = 0;

  virtual void on_fit_start(Trainer& trainer) {}
  virtual void on_fit_end(Trainer& trainer) {}
  virtual void on_epoch_start(Trainer& trainer) {}
  virtual void on_epoch_end(Trainer& trainer) {}
  /// Before / after each micro-batch (forward and backward).
  virtual void on_batch_start(Trainer& trainer) {}
  virtual void on_batch_end(Trainer& trainer) {}
  /// After each optimizer step (trainer.last_step_skipped() tells whether the scaler skipped it).
  virtual void on_step_end(Trainer& trainer) {}
  /// Training logs: "train/loss", "lr", "train/samples_per_s", user scalars ("train/<name>"), ...
  virtual void on_log(Trainer& trainer, const Metrics& logs) {}
  virtual void on_validation_start(Trainer& trainer) {}
  /// Validation metrics: "val/loss", "val/accuracy", ...
  virtual void on_validation_end(Trainer& trainer, const Metrics& metrics) {}

  /// Whether only the main rank (rank 0) runs this callback under data-parallel
  /// training: true for those that write files or the terminal.
  virtual bool main_rank_only() const { return false; }
  /// Whether it runs on every rank when the fit is sharded
  /// (TrainerOptions::sharding), even if main_rank_only(): its work is
  /// collective there (the Checkpointer's saves).
  virtual bool every_rank_when_sharded() const { return false; }

  /// Whether save/load carry state that must survive a resume.
  virtual bool has_state() const { return false; }
  virtual void save(torch::serialize::OutputArchive& archive) const {}
  virtual void load(torch::serialize::InputArchive& archive) {}
};

enum class Mode { kMin, kMax };

// ---------------------------------------------------------------------------

struct ProgressBarOptions {
  using Stream = std::FILE*;
  /// When stderr is not a terminal: one line every this many optimizer steps; >= 1.
  TORCH_ARG(int64_t, print_every_n_steps) = 100;
  /// Width of the bar in characters on a terminal.
  TORCH_ARG(int64_t, width) = 30;
  /// Force one-line-per-N mode even on a terminal.
  TORCH_ARG(bool, force_lines) = false;
  /// Where to write (default stderr).
  TORCH_ARG(Stream, stream) = stderr;
};

/// A live bar (epoch, step, loss, samples/s, ETA) on a terminal; one line per
/// N steps when piped. Validation results print as a line, and every finished
/// epoch as a summary line. Piped output is therefore, per finished epoch:
/// one line per step with step % print_every_n_steps == 0, one line per
/// validation, one summary line. Values missing from the logs are left out.
/// Training by steps (TrainerOptions::max_epochs(-1) with max_steps), the bar
/// and its lines show the run's "step s/max_steps" (and the epoch) instead of
/// "epoch e/max_epochs step i/n", and validations print as "step s/N validation:".
/// Construction throws for print_every_n_steps < 1, width < 1 or a null stream.
class ProgressBar : public Callback {
 public:
  explicit ProgressBar(ProgressBarOptions options = {});
  std::string name() const override { return "ProgressBar"; }
  bool main_rank_only() const override { return true; }
  void on_fit_start(Trainer& trainer) override;
  void on_epoch_start(Trainer& trainer) override;
  void on_step_end(Trainer& trainer) override;
  void on_log(Trainer& trainer, const Metrics& logs) override;
  void on_validation_end(Trainer& trainer, const Metrics& metrics) override;
  void on_epoch_end(Trainer& trainer) override;
  void on_fit_end(Trainer& trainer) override;

 private:
  void draw_bar(Trainer& trainer, bool force);
  void close_bar();
  void print_line(const std::string& line);
  ProgressBarOptions options_;
  bool tty_ = false;
  Metrics last_logs_;
  int64_t epoch_first_step_ = 0;
  int64_t epoch_first_batch_ =
      0;  // batch_in_epoch at on_epoch_start (> 0 after a mid-epoch resume)
  int64_t epoch_first_samples_ = 0;  // samples_seen at on_epoch_start
  bool bar_open_ = false;            // a bar is drawn and its line not yet ended
  size_t bar_length_ = 0;            // characters of the last bar drawn (to blank leftovers)
  int64_t fit_first_step_ = 0;       // state().step at on_fit_start (> 0 after a resume)
  // last_step_end_: the epoch's training time, for its summary, excludes validation.
  std::chrono::steady_clock::time_point fit_start_, epoch_start_, last_draw_, last_step_end_;
};

// ---------------------------------------------------------------------------

struct MetricLoggerOptions {
  /* implicit */ MetricLoggerOptions(std::string dir) : dir_(std::move(dir)) {}
  /// Directory of metrics.jsonl and metrics.csv (created).
  TORCH_ARG(std::string, dir);
  TORCH_ARG(bool, jsonl) = true;
  TORCH_ARG(bool, csv) = true;
  /// Append to existing files (resume) instead of truncating them on a fresh run.
  TORCH_ARG(bool, append_on_resume) = true;
};

/// Writes every on_log and on_validation_end as one JSON object per line
/// ({"kind": "train"|"val", "step", "epoch", "time", metrics...}) to
/// metrics.jsonl, and as long-format rows (kind,step,epoch,name,value) to metrics.csv.
/// Flushed each write, so a crash loses nothing written before it. "step" and
/// "epoch" come from trainer.state() (the logs' own copies are not repeated);
/// "time" is seconds since this fit started. A fresh run truncates the files;
/// a resumed one (state().step > 0 at fit start) appends when append_on_resume.
class MetricLogger : public Callback {
 public:
  explicit MetricLogger(MetricLoggerOptions options);
  std::string name() const override { return "MetricLogger"; }
  bool main_rank_only() const override { return true; }
  void on_fit_start(Trainer& trainer) override;
  void on_log(Trainer& trainer, const Metrics& logs) override;
  void on_validation_end(Trainer& trainer, const Metrics& metrics) override;
  void on_fit_end(Trainer& trainer) override;
  std::string jsonl_path() const;
  std::string csv_path() const;

 private:
  void write(Trainer& trainer, const char* kind, const Metrics& metrics);
  MetricLoggerOptions options_;
  std::ofstream jsonl_, csv_;
  std::chrono::steady_clock::time_point start_;
};

// ---------------------------------------------------------------------------

struct CheckpointerOptions {
  /* implicit */ CheckpointerOptions(std::string dir) : dir_(std::move(dir)) {}
  /// Directory holding step-XXXXXXXX checkpoints and "best".
  TORCH_ARG(std::string, dir);
  /// Save every this many optimizer steps (0: off).
  TORCH_ARG(int64_t, every_n_steps) = 0;
  /// Save at the end of every epoch.
  TORCH_ARG(bool, every_epoch) = true;
  /// Save when fit ends (normally or on a stop request).
  TORCH_ARG(bool, on_fit_end) = true;
  /// Keep the newest K step checkpoints (<= 0: all).
  TORCH_ARG(int64_t, keep_last_k) = 3;
  /// Also keep "best": the checkpoint with the best value of this validation metric ("" = off).
  TORCH_ARG(std::string, monitor) = "";
  TORCH_ARG(Mode, mode) = Mode::kMin;
};

/// Saves the Trainer's whole state (Trainer::save_checkpoint) to
/// dir/step-XXXXXXXX on a schedule (at most once per step), prunes all but the
/// newest keep_last_k, and with `monitor` saves dir/best (meta "monitor",
/// "value", "step") on every validation that improves on the best value. A
/// missing monitored metric is an error naming the keys that exist.
class Checkpointer : public Callback {
 public:
  explicit Checkpointer(CheckpointerOptions options);
  std::string name() const override { return "Checkpointer"; }
  bool main_rank_only() const override { return true; }
  bool every_rank_when_sharded() const override { return true; }
  void on_step_end(Trainer& trainer) override;
  void on_epoch_end(Trainer& trainer) override;
  void on_validation_end(Trainer& trainer, const Metrics& metrics) override;
  void on_fit_end(Trainer& trainer) override;
  bool has_state() const override { return true; }
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// Path of the newest checkpoint this callback wrote ("" if none).
  const std::string& last_path() const { return last_path_; }
  std::optional<double> best_value() const { return best_; }

 private:
  void save_step(Trainer& trainer);
  CheckpointerOptions options_;
  std::string last_path_;
  int64_t last_saved_step_ = -1;
  std::optional<double> best_;
};

// ---------------------------------------------------------------------------

struct EarlyStoppingOptions {
  /* implicit */ EarlyStoppingOptions(std::string monitor) : monitor_(std::move(monitor)) {}
  /// Validation metric to watch, e.g. "val/loss".
  TORCH_ARG(std::string, monitor);
  /// Validations without improvement before stopping; >= 1.
  TORCH_ARG(int64_t, patience) = 3;
  TORCH_ARG(Mode, mode) = Mode::kMin;
  /// Smallest change that counts as an improvement; >= 0.
  TORCH_ARG(double, min_delta) = 0.0;
};

/// Stops training when a validation metric has not improved by min_delta for
/// `patience` validations. A metric missing from the validation results is an
/// error naming it and the keys that exist.
class EarlyStopping : public Callback {
 public:
  explicit EarlyStopping(EarlyStoppingOptions options);
  std::string name() const override { return "EarlyStopping"; }
  void on_validation_end(Trainer& trainer, const Metrics& metrics) override;
  bool has_state() const override { return true; }
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
  std::optional<double> best() const { return best_; }
  int64_t wait() const { return wait_; }

 private:
  EarlyStoppingOptions options_;
  std::optional<double> best_;
  int64_t wait_ = 0;
};

// ---------------------------------------------------------------------------

enum class ScheduleInterval { kStep, kEpoch };

/// Steps an LR scheduler from the loop: after every optimizer step or every
/// epoch; a ReduceLROnPlateau steps on each validation with `monitor`'s value
/// (missing: an error naming the keys that exist). Steps the fp16 loss scaler
/// skipped do not advance a per-step schedule (it counts weight updates).
/// The scheduler's state travels in checkpoints.
class LRSchedulerCallback : public Callback {
 public:
  explicit LRSchedulerCallback(std::shared_ptr<LRScheduler> scheduler,
                               ScheduleInterval interval = ScheduleInterval::kStep);
  explicit LRSchedulerCallback(std::shared_ptr<ReduceLROnPlateau> scheduler,
                               std::string monitor = "val/loss");
  std::string name() const override { return "LRScheduler"; }
  void on_step_end(Trainer& trainer) override;
  void on_epoch_end(Trainer& trainer) override;
  void on_validation_end(Trainer& trainer, const Metrics& metrics) override;
  bool has_state() const override { return true; }
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  std::shared_ptr<LRScheduler> scheduler_;
  std::shared_ptr<ReduceLROnPlateau> plateau_;
  ScheduleInterval interval_ = ScheduleInterval::kStep;
  std::string monitor_;
};

// ---------------------------------------------------------------------------

/// Measures training throughput (samples/s, from trainer.state().samples_seen)
/// per epoch and over the fit. An epoch's training time runs from
/// on_epoch_start to its last on_step_end, so validation and end-of-epoch work
/// (epoch checkpoints, logs) are not counted; work done inside the steps
/// (periodic checkpoints, logging) is.
class ThroughputMonitor : public Callback {
 public:
  std::string name() const override { return "ThroughputMonitor"; }
  void on_fit_start(Trainer& trainer) override;
  void on_epoch_start(Trainer& trainer) override;
  void on_step_end(Trainer& trainer) override;
  void on_epoch_end(Trainer& trainer) override;
  /// Counts an epoch cut short (max_steps, a stop request) into the totals.
  void on_fit_end(Trainer& trainer) override;

  /// samples/s of each finished epoch.
  const std::vector<double>& epoch_samples_per_s() const { return per_epoch_; }
  /// Training samples over training seconds since fit start (finished epochs
  /// and one cut short).
  double samples_per_s() const;
  double train_seconds() const { return train_seconds_; }

 private:
  void close_epoch(Trainer& trainer, bool finished);
  std::vector<double> per_epoch_;
  std::chrono::steady_clock::time_point epoch_start_, last_step_end_;
  int64_t epoch_start_samples_ = 0;
  int64_t last_step_samples_ = 0;  // samples_seen at the last on_step_end
  double train_seconds_ = 0.0;
  int64_t train_samples_ = 0;
  bool in_epoch_ = false;
};

}  // namespace wick
