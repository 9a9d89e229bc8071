// Asynchronous checkpoints: Checkpoint::host_snapshot() and
// AsyncCheckpointWriter. The reference for every file they write is the
// synchronous Checkpoint built at the same moment (the existing, separately
// tested path): the files must be the same bytes. Then the writer's
// promises (one save in flight, failures raised once at the next call and
// naming the path, the destructor waiting), and the Trainer's
// async_checkpoint option (the same checkpoints as synchronous ones, resume
// bit for bit, pruning after the write, failures at the next step or at the
// end of fit). SIGKILLs during asynchronous saves are in fault_injection_test.cpp.

#include <wick/wick.h>

#include "support.h"

#include <c10/util/Exception.h>

#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <fstream>
#include <iterator>
#include <set>
#include <thread>

namespace fs = std::filesystem;

namespace {

using wick::AsyncCheckpointWriter;
using wick::Checkpoint;
using wick::testing::SeededTest;
using wick::testing::TempDir;
using wick::testing::tensors_equal;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot read " << p;
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::set<std::string> entries(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

/// Every file of checkpoint directory `a` has the same bytes in `b`, and no more files.
::testing::AssertionResult same_files(const fs::path& a, const fs::path& b) {
  if (entries(a) != entries(b)) return ::testing::AssertionFailure() << "different file names";
  for (const auto& name : entries(a)) {
    if (slurp(a / name) != slurp(b / name)) {
      return ::testing::AssertionFailure() << name << " differs between " << a << " and " << b;
    }
  }
  return ::testing::AssertionSuccess();
}

// Parameters that are views of other storages (offsets, strides, one storage
// shared by a parameter and a buffer), buffers, and nesting: what the per-storage
// copy has to reproduce.
struct NetImpl : torch::nn::Module {
  NetImpl() {
    body = register_module(
        "body", torch::nn::Sequential(torch::nn::Linear(4, 16), torch::nn::BatchNorm1d(16),
                                      torch::nn::Tanh()));
    out = register_module("out", torch::nn::Linear(16, 3));
    transposed = register_parameter("transposed", torch::randn({5, 3}).t());
    // A buffer viewing part of a parameter's storage, at an offset.
    window = register_buffer("window", out->weight.detach().narrow(1, 2, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return out->forward(body->forward(x)) + transposed.sum() * 0;
  }
  torch::nn::Sequential body{nullptr};
  torch::nn::Linear out{nullptr};
  torch::Tensor transposed, window;
};
TORCH_MODULE(Net);

/// Takes `steps` optimizer steps on random data, so the optimizer has state.
void train_steps(Net& net, torch::optim::Optimizer& opt, int steps) {
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    auto loss = net->forward(torch::randn({8, 4})).pow(2).mean();
    loss.backward();
    opt.step();
  }
}

/// Fills `ckpt` with everything a Trainer checkpoint holds.
void build(Checkpoint& ckpt, Net& net, torch::optim::Optimizer& opt, const torch::Tensor& extra) {
  ckpt.put_module("model", *net);
  ckpt.put_optimizer("optimizer", opt);
  ckpt.put("extra", [&](torch::serialize::OutputArchive& a) { a.write("value", extra); });
  ckpt.put_rng_state();
  ckpt.set_train_state({7, 1, 2, 56});
  ckpt.set_fingerprint("lr=0.01");
  ckpt.set_meta("note", "async");
}

class AsyncCheckpointTest : public SeededTest {
 protected:
  std::string path(const std::string& name) const { return (tmp_.path() / name).string(); }
  TempDir tmp_;
};

// ---------------------------------------------------------------- host snapshots

/// An optimizer type wick does not know (only exact types are copied): its
/// state is serialized at put_optimizer, as in a plain Checkpoint.
struct DerivedSGD : torch::optim::SGD {
  using torch::optim::SGD::SGD;
};

// For every optimizer type whose state is copied, and for one that is not: a host snapshot,
// changed-under after its puts and saved later, writes the same bytes as a synchronous checkpoint
// built at the moment of the puts.
TEST_F(AsyncCheckpointTest, HostSnapshotWritesTheBytesOfASynchronousCheckpointOfItsMoment) {
  using Make = std::function<std::unique_ptr<torch::optim::Optimizer>(Net&)>;
  const std::vector<std::pair<std::string, Make>> optimizers{
      {"Adam",
       [](Net& n) {
         return std::make_unique<torch::optim::Adam>(n->parameters(),
                                                     torch::optim::AdamOptions(1e-2).amsgrad(true));
       }},
      {"AdamW",
       [](Net& n) { return std::make_unique<torch::optim::AdamW>(n->parameters(), 1e-2); }},
      {"SGD",
       [](Net& n) {
         return std::make_unique<torch::optim::SGD>(n->parameters(),
                                                    torch::optim::SGDOptions(0.1).momentum(0.9));
       }},
      {"RMSprop",
       [](Net& n) {
         return std::make_unique<torch::optim::RMSprop>(
             n->parameters(), torch::optim::RMSpropOptions(1e-2).momentum(0.5).centered(true));
       }},
      {"Adagrad",
       [](Net& n) { return std::make_unique<torch::optim::Adagrad>(n->parameters(), 0.1); }},
      {"FusedAdam",
       [](Net& n) {
         return std::make_unique<wick::FusedAdam>(
             n->parameters(), wick::FusedAdamOptions(1e-2).decoupled_weight_decay(true));
       }},
      {"SGD subclass",
       [](Net& n) {
         return std::make_unique<DerivedSGD>(n->parameters(),
                                             torch::optim::SGDOptions(0.1).momentum(0.9));
       }},
  };
  for (const auto& [name, make] : optimizers) {
    SCOPED_TRACE(name);
    Net net;
    auto opt = make(net);
    train_steps(net, *opt, 3);
    auto extra = torch::arange(4.0);

    Checkpoint sync;
    build(sync, net, *opt, extra);
    auto snap = Checkpoint::host_snapshot();
    ASSERT_TRUE(snap.is_host_snapshot());
    build(snap, net, *opt, extra);

    // Training goes on: every tensor the snapshot copied changes in place.
    train_steps(net, *opt, 2);
    extra.add_(10);
    for (const auto& b : net->buffers()) b.add_(1);

    sync.save(path("sync-" + name));
    snap.save(path("snap-" + name));
    EXPECT_TRUE(same_files(path("sync-" + name), path("snap-" + name)));
  }
}

// A host snapshot can be read back without saving, like any checkpoint built in memory.
TEST_F(AsyncCheckpointTest, HostSnapshotRestoresFromMemory) {
  Net net;
  torch::optim::Adam opt(net->parameters(), 1e-2);
  train_steps(net, opt, 2);
  const auto before = wick::parameters_sha256(*net);
  auto snap = Checkpoint::host_snapshot();
  snap.put_module("model", *net);
  snap.put_optimizer("optimizer", opt);
  train_steps(net, opt, 2);
  ASSERT_NE(wick::parameters_sha256(*net), before);
  snap.restore_module("model", *net);
  EXPECT_EQ(wick::parameters_sha256(*net), before);
  torch::optim::Adam fresh(net->parameters(), 1e-2);
  snap.restore_optimizer("optimizer", fresh);
  EXPECT_EQ(fresh.state().size(), opt.state().size());
}

/// Lowers this process's file-size limit (writes beyond it fail with EFBIG,
/// which works for root too, unlike chmod) for the object's lifetime.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    ::getrlimit(RLIMIT_FSIZE, &old_);
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);  // else the process is killed
    rlimit lim = old_;
    lim.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &lim);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    std::signal(SIGXFSZ, old_handler_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  rlimit old_{};
  void (*old_handler_)(int) = nullptr;
};

// A host snapshot's sections are streamed from the host copies into their
// files; a write failing part-way names the file and the cause, removes the
// temporary directory and leaves the previous checkpoint as it was.
TEST_F(AsyncCheckpointTest, HostSnapshotWriteFailureNamesTheFileAndChangesNothing) {
  const std::string target = path("step-00000001");
  Checkpoint first;
  first.put_module("model", *torch::nn::Linear(2, 2));
  first.save(target);
  const std::string before = slurp(fs::path(target) / "model.pt");

  auto big = torch::nn::Linear(64, 64);  // ~16 KB of float32
  auto snap = Checkpoint::host_snapshot();
  snap.put_module("model", *big);
  {
    FileSizeLimit limit(8 * 1024);
    EXPECT_THROWS_WITH(snap.save(target),
                       "Checkpoint: cannot save '" + target + "': cannot write '");
    EXPECT_THROWS_WITH(snap.save(target), "model.pt' (after ");
    EXPECT_THROWS_WITH(snap.save(target), "File too large");
  }
  EXPECT_EQ(entries(tmp_.path()), std::set<std::string>{"step-00000001"});  // no temporary left
  EXPECT_TRUE(slurp(fs::path(target) / "model.pt") == before);
  snap.save(target);  // without the limit
  auto back = torch::nn::Linear(64, 64);
  Checkpoint::load(target).restore_module("model", *back);
  EXPECT_TRUE(tensors_equal(back->weight, big->weight));
}

// GPU state: the host snapshot copies it into pinned host memory and writes
// CPU tensors; restoring puts the module's and the optimizer's state back on
// the GPU, with the values of the moment of the snapshot.
TEST_F(AsyncCheckpointTest, HostSnapshotOfCudaStateRestoresOntoTheGpu) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  Net net;
  net->to(torch::kCUDA);
  torch::optim::AdamW opt(net->parameters(), 1e-2);
  for (int i = 0; i < 2; ++i) {
    opt.zero_grad();
    net->forward(torch::randn({8, 4}, torch::kCUDA)).pow(2).mean().backward();
    opt.step();
  }
  const auto before = wick::testing::clone_parameters(*net);
  std::vector<torch::Tensor> moments;
  for (const auto& p : net->parameters()) {
    moments.push_back(
        static_cast<const torch::optim::AdamWParamState&>(*opt.state().at(p.unsafeGetTensorImpl()))
            .exp_avg()
            .clone());
  }
  AsyncCheckpointWriter writer;
  writer.save(path("gpu"), [&](Checkpoint& c) {
    c.put_module("model", *net);
    c.put_optimizer("optimizer", opt);
  });
  for (const auto& p : net->parameters()) p.detach().add_(1.0);  // while it is written
  writer.wait();

