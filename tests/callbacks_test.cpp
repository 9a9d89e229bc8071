// The ready callbacks: EarlyStopping, MetricLogger, Checkpointer, ProgressBar,
// LRSchedulerCallback and ThroughputMonitor, driven directly and through real
// Trainer::fit runs on a tiny model.

#include <wick/callbacks.h>
#include <wick/checkpoint.h>
#include <wick/lr_scheduler.h>
#include <wick/trainer.h>

#include "lr_scheduler_baseline.h"
#include "support.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace {

using wick::testing::SeededTest;
using wick::testing::TempDir;
namespace bl = wick::baseline;

constexpr int64_t kSamples = 64;
constexpr int64_t kBatch = 8;  // 8 batches per epoch

/// A linear classifier trained with cross-entropy; its validation reports a
/// scripted "loss" (one value per validation run) so callbacks watching it
/// see a known sequence, plus the real accuracy.
class ScriptedTask : public wick::Task {
 public:
  explicit ScriptedTask(std::vector<double> val_losses = {}, int val_sleep_ms = 0)
      : model_(torch::nn::Linear(4, 3)),
        inner_(model_),
        val_losses_(std::move(val_losses)),
        val_sleep_ms_(val_sleep_ms) {}
  torch::nn::Module& module() override { return *model_; }
  wick::StepOutput training_step(const wick::Batch& batch) override {
    return inner_.training_step(batch);
  }
  std::map<std::string, torch::Tensor> validation_step(const wick::Batch& batch) override {
    if (val_sleep_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(val_sleep_ms_));
    auto metrics = inner_.validation_step(batch);
    if (!val_losses_.empty()) {
      const size_t i = std::min(validations_, val_losses_.size() - 1);
      metrics["loss"] = torch::tensor(val_losses_[i], torch::kFloat64);
    }
    ++validations_;  // one validation batch per validation run
    return metrics;
  }
  torch::nn::Linear model_;
  size_t validations_ = 0;

 private:
  wick::SupervisedTask inner_;
  std::vector<double> val_losses_;
  int val_sleep_ms_;
};

struct Data {
  torch::Tensor x = torch::randn({kSamples, 4});
  torch::Tensor y = torch::randint(0, 3, {kSamples});
  wick::TensorBatchSource train{x, y, wick::TensorBatchSourceOptions(kBatch).shuffle(false)};
  wick::TensorBatchSource val{x, y, wick::TensorBatchSourceOptions(kSamples).shuffle(false)};
};

/// Records every on_log and on_validation_end, and counts state saves
/// (one per Trainer::save_checkpoint).
class Recorder : public wick::Callback {
 public:
  std::string name() const override { return "Recorder"; }
  void on_log(wick::Trainer& t, const wick::Metrics& logs) override { logs_.push_back(logs); }
  void on_validation_end(wick::Trainer& t, const wick::Metrics& m) override { vals_.push_back(m); }
  bool has_state() const override { return true; }
  void save(torch::serialize::OutputArchive& archive) const override {
    ++saves_;
    archive.write("n", c10::IValue(int64_t{0}));
  }
  void load(torch::serialize::InputArchive& archive) override {}
  std::vector<wick::Metrics> logs_, vals_;
  mutable int saves_ = 0;
};

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::string read_all(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string out;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) out.append(buf, n);
  return out;
}

// ---------------------------------------------------------------------------

class EarlyStoppingTest : public SeededTest {};

TEST_F(EarlyStoppingTest, StopsAfterPatienceValidationsWithoutImprovement) {
  wick::Trainer trainer;  // not fitting: request_stop still records the request
  wick::EarlyStopping es(wick::EarlyStoppingOptions("val/loss").patience(3));
  // best: 1.0, 0.8, 0.8 (equal is no improvement), 0.79 (resets), then three misses.
  const std::vector<double> seq = {1.0, 0.8, 0.85, 0.8, 0.79, 0.9, 0.79, 0.8};
  const std::vector<int64_t> waits = {0, 0, 1, 2, 0, 1, 2, 3};
  for (size_t i = 0; i < seq.size(); ++i) {
    ASSERT_FALSE(trainer.stop_requested()) << "stopped before validation " << i;
    es.on_validation_end(trainer, {{"val/loss", seq[i]}, {"val/accuracy", 0.5}});
    EXPECT_EQ(es.wait(), waits[i]) << "validation " << i;
  }
  EXPECT_TRUE(trainer.stop_requested());
  EXPECT_EQ(*es.best(), 0.79);
}

