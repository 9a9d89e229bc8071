#include <wick/amp.h>
#include <wick/checkpoint.h>
#include <wick/ddp.h>
#include <wick/distributed.h>
#include <wick/optim.h>
#include <wick/safetensors.h>
#include <wick/shard.h>
#include <wick/trainer.h>

#include <c10/core/CPUAllocator.h>

#include <gmock/gmock.h>
#include "multiprocess.h"
#include "support.h"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using wick::ShardingStrategy;
using wick::testing::child_dir;
using wick::testing::is_rank_child;
using wick::testing::run_ranks;
using wick::testing::TempDir;

// A residual block: a unit of full sharding.
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t dim, int64_t hidden) {
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    fc1 = register_module("fc1", torch::nn::Linear(dim, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, dim));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x + fc2(torch::tanh(fc1(norm(x)))); }
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Block);

// Unit sizes that divide by neither 2 nor 3: 77 + 36 (root), 194, 263, then
// 263 for every further block.
struct ModelImpl : torch::nn::Module {
  explicit ModelImpl(int64_t num_blocks = 2) {
    in = register_module("in", torch::nn::Linear(6, 11));
    for (int64_t i = 0; i < num_blocks; ++i) {
      blocks.push_back(register_module("block" + std::to_string(i), Block(11, i == 0 ? 7 : 10)));
    }
    out = register_module("out", torch::nn::Linear(11, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = in(x);
    for (auto& b : blocks) h = wick::unit_call(*b, [&] { return b->forward(h); });
    return out(h);
  }
  std::vector<std::shared_ptr<torch::nn::Module>> units() const {
    std::vector<std::shared_ptr<torch::nn::Module>> out;
    for (const auto& b : blocks) out.push_back(b.ptr());
    return out;
  }
  torch::nn::Linear in{nullptr}, out{nullptr};
  std::vector<Block> blocks;
};
TORCH_MODULE(Model);

Model make_model(uint64_t seed = 0, int64_t num_blocks = 2) {
  torch::manual_seed(seed);
  return Model(num_blocks);
}

struct Data {
  torch::Tensor x, y;
};

// This rank's part of the global batch of `step` (the same on every process).
Data batch_of(int64_t step, int64_t rank, int64_t world, int64_t per_rank = 4) {
  torch::manual_seed(1000 + step);
  auto x = torch::randn({per_rank * world, 6});
  auto y = torch::randn({per_rank * world, 3});
  return {x.narrow(0, rank * per_rank, per_rank), y.narrow(0, rank * per_rank, per_rank)};
}

std::shared_ptr<wick::ProcessGroup> child_group() {
  torch::set_num_threads(1);
  return wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(60)));
}

wick::ShardingOptions sharding(ShardingStrategy strategy, const Model& model) {
  auto o = wick::ShardingOptions().strategy(strategy).bucket_cap_mb(0.0005);  // several buckets
  if (strategy == ShardingStrategy::kFull) o.units(model->units());
  return o;
}

using MakeOptimizer =
    std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

std::unique_ptr<torch::optim::Optimizer> adam(std::vector<torch::Tensor> params) {
  return std::make_unique<torch::optim::Adam>(std::move(params),
                                              torch::optim::AdamOptions(1e-2).weight_decay(1e-3));
}

struct RunOptions {
  int64_t steps = 50;
  int64_t micro_batches = 1;  // per step; all but the last with synchronization off
  double clip = 0.0;
  MakeOptimizer make_optimizer = adam;
};

// Trains a fresh model with DDP (strategy nullopt) or sharded; returns its parameters.
std::vector<torch::Tensor> train(const std::shared_ptr<wick::ProcessGroup>& pg,
                                 std::optional<ShardingStrategy> strategy,
                                 const RunOptions& run = {}) {
  auto model = make_model();
  auto opt = run.make_optimizer(model->parameters());
  std::unique_ptr<wick::DistributedDataParallel> ddp;
  std::unique_ptr<wick::ShardedDataParallel> sdp;
  if (strategy) {
    sdp = std::make_unique<wick::ShardedDataParallel>(model.ptr(), pg, *opt,
                                                      sharding(*strategy, model));
  } else {
    ddp = std::make_unique<wick::DistributedDataParallel>(model.ptr(), pg);
  }
  for (int64_t step = 0; step < run.steps; ++step) {
    auto b = batch_of(step, pg->rank(), pg->world_size(), 4 * run.micro_batches);
    for (int64_t m = 0; m < run.micro_batches; ++m) {
      const bool last = m + 1 == run.micro_batches;
      if (ddp) ddp->set_sync(last);
      if (sdp) sdp->set_sync(last);
      if (ddp) ddp->prepare_forward();
      if (sdp) sdp->prepare_forward();
      auto loss = torch::mse_loss(model->forward(b.x.narrow(0, 4 * m, 4)), b.y.narrow(0, 4 * m, 4));
      (loss / static_cast<double>(run.micro_batches)).backward();
      if (ddp) ddp->finalize_backward();
      if (sdp) sdp->finalize_backward();
    }
    if (run.clip > 0) {
      if (ddp) torch::nn::utils::clip_grad_norm_(model->parameters(), run.clip);
      if (sdp) sdp->clip_grad_norm_(run.clip);
    }
    opt->step();
    opt->zero_grad();
  }
  if (sdp) sdp->gather_full_params();
  return wick::testing::clone_parameters(*model);
}

// max |a - b| / max |b| over each tensor.
double max_relative_difference(const std::vector<torch::Tensor>& a,
                               const std::vector<torch::Tensor>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    EXPECT_EQ(a[i].sizes(), b[i].sizes()) << "parameter " << i;
    const double scale = b[i].abs().max().item<double>();
    worst = std::max(worst, (a[i] - b[i]).abs().max().item<double>() / std::max(scale, 1e-30));
  }
  return worst;
}

// ---------------------------------------------------------------------------
// In one process

TEST(ShardingTest, ParsesStrategies) {
  EXPECT_EQ(wick::parse_sharding_strategy("zero1"), ShardingStrategy::kZero1);
  EXPECT_EQ(wick::parse_sharding_strategy("ZeRO-2"), ShardingStrategy::kZero2);
  EXPECT_EQ(wick::parse_sharding_strategy("full"), ShardingStrategy::kFull);
  EXPECT_EQ(wick::parse_sharding_strategy("fsdp"), ShardingStrategy::kFull);
  for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
    EXPECT_EQ(wick::parse_sharding_strategy(wick::to_string(s)), s);
  }
  EXPECT_THROWS_WITH(wick::parse_sharding_strategy("zero4"), "unknown sharding strategy 'zero4'");
}