  Net back;
  back->to(torch::kCUDA);
  torch::optim::AdamW back_opt(back->parameters(), 1e-2);
  const auto ckpt = Checkpoint::load(path("gpu"));
  ckpt.restore_module("model", *back);
  ckpt.restore_optimizer("optimizer", back_opt);
  const auto params = back->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(params[i].is_cuda());
    EXPECT_TRUE(tensors_equal(params[i], before[i])) << "parameter " << i;
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(
        *back_opt.state().at(params[i].unsafeGetTensorImpl()));
    EXPECT_TRUE(s.exp_avg().is_cuda()) << "parameter " << i;
    EXPECT_TRUE(tensors_equal(s.exp_avg(), moments[i])) << "parameter " << i;
  }
}

// ---------------------------------------------------------------- the writer

// The file written in the background holds the state of the moment of save(),
// byte for byte what a synchronous save at that moment writes, while training
// changes the originals right after save() returns; the next save, reusing
// the host buffers, holds its own moment, and the first file is unchanged.
TEST_F(AsyncCheckpointTest, WriterSavesTheMomentOfSaveWhileTrainingGoesOn) {
  Net net;
  torch::optim::Adam opt(net->parameters(), 1e-2);
  train_steps(net, opt, 3);
  auto extra = torch::arange(4.0);
  AsyncCheckpointWriter writer;
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE(round);
    const std::string name = wick::checkpoint_name(round);
    Checkpoint sync;
    build(sync, net, opt, extra);
    writer.save(path("async/" + name), [&](Checkpoint& ckpt) { build(ckpt, net, opt, extra); });
    train_steps(net, opt, 1);  // while the write runs
    extra.add_(1);
    sync.save(path("sync/" + name));
    writer.wait();
    EXPECT_TRUE(same_files(path("sync/" + name), path("async/" + name)));
  }
  EXPECT_TRUE(same_files(path("sync/step-00000000"), path("async/step-00000000")));
  const auto stats = writer.stats();
  EXPECT_EQ(stats.saves_started, 3);
  EXPECT_EQ(stats.saves_completed, 3);
  EXPECT_EQ(stats.saves_failed, 0);
  EXPECT_EQ(stats.last_completed_path, path("async/step-00000002"));
  int64_t state_bytes = 0;  // parameters, buffers and two Adam moments (the window is a view)
  for (const auto& p : net->parameters()) state_bytes += 3 * p.numel() * 4;
  EXPECT_GE(stats.last_snapshot_bytes, state_bytes);
  EXPECT_GT(stats.last_write_s, 0.0);
  EXPECT_GE(stats.last_blocked_s, stats.last_snapshot_s);
}

