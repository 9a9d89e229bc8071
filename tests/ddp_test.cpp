#include <wick/ddp.h>
#include <wick/distributed.h>

#include "multiprocess.h"
#include "support.h"

#include <chrono>
#include <string>
#include <vector>

namespace {

using wick::testing::child_dir;
using wick::testing::is_rank_child;
using wick::testing::run_ranks;
using wick::testing::TempDir;

struct NetImpl : torch::nn::Module {
  explicit NetImpl(int64_t hidden = 8, bool extra = false) {
    fc1 = register_module("fc1", torch::nn::Linear(6, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, 3));
    if (extra) unused = register_module("unused", torch::nn::Linear(3, 3));
  }
  torch::Tensor forward(const torch::Tensor& x, bool use_extra = false) {
    auto y = fc2(torch::tanh(fc1(x)));
    return use_extra ? unused(y) : y;
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, unused{nullptr};
};
TORCH_MODULE(Net);

// A model whose weights depend only on `seed`.
Net make_net(uint64_t seed, torch::Dtype dtype, int64_t hidden = 8, bool extra = false) {
  torch::manual_seed(seed);
  Net net(hidden, extra);
  net->to(dtype);
  return net;
}

struct Batch {
  torch::Tensor x, y;
};

// The global batch of `step`: the same on every process.
Batch global_batch(int64_t step, int64_t size, torch::Dtype dtype) {
  torch::manual_seed(1000 + step);
  return {torch::randn({size, 6}).to(dtype), torch::randn({size, 3}).to(dtype)};
}

Batch shard(const Batch& b, int64_t rank, int64_t world) {
  const int64_t n = b.x.size(0) / world;
  return {b.x.narrow(0, rank * n, n), b.y.narrow(0, rank * n, n)};
}

std::shared_ptr<wick::ProcessGroup> child_group() {
  torch::set_num_threads(1);
  return wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(30)));
}

std::string params_file(const std::string& dir, int rank) {
  return dir + "/params" + std::to_string(rank) + ".pt";
}

std::vector<torch::Tensor> load_tensors(const std::string& path) {
  std::vector<torch::Tensor> out;
  torch::load(out, path);
  return out;
}

// ---------------------------------------------------------------------------
// In one process

TEST(DistributedDataParallelTest, RejectsBadOptions) {
  auto pg = std::make_shared<wick::ProcessGroup>();
  auto net = make_net(0, torch::kFloat32);
  EXPECT_THROWS_WITH(wick::DistributedDataParallel(
                         net.ptr(), pg, wick::DistributedDataParallelOptions().bucket_cap_mb(0)),
                     "DistributedDataParallel: bucket_cap_mb must be > 0, got 0");
  EXPECT_THROWS_WITH(wick::DistributedDataParallel(nullptr, pg), "module must not be null");
}

TEST(DistributedDataParallelTest, BucketsFollowReverseRegistrationOrderUpToTheCap) {
  auto pg = std::make_shared<wick::ProcessGroup>();
  auto net = make_net(0, torch::kFloat32);
  wick::DistributedDataParallel one(net.ptr(), pg);
  EXPECT_EQ(one.bucket_parameter_names(),
            (std::vector<std::vector<std::string>>{
                {"fc2.bias", "fc2.weight", "fc1.bias", "fc1.weight"}}));
  // fc2.bias is 12 bytes, fc2.weight 96, fc1.bias 32, fc1.weight 192: a 100-byte
  // cap closes a bucket once it holds 100 bytes or more.
  wick::DistributedDataParallel small(
      net.ptr(), pg, wick::DistributedDataParallelOptions().bucket_cap_mb(100.0 / (1 << 20)));
  EXPECT_EQ(small.bucket_parameter_names(),
            (std::vector<std::vector<std::string>>{{"fc2.bias", "fc2.weight"},
                                                   {"fc1.bias", "fc1.weight"}}));
  EXPECT_EQ(small.stats().num_buckets, 2);
}

