// Fault injection with real processes and real files (issue 9): training
// processes killed with SIGKILL at random moments (checkpoint writes
// included), checkpoint writes that fail (read-only directory, a file-size
// limit), and training that stops on repeated non-finite losses.
//
// The children here are fork()ed from the test process, not re-executed
// (tests/multiprocess.h): starting LibTorch anew costs ~0.5 s per process,
// which 40 kills cannot afford. Every child leaves through _exit, so nothing
// of gtest's or LibTorch's runs twice at exit; the parent has set one thread
// (SeededTest), so the child inherits no thread pool it could deadlock on.

#include <wick/wick.h>

#include "support.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <sstream>

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

using wick::testing::TempDir;

// ------------------------------------------------------------------ helpers

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n != "." && n != "..") out.push_back(n);
    }
    ::closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_all(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::write(fd, s.data() + done, s.size() - done);
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  return out;
}

/// A forked child running `body`; its exit status is 0 when body returns, 1
/// when it throws (the message goes to the report pipe), 128 + signal when
/// killed. `body` gets the write end of the report pipe.
struct Child {
  pid_t pid = -1;
  int report = -1;  // read end: what the child wrote, until it exits

  static Child start(const std::function<void(int report_fd)>& body) {
    int fds[2];
    TORCH_CHECK(::pipe(fds) == 0, "fault_injection_test: pipe failed");
    std::cout.flush();
    std::cerr.flush();
    const pid_t pid = ::fork();
    TORCH_CHECK(pid >= 0, "fault_injection_test: fork failed");
    if (pid == 0) {
      ::close(fds[0]);
      int code = 0;
      try {
        body(fds[1]);
      } catch (const c10::Error& e) {
        write_all(fds[1], std::string("ERROR: ") + e.what_without_backtrace());
        code = 1;
      } catch (const std::exception& e) {
        write_all(fds[1], std::string("ERROR: ") + e.what());
        code = 1;
      }
      ::_exit(code);
    }
    ::close(fds[1]);
    return Child{pid, fds[0]};
  }

  /// Waits for one byte on the report pipe (the child's "ready"), at most `timeout_ms`.
  bool wait_ready(int timeout_ms) const {
    pollfd p{report, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return false;
    char c = 0;
    return ::read(report, &c, 1) == 1 && c == 'R';
  }

  /// Reaps the child (waiting at most `timeout_s`, then killing it); returns
  /// its exit status as described above, -1 after a timeout.
  int wait(double timeout_s, std::string* report_text = nullptr) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    int status = -1;
    for (;;) {
      int st = 0;
      if (::waitpid(pid, &st, WNOHANG) == pid) {
        status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
        break;
      }
      ::usleep(1000);
    }
    std::string text = read_all(report);
    ::close(report);
    if (report_text) *report_text = text;
    return status;
  }
};

// ------------------------------------------------------------------ the run

constexpr int64_t kSamples = 48;
constexpr int64_t kBatch = 8;  // 6 steps per epoch: kills land at epoch ends too

struct Data {
  torch::Tensor x, y;
};

Data make_data() {
  auto gen = at::detail::createCPUGenerator(2024);
  return {torch::randn({kSamples, 4}, gen), torch::randint(0, 3, {kSamples}, gen)};
}

torch::nn::Sequential make_model() {
  torch::manual_seed(5);
  return torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::Tanh(), torch::nn::Dropout(0.25),
                               torch::nn::Linear(8, 3));
}

/// Calls `f` at fit start and after every optimizer step.
struct Hook : wick::Callback {
  std::function<void(wick::Trainer&)> start, step;
  std::string name() const override { return "FaultInjectionHook"; }
  void on_fit_start(wick::Trainer& t) override {
    if (start) start(t);
  }
  void on_step_end(wick::Trainer& t) override {
    if (step) step(t);
  }
};

/// Trains the model for `max_steps` with Adam, dropout and shuffling (so the
/// optimizer state, the RNG and the data position all have to be restored),
/// checkpointing every step into `dir` when it is not empty, and resuming from
/// its newest checkpoint when there is one. Returns the parameters' SHA-256.
std::string train(const std::string& dir, int64_t max_steps, std::shared_ptr<Hook> hook = nullptr) {
  static const Data data = make_data();
  auto model = make_model();
  wick::SupervisedTask task(model);
  torch::optim::Adam opt(model->parameters(), 1e-2);
  wick::TensorBatchSource source(data.x, data.y, wick::TensorBatchSourceOptions(kBatch).shuffle(true).seed(9));
  auto options = wick::TrainerOptions()
                     .max_epochs(1000000)
                     .max_steps(max_steps)
                     .seed(17)
                     .log_every_n_steps(1000000)
                     .log_system_metrics(false);
  if (!dir.empty()) {
    options.checkpoint_dir(dir).checkpoint_every_n_steps(1).keep_last_k(2);
    if (wick::latest_checkpoint(dir).has_value()) options.resume("latest");
  }
  wick::Trainer trainer(options);
  if (hook) trainer.add_callback(hook);
  trainer.fit(task, opt, source);
  return wick::parameters_sha256(*model);
}

