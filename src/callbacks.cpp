#include <wick/callbacks.h>

#include "format.h"
#include "fs.h"

#include <wick/checkpoint.h>
#include <wick/trainer.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

namespace wick {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

/// The monitored metric, or an error naming it and the keys that exist.
double monitored_value(const char* owner, const std::string& monitor, const Metrics& metrics) {
  auto it = metrics.find(monitor);
  if (it != metrics.end()) return it->second;
  std::string keys;
  for (const auto& [name, value] : metrics) keys += (keys.empty() ? "" : ", ") + name;
  TORCH_CHECK(false, owner, ": monitored metric '", monitor,
              "' is not among the validation metrics (available: ",
              keys.empty() ? std::string("none") : keys, ")");
  return 0.0;
}

/// Whether `value` improves on `best` by more than `min_delta` (NaN never does).
bool improves(double value, const std::optional<double>& best, Mode mode, double min_delta = 0.0) {
  if (std::isnan(value)) return false;
  if (!best.has_value()) return true;
  return mode == Mode::kMin ? value < *best - min_delta : value > *best + min_delta;
}

void write_optional(torch::serialize::OutputArchive& archive, const std::string& key,
                    const std::optional<double>& value) {
  archive.write("has_" + key, c10::IValue(value.has_value()));
  archive.write(key, c10::IValue(value.value_or(0.0)));
}

c10::IValue read_value(torch::serialize::InputArchive& archive, const char* owner,
                       const std::string& key) {
  c10::IValue value;
  TORCH_CHECK(archive.try_read(key, value), owner, ": saved state has no '", key, "'");
  return value;
}

std::optional<double> read_optional(torch::serialize::InputArchive& archive, const char* owner,
                                    const std::string& key) {
  if (!read_value(archive, owner, "has_" + key).toBool()) return std::nullopt;
  return read_value(archive, owner, key).to<double>();
}

/// The shortest text that reads back as the same double ("0.1", "nan", "inf").
std::string exact(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  TORCH_INTERNAL_ASSERT(ec == std::errc());
  return std::string(buf, end);
}

long long ll(int64_t v) { return static_cast<long long>(v); }

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  auto s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", ll(s / 3600), ll((s / 60) % 60), ll(s % 60));
  return fmt::format("{:02}:{:02}", ll(s / 60), ll(s % 60));
}

std::string join(const std::string& dir, const std::string& name) {
  return detail::join_path(dir, name);
}

bool non_empty_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0;
}

std::string format_value(double v) { return fmt::format("{:.4g}", v); }

/// Steps of an epoch of `batches` micro-batches (the last group may be partial).
int64_t steps_for(int64_t batches, int64_t accum) { return (batches + accum - 1) / accum; }

// Training by steps (max_epochs -1): the run's progress is its step count.
bool by_steps(const Trainer& trainer) { return trainer.options().max_epochs() < 0; }

// "epoch 2/5", or "epoch 2" without an epoch limit.
std::string epoch_label(const Trainer& trainer, int64_t epoch) {
  return by_steps(trainer)
             ? fmt::format("epoch {}", ll(epoch + 1))
             : fmt::format("epoch {}/{}", ll(epoch + 1), ll(trainer.options().max_epochs()));
}

// "[=====>    ] " on a terminal, "" otherwise.
std::string bar_of(double frac, int64_t width, bool tty) {
  if (!tty) return "";
  const auto filled =
      static_cast<int64_t>(std::min(1.0, std::max(0.0, frac)) * static_cast<double>(width));
  std::string bar(static_cast<size_t>(width), ' ');
  for (int64_t i = 0; i < filled; ++i) bar[i] = '=';
  if (filled < width) bar[filled] = '>';
  return "[" + bar + "] ";
}

}  // namespace

// ---------------------------------------------------------------------------
// ProgressBar

ProgressBar::ProgressBar(ProgressBarOptions options) : options_(options) {
  TORCH_CHECK(options_.print_every_n_steps() >= 1,
              "ProgressBar: print_every_n_steps must be >= 1, got ",
              options_.print_every_n_steps());
  TORCH_CHECK(options_.width() >= 1, "ProgressBar: width must be >= 1, got ", options_.width());
  TORCH_CHECK(options_.stream() != nullptr, "ProgressBar: stream must not be null");
}

void ProgressBar::print_line(const std::string& line) {
  close_bar();
  std::fputs(line.c_str(), options_.stream());
  std::fputc('\n', options_.stream());
  std::fflush(options_.stream());
}

