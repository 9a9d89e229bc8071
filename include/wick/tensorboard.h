#pragma once
// TensorBoard event files, written by wick without TensorFlow or protobuf.
//
//   // In a Trainer: every logged metric becomes a scalar, the run's options
//   // hparams (HPARAMS tab) and a text table (TEXT tab).
//   trainer.add_callback(std::make_shared<wick::TensorBoardLogger>(
//       wick::TensorBoardLoggerOptions("runs/a/tb").hparams({{"lr", 2e-3}, {"model", "cnn"}})));
//   // then: tensorboard --logdir runs
//
//   // Alone, in any loop:
//   wick::EventFileWriter tb("runs/b");
//   tb.add_scalar("loss", 0.25, /*step=*/100);
//
// An event file (events.out.tfevents.<time>.<host>.<pid>.<n>) is a sequence
// of records: an 8-byte little-endian length, its masked CRC-32C, the bytes of
// one tensorflow.Event protocol buffer, their masked CRC-32C. The first event
// carries file_version "brain.Event:2"; each scalar is a Summary.Value with
// simple_value (float32, as TensorBoard stores scalars); text and hparams
// follow the text and hparams plugins' formats. Each record is flushed when
// written, so TensorBoard shows a run live and a crash loses nothing written.

#include <wick/callbacks.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

namespace wick {

/// A hyperparameter's value: a number, a string or a bool (TensorBoard's
/// HPARAMS tab filters and sorts by the kind).
class HParamValue {
 public:
  enum class Kind { kNumber, kString, kBool };
  HParamValue(double v)
      : kind_(Kind::kNumber), number_(v) {}  // NOLINT(google-explicit-constructor)
  /// Any integer (int, int64_t, long long, unsigned, ...), as a number.
  template <typename Int,
            std::enable_if_t<std::is_integral_v<Int> && !std::is_same_v<Int, bool>, int> = 0>
  HParamValue(Int v)  // NOLINT(google-explicit-constructor)
      : HParamValue(static_cast<double>(v)) {}
  HParamValue(bool v) : kind_(Kind::kBool), bool_(v) {}  // NOLINT(google-explicit-constructor)
  HParamValue(std::string v)                             // NOLINT(google-explicit-constructor)
      : kind_(Kind::kString), string_(std::move(v)) {}
  HParamValue(const char* v)
      : HParamValue(std::string(v)) {}  // NOLINT(google-explicit-constructor)

  Kind kind() const { return kind_; }
  double number() const { return number_; }
  const std::string& string() const { return string_; }
  bool boolean() const { return bool_; }
  /// As the text table shows it: "0.002", "cnn", "true".
  std::string to_string() const;

 private:
  Kind kind_;
  double number_ = 0;
  bool bool_ = false;
  std::string string_;
};

using HParams = std::map<std::string, HParamValue>;

/// Writes one event file in `log_dir` (created if missing). Not thread-safe:
/// one writer per thread, or a lock around it.
class EventFileWriter {
 public:
  /// Creates the file and writes its first event (file_version). Throws naming
  /// the directory or file when that fails.
  explicit EventFileWriter(const std::string& log_dir);
  ~EventFileWriter();
  EventFileWriter(const EventFileWriter&) = delete;
  EventFileWriter& operator=(const EventFileWriter&) = delete;

  /// A scalar (stored as float32) under `tag` at `step`; `wall_time` in
  /// seconds since the epoch (default: now).
  void add_scalar(const std::string& tag, double value, int64_t step, double wall_time = -1);
  /// Markdown text under `tag` (TensorBoard's TEXT tab).
  void add_text(const std::string& tag, const std::string& markdown, int64_t step);
  /// The run's hyperparameters for the HPARAMS tab (the hparams plugin's
  /// session_start_info); write them once per run, before its scalars.
  void add_hparams(const HParams& hparams, int64_t step = 0);
  /// The hparams plugin's session_end_info: the run finished (`success`) or not.
  void end_session(bool success, int64_t step);
  /// A SessionLog START at `step`: TensorBoard drops events of earlier files
  /// at steps >= `step` (what a crashed run logged after its last checkpoint),
  /// as it does for a restarted TensorFlow job.
  void restart_at(int64_t step);

  const std::string& path() const { return path_; }

 private:
  void write_event(const std::string& event);
  std::string path_;
  std::FILE* file_ = nullptr;
};

struct TensorBoardLoggerOptions {
  /* implicit */ TensorBoardLoggerOptions(
      std::string log_dir)  // NOLINT(google-explicit-constructor)
      : log_dir_(std::move(log_dir)) {}
  /// Directory of the run's event files; each fit writes a new file there.
  TORCH_ARG(std::string, log_dir);
  /// The run's own hyperparameters (learning rate, model, ...), shown beside
  /// the Trainer's options; a key given here wins over the Trainer's.
  TORCH_ARG(HParams, hparams) = {};
  /// Also record the Trainer's options that define the run (max_epochs,
  /// max_steps, grad_accum_steps, precision, grad_clip_norm, seed,
  /// deterministic, device, world_size) as hparams. Default true.
  TORCH_ARG(bool, trainer_options) = true;
};

/// A Trainer callback: every training log ("train/loss", "lr", meters, user
/// scalars) and every validation metric ("val/loss", ...) becomes a scalar at
/// the Trainer's step, under the same name as in metrics.jsonl; the run's
/// hparams go to the HPARAMS tab and, as a markdown table, to the TEXT tab
/// ("run/options"). On resume a new event file starts with a SessionLog START
/// at the resumed step, so TensorBoard drops what the interrupted run logged
/// after the checkpoint it resumed from. Main rank only.
class TensorBoardLogger : public Callback {
 public:
  explicit TensorBoardLogger(TensorBoardLoggerOptions options);
  ~TensorBoardLogger() override;
  std::string name() const override { return "TensorBoardLogger"; }
  bool main_rank_only() const override { return true; }
  void on_fit_start(Trainer& trainer) override;
  void on_log(Trainer& trainer, const Metrics& logs) override;
  void on_validation_end(Trainer& trainer, const Metrics& metrics) override;
  void on_fit_end(Trainer& trainer) override;
  /// The event file of the current (or last) fit; "" before the first.
  std::string path() const;

 private:
  void write(Trainer& trainer, const Metrics& metrics);
  TensorBoardLoggerOptions options_;
  std::unique_ptr<EventFileWriter> writer_;
  std::string last_path_;
};

/// CRC-32C (Castagnoli) of `size` bytes, as TFRecord framing uses it.
uint32_t crc32c(const void* data, size_t size);

}  // namespace wick
