#pragma once
// Content hashes: SHA-256 of bytes, and of a module's parameters, so two runs
// can be compared exactly ("bit-identical training") from their outputs.
//
//   std::cout << wick::parameters_sha256(*model) << "\n";   // 64 hex digits

#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace wick {

/// Incremental SHA-256 (FIPS 180-4).
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  /// The digest as 64 lowercase hex digits; the object is spent afterwards.
  std::string hex_digest();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t length_ = 0;
  bool done_ = false;
};

/// SHA-256 of `data`, hex.
std::string sha256_hex(const std::string& data);

/// SHA-256 over every parameter of `module` in named_parameters() order:
/// for each, its dotted name, dtype, shape, then its bytes (contiguous, on CPU).
std::string parameters_sha256(const torch::nn::Module& module);

}  // namespace wick