TEST_F(EarlyStoppingTest, MinDeltaAndMaxMode) {
  wick::Trainer trainer;
  wick::EarlyStopping es(wick::EarlyStoppingOptions("val/accuracy")
                             .mode(wick::Mode::kMax)
                             .patience(2)
                             .min_delta(0.05));
  es.on_validation_end(trainer, {{"val/accuracy", 0.50}});  // best 0.50
  es.on_validation_end(trainer, {{"val/accuracy", 0.54}});  // +0.04 < min_delta: wait 1
  EXPECT_EQ(es.wait(), 1);
  es.on_validation_end(trainer, {{"val/accuracy", 0.56}});  // +0.06: best 0.56
  EXPECT_EQ(es.wait(), 0);
  EXPECT_EQ(*es.best(), 0.56);
  es.on_validation_end(trainer, {{"val/accuracy", std::nan("")}});  // NaN never improves
  EXPECT_FALSE(trainer.stop_requested());
  es.on_validation_end(trainer, {{"val/accuracy", 0.60}});
  EXPECT_TRUE(trainer.stop_requested());
}

TEST_F(EarlyStoppingTest, StopsAtTheRightEpochOfARealFit) {
  Data d;
  // Improves through validation 2 (epoch index 1), then 3 misses with patience 3.
  ScriptedTask task({1.0, 0.7, 0.75, 0.71, 0.9, 0.1, 0.1});
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(10));
  auto es =
      std::make_shared<wick::EarlyStopping>(wick::EarlyStoppingOptions("val/loss").patience(3));
  trainer.add_callback(es);
  auto result = trainer.fit(task, opt, d.train, &d.val);
  EXPECT_EQ(result.stop_reason, "early stopping: val/loss did not improve for 3 validations");
  EXPECT_EQ(task.validations_, 5u);
  EXPECT_EQ(result.state.epoch, 5);  // epochs 0..4 ran and completed
  EXPECT_EQ(result.state.step, 5 * kSamples / kBatch);
  EXPECT_EQ(*es->best(), 0.7);
}

TEST_F(EarlyStoppingTest, MissingMetricNamesAvailableKeys) {
  wick::Trainer trainer;
  wick::EarlyStopping es(wick::EarlyStoppingOptions("val/loss"));
  EXPECT_THROWS_WITH(es.on_validation_end(trainer, {{"val/acc", 1.0}, {"val/f1", 0.5}}),
                     "EarlyStopping: monitored metric 'val/loss' is not among the validation "
                     "metrics (available: val/acc, val/f1)");
}

TEST_F(EarlyStoppingTest, RejectsBadOptions) {
  EXPECT_THROWS_WITH(wick::EarlyStopping(wick::EarlyStoppingOptions("val/loss").patience(0)),
                     "EarlyStopping: patience must be >= 1, got 0");
  EXPECT_THROWS_WITH(wick::EarlyStopping(wick::EarlyStoppingOptions("val/loss").min_delta(-0.1)),
                     "EarlyStopping: min_delta must be finite and >= 0, got -0.1");
  EXPECT_THROWS_WITH(wick::EarlyStopping(wick::EarlyStoppingOptions("")), "monitor");
}

TEST_F(EarlyStoppingTest, StateSurvivesSaveAndLoad) {
  wick::Trainer trainer;
  wick::EarlyStopping a(wick::EarlyStoppingOptions("val/loss").patience(3));
  for (double v : {1.0, 0.5, 0.6, 0.7}) a.on_validation_end(trainer, {{"val/loss", v}});
  torch::serialize::OutputArchive out;
  a.save(out);
  std::stringstream bytes;
  out.save_to(bytes);
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  wick::EarlyStopping b(wick::EarlyStoppingOptions("val/loss").patience(3));
  b.load(in);
  EXPECT_EQ(*b.best(), 0.5);
  EXPECT_EQ(b.wait(), 2);
  b.on_validation_end(trainer, {{"val/loss", 0.55}});
  EXPECT_TRUE(trainer.stop_requested());  // the third miss, counting those before the save
}

// ---------------------------------------------------------------------------

class MetricLoggerTest : public SeededTest {};

