// Checkpoint: round trips, the on-disk format (checked with zlib and
// torch::load, not with the code under test), corruption detection, atomic
// replacement and failed writes, RNG and optimizer resumption, and the
// directory helpers.

#include <sys/resource.h>
#include <unistd.h>
#include <wick/checkpoint.h>
#include <zlib.h>

#include <csignal>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>

#include "support.h"

namespace fs = std::filesystem;

namespace {

using wick::Checkpoint;
using wick::testing::SeededTest;
using wick::testing::TempDir;
using wick::testing::tensors_equal;

// A model with nested dotted names ("body.0.weight", "body.1.running_mean") and buffers.
struct NetImpl : torch::nn::Module {
  explicit NetImpl(int64_t hidden = 8, bool with_head = false) {
    body = register_module(
        "body", torch::nn::Sequential(torch::nn::Linear(4, hidden), torch::nn::BatchNorm1d(hidden),
                                      torch::nn::ReLU()));
    out = register_module("out", torch::nn::Linear(hidden, 2));
    if (with_head) head = register_module("head", torch::nn::Linear(2, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = out->forward(body->forward(x));
    return head ? head->forward(y) : y;
  }
  torch::nn::Sequential body{nullptr};
  torch::nn::Linear out{nullptr}, head{nullptr};
};
TORCH_MODULE(Net);

/// Every parameter and buffer by dotted name, cloned.
std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> s;
  for (const auto& p : m.named_parameters()) s[p.key()] = p.value().detach().clone();
  for (const auto& b : m.named_buffers()) s[b.key()] = b.value().detach().clone();
  return s;
}

::testing::AssertionResult same_state(const std::map<std::string, torch::Tensor>& a,
                                      const std::map<std::string, torch::Tensor>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "different tensor counts";
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    if (it == b.end()) return ::testing::AssertionFailure() << name << " missing";
    auto r = tensors_equal(t, it->second);
    if (!r) return r << " (" << name << ")";
  }
  return ::testing::AssertionSuccess();
}

/// A model whose running statistics have moved away from their defaults.
Net trained_net(int64_t hidden = 8) {
  Net net(hidden);
  for (int i = 0; i < 3; ++i) net->forward(torch::randn({16, 4}));
  return net;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void spit(const fs::path& p, const std::string& data) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << data;
}

std::set<std::string> entries(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

class CheckpointTest : public SeededTest {
 protected:
  /// Saves a checkpoint with a module and an optimizer section to `dir`/name.
  std::string save_sample(const std::string& name = "step-00000100") {
    auto net = trained_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    Checkpoint ckpt;
    ckpt.put_module("model", *net);
    ckpt.put_optimizer("optimizer", opt);
    const auto path = (tmp_.path() / name).string();
    ckpt.save(path);
    return path;
  }
  TempDir tmp_;
};

// ---------------------------------------------------------------- round trip and format

TEST_F(CheckpointTest, RoundTripRestoresParametersBuffersAndState) {
  auto net = trained_net();
  const auto saved = snapshot(*net);
  Checkpoint ckpt;
  ckpt.put_module("model", *net);
  ckpt.set_train_state({100, 1, 37, 12800});
  ckpt.set_fingerprint("sha:abc123");
  ckpt.set_meta("val_loss", "0.25");
  const auto path = (tmp_.path() / "runs" / "a" / "step-00000100").string();  // parents made
  ckpt.save(path);

  auto fresh = Net();  // other initial values
  ASSERT_FALSE(same_state(snapshot(*fresh), saved));
  auto back = Checkpoint::load(path);
  back.restore_module("model", *fresh);
  EXPECT_TRUE(same_state(snapshot(*fresh), saved));
  EXPECT_EQ(back.train_state().step, 100);
  EXPECT_EQ(back.train_state().epoch, 1);
  EXPECT_EQ(back.train_state().batch_in_epoch, 37);
  EXPECT_EQ(back.train_state().samples_seen, 12800);
  EXPECT_EQ(back.fingerprint(), "sha:abc123");
  EXPECT_EQ(back.meta("val_loss"), std::optional<std::string>("0.25"));
  EXPECT_EQ(back.meta("nope"), std::nullopt);
  EXPECT_EQ(back.sections(), std::vector<std::string>{"model"});
  EXPECT_TRUE(back.has("model"));
  EXPECT_FALSE(back.has("optimizer"));
  EXPECT_EQ(back.path(), path);
  EXPECT_EQ(ckpt.path(), "");
}

TEST_F(CheckpointTest, SectionFileIsAPlainTorchArchive) {
  // torch::load reads the module section as if torch::save had written it.
  auto net = trained_net();
  Checkpoint ckpt;
  ckpt.put_module("model", *net);
  ckpt.save((tmp_.path() / "c").string());
  auto other = Net();
  torch::load(other, (tmp_.path() / "c" / "model.pt").string());
  EXPECT_TRUE(same_state(snapshot(*other), snapshot(*net)));
}

TEST_F(CheckpointTest, MetaJsonRecordsSizesAndChecksumsOfEveryFile) {
  const auto path = save_sample();
  EXPECT_EQ(entries(tmp_.path()), std::set<std::string>{"step-00000100"});  // no temp leftovers
  EXPECT_EQ(entries(path), (std::set<std::string>{"meta.json", "model.pt", "optimizer.pt"}));

  auto meta = nlohmann::json::parse(slurp(fs::path(path) / "meta.json"));
  EXPECT_EQ(meta["format"], "wick-checkpoint");
  EXPECT_EQ(meta["format_version"], 1);
  EXPECT_EQ(meta["train_state"]["step"], 0);
  for (const char* section : {"model", "optimizer"}) {
    const auto file = fs::path(path) / (std::string(section) + ".pt");
    const std::string bytes = slurp(file);
    const auto& entry = meta["sections"][section];
    EXPECT_EQ(entry["file"], std::string(section) + ".pt");
    EXPECT_EQ(entry["size"].get<uint64_t>(), fs::file_size(file));
    const uLong crc = crc32(crc32(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(bytes.data()),
                            static_cast<uInt>(bytes.size()));
    char hex[9];
    std::snprintf(hex, sizeof(hex), "%08lx", crc);
    EXPECT_EQ(entry["crc32"], std::string(hex)) << section;
  }
}

TEST_F(CheckpointTest, CustomSectionsRoundTrip) {
  Checkpoint ckpt;
  ckpt.put("scaler", [](torch::serialize::OutputArchive& a) {
    a.write("scale", torch::tensor(65536.0));
    a.write("growth_tracker", c10::IValue(int64_t{7}));
  });
  ckpt.save((tmp_.path() / "c").string());
  auto back = Checkpoint::load((tmp_.path() / "c").string());
  torch::Tensor scale;
  c10::IValue growth;
  back.get("scaler", [&](torch::serialize::InputArchive& a) {
    a.read("scale", scale);
    a.read("growth_tracker", growth);
  });
  EXPECT_EQ(scale.item<double>(), 65536.0);
  EXPECT_EQ(growth.toInt(), 7);
  EXPECT_THROWS_WITH(back.get("nope", [](auto&) {}), "has no section 'nope'");
  EXPECT_THROWS_WITH(back.get("scaler",
                              [](torch::serialize::InputArchive& a) {
                                torch::Tensor t;
                                a.read("absent", t);
                              }),
                     "cannot restore section 'scaler'");
}

TEST_F(CheckpointTest, RejectsBadSectionNames) {
  Checkpoint ckpt;
  auto net = Net();
  EXPECT_THROWS_WITH(ckpt.put_module("a/b", *net), "section name must be");
  EXPECT_THROWS_WITH(ckpt.put_module("", *net), "section name must be");
  EXPECT_THROWS_WITH(ckpt.put_module("..", *net), "section name must be");
  EXPECT_THROWS_WITH(ckpt.put("rng_state", [](auto&) {}), "reserved for put_rng_state()");
  EXPECT_TRUE(ckpt.sections().empty());
}

TEST_F(CheckpointTest, RestoresFromMemoryWithoutSaving) {
  auto net = trained_net();
  Checkpoint ckpt;
  ckpt.put_module("model", *net);
  const auto at_put = snapshot(*net);
  {
    torch::NoGradGuard g;
    for (auto& p : net->parameters()) p.add_(1.0);  // put_module took a snapshot
  }
  auto other = Net();
  ckpt.restore_module("model", *other);
  EXPECT_TRUE(same_state(snapshot(*other), at_put));
}

TEST_F(CheckpointTest, RestoreKeepsTheModulesDtype) {
  auto net = trained_net();
  Checkpoint ckpt;
  ckpt.put_module("model", *net);
  auto wide = Net();
  wide->to(torch::kFloat64);
  ckpt.restore_module("model", *wide);
  for (const auto& p : wide->named_parameters()) {
    EXPECT_EQ(p.value().scalar_type(), torch::kFloat64) << p.key();
    EXPECT_TRUE(tensors_equal(p.value().to(torch::kFloat32), net->named_parameters()[p.key()]))
        << p.key();
  }
}

TEST_F(CheckpointTest, RestoreOntoCudaModuleKeepsDevice) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto net = trained_net();
  Checkpoint ckpt;
  ckpt.put_module("model", *net);
  ckpt.save((tmp_.path() / "c").string());
  auto gpu = Net();
  gpu->to(torch::kCUDA);
  Checkpoint::load((tmp_.path() / "c").string()).restore_module("model", *gpu);
  for (const auto& [name, t] : snapshot(*gpu)) {
    EXPECT_TRUE(t.is_cuda()) << name;
  }
  auto on_cpu = snapshot(*gpu);
  for (auto& [name, t] : on_cpu) t = t.cpu();
  EXPECT_TRUE(same_state(on_cpu, snapshot(*net)));
}

// The example of docs/checkpoints.md, run as written.
TEST_F(CheckpointTest, DocExampleSavesAndResumes) {
  auto model = trained_net();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  optimizer.zero_grad();
  torch::mse_loss(model->forward(torch::randn({8, 4})), torch::randn({8, 2})).backward();
  optimizer.step();
  double best_loss = 0.3127;
  const auto saved_model = snapshot(*model);

  const std::string dir = (tmp_.path() / "runs" / "a" / "checkpoints").string();
  // ---- docs/checkpoints.md: save ----
  wick::Checkpoint ckpt;
  ckpt.put_module("model", *model);
  ckpt.put_optimizer("optimizer", optimizer);
  ckpt.put("counters", [&](torch::serialize::OutputArchive& a) {
    a.write("best_loss", torch::tensor(best_loss, torch::kFloat64));
  });
  ckpt.put_rng_state();
  ckpt.set_train_state({/*step=*/100, /*epoch=*/1, /*batch_in_epoch=*/37, /*samples_seen=*/12800});
  ckpt.set_fingerprint("lr=0.001;batch=128");
  ckpt.set_meta("val_loss", "0.3127");
  ckpt.save(dir + "/" + wick::checkpoint_name(100));  // atomic
  wick::prune_checkpoints(dir, /*keep_last_k=*/3);
  // ---- docs/checkpoints.md: end ----

  const auto expected_draw = torch::randn({4});
  torch::manual_seed(5);  // a restart: other weights, a fresh optimizer, another RNG state
  model = Net();
  optimizer = torch::optim::Adam(model->parameters(), torch::optim::AdamOptions(1e-3));
  best_loss = 0.0;
  wick::TrainState start;

  // ---- docs/checkpoints.md: resume ----
  if (auto latest = wick::latest_checkpoint(dir)) {
    auto back = wick::Checkpoint::load(*latest);  // sizes and CRC-32s verified here
    TORCH_CHECK(back.fingerprint() == "lr=0.001;batch=128", "resuming with other options");
    back.restore_module("model", *model);  // names and shapes checked
    back.restore_optimizer("optimizer", optimizer);
    back.get("counters", [&](torch::serialize::InputArchive& a) {
      torch::Tensor t;
      a.read("best_loss", t);
      best_loss = t.item<double>();
    });
    back.restore_rng_state();
    start = back.train_state();
  }
  // ---- docs/checkpoints.md: end ----

  EXPECT_EQ(start.step, 100);
  EXPECT_EQ(start.batch_in_epoch, 37);
  EXPECT_EQ(best_loss, 0.3127);
  EXPECT_TRUE(same_state(snapshot(*model), saved_model));
  EXPECT_TRUE(tensors_equal(torch::randn({4}), expected_draw));
  EXPECT_EQ(optimizer.state().size(), model->parameters().size());  // Adam moments are back
}

// ---------------------------------------------------------------- corruption

TEST_F(CheckpointTest, TruncatedSectionFileIsNamed) {
  const auto path = save_sample();
  const auto file = fs::path(path) / "model.pt";
  fs::resize_file(file, fs::file_size(file) - 10);
  EXPECT_THROWS_WITH(Checkpoint::load(path), file.string());
  EXPECT_THROWS_WITH(Checkpoint::load(path), "truncated");
}

TEST_F(CheckpointTest, FlippedByteIsNamed) {
  const auto path = save_sample();
  const auto file = fs::path(path) / "optimizer.pt";
  std::string bytes = slurp(file);
  bytes[bytes.size() / 2] ^= 0x01;
  spit(file, bytes);
  EXPECT_THROWS_WITH(Checkpoint::load(path), file.string());
  EXPECT_THROWS_WITH(Checkpoint::load(path), "is corrupted: its CRC-32");
}

TEST_F(CheckpointTest, MissingMetaJsonIsNamed) {
  const auto path = save_sample();
  fs::remove(fs::path(path) / "meta.json");
  EXPECT_THROWS_WITH(Checkpoint::load(path), (fs::path(path) / "meta.json").string());
  EXPECT_THROWS_WITH(Checkpoint::load(path), "is missing");
}

TEST_F(CheckpointTest, BadJsonIsNamed) {
  const auto path = save_sample();
  spit(fs::path(path) / "meta.json", "{\"format\": \"wick-checkpoint\", ");
  EXPECT_THROWS_WITH(Checkpoint::load(path), "meta.json' is not valid JSON");
}

TEST_F(CheckpointTest, UnknownFormatVersionIsNamed) {
  const auto path = save_sample();
  const auto meta_path = fs::path(path) / "meta.json";
  auto meta = nlohmann::json::parse(slurp(meta_path));
  meta["format_version"] = 99;
  spit(meta_path, meta.dump());
  EXPECT_THROWS_WITH(Checkpoint::load(path), "unknown format version 99");
  EXPECT_THROWS_WITH(Checkpoint::load(path), meta_path.string());
}

TEST_F(CheckpointTest, MalformedMetaJsonIsNamed) {
  const auto path = save_sample();
  const auto meta_path = fs::path(path) / "meta.json";
  auto meta = nlohmann::json::parse(slurp(meta_path));
  meta["train_state"].erase("step");
  spit(meta_path, meta.dump());
  EXPECT_THROWS_WITH(Checkpoint::load(path), "meta.json' is malformed");
}

TEST_F(CheckpointTest, MissingSectionFileIsNamed) {
  const auto path = save_sample();
  fs::remove(fs::path(path) / "optimizer.pt");
  EXPECT_THROWS_WITH(Checkpoint::load(path), (fs::path(path) / "optimizer.pt").string());
  EXPECT_THROWS_WITH(Checkpoint::load(path), "is missing");
}

TEST_F(CheckpointTest, MissingDirectoryIsNamed) {
  const auto path = (tmp_.path() / "step-00000001").string();
  EXPECT_THROWS_WITH(Checkpoint::load(path), path);
}

// ---------------------------------------------------------------- restore_module checks

TEST_F(CheckpointTest, WrongShapeNamesParameterAndBothShapesAndLeavesModuleUnchanged) {
  const auto path = (tmp_.path() / "c").string();
  Checkpoint ckpt;
  ckpt.put_module("model", *trained_net(/*hidden=*/8));
  ckpt.save(path);
  auto back = Checkpoint::load(path);

  auto narrow = Net(/*hidden=*/6);
  const auto before = snapshot(*narrow);
  EXPECT_THROWS_WITH(back.restore_module("model", *narrow), path);
  EXPECT_THROWS_WITH(back.restore_module("model", *narrow),
                     "parameter 'body.0.weight' has shape [8, 4] in the checkpoint but [6, 4]");
  EXPECT_THROWS_WITH(back.restore_module("model", *narrow),
                     "buffer 'body.1.running_mean' has shape [8] in the checkpoint but [6]");
  // out.bias ([2]) would have fit: it must not have been copied either.
  EXPECT_TRUE(same_state(snapshot(*narrow), before));
}

TEST_F(CheckpointTest, MissingAndUnexpectedParametersAreNamed) {
  Checkpoint plain, headed;
  plain.put_module("model", *trained_net());
  headed.put_module("model", *Net(8, /*with_head=*/true));

  auto with_head = Net(8, /*with_head=*/true);
  const auto before = snapshot(*with_head);
  EXPECT_THROWS_WITH(plain.restore_module("model", *with_head),
                     "parameter 'head.weight' (shape [2, 2]) is missing from the checkpoint");
  EXPECT_TRUE(same_state(snapshot(*with_head), before));

  auto without = Net(8);
  const auto before2 = snapshot(*without);
  EXPECT_THROWS_WITH(headed.restore_module("model", *without),
                     "the checkpoint has 'head.bias' (shape [2]) which the module lacks");
  EXPECT_THROWS_WITH(headed.restore_module("model", *without), "<in memory>");
  EXPECT_TRUE(same_state(snapshot(*without), before2));
  EXPECT_THROWS_WITH(headed.restore_module("nope", *without), "has no section 'nope'");
}

TEST_F(CheckpointTest, SavedDtypesAreConvertedAndAnUnconvertibleOneIsNamedBeforeAnyCopy) {
  // Found by fuzz/checkpoint_fuzz: a pickle naming UInt7Storage loads, and
  // copy_ from it throws LibTorch's bare '"copy_" not implemented for
  // 'UInt7''. The tensors are written flat by dotted name, as a foreign
  // writer might.
  auto source = trained_net();
  auto saved = snapshot(*source);
  saved["body.0.weight"] = saved["body.0.weight"].to(torch::kDouble);  // converts

  Checkpoint good;
  good.put("model", [&](torch::serialize::OutputArchive& a) {
    for (const auto& [name, t] : saved) a.write(name, t);
  });
  auto fresh = Net();
  good.restore_module("model", *fresh);
  EXPECT_TRUE(same_state(snapshot(*fresh), snapshot(*source)));
  EXPECT_EQ(fresh->body[0]->as<torch::nn::Linear>()->weight.scalar_type(), torch::kFloat);

  saved["out.bias"] = torch::empty({2}, torch::kUInt7);
  Checkpoint bad;
  bad.put("model", [&](torch::serialize::OutputArchive& a) {
    for (const auto& [name, t] : saved) a.write(name, t);
  });
  auto target = Net();
  const auto before = snapshot(*target);
  EXPECT_THROWS_WITH(bad.restore_module("model", *target),
                     "parameter 'out.bias' has dtype UInt7 in the checkpoint, which cannot be "
                     "converted to the module's Float");
  EXPECT_THROWS_WITH(bad.restore_module("model", *target), "<in memory>");
  EXPECT_TRUE(same_state(snapshot(*target), before));  // body.* fitted, and was not copied
}

// ---------------------------------------------------------------- RNG

TEST_F(CheckpointTest, RestoresTheCpuRandomStream) {
  torch::randn({5});
  Checkpoint ckpt;
  ckpt.put_rng_state();
  ckpt.save((tmp_.path() / "c").string());
  const auto expected = torch::randn({10});
  const auto expected_int = torch::randint(0, 1000, {10});
  torch::randn({100});  // the run goes on

  Checkpoint::load((tmp_.path() / "c").string()).restore_rng_state();
  EXPECT_TRUE(tensors_equal(torch::randn({10}), expected));
  EXPECT_TRUE(tensors_equal(torch::randint(0, 1000, {10}), expected_int));

  ckpt.restore_rng_state();  // the in-memory copy too
  EXPECT_TRUE(tensors_equal(torch::randn({10}), expected));
  EXPECT_FALSE(tensors_equal(torch::randn({10}), expected));  // and it moves on from there
}

TEST_F(CheckpointTest, RestoresTheCudaRandomStream) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  torch::randn({5}, torch::kCUDA);
  Checkpoint ckpt;
  ckpt.put_rng_state();
  ckpt.save((tmp_.path() / "c").string());
  const auto expected = torch::randn({10}, torch::kCUDA);
  torch::randn({100}, torch::kCUDA);
  Checkpoint::load((tmp_.path() / "c").string()).restore_rng_state();
  EXPECT_TRUE(tensors_equal(torch::randn({10}, torch::kCUDA), expected));
}

TEST_F(CheckpointTest, RestoreRngStateWithoutOneThrows) {
  Checkpoint ckpt;
  EXPECT_THROWS_WITH(ckpt.restore_rng_state(), "holds no RNG state");
}

// ---------------------------------------------------------------- optimizer resumption

torch::Tensor loss_on(Net& net, const torch::Tensor& x, const torch::Tensor& y) {
  return torch::mse_loss(net->forward(x), y);
}

TEST_F(CheckpointTest, ResumedAdamMatchesUninterruptedRunBitForBit) {
  const auto x = torch::randn({16, 4});
  const auto y = torch::randn({16, 2});
  auto make_net = [] {
    torch::manual_seed(42);
    return Net();
  };
  const auto opts = torch::optim::AdamOptions(1e-2).weight_decay(1e-3);
  auto train = [&](Net& net, torch::optim::Adam& opt, int steps) {
    for (int i = 0; i < steps; ++i) {
      opt.zero_grad();
      loss_on(net, x, y).backward();
      opt.step();
    }
  };

  auto straight = make_net();
  torch::optim::Adam straight_opt(straight->parameters(), opts);
  train(straight, straight_opt, 6);

  auto first = make_net();
  torch::optim::Adam first_opt(first->parameters(), opts);
  train(first, first_opt, 3);
  Checkpoint ckpt;
  ckpt.put_module("model", *first);
  ckpt.put_optimizer("optimizer", first_opt);
  const auto path = (tmp_.path() / wick::checkpoint_name(3)).string();
  ckpt.save(path);

  torch::manual_seed(7);
  auto resumed = Net();  // a fresh model and optimizer, as after a restart
  torch::optim::Adam resumed_opt(resumed->parameters(), opts);
  auto back = Checkpoint::load(path);
  back.restore_module("model", *resumed);
  back.restore_optimizer("optimizer", resumed_opt);
  train(resumed, resumed_opt, 3);
  EXPECT_TRUE(same_state(snapshot(*resumed), snapshot(*straight)));

  // Without the optimizer state (Adam's moments) the run would differ.
  torch::manual_seed(7);
  auto no_opt_state = Net();
  torch::optim::Adam fresh_opt(no_opt_state->parameters(), opts);
  back.restore_module("model", *no_opt_state);
  train(no_opt_state, fresh_opt, 3);
  EXPECT_FALSE(same_state(snapshot(*no_opt_state), snapshot(*straight)));
}

// ---------------------------------------------------------------- atomic writes

TEST_F(CheckpointTest, SaveReplacesAnExistingCheckpoint) {
  const auto path = (tmp_.path() / "last").string();
  auto a = trained_net();
  Checkpoint ca;
  ca.put_module("model", *a);
  ca.set_train_state({1, 0, 1, 16});
  ca.save(path);
  auto b = trained_net();
  Checkpoint cb;
  cb.put_module("model", *b);
  cb.set_train_state({2, 0, 2, 32});
  cb.save(path);

  auto back = Checkpoint::load(path);
  EXPECT_EQ(back.train_state().step, 2);
  auto m = Net();
  back.restore_module("model", *m);
  EXPECT_TRUE(same_state(snapshot(*m), snapshot(*b)));
  EXPECT_EQ(entries(tmp_.path()), std::set<std::string>{"last"});  // old copy and temp dir gone
}

TEST_F(CheckpointTest, RefusesToReplaceADirectoryThatIsNotACheckpoint) {
  const auto dir = tmp_.path() / "runs";
  fs::create_directories(dir);
  spit(dir / "notes.txt", "keep me");
  Checkpoint ckpt;
  EXPECT_THROWS_WITH(ckpt.save(dir.string()), "refusing to replace");
  EXPECT_EQ(slurp(dir / "notes.txt"), "keep me");
  EXPECT_EQ(entries(tmp_.path()), std::set<std::string>{"runs"});
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

 private:
  rlimit old_{};
  void (*old_handler_)(int) = nullptr;
};

TEST_F(CheckpointTest, FailedWriteLeavesThePreviousCheckpointIntact) {
  const auto path = (tmp_.path() / "step-00000100").string();
  auto small = trained_net();
  Checkpoint first;
  first.put_module("model", *small);
  first.set_train_state({100, 0, 0, 0});
  first.save(path);

  auto big = Net(/*hidden=*/512);  // ~ 20 KB of float32 in model.pt
  Checkpoint second;
  second.put_module("model", *big);
  second.set_train_state({200, 0, 0, 0});
  {
    FileSizeLimit limit(8 * 1024);
    EXPECT_THROWS_WITH(second.save(path), "File too large");
    EXPECT_THROWS_WITH(second.save(path), "cannot save '" + path + "'");
    EXPECT_THROWS_WITH(second.save(path), "model.pt");
  }
  EXPECT_EQ(entries(tmp_.path()), std::set<std::string>{"step-00000100"});  // temp dirs removed
  auto back = Checkpoint::load(path);
  EXPECT_EQ(back.train_state().step, 100);
  auto m = Net();
  back.restore_module("model", *m);
  EXPECT_TRUE(same_state(snapshot(*m), snapshot(*small)));

  // A new path fails the same way and leaves nothing behind.
  {
    FileSizeLimit limit(8 * 1024);
    EXPECT_THROWS_WITH(second.save((tmp_.path() / "step-00000200").string()), "File too large");
  }
  EXPECT_EQ(entries(tmp_.path()), std::set<std::string>{"step-00000100"});
}

TEST_F(CheckpointTest, UnwritableParentIsNamed) {
  // A parent that is a regular file: no directory can be made there, even by root.
  const auto file = tmp_.path() / "plain-file";
  spit(file, "x");
  Checkpoint ckpt;
  ckpt.put_module("model", *Net());
  EXPECT_THROWS_WITH(ckpt.save((file / "step-00000001").string()), file.string());
  EXPECT_THROWS_WITH(ckpt.save((file / "sub" / "step-00000001").string()),
                     "cannot create directory");
  EXPECT_EQ(slurp(file), "x");
}

// ---------------------------------------------------------------- directories

std::string host_for_temp_names() {
  char buf[256] = {0};
  ::gethostname(buf, sizeof(buf) - 1);
  std::string h(buf);
  for (char& c : h) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-') c = '_';
  }
  return h.empty() ? "unknown" : h;
}