TEST(ShardingTest, RefusesWhatCannotBeSharded) {
  auto pg = wick::init_process_group();  // a world of one
  {
    auto m = make_model();
    torch::optim::LBFGS opt(m->parameters());
    EXPECT_THROWS_WITH(wick::ShardedDataParallel(m.ptr(), pg, opt), "LBFGS is not elementwise");
  }
  {
    auto m = make_model();
    torch::optim::SGD opt(m->parameters(), 0.1);
    torch::mse_loss(m->forward(torch::randn({2, 6})), torch::zeros({2, 3})).backward();
    torch::optim::Adam adam_opt(m->parameters());
    adam_opt.step();
    EXPECT_THROWS_WITH(wick::ShardedDataParallel(m.ptr(), pg, adam_opt),
                       "the optimizer already has state");
  }
  {
    auto m = make_model();
    auto params = m->parameters();
    params.pop_back();  // out.bias
    torch::optim::SGD opt(params, 0.1);
    EXPECT_THROWS_WITH(wick::ShardedDataParallel(m.ptr(), pg, opt),
                       "parameter 'out.bias' is trainable but not in the optimizer");
  }
  {
    auto m = make_model();
    auto params = m->parameters();
    params.push_back(torch::zeros({4, 5}, torch::requires_grad()));
    torch::optim::SGD opt(params, 0.1);
    EXPECT_THROWS_WITH(wick::ShardedDataParallel(m.ptr(), pg, opt),
                       "holds a tensor of shape [4, 5] that is not a trainable parameter");
  }
  {
    auto m = make_model();
    torch::optim::SGD opt(m->parameters(), 0.1);
    EXPECT_THROWS_WITH(
        wick::ShardedDataParallel(
            m.ptr(), pg, opt,
            wick::ShardingOptions().strategy(ShardingStrategy::kZero2).units(m->units())),
        "units are for full sharding");
  }
  {
    auto m = make_model();
    torch::optim::SGD opt(m->parameters(), 0.1);
    auto units = m->units();
    units.push_back(m->blocks[0]->fc1.ptr());  // inside block0
    EXPECT_THROWS_WITH(wick::ShardedDataParallel(
                           m.ptr(), pg, opt,
                           wick::ShardingOptions().strategy(ShardingStrategy::kFull).units(units)),
                       "units 'block0' and 'block0.fc1' share parameters");
  }
  {
    auto m = make_model();
    auto stranger = torch::nn::Linear(2, 2);
    torch::optim::SGD opt(m->parameters(), 0.1);
    EXPECT_THROWS_WITH(
        wick::ShardedDataParallel(
            m.ptr(), pg, opt,
            wick::ShardingOptions().strategy(ShardingStrategy::kFull).units({stranger.ptr()})),
        "a unit is not a submodule of the module");
  }
}

// In a world of one every strategy runs its whole machinery (flat units,
// collectives that copy) and must train exactly like the plain loop.
TEST(ShardingTest, WorldOfOneTrainsLikeThePlainLoop) {
  auto pg = wick::init_process_group();
  auto plain = make_model();
  auto opt = adam(plain->parameters());
  for (int64_t step = 0; step < 10; ++step) {
    auto b = batch_of(step, 0, 1);
    torch::mse_loss(plain->forward(b.x), b.y).backward();
    opt->step();
    opt->zero_grad();
  }
  const auto expected = wick::testing::clone_parameters(*plain);
  for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
    RunOptions run;
    run.steps = 10;
    EXPECT_LE(max_relative_difference(train(pg, s, run), expected), 1e-6) << wick::to_string(s);
  }
}

// The optimizer now holds this rank's shards; the module's parameters keep
// their identity and, under full sharding, hold nothing at rest.
TEST(ShardingTest, FullShardingHoldsNoParameterAtRest) {
  auto pg = wick::init_process_group();
  auto m = make_model();
  const auto before = wick::testing::clone_parameters(*m);
  torch::optim::SGD opt(m->parameters(), 0.1);
  wick::ShardedDataParallel sdp(m.ptr(), pg, opt, sharding(ShardingStrategy::kFull, m));
  EXPECT_EQ(sdp.stats().gathered_param_bytes, 0);
  EXPECT_EQ(sdp.stats().num_units, 3);  // two blocks and the root
  for (const auto& p : m->parameters()) EXPECT_EQ(p.numel(), 0);
  // A forward outside the wrapper's control gathers what it needs.
  sdp.prepare_forward();
  auto y = m->forward(torch::randn({2, 6}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 3}));
  torch::mse_loss(y, torch::zeros({2, 3})).backward();
  sdp.finalize_backward();
  EXPECT_EQ(sdp.stats().gathered_param_bytes, 0);
  EXPECT_GT(sdp.stats().peak_gathered_param_bytes, 0);
  sdp.gather_full_params();
  EXPECT_LE(max_relative_difference(wick::testing::clone_parameters(*m), before), 0.0);
  sdp.reshard();
  EXPECT_EQ(sdp.stats().gathered_param_bytes, 0);
}

TEST(ShardingTest, UnitCallWithoutShardingJustCalls) {
  auto m = make_model();
  auto x = torch::randn({3, 6});
  torch::Tensor by_hand = m->out(m->blocks[1]->forward(m->blocks[0]->forward(m->in(x))));
  EXPECT_TRUE(torch::equal(m->forward(x), by_hand));
  auto pair = wick::unit_call(*m->blocks[0], [&] { return std::make_pair(x, x * 2); });
  EXPECT_TRUE(torch::equal(pair.second, x * 2));
}

// ---------------------------------------------------------------------------
// Real processes