TEST_F(MetricLoggerTest, WritesParsableJsonlAndCsv) {
  TempDir dir;
  Data d;
  ScriptedTask task;
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(2).log_every_n_steps(4));
  auto logger =
      std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(dir.str() + "/logs"));
  trainer.add_callback(logger);
  auto result = trainer.fit(task, opt, d.train, &d.val);

  // Steps 4, 8 (epoch 0), 12, 16 (epoch 1) log; validation ends epochs 0 and 1.
  struct Want {
    const char* kind;
    int64_t step, epoch;
  };
  const std::vector<Want> want = {{"train", 4, 0},  {"train", 8, 0},  {"val", 8, 0},
                                  {"train", 12, 1}, {"train", 16, 1}, {"val", 16, 1}};
  const auto lines = read_lines(logger->jsonl_path());
  ASSERT_EQ(lines.size(), want.size());
  size_t metric_count = 0;
  double last_time = 0.0;
  std::vector<nlohmann::json> records;
  for (size_t i = 0; i < lines.size(); ++i) {
    auto j = nlohmann::ordered_json::parse(lines[i]);
    ASSERT_TRUE(j.is_object());
    std::vector<std::string> keys;
    for (auto it = j.begin(); it != j.end(); ++it) keys.push_back(it.key());
    ASSERT_GE(keys.size(), 5u);
    EXPECT_EQ((std::vector<std::string>(keys.begin(), keys.begin() + 4)),
              (std::vector<std::string>{"kind", "step", "epoch", "time"}));
    EXPECT_EQ(j["kind"], want[i].kind);
    EXPECT_EQ(j["step"].get<int64_t>(), want[i].step);
    EXPECT_EQ(j["epoch"].get<int64_t>(), want[i].epoch);
    EXPECT_GE(j["time"].get<double>(), last_time);
    last_time = j["time"].get<double>();
    if (j["kind"] == "train") {
      EXPECT_TRUE(j.contains("train/loss"));
      EXPECT_EQ(j["lr"].get<double>(), 0.1);
    } else {
      EXPECT_TRUE(j.contains("val/loss"));
      EXPECT_TRUE(j.contains("val/accuracy"));
    }
    metric_count += keys.size() - 4;
    records.push_back(nlohmann::json::parse(lines[i]));
  }
  EXPECT_EQ(records.back()["val/loss"].get<double>(), result.last_val_metrics.at("val/loss"));

  // CSV: header, then one row per metric of every record, same values.
  const auto rows = read_lines(logger->csv_path());
  ASSERT_EQ(rows.size(), 1 + metric_count);
  EXPECT_EQ(rows[0], "kind,step,epoch,name,value");
  size_t r = 1;
  for (const auto& rec : records) {
    for (auto it = rec.begin(); it != rec.end(); ++it) {
      if (it.key() == "kind" || it.key() == "step" || it.key() == "epoch" || it.key() == "time")
        continue;
      std::stringstream row(rows[r++]);
      std::string kind, step, epoch, name, value;
      std::getline(row, kind, ',');
      std::getline(row, step, ',');
      std::getline(row, epoch, ',');
      std::getline(row, name, ',');
      std::getline(row, value, ',');
      EXPECT_EQ(kind, rec["kind"].get<std::string>());
      EXPECT_EQ(std::stoll(step), rec["step"].get<int64_t>());
      EXPECT_EQ(std::stoll(epoch), rec["epoch"].get<int64_t>());
      EXPECT_EQ(name, it.key());
      EXPECT_EQ(std::stod(value), it.value().get<double>()) << name;
    }
  }
}

TEST_F(MetricLoggerTest, FreshRunTruncatesAndResumeAppends) {
  TempDir dir;
  const std::string logs = dir.str() + "/logs", ckpts = dir.str() + "/ckpt";
  auto run = [&](int64_t epochs, const std::string& resume) {
    Data d;
    ScriptedTask task;
    torch::optim::SGD opt(task.module().parameters(), 0.1);
    wick::Trainer trainer(
        wick::TrainerOptions().max_epochs(epochs).log_every_n_steps(8).checkpoint_dir(ckpts).resume(
            resume));
    trainer.add_callback(std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(logs)));
    trainer.fit(task, opt, d.train, &d.val);
  };
  // One record of each kind per epoch.
  run(1, "");
  EXPECT_EQ(read_lines(logs + "/metrics.jsonl").size(), 2u);
  run(2, "latest");  // resumes after epoch 0, runs epoch 1 only
  const auto lines = read_lines(logs + "/metrics.jsonl");
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(nlohmann::json::parse(lines[2])["step"].get<int64_t>(), 16);
  const auto rows = read_lines(logs + "/metrics.csv");
  EXPECT_EQ(std::count(rows.begin(), rows.end(), "kind,step,epoch,name,value"), 1);
  run(1, "");  // a fresh run starts the files over
  EXPECT_EQ(read_lines(logs + "/metrics.jsonl").size(), 2u);
}