// docs/checkpoints.md's example, as it is there.
TEST_F(AsyncCheckpointTest, DocExampleSavesInTheBackground) {
  const std::string dir = path("checkpoints");
  const int64_t steps = 10, every = 2, batch = 8;
  Net model;
  torch::optim::Adam optimizer(model->parameters(), 1e-2);
  auto train_step = [&] { train_steps(model, optimizer, 1); };

  wick::AsyncCheckpointWriter writer;
  for (int64_t step = 1; step <= steps; ++step) {
    writer.check();  // a failed background save throws here, naming its checkpoint
    train_step();
    if (step % every == 0) {
      writer.save(
          dir + "/" + wick::checkpoint_name(step),
          [&](wick::Checkpoint& ckpt) {  // runs here, now: copies the state to host memory
            ckpt.put_module("model", *model);
            ckpt.put_optimizer("optimizer", optimizer);
            ckpt.put_rng_state();
            ckpt.set_train_state({step, 0, 0, step * batch});
          },
          [dir] { wick::prune_checkpoints(dir, /*keep_last_k=*/3); });  // after the write
    }
  }
  writer.wait();  // the last checkpoint is on disk, or its failure throws here

  EXPECT_EQ(wick::list_checkpoints(dir),
            (std::vector<std::string>{dir + "/step-00000006", dir + "/step-00000008",
                                      dir + "/step-00000010"}));
  const auto last = Checkpoint::load(dir + "/step-00000010");
  EXPECT_EQ(last.train_state().step, 10);
  EXPECT_EQ(last.train_state().samples_seen, 80);
  Net back;
  last.restore_module("model", *back);
  EXPECT_EQ(wick::parameters_sha256(*back), wick::parameters_sha256(*model));
}