// A graph that differs between ranks, as a mixture of experts' does: on
// rank 1 the loss also reads block 0's weights directly (so backward reaches
// block 0 first there, and gathers it before block 2 has reduced its
// gradients) and its output through a head rank 0 never uses. The
// collectives stay in step (each rank issues them in one canonical order,
// the gathers on a communicator of their own) and the result is DDP's.
TEST(ShardingTest, RankDependentGraphsKeepCollectivesInStep) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str(), /*timeout_s=*/240));
    return;
  }
  auto pg = child_group();
  auto run = [&](std::optional<ShardingStrategy> strategy) {
    torch::manual_seed(0);
    auto model = Model(3);
    auto side = torch::nn::Linear(11, 3);
    auto all = std::make_shared<torch::nn::Module>();
    all->register_module("model", model);
    all->register_module("side", side);
    torch::optim::Adam opt(all->parameters(), torch::optim::AdamOptions(1e-2));
    std::unique_ptr<wick::DistributedDataParallel> ddp;
    std::unique_ptr<wick::ShardedDataParallel> sdp;
    if (strategy) {
      auto o = sharding(*strategy, model).find_unused_parameters(true);
      sdp = std::make_unique<wick::ShardedDataParallel>(all, pg, opt, o);
    } else {
      ddp = std::make_unique<wick::DistributedDataParallel>(
          all, pg, wick::DistributedDataParallelOptions().find_unused_parameters(true));
    }
    for (int64_t step = 0; step < 10; ++step) {
      auto b = batch_of(step, pg->rank(), 2);
      if (sdp) sdp->prepare_forward();
      if (ddp) ddp->prepare_forward();
      auto h = model->in(b.x);
      torch::Tensor first, aux;
      for (size_t i = 0; i < model->blocks.size(); ++i) {
        auto& blk = model->blocks[i];
        // Like an MoE's balance loss: a second output that reads only the block's weights.
        auto [y, a] = wick::unit_call(
            *blk, [&] { return std::make_pair(blk->forward(h), blk->fc1->weight.square().sum()); });
        h = y;
        if (i == 0) first = h, aux = a;
      }
      auto loss = torch::mse_loss(model->out(h), b.y);
      if (pg->rank() == 1) loss = loss + torch::mse_loss(side(first), b.y) + 1e-3 * aux;
      loss.backward();
      if (sdp) sdp->finalize_backward();
      if (ddp) ddp->finalize_backward();
      opt.step();
      opt.zero_grad();
    }
    if (sdp) sdp->gather_full_params();
    return wick::testing::clone_parameters(*all);
  };
  const auto expected = run(std::nullopt);
  for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
    EXPECT_LE(max_relative_difference(run(s), expected), 1e-6) << wick::to_string(s);
  }
}

// 50 Adam steps with clipping: each strategy ends within 1e-6 (relative) of
// DDP. With 2 ranks a reduce-scatter adds the same two numbers as DDP's
// allreduce; with 3 the order of the additions may differ, hence a tolerance.
void expect_strategies_match_ddp(int world) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(world, dir.str(), /*timeout_s=*/240));
    std::cout << wick::testing::read_text(dir.str() + "/differences.txt");
    return;
  }
  auto pg = child_group();
  RunOptions run;
  run.clip = 0.05;  // active: the gradient norm is above it early on
  const auto ddp = train(pg, std::nullopt, run);
  std::ostringstream report;
  for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
    const double diff = max_relative_difference(train(pg, s, run), ddp);
    EXPECT_LE(diff, 1e-6) << wick::to_string(s) << " on rank " << pg->rank();
    report << world << " ranks, " << wick::to_string(s)
           << " vs DDP after 50 steps: max relative difference " << diff << "\n";
  }
  if (pg->rank() == 0) std::ofstream(child_dir() + "/differences.txt") << report.str();
}

TEST(ShardingTest, TwoRanksMatchDdpAfter50Steps) { expect_strategies_match_ddp(2); }
TEST(ShardingTest, ThreeRanksMatchDdpAfter50Steps) { expect_strategies_match_ddp(3); }

// Accumulation (the first micro-batches with synchronization off) and
// FusedAdam: the same as DDP under no_sync.
TEST(ShardingTest, AccumulationAndFusedAdamMatchDdp) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str(), /*timeout_s=*/240));
    return;
  }
  auto pg = child_group();
  RunOptions run;
  run.steps = 20;
  run.micro_batches = 3;
  run.make_optimizer = [](std::vector<torch::Tensor> params) {
    return std::make_unique<wick::FusedAdam>(
        std::move(params),
        wick::FusedAdamOptions(1e-2).weight_decay(1e-2).decoupled_weight_decay(true));
  };
  const auto ddp = train(pg, std::nullopt, run);
  for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
    EXPECT_LE(max_relative_difference(train(pg, s, run), ddp), 1e-6) << wick::to_string(s);
  }
}

// Per rank: the optimizer's state is the replica's divided by the world size
// (up to the padding), and full sharding (six units here) holds no parameter
// at rest and at most the root and two units while it computes: the unit
// that runs and the one prefetched.
TEST(ShardingTest, MemoryIsShardedAcrossTwoRanks) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str(), /*timeout_s=*/240));
    return;
  }
  auto pg = child_group();
  constexpr int64_t kBlocks = 5;
  int64_t replica_state = 0, total_params = 0;
  {
    auto m = make_model(0, kBlocks);
    auto opt = adam(m->parameters());
    torch::mse_loss(m->forward(torch::randn({2, 6})), torch::zeros({2, 3})).backward();
    opt->step();
    replica_state = wick::optimizer_state_bytes(*opt);
    for (const auto& p : m->parameters()) total_params += p.numel();
  }
  EXPECT_EQ(replica_state, 2 * 4 * total_params);  // exp_avg and exp_avg_sq, float32
  for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
    auto m = make_model(0, kBlocks);
    auto opt = adam(m->parameters());
    wick::ShardedDataParallel sdp(m.ptr(), pg, *opt, sharding(s, m));
    // A first step records the units' order, which the prefetches follow.
    sdp.prepare_forward();
    torch::mse_loss(m->forward(batch_of(1, pg->rank(), 2).x), batch_of(1, pg->rank(), 2).y)
        .backward();
    sdp.finalize_backward();
    opt->zero_grad();
    sdp.prepare_forward();
    sdp.reset_peak();
    torch::mse_loss(m->forward(batch_of(0, pg->rank(), 2).x), batch_of(0, pg->rank(), 2).y)
        .backward();
    sdp.finalize_backward();
    opt->step();
    const auto st = sdp.stats();
    EXPECT_EQ(st.param_numel, total_params);
    // Elements this rank owns, without the padding, hold the state.
    EXPECT_EQ(st.optimizer_state_bytes, 2 * 4 * (st.shard_numel - st.padding_numel))
        << wick::to_string(s);
    EXPECT_NEAR(static_cast<double>(st.optimizer_state_bytes), replica_state / 2.0,
                2 * 4 * static_cast<double>(st.num_units))
        << wick::to_string(s);
    const int64_t whole_bytes = 4 * total_params;
    if (s == ShardingStrategy::kFull) {
      EXPECT_EQ(st.gathered_param_bytes, 0);
      const int64_t root_bytes = 4 * 114, unit_bytes = 4 * 264;  // padded to even
      EXPECT_LE(st.peak_gathered_param_bytes, root_bytes + 2 * unit_bytes);
      EXPECT_LT(st.peak_gathered_param_bytes, whole_bytes / 2);
      EXPECT_GT(st.prefetched_all_gathers, 0);
    } else {
      EXPECT_GE(st.gathered_param_bytes, whole_bytes);
    }
  }
}

