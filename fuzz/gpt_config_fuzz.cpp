// libFuzzer target: gpt::read_config (examples/gpt/config.cpp), the
// gpt_config.json that wick-gpt sample and serve read from a run directory.
//
// Fine: a GPTConfig that passes GPTConfig::check() with every size in
// [1, 2^31), or a c10::Error naming "gpt config". On success the config must
// survive config_to_json -> parse_config unchanged.

#include "fuzz_support.h"

#include "config.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  wick::fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using wick::fuzz::expect;
  const std::string dir = wick::fuzz::scratch().fresh();
  const std::string path = dir + "/gpt_config.json";
  wick::fuzz::write_file(path, data, size);

  gpt::GPTConfig c;
  if (!wick::fuzz::expect_clear_error("gpt config", [&] { c = gpt::read_config(path); })) return 0;
  expect(wick::fuzz::expect_clear_error("gpt config", [&] { c.check(); }),
         "parse_config returned a config check() rejects");
  for (int64_t v : {c.vocab, c.context, c.layers, c.width, c.heads, c.ffn_hidden, c.experts,
                    c.top_k, c.expert_hidden})
    expect(v >= 1 && v < (int64_t{1} << 31),
           "parse_config accepted a size out of range: " + std::to_string(v));
  expect(c.shared_experts >= 0 && c.shared_experts < (int64_t{1} << 31),
         "parse_config: shared_experts out of range");
  gpt::GPTConfig back;
  expect(wick::fuzz::expect_clear_error(
             "gpt config", [&] { back = gpt::parse_config(gpt::config_to_json(c), "round trip"); }),
         "parse_config rejects what config_to_json wrote");
  expect(back.vocab == c.vocab && back.context == c.context && back.layers == c.layers &&
             back.width == c.width && back.heads == c.heads && back.ffn_hidden == c.ffn_hidden &&
             back.rope_base == c.rope_base && back.moe == c.moe && back.experts == c.experts &&
             back.shared_experts == c.shared_experts && back.top_k == c.top_k &&
             back.expert_hidden == c.expert_hidden && back.aux_loss_weight == c.aux_loss_weight,
         "gpt config does not survive a round trip through config_to_json");
  return 0;
}
