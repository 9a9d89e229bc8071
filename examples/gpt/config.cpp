#include "config.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>

namespace gpt {

namespace {

using json = nlohmann::json;

// Sizes above this are a corrupt file, not a model anyone builds from it.
constexpr int64_t kMaxSize = std::numeric_limits<int32_t>::max();

const json& field(const json& j, const char* key, const std::string& source) {
  auto it = j.find(key);
  TORCH_CHECK(it != j.end(), "gpt config: '", source, "' has no \"", key, "\"");
  return *it;
}

int64_t size_field(const json& j, const char* key, const std::string& source, int64_t min) {
  const json& v = field(j, key, source);
  TORCH_CHECK(v.is_number_integer(), "gpt config: '", source, "': \"", key,
              "\" must be an integer, got ", v.dump());
  // Non-negative integers parse as unsigned (up to 2^64 - 1), negative ones as signed.
  const bool ok = v.is_number_unsigned() ? v.get<uint64_t>() >= static_cast<uint64_t>(min) &&
                                               v.get<uint64_t>() <= static_cast<uint64_t>(kMaxSize)
                                         : v.get<int64_t>() >= min && v.get<int64_t>() <= kMaxSize;
  TORCH_CHECK(ok, "gpt config: '", source, "': \"", key, "\" must be in [", min, ", ", kMaxSize,
              "], got ", v.dump());
  const int64_t out = v.get<int64_t>();
  return out;
}

double real_field(const json& j, const char* key, const std::string& source) {
  const json& v = field(j, key, source);
  TORCH_CHECK(v.is_number(), "gpt config: '", source, "': \"", key, "\" must be a number, got ",
              v.dump());
  const double out = v.get<double>();
  TORCH_CHECK(std::isfinite(out), "gpt config: '", source, "': \"", key, "\" must be finite, got ",
              v.dump());
  return out;
}

}  // namespace

std::string config_to_json(const GPTConfig& c) {
  const json j = {{"vocab", c.vocab},
                  {"context", c.context},
                  {"layers", c.layers},
                  {"width", c.width},
                  {"heads", c.heads},
                  {"ffn_hidden", c.ffn_hidden},
                  {"rope_base", c.rope_base},
                  {"moe", c.moe},
                  {"experts", c.experts},
                  {"shared_experts", c.shared_experts},
                  {"top_k", c.top_k},
                  {"expert_hidden", c.expert_hidden},
                  {"aux_loss_weight", c.aux_loss_weight}};
  return j.dump(2) + "\n";
}

GPTConfig parse_config(const std::string& text, const std::string& source) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK(!j.is_discarded(), "gpt config: '", source, "' is not valid JSON");
  TORCH_CHECK(j.is_object(), "gpt config: '", source, "' must hold a JSON object, got ",
              j.type_name());
  GPTConfig c;
  c.vocab = size_field(j, "vocab", source, 1);
  c.context = size_field(j, "context", source, 1);
  c.layers = size_field(j, "layers", source, 1);
  c.width = size_field(j, "width", source, 1);
  c.heads = size_field(j, "heads", source, 1);
  c.ffn_hidden = size_field(j, "ffn_hidden", source, 1);
  c.rope_base = real_field(j, "rope_base", source);
  TORCH_CHECK(c.rope_base > 0, "gpt config: '", source, "': \"rope_base\" must be > 0, got ",
              c.rope_base);
  const json& moe = field(j, "moe", source);
  TORCH_CHECK(moe.is_boolean(), "gpt config: '", source, "': \"moe\" must be true or false, got ",
              moe.dump());
  c.moe = moe.get<bool>();
  c.experts = size_field(j, "experts", source, 1);
  c.shared_experts = size_field(j, "shared_experts", source, 0);
  c.top_k = size_field(j, "top_k", source, 1);
  c.expert_hidden = size_field(j, "expert_hidden", source, 1);
  c.aux_loss_weight = real_field(j, "aux_loss_weight", source);
  TORCH_CHECK(c.aux_loss_weight >= 0, "gpt config: '", source,
              "': \"aux_loss_weight\" must be >= 0, got ", c.aux_loss_weight);
  try {
    c.check();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "gpt config: '", source, "': ", e.what_without_backtrace());
  }
  return c;
}

GPTConfig read_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "gpt config: cannot read '", path, "' (train into that --run-dir first)");
  std::ostringstream text;
  text << in.rdbuf();
  TORCH_CHECK(!in.bad(), "gpt config: error reading '", path, "'");
  return parse_config(text.str(), path);
}

}  // namespace gpt
