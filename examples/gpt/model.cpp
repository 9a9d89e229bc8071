#include "model.h"

#include <wick/shard.h>

#include <ATen/CPUGeneratorImpl.h>
#include <wick/amp.h>

#include <cmath>

namespace gpt {

void GPTConfig::check() const {
  TORCH_CHECK(vocab >= 2 && context >= 2 && layers >= 1 && width >= 2 && heads >= 1,
              "GPTConfig: vocab, context, layers, width and heads must be positive");
  TORCH_CHECK(width % heads == 0, "GPTConfig: width ", width, " must be divisible by heads ",
              heads);
  TORCH_CHECK((width / heads) % 2 == 0, "GPTConfig: the head size ", width / heads,
              " must be even (rotary embeddings rotate pairs)");
  if (moe) {
    TORCH_CHECK(experts >= 1 && top_k >= 1 && top_k <= experts,
                "GPTConfig: top_k must be in [1, experts = ", experts, "], got ", top_k);
    TORCH_CHECK(shared_experts >= 0, "GPTConfig: shared_experts must be >= 0, got ",
                shared_experts);
  }
}

void SlotCache::allocate(int64_t slots, int64_t layers, int64_t heads, int64_t context,
                         int64_t head_dim, const torch::TensorOptions& options) {
  keys.clear();
  values.clear();
  for (int64_t l = 0; l < layers; ++l) {
    keys.push_back(torch::zeros({slots, heads, context, head_dim}, options));
    values.push_back(torch::zeros({slots, heads, context, head_dim}, options));
  }
}

// ---------------------------------------------------------------- RMSNorm

RMSNormImpl::RMSNormImpl(int64_t width, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({width}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  // In float32 (float64 for a float64 model) whatever the autocast dtype: the
  // mean of squares needs the range.
  auto xf = x.scalar_type() == torch::kDouble ? x : x.to(torch::kFloat);
  auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps_);
  return (y * weight).to(x.scalar_type());
}

// ---------------------------------------------------------------- SwiGLU

SwiGLUImpl::SwiGLUImpl(int64_t width, int64_t hidden) {
  gate = register_module("gate",
                         torch::nn::Linear(torch::nn::LinearOptions(width, hidden).bias(false)));
  up =
      register_module("up", torch::nn::Linear(torch::nn::LinearOptions(width, hidden).bias(false)));
  down = register_module("down",
                         torch::nn::Linear(torch::nn::LinearOptions(hidden, width).bias(false)));
}

torch::Tensor SwiGLUImpl::forward(const torch::Tensor& x) {
  return down(torch::silu(gate(x)) * up(x));
}

// ---------------------------------------------------------------- MoE

MoEImpl::MoEImpl(const GPTConfig& config) : top_k_(config.top_k) {
  router = register_module(
      "router",
      torch::nn::Linear(torch::nn::LinearOptions(config.width, config.experts).bias(false)));
  shared = register_module("shared", torch::nn::ModuleList());
  routed = register_module("routed", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.shared_experts; ++i)
    shared->push_back(SwiGLU(config.width, config.expert_hidden));
  for (int64_t i = 0; i < config.experts; ++i)
    routed->push_back(SwiGLU(config.width, config.expert_hidden));
}

torch::Tensor MoEImpl::forward(const torch::Tensor& x) {
  const auto shape = x.sizes().vec();
  auto flat = x.reshape({-1, shape.back()});  // [N, C]
  auto out = torch::zeros_like(flat);
  for (const auto& e : *shared) out = out + e->as<SwiGLUImpl>()->forward(flat);

  auto probs = torch::softmax(router(flat).to(torch::kFloat), -1);  // [N, E]
  auto [top_p, top_i] = probs.topk(top_k_, -1);                     // [N, k]
  auto weights = top_p / top_p.sum(-1, true);
  const int64_t experts = static_cast<int64_t>(routed->size());
  for (int64_t e = 0; e < experts; ++e) {
    auto hit = top_i.eq(e);  // [N, k]
    auto rows = hit.any(-1).nonzero().squeeze(-1);
    if (rows.numel() == 0) continue;
    auto w = (weights * hit).sum(-1).index_select(0, rows).unsqueeze(-1);
    auto y = routed[e]->as<SwiGLUImpl>()->forward(flat.index_select(0, rows));
    out = out.index_add(0, rows, (y * w.to(y.scalar_type())).to(out.scalar_type()));
  }
  // Switch-Transformer balance: E * sum_i f_i * P_i, f_i the share of routing
  // slots that went to expert i, P_i its mean probability.
  auto counts =
      torch::zeros({experts}, probs.options())
          .index_add(0, top_i.reshape({-1}), torch::ones({top_i.numel()}, probs.options()));
  auto f = counts / static_cast<double>(top_i.numel());
  aux_loss_ = static_cast<double>(experts) * (f * probs.mean(0)).sum();
  return out.reshape(shape);
}

// ---------------------------------------------------------------- attention

namespace {

// Rotates the pairs (x[2i], x[2i+1]) of the last dimension by the angles of
// their positions: x is [B, H, T, D], cos/sin are [T, D/2].
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  auto xf = x.scalar_type() == torch::kDouble ? x : x.to(torch::kFloat);
  auto pairs = xf.unflatten(-1, {-1, 2});  // [B, H, T, D/2, 2]
  auto a = pairs.select(-1, 0), b = pairs.select(-1, 1);
  auto rotated = torch::stack({a * cos - b * sin, a * sin + b * cos}, -1).flatten(-2);
  return rotated.to(x.scalar_type());
}

// Causal attention over q, k, v [B, H, T, D]. On the CPU, LibTorch's flash
// kernel runs its backward pass 3.5x faster in float32 than in bfloat16
// (B 32, H 6, T 128, D 32, one core: forward + backward 27 against 96 ms),
// so under bf16 autocast the attention is computed in float32 there; on a
// GPU the bf16 flash kernels are the fast ones.
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v) {
  const auto dtype = q.scalar_type();
  if (q.is_cpu() && (dtype == torch::kBFloat16 || dtype == torch::kHalf)) {
    wick::AutocastGuard no_autocast(c10::DeviceType::CPU, torch::kBFloat16, /*enabled=*/false);
    return at::scaled_dot_product_attention(q.to(torch::kFloat), k.to(torch::kFloat),
                                            v.to(torch::kFloat), {}, 0.0,
                                            /*is_causal=*/true)
        .to(dtype);
  }
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
}

}  // namespace

