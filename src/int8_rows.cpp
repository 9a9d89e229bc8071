#include "int8_rows.h"

#include "parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <memory>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WICK_INT8_ROWS_X86 1
#include <immintrin.h>
#endif

#if defined(WICK_INT8_ROWS_X86) && __has_include(<fbgemm/Fbgemm.h>)
#define WICK_HAVE_FBGEMM 1
#include <fbgemm/Fbgemm.h>
#endif

namespace wick::detail {
namespace {

// Elements per parallel task of the row passes: below this one thread does it all.
constexpr int64_t kGrainElements = 1 << 16;

int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, cols));
}

struct RowParams {
  float scale;
  float inv;
  float zero_point;
};

RowParams row_params(float lo, float hi, int32_t qmax) {
  lo = lo < 0.0f ? lo : 0.0f;
  hi = hi > 0.0f ? hi : 0.0f;
  float scale = (hi - lo) / static_cast<float>(qmax);
  // A row of zeros (or of non-finite values): any scale; 1 keeps 1/scale finite.
  if (!(scale >= FLT_MIN && scale <= FLT_MAX)) scale = 1.0f;
  float zp = std::nearbyint(-lo / scale);
  zp = zp > 0.0f ? zp : 0.0f;
  zp = zp < static_cast<float>(qmax) ? zp : static_cast<float>(qmax);
  return {scale, 1.0f / scale, zp};
}

// One code: the comparisons are written as _mm256_max_ps / _mm256_min_ps
// behave (a NaN becomes 0), so the scalar tail agrees with the vector body.
inline float quantize_one(float x, const RowParams& p, float qmax) {
  float r = std::nearbyint(x * p.inv) + p.zero_point;
  r = r > 0.0f ? r : 0.0f;
  return r < qmax ? r : qmax;
}

void minmax_scalar(const float* x, int64_t n, float* lo, float* hi) {
  float a = x[0], b = x[0];
  for (int64_t k = 1; k < n; ++k) {
    a = x[k] < a ? x[k] : a;
    b = x[k] > b ? x[k] : b;
  }
  *lo = a;
  *hi = b;
}

void quantize_row_scalar(const float* x, int64_t n, const RowParams& p, int32_t qmax,
                         int32_t offset, uint8_t* q) {
  const auto qf = static_cast<float>(qmax);
  for (int64_t k = 0; k < n; ++k) {
    q[k] = static_cast<uint8_t>(static_cast<int32_t>(quantize_one(x[k], p, qf)) + offset);
  }
}

inline float dequantize_one(int32_t acc, int32_t zp, int32_t colsum, float scale, float wscale,
                            float bias) {
  // Wrapping int32 arithmetic, as _mm256_mullo_epi32 / _mm256_sub_epi32 do.
  const auto d = static_cast<int32_t>(static_cast<uint32_t>(acc) -
                                      static_cast<uint32_t>(zp) * static_cast<uint32_t>(colsum));
  const float s = scale * wscale;
  const float u = static_cast<float>(d) * s;
  return u + bias;
}

void dequantize_row_scalar(const int32_t* acc, int64_t from, int64_t n, int32_t zp,
                           const int32_t* colsum, float scale, const float* wscale,
                           const float* bias, float* y) {
  for (int64_t j = from; j < n; ++j) {
    y[j] = dequantize_one(acc[j], zp, colsum[j], scale, wscale[j], bias ? bias[j] : 0.0f);
  }
}

#ifdef WICK_INT8_ROWS_X86

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

__attribute__((target("avx2"))) void minmax_avx2(const float* x, int64_t n, float* lo, float* hi) {
  if (n < 8) return minmax_scalar(x, n, lo, hi);
  __m256 a = _mm256_loadu_ps(x), b = a;
  int64_t k = 8;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    a = _mm256_min_ps(a, v);
    b = _mm256_max_ps(b, v);
  }
  alignas(32) float la[8], lb[8];
  _mm256_store_ps(la, a);
  _mm256_store_ps(lb, b);
  float ra = la[0], rb = lb[0];
  for (int i = 1; i < 8; ++i) {
    ra = la[i] < ra ? la[i] : ra;
    rb = lb[i] > rb ? lb[i] : rb;
  }
  for (; k < n; ++k) {
    ra = x[k] < ra ? x[k] : ra;
    rb = x[k] > rb ? x[k] : rb;
  }
  *lo = ra;
  *hi = rb;
}

