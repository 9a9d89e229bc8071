// Fault injection for data-parallel training (issue 9), with real processes
// over Gloo on 127.0.0.1 (tests/multiprocess.h re-executes this binary once
// per rank): a world of 3 ranks training with the Trainer, rank 0
// checkpointing every 2 steps, loses rank 1 in the middle of step 5, while
// its backward runs and after its first gradient bucket's allreduce started.
//
// - SIGKILL: the dead rank's sockets close; the survivors' allreduce fails at
//   once with an error naming the collective and the rank, well within the
//   group's timeout (3 s here), and nobody hangs.
// - SIGSTOP (a rank that hangs: alive, sockets open, silent): the survivors'
//   allreduce times out after the configured 3 s with an error that says so;
//   then rank 0, as a supervisor would, SIGKILLs the frozen rank.
// After either, all ranks are relaunched with resume="latest" (the step-4
// checkpoint) and end with parameters bit-identical to an uninterrupted run
// of the same 8 steps on the same 3 ranks.

#include <wick/wick.h>

#include "multiprocess.h"
#include "support.h"

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <signal.h>
#include <unistd.h>

namespace {

using wick::testing::child_dir;
using wick::testing::child_rank;
using wick::testing::is_rank_child;
using wick::testing::read_text;
using wick::testing::run_rank_processes;
using wick::testing::TempDir;

constexpr int kWorld = 3;
constexpr int64_t kSteps = 8;
constexpr int64_t kKillStep = 5;  // the step (1-based) in whose backward rank 1 is lost
constexpr int kVictim = 1;
constexpr auto kTimeout = std::chrono::seconds(3);

struct Data {
  torch::Tensor x, y;
};

Data make_data() {
  auto gen = at::detail::createCPUGenerator(77);
  return {torch::randn({96, 6}, gen), torch::randint(0, 4, {96}, gen)};
}

torch::nn::Sequential make_model() {
  torch::manual_seed(3);
  return torch::nn::Sequential(torch::nn::Linear(6, 16), torch::nn::Tanh(), torch::nn::Dropout(0.2),
                               torch::nn::Linear(16, 4));
}

/// Rank 1 in the fault phase: at the start of step kKillStep, a gradient hook
/// on the first layer's weight (the last gradient backward produces, so the
/// later layer's bucket is already being reduced) sends `sig` to its own
/// process. Every rank records when that step started.
struct FaultHook : wick::Callback {
  int sig = 0;
  torch::Tensor first_weight;
  std::chrono::steady_clock::time_point kill_step_start{};
  std::string name() const override { return "FaultHook"; }
  void on_batch_start(wick::Trainer& t) override {
    if (t.state().step + 1 != kKillStep) return;
    kill_step_start = std::chrono::steady_clock::now();
    if (sig == 0) return;
    std::ofstream(child_dir() + "/pid" + std::to_string(t.rank())) << ::getpid();
    const int s = sig;
    first_weight.register_hook([s](torch::Tensor g) {
      ::kill(::getpid(), s);
      return g;
    });
  }
};

std::string hash_file(const std::string& dir, const std::string& run, int rank) {
  return dir + "/" + run + "-hash" + std::to_string(rank);
}

/// Trains 8 steps on this rank's shard (Adam, dropout, shuffling: optimizer
/// state, RNG and data position all have to come back on resume) with rank 0
/// checkpointing into `ckpt_dir` every 2 steps; resumes from its newest
/// checkpoint when there is one. Writes the final parameters' SHA-256 to
/// <child_dir>/<run>-hash<rank>.
void train(const std::shared_ptr<wick::ProcessGroup>& pg, const std::string& ckpt_dir,
           const std::string& run, const std::shared_ptr<FaultHook>& hook = nullptr) {
  static const Data data = make_data();
  auto model = make_model();
  wick::SupervisedTask task(model);
  torch::optim::Adam opt(model->parameters(), 1e-2);
  wick::TensorBatchSource source(data.x, data.y,
                                 wick::TensorBatchSourceOptions(4)
                                     .shuffle(true)
                                     .seed(11)
                                     .rank(pg->rank())
                                     .world_size(pg->world_size()));
  auto options = wick::TrainerOptions()
                     .max_epochs(1000)
                     .max_steps(kSteps)
                     .seed(21)
                     .log_every_n_steps(1000000)
                     .log_system_metrics(false)
                     .process_group(pg)
                     // One bucket per layer: the kill lands with one allreduce in flight.
                     .ddp(wick::DistributedDataParallelOptions().bucket_cap_mb(100.0 / (1 << 20)))
                     .checkpoint_dir(ckpt_dir)
                     .checkpoint_every_n_steps(2)
                     .keep_last_k(2);
  if (wick::latest_checkpoint(ckpt_dir).has_value()) options.resume("latest");
  wick::Trainer trainer(options);
  if (hook) {
    hook->first_weight = model[0]->as<torch::nn::Linear>()->weight;
    trainer.add_callback(hook);
  }
  auto result = trainer.fit(task, opt, source);
  ASSERT_EQ(result.state.step, kSteps);
  std::ofstream(hash_file(child_dir(), run, pg->rank())) << wick::parameters_sha256(*model);
}

std::shared_ptr<wick::ProcessGroup> group(std::chrono::milliseconds timeout) {
  torch::set_num_threads(1);
  return wick::init_process_group(wick::ProcessGroupOptions().timeout(timeout));
}

/// The child's part in phase $WICK_FAULT_PHASE: "fault" (train; rank 1 gets
/// `sig` mid-step; the survivors check their error and its timing) or
/// "resume" (resume the interrupted run, then run an uninterrupted one).
void child_body(int sig, const std::string& expected_error) {
  const std::string phase = std::getenv("WICK_FAULT_PHASE");
  const std::string ckpt = child_dir() + "/checkpoints";
  if (phase == "resume") {
    auto pg = group(std::chrono::seconds(60));
    train(pg, ckpt, "resumed");
    pg->barrier();
    train(pg, child_dir() + "/straight", "straight");
    return;
  }
  auto pg = group(kTimeout);
  auto hook = std::make_shared<FaultHook>();
  if (pg->rank() == kVictim) hook->sig = sig;
  std::string error;
  try {
    train(pg, ckpt, "fault", hook);
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - hook->kill_step_start)
          .count();
  ASSERT_NE(pg->rank(), kVictim) << "the victim survived its signal";
  ASSERT_FALSE(error.empty()) << "rank " << pg->rank() << " finished training without its peer";
  // The collective, what happened to it, and this rank.
  EXPECT_NE(error.find("ProcessGroup: allreduce " + expected_error + " on rank " +
                       std::to_string(pg->rank())),
            std::string::npos)
      << error;
  if (sig == SIGSTOP) EXPECT_NE(error.find(" after 3000 ms"), std::string::npos) << error;
  std::ofstream(child_dir() + "/error" + std::to_string(pg->rank())) << seconds << "\n" << error;
  if (sig == SIGSTOP && pg->rank() == 0) {
    // The supervisor's part: the frozen rank is killed.
    const int victim = std::atoi(read_text(child_dir() + "/pid" + std::to_string(kVictim)).c_str());
    ASSERT_GT(victim, 0);
    ::kill(victim, SIGKILL);
  }
}

/// The parent: the fault phase (rank 1 ends killed by SIGKILL, the survivors
/// exit 0 after their checks; each failed between min_s and max_s into step
/// 5), then the resume phase; prints the figures.
void parent_body(const std::string& label, double min_s, double max_s) {
  TempDir dir;
  const auto t0 = std::chrono::steady_clock::now();
  ::setenv("WICK_FAULT_PHASE", "fault", 1);
  const auto status = run_rank_processes({0, 1, 2}, kWorld, dir.str(), 60);
  const double fault_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::string logs;
  for (int r = 0; r < kWorld; ++r)
    logs += "rank " + std::to_string(r) + ":\n" +
            read_text(dir.str() + "/rank" + std::to_string(r) + ".log");
  ASSERT_EQ(status, (std::vector<int>{0, 128 + SIGKILL, 0})) << logs;

  // The newest complete checkpoint is step 4's (2 and 4 written, 6 never reached).
  const auto latest = wick::latest_checkpoint(dir.str() + "/checkpoints");
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(wick::Checkpoint::load(*latest).train_state().step, kKillStep - 1);

  std::string figures;
  for (int r : {0, 2}) {
    const std::string text = read_text(dir.str() + "/error" + std::to_string(r));
    const double seconds = std::atof(text.c_str());
    EXPECT_GE(seconds, min_s) << "rank " << r << ": " << text;
    EXPECT_LT(seconds, max_s) << "rank " << r << ": " << text;
    figures += " rank " + std::to_string(r) + " failed " + std::to_string(seconds) +
               " s into step 5 with \"" + text.substr(text.find('\n') + 1) + "\";";
  }

  const auto t1 = std::chrono::steady_clock::now();
  ::setenv("WICK_FAULT_PHASE", "resume", 1);
  const auto resumed = run_rank_processes({0, 1, 2}, kWorld, dir.str(), 120);
  ::unsetenv("WICK_FAULT_PHASE");
  const double resume_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  logs.clear();
  for (int r = 0; r < kWorld; ++r)
    logs += "rank " + std::to_string(r) + ":\n" +
            read_text(dir.str() + "/rank" + std::to_string(r) + ".log");
  ASSERT_EQ(resumed, (std::vector<int>{0, 0, 0})) << logs;
  const std::string straight = read_text(hash_file(dir.str(), "straight", 0));
  ASSERT_EQ(straight.size(), 64u);
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_EQ(read_text(hash_file(dir.str(), "straight", r)), straight) << "rank " << r;
    EXPECT_EQ(read_text(hash_file(dir.str(), "resumed", r)), straight) << "rank " << r;
  }
  std::cout << "[ figures  ] " << label << ":" << figures << " fault phase " << fault_s
            << " s, resume + straight " << resume_s << " s\n";
}

// Rank 1 SIGKILLed in step 5's backward: the survivors' allreduce fails at
// once (the peer's connection closed), far inside the 3 s timeout.
TEST(FaultDdpTest, RankSigkilledMidStepFailsSurvivorsThenResumeIsBitIdentical) {
  if (!is_rank_child()) {
    parent_body("SIGKILL", 0.0, 3.0 + 2.0);
    return;
  }
  child_body(SIGKILL, "failed");
}

// Rank 1 frozen (SIGSTOP) in step 5's backward: the survivors' allreduce
// times out after the configured 3 s, then rank 0 SIGKILLs it.
TEST(FaultDdpTest, RankFrozenMidStepTimesOutSurvivorsThenResumeIsBitIdentical) {
  if (!is_rank_child()) {
    parent_body("SIGSTOP", 3.0 * 0.9, 3.0 + 2.0);
    return;
  }
  child_body(SIGSTOP, "timed out");
}

}  // namespace