// Memory, for real: every CPU tensor allocation of the process counted by an
// allocator that refuses to go past a budget, as a GPU's memory (or the
// caching allocator's limit) would. The budget is 12 bytes per parameter. A
// DDP replica with Adam needs 20 (parameters, gradients, the bucket copies
// of the gradients, two moments) and fails to allocate; full sharding over 2
// ranks holds half of the parameters, gradients and moments (8) plus the
// units it gathers, and trains within it.
class BudgetAllocator final : public c10::Allocator {
 public:
  explicit BudgetAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    const int64_t now = live_.load() + static_cast<int64_t>(n);
    TORCH_CHECK(now <= limit_.load(), "BudgetAllocator: ", n, " more bytes would make ", now,
                ", over the budget of ", limit_.load());
    auto inner = base_->allocate(n);
    live_ += static_cast<int64_t>(n);
    int64_t peak = peak_.load();
    while (peak < live_.load() && !peak_.compare_exchange_weak(peak, live_.load())) {
    }
    void* data = inner.get();
    const auto device = inner.device();
    auto* ctx = new Owned{std::move(inner), static_cast<int64_t>(n), this};
    return {data, ctx, &Owned::release, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
  int64_t live() const { return live_.load(); }
  int64_t peak() const { return peak_.load(); }
  void set_limit(int64_t bytes) { limit_ = bytes; }
  void reset_peak() { peak_ = live_.load(); }

 private:
  struct Owned {
    c10::DataPtr inner;
    int64_t bytes;
    BudgetAllocator* owner;
    static void release(void* p) {
      auto* o = static_cast<Owned*>(p);
      o->owner->live_ -= o->bytes;
      delete o;
    }
  };
  c10::Allocator* base_;
  std::atomic<int64_t> live_{0}, peak_{0}, limit_{std::numeric_limits<int64_t>::max()};
};

TEST(ShardingTest, FullShardingTrainsWhereADdpReplicaDoesNotFit) {
  if (!is_rank_child()) {
    for (const char* mode : {"ddp", "full"}) {
      ::setenv("WICK_SHARD_MEMORY_MODE", mode, 1);
      TempDir dir;
      const auto result = run_ranks(2, dir.str(), /*timeout_s=*/300);
      const auto report = wick::testing::read_text(dir.str() + "/memory.txt");
      std::cout << mode << ": " << report;
      if (std::string(mode) == "ddp") {
        EXPECT_FALSE(result) << "a DDP replica with Adam fit in the budget";
        EXPECT_THAT(report, ::testing::HasSubstr("over the budget"));
      } else {
        EXPECT_TRUE(result);
        EXPECT_THAT(report, ::testing::HasSubstr("trained 3 steps"));
      }
    }
    return;
  }
  const std::string mode = std::getenv("WICK_SHARD_MEMORY_MODE");
  auto pg = child_group();
  static BudgetAllocator budget{c10::GetDefaultCPUAllocator()};
  c10::SetCPUAllocator(&budget, /*priority=*/100);
  torch::manual_seed(0);
  auto model = std::make_shared<torch::nn::Module>();
  std::vector<std::shared_ptr<torch::nn::Module>> units;
  std::vector<Block> blocks;
  for (int i = 0; i < 12; ++i) {
    blocks.push_back(model->register_module("block" + std::to_string(i), Block(512, 1024)));
    units.push_back(blocks.back().ptr());
  }
  int64_t numel = 0;
  for (const auto& p : model->parameters()) numel += p.numel();
  const int64_t limit = 12 * numel;
  budget.set_limit(limit);
  std::ostringstream report;
  report << numel << " parameters (" << 4 * numel / (1 << 20) << " MiB), budget "
         << limit / (1 << 20) << " MiB; ";
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-4));
  int steps = 0;
  try {
    std::unique_ptr<wick::DistributedDataParallel> ddp;
    std::unique_ptr<wick::ShardedDataParallel> sdp;
    if (mode == "full") {
      sdp = std::make_unique<wick::ShardedDataParallel>(
          model, pg, opt, wick::ShardingOptions().strategy(ShardingStrategy::kFull).units(units));
    } else {
      ddp = std::make_unique<wick::DistributedDataParallel>(model, pg);
    }
    report << "held after wrapping " << budget.live() / (1 << 20) << " MiB; ";
    budget.reset_peak();
    for (; steps < 3; ++steps) {
      auto x = torch::randn({4, 512});
      if (sdp) sdp->prepare_forward();
      if (ddp) ddp->prepare_forward();
      auto h = x;
      for (auto& b : blocks) h = wick::unit_call(*b, [&] { return b->forward(h); });
      h.square().mean().backward();
      if (sdp) sdp->finalize_backward();
      if (ddp) ddp->finalize_backward();
      opt.step();
      opt.zero_grad();
    }
    report << "trained 3 steps, peak " << budget.peak() / (1 << 20) << " MiB";
    if (sdp) {
      const auto st = sdp->stats();
      report << " (optimizer state " << st.optimizer_state_bytes / (1 << 20)
             << " MiB, most parameters gathered at once "
             << st.peak_gathered_param_bytes / (1 << 20) << " MiB)";
    }
    budget.set_limit(std::numeric_limits<int64_t>::max());  // the destructors may gather
  } catch (const std::exception& e) {
    report << "at step " << steps << ": " << std::string(e.what()).substr(0, 100);
  }
  budget.set_limit(std::numeric_limits<int64_t>::max());
  report << "\n";
  if (pg->rank() == 0) std::ofstream(child_dir() + "/memory.txt") << report.str();
  ASSERT_EQ(steps, 3) << report.str();
}

// fp16 loss scaling: the ranks' gradient shards differ, so an overflow in one
// rank's shard must make every rank skip the step (set_process_group).
TEST(ShardingTest, ScalerSkipsOnEveryRankWhenOneShardOverflows) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str(), /*timeout_s=*/120));
    return;
  }
  auto pg = child_group();
  auto m = make_model();
  torch::optim::SGD opt(m->parameters(), 0.1);
  wick::ShardedDataParallel sdp(m.ptr(), pg, opt,
                                wick::ShardingOptions().strategy(ShardingStrategy::kZero2));
  wick::AmpScaler scaler(wick::AmpScalerOptions().init_scale(8.0));
  scaler.set_process_group(pg);
  for (int step = 0; step < 2; ++step) {
    sdp.prepare_forward();
    auto b = batch_of(step, pg->rank(), 2);
    scaler.scale(torch::mse_loss(m->forward(b.x), b.y)).backward();
    sdp.finalize_backward();
    if (step == 0 && pg->rank() == 1) {
      auto shards = sdp.sharded_parameters();
      shards.front().mutable_grad().view(-1)[0] = std::numeric_limits<float>::infinity();
    }
    const bool stepped = scaler.step(opt);
    scaler.update();
    opt.zero_grad();
    EXPECT_EQ(stepped, step != 0) << "step " << step << " on rank " << pg->rank();
  }
  EXPECT_EQ(scaler.get_scale(), 4.0);
}

