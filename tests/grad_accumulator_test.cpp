// GradAccumulator: k micro-batches must give the gradients of one batch of
// their samples. The reference is always a single backward over the big batch
// (float64), computed apart from the accumulator.

#include <wick/grad_accumulator.h>

#include <numeric>
#include <vector>

#include "support.h"

namespace {

using wick::GradAccumulator;
using wick::testing::SeededTest;

enum class Loss { kMse, kCrossEntropy };

constexpr int64_t kIn = 6, kHidden = 16, kOut = 3;

torch::nn::Sequential make_mlp() {
  torch::nn::Sequential m(torch::nn::Linear(kIn, kHidden), torch::nn::Tanh(),
                          torch::nn::Linear(kHidden, kHidden), torch::nn::Tanh(),
                          torch::nn::Linear(kHidden, kOut));
  m->to(torch::kFloat64);
  return m;
}

struct Data {
  torch::Tensor x, y;
};

Data make_data(int64_t n, Loss loss) {
  auto x = torch::randn({n, kIn}, torch::kFloat64);
  auto y = loss == Loss::kMse ? torch::randn({n, kOut}, torch::kFloat64)
                              : torch::randint(0, kOut, {n}, torch::kLong);
  return {x, y};
}

torch::Tensor loss_of(Loss loss, const torch::Tensor& out, const torch::Tensor& y) {
  return loss == Loss::kMse ? torch::mse_loss(out, y)
                            : torch::nn::functional::cross_entropy(out, y);
}

std::vector<torch::Tensor> grads_of(torch::nn::Module& m) {
  std::vector<torch::Tensor> g;
  for (const auto& p : m.parameters()) g.push_back(p.grad().detach().clone());
  return g;
}

/// The reference: one mean-reduced backward over samples [begin, end).
std::vector<torch::Tensor> big_batch_grads(torch::nn::Sequential& m, const Data& d, Loss loss,
                                           int64_t begin, int64_t end) {
  m->zero_grad();
  loss_of(loss, m->forward(d.x.slice(0, begin, end)), d.y.slice(0, begin, end)).backward();
  return grads_of(*m);
}

/// Micro-batches of `sizes` taken in order from the start of `d`; the last one
/// is flagged ends_data. Returns the gradients when the group closes.
std::vector<torch::Tensor> accumulated_grads(torch::nn::Sequential& m, const Data& d, Loss loss,
                                             const std::vector<int64_t>& sizes, int64_t steps) {
  m->zero_grad();
  GradAccumulator accum(steps);
  int64_t at = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const bool last = i + 1 == sizes.size();
    const double w = accum.begin(sizes[i], /*ends_data=*/last);
    auto x = d.x.slice(0, at, at + sizes[i]);
    auto y = d.y.slice(0, at, at + sizes[i]);
    (loss_of(loss, m->forward(x), y) * w).backward();
    at += sizes[i];
    const bool stepped = accum.end(m->parameters());
    EXPECT_EQ(stepped, last) << "micro-batch " << i;
  }
  return grads_of(*m);
}

::testing::AssertionResult all_close(const std::vector<torch::Tensor>& a,
                                     const std::vector<torch::Tensor>& b, double rtol = 1e-6) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "tensor counts differ";
  for (size_t i = 0; i < a.size(); ++i) {
    auto r = wick::testing::tensors_close(a[i], b[i], rtol, /*atol=*/1e-12);
    if (!r) return r << " (parameter " << i << ")";
  }
  return ::testing::AssertionSuccess();
}

class GradAccumulatorTest : public SeededTest, public ::testing::WithParamInterface<Loss> {};
class GradAccumulatorTrainingTest : public SeededTest {};

TEST_P(GradAccumulatorTest, EqualMicroBatchesMatchSingleBatchGradients) {
  auto m = make_mlp();
  auto d = make_data(4 * 5, GetParam());
  auto ref = big_batch_grads(m, d, GetParam(), 0, 20);
  auto acc = accumulated_grads(m, d, GetParam(), {5, 5, 5, 5}, 4);
  EXPECT_TRUE(all_close(acc, ref));
}

TEST_P(GradAccumulatorTest, UnequalMicroBatchesMatchSingleBatchGradients) {
  auto m = make_mlp();
  auto d = make_data(18, GetParam());
  auto ref = big_batch_grads(m, d, GetParam(), 0, 18);
  auto acc = accumulated_grads(m, d, GetParam(), {5, 3, 8, 2}, 4);
  EXPECT_TRUE(all_close(acc, ref));
}

TEST_P(GradAccumulatorTest, PartialLastGroupMatchesSingleBatchOfItsSamples) {
  auto m = make_mlp();
  auto d = make_data(8, GetParam());
  auto ref = big_batch_grads(m, d, GetParam(), 0, 8);
  // ends_data after 2 of 4 micro-batches.
  auto acc = accumulated_grads(m, d, GetParam(), {4, 4}, 4);
  EXPECT_TRUE(all_close(acc, ref));
}