// World of one: no communication, and training is bitwise the plain loop's.
TEST(DistributedDataParallelTest, WorldOfOneTrainsLikeThePlainLoop) {
  auto pg = std::make_shared<wick::ProcessGroup>();
  auto plain = make_net(0, torch::kFloat32);
  auto wrapped = make_net(0, torch::kFloat32);
  wick::DistributedDataParallel ddp(wrapped.ptr(), pg);
  torch::optim::SGD opt_plain(plain->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD opt_wrapped(wrapped->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int64_t step = 0; step < 3; ++step) {
    auto b = global_batch(step, 8, torch::kFloat32);
    opt_plain.zero_grad();
    torch::mse_loss(plain->forward(b.x), b.y).backward();
    opt_plain.step();

    ddp.prepare_forward();
    opt_wrapped.zero_grad();
    torch::mse_loss(wrapped->forward(b.x), b.y).backward();
    ddp.finalize_backward();
    opt_wrapped.step();
  }
  auto a = plain->parameters(), w = wrapped->parameters();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(wick::testing::tensors_equal(a[i], w[i])) << i;
  EXPECT_EQ(ddp.stats().buckets_launched_in_backward, 0);
}

// ---------------------------------------------------------------------------
// Two real processes over Gloo

// Different initial weights per rank (broadcast must fix that), different
// data per rank, several buckets: after training every parameter is bitwise
// the same on both ranks, and each bucket was launched from backward.
TEST(DistributedDataParallelTest, TwoRanksHoldBitwiseEqualParameters) {
  const int64_t steps = 5;
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str()));
    auto p0 = load_tensors(params_file(dir.str(), 0));
    auto p1 = load_tensors(params_file(dir.str(), 1));
    ASSERT_EQ(p0.size(), 4u);
    ASSERT_EQ(p1.size(), p0.size());
    auto init0 = make_net(0, torch::kFloat32)->parameters();
    for (size_t i = 0; i < p0.size(); ++i) {
      EXPECT_TRUE(wick::testing::tensors_equal(p0[i], p1[i])) << "parameter " << i;
      EXPECT_FALSE(torch::equal(p0[i], init0[i])) << "parameter " << i << " did not train";
    }
    return;
  }
  auto pg = child_group();
  auto net = make_net(static_cast<uint64_t>(pg->rank()), torch::kFloat32);
  wick::DistributedDataParallel ddp(
      net.ptr(), pg, wick::DistributedDataParallelOptions().bucket_cap_mb(100.0 / (1 << 20)));
  ASSERT_EQ(ddp.stats().num_buckets, 2);
  torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(0.01));
  for (int64_t step = 0; step < steps; ++step) {
    auto b = shard(global_batch(step, 16, torch::kFloat32), pg->rank(), 2);
    opt.zero_grad();
    auto loss = torch::mse_loss(ddp.forward(net, b.x), b.y);
    loss.backward();
    ddp.finalize_backward();
    EXPECT_EQ(ddp.stats().last_buckets_launched_in_backward, 2);
    opt.step();
  }
  auto s = ddp.stats();
  EXPECT_EQ(s.synced_steps, steps);
  EXPECT_EQ(s.buckets_launched_in_backward, 2 * steps);
  EXPECT_EQ(s.buckets_launched_in_finalize, 0);
  torch::save(wick::testing::clone_parameters(*net), params_file(child_dir(), pg->rank()));
}

