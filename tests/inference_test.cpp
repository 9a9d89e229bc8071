#include <wick/batcher.h>
#include <wick/checkpoint.h>
#include <wick/data.h>
#include <wick/inference.h>
#include <wick/quantizer.h>
#include <wick/trainer.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "support.h"

using namespace std::chrono_literals;
using wick::InferenceSession;
using wick::InferenceSessionOptions;

namespace {

// Dropout and BatchNorm make train and eval mode give different outputs, so a
// session that forgot eval() fails the comparisons below.
torch::nn::Sequential make_net() {
  namespace nn = torch::nn;
  return nn::Sequential(nn::Linear(6, 16), nn::BatchNorm1d(16), nn::ReLU(), nn::Dropout(0.5),
                        nn::Linear(16, 3));
}

// A few Trainer steps on random data so BatchNorm's running statistics and the
// weights move away from their initial values; the Trainer checkpoints on fit end.
std::string train_and_checkpoint(torch::nn::Sequential net, const std::string& dir) {
  auto x = torch::randn({64, 6});
  auto y = torch::randint(0, 3, {64}, torch::kLong);
  wick::TensorBatchSource source(x, y, wick::TensorBatchSourceOptions(16).shuffle(false));
  wick::SupervisedTask task(net);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  wick::Trainer trainer(
      wick::TrainerOptions().max_epochs(1).checkpoint_dir(dir).log_every_n_steps(1000).seed(3));
  trainer.fit(task, sgd, source);
  auto latest = wick::latest_checkpoint(dir);
  TORCH_CHECK(latest.has_value(), "the Trainer wrote no checkpoint under ", dir);
  return *latest;
}

// ---- the stand-in for a quantizer: a linear layer whose weight is int8 with
// one float scale per output row, and a transform that swaps it in ----

struct Int8LinearImpl : torch::nn::Module {
  Int8LinearImpl(int64_t in, int64_t out) {
    weight_q = register_buffer("weight_q", torch::zeros({out, in}, torch::kInt8));
    scale = register_buffer("scale", torch::ones({out}));
    bias = register_buffer("bias", torch::zeros({out}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::addmm(bias, x, (weight_q.to(torch::kFloat) * scale.unsqueeze(1)).t());
  }
  torch::Tensor weight_q, scale, bias;
};
TORCH_MODULE(Int8Linear);

struct TinyNetImpl : torch::nn::Module {
  TinyNetImpl() : fc(torch::nn::Linear(4, 3)) { register_module("fc", fc.ptr()); }
  torch::Tensor forward(const torch::Tensor& x) { return fc.forward(torch::relu(x)); }
  torch::nn::AnyModule fc;
};
TORCH_MODULE(TinyNet);

// Replaces fc (Linear: weight [3, 4], bias [3]) by an Int8Linear quantized from
// it (weight_q int8 [3, 4], scale [3], bias [3]): another set of names.
void quantize_tiny(torch::nn::Module& module) {
  auto& net = dynamic_cast<TinyNetImpl&>(module);
  auto lin = net.fc.get<torch::nn::Linear>();
  Int8Linear q(4, 3);
  torch::NoGradGuard no_grad;
  auto scale = lin->weight.abs().amax(1) / 127.0;
  q->weight_q.copy_((lin->weight / scale.unsqueeze(1)).round().to(torch::kInt8));
  q->scale.copy_(scale);
  q->bias.copy_(lin->bias);
  net.replace_module("fc", q.ptr());
  net.fc = torch::nn::AnyModule(q);
}

// Counts forward calls.
struct CountingImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) {
    ++calls;
    return x * 2;
  }
  std::atomic<int> calls{0};
};
TORCH_MODULE(Counting);

}  // namespace

class InferenceSessionTest : public wick::testing::SeededTest {};

TEST_F(InferenceSessionTest, LoadsTrainerCheckpointAndMatchesTheModelRunByHandInEvalMode) {
  wick::testing::TempDir dir;
  auto trained = make_net();
  const std::string ckpt = train_and_checkpoint(trained, dir.str() + "/checkpoints");

  torch::manual_seed(123);  // other initial weights: only the checkpoint can make them equal
  InferenceSession session(make_net(), ckpt);
  EXPECT_EQ(session.checkpoint_path(), ckpt);
  EXPECT_FALSE(session.module()->is_training());

  auto x = torch::randn({10, 6});
  torch::Tensor by_hand;
  {
    torch::NoGradGuard no_grad;
    trained->eval();
    by_hand = trained->forward(x);
  }
  auto y = session.run(x);
  EXPECT_TRUE(wick::testing::tensors_equal(y, by_hand));
  EXPECT_TRUE(y.is_inference());
  EXPECT_FALSE(y.requires_grad());
  // The same weights in train mode answer differently: eval mode matters here.
  trained->train();
  EXPECT_FALSE(torch::allclose(trained->forward(x).detach(), by_hand));
}

