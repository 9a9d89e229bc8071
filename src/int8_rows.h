#pragma once
// Per-row dynamic int8 for QuantizedLinear (private to src/): each row of a
// batch is quantized with its own scale and zero point, the int8 product is
// accumulated exactly in int32, and each output is dequantized from its own
// row's parameters. No step reads another row, and integer accumulation does
// not depend on how a GEMM blocks the batch, so a row's output is the same
// bits whatever batch it is in and whichever exact int32 GEMM computed it
// (docs/quantization.md, "Batch-independent answers").
//
// The float steps are written so that every element takes the same IEEE
// operations in the vector body and in the scalar tail (no fused multiply-add:
// this file builds with -ffp-contract=off), so a reference computing the same
// operations in float32 (tests/py/reference.py) gets the same bits.

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>

namespace wick::detail {

/// Row i of x ([rows, cols], row stride ld) maps [lo_i, hi_i], its min and max
/// widened to include 0, onto the integers [0, qmax]:
///   scale_i = (hi_i - lo_i) / qmax                  (1 for a row of zeros)
///   zp_i    = clamp(nearbyint(-lo_i / scale_i), 0, qmax)
///   q_ik    = clamp(nearbyint(x_ik * (1 / scale_i)) + zp_i, 0, qmax) + offset
/// all in float32. offset 0 stores uint8 codes; -128 stores the same codes
/// shifted into int8 (for s8 x s8 GEMMs), and zp_out then holds zp_i - 128,
/// so dequantize_rows undoes either form with the same integers.
void quantize_rows(const float* x, int64_t rows, int64_t cols, int64_t ld, int32_t qmax,
                   int32_t offset, uint8_t* q, float* scale, int32_t* zp_out);

/// y_ij = float(acc_ij - zp_i * colsum_j) * (scale_i * wscale_j) + bias_j, as
/// three rounded float32 operations (the product of the scales first).
/// colsum_j: the sum of row j of the int8 weight. bias may be null. acc and y
/// may be the same memory (dequantized in place): each element is read before
/// it is written, and no other element is read after it.
void dequantize_rows(const int32_t* acc, int64_t rows, int64_t cols, const float* scale,
                     const int32_t* zp, const int32_t* colsum, const float* wscale,
                     const float* bias, float* y);

/// Whether this LibTorch carries FBGEMM's int8 GEMM with an int32 output and
/// the CPU runs it (AVX2 or newer).
bool fbgemm_int32_gemm_available();

/// An int8 weight [n, k] packed for FBGEMM once; matmul gives the exact int32
/// product of uint8 rows with it. Exact as long as no u8 x s8 pair overflows
/// int16 on kernels without VNNI: the caller keeps the codes within
/// int8_activation_qmax(kFbgemm).
class FbgemmInt8Weight {
 public:
  FbgemmInt8Weight(const int8_t* weight, int64_t n, int64_t k);
  ~FbgemmInt8Weight();
  FbgemmInt8Weight(const FbgemmInt8Weight&) = delete;
  FbgemmInt8Weight& operator=(const FbgemmInt8Weight&) = delete;

  /// acc [rows, n] = q [rows, k] (uint8, row-major) x weight^T, on torch's
  /// intra-op threads. `then(r0, r1)` is called once per finished block of
  /// rows [r0, r1), on the thread that computed it, right after the block
  /// (batches of more than one block run block by block, a block per task;
  /// smaller ones as one FBGEMM call split across the threads, then one
  /// `then`).
  void matmul(const uint8_t* q, int64_t rows, int32_t* acc,
              const std::function<void(int64_t, int64_t)>& then) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int64_t n_, k_;
};

}  // namespace wick::detail
