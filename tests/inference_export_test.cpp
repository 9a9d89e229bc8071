// InferenceSession::load: models exported from Python (TorchScript files and
// AOTInductor packages) served alone and through the DynamicBatcher.
//
// The models are exported at test time by tests/py/export_models.py with the
// venv's torch, once per build tree: the files go to
// <build>/tests/exported_models/<hash of the script>/, and every test process
// (ctest runs each case in its own) reuses them. AOTInductor compiles C++ at
// export, about half a minute of CPU; a lock file keeps concurrent test
// processes from exporting twice.

#include <wick/batcher.h>
#include <wick/inference.h>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <atomic>
#include <fstream>
#include <future>
#include <mutex>
#include <sstream>
#include <thread>

#include "python_reference.h"
#include "support.h"

using wick::InferenceSession;
using wick::InferenceSessionOptions;
using wick::ModelFormat;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// FNV-1a, stable across runs and compilers (std::hash is not promised to be).
std::string content_hash(const std::string& text) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ULL;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// The folder of exported models, exported on first use in this build tree.
const std::string& exported_dir() {
  static const std::string dir = [] {
    const std::string script = wick::testing::python_script_dir() + "/export_models.py";
    const std::string root = std::string(WICK_TEST_BINARY_DIR) + "/exported_models";
    ::mkdir(root.c_str(), 0755);
    const std::string out =
        root + "/" + content_hash(read_file(script) + wick::testing::python_executable());
    if (exists(out + "/reference.json")) return out;
    const std::string lock_path = root + "/lock";
    const int fd = ::open(lock_path.c_str(), O_CREAT | O_RDWR, 0644);
    TORCH_CHECK(fd >= 0, "cannot open ", lock_path);
    ::flock(fd, LOCK_EX);  // another test process may be exporting right now
    if (!exists(out + "/reference.json")) {
      const std::string tmp = out + ".tmp" + std::to_string(::getpid());
      const std::string err = tmp + ".stderr";
      const std::string cmd = wick::testing::shell_quote(wick::testing::python_executable()) + " " +
                              wick::testing::shell_quote(script) + " " +
                              wick::testing::shell_quote(tmp) + " 2> " +
                              wick::testing::shell_quote(err);
      const int status = std::system(cmd.c_str());
      if (status != 0) {
        ::close(fd);
        throw std::runtime_error("`" + cmd + "` failed (status " + std::to_string(status) +
                                 "): " + read_file(err));
      }
      TORCH_CHECK(::rename(tmp.c_str(), out.c_str()) == 0, "cannot rename ", tmp, " to ", out);
      ::unlink(err.c_str());
    }
    ::close(fd);
    return out;
  }();
  return dir;
}

std::string model_file(const std::string& name) { return exported_dir() + "/" + name; }

struct Reference {
  torch::Tensor x, y;  // Python's input [5, 1, 28, 28] and its eager output [5, 10]
};

Reference reference() {
  auto j = nlohmann::json::parse(read_file(model_file("reference.json")));
  Reference r;
  r.x = wick::testing::from_json(j["x"], torch::empty(j["x_shape"].get<std::vector<int64_t>>()));
  r.y = wick::testing::from_json(j["y"], torch::empty(j["y_shape"].get<std::vector<int64_t>>()));
  return r;
}

const std::vector<std::string> kModels = {"net_script.pt", "net_trace.pt", "net.pt2"};

}  // namespace

class InferenceSessionExportTest : public wick::testing::SeededTest {};

TEST_F(InferenceSessionExportTest, TorchScriptAnswersAsPythonEager) {
  const auto ref = reference();
  for (const char* name : {"net_script.pt", "net_trace.pt"}) {
    SCOPED_TRACE(name);
    auto session = InferenceSession::load(model_file(name));
    EXPECT_EQ(session.format(), ModelFormat::kTorchScript);
    EXPECT_EQ(session.model_path(), model_file(name));
    EXPECT_EQ(session.module(), nullptr);
    EXPECT_TRUE(session.device().is_cpu());
    auto y = session.run(ref.x);
    EXPECT_TRUE(y.is_inference());
    // The same ATen kernels as Python's eager run; the tolerance covers a
    // cached export made with another thread count than this process's.
    WICK_EXPECT_CLOSE(y, ref.y, 1e-5, 1e-6);
  }
}