AttentionImpl::AttentionImpl(int64_t width, int64_t heads) : heads_(heads) {
  qkv = register_module("qkv",
                        torch::nn::Linear(torch::nn::LinearOptions(width, 3 * width).bias(false)));
  proj = register_module("proj",
                         torch::nn::Linear(torch::nn::LinearOptions(width, width).bias(false)));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                     const torch::Tensor& sin, KVCache* cache, int64_t layer) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), D = C / heads_;
  auto parts = qkv(x).view({B, T, 3, heads_, D}).permute({2, 0, 3, 1, 4});  // [3, B, H, T, D]
  auto q = rope(parts[0], cos, sin), k = rope(parts[1], cos, sin), v = parts[2];
  int64_t past = 0;
  if (cache != nullptr) {
    if (static_cast<int64_t>(cache->keys.size()) <= layer) {
      cache->keys.resize(layer + 1);
      cache->values.resize(layer + 1);
    }
    auto& ck = cache->keys[layer];
    auto& cv = cache->values[layer];
    past = ck.defined() ? ck.size(2) : 0;
    ck = ck.defined() ? torch::cat({ck, k}, 2) : k;
    cv = cv.defined() ? torch::cat({cv, v}, 2) : v;
    k = ck;
    v = cv;
  }
  torch::Tensor y;
  if (past == 0) {
    y = causal_attention(q, k, v);
  } else {
    // Query i (position past + i) sees keys 0..past + i.
    auto mask = torch::ones({T, past + T}, torch::TensorOptions(torch::kBool).device(x.device()))
                    .tril(past);
    y = at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/false);
  }
  return proj(y.transpose(1, 2).reshape({B, T, C}));
}

torch::Tensor AttentionImpl::forward_slots(const torch::Tensor& x, const SlotStep& step,
                                           SlotCache& cache, int64_t layer) {
  const int64_t B = x.size(0), C = x.size(2), D = C / heads_;
  auto parts = qkv(x).view({B, 1, 3, heads_, D}).permute({2, 0, 3, 1, 4});  // [3, B, H, 1, D]
  auto q = rope(parts[0], step.cos, step.sin), k = rope(parts[1], step.cos, step.sin), v = parts[2];
  auto& ck = cache.keys[layer];
  auto& cv = cache.values[layer];
  for (int64_t b = 0; b < B; ++b) {
    ck[step.slots[b]].select(1, step.positions[b]).copy_(k[b].select(1, 0));
    cv[step.slots[b]].select(1, step.positions[b]).copy_(v[b].select(1, 0));
  }
  auto keys = ck.index_select(0, step.slot_index), values = cv.index_select(0, step.slot_index);
  auto y = at::scaled_dot_product_attention(q, keys, values, step.mask, 0.0, /*is_causal=*/false);
  return proj(y.transpose(1, 2).reshape({B, 1, C}));
}

