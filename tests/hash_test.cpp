#include <wick/hash.h>

#include "support.h"

namespace {

// Expected digests from Python's hashlib (an independent implementation):
//   python3 -c "import hashlib;print(hashlib.sha256(b'abc').hexdigest())"
TEST(Sha256Test, MatchesHashlibOnKnownVectors) {
  EXPECT_EQ(wick::sha256_hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(wick::sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // 56 bytes: the padding spills into a second block.
  EXPECT_EQ(wick::sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // python3 -c "import hashlib;print(hashlib.sha256(b'a'*1000000).hexdigest())"
  wick::Sha256 h;
  std::string chunk(1000, 'a');
  for (int i = 0; i < 1000; ++i) h.update(chunk.data(), chunk.size());
  EXPECT_EQ(h.hex_digest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256Test, ParametersHashChangesWithOneBit) {
  torch::manual_seed(0);
  torch::nn::Linear a(4, 3);
  torch::manual_seed(0);
  torch::nn::Linear b(4, 3);
  EXPECT_EQ(wick::parameters_sha256(*a), wick::parameters_sha256(*b));
  {
    torch::NoGradGuard no_grad;
    auto bits = b->weight.view(-1).view(torch::kInt32);
    bits[0].bitwise_xor_(1);  // flip the lowest mantissa bit
  }
  EXPECT_NE(wick::parameters_sha256(*a), wick::parameters_sha256(*b));
}

}  // namespace
