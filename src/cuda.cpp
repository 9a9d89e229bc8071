#include <wick/cuda.h>

#include <ATen/Context.h>
#include <torch/cuda.h>

namespace wick {

namespace {

bool is_tf32(at::Float32Op op) {
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, op) ==
         at::Float32Precision::TF32;
}

void set(at::Float32Op op, bool tf32) {
  if (op == at::Float32Op::MATMUL) {
    // The matmul-precision setting first: it sets the CUDA matmul entry of the
    // per-backend table too, and keeps the legacy getters (allowTF32CuBLAS,
    // float32MatmulPrecision, which throw when the two disagree) readable by
    // code that still uses them (torch.compile's inductor does).
    at::globalContext().setFloat32MatmulPrecision(tf32 ? "high" : "highest");
  }
  at::globalContext().setFloat32Precision(
      at::Float32Backend::CUDA, op, tf32 ? at::Float32Precision::TF32 : at::Float32Precision::IEEE);
}

}  // namespace

void set_tf32(bool enabled) {
  set(at::Float32Op::MATMUL, enabled);
  set(at::Float32Op::CONV, enabled);
}

bool tf32_enabled() { return is_tf32(at::Float32Op::MATMUL); }

TF32Guard::TF32Guard(bool enabled)
    : prev_matmul_(is_tf32(at::Float32Op::MATMUL)), prev_conv_(is_tf32(at::Float32Op::CONV)) {
  set_tf32(enabled);
}

TF32Guard::~TF32Guard() {
  set(at::Float32Op::MATMUL, prev_matmul_);
  set(at::Float32Op::CONV, prev_conv_);
}

bool cuda_paths_available() {
#ifdef WICK_WITH_CUDA
  return torch::cuda::is_available();
#else
  return false;
#endif
}

}  // namespace wick