TEST_F(MetricLoggerTest, LoggingBeforeFitStartFails) {
  TempDir dir;
  wick::Trainer trainer;
  wick::MetricLogger logger(wick::MetricLoggerOptions(dir.str()));
  EXPECT_THROWS_WITH(logger.on_log(trainer, {{"train/loss", 1.0}}),
                     "MetricLogger: train metrics before on_fit_start");
}

// ---------------------------------------------------------------------------

class CheckpointerTest : public SeededTest {};

TEST_F(CheckpointerTest, KeepsNewestKPlusBest) {
  TempDir dir;
  Data d;
  ScriptedTask task({0.5, 0.3, 0.4});
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(3));
  auto recorder = std::make_shared<Recorder>();
  auto ckpt = std::make_shared<wick::Checkpointer>(
      wick::CheckpointerOptions(dir.str()).every_n_steps(3).keep_last_k(2).monitor("val/loss"));
  trainer.add_callback(recorder).add_callback(ckpt);
  trainer.fit(task, opt, d.train, &d.val);

  const auto kept = wick::list_checkpoints(dir.str());
  ASSERT_EQ(kept.size(), 2u);
  EXPECT_EQ(kept[0], dir.str() + "/step-00000021");
  EXPECT_EQ(kept[1], dir.str() + "/step-00000024");
  EXPECT_EQ(ckpt->last_path(), dir.str() + "/step-00000024");
  auto best = wick::Checkpoint::load(dir.str() + "/best");
  EXPECT_EQ(best.meta("monitor"), "val/loss");
  EXPECT_EQ(std::stod(*best.meta("value")), 0.3);
  EXPECT_EQ(best.train_state().step, 16);
  EXPECT_EQ(*ckpt->best_value(), 0.3);
  // Saves: steps 3, 6, 8 (epoch), 9, 12, 15, 16 (epoch), 18, 21, 24 (step and
  // epoch and fit end: once), plus "best" after validations 1 and 2.
  EXPECT_EQ(recorder->saves_, 12);
}

TEST_F(CheckpointerTest, MonitorMissingNamesAvailableKeys) {
  wick::Trainer trainer;
  wick::Checkpointer ckpt(wick::CheckpointerOptions("unused").monitor("val/f1"));
  EXPECT_THROWS_WITH(ckpt.on_validation_end(trainer, {{"val/loss", 1.0}}),
                     "Checkpointer: monitored metric 'val/f1' is not among the validation metrics "
                     "(available: val/loss)");
  EXPECT_THROWS_WITH(wick::Checkpointer(wick::CheckpointerOptions("d").every_n_steps(-1)),
                     "Checkpointer: every_n_steps must be >= 0 (0 = off), got -1");
}

TEST_F(CheckpointerTest, ResumeDoesNotRewriteTheCheckpointItStartedFrom) {
  TempDir dir;
  auto run = [&](int64_t epochs, const std::string& resume) {
    Data d;
    ScriptedTask task;
    torch::optim::SGD opt(task.module().parameters(), 0.1);
    wick::Trainer trainer(
        wick::TrainerOptions().max_epochs(epochs).checkpoint_dir(dir.str()).resume(resume));
    auto recorder = std::make_shared<Recorder>();
    trainer.add_callback(recorder);
    auto result = trainer.fit(task, opt, d.train, &d.val);
    return std::make_pair(result.state.step, recorder->saves_);
  };
  EXPECT_EQ(run(1, ""), std::make_pair(int64_t{8}, 1));
  // Already at max_epochs: nothing to train and nothing new to save.
  EXPECT_EQ(run(1, "latest"), std::make_pair(int64_t{8}, 0));
  EXPECT_EQ(run(2, "latest"), std::make_pair(int64_t{16}, 1));
}

// ---------------------------------------------------------------------------

class ProgressBarTest : public SeededTest {};

// What a ProgressBar printing every 3 steps to a file (not a terminal)
// writes over a fit of ScriptedTask with `options` (logging every step).
std::string piped_fit(wick::TrainerOptions options) {
  Data d;
  ScriptedTask task;
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  std::FILE* out = std::tmpfile();
  EXPECT_NE(out, nullptr);
  if (out == nullptr) return "";
  wick::Trainer trainer(options.log_every_n_steps(1));
  trainer.add_callback(std::make_shared<wick::ProgressBar>(
      wick::ProgressBarOptions().print_every_n_steps(3).stream(out)));
  trainer.fit(task, opt, d.train, &d.val);
  std::string text = read_all(out);
  std::fclose(out);
  return text;
}