// At most one save in flight: a second save() waits until the first one,
// after_write included, is over before it even snapshots, and that wait is
// counted as blocked time.
TEST_F(AsyncCheckpointTest, SecondSaveWaitsForTheFirst) {
  Net net;
  AsyncCheckpointWriter writer;
  std::atomic<bool> first_done{false};
  writer.save(
      path("a"), [&](Checkpoint& c) { c.put_module("model", *net); },
      [&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        first_done = true;
      });
  EXPECT_TRUE(writer.in_flight());
  bool first_done_at_second_snapshot = false;
  writer.save(path("b"), [&](Checkpoint& c) {
    first_done_at_second_snapshot = first_done.load();
    c.put_module("model", *net);
  });
  EXPECT_TRUE(first_done_at_second_snapshot);
  const auto stats = writer.stats();
  EXPECT_GE(stats.last_wait_s, 0.2);
  EXPECT_GE(stats.last_blocked_s, stats.last_wait_s);
  writer.wait();
  EXPECT_FALSE(writer.in_flight());
  EXPECT_EQ(writer.stats().saves_completed, 2);
  EXPECT_TRUE(wick::Checkpoint::load(path("a")).has("model"));
  EXPECT_TRUE(wick::Checkpoint::load(path("b")).has("model"));
}