// The same training in float64: 2 ranks with half of each batch reach the
// parameters of one process that sees the whole batch (computed in the parent).
TEST(DistributedDataParallelTest, TwoRanksMatchOneProcessWithTheWholeBatch) {
  const int64_t steps = 4, batch = 8;
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str()));
    auto ref = make_net(0, torch::kFloat64);
    torch::optim::SGD opt(ref->parameters(), torch::optim::SGDOptions(0.2));
    for (int64_t step = 0; step < steps; ++step) {
      auto b = global_batch(step, batch, torch::kFloat64);
      opt.zero_grad();
      torch::mse_loss(ref->forward(b.x), b.y).backward();
      opt.step();
    }
    auto expected = ref->parameters();
    for (int rank = 0; rank < 2; ++rank) {
      auto got = load_tensors(params_file(dir.str(), rank));
      ASSERT_EQ(got.size(), expected.size());
      for (size_t i = 0; i < got.size(); ++i) {
        WICK_EXPECT_CLOSE(got[i], expected[i], 1e-5, 1e-12)
            << "rank " << rank << " parameter " << i;
      }
    }
    return;
  }
  auto pg = child_group();
  auto net = make_net(static_cast<uint64_t>(10 + pg->rank() * 7),
                      torch::kFloat64);  // rank 0's differs from the parent's
  // Rank 0 starts from the parent's weights; the broadcast gives them to rank 1.
  if (pg->rank() == 0) net = make_net(0, torch::kFloat64);
  wick::DistributedDataParallel ddp(net.ptr(), pg);
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.2));
  for (int64_t step = 0; step < steps; ++step) {
    auto b = shard(global_batch(step, batch, torch::kFloat64), pg->rank(), pg->world_size());
    ddp.prepare_forward();
    opt.zero_grad();
    torch::mse_loss(net->forward(b.x), b.y).backward();
    ddp.finalize_backward();
    opt.step();
  }
  torch::save(wick::testing::clone_parameters(*net), params_file(child_dir(), pg->rank()));
}

// Two micro-batches per step, the first under no_sync: the same parameters as
// one backward over both micro-batches, and no communication on the first.
TEST(DistributedDataParallelTest, AccumulationUnderNoSyncEqualsOneBigBatch) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str()));
    return;
  }
  auto pg = child_group();
  auto accum = make_net(0, torch::kFloat64);
  auto whole = make_net(0, torch::kFloat64);
  wick::DistributedDataParallel ddp_accum(accum.ptr(), pg);
  wick::DistributedDataParallel ddp_whole(whole.ptr(), pg);
  torch::optim::SGD opt_accum(accum->parameters(), torch::optim::SGDOptions(0.2));
  torch::optim::SGD opt_whole(whole->parameters(), torch::optim::SGDOptions(0.2));
  for (int64_t step = 0; step < 3; ++step) {
    auto b = shard(global_batch(step, 8, torch::kFloat64), pg->rank(), 2);  // 4 samples per rank

    opt_accum.zero_grad();
    {
      auto guard = ddp_accum.no_sync();
      EXPECT_FALSE(ddp_accum.sync_enabled());
      (torch::mse_loss(accum->forward(b.x.narrow(0, 0, 2)), b.y.narrow(0, 0, 2)) * 0.5).backward();
      ddp_accum.finalize_backward();  // a no-op under no_sync
    }
    EXPECT_TRUE(ddp_accum.sync_enabled());
    EXPECT_EQ(ddp_accum.stats().synced_steps, step);
    EXPECT_EQ(ddp_accum.stats().buckets_launched_in_backward, step);
    (torch::mse_loss(accum->forward(b.x.narrow(0, 2, 2)), b.y.narrow(0, 2, 2)) * 0.5).backward();
    ddp_accum.finalize_backward();
    opt_accum.step();

    opt_whole.zero_grad();
    torch::mse_loss(whole->forward(b.x), b.y).backward();
    ddp_whole.finalize_backward();
    opt_whole.step();
  }
  auto a = accum->parameters(), w = whole->parameters();
  for (size_t i = 0; i < a.size(); ++i)
    WICK_EXPECT_CLOSE(a[i], w[i], 1e-10, 1e-14) << "parameter " << i;
  EXPECT_FALSE(torch::equal(a[0], make_net(0, torch::kFloat64)->parameters()[0]));
}

