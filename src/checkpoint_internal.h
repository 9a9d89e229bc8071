#pragma once
// Private to wick: what sharded checkpoints (src/shard_checkpoint.cpp) share
// with src/checkpoint.cpp.

#include <string>

namespace wick::detail {

/// ".<target_name>.tmp-<host>-<pid>-<16 hex>": the name of a temporary
/// directory beside a checkpoint, which prune_checkpoints() removes once the
/// process that made it (this one) is gone from this host.
std::string checkpoint_temp_name(const std::string& target_name);

}  // namespace wick::detail