TEST_F(ProgressBarTest, PipedOutputPrintsOneLinePerNSteps) {
  const std::string text = piped_fit(wick::TrainerOptions().max_epochs(2));
  // Steps 3, 6 | 9, 12, 15 print; 2 validation lines; 2 epoch summaries.
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 9) << text;
  EXPECT_EQ(text.find('\r'), std::string::npos);
  EXPECT_EQ(text.rfind("epoch 1/2 step 3/8  loss ", 0), 0u) << text;
  EXPECT_NE(text.find("epoch 2/2 step 7/8  loss "), std::string::npos) << text;  // step 15
  EXPECT_NE(text.find("epoch 1/2 validation:  val/accuracy "), std::string::npos) << text;
  EXPECT_NE(text.find("epoch 2/2 done: 8 steps in "), std::string::npos) << text;
}

TEST_F(ProgressBarTest, TrainingByStepsShowsStepOfMaxSteps) {
  const std::string text = piped_fit(wick::TrainerOptions().max_epochs(-1).max_steps(11));
  // Steps 3, 6; epoch 0's validation and summary; step 9; the validation at fit's end.
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 6) << text;
  EXPECT_EQ(text.rfind("step 3/11 (epoch 1)  loss ", 0), 0u) << text;
  EXPECT_NE(text.find("step 8/11 validation:  val/accuracy "), std::string::npos) << text;
  EXPECT_NE(text.find("epoch 1 done: 8 steps in "), std::string::npos) << text;
  EXPECT_NE(text.find("step 9/11 (epoch 2)  loss "), std::string::npos) << text;
  EXPECT_NE(text.find("step 11/11 validation:  val/accuracy "), std::string::npos) << text;
  EXPECT_EQ(text.find("epoch 1/"), std::string::npos) << text;  // no epoch limit to show
}

TEST_F(ProgressBarTest, TerminalOutputRedrawsOneLine) {
  const int master = ::posix_openpt(O_RDWR | O_NOCTTY);
  if (master < 0 || ::grantpt(master) != 0 || ::unlockpt(master) != 0)
    GTEST_SKIP() << "no pseudo-terminal";
  std::FILE* tty = std::fopen(::ptsname(master), "w");
  ASSERT_NE(tty, nullptr);
  ASSERT_EQ(::isatty(::fileno(tty)), 1);
  Data d;
  ScriptedTask task;
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(1).log_every_n_steps(1));
  trainer.add_callback(
      std::make_shared<wick::ProgressBar>(wick::ProgressBarOptions().width(8).stream(tty)));
  trainer.fit(task, opt, d.train, &d.val);
  std::fclose(tty);
  ::fcntl(master, F_SETFL, O_NONBLOCK);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(master, buf, sizeof buf)) > 0;)
    text.append(buf, static_cast<size_t>(n));
  ::close(master);
  // The bar is drawn with '\r' and ends full at the epoch's last step.
  EXPECT_NE(text.find("\repoch 1/1 ["), std::string::npos) << text;
  EXPECT_NE(text.find("[========] step 8/8  loss "), std::string::npos) << text;
  EXPECT_NE(text.find("ETA 00:00"), std::string::npos) << text;
  EXPECT_NE(text.find("epoch 1/1 validation:"), std::string::npos) << text;
}

TEST_F(ProgressBarTest, MissingMetricsDoNotThrow) {
  std::FILE* out = std::tmpfile();
  ASSERT_NE(out, nullptr);
  wick::Trainer trainer;  // not fitting: no logs, unknown epoch length
  wick::ProgressBar bar(wick::ProgressBarOptions().print_every_n_steps(1).stream(out));
  bar.on_fit_start(trainer);
  bar.on_epoch_start(trainer);
  bar.on_log(trainer, {});
  bar.on_validation_end(trainer, {});
  bar.on_epoch_end(trainer);
  bar.on_fit_end(trainer);
  const std::string text = read_all(out);
  std::fclose(out);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 2) << text;
  EXPECT_THROWS_WITH(wick::ProgressBar(wick::ProgressBarOptions().print_every_n_steps(0)),
                     "ProgressBar: print_every_n_steps must be >= 1, got 0");
}

// ---------------------------------------------------------------------------

class LRSchedulerCallbackTest : public SeededTest {};

// Python's lrs (group 0, base 0.1) for CosineWarmupLR(warmup 5, total 20, min 0.1, start 0.01).
const std::vector<std::vector<double>>& kCosine = bl::kCosineWarmup5Total20;