// The Trainer with TrainerOptions::sharding on 2 ranks: accumulation,
// clipping, validation and each precision give DDP's parameters and metrics.
// Clipping only in fp32: the sharded norm sums each parameter's squares in
// parts, so its coefficient may be a float32 ulp away from DDP's, and under
// bf16 or fp16 autocast a weight one ulp away can round to another 16-bit
// value (measured: 2e-5 relative after 12 bf16 steps, 3e-4 in fp16).
TEST(TrainerShardingTest, EveryStrategyMatchesDdp) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(2, dir.str(), /*timeout_s=*/300));
    std::cout << wick::testing::read_text(dir.str() + "/differences.txt");
    return;
  }
  auto pg = child_group();
  torch::manual_seed(7);
  auto x = torch::randn({96, 6}), y = torch::randn({96, 3});
  auto fit = [&](std::optional<ShardingStrategy> strategy, wick::Precision precision) {
    auto model = make_model();
    wick::SupervisedTask task(model, [](const torch::Tensor& out, const torch::Tensor& target) {
      return torch::mse_loss(out, target);
    });
    wick::FusedAdam opt(model->parameters(), wick::FusedAdamOptions(1e-2));
    auto source_options = [&](int64_t batch) {
      return wick::TensorBatchSourceOptions(batch).seed(3).rank(pg->rank()).world_size(2);
    };
    wick::TensorBatchSource train(x, y, source_options(4));
    wick::TensorBatchSource val(x.narrow(0, 0, 30), y.narrow(0, 0, 30),
                                source_options(4).shuffle(false));
    auto options = wick::TrainerOptions()
                       .max_epochs(2)
                       .grad_accum_steps(2)
                       .grad_clip_norm(precision == wick::Precision::kFP32 ? 0.5 : 0.0)
                       .precision(precision)
                       .log_system_metrics(false)
                       .process_group(pg);
    if (strategy) options.sharding(sharding(*strategy, model));
    wick::Trainer trainer(options);
    auto result = trainer.fit(task, opt, train, &val);
    EXPECT_EQ(result.state.step, 12);  // 96 / 2 ranks / 4 per batch / 2 per step, 2 epochs
    return std::make_pair(wick::testing::clone_parameters(*model),
                          result.last_val_metrics.at("val/loss"));
  };
  std::ostringstream report;
  for (auto precision : {wick::Precision::kFP32, wick::Precision::kBF16, wick::Precision::kFP16}) {
    const auto [ddp, ddp_loss] = fit(std::nullopt, precision);
    for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
      const auto [params, loss] = fit(s, precision);
      const double diff = max_relative_difference(params, ddp);
      EXPECT_LE(diff, 1e-6) << wick::to_string(s) << " " << wick::to_string(precision);
      EXPECT_NEAR(loss, ddp_loss, 1e-6 * std::abs(ddp_loss));
      report << "Trainer, 2 ranks, " << wick::to_string(precision) << ", " << wick::to_string(s)
             << " vs DDP: max relative difference " << diff << "\n";
    }
  }
  if (pg->rank() == 0) std::ofstream(child_dir() + "/differences.txt") << report.str();
}

// One sharded fit on this child's ranks, 96 samples, a global batch of 12
// split over the ranks (the same samples in every step whatever the world
// size), FusedAdam; stops after `max_steps` (-1: 2 epochs = 16 steps) and
// checkpoints every 4 steps into `ckpt_dir`. Rank 0 saves the parameters
// it ends with to `out`.
void sharded_fit(ShardingStrategy strategy, const std::string& ckpt_dir, int64_t max_steps,
                 const std::string& resume, const std::string& out, int64_t batch = 0,
                 int64_t expected_steps = 16, bool async_checkpoint = false) {
  auto pg = child_group();
  const int64_t world = pg->world_size();
  torch::manual_seed(7);
  auto x = torch::randn({96, 6}), y = torch::randn({96, 3});
  auto model = make_model();
  wick::SupervisedTask task(
      model, [](const torch::Tensor& o, const torch::Tensor& t) { return torch::mse_loss(o, t); });
  wick::FusedAdam opt(model->parameters(), wick::FusedAdamOptions(1e-2));
  // In order: a shuffled TensorBatchSource orders one rank's epoch (randperm
  // seeded by epoch_seed) unlike several ranks' (DistributedSampler's seed + epoch).
  wick::TensorBatchSource train(x, y,
                                wick::TensorBatchSourceOptions(batch > 0 ? batch : 12 / world)
                                    .shuffle(false)
                                    .rank(pg->rank())
                                    .world_size(world));
  wick::Trainer trainer(wick::TrainerOptions()
                            .max_epochs(2)
                            .max_steps(max_steps)
                            .log_system_metrics(false)
                            .process_group(pg)
                            .checkpoint_dir(ckpt_dir)
                            .checkpoint_every_n_steps(4)
                            .async_checkpoint(async_checkpoint)
                            .resume(resume)
                            .sharding(sharding(strategy, model)));
  wick::FitResult result;
  try {
    result = trainer.fit(task, opt, train);
  } catch (const std::exception& e) {
    if (pg->rank() == 0) std::ofstream(out + ".error") << e.what();
    throw;
  }
  EXPECT_EQ(result.state.step, max_steps > 0 ? max_steps : expected_steps);
  if (pg->rank() == 0) torch::save(wick::testing::clone_parameters(*model), out);
}

std::vector<torch::Tensor> load_params(const std::string& path) {
  std::vector<torch::Tensor> out;
  torch::load(out, path);
  return out;
}

// The parent runs the phases one after another, each in fresh rank children
// told what to do through the environment.
struct Phase {
  int world;
  ShardingStrategy strategy;
  int64_t max_steps;
  std::string resume, out;
  int64_t batch = 0;  // per rank; 0: 12 / world
  int64_t expected_steps = 16;
  bool async_checkpoint = false;  // TrainerOptions::async_checkpoint
};

::testing::AssertionResult run_phase(const std::string& dir, const Phase& p) {
  ::setenv("WICK_SHARD_PHASE",
           c10::str(wick::to_string(p.strategy), ";", p.max_steps, ";", p.resume, ";", p.out, ";",
                    p.batch, ";", p.expected_steps, ";", p.async_checkpoint ? 1 : 0)
               .c_str(),
           1);
  return run_ranks(p.world, dir, /*timeout_s=*/240);
}