__attribute__((target("avx2"))) void quantize_row_avx2(const float* x, int64_t n,
                                                       const RowParams& p, int32_t qmax,
                                                       int32_t offset, uint8_t* q) {
  const __m256 inv = _mm256_set1_ps(p.inv), zp = _mm256_set1_ps(p.zero_point);
  const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(static_cast<float>(qmax));
  const __m256i off = _mm256_set1_epi32(offset);
  const __m256i pack_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    __m256i v[4];
    for (int g = 0; g < 4; ++g) {
      __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * g), inv),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_add_ps(r, zp);
      r = _mm256_min_ps(_mm256_max_ps(r, zero), top);
      v[g] = _mm256_add_epi32(_mm256_cvtps_epi32(r), off);
    }
    // int32 -> int16 -> int8 with wrap-free values: codes are in [-128, 255]
    // and packs saturate, so pack as signed 16 then mask back to bytes.
    const __m256i lo16 = _mm256_packs_epi32(v[0], v[1]);
    const __m256i hi16 = _mm256_packs_epi32(v[2], v[3]);
    const __m256i mask = _mm256_set1_epi16(0xff);
    const __m256i bytes =
        _mm256_packus_epi16(_mm256_and_si256(lo16, mask), _mm256_and_si256(hi16, mask));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm256_permutevar8x32_epi32(bytes, pack_order));
  }
  quantize_row_scalar(x + k, n - k, p, qmax, offset, q + k);
}

__attribute__((target("avx2"))) void dequantize_row_avx2(const int32_t* acc, int64_t n, int32_t zp,
                                                         const int32_t* colsum, float scale,
                                                         const float* wscale, const float* bias,
                                                         float* y) {
  const __m256i z = _mm256_set1_epi32(zp);
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + j));
    const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(a, _mm256_mullo_epi32(z, c)));
    const __m256 u = _mm256_mul_ps(d, _mm256_mul_ps(s, _mm256_loadu_ps(wscale + j)));
    _mm256_storeu_ps(y + j, bias ? _mm256_add_ps(u, _mm256_loadu_ps(bias + j))
                                 : _mm256_add_ps(u, _mm256_setzero_ps()));
  }
  dequantize_row_scalar(acc, j, n, zp, colsum, scale, wscale, bias, y);
}

bool has_avx512f() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

// dequantize_row_avx2 in 16 lanes: the same operations on each element.
__attribute__((target("avx512f"))) void dequantize_row_avx512(const int32_t* acc, int64_t n,
                                                              int32_t zp, const int32_t* colsum,
                                                              float scale, const float* wscale,
                                                              const float* bias, float* y) {
  const __m512i z = _mm512_set1_epi32(zp);
  const __m512 s = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i a = _mm512_loadu_si512(acc + j);
    const __m512i c = _mm512_loadu_si512(colsum + j);
    const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, _mm512_mullo_epi32(z, c)));
    const __m512 u = _mm512_mul_ps(d, _mm512_mul_ps(s, _mm512_loadu_ps(wscale + j)));
    _mm512_storeu_ps(y + j, bias ? _mm512_add_ps(u, _mm512_loadu_ps(bias + j))
                                 : _mm512_add_ps(u, _mm512_setzero_ps()));
  }
  dequantize_row_scalar(acc, j, n, zp, colsum, scale, wscale, bias, y);
}

#endif  // WICK_INT8_ROWS_X86

}  // namespace

void quantize_rows(const float* x, int64_t rows, int64_t cols, int64_t ld, int32_t qmax,
                   int32_t offset, uint8_t* q, float* scale, int32_t* zp_out) {
  TORCH_INTERNAL_ASSERT(cols >= 1 && qmax >= 1 && qmax <= 255);
  parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = x + i * ld;
      float lo = 0, hi = 0;
#ifdef WICK_INT8_ROWS_X86
      if (has_avx2()) {
        minmax_avx2(row, cols, &lo, &hi);
      } else {
        minmax_scalar(row, cols, &lo, &hi);
      }
#else
      minmax_scalar(row, cols, &lo, &hi);
#endif
      const RowParams p = row_params(lo, hi, qmax);
      scale[i] = p.scale;
      zp_out[i] = static_cast<int32_t>(p.zero_point) + offset;
#ifdef WICK_INT8_ROWS_X86
      if (has_avx2()) {
        quantize_row_avx2(row, cols, p, qmax, offset, q + i * cols);
        continue;
      }
#endif
      quantize_row_scalar(row, cols, p, qmax, offset, q + i * cols);
    }
  });
}

void dequantize_rows(const int32_t* acc, int64_t rows, int64_t cols, const float* scale,
                     const int32_t* zp, const int32_t* colsum, const float* wscale,
                     const float* bias, float* y) {
  parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
#ifdef WICK_INT8_ROWS_X86
      if (has_avx512f()) {
        dequantize_row_avx512(acc + i * cols, cols, zp[i], colsum, scale[i], wscale, bias,
                              y + i * cols);
        continue;
      }
      if (has_avx2()) {
        dequantize_row_avx2(acc + i * cols, cols, zp[i], colsum, scale[i], wscale, bias,
                            y + i * cols);
        continue;
      }
#endif
      dequantize_row_scalar(acc + i * cols, 0, cols, zp[i], colsum, scale[i], wscale, bias,
                            y + i * cols);
    }
  });
}

// ---------------------------------------------------------------- FBGEMM

#ifdef WICK_HAVE_FBGEMM