auto make_cosine(torch::optim::Optimizer& opt) {
  return std::make_shared<wick::CosineWarmupLR>(
      opt, bl::kCosineWarmup5Total20Warmup, bl::kCosineWarmup5Total20Total,
      bl::kCosineWarmup5Total20MinRatio, bl::kCosineWarmup5Total20Start);
}

TEST_F(LRSchedulerCallbackTest, CosineWarmupFollowsPythonThroughARealFit) {
  Data d;
  ScriptedTask task;
  torch::optim::SGD opt(task.module().parameters(), bl::kBaseLrs[0]);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(2).log_every_n_steps(1));
  auto recorder = std::make_shared<Recorder>();
  trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(make_cosine(opt)))
      .add_callback(recorder);
  auto result = trainer.fit(task, opt, d.train, nullptr);
  ASSERT_EQ(result.state.step, 16);
  // The lr logged at step s is the one that step used: the schedule after s - 1 steps.
  ASSERT_EQ(recorder->logs_.size(), 16u);
  for (size_t s = 1; s <= 16; ++s) {
    EXPECT_NEAR(recorder->logs_[s - 1].at("lr"), kCosine[s - 1][0], 1e-12 * kCosine[s - 1][0]) << s;
  }
  EXPECT_NEAR(wick::get_lrs(opt)[0], kCosine[16][0], 1e-12 * kCosine[16][0]);
}

TEST_F(LRSchedulerCallbackTest, ResumedFitContinuesTheSchedule) {
  TempDir dir;
  auto run = [&](int64_t epochs, const std::string& resume) {
    Data d;
    ScriptedTask task;
    torch::optim::SGD opt(task.module().parameters(), bl::kBaseLrs[0]);
    wick::Trainer trainer(wick::TrainerOptions()
                              .max_epochs(epochs)
                              .log_every_n_steps(1)
                              .checkpoint_dir(dir.str())
                              .resume(resume));
    auto recorder = std::make_shared<Recorder>();
    trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(make_cosine(opt)))
        .add_callback(recorder);
    trainer.fit(task, opt, d.train, nullptr);
    return std::make_pair(recorder->logs_, wick::get_lrs(opt)[0]);
  };
  run(1, "");
  auto [logs, lr] = run(2, "latest");  // steps 9..16 with a freshly built scheduler
  ASSERT_EQ(logs.size(), 8u);
  for (size_t i = 0; i < logs.size(); ++i) {
    const size_t s = 9 + i;
    EXPECT_NEAR(logs[i].at("lr"), kCosine[s - 1][0], 1e-12 * kCosine[s - 1][0]) << s;
  }
  EXPECT_NEAR(lr, kCosine[16][0], 1e-12 * kCosine[16][0]);
}

TEST_F(LRSchedulerCallbackTest, StepsPerEpoch) {
  Data d;
  ScriptedTask task;
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(3));
  trainer.add_callback(std::make_shared<wick::LRSchedulerCallback>(
      std::make_shared<wick::StepLR>(opt, /*step_size=*/1, /*gamma=*/0.5),
      wick::ScheduleInterval::kEpoch));
  trainer.fit(task, opt, d.train, nullptr);
  EXPECT_DOUBLE_EQ(wick::get_lrs(opt)[0], 0.1 * 0.125);
}

/// Makes the loss (and so every gradient) infinite on one micro-batch.
class InfOnceTask : public ScriptedTask {
 public:
  explicit InfOnceTask(int64_t bad_batch) : bad_batch_(bad_batch) {}
  wick::StepOutput training_step(const wick::Batch& batch) override {
    auto loss = ScriptedTask::training_step(batch).loss;
    return calls_++ == bad_batch_ ? loss * std::numeric_limits<float>::infinity() : loss;
  }

 private:
  int64_t bad_batch_, calls_ = 0;
};

TEST_F(LRSchedulerCallbackTest, StepsTheScalerSkippedDoNotAdvanceTheSchedule) {
  Data d;
  InfOnceTask task(/*bad_batch=*/3);
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(1).precision(wick::Precision::kFP16));
  struct SkipCounter : wick::Callback {
    std::string name() const override { return "SkipCounter"; }
    void on_step_end(wick::Trainer& t) override { skipped += t.last_step_skipped(); }
    int skipped = 0;
  };
  auto counter = std::make_shared<SkipCounter>();
  trainer.add_callback(counter).add_callback(std::make_shared<wick::LRSchedulerCallback>(
      std::make_shared<wick::StepLR>(opt, /*step_size=*/1, /*gamma=*/0.5)));
  auto result = trainer.fit(task, opt, d.train, nullptr);
  ASSERT_EQ(result.state.step, 8);
  ASSERT_EQ(counter->skipped, 1);
  EXPECT_DOUBLE_EQ(wick::get_lrs(opt)[0], 0.1 * std::pow(0.5, 7));  // 7 updates, not 8
}