void run_child_phase(const std::string& dir) {
  const std::string spec = std::getenv("WICK_SHARD_PHASE");
  std::vector<std::string> f;
  std::stringstream in(spec);
  for (std::string item; std::getline(in, item, ';');) f.push_back(item);
  f.resize(7);
  sharded_fit(wick::parse_sharding_strategy(f[0]), dir + "/ckpt", std::stoll(f[1]), f[2],
              dir + "/" + f[3], std::stoll(f[4]), std::stoll(f[5]), f[6] == "1");
}

// Stopped at step 6 and resumed from the step-4 checkpoint's successor
// (step 8 is written after the resume): the same world size gives the
// uninterrupted run's parameters bit for bit, with synchronous checkpoints
// and (ZeRO-2, full sharding) with asynchronous ones.
TEST(TrainerShardingTest, ResumeIsBitIdentical) {
  if (is_rank_child()) return run_child_phase(child_dir());
  for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
    TempDir straight;
    ASSERT_TRUE(run_phase(straight.str(), {2, s, -1, "", "params.pt"}));
    const auto a = load_params(straight.str() + "/params.pt");
    for (bool async : {false, true}) {
      if (async && s == ShardingStrategy::kZero1) continue;  // zero2's save path
      TempDir split;
      ASSERT_TRUE(run_phase(split.str(), {2, s, 6, "", "first.pt", 0, 16, async}));
      ASSERT_TRUE(run_phase(split.str(), {2, s, -1, "latest", "params.pt", 0, 16, async}));
      const auto b = load_params(split.str() + "/params.pt");
      ASSERT_EQ(a.size(), b.size());
      for (size_t i = 0; i < a.size(); ++i) {
        EXPECT_TRUE(torch::equal(a[i], b[i]))
            << wick::to_string(s) << (async ? " async" : "") << ": parameter " << i;
      }
    }
  }
}

// A checkpoint written by 2 ranks continues on 3, one by 3 on 1, one by 1 on
// 2, and a zero2 checkpoint under full sharding: each ends where a run that
// never changed ends, up to the order of the sums across ranks.
TEST(TrainerShardingTest, ResumesOnAnotherWorldSizeAndStrategy) {
  if (is_rank_child()) return run_child_phase(child_dir());
  TempDir reference;
  ASSERT_TRUE(run_phase(reference.str(), {2, ShardingStrategy::kFull, -1, "", "params.pt"}));
  const auto expected = load_params(reference.str() + "/params.pt");
  struct Change {
    int from, to;
    ShardingStrategy before, after;
    bool async_checkpoint;  // the first run's checkpoints
  };
  for (const auto& c : {Change{2, 3, ShardingStrategy::kFull, ShardingStrategy::kFull, true},
                        Change{3, 1, ShardingStrategy::kZero2, ShardingStrategy::kZero2, false},
                        Change{1, 2, ShardingStrategy::kZero1, ShardingStrategy::kFull, false}}) {
    TempDir dir;
    // Step 6 of 8 in the first epoch: the resume continues mid-epoch.
    ASSERT_TRUE(
        run_phase(dir.str(), {c.from, c.before, 6, "", "first.pt", 0, 16, c.async_checkpoint}));
    ASSERT_TRUE(run_phase(dir.str(), {c.to, c.after, -1, "latest", "params.pt"}));
    const double diff = max_relative_difference(load_params(dir.str() + "/params.pt"), expected);
    EXPECT_LE(diff, 1e-5) << c.from << " -> " << c.to << " ranks";
    std::cout << "resumed on " << c.to << " ranks (" << wick::to_string(c.after) << ") from "
              << c.from << " (" << wick::to_string(c.before)
              << (c.async_checkpoint ? ", async checkpoints" : "")
              << "): max relative difference to the 2-rank run " << diff << "\n";
  }
}

// The same batch per rank on more ranks: an epoch has fewer batches, and the
// resume continues at the same fraction of the epoch when that is a batch
// boundary (step 6 of 12 on 2 ranks is batch 4 of 8 on 3), and refuses by
// name when it is not (step 5).
TEST(TrainerShardingTest, MidEpochResumeMapsToTheNewEpochLength) {
  if (is_rank_child()) return run_child_phase(child_dir());
  {
    TempDir dir;
    ASSERT_TRUE(run_phase(dir.str(), {2, ShardingStrategy::kZero2, 6, "", "first.pt", 4}));
    // 6 steps, then 4 to the first epoch's end and 8 in the second.
    ASSERT_TRUE(
        run_phase(dir.str(), {3, ShardingStrategy::kZero2, -1, "latest", "params.pt", 4, 18}));
  }
  {
    TempDir dir;
    ASSERT_TRUE(run_phase(dir.str(), {2, ShardingStrategy::kZero2, 5, "", "first.pt", 4}));
    // fit's end saved step 5: batch 5 of 12 would be batch 10/3 of 8.
    EXPECT_FALSE(run_phase(dir.str(), {3, ShardingStrategy::kZero2, -1, "latest", "params.pt", 4}));
    EXPECT_THAT(wick::testing::read_text(dir.str() + "/params.pt.error"),
                ::testing::HasSubstr("stopped after batch 5 of 12 in epoch 0; this run's epochs "
                                     "have 8 batches per rank"));
  }
}