TEST_F(InferenceSessionExportTest, AOTInductorPackageAnswersAsPythonEager) {
  const auto ref = reference();
  auto session = InferenceSession::load(model_file("net.pt2"));
  EXPECT_EQ(session.format(), ModelFormat::kAOTInductor);
  EXPECT_EQ(wick::to_string(session.format()), "aotinductor");
  EXPECT_TRUE(session.device().is_cpu());
  // Inductor's generated kernels (fused BatchNorm, ReLU and pooling) round
  // differently from eager's separate ops: close, not equal.
  WICK_EXPECT_CLOSE(session.run(ref.x), ref.y, 1e-4, 1e-5);
  // The batch dimension was exported dynamic: one image and many both run.
  EXPECT_EQ(session.run(ref.x.narrow(0, 0, 1)).sizes(), (std::vector<int64_t>{1, 10}));
  EXPECT_EQ(session.run(torch::randn({37, 1, 28, 28})).sizes(), (std::vector<int64_t>{37, 10}));
  // A non-contiguous input is made contiguous first (the compiled code assumes its strides).
  auto wide = torch::randn({5, 1, 28, 56});
  auto strided = wide.narrow(3, 0, 28);
  ASSERT_FALSE(strided.is_contiguous());
  EXPECT_TRUE(
      wick::testing::tensors_equal(session.run(strided), session.run(strided.contiguous())));
}

// Every answer the batcher gives equals the model run on that image alone.
// Batches of other sizes may take other GEMM/convolution blockings (one image
// can go through a matrix-vector path), so "alone" is compared within float
// rounding (1e-5 relative); and each batch the batcher ran is run again by
// hand and must give its rows bit for bit, which catches any mixing between
// concurrent runs or a wrong row split.
TEST_F(InferenceSessionExportTest, ServedAnswersEqualTheModelRunAlone) {
  for (const auto& name : kModels) {
    SCOPED_TRACE(name);
    auto session = InferenceSession::load(
        model_file(name),
        InferenceSessionOptions().aoti_runners(2).warmup_shape({8, 1, 28, 28}).num_threads(1));
    std::mutex mu;
    std::vector<std::vector<torch::Tensor>> batches;  // the requests of each batch, in order
    std::vector<std::vector<torch::Tensor>> answers;  // and their answers
    auto inner = session.batch_fn();
    wick::TensorBatcher batcher(
        [&](std::vector<torch::Tensor> requests) {
          auto inputs = requests;
          auto out = inner(std::move(requests));
          std::lock_guard<std::mutex> lock(mu);
          batches.push_back(std::move(inputs));
          answers.push_back(out);
          return out;
        },
        wick::BatcherOptions()
            .max_batch_size(16)
            .max_delay(std::chrono::microseconds(2000))
            .num_workers(2));
    constexpr int kClients = 4, kPerClient = 24;
    auto requests = torch::randn({kClients * kPerClient, 1, 28, 28});
    std::vector<torch::Tensor> served(kClients * kPerClient);
    std::vector<std::thread> clients;
    for (int c = 0; c < kClients; ++c) {
      clients.emplace_back([&, c] {
        std::vector<std::pair<int, std::future<torch::Tensor>>> pending;
        for (int i = c; i < kClients * kPerClient; i += kClients) {
          pending.emplace_back(i, batcher.submit(requests[i]));
          if (pending.size() == 3) {  // a few in flight per client, so batches form
            for (auto& [k, f] : pending) served[k] = f.get();
            pending.clear();
          }
        }
        for (auto& [k, f] : pending) served[k] = f.get();
      });
    }
    for (auto& t : clients) t.join();
    batcher.shutdown();

    int64_t largest = 0;
    for (size_t b = 0; b < batches.size(); ++b) {
      largest = std::max<int64_t>(largest, static_cast<int64_t>(batches[b].size()));
      auto again = session.run(torch::stack(batches[b]));
      for (size_t i = 0; i < batches[b].size(); ++i) {
        EXPECT_TRUE(wick::testing::tensors_equal(answers[b][i], again[static_cast<int64_t>(i)]))
            << "batch " << b << " row " << i;
      }
    }
    EXPECT_GT(largest, 1) << "the batcher formed no batch of two or more";
    // Measured on the build machines (AMD EPYC, AVX-512): nearly every answer
    // differs from its image run alone in the last bits, by < 1e-6 absolute,
    // for all three files: the batch size changes the kernels' blocking.
    int not_bitwise = 0;
    double worst = 0;
    for (int i = 0; i < kClients * kPerClient; ++i) {
      auto alone = session.run(requests[i].unsqueeze(0))[0];
      not_bitwise += !torch::equal(served[i], alone);
      worst = std::max(worst, (served[i] - alone).abs().max().item<double>());
      WICK_EXPECT_CLOSE(served[i], alone, 1e-5, 1e-6);
    }
    RecordProperty(name + "_answers_not_bitwise_equal_to_alone", not_bitwise);
    RecordProperty(name + "_max_abs_diff_to_alone", c10::str(worst));
  }
}