// ---------------------------------------------------------------- blocks

BlockImpl::BlockImpl(const GPTConfig& config) {
  norm1 = register_module("norm1", RMSNorm(config.width));
  attn = register_module("attn", Attention(config.width, config.heads));
  norm2 = register_module("norm2", RMSNorm(config.width));
  if (config.moe) {
    moe = register_module("moe", MoE(config));
  } else {
    ffn = register_module("ffn", SwiGLU(config.width, config.ffn_hidden));
  }
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                 const torch::Tensor& sin, KVCache* cache, int64_t layer) {
  auto h = x + attn(norm1(x), cos, sin, cache, layer);
  return h + (moe ? moe(norm2(h)) : ffn(norm2(h)));
}

torch::Tensor BlockImpl::forward_slots(const torch::Tensor& x, const SlotStep& step,
                                       SlotCache& cache, int64_t layer) {
  auto h = x + attn->forward_slots(norm1(x), step, cache, layer);
  return h + (moe ? moe(norm2(h)) : ffn(norm2(h)));
}

torch::Tensor BlockImpl::aux_loss() const {
  return moe && moe->aux_loss().defined() ? moe->aux_loss() : torch::zeros({});
}

GPTImpl::GPTImpl(GPTConfig config) : config_(config) {
  config_.check();
  embed = register_module("embed", torch::nn::Embedding(config_.vocab, config_.width));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < config_.layers; ++i) blocks->push_back(Block(config_));
  norm = register_module("norm", RMSNorm(config_.width));
  head = register_module(
      "head",
      torch::nn::Linear(torch::nn::LinearOptions(config_.width, config_.vocab).bias(false)));
  // GPT-2's initialisation: N(0, 0.02), the residual projections scaled by 1/sqrt(2 layers).
  torch::NoGradGuard no_grad;
  for (auto& p : named_parameters()) {
    if (p.value().dim() < 2) continue;
    const bool residual =
        p.key().find("proj") != std::string::npos || p.key().find("down") != std::string::npos;
    p.value().normal_(0.0, residual ? 0.02 / std::sqrt(2.0 * config_.layers) : 0.02);
  }
  const int64_t half = config_.width / config_.heads / 2;
  auto inv = torch::pow(config_.rope_base,
                        -torch::arange(half, torch::kDouble) / static_cast<double>(half));
  auto angles = torch::outer(torch::arange(config_.context, torch::kDouble), inv);
  cos_ = register_buffer("rope_cos", angles.cos().to(torch::kFloat));
  sin_ = register_buffer("rope_sin", angles.sin().to(torch::kFloat));
}

torch::Tensor GPTImpl::forward(const torch::Tensor& tokens, KVCache* cache) {
  TORCH_CHECK(tokens.dim() == 2, "GPT: tokens must be [batch, time], got ", tokens.sizes());
  const int64_t past = cache ? cache->length() : 0;
  const int64_t T = tokens.size(1);
  TORCH_CHECK(past + T <= config_.context, "GPT: ", past + T, " positions exceed the context of ",
              config_.context);
  auto cos = cos_.narrow(0, past, T), sin = sin_.narrow(0, past, T);
  auto x = embed(tokens);
  for (size_t i = 0; i < blocks->size(); ++i) {
    // A unit of full sharding (wick::ShardedDataParallel): its parameters are
    // gathered for the call. Everything of the block that backward reaches is
    // returned, the MoE's balance loss too, so backward gathers the block
    // again before any of it runs.
    auto* block = blocks[i]->as<BlockImpl>();
    x = wick::unit_call(*block, [&] {
          auto y = block->forward(x, cos, sin, cache, static_cast<int64_t>(i));
          return std::make_pair(y, block->aux_loss());
        }).first;
  }
  return head(norm(x));
}

