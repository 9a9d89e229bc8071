// wick's TensorBoard event files, read back by the `tensorboard` package's
// EventAccumulator (tests/py/interop.py) and compared with metrics.jsonl.

#include "python_reference.h"
#include "support.h"

#include <wick/callbacks.h>
#include <wick/data.h>
#include <wick/tensorboard.h>
#include <wick/trainer.h>

#include <cmath>
#include <fstream>
#include <string>

namespace {

using wick::testing::TempDir;
using Json = nlohmann::json;

// A scalar as interop.py writes it: a number, or "nan", "inf", "-inf".
double value_of(const Json& v) {
  return v.is_string() ? std::stod(v.get<std::string>()) : v.get<double>();
}

Json read_back(const std::string& dir) {
  return wick::testing::python_reference("interop.py", "tensorboard_read", {{"dir", dir}});
}

TEST(Crc32cTest, MatchesTheStandardsCheckValues) {
  // The check value of CRC-32C (iSCSI, RFC 3720) and its 32-zero-byte vector.
  EXPECT_EQ(wick::crc32c("123456789", 9), 0xE3069283u);
  const std::string zeros(32, '\0');
  EXPECT_EQ(wick::crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  EXPECT_EQ(wick::crc32c("", 0), 0u);
}

class TensorBoardTest : public wick::testing::SeededTest {};

TEST_F(TensorBoardTest, EveryLoggedMetricReadsBackAsTheSameScalarAtTheSameStep) {
  TempDir dir;
  const std::string tb_dir = dir.str() + "/tb";
  torch::nn::Sequential model(torch::nn::Linear(6, 16), torch::nn::ReLU(),
                              torch::nn::Linear(16, 3));
  wick::SupervisedTask task(model);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  const torch::Tensor x = torch::randn({96, 6});
  const torch::Tensor y = torch::randint(0, 3, {96});
  wick::TensorBatchSource train(x, y, wick::TensorBatchSourceOptions(8).shuffle(true).seed(3));
  wick::TensorBatchSource val(x.narrow(0, 0, 32), y.narrow(0, 0, 32),
                              wick::TensorBatchSourceOptions(16));
  wick::Trainer trainer(
      wick::TrainerOptions().max_epochs(2).log_every_n_steps(3).seed(5).grad_accum_steps(2));
  auto tb =
      std::make_shared<wick::TensorBoardLogger>(wick::TensorBoardLoggerOptions(tb_dir).hparams(
          {{"lr", 0.1}, {"model", "mlp|6-16-3"}, {"layers", 2LL}, {"width", 16u}}));
  trainer.add_callback(std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(dir.str())));
  trainer.add_callback(tb);
  trainer.fit(task, optimizer, train, &val);

  const Json back = read_back(tb_dir);
  EXPECT_EQ(back["file_version"].get<double>(), 2.0) << "the first event's \"brain.Event:2\"";

  // Every value of metrics.jsonl, as float32 (TensorBoard's scalar type).
  std::ifstream jsonl(dir.str() + "/metrics.jsonl");
  std::string line;
  size_t compared = 0;
  std::map<std::string, size_t> seen;  // per tag, how many of its scalars were matched
  while (std::getline(jsonl, line)) {
    const Json record = Json::parse(line);
    for (const auto& [name, value] : record.items()) {
      if (name == "kind" || name == "step" || name == "epoch" || name == "time") continue;
      ASSERT_TRUE(back["scalars"].contains(name)) << name << " is missing from TensorBoard";
      const auto& events = back["scalars"][name];
      const size_t i = seen[name]++;
      ASSERT_LT(i, events.size()) << name;
      EXPECT_EQ(events[i][0].get<int64_t>(), record["step"].get<int64_t>()) << name;
      if (value.is_null()) {  // NaN or inf in metrics.jsonl
        EXPECT_FALSE(std::isfinite(value_of(events[i][1]))) << name;
      } else {
        EXPECT_EQ(value_of(events[i][1]), static_cast<double>(value.get<float>())) << name;
      }
      ++compared;
    }
  }
  EXPECT_GT(compared, 20u);
  EXPECT_TRUE(seen.count("train/loss") && seen.count("val/loss") && seen.count("lr"));
  // Nothing in TensorBoard that metrics.jsonl lacks.
  for (const auto& [tag, events] : back["scalars"].items())
    EXPECT_EQ(events.size(), seen[tag]) << tag << " has scalars metrics.jsonl lacks";

  // The run's options: hparams with their kinds, the user's beside the Trainer's.
  const Json& h = back["hparams"];
  EXPECT_EQ(h["lr"]["kind"], "number_value");
  EXPECT_EQ(h["lr"]["value"].get<double>(), 0.1);
  EXPECT_EQ(h["model"]["value"], "mlp|6-16-3");
  EXPECT_EQ(h["layers"]["kind"], "number_value");
  EXPECT_EQ(h["layers"]["value"].get<double>(), 2);
  EXPECT_EQ(h["width"]["value"].get<double>(), 16);
  EXPECT_EQ(h["max_epochs"]["value"].get<double>(), 2);
  EXPECT_EQ(h["grad_accum_steps"]["value"].get<double>(), 2);
  EXPECT_EQ(h["precision"]["value"], "fp32");
  EXPECT_EQ(h["deterministic"]["kind"], "bool_value");
  EXPECT_EQ(h["deterministic"]["value"], false);
  EXPECT_EQ(back["end_status"], 1) << "STATUS_SUCCESS";
  // And as a markdown table in the TEXT tab (the '|' escaped).
  const std::string text = back["texts"]["run/options"][0][1];
  EXPECT_NE(text.find("| lr | 0.1 |"), std::string::npos) << text;
  EXPECT_NE(text.find("| model | mlp\\|6-16-3 |"), std::string::npos) << text;
  EXPECT_NE(text.find("| seed | 5 |"), std::string::npos) << text;
  EXPECT_EQ(tb->path().rfind(tb_dir + "/events.out.tfevents.", 0), 0u) << tb->path();
}

TEST_F(TensorBoardTest, ARestartDropsWhatTheInterruptedRunLoggedPastItsCheckpoint) {
  TempDir dir;
  {
    wick::EventFileWriter first(dir.str());
    for (int step = 1; step <= 10; ++step) first.add_scalar("loss", 1.0 / step, step);
  }
  // Resumed from the checkpoint at step 5: steps 6.. are logged again.
  wick::EventFileWriter second(dir.str());
  second.restart_at(6);
  for (int step = 6; step <= 8; ++step) second.add_scalar("loss", 100.0 + step, step);

  const Json loss = read_back(dir.str())["scalars"]["loss"];
  ASSERT_EQ(loss.size(), 8u) << loss.dump();
  for (int step = 1; step <= 8; ++step) {
    EXPECT_EQ(loss[step - 1][0].get<int64_t>(), step);
    const float expected = step <= 5 ? static_cast<float>(1.0 / step) : 100.0f + step;
    EXPECT_EQ(value_of(loss[step - 1][1]), static_cast<double>(expected)) << step;
  }
}

TEST_F(TensorBoardTest, ScalarsKeepTheirWallTimeAndNonFiniteValues) {
  TempDir dir;
  {
    wick::EventFileWriter w(dir.str());
    w.add_scalar("a", std::nan(""), 1, 1700000000.25);
    w.add_scalar("a", INFINITY, 2, 1700000001.5);
    w.add_scalar("a", -3.5, 3, 1700000002.75);
    w.add_text("notes", "**bold** and `code`", 3);
  }
  const Json back = read_back(dir.str());
  const Json& a = back["scalars"]["a"];
  ASSERT_EQ(a.size(), 3u);
  EXPECT_TRUE(std::isnan(value_of(a[0][1])));
  EXPECT_EQ(value_of(a[1][1]), INFINITY);
  EXPECT_EQ(a[0][2].get<double>(), 1700000000.25);
  EXPECT_EQ(a[2][1].get<double>(), -3.5);
  EXPECT_EQ(a[2][2].get<double>(), 1700000002.75);
  EXPECT_EQ(back["texts"]["notes"][0][1], "**bold** and `code`");
}

TEST_F(TensorBoardTest, NamesADirectoryItCannotWriteTo) {
  TempDir dir;
  const std::string file = dir.str() + "/plain-file";
  std::ofstream(file) << "x";
  EXPECT_THROWS_WITH(wick::EventFileWriter(file + "/tb"), "EventFileWriter");
  EXPECT_THROWS_WITH(wick::TensorBoardLogger(wick::TensorBoardLoggerOptions("")),
                     "TensorBoardLogger: log_dir must not be empty");
}

}  // namespace