/// The parameters' SHA-256 in a checkpoint.
std::string checkpoint_hash(const wick::Checkpoint& ckpt) {
  auto model = make_model();
  ckpt.restore_module("model", *model);
  return wick::parameters_sha256(*model);
}

bool is_temp_of(const std::string& name, pid_t pid) {
  return name.find(".tmp-") != std::string::npos && name.find("-" + std::to_string(pid) + "-") != std::string::npos;
}

class FaultInjectionTest : public wick::testing::SeededTest {};

// A training process checkpointing every step is SIGKILLed 40 times at random
// moments, many inside a checkpoint write; after every kill the newest
// complete checkpoint loads (CRCs verified) and holds exactly the parameters
// an uninterrupted run had after that step, and the run resumed to the end
// reaches bit for bit the uninterrupted run's parameters.
TEST_F(FaultInjectionTest, SigkillDuringTrainingAndCheckpointWrites) {
  constexpr int64_t kSteps = 150;
  constexpr int kKills = 40;
  const auto t0 = std::chrono::steady_clock::now();

  // The uninterrupted reference, without checkpoints, and its parameters after every step.
  std::vector<std::string> reference(kSteps + 1);
  auto record = std::make_shared<Hook>();
  record->step = [&](wick::Trainer& t) { reference[t.state().step] = wick::parameters_sha256(t.task().module()); };
  const std::string final_hash = train("", kSteps, record);
  ASSERT_EQ(reference[kSteps], final_hash);
  const double reference_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  TempDir tmp;
  const std::string dir = tmp.str() + "/checkpoints";
  std::mt19937 rng(20261129);
  // Delays mostly below a few steps' time, so kills land all over the step
  // (forward, backward, the checkpoint's writes, fsyncs, rename, pruning).
  std::uniform_int_distribution<int> delay_us(0, 100000);
  int kills = 0, in_write = 0, finished_early = 0;
  int64_t last_step = 0;
  for (int i = 0; i < kKills; ++i) {
    auto child = Child::start([&](int report) {
      auto hook = std::make_shared<Hook>();
      hook->start = [report](wick::Trainer&) { write_all(report, "R"); };
      train(dir, kSteps, hook);
    });
    ASSERT_TRUE(child.wait_ready(30000)) << "child " << i << " never started training";
    ::usleep(static_cast<useconds_t>(delay_us(rng)));
    ::kill(child.pid, SIGKILL);
    std::string text;
    const int status = child.wait(30, &text);
    if (status == 0) {
      ++finished_early;
      break;
    }
    ASSERT_EQ(status, 128 + SIGKILL) << "child " << i << ": " << text;
    ++kills;
    for (const auto& name : entries(dir)) in_write += is_temp_of(name, child.pid) ? 1 : 0;

    const auto latest = wick::latest_checkpoint(dir);
    if (!latest.has_value()) continue;  // killed before its first checkpoint was complete
    wick::Checkpoint ckpt;
    ASSERT_NO_THROW(ckpt = wick::Checkpoint::load(*latest)) << "after kill " << i;
    const int64_t step = ckpt.train_state().step;
    ASSERT_GE(step, last_step) << "the newest checkpoint went back after kill " << i;
    ASSERT_GE(step, 1);
    ASSERT_LE(step, kSteps);
    EXPECT_EQ(checkpoint_hash(ckpt), reference[step]) << *latest << " after kill " << i;
    last_step = step;
  }
  EXPECT_EQ(kills, kKills) << "the run finished before every kill: make it longer";
  EXPECT_GE(in_write, 5) << "too few kills landed inside a checkpoint write";

  // The last resume runs to the end, unkilled.
  std::string resumed;
  {
    TempDir out;
    auto child = Child::start([&](int report) {
      const std::string h = train(dir, kSteps);
      write_all(report, "H" + h);
    });
    std::string text;
    ASSERT_EQ(child.wait(120, &text), 0) << text;
    ASSERT_EQ(text.substr(0, 1), "H") << text;
    resumed = text.substr(1);
  }
  EXPECT_EQ(resumed, final_hash);
  EXPECT_EQ(checkpoint_hash(wick::Checkpoint::load(*wick::latest_checkpoint(dir))), final_hash);

  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "[ figures  ] " << kills << " SIGKILLs survived, " << in_write
            << " inside a checkpoint write (temp dir of the killed pid left), newest checkpoint before the "
               "final resume at step "
            << last_step << " of " << kSteps << "; reference run " << reference_s << " s, test " << total_s
            << " s\n";
}

}  // namespace
