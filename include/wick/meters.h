#pragma once
// Meters: throughput, step-time percentiles, host and CUDA memory, GPU
// utilization/memory/power/temperature (NVML, loaded at run time) and MFU:
// what nvidia-smi and a Python loop's timers tell, as numbers a loop can log.
//
//   wick::ThroughputMeter throughput;              // smoothed samples/s and tokens/s
//   wick::StepTimeMeter step_times;                // percentiles of step seconds
//   for (...) {
//     auto t0 = std::chrono::steady_clock::now();
//     train_step();
//     double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
//     throughput.update(/*samples=*/64, s);
//     step_times.add(s);
//   }
//   auto mem = wick::host_memory();                // RSS and peak RSS from /proc/self/status
//   auto gpu = wick::gpu_stats(0);                 // gpu.available is false without a driver
//   double p99_ms = 1e3 * step_times.percentile(99);
//
// Nothing here throws for a missing GPU or driver: such values come back with
// `available == false` and a reason.

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace wick {

/// Samples (and tokens) per second: smoothed by an exponential moving average
/// over updates, and overall (totals over total time).
class ThroughputMeter {
 public:
  /// `smoothing` in [0, 1): the weight of the previous average (0: the last update only).
  explicit ThroughputMeter(double smoothing = 0.9);
  /// `samples` (and `tokens`) processed in `seconds` (> 0).
  void update(int64_t samples, double seconds, int64_t tokens = 0);
  /// Smoothed rates (0 before the first update); the average is bias-corrected as Adam's moments.
  double samples_per_s() const;
  double tokens_per_s() const;
  /// Totals over total time.
  double overall_samples_per_s() const;
  double overall_tokens_per_s() const;
  int64_t total_samples() const { return total_samples_; }
  double total_seconds() const { return total_seconds_; }
  void reset();

 private:
  double smoothing_;
  double ema_samples_ = 0.0, ema_tokens_ = 0.0;
  int64_t updates_ = 0;
  int64_t total_samples_ = 0, total_tokens_ = 0;
  double total_seconds_ = 0.0;
};

/// Step times over a sliding window of the last `window` steps.
class StepTimeMeter {
 public:
  /// `window`: steps kept; >= 1.
  explicit StepTimeMeter(int64_t window = 1000);
  void add(double seconds);
  /// The p-th percentile (p in [0, 100]) by linear interpolation between
  /// order statistics (numpy's default); 0 when empty.
  double percentile(double p) const;
  double mean() const;
  double max() const;
  int64_t size() const { return static_cast<int64_t>(times_.size()); }
  void clear() { times_.clear(); }

 private:
  int64_t window_;
  std::deque<double> times_;
};

/// This process's resident memory (Linux /proc/self/status VmRSS, VmHWM).
struct HostMemory {
  bool available = false;
  int64_t rss_bytes = 0;
  int64_t peak_rss_bytes = 0;
};
HostMemory host_memory();

/// CUDA caching allocator statistics of one device (c10::cuda::CUDACachingAllocator).
struct CudaMemory {
  bool available = false;  ///< false on a build or machine without CUDA
  int64_t allocated_bytes = 0;
  int64_t reserved_bytes = 0;
  int64_t peak_allocated_bytes = 0;
  int64_t peak_reserved_bytes = 0;
};
CudaMemory cuda_memory(int device = 0);
/// Resets the peaks (torch.cuda.reset_peak_memory_stats); does nothing without CUDA.
void reset_cuda_peak_memory(int device = 0);

/// One GPU's state from NVML.
struct GpuStats {
  bool available = false;
  std::string reason;  ///< why not available ("libnvidia-ml.so.1 not found", "no device 3", ...)
  std::string name;
  double utilization_pct = 0;  ///< GPU busy time over the last sample period
  double memory_utilization_pct = 0;
  int64_t memory_used_bytes = 0;
  int64_t memory_total_bytes = 0;
  double power_w = 0;
  double temperature_c = 0;
};

/// NVML loaded with dlopen on first use: a machine without the driver gets
/// `available() == false` and a reason, never a crash or a link error.
class Nvml {
 public:
  /// The process-wide instance, loading `libnvidia-ml.so.1`.
  static Nvml& instance();
  /// An instance loading `library` (tests pass a name that does not exist).
  explicit Nvml(const std::string& library);
  ~Nvml();
  Nvml(const Nvml&) = delete;
  Nvml& operator=(const Nvml&) = delete;

  bool available() const { return available_; }
  /// Why NVML is unavailable ("" when available).
  const std::string& reason() const { return reason_; }
  int device_count() const;
  /// The state of device `index`; not available (with the reason) on failure.
  GpuStats query(int index) const;

 private:
  struct Api;
  void* handle_ = nullptr;
  Api* api_ = nullptr;
  bool available_ = false;
  std::string reason_;
};

/// Nvml::instance().query(index).
GpuStats gpu_stats(int index = 0);

/// Model FLOPs utilization: achieved FLOP/s (samples/s * FLOPs per sample,
/// forward and backward) over the hardware's peak FLOP/s. Throws for
/// non-positive flops_per_sample or peak_flops.
double mfu(double samples_per_s, double flops_per_sample, double peak_flops);

/// FLOPs of one training sample of a stack of Linear layers (forward 2*in*out
/// per layer, backward twice that): 6 * sum(in*out). `sizes` = {784, 512, 256, 10}.
double linear_stack_train_flops(const std::vector<int64_t>& sizes);

}  // namespace wick