TEST_P(GradAccumulatorTest, PartialLastGroupWithShortBatchMatchesSingleBatch) {
  auto m = make_mlp();
  auto d = make_data(11, GetParam());
  auto ref = big_batch_grads(m, d, GetParam(), 0, 11);
  auto acc = accumulated_grads(m, d, GetParam(), {4, 4, 3}, 4);
  EXPECT_TRUE(all_close(acc, ref));
}

TEST_P(GradAccumulatorTest, NaiveAveragingOfMicroBatchLossesWouldFail) {
  // Guards the tests above: on this data, weighting every micro-batch by 1/k
  // (what ignoring the sizes gives) is measurably wrong.
  auto m = make_mlp();
  auto d = make_data(18, GetParam());
  auto ref = big_batch_grads(m, d, GetParam(), 0, 18);
  m->zero_grad();
  int64_t at = 0;
  for (int64_t b : {5, 3, 8, 2}) {
    (loss_of(GetParam(), m->forward(d.x.slice(0, at, at + b)), d.y.slice(0, at, at + b)) / 4.0)
        .backward();
    at += b;
  }
  EXPECT_FALSE(all_close(grads_of(*m), ref, 1e-3));
}

INSTANTIATE_TEST_SUITE_P(Losses, GradAccumulatorTest,
                         ::testing::Values(Loss::kMse, Loss::kCrossEntropy), [](const auto& info) {
                           return info.param == Loss::kMse ? "Mse" : "CrossEntropy";
                         });

TEST_F(GradAccumulatorTrainingTest, StepsOfOneIsAPlainStep) {
  auto m = make_mlp();
  auto plain = make_mlp();
  {
    torch::NoGradGuard g;
    for (size_t i = 0; i < m->parameters().size(); ++i)
      plain->parameters()[i].copy_(m->parameters()[i]);
  }
  auto d = make_data(12, Loss::kMse);
  torch::optim::SGD opt(m->parameters(), torch::optim::SGDOptions(0.1));
  torch::optim::SGD plain_opt(plain->parameters(), torch::optim::SGDOptions(0.1));
  GradAccumulator accum(1);
  const std::vector<int64_t> sizes{4, 5, 3};
  int64_t at = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto x = d.x.slice(0, at, at + sizes[i]);
    auto y = d.y.slice(0, at, at + sizes[i]);
    at += sizes[i];

    const double w = accum.begin(sizes[i], i + 1 == sizes.size());
    EXPECT_EQ(w, 1.0);
    EXPECT_TRUE(accum.sync_gradients());
    (torch::mse_loss(m->forward(x), y) * w).backward();
    ASSERT_TRUE(accum.end(m->parameters()));
    opt.step();
    opt.zero_grad();

    torch::mse_loss(plain->forward(x), y).backward();
    plain_opt.step();
    plain_opt.zero_grad();
  }
  for (size_t i = 0; i < m->parameters().size(); ++i) {
    EXPECT_TRUE(wick::testing::tensors_equal(m->parameters()[i], plain->parameters()[i]));
  }
  EXPECT_EQ(accum.groups_completed(), 3);
}

// The loop of docs/grad_accumulation.md, checked against training on the big
// batches that the groups make up: 10 micro-batches, 4 per step, so groups of
// 4, 4 and a last partial one of 2.
TEST_F(GradAccumulatorTrainingTest, DocLoopMatchesBigBatchTraining) {
  struct Batch {
    torch::Tensor data, target;
  };
  auto model = make_mlp();
  auto reference = make_mlp();
  {
    torch::NoGradGuard g;
    for (size_t i = 0; i < model->parameters().size(); ++i)
      reference->parameters()[i].copy_(model->parameters()[i]);
  }
  const std::vector<int64_t> sizes{8, 8, 5, 8, 8, 8, 8, 3, 8, 6};
  std::vector<Batch> batches;
  for (int64_t n : sizes)
    batches.push_back(
        {torch::randn({n, kIn}, torch::kFloat64), torch::randn({n, kOut}, torch::kFloat64)});
  auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& t) {
    return torch::mse_loss(out, t);
  };

  // ---- docs/grad_accumulation.md: begin ----
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  wick::GradAccumulator accum(4);  // 4 micro-batches per optimizer step
  for (size_t i = 0; i < batches.size(); ++i) {
    auto& b = batches[i];
    const bool last = i + 1 == batches.size();
    const double w = accum.begin(b.data.size(0), /*ends_data=*/last);
    (loss_fn(model->forward(b.data), b.target) * w).backward();
    if (accum.end(model->parameters())) {  // the group is complete
      optimizer.step();
      optimizer.zero_grad();
    }
  }
  // ---- docs/grad_accumulation.md: end ----

  torch::optim::SGD ref_opt(reference->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  for (auto [from, to] : {std::pair<size_t, size_t>{0, 4}, {4, 8}, {8, 10}}) {
    std::vector<torch::Tensor> xs, ys;
    for (size_t i = from; i < to; ++i) {
      xs.push_back(batches[i].data);
      ys.push_back(batches[i].target);
    }
    loss_fn(reference->forward(torch::cat(xs)), torch::cat(ys)).backward();
    ref_opt.step();
    ref_opt.zero_grad();
  }
  EXPECT_EQ(accum.groups_completed(), 3);
  for (size_t i = 0; i < model->parameters().size(); ++i) {
    WICK_EXPECT_CLOSE(model->parameters()[i], reference->parameters()[i], 1e-6, 1e-12);
  }
}