// A parameter outside the graph: a clear error by default; with
// find_unused_parameters it counts as zero, and one used on rank 0 only ends
// with rank 0's gradient / 2 on both ranks.
TEST(DistributedDataParallelTest, UnusedParametersNeedTheOption) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str()));
    return;
  }
  auto pg = child_group();
  auto b = shard(global_batch(0, 8, torch::kFloat64), pg->rank(), 2);
  {
    auto net = make_net(0, torch::kFloat64, 8, /*extra=*/true);
    wick::DistributedDataParallel ddp(net.ptr(), pg);
    torch::mse_loss(net->forward(b.x), b.y).backward();
    EXPECT_THROWS_WITH(ddp.finalize_backward(), "parameter 'unused.bias' got no gradient");
    // The failed step leaves the wrapper usable.
    net->zero_grad();
    torch::mse_loss(net->forward(b.x, /*use_extra=*/true), b.y).backward();
    EXPECT_NO_THROW(ddp.finalize_backward());
  }
  auto net = make_net(0, torch::kFloat64, 8, /*extra=*/true);
  wick::DistributedDataParallel ddp(
      net.ptr(), pg, wick::DistributedDataParallelOptions().find_unused_parameters(true));
  torch::mse_loss(net->forward(b.x, /*use_extra=*/pg->rank() == 0), b.y).backward();
  ddp.finalize_backward();
  EXPECT_EQ(ddp.stats().buckets_launched_in_finalize, pg->rank() == 0 ? 0 : 1);

  // Rank 0's local gradient of `unused`, from its data on a fresh copy.
  auto ref = make_net(0, torch::kFloat64, 8, /*extra=*/true);
  auto b0 = shard(global_batch(0, 8, torch::kFloat64), 0, 2);
  torch::mse_loss(ref->forward(b0.x, true), b0.y).backward();
  ASSERT_TRUE(net->unused->weight.grad().defined());
  WICK_EXPECT_CLOSE(net->unused->weight.grad(), ref->unused->weight.grad() / 2, 1e-12, 1e-15);
  WICK_EXPECT_CLOSE(net->unused->bias.grad(), ref->unused->bias.grad() / 2, 1e-12, 1e-15);
  EXPECT_GT(ref->unused->weight.grad().abs().sum().item<double>(), 0.0);
}

// Buffers (BatchNorm's running statistics) are rank 0's after construction
// and again after each prepare_forward(), unless broadcast_buffers is off.
TEST(DistributedDataParallelTest, BuffersFollowRankZeroBeforeEachForward) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str()));
    return;
  }
  auto pg = child_group();
  const double r = static_cast<double>(pg->rank());
  auto make = [&] {
    auto bn = torch::nn::BatchNorm1d(3);
    bn->running_mean.fill_(r + 1);
    return bn;
  };
  auto bn = make();
  wick::DistributedDataParallel ddp(bn.ptr(), pg);
  EXPECT_TRUE(torch::equal(bn->running_mean, torch::ones({3})));  // rank 0's value
  bn->running_mean.fill_(10 * (r + 1));  // as a forward on different data would
  ddp.prepare_forward();
  EXPECT_TRUE(torch::equal(bn->running_mean, torch::full({3}, 10.0)));

  auto own = make();
  wick::DistributedDataParallel keep(
      own.ptr(), pg, wick::DistributedDataParallelOptions().broadcast_buffers(false));
  own->running_mean.fill_(10 * (r + 1));
  keep.prepare_forward();
  EXPECT_TRUE(torch::equal(own->running_mean, torch::full({3}, 10 * (r + 1))));
}

// Rank 1 builds a wider layer: both ranks throw at construction, naming it.
TEST(DistributedDataParallelTest, MismatchedShapesFailOnEveryRank) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str()));
    return;
  }
  auto pg = child_group();
  auto net = make_net(0, torch::kFloat32, pg->rank() == 0 ? 8 : 9);
  if (pg->rank() == 1) {
    EXPECT_THROWS_WITH(wick::DistributedDataParallel(net.ptr(), pg),
                       "parameter 'fc1.weight' has shape [9, 6] on rank 1 but [8, 6] on rank 0");
  } else {
    EXPECT_THROWS_WITH(wick::DistributedDataParallel(net.ptr(), pg),
                       "rank 1 differs from rank 0 at parameter #0 ('fc1.weight'");
  }
}

}  // namespace