// The whole weight is one PackBMatrix. A batch of few rows runs as one
// FBGEMM call split across the threads (FBGEMM splits the columns when the
// rows are few, so one row still uses every thread); a larger batch runs
// block by block, each block of rows on one thread over all the columns.
// (Until 2026-12-06 the weight was packed in column blocks of 512, one FBGEMM
// call each: that packed the activations once per column block, 8 times on a
// 1024 x 4096 layer. The product alone is 0-7% faster in one piece on one
// thread; the whole forward, within the noise of docs/quantization.md.)
struct FbgemmInt8Weight::Impl {
  fbgemm::PackBMatrix<int8_t> packed;
  Impl(const int8_t* w, int64_t n, int64_t k)
      : packed(fbgemm::matrix_op_t::Transpose, static_cast<int32_t>(k), static_cast<int32_t>(n), w,
               static_cast<int32_t>(k), nullptr, 1) {}
};

bool fbgemm_int32_gemm_available() {
  static const bool yes = fbgemm::fbgemmSupportedCPU();
  return yes;
}

FbgemmInt8Weight::FbgemmInt8Weight(const int8_t* weight, int64_t n, int64_t k)
    : impl_(std::make_unique<Impl>(weight, n, k)), n_(n), k_(k) {}

// Rows per block of a large batch, one thread's FBGEMM call each. Each call
// streams the whole packed weight at least once (FBGEMM's own row blocks are
// 384 rows with AVX-512 VNNI, 120 with AVX2, 56 with AVX-512 alone), so a
// block must be large for a wide layer: at 1024 -> 4096 and 256 rows on one
// thread, blocks of 256 rows ran 2-4% faster than blocks of 64 and 8-11%
// faster than 32 (min of 290 calls each, interleaved, Xeon with AVX-512 VNNI), though
// a block's results (4 MiB) no longer stay in L2 until their dequantization.
// At 1024 outputs the block size made no difference.
constexpr int64_t kRowBlock = 256;

void FbgemmInt8Weight::matmul(const uint8_t* q, int64_t rows, int32_t* acc,
                              const std::function<void(int64_t, int64_t)>& then) const {
  const int tasks = at::get_num_threads();
  // Rows [r0, r1), as FBGEMM's task `task` of `of`.
  auto gemm = [&](int64_t r0, int64_t r1, int task, int of) {
    fbgemm::PackAMatrix<uint8_t> packed_a(fbgemm::matrix_op_t::NoTranspose,
                                          static_cast<int32_t>(r1 - r0), static_cast<int32_t>(k_),
                                          q + r0 * k_, static_cast<int32_t>(k_), nullptr, 1);
    fbgemm::DoNothing<int32_t, int32_t> nothing;
    fbgemm::memCopy<> copy(nothing);
    int32_t* out = acc + r0 * n_;
    fbgemm::fbgemmPacked(packed_a, impl_->packed, out, out, static_cast<uint32_t>(n_), copy, task,
                         of);
  };
  // Blocks of at most kRowBlock rows, evened out, and at least one per thread
  // once each can have 16 rows; 64 on a weight of more than 2 MiB, where
  // FBGEMM's own split (each thread half of the columns, so half the weight to
  // stream) was faster: on two threads at 1024 -> 4096, 32 rows ran 0.278 ms
  // against 0.313 in row blocks and 64 rows 0.512-0.674 against 0.544-0.693,
  // while at 1024 -> 1024 and 256 rows row blocks were 5% faster (min of 400
  // calls each, interleaved, Xeon with AVX-512 VNNI).
  const int64_t rows_per_task = n_ * k_ > (int64_t{2} << 20) ? 64 : 16;
  int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  blocks = std::max<int64_t>(blocks, std::min<int64_t>(tasks, rows / rows_per_task));
  if (blocks <= 1) {
    if (tasks == 1) {
      gemm(0, rows, 0, 1);
    } else {
      parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) gemm(0, rows, static_cast<int>(task), tasks);
      });
    }
    then(0, rows);
    return;
  }
  const int64_t per = (rows + blocks - 1) / blocks;
  parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * per, r1 = std::min(rows, r0 + per);
      if (r0 >= r1) continue;
      gemm(r0, r1, 0, 1);
      then(r0, r1);
    }
  });
}

#else

struct FbgemmInt8Weight::Impl {};

bool fbgemm_int32_gemm_available() { return false; }

FbgemmInt8Weight::FbgemmInt8Weight(const int8_t*, int64_t n, int64_t k) : n_(n), k_(k) {
  TORCH_CHECK(false, "QuantizedLinear: this LibTorch has no FBGEMM");
}

void FbgemmInt8Weight::matmul(const uint8_t*, int64_t, int32_t*,
                              const std::function<void(int64_t, int64_t)>&) const {
  TORCH_CHECK(false, "QuantizedLinear: this LibTorch has no FBGEMM");
}

#endif

FbgemmInt8Weight::~FbgemmInt8Weight() = default;

}  // namespace wick::detail