TEST_F(LRSchedulerCallbackTest, PlateauStepsOnValidationLikePython) {
  // Python's ReduceLROnPlateau(mode=min, factor=0.5, patience=2, threshold=1e-3,
  // cooldown=1, min_lr=0.004) on the baseline's metric sequence.
  auto p1 = torch::zeros({2}, torch::requires_grad());
  auto p2 = torch::zeros({3}, torch::requires_grad());
  torch::optim::SGD opt(
      std::vector<torch::optim::OptimizerParamGroup>{
          torch::optim::OptimizerParamGroup(
              {p1}, std::make_unique<torch::optim::SGDOptions>(bl::kBaseLrs[0])),
          torch::optim::OptimizerParamGroup(
              {p2}, std::make_unique<torch::optim::SGDOptions>(bl::kBaseLrs[1]))},
      torch::optim::SGDOptions(bl::kBaseLrs[0]));
  auto plateau = std::make_shared<wick::ReduceLROnPlateau>(
      opt, wick::ReduceLROnPlateauOptions()
               .factor(bl::kPlateauMinPatience2Cooldown1Factor)
               .patience(bl::kPlateauMinPatience2Cooldown1Patience)
               .threshold(bl::kPlateauMinPatience2Cooldown1Threshold)
               .cooldown(bl::kPlateauMinPatience2Cooldown1Cooldown)
               .min_lr(bl::kPlateauMinPatience2Cooldown1MinLr)
               .eps(bl::kPlateauMinPatience2Cooldown1Eps));
  wick::LRSchedulerCallback cb(plateau, "val/loss");
  wick::Trainer trainer;
  const auto& metrics = bl::kPlateauMinPatience2Cooldown1Metrics;
  const auto& table = bl::kPlateauMinPatience2Cooldown1;
  for (size_t i = 0; i < metrics.size(); ++i) {
    cb.on_step_end(trainer);  // a plateau schedule ignores steps
    cb.on_validation_end(trainer, {{"val/loss", metrics[i]}, {"val/accuracy", 0.0}});
    const auto lrs = wick::get_lrs(opt);
    EXPECT_NEAR(lrs[0], table[i + 1][0], 1e-12 * table[i + 1][0]) << i;
    EXPECT_NEAR(lrs[1], table[i + 1][1], 1e-12 * table[i + 1][1]) << i;
  }
  EXPECT_THROWS_WITH(
      cb.on_validation_end(trainer, {{"val/acc", 1.0}}),
      "LRSchedulerCallback: monitored metric 'val/loss' is not among the validation metrics");
}

// ---------------------------------------------------------------------------

class ThroughputMonitorTest : public SeededTest {};

/// Sleeps at the end of every epoch, like a slow epoch checkpoint.
class SlowEpochEnd : public wick::Callback {
 public:
  std::string name() const override { return "SlowEpochEnd"; }
  void on_epoch_end(wick::Trainer& trainer) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
};

TEST_F(ThroughputMonitorTest, ExcludesValidationAndEpochEndWork) {
  Data d;
  ScriptedTask task({}, /*val_sleep_ms=*/60);
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(2));
  auto monitor = std::make_shared<wick::ThroughputMonitor>();
  trainer.add_callback(std::make_shared<SlowEpochEnd>()).add_callback(monitor);
  const auto start = std::chrono::steady_clock::now();
  auto result = trainer.fit(task, opt, d.train, &d.val);
  const double fit_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_EQ(monitor->epoch_samples_per_s().size(), 2u);
  for (double v : monitor->epoch_samples_per_s()) EXPECT_GT(v, 0.0);
  EXPECT_GT(monitor->train_seconds(), 0.0);
  // Two validations sleep 60 ms and two epoch ends 50 ms: none of it is training.
  EXPECT_LT(monitor->train_seconds(), fit_seconds - 0.22);
  EXPECT_NEAR(monitor->samples_per_s() * monitor->train_seconds(), 2.0 * kSamples, 1e-6);
  EXPECT_EQ(result.state.samples_seen, 2 * kSamples);
}