TEST(CheckpointNameTest, PadsStepToEightDigits) {
  EXPECT_EQ(wick::checkpoint_name(0), "step-00000000");
  EXPECT_EQ(wick::checkpoint_name(100), "step-00000100");
  EXPECT_EQ(wick::checkpoint_name(123456789), "step-123456789");
  EXPECT_THROWS_WITH(wick::checkpoint_name(-1), "step must be >= 0, got -1");
}

TEST_F(CheckpointTest, ListsLatestAndPrunes) {
  const auto dir = tmp_.path() / "checkpoints";
  EXPECT_TRUE(wick::list_checkpoints(dir.string()).empty());  // not there yet
  EXPECT_EQ(wick::latest_checkpoint(dir.string()), std::nullopt);
  wick::prune_checkpoints(dir.string(), 1);  // nothing to do

  for (int64_t step : {20, 3, 100, 5}) {
    Checkpoint c;
    c.set_train_state({step, 0, 0, 0});
    c.save((dir / wick::checkpoint_name(step)).string());
  }
  const std::string host = host_for_temp_names();
  // A leftover of a writer that died (no process has pid 2^30: pid_max <= 2^22).
  const auto stale = dir / (".step-00000200.tmp-" + host + "-1073741824-0123456789abcdef");
  // A save in progress in this process, and one by another machine.
  const auto live =
      dir / (".step-00000300.tmp-" + host + "-" + std::to_string(::getpid()) + "-fedcba9876543210");
  const auto remote = dir / ".step-00000400.tmp-elsewhere-1073741824-0011223344556677";
  for (const auto& d : {stale, live, remote}) {
    fs::create_directories(d);
    spit(d / "meta.json", "{}");
  }
  fs::create_directories(dir / "step-00000500");  // incomplete: no meta.json
  spit(dir / "step-00000600", "a file");
  fs::create_directories(dir / "notes");
  fs::create_directories(dir / "step-7");  // not checkpoint_name's spelling
  spit(dir / "step-7" / "meta.json", "{}");

  auto names = [&] {
    std::vector<std::string> n;
    for (const auto& p : wick::list_checkpoints(dir.string())) n.push_back(fs::path(p).filename());
    return n;
  };
  EXPECT_EQ(names(), (std::vector<std::string>{"step-00000003", "step-00000005", "step-00000020",
                                               "step-00000100"}));
  EXPECT_EQ(wick::list_checkpoints(dir.string()).front(), (dir / "step-00000003").string());
  EXPECT_EQ(wick::latest_checkpoint(dir.string()), (dir / "step-00000100").string());

  wick::prune_checkpoints(dir.string(), 0);  // keeps every checkpoint, drops stale temp dirs
  EXPECT_EQ(names().size(), 4u);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(remote));

  wick::prune_checkpoints(dir.string(), 2, {(dir / "step-00000003").string()});
  EXPECT_EQ(names(), (std::vector<std::string>{"step-00000003", "step-00000020", "step-00000100"}));
  wick::prune_checkpoints(dir.string(), 1, {"step-00000020"});  // keep given by name
  EXPECT_EQ(names(), (std::vector<std::string>{"step-00000020", "step-00000100"}));
  EXPECT_EQ(Checkpoint::load(*wick::latest_checkpoint(dir.string())).train_state().step, 100);

  // Everything that is not a checkpoint or a stale temp dir is left alone.
  EXPECT_EQ(entries(dir), (std::set<std::string>{live.filename(), remote.filename(),
                                                 "step-00000020", "step-00000100", "step-00000500",
                                                 "step-00000600", "notes", "step-7"}));
}

}  // namespace