// A background write that fails (the parent is a regular file: no directory
// can be made there, even by root) is raised once, by the next call, naming
// the path and the cause; a save() that raises it starts nothing.
TEST_F(AsyncCheckpointTest, FailedWriteIsRaisedOnceByTheNextCallNamingThePath) {
  const auto file = tmp_.path() / "plain-file";
  std::ofstream(file) << "x";
  const std::string bad = (file / "step-00000001").string();
  Net net;
  {
    AsyncCheckpointWriter writer;
    writer.save(bad, [&](Checkpoint& c) { c.put_module("model", *net); });  // returns: in flight
    EXPECT_THROWS_WITH(writer.wait(), "AsyncCheckpointWriter: the background save of '" + bad +
                                          "' failed: Checkpoint: cannot create directory '" +
                                          file.string() + "'");
    EXPECT_NO_THROW(writer.wait());  // raised once
    EXPECT_EQ(writer.stats().saves_failed, 1);
  }
  {  // check() raises it without blocking, once the write is over.
    AsyncCheckpointWriter writer;
    writer.save(bad, [&](Checkpoint& c) { c.put_module("model", *net); });
    while (writer.in_flight()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_THROWS_WITH(writer.check(), "the background save of '" + bad + "' failed");
    EXPECT_NO_THROW(writer.check());
  }
  {  // The next save() raises it and starts nothing.
    AsyncCheckpointWriter writer;
    writer.save(bad, [&](Checkpoint& c) { c.put_module("model", *net); });
    bool built = false;
    EXPECT_THROWS_WITH(writer.save(path("good"),
                                   [&](Checkpoint& c) {
                                     built = true;
                                     c.put_module("model", *net);
                                   }),
                       "Not a directory");
    EXPECT_FALSE(built);
    EXPECT_FALSE(writer.in_flight());
    EXPECT_FALSE(fs::exists(path("good")));
    // Raised, the writer works again.
    writer.save(path("good"), [&](Checkpoint& c) { c.put_module("model", *net); });
    writer.wait();
    EXPECT_TRUE(Checkpoint::load(path("good")).has("model"));
  }
}

// A failing after_write (e.g. pruning) is raised the same way, saying that the
// checkpoint itself was saved.
TEST_F(AsyncCheckpointTest, FailedAfterWriteIsRaisedSayingTheCheckpointWasSaved) {
  Net net;
  AsyncCheckpointWriter writer;
  writer.save(
      path("step-00000003"), [&](Checkpoint& c) { c.put_module("model", *net); },
      [] { TORCH_CHECK(false, "pruning failed"); });
  EXPECT_THROWS_WITH(writer.wait(), "AsyncCheckpointWriter: '" + path("step-00000003") +
                                        "' was saved, but after_write failed: pruning failed");
  EXPECT_TRUE(Checkpoint::load(path("step-00000003")).has("model"));
}

// What build throws reaches the caller, and nothing is written.
TEST_F(AsyncCheckpointTest, BuildErrorsReachTheCallerAndStartNothing) {
  Net net;
  AsyncCheckpointWriter writer;
  EXPECT_THROWS_WITH(
      writer.save(path("x"), [&](Checkpoint& c) { c.put_module("bad name!", *net); }),
      "section name must be");
  EXPECT_FALSE(writer.in_flight());
  EXPECT_EQ(writer.stats().saves_started, 0);
  EXPECT_THROWS_WITH(writer.save("", [](Checkpoint&) {}), "needs a path");
  EXPECT_THROWS_WITH(writer.save(path("x"), nullptr), "needs a build function");
  EXPECT_FALSE(fs::exists(path("x")));
}

struct WarningRecorder : c10::WarningHandler {
  void process(const c10::Warning& w) override { messages.push_back(w.msg()); }
  std::vector<std::string> messages;
};

// The destructor waits for the save in flight (the checkpoint is complete
// afterwards) and never throws; a failure nobody raised becomes a warning.
TEST_F(AsyncCheckpointTest, DestructorWaitsAndReportsAnUnraisedFailureAsAWarning) {
  Net net;
  {
    AsyncCheckpointWriter writer;
    writer.save(path("step-00000001"), [&](Checkpoint& c) { c.put_module("model", *net); });
  }
  EXPECT_TRUE(Checkpoint::load(path("step-00000001")).has("model"));

  const auto file = tmp_.path() / "plain-file";
  std::ofstream(file) << "x";
  WarningRecorder recorder;
  {
    c10::WarningUtils::WarningHandlerGuard guard(&recorder);
    {
      AsyncCheckpointWriter writer;
      writer.save((file / "step-00000002").string(),
                  [&](Checkpoint& c) { c.put_module("model", *net); });
    }  // no throw
  }
  ASSERT_EQ(recorder.messages.size(), 1u);
  EXPECT_NE(recorder.messages[0].find("failed background save nobody raised"), std::string::npos)
      << recorder.messages[0];
  EXPECT_NE(recorder.messages[0].find((file / "step-00000002").string()), std::string::npos);
}

// ---------------------------------------------------------------- the Trainer

struct Data {
  torch::Tensor x, y;
};

Data make_data() {
  auto gen = at::detail::createCPUGenerator(2024);
  return {torch::randn({48, 4}, gen), torch::randint(0, 3, {48}, gen)};
}

torch::nn::Sequential make_model() {
  torch::manual_seed(5);
  return torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::Tanh(), torch::nn::Dropout(0.25),
                               torch::nn::Linear(8, 3));
}

/// Calls its functions after each optimizer step.
struct StepHook : wick::Callback {
  std::function<void(wick::Trainer&)> step;
  std::string name() const override { return "StepHook"; }
  void on_step_end(wick::Trainer& t) override {
    if (step) step(t);
  }
};