torch::Tensor GPTImpl::decode_slots(const torch::Tensor& tokens, const std::vector<int64_t>& slots,
                                    const std::vector<int64_t>& positions, SlotCache& cache) {
  const int64_t B = tokens.size(0);
  TORCH_CHECK(
      static_cast<int64_t>(slots.size()) == B && static_cast<int64_t>(positions.size()) == B,
      "GPT::decode_slots: one slot and one position per token");
  for (int64_t p : positions) {
    TORCH_CHECK(p >= 0 && p < config_.context, "GPT::decode_slots: position ", p,
                " is outside the context of ", config_.context);
  }
  SlotStep step{slots, positions, torch::tensor(slots, torch::kLong).to(tokens.device()),
                {},    {},        {}};
  auto pos = torch::tensor(positions, torch::kLong).to(cos_.device());
  step.cos = cos_.index_select(0, pos).view({B, 1, 1, -1});
  step.sin = sin_.index_select(0, pos).view({B, 1, 1, -1});
  // Row b sees the positions up to its own: arange(context) <= positions[b].
  step.mask = torch::arange(config_.context, pos.options())
                  .unsqueeze(0)
                  .le(pos.unsqueeze(1))
                  .view({B, 1, 1, config_.context});
  auto x = embed(tokens.view({B, 1}));
  for (size_t i = 0; i < blocks->size(); ++i) {
    x = blocks[i]->as<BlockImpl>()->forward_slots(x, step, cache, static_cast<int64_t>(i));
  }
  return head(norm(x)).squeeze(1);
}

SlotCache GPTImpl::make_slot_cache(int64_t slots) const {
  SlotCache cache;
  const auto& w = head->weight;
  cache.allocate(slots, config_.layers, config_.heads, config_.context,
                 config_.width / config_.heads,
                 torch::TensorOptions().dtype(w.scalar_type()).device(w.device()));
  return cache;
}

void GPTImpl::store(const KVCache& single, SlotCache& cache, int64_t slot) {
  for (size_t l = 0; l < single.keys.size(); ++l) {
    const int64_t n = single.keys[l].size(2);
    cache.keys[l][slot].narrow(1, 0, n).copy_(single.keys[l][0]);
    cache.values[l][slot].narrow(1, 0, n).copy_(single.values[l][0]);
  }
}

torch::Tensor GPTImpl::aux_loss() const {
  torch::Tensor total = torch::zeros({});
  for (const auto& b : *blocks) total = total + b->as<BlockImpl>()->aux_loss().to(total.device());
  return total;
}

int64_t GPTImpl::parameter_count() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}

// ---------------------------------------------------------------- sampling

int64_t sample_token(const torch::Tensor& logits, const SampleOptions& o,
                     at::Generator& generator) {
  auto l = logits.to(torch::kFloat).flatten();
  if (o.temperature <= 0) return l.argmax().item<int64_t>();
  l = l / o.temperature;
  if (o.top_k > 0 && o.top_k < l.size(0)) {
    auto kth = std::get<0>(l.topk(o.top_k)).min();
    l = l.masked_fill(l < kth, -INFINITY);
  }
  auto probs = torch::softmax(l, -1);
  if (o.top_p < 1.0) {
    auto [sorted, order] = probs.sort(/*dim=*/-1, /*descending=*/true);
    auto cumulative = sorted.cumsum(-1);
    // Keep the smallest prefix whose mass reaches top_p (the first token always).
    auto drop = (cumulative - sorted) >= o.top_p;
    sorted = sorted.masked_fill(drop, 0);
    probs = torch::zeros_like(probs).scatter(0, order, sorted);
  }
  return torch::multinomial(probs, 1, /*replacement=*/false, generator).item<int64_t>();
}

std::string generate(GPT& model, const std::string& prompt, const SampleOptions& options) {
  TORCH_CHECK(!prompt.empty(), "generate: the prompt is empty");
  c10::InferenceMode guard;
  model->eval();
  const auto device = model->parameters()[0].device();
  std::vector<int64_t> ids(prompt.begin(), prompt.end());
  for (auto& id : ids) id = static_cast<unsigned char>(id);
  const int64_t context = model->config().context;
  if (static_cast<int64_t>(ids.size()) > context - 1)
    ids.erase(ids.begin(), ids.end() - (context - 1));
  auto generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  KVCache cache;
  auto logits = model->forward(torch::tensor(ids).unsqueeze(0).to(device), &cache);
  std::string out;
  for (int64_t i = 0; i < options.max_new_tokens && cache.length() < context; ++i) {
    const int64_t next = sample_token(logits[0][-1].cpu(), options, generator);
    out.push_back(static_cast<char>(next));
    if (cache.length() == context) break;
    logits = model->forward(torch::tensor({next}).unsqueeze(0).to(device), &cache);
  }
  return out;
}

}  // namespace gpt
