#pragma once
// A small decoder-only transformer in the style of DeepSeek / LLaMA: RMSNorm,
// rotary position embeddings, SwiGLU feed-forward, causal attention through
// at::scaled_dot_product_attention, and optionally a DeepSeekMoE feed-forward
// (shared experts plus top-k routed experts with a load-balancing loss).
// Byte-level: the vocabulary is the 256 byte values.

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace gpt {

struct GPTConfig {
  int64_t vocab = 256;
  int64_t context = 128;  ///< longest sequence (rotary tables are built for it)
  int64_t layers = 4;
  int64_t width = 192;
  int64_t heads = 6;
  int64_t ffn_hidden = 512;  ///< SwiGLU hidden width (dense feed-forward)
  double rope_base = 10000.0;
  bool moe = false;
  int64_t experts = 8;          ///< routed experts
  int64_t shared_experts = 1;   ///< always-on experts
  int64_t top_k = 2;            ///< routed experts per token
  int64_t expert_hidden = 128;  ///< hidden width of each expert
  double aux_loss_weight = 0.01;
  /// Checks the sizes (width divisible by heads, even head size, ...).
  void check() const;
};

/// Keys and values of past positions, per layer: [batch, heads, length, head_dim].
struct KVCache {
  std::vector<torch::Tensor> keys, values;
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
};

/// Per-slot caches for batched decoding: slot i holds one sequence's keys and
/// values at positions 0..length-1 of [slots, heads, context, head_dim] per layer.
struct SlotCache {
  std::vector<torch::Tensor> keys, values;
  /// Allocates `slots` slots for `model_config` on `options`' device and dtype.
  void allocate(int64_t slots, int64_t layers, int64_t heads, int64_t context, int64_t head_dim,
                const torch::TensorOptions& options);
  int64_t slots() const { return keys.empty() ? 0 : keys[0].size(0); }
};

/// One batched decoding step, built once per step by GPTImpl::decode_slots and
/// shared by every layer.
struct SlotStep {
  std::vector<int64_t> slots, positions;  ///< per row: its sequence's slot and new position
  torch::Tensor slot_index;               ///< slots as a tensor, on the model's device
  torch::Tensor mask;      ///< [B, 1, 1, context]: row b sees positions 0..positions[b]
  torch::Tensor cos, sin;  ///< [B, 1, 1, head_dim / 2], the rows' rotary angles
};

class RMSNormImpl : public torch::nn::Module {
 public:
  explicit RMSNormImpl(int64_t width, double eps = 1e-6);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(int64_t width, int64_t hidden);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Linear gate{nullptr}, up{nullptr}, down{nullptr};
};
TORCH_MODULE(SwiGLU);

/// DeepSeekMoE's feed-forward: shared experts see every token; a router sends
/// each token to its top-k of the routed experts, weighted by the softmax of
/// the router's scores over those k. aux_loss() is the Switch-Transformer
/// balance loss of the last forward: experts x sum_i(fraction of tokens routed
/// to i x mean router probability of i).
class MoEImpl : public torch::nn::Module {
 public:
  explicit MoEImpl(const GPTConfig& config);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor aux_loss() const { return aux_loss_; }

  torch::nn::Linear router{nullptr};
  torch::nn::ModuleList shared{nullptr}, routed{nullptr};

 private:
  int64_t top_k_;
  torch::Tensor aux_loss_;
};
TORCH_MODULE(MoE);

class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t width, int64_t heads);
  /// x [B, T, C] at positions start..start+T-1; with a cache, appends this
  /// step's keys and values to cache->keys[layer] and attends to all of them.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer);
  /// One new position for each row of x [B, 1, C]: row b is the sequence in
  /// slot slots[b], at position positions[b] (its length so far); its key and
  /// value go into the slot, and it attends to the slot's positions 0..positions[b].
  torch::Tensor forward_slots(const torch::Tensor& x, const SlotStep& step, SlotCache& cache,
                              int64_t layer);
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
  int64_t heads() const { return heads_; }

 private:
  int64_t heads_;
};
TORCH_MODULE(Attention);

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const GPTConfig& config);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer);
  torch::Tensor forward_slots(const torch::Tensor& x, const SlotStep& step, SlotCache& cache,
                              int64_t layer);
  /// The MoE's balance loss of the last forward (0 without MoE).
  torch::Tensor aux_loss() const;

  RMSNorm norm1{nullptr}, norm2{nullptr};
  Attention attn{nullptr};
  SwiGLU ffn{nullptr};
  MoE moe{nullptr};
};
TORCH_MODULE(Block);

class GPTImpl : public torch::nn::Module {
 public:
  explicit GPTImpl(GPTConfig config);
  /// tokens [B, T] (int64, byte values) -> logits [B, T, vocab]. With a cache,
  /// the tokens continue the cached positions and the cache grows by T.
  torch::Tensor forward(const torch::Tensor& tokens, KVCache* cache = nullptr);
  /// Batched decoding: tokens [B] (each sequence's newest token), the slots of
  /// their sequences and their positions (lengths so far) -> logits [B, vocab];
  /// each slot's cache grows by one position.
  torch::Tensor decode_slots(const torch::Tensor& tokens, const std::vector<int64_t>& slots,
                             const std::vector<int64_t>& positions, SlotCache& cache);
  /// A SlotCache of `slots` slots for this model, on its device and dtype.
  SlotCache make_slot_cache(int64_t slots) const;
  /// Copies a single sequence's KVCache (batch 1) into `slot`.
  static void store(const KVCache& single, SlotCache& cache, int64_t slot);
  /// Sum over the blocks of the MoE balance losses of the last forward.
  torch::Tensor aux_loss() const;
  const GPTConfig& config() const { return config_; }
  int64_t parameter_count() const;

  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  RMSNorm norm{nullptr};
  torch::nn::Linear head{nullptr};

 private:
  GPTConfig config_;
  torch::Tensor cos_, sin_;  // [context, head_dim / 2]
};
TORCH_MODULE(GPT);

struct SampleOptions {
  int64_t max_new_tokens = 200;
  double temperature = 0.8;  ///< 0: greedy
  int64_t top_k = 0;         ///< 0: off
  double top_p = 1.0;        ///< 1: off
  uint64_t seed = 0;
};

/// Continues `prompt` (bytes) with the KV cache: one forward of the prompt,
/// then one position per step. Stops at max_new_tokens or at the context.
std::string generate(GPT& model, const std::string& prompt, const SampleOptions& options);

/// The next token's id from logits [vocab] by temperature / top-k / top-p.
int64_t sample_token(const torch::Tensor& logits, const SampleOptions& options,
                     at::Generator& generator);

}  // namespace gpt