struct Run {
  std::string hash;  // of the final parameters
  wick::FitResult result;
  wick::AsyncCheckpointStats stats;
};

/// Adam, dropout and shuffling (optimizer state, RNG and data position all
/// matter for a resume), checkpointing every step into `dir` ("" = none) and
/// resuming from its newest checkpoint when there is one.
Run train(const std::string& dir, int64_t max_steps, bool async, int64_t keep_last_k = 2,
          const std::vector<std::shared_ptr<wick::Callback>>& callbacks = {}) {
  static const Data data = make_data();
  auto model = make_model();
  wick::SupervisedTask task(model);
  torch::optim::Adam opt(model->parameters(), 1e-2);
  wick::TensorBatchSource source(data.x, data.y,
                                 wick::TensorBatchSourceOptions(8).shuffle(true).seed(9));
  auto options = wick::TrainerOptions()
                     .max_epochs(1000)
                     .max_steps(max_steps)
                     .seed(17)
                     .log_every_n_steps(1000000)
                     .log_system_metrics(false)
                     .async_checkpoint(async);
  if (!dir.empty()) {
    options.checkpoint_dir(dir).checkpoint_every_n_steps(1).keep_last_k(keep_last_k);
    if (wick::latest_checkpoint(dir).has_value()) options.resume("latest");
  }
  wick::Trainer trainer(options);
  for (const auto& cb : callbacks) trainer.add_callback(cb);
  Run run;
  run.result = trainer.fit(task, opt, source);
  run.hash = wick::parameters_sha256(*model);
  run.stats = trainer.async_checkpoint_stats();
  return run;
}

/// The Adam state of two checkpoints' "optimizer" sections, restored over one
/// model, is the same bit for bit.
::testing::AssertionResult same_adam_state(const Checkpoint& a, const Checkpoint& b) {
  auto model = make_model();
  torch::optim::Adam oa(model->parameters(), 1e-2), ob(model->parameters(), 1e-2);
  a.restore_optimizer("optimizer", oa);
  b.restore_optimizer("optimizer", ob);
  const auto params = model->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    void* key = params[i].unsafeGetTensorImpl();
    if (oa.state().count(key) != ob.state().count(key)) {
      return ::testing::AssertionFailure() << "parameter " << i << " has state in one only";
    }
    if (oa.state().count(key) == 0) continue;
    const auto& sa = static_cast<const torch::optim::AdamParamState&>(*oa.state().at(key));
    const auto& sb = static_cast<const torch::optim::AdamParamState&>(*ob.state().at(key));
    if (sa.step() != sb.step() || !tensors_equal(sa.exp_avg(), sb.exp_avg()) ||
        !tensors_equal(sa.exp_avg_sq(), sb.exp_avg_sq())) {
      return ::testing::AssertionFailure() << "parameter " << i << "'s state differs";
    }
  }
  return ::testing::AssertionSuccess();
}

// Every checkpoint an asynchronous fit writes has the model and RNG files of
// the synchronous fit's, byte for byte, and the same optimizer state (the
// Checkpointer's own state differs: it names its directory); with
// keep_last_k, pruning after the last write kept the newest two.
TEST_F(AsyncCheckpointTest, TrainerWritesTheSameCheckpointsAsynchronously) {
  const std::string sync_dir = path("sync"), async_dir = path("async");
  const auto sync = train(sync_dir, 14, /*async=*/false, /*keep_last_k=*/0);
  const auto async = train(async_dir, 14, /*async=*/true, /*keep_last_k=*/0);
  EXPECT_EQ(async.hash, sync.hash);
  ASSERT_EQ(wick::list_checkpoints(async_dir).size(), 14u);
  for (int64_t step = 1; step <= 14; ++step) {
    const auto name = wick::checkpoint_name(step);
    for (const char* file : {"model.pt", "rng_state.pt"}) {
      EXPECT_TRUE(slurp(fs::path(sync_dir) / name / file) ==
                  slurp(fs::path(async_dir) / name / file))
          << name << "/" << file << " differs";
    }
    // The optimizer's archive names parameters by their addresses in the
    // process that saved it: the same state, loaded.
    EXPECT_TRUE(same_adam_state(Checkpoint::load(sync_dir + "/" + name),
                                Checkpoint::load(async_dir + "/" + name)))
        << name;
  }
  EXPECT_EQ(sync.stats.saves_started, 0);
  EXPECT_EQ(async.stats.saves_started, 14);
  EXPECT_EQ(async.stats.saves_completed, 14);
  EXPECT_EQ(async.stats.last_completed_path, async_dir + "/step-00000014");

  // keep_last_k: pruning runs after each write, the last one included.
  const std::string kept = path("kept");
  train(kept, 9, /*async=*/true, /*keep_last_k=*/2);
  EXPECT_EQ(wick::list_checkpoints(kept),
            (std::vector<std::string>{kept + "/step-00000008", kept + "/step-00000009"}));
}