// The sharded checkpoint's consolidated export: one safetensors file with
// the whole model, equal to the trained module.
TEST(TrainerShardingTest, ConsolidatesToOneSafetensorsFile) {
  if (is_rank_child()) return run_child_phase(child_dir());
  TempDir dir;
  ASSERT_TRUE(run_phase(dir.str(), {3, ShardingStrategy::kFull, 8, "", "params.pt"}));
  const auto latest = wick::latest_checkpoint(dir.str() + "/ckpt");
  ASSERT_TRUE(latest.has_value());
  wick::consolidate_sharded_checkpoint(*latest, dir.str() + "/model.safetensors");
  auto model = make_model(99);
  wick::load_safetensors(dir.str() + "/model.safetensors", *model);
  const auto trained = load_params(dir.str() + "/params.pt");
  EXPECT_LE(max_relative_difference(wick::testing::clone_parameters(*model), trained), 0.0);
}
// One training step of `model` under `sdp` on the global batch of `step`.
void sdp_step(wick::ShardedDataParallel& sdp, Model& model, torch::optim::Optimizer& opt,
              int64_t step) {
  const auto& pg = sdp.process_group();
  auto b = batch_of(step, pg->rank(), pg->world_size());
  sdp.prepare_forward();
  torch::mse_loss(model->forward(b.x), b.y).backward();
  sdp.finalize_backward();
  opt.step();
  opt.zero_grad();
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// An asynchronous sharded save on 3 ranks writes the files a synchronous save
// of the same moment writes, byte for byte, though training changes every
// shard while the background write runs; each strategy. A rank's host copy
// is its own shards and optimizer state only.
TEST(ShardingTest, AsyncSaveWritesTheFilesOfItsMoment) {
  if (!is_rank_child()) {
    TempDir dir;
    ASSERT_TRUE(run_ranks(3, dir.str(), /*timeout_s=*/240));
    return;
  }
  auto pg = child_group();
  const std::string dir = child_dir();
  for (auto s : {ShardingStrategy::kZero1, ShardingStrategy::kZero2, ShardingStrategy::kFull}) {
    const std::string name = wick::to_string(s);
    auto model = make_model(0, 4);
    auto opt = adam(model->parameters());
    wick::ShardedDataParallel sdp(model.ptr(), pg, *opt, sharding(s, model));
    for (int64_t i = 0; i < 3; ++i) sdp_step(sdp, model, *opt, i);
    wick::Checkpoint sync_ckpt;
    sync_ckpt.set_train_state({3, 0, 0, 0});
    sdp.save_checkpoint(sync_ckpt, dir + "/sync-" + name);
    wick::AsyncCheckpointWriter writer;
    bool built = false;
    sdp.save_checkpoint_async(writer, dir + "/async-" + name, [&](wick::Checkpoint& c) {
      built = true;
      c.set_train_state({3, 0, 0, 0});
    });
    EXPECT_EQ(built, pg->rank() == 0) << "build runs on rank 0 only";
    for (int64_t i = 3; i < 6; ++i) sdp_step(sdp, model, *opt, i);  // meanwhile
    sdp.wait_checkpoint(writer);
    const auto stats = writer.stats();
    EXPECT_EQ(stats.saves_completed, 1) << name;
    // Parameters, exp_avg and exp_avg_sq of this rank's shard (fp32), a step
    // per part: a third of the model's state, not all of it.
    int64_t shard_numel = 0;
    for (const auto& t : sdp.sharded_parameters()) shard_numel += t.numel();
    int64_t total = 0;  // (full sharding holds none of the module's parameters at rest)
    for (const auto& p : make_model(0, 4)->parameters()) total += p.numel();
    EXPECT_LE(stats.last_snapshot_bytes, 12 * shard_numel + 8 * 64) << name;
    EXPECT_LE(stats.last_snapshot_bytes, 12 * total / 3 + 12 * 3 + 8 * 64) << name;
    EXPECT_GE(stats.last_snapshot_bytes, 12 * (total / 3 - 3)) << name;
    if (pg->rank() == 0) {
      const auto a = wick::Checkpoint::load(dir + "/sync-" + name);
      const auto b = wick::Checkpoint::load(dir + "/async-" + name);
      EXPECT_EQ(a.meta("sharding"), b.meta("sharding")) << name;
      for (int r = 0; r < 3; ++r) {
        const std::string file = "shard-0000" + std::to_string(r) + "-of-00003";
        ASSERT_TRUE(b.has_file(file)) << name;
        EXPECT_EQ(file_bytes(a.file_path(file)), file_bytes(b.file_path(file)))
            << name << ": " << file;
      }
      for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos)
            << "left behind: " << entry.path();
      }
    }
    pg->barrier();  // rank 0 has read them
  }
}

// A rank whose background write fails (its file size limit, RLIMIT_FSIZE,
// below its shard's size) fails the save on every rank, naming the rank:
// raised by the next save_checkpoint_async (which then starts nothing) and by
// wait_checkpoint; training goes on meanwhile; the previous checkpoint stays
// the newest, no staging directory is left, and the writer works again.
TEST(ShardingFaultTest, FailedBackgroundWriteIsRaisedOnEveryRank) {
  if (!is_rank_child()) {
    TempDir dir;
    EXPECT_TRUE(run_ranks(2, dir.str(), /*timeout_s=*/240));
    std::cout << wick::testing::read_text(dir.str() + "/errors.txt");
    return;
  }
  auto pg = child_group();
  const int64_t rank = pg->rank();
  const std::string ckpt = child_dir() + "/ckpt";
  auto model = make_model(0, 12);  // 3 200 parameters: 19 KB of state per rank
  auto opt = adam(model->parameters());
  wick::ShardedDataParallel sdp(model.ptr(), pg, *opt, sharding(ShardingStrategy::kZero2, model));
  wick::AsyncCheckpointWriter writer;
  int64_t step = 0;
  auto save = [&] {
    sdp.save_checkpoint_async(writer, ckpt + "/" + wick::checkpoint_name(step),
                              [&](wick::Checkpoint& c) {
                                c.set_train_state({step, 0, 0, 0});
                              });
  };
  // Rank 1 cannot write a file past 8 KiB while its background write runs.
  struct rlimit unlimited {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &unlimited), 0);
  auto save_failing_on_rank_1 = [&] {
    if (rank == 1) {
      ::signal(SIGXFSZ, SIG_IGN);  // write() fails with EFBIG instead
      struct rlimit small = unlimited;
      small.rlim_cur = 8192;
      ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
    }
    save();
    if (rank == 1) {
      while (writer.in_flight()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &unlimited), 0);
    }
  };
  sdp_step(sdp, model, *opt, step++);
  save();  // step 1: fine
  sdp.wait_checkpoint(writer);
  std::ostringstream errors;
  // Raised by the next save.
  sdp_step(sdp, model, *opt, step++);
  save_failing_on_rank_1();  // step 2
  sdp_step(sdp, model, *opt, step++);
  try {
    save();  // step 3: raises step 2's failure, starts nothing
    ADD_FAILURE() << "the next save did not raise the failed background write";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_THAT(msg, ::testing::HasSubstr("rank 1"));
    if (rank == 1) EXPECT_THAT(msg, ::testing::HasSubstr("File too large"));
    errors << "rank " << rank << ", raised by the next save: " << msg << "\n";
  }
  EXPECT_FALSE(writer.in_flight());
  // Raised by wait_checkpoint.
  sdp_step(sdp, model, *opt, step++);
  save_failing_on_rank_1();  // step 4
  try {
    sdp.wait_checkpoint(writer);
    ADD_FAILURE() << "wait_checkpoint did not raise the failed background write";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_THAT(msg, ::testing::HasSubstr("rank 1"));
    errors << "rank " << rank << ", raised by wait_checkpoint: " << msg << "\n";
  }
  // The writer works again.
  sdp_step(sdp, model, *opt, step++);
  save();  // step 5
  sdp.wait_checkpoint(writer);
  if (rank == 0) {
    const auto latest = wick::latest_checkpoint(ckpt);
    ASSERT_TRUE(latest.has_value());
    EXPECT_EQ(wick::Checkpoint::load(*latest).train_state().step, 5);
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(ckpt)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    EXPECT_THAT(names, ::testing::ElementsAre(wick::checkpoint_name(1), wick::checkpoint_name(5)));
  }
  std::cout << errors.str();
  std::ofstream(child_dir() + "/errors.txt", std::ios::app) << errors.str();
}