TEST_F(InferenceSessionTest, MissingCheckpointIsAnErrorNamingThePath) {
  wick::testing::TempDir dir;
  const std::string path = dir.str() + "/no-such-checkpoint";
  EXPECT_THROWS_WITH(InferenceSession(make_net(), path),
                     "InferenceSession: cannot load checkpoint '" + path);
  EXPECT_THROWS_WITH(InferenceSession(make_net(), path), "no such directory");
}

TEST_F(InferenceSessionTest, StateThatDoesNotFitTheModelNamesTheKey) {
  wick::testing::TempDir dir;
  const std::string ckpt = train_and_checkpoint(make_net(), dir.str() + "/checkpoints");
  namespace nn = torch::nn;
  auto wider = nn::Sequential(nn::Linear(6, 17), nn::BatchNorm1d(17), nn::ReLU(), nn::Dropout(0.5),
                              nn::Linear(17, 3));
  EXPECT_THROWS_WITH(InferenceSession(wider, ckpt),
                     "'0.weight' has shape [16, 6] in the checkpoint but [17, 6]");
  auto shorter = nn::Sequential(nn::Linear(6, 16), nn::BatchNorm1d(16));
  EXPECT_THROWS_WITH(InferenceSession(shorter, ckpt), "the checkpoint has '4.weight'");
  EXPECT_THROWS_WITH(
      InferenceSession(make_net(), ckpt, InferenceSessionOptions().section("weights")),
      "has no section 'weights'");
}

TEST_F(InferenceSessionTest, TransformRunsBeforeLoadingSoAQuantizedCheckpointFits) {
  wick::testing::TempDir dir;
  // The "quantized checkpoint": a TinyNet with fc swapped for its int8 form.
  TinyNet saved;
  quantize_tiny(*saved);
  wick::Checkpoint out;
  out.put_module("model", *saved);
  const std::string ckpt = dir.str() + "/int8";
  out.save(ckpt);

  torch::manual_seed(77);
  // Without the transform the names do not match, and the error says which.
  EXPECT_THROWS_WITH(InferenceSession(TinyNet(), ckpt), "'fc.weight' (shape [3, 4]) is missing");
  EXPECT_THROWS_WITH(InferenceSession(TinyNet(), ckpt), "the checkpoint has 'fc.weight_q'");

  TinyNet fresh;  // other weights than `saved`: its own quantization differs
  InferenceSession session(fresh, ckpt, InferenceSessionOptions().transform(quantize_tiny));
  auto* loaded = session.module()->named_buffers()["fc.weight_q"].data_ptr<int8_t>();
  ASSERT_NE(loaded, nullptr);
  EXPECT_TRUE(wick::testing::tensors_equal(session.module()->named_buffers()["fc.weight_q"],
                                           saved->named_buffers()["fc.weight_q"]));

  // Reference in float64 from the saved int8 weights and scales.
  auto x = torch::randn({5, 4});
  auto wq = saved->named_buffers()["fc.weight_q"].to(torch::kFloat64);
  auto s = saved->named_buffers()["fc.scale"].to(torch::kFloat64);
  auto b = saved->named_buffers()["fc.bias"].to(torch::kFloat64);
  auto expected = torch::relu(x.to(torch::kFloat64)).matmul((wq * s.unsqueeze(1)).t()) + b;
  WICK_EXPECT_CLOSE(session.run(x), expected, 1e-5, 1e-6);
}

TEST_F(InferenceSessionTest, RunFromManyThreadsAtOnceMatchesOneThread) {
  auto net = make_net();
  InferenceSession session(net);
  constexpr int kThreads = 8;
  constexpr int kCalls = 50;
  std::vector<torch::Tensor> inputs, expected;
  {
    torch::NoGradGuard no_grad;
    net->eval();
    for (int t = 0; t < kThreads; ++t) {
      inputs.push_back(torch::randn({4, 6}));
      expected.push_back(net->forward(inputs.back()));
    }
  }
  EXPECT_EQ(wick::testing::concurrent_mismatches(
                [&](const torch::Tensor& x) { return session.run(x); }, inputs, expected, kCalls),
            0);
}