TEST_F(InferenceSessionExportTest, RunFromManyThreadsAtOnceMatchesOneThread) {
  for (const auto& name : kModels) {
    for (int64_t runners : {1, 3}) {
      SCOPED_TRACE(name + " runners " + std::to_string(runners));
      auto session =
          InferenceSession::load(model_file(name), InferenceSessionOptions().aoti_runners(runners));
      constexpr int kThreads = 6, kCalls = 15;
      std::vector<torch::Tensor> inputs, expected;
      for (int t = 0; t < kThreads; ++t) {
        inputs.push_back(torch::randn({4, 1, 28, 28}));
        expected.push_back(session.run(inputs.back()));
      }
      EXPECT_EQ(
          wick::testing::concurrent_mismatches(
              [&](const torch::Tensor& x) { return session.run(x); }, inputs, expected, kCalls),
          0);
    }
  }
}

TEST_F(InferenceSessionExportTest, WarmsUpAndSetsTheThreadCount) {
  const int before = torch::get_num_threads();
  for (const auto& name : kModels) {
    SCOPED_TRACE(name);
    auto session = InferenceSession::load(
        model_file(name),
        InferenceSessionOptions().num_threads(2).warmup_shape({4, 1, 28, 28}).warmup_iterations(2));
    EXPECT_EQ(torch::get_num_threads(), 2);
    torch::set_num_threads(before);
  }
  // A warm-up input the model cannot take fails in the constructor, not at the first request.
  EXPECT_THROWS_WITH(InferenceSession::load(model_file("net_script.pt"),
                                            InferenceSessionOptions().warmup_shape({4, 3, 28, 28})),
                     "expected input[4, 3, 28, 28] to have 1 channels");
}

TEST_F(InferenceSessionExportTest, ErrorsNameTheFileAndWhatIsWrong) {
  wick::testing::TempDir dir;
  const std::string missing = dir.str() + "/no-such-model.pt2";
  EXPECT_THROWS_WITH(InferenceSession::load(missing),
                     "InferenceSession: cannot load model '" + missing + "': no such file");
  EXPECT_THROWS_WITH(InferenceSession::load(dir.str()), "': not a regular file");

  const std::string text = dir.str() + "/model.pt";
  std::ofstream(text) << "not a model";
  EXPECT_THROWS_WITH(InferenceSession::load(text),
                     "InferenceSession: '" + text +
                         "' is neither a TorchScript file nor an AOTInductor package (.pt2): it "
                         "is not a PyTorch zip archive");
  EXPECT_THROWS_WITH(InferenceSession::load(model_file("state_dict.pt")),
                     "it is a torch.save archive (tensors or a state_dict, no code)");
  EXPECT_THROWS_WITH(InferenceSession::load(model_file("exported_program.pt2")),
                     "it is a torch.export archive without AOTInductor code");
  EXPECT_THROWS_WITH(
      InferenceSession::load(model_file("tuple_script.pt")),
      "InferenceSession: TorchScript model '" + model_file("tuple_script.pt") +
          "' returns Tuple[Tensor, Tensor] from forward; a session serves models that "
          "return one Tensor");
  // An AOTInductor package says how many outputs it has only when it runs: at
  // the warm-up when there is one, else at the first request.
  EXPECT_THROWS_WITH(InferenceSession::load(model_file("tuple.pt2"),
                                            InferenceSessionOptions().warmup_shape({2, 1, 28, 28})),
                     "InferenceSession: AOTInductor package '" + model_file("tuple.pt2") +
                         "' returned 2 tensors; a session serves models that return one Tensor");
  auto tuple_session = InferenceSession::load(model_file("tuple.pt2"));
  EXPECT_THROWS_WITH(tuple_session.run(torch::zeros({1, 1, 28, 28})), "returned 2 tensors");
  EXPECT_THROWS_WITH(InferenceSession::load(model_file("two_inputs_script.pt")),
                     "' has forward(__torch__.TwoInputs self, Tensor x, Tensor y) -> Tensor; a "
                     "session serves models of one input tensor");

  // Wrong device: the package is compiled for the CPU; CUDA may be absent.
  EXPECT_THROWS_WITH(
      InferenceSession::load(model_file("net.pt2"), InferenceSessionOptions().device(torch::kCUDA)),
      "' was compiled for cpu and runs only there; device cuda");
  if (!wick::testing::cuda_available()) {
    EXPECT_THROWS_WITH(InferenceSession::load(model_file("net_script.pt"),
                                              InferenceSessionOptions().device(torch::kCUDA)),
                       "InferenceSession: device cuda requested for '" +
                           model_file("net_script.pt") + "', but CUDA is not available");
  }

  EXPECT_THROWS_WITH(
      InferenceSession::load(model_file("net.pt2"), InferenceSessionOptions().aoti_runners(0)),
      "InferenceSession: aoti_runners must be >= 1, got 0");
  EXPECT_THROWS_WITH(
      InferenceSession::load(model_file("net.pt2"),
                             InferenceSessionOptions().transform([](torch::nn::Module&) {})),
      "InferenceSession: transform applies to torch::nn modules");
  EXPECT_THROWS_WITH(
      InferenceSession::load(model_file("net.pt2"), InferenceSessionOptions().section("ema")),
      "section applies to wick checkpoints");
}