void ProgressBar::close_bar() {
  if (!bar_open_) return;
  std::fputc('\n', options_.stream());
  std::fflush(options_.stream());
  bar_open_ = false;
  bar_length_ = 0;
}

void ProgressBar::on_fit_start(Trainer& trainer) {
  const int fd = ::fileno(options_.stream());
  tty_ = !options_.force_lines() && fd >= 0 && ::isatty(fd) == 1;
  last_logs_.clear();
  bar_open_ = false;
  bar_length_ = 0;
  fit_first_step_ = trainer.state().step;
  fit_start_ = Clock::now();
}

void ProgressBar::on_epoch_start(Trainer& trainer) {
  const auto& s = trainer.state();
  epoch_first_step_ = s.step;
  epoch_first_batch_ = s.batch_in_epoch;
  epoch_first_samples_ = s.samples_seen;
  epoch_start_ = Clock::now();
  last_step_end_ = epoch_start_;
  last_draw_ = Clock::time_point{};
}

void ProgressBar::on_log(Trainer& trainer, const Metrics& logs) { last_logs_ = logs; }

void ProgressBar::draw_bar(Trainer& trainer, bool force) {
  const auto& s = trainer.state();
  const int64_t accum = trainer.options().grad_accum_steps();
  const auto batches = trainer.batches_per_epoch();
  const double elapsed = seconds_since(epoch_start_);
  const int64_t batches_done = s.batch_in_epoch - epoch_first_batch_;
  const double samples_per_s =
      elapsed > 0 ? static_cast<double>(s.samples_seen - epoch_first_samples_) / elapsed : 0.0;

  // "  loss 0.3141  lr 0.001  1234 samples/s" (the learning rate on lines only).
  std::string rates;
  auto loss = last_logs_.find("train/loss");
  if (loss != last_logs_.end()) rates += "  loss " + format_value(loss->second);
  auto lr = last_logs_.find("lr");
  if (!tty_ && lr != last_logs_.end()) rates += "  lr " + fmt::format("{:.3g}", lr->second);
  rates += fmt::format("  {:.0f} samples/s", samples_per_s);

  std::string text;
  const int64_t step_in_epoch = steps_for(s.batch_in_epoch, accum);
  if (by_steps(trainer)) {
    // The run's step out of max_steps; ETA from this fit's steps so far.
    const int64_t max_steps = trainer.options().max_steps();
    const double frac = static_cast<double>(s.step) / static_cast<double>(max_steps);
    text = bar_of(frac, options_.width(), tty_) +
           fmt::format("step {}/{} (epoch {})", ll(s.step), ll(max_steps), ll(s.epoch + 1));
    text += rates;
    const int64_t steps_done = s.step - fit_first_step_;
    const double fit_elapsed = seconds_since(fit_start_);
    const double eta = steps_done > 0 ? fit_elapsed / static_cast<double>(steps_done) *
                                            static_cast<double>(max_steps - s.step)
                                      : std::numeric_limits<double>::quiet_NaN();
    text += "  ETA " + format_duration(eta);
  } else if (batches.has_value() && *batches > 0) {
    text = epoch_label(trainer, s.epoch) + " ";
    const int64_t total_steps = steps_for(*batches, accum);
    const double frac = std::min(1.0, static_cast<double>(s.batch_in_epoch) / *batches);
    text += bar_of(frac, options_.width(), tty_);
    text += fmt::format("step {}/{}", ll(step_in_epoch), ll(total_steps));
    text += rates;
    const int64_t remaining = *batches - s.batch_in_epoch;
    const double eta = batches_done > 0 ? elapsed / batches_done * remaining
                                        : std::numeric_limits<double>::quiet_NaN();
    text += "  ETA " + format_duration(eta);
  } else {
    text = epoch_label(trainer, s.epoch) + " ";
    text += fmt::format("step {}", ll(step_in_epoch));
    text += rates;
  }

  if (!tty_) {
    print_line(text);
    return;
  }
  // Redraw at most ten times a second (and always when forced).
  const auto now = Clock::now();
  if (!force && bar_open_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  const size_t length = text.size();
  if (length < bar_length_) text.append(bar_length_ - length, ' ');
  std::fputc('\r', options_.stream());
  std::fputs(text.c_str(), options_.stream());
  std::fflush(options_.stream());
  bar_open_ = true;
  bar_length_ = length;
}

void ProgressBar::on_step_end(Trainer& trainer) {
  last_step_end_ = Clock::now();
  if (tty_) {
    const auto batches = trainer.batches_per_epoch();
    const bool last = batches.has_value() && trainer.state().batch_in_epoch >= *batches;
    draw_bar(trainer, last);
  } else if (trainer.state().step % options_.print_every_n_steps() == 0) {
    draw_bar(trainer, true);
  }
}

void ProgressBar::on_validation_end(Trainer& trainer, const Metrics& metrics) {
  const auto& s = trainer.state();
  std::string text = by_steps(trainer) ? fmt::format("step {}/{} validation:", ll(s.step),
                                                     ll(trainer.options().max_steps()))
                                       : epoch_label(trainer, s.epoch) + " validation:";
  for (const auto& [name, value] : metrics) text += "  " + name + " " + format_value(value);
  print_line(text);
}

void ProgressBar::on_epoch_end(Trainer& trainer) {
  const auto& s = trainer.state();
  const double elapsed = std::chrono::duration<double>(last_step_end_ - epoch_start_).count();
  const int64_t steps = s.step - epoch_first_step_;
  const int64_t samples = s.samples_seen - epoch_first_samples_;
  std::string text = epoch_label(trainer, s.epoch) + fmt::format(" done: {} steps in {}", ll(steps),
                                                                 format_duration(elapsed).c_str());
  if (elapsed > 0) text += fmt::format(", {:.0f} samples/s", samples / elapsed);
  auto it = last_logs_.find("train/loss");
  if (it != last_logs_.end()) text += ", loss " + format_value(it->second);
  print_line(text);
}

void ProgressBar::on_fit_end(Trainer& trainer) { close_bar(); }

// ---------------------------------------------------------------------------
// MetricLogger

MetricLogger::MetricLogger(MetricLoggerOptions options) : options_(std::move(options)) {
  TORCH_CHECK(!options_.dir().empty(), "MetricLogger: dir must not be empty");
}

std::string MetricLogger::jsonl_path() const { return join(options_.dir(), "metrics.jsonl"); }
std::string MetricLogger::csv_path() const { return join(options_.dir(), "metrics.csv"); }

void MetricLogger::on_fit_start(Trainer& trainer) {
  detail::make_directories(options_.dir(), "MetricLogger");
  const bool append = trainer.state().step > 0 && options_.append_on_resume();
  const auto mode = std::ios::out | (append ? std::ios::app : std::ios::trunc);
  start_ = Clock::now();
  jsonl_.close();
  csv_.close();
  if (options_.jsonl()) {
    jsonl_.open(jsonl_path(), mode);
    TORCH_CHECK(jsonl_.is_open(), "MetricLogger: cannot open ", jsonl_path(), ": ",
                std::strerror(errno));
  }
  if (options_.csv()) {
    const bool had_rows = append && non_empty_file(csv_path());
    csv_.open(csv_path(), mode);
    TORCH_CHECK(csv_.is_open(), "MetricLogger: cannot open ", csv_path(), ": ",
                std::strerror(errno));
    if (!had_rows) {
      csv_ << "kind,step,epoch,name,value\n";
      csv_.flush();
    }
  }
}

namespace {

bool reserved_key(const std::string& name) {
  // The Trainer's logs repeat step and epoch; the record has them already.
  return name == "kind" || name == "step" || name == "epoch" || name == "time";
}

std::string csv_field(const std::string& field) {
  if (field.find_first_of(",\"\n\r") == std::string::npos) return field;
  std::string out = "\"";
  for (char c : field) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

}  // namespace

void MetricLogger::write(Trainer& trainer, const char* kind, const Metrics& metrics) {
  TORCH_CHECK(!options_.jsonl() || jsonl_.is_open(), "MetricLogger: ", kind,
              " metrics before on_fit_start (the Trainer opens the files)");
  TORCH_CHECK(!options_.csv() || csv_.is_open(), "MetricLogger: ", kind,
              " metrics before on_fit_start (the Trainer opens the files)");
  const auto& s = trainer.state();
  const double time = seconds_since(start_);
  if (jsonl_.is_open()) {
    nlohmann::ordered_json record;
    record["kind"] = kind;
    record["step"] = s.step;
    record["epoch"] = s.epoch;
    record["time"] = time;
    for (const auto& [name, value] : metrics) {
      if (!reserved_key(name)) record[name] = value;  // NaN and inf become null
    }
    jsonl_ << record.dump() << '\n';
    jsonl_.flush();
    TORCH_CHECK(jsonl_.good(), "MetricLogger: writing ", jsonl_path(), " failed");
  }
  if (csv_.is_open()) {
    for (const auto& [name, value] : metrics) {
      if (reserved_key(name)) continue;
      csv_ << kind << ',' << s.step << ',' << s.epoch << ',' << csv_field(name) << ','
           << exact(value) << '\n';
    }
    csv_.flush();
    TORCH_CHECK(csv_.good(), "MetricLogger: writing ", csv_path(), " failed");
  }
}

void MetricLogger::on_log(Trainer& trainer, const Metrics& logs) { write(trainer, "train", logs); }

void MetricLogger::on_validation_end(Trainer& trainer, const Metrics& metrics) {
  write(trainer, "val", metrics);
}

void MetricLogger::on_fit_end(Trainer& trainer) {
  jsonl_.close();
  csv_.close();
}

// ---------------------------------------------------------------------------
// Checkpointer

Checkpointer::Checkpointer(CheckpointerOptions options) : options_(std::move(options)) {
  TORCH_CHECK(!options_.dir().empty(), "Checkpointer: dir must not be empty");
  TORCH_CHECK(options_.every_n_steps() >= 0,
              "Checkpointer: every_n_steps must be >= 0 (0 = off), got ", options_.every_n_steps());
}

void Checkpointer::save_step(Trainer& trainer) {
  const int64_t step = trainer.state().step;
  if (step == last_saved_step_) return;
  const std::string path = join(options_.dir(), checkpoint_name(step));
  // Recorded before saving, so the checkpoint's own copy of this callback's
  // state knows it was written (a resume from it does not write it again).
  const auto previous = std::make_pair(last_saved_step_, last_path_);
  last_saved_step_ = step;
  last_path_ = path;
  // Pruning follows the write (in the background with async checkpoints), so
  // it neither counts nor races a checkpoint still being written.
  // Sharded, every rank saves, and one prunes, after the save completed everywhere.
  auto prune = [dir = options_.dir(), keep_last_k = options_.keep_last_k(),
                main = trainer.is_main()] {
    if (main) prune_checkpoints(dir, keep_last_k, {join(dir, "best")});
  };
  try {
    trainer.save_checkpoint(path, {}, prune);
  } catch (...) {
    std::tie(last_saved_step_, last_path_) = previous;
    throw;
  }
}

void Checkpointer::on_step_end(Trainer& trainer) {
  const int64_t n = options_.every_n_steps();
  if (n > 0 && trainer.state().step % n == 0) save_step(trainer);
}

void Checkpointer::on_epoch_end(Trainer& trainer) {
  if (options_.every_epoch()) save_step(trainer);
}

void Checkpointer::on_fit_end(Trainer& trainer) {
  if (options_.on_fit_end()) save_step(trainer);
}

void Checkpointer::on_validation_end(Trainer& trainer, const Metrics& metrics) {
  if (options_.monitor().empty()) return;
  const double value = monitored_value("Checkpointer", options_.monitor(), metrics);
  if (!improves(value, best_, options_.mode())) return;
  const auto previous = best_;
  best_ = value;
  try {
    trainer.save_checkpoint(join(options_.dir(), "best"),
                            {{"monitor", options_.monitor()},
                             {"value", exact(value)},
                             {"step", std::to_string(trainer.state().step)}});
  } catch (...) {
    best_ = previous;
    throw;
  }
}

void Checkpointer::save(torch::serialize::OutputArchive& archive) const {
  write_optional(archive, "best", best_);
  archive.write("last_saved_step", c10::IValue(last_saved_step_));
  archive.write("last_path", c10::IValue(last_path_));
}

void Checkpointer::load(torch::serialize::InputArchive& archive) {
  best_ = read_optional(archive, "Checkpointer", "best");
  last_saved_step_ = read_value(archive, "Checkpointer", "last_saved_step").toInt();
  last_path_ = read_value(archive, "Checkpointer", "last_path").toStringRef();
}

// ---------------------------------------------------------------------------
// EarlyStopping

EarlyStopping::EarlyStopping(EarlyStoppingOptions options) : options_(std::move(options)) {
  TORCH_CHECK(!options_.monitor().empty(), "EarlyStopping: monitor must name a validation metric");
  TORCH_CHECK(options_.patience() >= 1, "EarlyStopping: patience must be >= 1, got ",
              options_.patience());
  TORCH_CHECK(std::isfinite(options_.min_delta()) && options_.min_delta() >= 0.0,
              "EarlyStopping: min_delta must be finite and >= 0, got ", options_.min_delta());
}

void EarlyStopping::on_validation_end(Trainer& trainer, const Metrics& metrics) {
  const double value = monitored_value("EarlyStopping", options_.monitor(), metrics);
  if (improves(value, best_, options_.mode(), options_.min_delta())) {
    best_ = value;
    wait_ = 0;
    return;
  }
  ++wait_;
  if (wait_ >= options_.patience()) {
    trainer.request_stop(fmt::format("early stopping: {} did not improve for {} validations",
                                     options_.monitor().c_str(), ll(wait_)));
  }
}

void EarlyStopping::save(torch::serialize::OutputArchive& archive) const {
  write_optional(archive, "best", best_);
  archive.write("wait", c10::IValue(wait_));
}

void EarlyStopping::load(torch::serialize::InputArchive& archive) {
  best_ = read_optional(archive, "EarlyStopping", "best");
  wait_ = read_value(archive, "EarlyStopping", "wait").toInt();
}

// ---------------------------------------------------------------------------
// LRSchedulerCallback

LRSchedulerCallback::LRSchedulerCallback(std::shared_ptr<LRScheduler> scheduler,
                                         ScheduleInterval interval)
    : scheduler_(std::move(scheduler)), interval_(interval) {
  TORCH_CHECK(scheduler_ != nullptr, "LRSchedulerCallback: scheduler must not be null");
}

LRSchedulerCallback::LRSchedulerCallback(std::shared_ptr<ReduceLROnPlateau> scheduler,
                                         std::string monitor)
    : plateau_(std::move(scheduler)), monitor_(std::move(monitor)) {
  TORCH_CHECK(plateau_ != nullptr, "LRSchedulerCallback: scheduler must not be null");
  TORCH_CHECK(!monitor_.empty(), "LRSchedulerCallback: monitor must name a validation metric");
}

void LRSchedulerCallback::on_step_end(Trainer& trainer) {
  // A step the loss scaler skipped changed no weights; the schedule follows
  // the updates that happened (as accelerate's scheduler wrapper does).
  if (scheduler_ && interval_ == ScheduleInterval::kStep && !trainer.last_step_skipped()) {
    scheduler_->step();
  }
}

void LRSchedulerCallback::on_epoch_end(Trainer& trainer) {
  if (scheduler_ && interval_ == ScheduleInterval::kEpoch) scheduler_->step();
}

void LRSchedulerCallback::on_validation_end(Trainer& trainer, const Metrics& metrics) {
  if (plateau_) plateau_->step(monitored_value("LRSchedulerCallback", monitor_, metrics));
}

void LRSchedulerCallback::save(torch::serialize::OutputArchive& archive) const {
  if (scheduler_) {
    scheduler_->save(archive);
  } else {
    plateau_->save(archive);
  }
}

void LRSchedulerCallback::load(torch::serialize::InputArchive& archive) {
  if (scheduler_) {
    scheduler_->load(archive);
  } else {
    plateau_->load(archive);
  }
}

// ---------------------------------------------------------------------------
// ThroughputMonitor

void ThroughputMonitor::on_fit_start(Trainer& trainer) {
  per_epoch_.clear();
  train_seconds_ = 0.0;
  train_samples_ = 0;
  in_epoch_ = false;
}

void ThroughputMonitor::on_epoch_start(Trainer& trainer) {
  epoch_start_ = last_step_end_ = Clock::now();
  epoch_start_samples_ = last_step_samples_ = trainer.state().samples_seen;
  in_epoch_ = true;
}

void ThroughputMonitor::on_step_end(Trainer& trainer) {
  last_step_end_ = Clock::now();
  last_step_samples_ = trainer.state().samples_seen;
}

void ThroughputMonitor::close_epoch(Trainer& trainer, bool finished) {
  if (!in_epoch_) return;
  in_epoch_ = false;
  const double seconds = std::chrono::duration<double>(last_step_end_ - epoch_start_).count();
  const int64_t samples = last_step_samples_ - epoch_start_samples_;
  train_seconds_ += seconds;
  train_samples_ += samples;
  if (finished) per_epoch_.push_back(seconds > 0 ? samples / seconds : 0.0);
}

void ThroughputMonitor::on_epoch_end(Trainer& trainer) { close_epoch(trainer, /*finished=*/true); }

void ThroughputMonitor::on_fit_end(Trainer& trainer) { close_epoch(trainer, /*finished=*/false); }

double ThroughputMonitor::samples_per_s() const {
  return train_seconds_ > 0 ? train_samples_ / train_seconds_ : 0.0;
}

}  // namespace wick