TEST_F(ThroughputMonitorTest, CountsAnEpochCutShort) {
  Data d;
  ScriptedTask task;
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(2).max_steps(5));
  auto monitor = std::make_shared<wick::ThroughputMonitor>();
  trainer.add_callback(monitor);
  trainer.fit(task, opt, d.train, nullptr);
  EXPECT_TRUE(monitor->epoch_samples_per_s().empty());
  EXPECT_NEAR(monitor->samples_per_s() * monitor->train_seconds(), 5.0 * kBatch, 1e-6);
}

// ---------------------------------------------------------------------------
// The examples of docs/callbacks.md.

namespace docs {

// docs/callbacks.md, "Writing a callback".
class StopWhenLossBelow : public wick::Callback {
 public:
  explicit StopWhenLossBelow(double target) : target_(target) {}
  std::string name() const override { return "StopWhenLossBelow"; }
  void on_log(wick::Trainer& trainer, const wick::Metrics& logs) override {
    auto it = logs.find("train/loss");
    if (it != logs.end() && it->second < target_) {
      trainer.request_stop("train/loss below " + std::to_string(target_));
    }
  }

 private:
  double target_;
};

}  // namespace docs

class DocsExampleTest : public SeededTest {};

TEST_F(DocsExampleTest, TrainsWithEveryCallback) {
  TempDir tmp;
  const std::string run_dir = tmp.str();
  auto x = torch::randn({64, 4});
  auto y = (x.select(1, 0) > 0).to(torch::kLong) + (x.select(1, 1) > 0).to(torch::kLong);
  // ---- docs/callbacks.md example begins
  torch::nn::Linear model(4, 3);
  wick::SupervisedTask task(model);
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(0.05));
  wick::TensorBatchSource train(x, y, wick::TensorBatchSourceOptions(8).seed(1));
  wick::TensorBatchSource val(x, y, wick::TensorBatchSourceOptions(64).shuffle(false));

  const int64_t epochs = 5;
  const int64_t total_steps = epochs * train.size().value();
  auto throughput = std::make_shared<wick::ThroughputMonitor>();
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(epochs).log_every_n_steps(4));
  trainer
      .add_callback(
          std::make_shared<wick::ProgressBar>(wick::ProgressBarOptions().print_every_n_steps(10)))
      .add_callback(
          std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(run_dir + "/logs")))
      .add_callback(std::make_shared<wick::Checkpointer>(
          wick::CheckpointerOptions(run_dir + "/checkpoints").keep_last_k(2).monitor("val/loss")))
      .add_callback(std::make_shared<wick::EarlyStopping>(
          wick::EarlyStoppingOptions("val/loss").patience(2).min_delta(1e-4)))
      .add_callback(
          std::make_shared<wick::LRSchedulerCallback>(std::make_shared<wick::CosineWarmupLR>(
              optimizer, /*warmup_steps=*/total_steps / 10, total_steps)))
      .add_callback(throughput);
  auto result = trainer.fit(task, optimizer, train, &val);
  std::printf("%s after %lld steps: val/loss %.4f, %.0f samples/s\n", result.stop_reason.c_str(),
              static_cast<long long>(result.state.step), result.last_val_metrics.at("val/loss"),
              throughput->samples_per_s());
  // ---- example ends
  EXPECT_EQ(result.stop_reason, "max_epochs");
  EXPECT_EQ(result.state.step, total_steps);
  EXPECT_LT(result.last_val_metrics.at("val/loss"), 1.0);
  EXPECT_EQ(wick::list_checkpoints(run_dir + "/checkpoints").size(), 2u);
  EXPECT_EQ(::access((run_dir + "/checkpoints/best/meta.json").c_str(), F_OK), 0);
  EXPECT_EQ(read_lines(run_dir + "/logs/metrics.jsonl").size(), 10u + 5u);
  EXPECT_EQ(throughput->epoch_samples_per_s().size(), 5u);
  EXPECT_NEAR(wick::get_lrs(optimizer)[0], 0.0, 1e-15);  // the cosine reached its end
}

TEST_F(DocsExampleTest, CustomCallbackStopsTheFit) {
  Data d;
  ScriptedTask task;
  torch::optim::SGD opt(task.module().parameters(), 0.1);
  wick::Trainer trainer(wick::TrainerOptions().max_epochs(3).log_every_n_steps(2));
  trainer.add_callback(std::make_shared<docs::StopWhenLossBelow>(100.0));
  auto result = trainer.fit(task, opt, d.train, nullptr);
  EXPECT_EQ(result.stop_reason, "train/loss below 100.000000");
  EXPECT_EQ(result.state.step, 2);  // the first log
}

}  // namespace
