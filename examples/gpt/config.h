#pragma once
// gpt_config.json: the model's sizes, written by `wick-gpt train` into the run
// directory and read back by `sample` and `serve`.

#include "model.h"

#include <string>

namespace gpt {

/// The JSON text of `config` (pretty-printed, ending in a newline).
std::string config_to_json(const GPTConfig& config);

/// Parses gpt_config.json's text. Every key must be present with the right
/// type (integers within [1, 2^31), a finite positive rope_base, a boolean
/// moe, a finite aux_loss_weight >= 0) and the sizes must pass
/// GPTConfig::check(). Throws c10::Error naming `source` and the key.
GPTConfig parse_config(const std::string& text, const std::string& source);

/// Reads and parses the file at `path`.
GPTConfig read_config(const std::string& path);

}  // namespace gpt
