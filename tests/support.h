#pragma once
// Shared helpers for wick's tests: a seeding fixture, tensor comparison,
// exception-message checks and scratch directories.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <ftw.h>
#include <stdio.h>
#include <unistd.h>

namespace wick::testing {

/// Seeds torch's generators so every test starts from the same state.
class SeededTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    torch::set_num_threads(1);
  }
};

/// Elementwise |a - b| <= atol + rtol * |b|, with a message naming the worst element.
inline ::testing::AssertionResult tensors_close(const torch::Tensor& a, const torch::Tensor& b,
                                                double rtol = 1e-6, double atol = 0.0) {
  if (a.sizes() != b.sizes()) {
    return ::testing::AssertionFailure() << "shapes differ: " << a.sizes() << " vs " << b.sizes();
  }
  auto ad = a.detach().to(torch::kCPU, torch::kFloat64);
  auto bd = b.detach().to(torch::kCPU, torch::kFloat64);
  auto err = (ad - bd).abs() - (atol + rtol * bd.abs());
  if (ad.numel() == 0 || err.max().item<double>() <= 0.0) return ::testing::AssertionSuccess();
  auto idx = err.flatten().argmax().item<int64_t>();
  return ::testing::AssertionFailure()
         << "max violation at flat index " << idx << ": " << ad.flatten()[idx].item<double>()
         << " vs " << bd.flatten()[idx].item<double>() << " (rtol " << rtol << ", atol " << atol
         << ")";
}

#define WICK_EXPECT_CLOSE(a, b, ...) \
  EXPECT_TRUE(::wick::testing::tensors_close((a), (b), ##__VA_ARGS__))

/// Bitwise equality of two tensors (dtype, shape and bytes).
inline ::testing::AssertionResult tensors_equal(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) {
    return ::testing::AssertionFailure() << "dtype/shape differ: " << a.toString() << a.sizes()
                                         << " vs " << b.toString() << b.sizes();
  }
  if (!torch::equal(a.cpu(), b.cpu())) return ::testing::AssertionFailure() << "values differ";
  return ::testing::AssertionSuccess();
}

/// Expects `stmt` to throw a c10::Error (or std::exception) whose message contains `substr`.
#define EXPECT_THROWS_WITH(stmt, substr)                                                 \
  do {                                                                                   \
    bool wick_threw_ = false;                                                            \
    try {                                                                                \
      stmt;                                                                              \
    } catch (const c10::Error& e) {                                                      \
      wick_threw_ = true;                                                                \
      EXPECT_NE(std::string(e.what_without_backtrace()).find(substr), std::string::npos) \
          << "message was: " << e.what_without_backtrace();                              \
    } catch (const std::exception& e) {                                                  \
      wick_threw_ = true;                                                                \
      EXPECT_NE(std::string(e.what()).find(substr), std::string::npos)                   \
          << "message was: " << e.what();                                                \
    }                                                                                    \
    EXPECT_TRUE(wick_threw_) << #stmt " did not throw";                                  \
  } while (0)

/// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("wick-test-" + std::to_string(::getpid()) + "-" + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  // Not std::filesystem::remove_all: the torch wheel's libtorch.so exports its
  // own copy, which binds ahead of libstdc++ and crashes with GCC 12's
  // recursive_directory_iterator. nftw + remove does the same with libc alone.
  ~TempDir() {
    ::nftw(
        path_.c_str(),
        [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
        FTW_DEPTH | FTW_PHYS);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

/// Detached copies of `module`'s parameters, in parameters() order.
inline std::vector<torch::Tensor> clone_parameters(const torch::nn::Module& module) {
  std::vector<torch::Tensor> out;
  for (const auto& p : module.parameters()) out.push_back(p.detach().clone());
  return out;
}

/// Calls `run(inputs[t])` `calls` times from one thread per input, all at once;
/// returns how many outputs were not bitwise equal to `expected[t]`.
template <typename Run>
int concurrent_mismatches(const Run& run, const std::vector<torch::Tensor>& inputs,
                          const std::vector<torch::Tensor>& expected, int calls) {
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (size_t t = 0; t < inputs.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < calls; ++i) {
        if (!torch::equal(run(inputs[t]), expected[t])) ++wrong;
      }
    });
  }
  for (auto& th : threads) th.join();
  return wrong.load();
}

/// True when CUDA tests can run; use with GTEST_SKIP().
inline bool cuda_available() { return torch::cuda::is_available(); }

/// Whether this binary is built with AddressSanitizer (WICK_SANITIZE=address).
/// Its quarantine holds freed memory back from reuse (256 MiB
/// by default), so a process's RSS is no measure of bounded memory there;
/// LeakSanitizer checks for leaks at exit instead.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif
#else
inline constexpr bool kAddressSanitizer = false;
#endif

}  // namespace wick::testing