// Both ranks of a sharded run that checkpoints every step (12 MiB of shards
// per rank and save) are SIGKILLed 20 times at random moments once it
// trains (uniform over its next few steps), many inside a save; each time
// the run resumes from the newest checkpoint. Every other run saves
// asynchronously (TrainerOptions::async_checkpoint: the ranks' background
// writes and rank 0's commit run while training goes on). After every
// kill the newest complete checkpoint loads and every rank's file in it
// passes its size and CRC-32 check; in the end the run completes and no
// staging or temporary directory is left behind.
TEST(ShardingFaultTest, SigkillDuringShardedSavesKeepsTheLastCheckpoint) {
  constexpr int64_t kSteps = 80;
  if (is_rank_child()) {
    auto pg = child_group();
    torch::manual_seed(0);
    auto model = std::make_shared<torch::nn::Module>();
    std::vector<std::shared_ptr<torch::nn::Module>> units;
    for (int i = 0; i < 4; ++i) {
      units.push_back(model->register_module("block" + std::to_string(i), Block(256, 1024)));
    }
    wick::SupervisedTask task(
        model,
        [&](const torch::Tensor& x) {
          auto h = x;
          for (auto& u : units) {
            auto* b = u->as<BlockImpl>();
            h = wick::unit_call(*b, [&] { return b->forward(h); });
          }
          return h;
        },
        [](const torch::Tensor& o, const torch::Tensor& t) { return torch::mse_loss(o, t); });
    wick::FusedAdam opt(model->parameters(), wick::FusedAdamOptions(1e-4));
    auto x = torch::randn({64, 256}), y = torch::randn({64, 256});
    wick::TensorBatchSource train(
        x, y, wick::TensorBatchSourceOptions(4).shuffle(false).rank(pg->rank()).world_size(2));
    const std::string dir = child_dir() + "/ckpt";
    wick::Trainer trainer(
        wick::TrainerOptions()
            .max_epochs(-1)
            .max_steps(kSteps)
            .log_system_metrics(false)
            .process_group(pg)
            .checkpoint_dir(dir)
            .checkpoint_every_n_steps(1)
            .keep_last_k(2)
            .async_checkpoint(std::string(std::getenv("WICK_SHARD_ASYNC")) == "1")
            .resume(wick::latest_checkpoint(dir) ? "latest" : "")
            .sharding(wick::ShardingOptions().strategy(ShardingStrategy::kFull).units(units)));
    // Rank 0 says when it trains: the kills aim at the steps, not the start.
    struct Started : wick::Callback {
      std::string path;
      std::string name() const override { return "Started"; }
      void on_step_end(wick::Trainer& t) override {
        if (t.is_main() && !path.empty()) std::ofstream(std::exchange(path, "")) << "1";
      }
    };
    auto started = std::make_shared<Started>();
    started->path = child_dir() + "/started";
    trainer.add_callback(started);
    EXPECT_EQ(trainer.fit(task, opt, train).state.step, kSteps);
    return;
  }
  TempDir dir;
  const std::string ckpt = dir.str() + "/ckpt";
  std::mt19937 gen(12345);
  std::uniform_int_distribution<int> delay_ms(0, 400);
  int kills = 0, resumed_from_new = 0, in_save = 0, in_async_save = 0;
  int64_t last_step = -1;
  bool completed = false;
  while (!completed) {
    const bool async = kills % 2 == 1;
    ::setenv("WICK_SHARD_ASYNC", async ? "1" : "0", 1);
    const std::string started = dir.str() + "/started";
    std::filesystem::remove(started);
    const auto delay = std::chrono::milliseconds(delay_ms(gen));
    std::optional<std::chrono::steady_clock::time_point> seen;
    auto kill_now = [&] {
      if (kills >= 20) return false;  // the last run goes to its end
      if (!seen && std::filesystem::exists(started)) seen = std::chrono::steady_clock::now();
      return seen && std::chrono::steady_clock::now() - *seen >= delay;
    };
    const auto status =
        wick::testing::run_rank_processes({0, 1}, 2, dir.str(), std::chrono::minutes(5), kill_now);
    completed = status[0] == 0 && status[1] == 0;
    if (!completed) {
      ASSERT_LT(kills, 20) << "the last run, not killed, failed: "
                           << wick::testing::read_text(dir.str() + "/rank0.log");
      ++kills;
      // A kill inside a save leaves its staging or temporary directory.
      if (std::filesystem::exists(ckpt)) {
        for (const auto& entry : std::filesystem::directory_iterator(ckpt)) {
          if (entry.path().filename().string().find(".tmp-") != std::string::npos) {
            ++in_save;
            if (async) ++in_async_save;
            break;
          }
        }
      }
    }
    const auto latest = wick::latest_checkpoint(ckpt);
    if (!latest) continue;  // killed before the first checkpoint was complete
    const auto loaded = wick::Checkpoint::load(*latest);
    for (int r = 0; r < 2; ++r) {
      const std::string name = "shard-0000" + std::to_string(r) + "-of-00002";
      ASSERT_TRUE(loaded.has_file(name)) << *latest;
      EXPECT_NO_THROW(loaded.file_path(name)) << *latest;  // size and CRC-32
    }
    EXPECT_GE(loaded.train_state().step, last_step) << "the newest checkpoint went back";
    if (loaded.train_state().step > last_step) ++resumed_from_new;
    last_step = loaded.train_state().step;
  }
  EXPECT_EQ(kills, 20);
  EXPECT_EQ(last_step, kSteps);
  EXPECT_GE(resumed_from_new, 10) << "the kills did not let the run progress";
  // The last run pruned what the killed ones left (their processes are gone).
  for (const auto& entry : std::filesystem::directory_iterator(ckpt)) {
    const auto name = entry.path().filename().string();
    EXPECT_EQ(name.find(".tmp-"), std::string::npos) << "left behind: " << name;
  }
  EXPECT_GE(in_save, 5) << "too few kills landed inside a save";
  EXPECT_GE(in_async_save, 2) << "too few kills landed inside an asynchronous save";
  std::cout << kills << " kills (10 of runs saving asynchronously), " << in_save
            << " inside a save (" << in_async_save
            << " asynchronous); the newest checkpoint advanced " << resumed_from_new
            << " times; the run completed at step " << last_step << "\n";
}

}  // namespace