// docs/interop.md, "Serving models exported from Python": this code is shown there.
TEST_F(InferenceSessionExportTest, DocExample) {
  const std::string path = model_file("net.pt2");
  const auto images = torch::randn({64, 1, 28, 28});

  // --- begin doc example ---
  auto session = wick::InferenceSession::load(
      path, wick::InferenceSessionOptions()
                .num_threads(1)
                .aoti_runners(2)                  // as many as the batcher's workers
                .warmup_shape({32, 1, 28, 28}));  // TorchScript or .pt2, told by content
  wick::TensorBatcher batcher(session.batch_fn(), wick::BatcherOptions()
                                                      .max_batch_size(32)
                                                      .max_delay(std::chrono::microseconds(500))
                                                      .num_workers(2));
  std::vector<std::thread> clients;
  std::vector<torch::Tensor> answers(64);
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      for (int i = c; i < 64; i += 4) answers[i] = batcher.submit(images[i]).get();  // [10] each
    });
  }
  for (auto& t : clients) t.join();
  // --- end doc example ---

  WICK_EXPECT_CLOSE(torch::stack(answers), session.run(images), 1e-5, 1e-6);
  EXPECT_EQ(batcher.stats().requests_succeeded, 64);
}

TEST_F(InferenceSessionExportTest, RunsOnCudaWithInputsFromTheCpu) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  const auto ref = reference();
  auto script = InferenceSession::load(
      model_file("net_script.pt"), InferenceSessionOptions().device(torch::Device(torch::kCUDA)));
  EXPECT_TRUE(script.device().is_cuda());
  auto y = script.run(ref.x);
  EXPECT_TRUE(y.is_cuda());
  WICK_EXPECT_CLOSE(y.cpu(), ref.y, 5e-3, 5e-3);  // cuDNN convolutions in TF32 by default

  // net_cuda.pt2 exists where the export ran with a GPU; its device comes from the package.
  ASSERT_TRUE(exists(model_file("net_cuda.pt2")))
      << "export_models.py ran without a GPU; remove " << exported_dir() << " and rerun";
  auto aoti = InferenceSession::load(model_file("net_cuda.pt2"));
  EXPECT_EQ(aoti.device(), torch::Device(torch::kCUDA, 0));
  WICK_EXPECT_CLOSE(aoti.run(ref.x).cpu(), ref.y, 5e-3, 5e-3);
  EXPECT_THROWS_WITH(InferenceSession::load(model_file("net_cuda.pt2"),
                                            InferenceSessionOptions().device(torch::kCPU)),
                     "' was compiled for cuda and runs only there; device cpu");
}
