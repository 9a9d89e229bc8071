#include <wick/meters.h>

#include <torch/torch.h>

#ifdef WICK_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

namespace wick {

// ---------------------------------------------------------------------------
// ThroughputMeter

ThroughputMeter::ThroughputMeter(double smoothing) : smoothing_(smoothing) {
  TORCH_CHECK(smoothing >= 0.0 && smoothing < 1.0,
              "ThroughputMeter: smoothing must be in [0, 1), got ", smoothing);
}

void ThroughputMeter::update(int64_t samples, double seconds, int64_t tokens) {
  TORCH_CHECK(seconds > 0.0, "ThroughputMeter: seconds must be > 0, got ", seconds);
  TORCH_CHECK(samples >= 0 && tokens >= 0, "ThroughputMeter: samples and tokens must be >= 0, got ",
              samples, " and ", tokens);
  ema_samples_ =
      smoothing_ * ema_samples_ + (1.0 - smoothing_) * (static_cast<double>(samples) / seconds);
  ema_tokens_ =
      smoothing_ * ema_tokens_ + (1.0 - smoothing_) * (static_cast<double>(tokens) / seconds);
  ++updates_;
  total_samples_ += samples;
  total_tokens_ += tokens;
  total_seconds_ += seconds;
}

double ThroughputMeter::samples_per_s() const {
  if (updates_ == 0) return 0.0;
  return ema_samples_ / (1.0 - std::pow(smoothing_, static_cast<double>(updates_)));
}

double ThroughputMeter::tokens_per_s() const {
  if (updates_ == 0) return 0.0;
  return ema_tokens_ / (1.0 - std::pow(smoothing_, static_cast<double>(updates_)));
}

double ThroughputMeter::overall_samples_per_s() const {
  return total_seconds_ > 0 ? static_cast<double>(total_samples_) / total_seconds_ : 0.0;
}

double ThroughputMeter::overall_tokens_per_s() const {
  return total_seconds_ > 0 ? static_cast<double>(total_tokens_) / total_seconds_ : 0.0;
}

void ThroughputMeter::reset() { *this = ThroughputMeter(smoothing_); }

// ---------------------------------------------------------------------------
// StepTimeMeter

StepTimeMeter::StepTimeMeter(int64_t window) : window_(window) {
  TORCH_CHECK(window >= 1, "StepTimeMeter: window must be >= 1, got ", window);
}

void StepTimeMeter::add(double seconds) {
  times_.push_back(seconds);
  while (static_cast<int64_t>(times_.size()) > window_) times_.pop_front();
}

double StepTimeMeter::percentile(double p) const {
  TORCH_CHECK(p >= 0.0 && p <= 100.0, "StepTimeMeter: percentile must be in [0, 100], got ", p);
  if (times_.empty()) return 0.0;
  std::vector<double> v(times_.begin(), times_.end());
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

double StepTimeMeter::mean() const {
  if (times_.empty()) return 0.0;
  double s = 0;
  for (double t : times_) s += t;
  return s / static_cast<double>(times_.size());
}

double StepTimeMeter::max() const {
  return times_.empty() ? 0.0 : *std::max_element(times_.begin(), times_.end());
}

// ---------------------------------------------------------------------------
// Memory

HostMemory host_memory() {
  HostMemory m;
  std::ifstream in("/proc/self/status");
  std::string line;
  bool rss = false, hwm = false;
  while (std::getline(in, line)) {
    auto read_kb = [&](const char* key, int64_t& out) {
      if (line.rfind(key, 0) != 0) return false;
      std::istringstream s(line.substr(std::string(key).size()));
      int64_t kb = 0;
      s >> kb;
      out = kb * 1024;
      return true;
    };
    rss = read_kb("VmRSS:", m.rss_bytes) || rss;
    hwm = read_kb("VmHWM:", m.peak_rss_bytes) || hwm;
  }
  m.available = rss && hwm;
  return m;
}

CudaMemory cuda_memory(int device) {
  CudaMemory m;
#ifdef WICK_WITH_CUDA
  if (!torch::cuda::is_available() || device < 0 ||
      device >= static_cast<int>(torch::cuda::device_count()))
    return m;
  const auto stats =
      c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  m.available = true;
  m.allocated_bytes = stats.allocated_bytes[agg].current;
  m.peak_allocated_bytes = stats.allocated_bytes[agg].peak;
  m.reserved_bytes = stats.reserved_bytes[agg].current;
  m.peak_reserved_bytes = stats.reserved_bytes[agg].peak;
#endif
  return m;
}

void reset_cuda_peak_memory(int device) {
#ifdef WICK_WITH_CUDA
  if (!torch::cuda::is_available() || device < 0 ||
      device >= static_cast<int>(torch::cuda::device_count()))
    return;
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
#endif
}

// ---------------------------------------------------------------------------
// NVML, declared here (no nvml.h needed): the stable v2 entry points.

namespace {
using nvmlReturn_t = int;
using nvmlDevice_t = void*;
struct nvmlUtilization_t {
  unsigned int gpu;
  unsigned int memory;
};
struct nvmlMemory_t {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};
constexpr int kNvmlTemperatureGpu = 0;
}  // namespace

struct Nvml::Api {
  nvmlReturn_t (*init)();
  nvmlReturn_t (*shutdown)();
  const char* (*error_string)(nvmlReturn_t);
  nvmlReturn_t (*count)(unsigned int*);
  nvmlReturn_t (*handle)(unsigned int, nvmlDevice_t*);
  nvmlReturn_t (*name)(nvmlDevice_t, char*, unsigned int);
  nvmlReturn_t (*utilization)(nvmlDevice_t, nvmlUtilization_t*);
  nvmlReturn_t (*memory)(nvmlDevice_t, nvmlMemory_t*);
  nvmlReturn_t (*power)(nvmlDevice_t, unsigned int*);
  nvmlReturn_t (*temperature)(nvmlDevice_t, int, unsigned int*);
};

Nvml& Nvml::instance() {
  static Nvml nvml("libnvidia-ml.so.1");
  return nvml;
}

Nvml::Nvml(const std::string& library) {
  handle_ = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle_ == nullptr) {
    const char* err = ::dlerror();
    reason_ =
        library + " could not be loaded (no NVIDIA driver?): " + (err ? err : "unknown error");
    return;
  }
  auto api = std::make_unique<Api>();
  bool ok = true;
  auto sym = [&](auto& fn, const char* name) {
    void* p = ::dlsym(handle_, name);
    if (p == nullptr) {
      ok = false;
      if (reason_.empty()) reason_ = std::string("NVML lacks ") + name;
    }
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
  sym(api->init, "nvmlInit_v2");
  sym(api->shutdown, "nvmlShutdown");
  sym(api->error_string, "nvmlErrorString");
  sym(api->count, "nvmlDeviceGetCount_v2");
  sym(api->handle, "nvmlDeviceGetHandleByIndex_v2");
  sym(api->name, "nvmlDeviceGetName");
  sym(api->utilization, "nvmlDeviceGetUtilizationRates");
  sym(api->memory, "nvmlDeviceGetMemoryInfo");
  sym(api->power, "nvmlDeviceGetPowerUsage");
  sym(api->temperature, "nvmlDeviceGetTemperature");
  if (!ok) return;
  const nvmlReturn_t rc = api->init();
  if (rc != 0) {
    reason_ = std::string("nvmlInit failed: ") + api->error_string(rc);
    return;
  }
  api_ = api.release();
  available_ = true;
}

Nvml::~Nvml() {
  if (api_ != nullptr) {
    api_->shutdown();
    delete api_;
  }
  // The library stays loaded: unloading a driver library at exit gains nothing and risks
  // order-of-exit trouble.
}

int Nvml::device_count() const {
  if (!available_) return 0;
  unsigned int n = 0;
  return api_->count(&n) == 0 ? static_cast<int>(n) : 0;
}

GpuStats Nvml::query(int index) const {
  GpuStats s;
  if (!available_) {
    s.reason = reason_;
    return s;
  }
  nvmlDevice_t dev = nullptr;
  nvmlReturn_t rc = api_->handle(static_cast<unsigned int>(index), &dev);
  if (index < 0 || rc != 0) {
    s.reason = "no GPU " + std::to_string(index) + ": " +
               (index < 0 ? "negative index" : api_->error_string(rc));
    return s;
  }
  char name[96] = {0};
  if (api_->name(dev, name, sizeof name) == 0) s.name = name;
  nvmlUtilization_t u{};
  if (api_->utilization(dev, &u) == 0) {
    s.utilization_pct = u.gpu;
    s.memory_utilization_pct = u.memory;
  }
  nvmlMemory_t m{};
  if (api_->memory(dev, &m) == 0) {
    s.memory_used_bytes = static_cast<int64_t>(m.used);
    s.memory_total_bytes = static_cast<int64_t>(m.total);
  }
  unsigned int mw = 0;
  if (api_->power(dev, &mw) == 0) s.power_w = mw / 1000.0;
  unsigned int t = 0;
  if (api_->temperature(dev, kNvmlTemperatureGpu, &t) == 0) s.temperature_c = t;
  s.available = true;
  return s;
}

GpuStats gpu_stats(int index) { return Nvml::instance().query(index); }

double mfu(double samples_per_s, double flops_per_sample, double peak_flops) {
  TORCH_CHECK(flops_per_sample > 0, "mfu: flops_per_sample must be > 0, got ", flops_per_sample);
  TORCH_CHECK(peak_flops > 0, "mfu: peak_flops must be > 0, got ", peak_flops);
  return samples_per_s * flops_per_sample / peak_flops;
}

double linear_stack_train_flops(const std::vector<int64_t>& sizes) {
  TORCH_CHECK(sizes.size() >= 2, "linear_stack_train_flops: sizes needs >= 2 entries, got ",
              sizes.size());
  double macs = 0;
  for (size_t i = 0; i + 1 < sizes.size(); ++i)
    macs += static_cast<double>(sizes[i]) * static_cast<double>(sizes[i + 1]);
  return 6.0 * macs;
}

}  // namespace wick