TEST(GradAccumulatorProtocolTest, SyncAndEndAreTrueExactlyOnTheClosingMicroBatch) {
  GradAccumulator accum(3);
  // 8 micro-batches, the last ends the data: groups of 3, 3, 2.
  const std::vector<bool> closes{false, false, true, false, false, true, false, true};
  const std::vector<int64_t> in_group{1, 2, 3, 1, 2, 3, 1, 2};
  for (size_t i = 0; i < closes.size(); ++i) {
    accum.begin(2, /*ends_data=*/i + 1 == closes.size());
    EXPECT_EQ(accum.sync_gradients(), closes[i]) << "micro-batch " << i;
    EXPECT_EQ(accum.micro_batches_in_group(), in_group[i]) << "micro-batch " << i;
    EXPECT_EQ(accum.samples_in_group(), 2 * in_group[i]) << "micro-batch " << i;
    EXPECT_EQ(accum.end({}), closes[i]) << "micro-batch " << i;
  }
  EXPECT_EQ(accum.groups_completed(), 3);
  EXPECT_EQ(accum.micro_batches_in_group(), 0);
  EXPECT_EQ(accum.samples_in_group(), 0);
}

TEST(GradAccumulatorProtocolTest, WeightsFollowTheFirstBatchOfTheGroup) {
  GradAccumulator accum(4);
  EXPECT_DOUBLE_EQ(accum.begin(5), 5.0 / 20.0);
  accum.end({});
  EXPECT_DOUBLE_EQ(accum.begin(3), 3.0 / 20.0);
  accum.end({});
  EXPECT_DOUBLE_EQ(accum.begin(8), 8.0 / 20.0);
  accum.end({});
  EXPECT_DOUBLE_EQ(accum.begin(2), 2.0 / 20.0);
  EXPECT_TRUE(accum.end({}));
  // A new group takes its own first size.
  EXPECT_DOUBLE_EQ(accum.begin(10), 10.0 / 40.0);
  accum.end({});
}

TEST(GradAccumulatorProtocolTest, EndRescalesGradientsOfAShortGroup) {
  // Group of 4 assumed 4 x 2 = 8 samples, closed after 2 + 2: the gradients are
  // multiplied by 8 / 4; params without a gradient are left alone.
  GradAccumulator accum(4);
  auto p = torch::ones({3}, torch::requires_grad());
  auto unused = torch::ones({2}, torch::requires_grad());
  p.mutable_grad() = torch::full({3}, 0.5);
  accum.begin(2);
  EXPECT_FALSE(accum.end({p, unused}));
  accum.begin(2, /*ends_data=*/true);
  EXPECT_TRUE(accum.end({p, unused}));
  EXPECT_TRUE(wick::testing::tensors_equal(p.grad(), torch::full({3}, 1.0)));
  EXPECT_FALSE(unused.grad().defined());
}

TEST(GradAccumulatorProtocolTest, ResetDropsThePartialGroup) {
  GradAccumulator accum(4);
  accum.begin(5);
  accum.end({});
  accum.begin(5);
  accum.reset();
  EXPECT_EQ(accum.micro_batches_in_group(), 0);
  EXPECT_EQ(accum.samples_in_group(), 0);
  EXPECT_FALSE(accum.sync_gradients());
  EXPECT_DOUBLE_EQ(accum.begin(2), 2.0 / 8.0);  // a new group with a new first size
  EXPECT_EQ(accum.micro_batches_in_group(), 1);
  EXPECT_FALSE(accum.end({}));
  EXPECT_EQ(accum.groups_completed(), 0);
}

TEST(GradAccumulatorProtocolTest, RejectsMisuse) {
  EXPECT_THROWS_WITH(GradAccumulator(0), "GradAccumulator: steps must be >= 1, got 0");
  EXPECT_THROWS_WITH(GradAccumulator(-3), "steps must be >= 1, got -3");

  GradAccumulator accum(2);
  EXPECT_THROWS_WITH(accum.end({}), "end() called without a matching begin()");
  EXPECT_THROWS_WITH(accum.begin(0), "batch_size must be > 0, got 0");
  EXPECT_THROWS_WITH(accum.begin(-1), "batch_size must be > 0, got -1");
  EXPECT_EQ(accum.micro_batches_in_group(), 0);  // rejected calls change nothing
  accum.begin(4);
  EXPECT_THROWS_WITH(accum.begin(4), "begin() called twice without end()");
  EXPECT_EQ(accum.micro_batches_in_group(), 1);
  EXPECT_FALSE(accum.end({}));
  EXPECT_THROWS_WITH(accum.end({}), "end() called without a matching begin()");
}

}  // namespace