// Issue 20: an int8 model served through a batcher answers a request with the
// same bits whatever its batch mates and batch size (per-row activations): a
// probe served again and again among other clients' requests equals the probe
// run alone and the probe within one offline batch of 301.
TEST_F(InferenceSessionTest, ServedInt8AnswersDoNotDependOnBatchMates) {
  torch::manual_seed(3);
  auto net = torch::nn::Sequential(torch::nn::Linear(64, 128), torch::nn::ReLU(),
                                   torch::nn::Linear(128, 10));
  InferenceSession session(net, InferenceSessionOptions().transform(
                                    [](torch::nn::Module& m) { wick::quantize_dynamic(m); }));
  const auto probe = torch::randn({64});
  const auto mates = torch::randn({300, 64}) * 10;  // ten times the probe's range
  const auto alone = session.run(probe.unsqueeze(0))[0];
  EXPECT_TRUE(
      wick::testing::tensors_equal(session.run(torch::cat({probe.unsqueeze(0), mates}))[0], alone));

  wick::TensorBatcher batcher(
      session.batch_fn(), wick::BatcherOptions().max_batch_size(16).max_delay(2ms).num_workers(2));
  constexpr int kClients = 6, kRounds = 30;
  std::vector<std::vector<torch::Tensor>> probes(kClients);
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      std::vector<std::future<torch::Tensor>> pending;
      for (int r = 0; r < kRounds; ++r) {
        for (int k = 0; k < 1 + (r + c) % 4; ++k)
          pending.push_back(batcher.submit(mates[(c * 50 + r + k) % 300]));
        auto p = batcher.submit(probe);
        for (auto& f : pending) f.get();
        pending.clear();
        probes[static_cast<size_t>(c)].push_back(p.get());
      }
    });
  }
  for (auto& t : clients) t.join();
  batcher.shutdown();
  int64_t differ = 0, served = 0;
  for (const auto& per_client : probes) {
    for (const auto& y : per_client) {
      ++served;
      differ += !torch::equal(y, alone);
    }
  }
  EXPECT_EQ(served, kClients * kRounds);
  EXPECT_EQ(differ, 0);
  int64_t sizes = 0;  // the probes did meet batches of several sizes
  for (int64_t n : batcher.stats().batch_size_histogram) sizes += n > 0;
  EXPECT_GE(sizes, 3);
}

TEST_F(InferenceSessionTest, WarmsUpAndSetsTheThreadCount) {
  const int before = torch::get_num_threads();
  Counting counting;
  InferenceSession session(
      counting, InferenceSessionOptions().warmup_shape({8, 3}).warmup_iterations(4).num_threads(2));
  EXPECT_EQ(counting->calls.load(), 4);
  EXPECT_EQ(torch::get_num_threads(), 2);
  torch::set_num_threads(before);
  Counting cold;
  InferenceSession no_warmup(cold);
  EXPECT_EQ(cold->calls.load(), 0);
}

TEST_F(InferenceSessionTest, RejectsBadOptions) {
  EXPECT_THROWS_WITH(InferenceSession(Counting(), InferenceSessionOptions().num_threads(-1)),
                     "InferenceSession: num_threads must be >= 0, got -1");
  EXPECT_THROWS_WITH(InferenceSession(Counting(), InferenceSessionOptions().warmup_iterations(-2)),
                     "InferenceSession: warmup_iterations must be >= 0, got -2");
  InferenceSession session{Counting()};
  EXPECT_THROWS_WITH(session.run(torch::Tensor()),
                     "InferenceSession: run() needs a defined input tensor");
}

// docs/batching.md, "Serving a trained model": this code is shown there.
TEST_F(InferenceSessionTest, DocExample) {
  wick::testing::TempDir dir;
  auto trained = make_net();
  const std::string checkpoint_dir = dir.str() + "/checkpoints";
  train_and_checkpoint(trained, checkpoint_dir);

  // --- begin doc example ---
  auto model = make_net();  // the architecture that was trained, fresh weights
  wick::InferenceSession session(model, *wick::latest_checkpoint(checkpoint_dir),
                                 wick::InferenceSessionOptions().num_threads(1).warmup_shape(
                                     {32, 6}));  // eval mode, InferenceMode, warm

  wick::TensorBatcher batcher(session.batch_fn(), wick::BatcherOptions()
                                                      .max_batch_size(32)
                                                      .max_delay(std::chrono::microseconds(500))
                                                      .num_workers(2));  // run() is thread-safe
  std::vector<std::thread> clients;
  std::vector<torch::Tensor> answers(64);
  auto requests = torch::randn({64, 6});
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      for (int i = c; i < 64; i += 4) answers[i] = batcher.submit(requests[i]).get();  // [3] each
    });
  }
  for (auto& t : clients) t.join();
  wick::BatcherStats stats = batcher.stats();  // mean_batch_size, end_to_end.p99_us, ...
  // --- end doc example ---

  torch::NoGradGuard no_grad;
  trained->eval();
  auto expected = trained->forward(requests);  // all 64 in one batch, by hand
  WICK_EXPECT_CLOSE(torch::stack(answers), expected, 1e-5, 1e-6);
  EXPECT_EQ(stats.requests_succeeded, 64);
}

TEST_F(InferenceSessionTest, RunsOnCudaWithInputsFromTheCpu) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  wick::testing::TempDir dir;
  auto trained = make_net();
  const std::string ckpt = train_and_checkpoint(trained, dir.str() + "/checkpoints");
  InferenceSession session(make_net(), ckpt,
                           InferenceSessionOptions().device(torch::Device(torch::kCUDA)));
  EXPECT_TRUE(session.device().is_cuda());
  auto x = torch::randn({10, 6});
  auto y = session.run(x);
  EXPECT_TRUE(y.is_cuda());
  torch::NoGradGuard no_grad;
  trained->eval();
  WICK_EXPECT_CLOSE(y.cpu(), trained->forward(x), 1e-4, 1e-5);
}