// A run stopped after 7 steps and resumed from its asynchronous checkpoints
// ends with the parameters of an uninterrupted run, bit for bit.
TEST_F(AsyncCheckpointTest, TrainerResumesFromAsyncCheckpointsBitForBit) {
  const auto straight = train("", 20, /*async=*/false);
  const std::string dir = path("checkpoints");
  const auto first = train(dir, 7, /*async=*/true);
  EXPECT_NE(first.hash, straight.hash);
  EXPECT_EQ(Checkpoint::load(*wick::latest_checkpoint(dir)).train_state().step, 7);
  const auto resumed = train(dir, 20, /*async=*/true);
  EXPECT_EQ(resumed.result.state.step, 20);
  EXPECT_EQ(resumed.hash, straight.hash);
}

// A failed background write stops fit at the next optimizer step, naming the
// checkpoint and the cause; no step is taken after it is raised.
TEST_F(AsyncCheckpointTest, TrainerRaisesAFailedWriteAtTheNextStep) {
  const auto file = tmp_.path() / "plain-file";
  std::ofstream(file) << "x";
  const std::string dir = (file / "checkpoints").string();
  auto hook = std::make_shared<StepHook>();
  // Until the write of step 1's checkpoint has failed, the loop stays in step 1.
  hook->step = [](wick::Trainer& t) {
    while (t.state().step == 1 && t.async_checkpoint_stats().saves_failed == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  };
  auto checkpointer =
      std::make_shared<wick::Checkpointer>(wick::CheckpointerOptions(dir).every_n_steps(1));
  int64_t steps_taken = 0;
  auto counter = std::make_shared<StepHook>();
  counter->step = [&](wick::Trainer& t) { steps_taken = t.state().step; };
  EXPECT_THROWS_WITH(train("", 10, /*async=*/true, 2, {checkpointer, hook, counter}),
                     "AsyncCheckpointWriter: the background save of '" + dir +
                         "/step-00000001' failed: Checkpoint: cannot create directory '" +
                         file.string() + "': Not a directory");
  EXPECT_EQ(steps_taken, 1);
}

// A failed write of the last checkpoint (at fit's end) is raised by fit.
TEST_F(AsyncCheckpointTest, TrainerRaisesAFailedLastWriteAtTheEndOfFit) {
  const auto file = tmp_.path() / "plain-file";
  std::ofstream(file) << "x";
  const std::string dir = (file / "checkpoints").string();
  auto checkpointer = std::make_shared<wick::Checkpointer>(
      wick::CheckpointerOptions(dir).every_epoch(false).on_fit_end(true));
  EXPECT_THROWS_WITH(
      train("", 3, /*async=*/true, 2, {checkpointer}),
      "AsyncCheckpointWriter: the background save of '" + dir + "/step-00000003' failed");
}

// A fit failing for another reason while a background write fails too
// carries both failures.
TEST_F(AsyncCheckpointTest, TrainerFailingForAnotherReasonAlsoReportsTheFailedWrite) {
  const auto file = tmp_.path() / "plain-file";
  std::ofstream(file) << "x";
  const std::string dir = (file / "checkpoints").string();
  auto checkpointer =
      std::make_shared<wick::Checkpointer>(wick::CheckpointerOptions(dir).every_n_steps(1));
  auto hook = std::make_shared<StepHook>();
  hook->step = [](wick::Trainer&) { TORCH_CHECK(false, "the user's callback failed"); };
  try {
    train("", 3, /*async=*/true, 2, {checkpointer, hook});
    ADD_FAILURE() << "fit did not throw";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("the user's callback failed"), std::string::npos) << msg;
    EXPECT_NE(msg.find("besides, a background checkpoint write failed"), std::string::npos) << msg;
    EXPECT_NE(msg.find(dir + "/step-00000001"), std::string::npos) << msg;
  }
}

}  // namespace
