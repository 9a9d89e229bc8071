#pragma once
// Switches of the CUDA backend that change how fast (and how exactly) float32
// arithmetic runs.
//
// TF32: on Ampere and later GPUs, float32 matrix products and convolutions can
// run on the tensor cores with a 10-bit mantissa (TensorFloat-32), about 8x
// the float32 rate on an H100/H200, at about 1e-3 relative error. LibTorch
// leaves it off for matrix products (on for cuDNN convolutions). Code that
// runs under bf16 autocast is not affected for the products autocast casts;
// what stays in float32 (the loss, norms) is.
//
//   wick::set_tf32(true);        // before training: fp32 matmuls and convolutions in TF32
//   bool on = wick::tf32_enabled();
//
// Settings are process-wide (at::globalContext()), through LibTorch 2.x's
// per-backend precision API (setFloat32Precision(CUDA, MATMUL / CONV, TF32 |
// IEEE)), which replaced setAllowTF32CuBLAS / setAllowTF32CuDNN; for matrix
// products also through setFloat32MatmulPrecision("high" | "highest"), which
// keeps the legacy getters consistent (LibTorch throws when code reads the
// legacy flag after only the new one was set). Both work without a GPU: they
// only record the choice.

namespace wick {

/// true: float32 matrix products (cuBLAS) and convolutions (cuDNN) on CUDA may
/// use TF32; false: full float32 ("ieee").
void set_tf32(bool enabled);

/// Whether float32 matrix products on CUDA may use TF32.
bool tf32_enabled();

/// Restores the TF32 setting found at construction when it goes out of scope.
class TF32Guard {
 public:
  explicit TF32Guard(bool enabled);
  ~TF32Guard();
  TF32Guard(const TF32Guard&) = delete;
  TF32Guard& operator=(const TF32Guard&) = delete;

 private:
  bool prev_matmul_;
  bool prev_conv_;
};

/// Whether LibTorch sees a CUDA device and this wick build has its CUDA paths
/// (WICK_WITH_CUDA).
bool cuda_paths_available();

}  // namespace wick
