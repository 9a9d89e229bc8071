#include "wick/data.h"

#include "fs.h"

#include <wick/distributed.h>

#include <ATen/CPUGeneratorImpl.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

namespace wick {

// ---------------------------------------------------------------------------
// BatchSource

void BatchSource::skip(int64_t n) {
  TORCH_CHECK(n >= 0, "BatchSource: skip count must be >= 0, got ", n);
  for (int64_t i = 0; i < n; ++i) {
    if (!next()) break;
  }
}

// ---------------------------------------------------------------------------
// TensorBatchSource

namespace {

// splitmix64's finalizer: neighbouring (seed, epoch) pairs get unrelated seeds.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t epoch_seed(uint64_t seed, int64_t epoch) {
  return mix64(seed * 1000003ULL + static_cast<uint64_t>(epoch));
}

}  // namespace

TensorBatchSource::TensorBatchSource(torch::Tensor data, torch::Tensor targets,
                                     TensorBatchSourceOptions options)
    : data_(std::move(data)), targets_(std::move(targets)), options_(std::move(options)) {
  TORCH_CHECK(data_.defined(), "TensorBatchSource: data must be a defined tensor");
  TORCH_CHECK(targets_.defined(), "TensorBatchSource: targets must be a defined tensor");
  TORCH_CHECK(data_.dim() >= 1, "TensorBatchSource: data must have a sample dimension, got a ",
              data_.dim(), "-d tensor");
  TORCH_CHECK(targets_.dim() >= 1,
              "TensorBatchSource: targets must have a sample dimension, got a ", targets_.dim(),
              "-d tensor");
  TORCH_CHECK(
      options_.world_size() >= 1 && options_.rank() >= 0 && options_.rank() < options_.world_size(),
      "TensorBatchSource: rank must be in [0, world_size=", options_.world_size(), "), got ",
      options_.rank());
  TORCH_CHECK(data_.size(0) == targets_.size(0),
              "TensorBatchSource: data and targets must have the same number of samples, got ",
              data_.size(0), " and ", targets_.size(0));
  TORCH_CHECK(data_.size(0) > 0, "TensorBatchSource: data must hold at least one sample, got 0");
  epoch_samples_ =
      options_.world_size() == 1
          ? data_.size(0)
          : DistributedSampler(data_.size(0), options_.rank(), options_.world_size()).num_samples();
  TORCH_CHECK(options_.batch_size() >= 1, "TensorBatchSource: batch_size must be >= 1, got ",
              options_.batch_size());
  TORCH_CHECK(targets_.device() == data_.device(),
              "TensorBatchSource: data and targets must be on the same device, got ",
              data_.device(), " and ", targets_.device());
}

void TensorBatchSource::reset(int64_t epoch) {
  TORCH_CHECK(epoch >= 0, "TensorBatchSource: epoch must be >= 0, got ", epoch);
  const int64_t n = data_.size(0);
  if (options_.world_size() > 1) {
    DistributedSampler sampler(
        n, options_.rank(), options_.world_size(),
        DistributedSamplerOptions().shuffle(options_.shuffle()).seed(options_.seed()));
    sampler.set_epoch(epoch);
    order_ = sampler.indices();
  } else if (options_.shuffle()) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(epoch_seed(options_.seed(), epoch));
    order_ = torch::randperm(n, gen, torch::TensorOptions().dtype(torch::kLong));
  } else if (!order_.defined() || order_.size(0) != n) {
    order_ = torch::arange(n, torch::TensorOptions().dtype(torch::kLong));
  }
  if (order_.device() != data_.device()) order_ = order_.to(data_.device());
  cursor_ = 0;
}

std::optional<Batch> TensorBatchSource::next() {
  TORCH_CHECK(order_.defined(), "TensorBatchSource: next() before reset()");
  const int64_t n = epoch_samples_;
  const int64_t bs = options_.batch_size();
  if (cursor_ >= n) return std::nullopt;
  const int64_t end = std::min(cursor_ + bs, n);
  if (options_.drop_last() && end - cursor_ < bs) {
    cursor_ = n;
    return std::nullopt;
  }
  const int64_t start = cursor_;
  cursor_ = end;

  const torch::Device device = options_.device().value_or(data_.device());
  const bool identity_order = !options_.shuffle() && options_.world_size() == 1;
  // The batch's indices, taken only when a gather needs them (one op less per batch otherwise).
  torch::Tensor idx;
  auto gather = [&](const torch::Tensor& src) -> torch::Tensor {
    // In order and staying put: a view, no copy (the order is the identity).
    if (identity_order && device == src.device()) return src.narrow(0, start, end - start);
    if (!idx.defined()) idx = order_.slice(0, start, end);
    if (device != src.device() && device.is_cuda() && src.is_pinned()) {
      // Gather into pinned memory so the host-to-device copy can be asynchronous.
      std::vector<int64_t> shape = src.sizes().vec();
      shape[0] = idx.size(0);
      auto staged = torch::empty(shape, src.options().pinned_memory(true));
      torch::index_select_out(staged, src, 0, idx);
      return staged.to(device, /*non_blocking=*/true);
    }
    return src.index_select(0, idx).to(device);
  };
  return Batch(gather(data_), gather(targets_));
}

std::optional<int64_t> TensorBatchSource::size() const {
  const int64_t n = epoch_samples_;
  const int64_t bs = options_.batch_size();
  return options_.drop_last() ? n / bs : (n + bs - 1) / bs;
}

void TensorBatchSource::skip(int64_t n) {
  TORCH_CHECK(n >= 0, "TensorBatchSource: skip count must be >= 0, got ", n);
  TORCH_CHECK(order_.defined(), "TensorBatchSource: skip() before reset()");
  const int64_t samples = epoch_samples_;
  const int64_t remaining_batches =
      (samples - cursor_ + options_.batch_size() - 1) / options_.batch_size();
  cursor_ = n >= remaining_batches ? samples : cursor_ + n * options_.batch_size();
}

// ---------------------------------------------------------------------------
// IDX

namespace {

using detail::PathKind;
PathKind path_kind(const std::string& path) {
  return detail::path_kind(path, "wick data", /*follow_symlinks=*/true);
}

const char* idx_type_name(int type) {
  switch (type) {
    case 0x08:
      return "unsigned byte";
    case 0x09:
      return "signed byte";
    case 0x0B:
      return "short";
    case 0x0C:
      return "int";
    case 0x0D:
      return "float";
    case 0x0E:
      return "double";
    default:
      return "unknown";
  }
}

std::string hex_byte(int v) {
  static const char* digits = "0123456789ABCDEF";
  return std::string("0x") + digits[(v >> 4) & 0xF] + digits[v & 0xF];
}

// The largest IDX payload read_idx accepts; a header claiming more is corrupt
// rather than a dataset anyone loads whole into memory.
constexpr int64_t kMaxIdxBytes = int64_t{1} << 36;  // 64 GiB

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

// Reads up to `len` bytes; returns how many were read (fewer only at the end).
int64_t gz_read_full(gzFile f, const std::string& path, uint8_t* out, int64_t len) {
  int64_t done = 0;
  while (done < len) {
    const auto chunk = static_cast<unsigned>(std::min<int64_t>(len - done, int64_t{1} << 24));
    const int got = gzread(f, out + done, chunk);
    if (got < 0) {
      int errnum = 0;
      const char* msg = gzerror(f, &errnum);
      TORCH_CHECK(false, "read_idx: cannot read '", path, "': ", msg ? msg : "zlib error");
    }
    if (got == 0) break;
    done += got;
  }
  return done;
}

}  // namespace

torch::Tensor read_idx(const std::string& path) {
  const PathKind kind = path_kind(path);
  TORCH_CHECK(kind != PathKind::kMissing, "read_idx: file '", path, "' does not exist");
  TORCH_CHECK(kind != PathKind::kDirectory, "read_idx: '", path,
              "' is a directory, not an IDX file");
  GzFile file(gzopen(path.c_str(), "rb"));
  TORCH_CHECK(file != nullptr, "read_idx: cannot open '", path, "'");
  gzbuffer(file.get(), 1 << 18);

  std::array<uint8_t, 4> magic{};
  TORCH_CHECK(gz_read_full(file.get(), path, magic.data(), 4) == 4, "read_idx: '", path,
              "' is truncated: it ends inside the 4-byte magic number");
  TORCH_CHECK(magic[0] == 0 && magic[1] == 0, "read_idx: '", path,
              "' has a bad magic number: the first two bytes must be 0x00 0x00, got ",
              hex_byte(magic[0]), " ", hex_byte(magic[1]), " (not an IDX file?)");
  const int type = magic[2];
  TORCH_CHECK(type == 0x08, "read_idx: '", path, "' has data type ", hex_byte(type), " (",
              idx_type_name(type), "); only 0x08 (unsigned byte) is supported");
  const int ndims = magic[3];
  TORCH_CHECK(ndims >= 1 && ndims <= 4, "read_idx: '", path,
              "' has an unsupported number of dimensions: must be 1..4, got ", ndims);

  std::vector<int64_t> shape(ndims);
  int64_t expected = 1;
  for (int d = 0; d < ndims; ++d) {
    std::array<uint8_t, 4> b{};
    TORCH_CHECK(gz_read_full(file.get(), path, b.data(), 4) == 4, "read_idx: '", path,
                "' is truncated: its header ends inside dimension ", d, " of ", ndims);
    const uint32_t dim =
        (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
    TORCH_CHECK(dim > 0, "read_idx: '", path, "' has dimension ", d,
                " of size 0; sizes must be > 0");
    TORCH_CHECK(dim <= static_cast<uint32_t>(std::numeric_limits<int32_t>::max()), "read_idx: '",
                path, "' has dimension ", d, " of size ", dim,
                ", more than 2^31 - 1 (corrupt header?)");
    shape[d] = static_cast<int64_t>(dim);
    TORCH_CHECK(expected <= kMaxIdxBytes / shape[d], "read_idx: '", path, "' declares more than ",
                kMaxIdxBytes, " bytes of data (corrupt header?)");
    expected *= shape[d];
  }

  // Grown as data arrives rather than allocated from the header up front, in
  // chunks that start at 64 KiB and double while the file keeps up, so a
  // corrupt header over a short file fails fast with memory in proportion to
  // the file: a 20-byte file declaring 2^35 bytes reserved 64 MiB and zeroed
  // 16 MiB before (noticed while fuzzing read_idx: 150 inputs/s).
  auto buffer = std::make_unique<std::vector<uint8_t>>();
  int64_t got = 0;
  int64_t chunk = int64_t{1} << 16;
  while (got < expected) {
    const int64_t want = std::min(expected - got, chunk);
    buffer->resize(static_cast<size_t>(got + want));
    const int64_t n = gz_read_full(file.get(), path, buffer->data() + got, want);
    got += n;
    if (n < want) break;
    chunk = std::min<int64_t>(chunk * 2, int64_t{1} << 24);
  }
  const int64_t header_bytes = 4 + 4 * int64_t{ndims};
  TORCH_CHECK(got == expected, "read_idx: '", path, "' is truncated: its header declares shape ",
              c10::IntArrayRef(shape), " = ", expected, " bytes of data, but the file has ", got,
              " (", header_bytes + got, " bytes in all, expected ", header_bytes + expected, ")");
  int64_t trailing = 0;
  {
    std::array<uint8_t, 4096> scratch{};
    int64_t n = 0;
    while ((n = gz_read_full(file.get(), path, scratch.data(), scratch.size())) > 0) {
      trailing += n;
    }
  }
  TORCH_CHECK(trailing == 0, "read_idx: '", path, "' has ", trailing,
              " trailing bytes: its header declares shape ", c10::IntArrayRef(shape), " = ",
              expected, " bytes of data, but the file has ", expected + trailing);

  auto* raw = buffer.release();
  return torch::from_blob(
      raw->data(), shape, [raw](void*) { delete raw; },
      torch::TensorOptions().dtype(torch::kUInt8));
}

// ---------------------------------------------------------------------------
// FashionMNIST

std::string FashionMNIST::default_root() {
  const char* env = std::getenv("WICK_FASHION_MNIST_DIR");
  if (env != nullptr && env[0] != '\0') return env;
  return "/usr/share/datasets/fashion-mnist";
}

FashionMNIST::FashionMNIST(const std::string& root, Split split, bool normalize) {
  TORCH_CHECK(path_kind(root) == PathKind::kDirectory, "FashionMNIST: directory '", root,
              "' does not exist; install the Debian package dataset-fashion-mnist "
              "(scripts/setup does) or set WICK_FASHION_MNIST_DIR to a directory holding its "
              "IDX files");
  const bool train = split == Split::kTrain;
  const std::string prefix = train ? "train" : "t10k";
  const int64_t expected = train ? 60000 : 10000;
  const std::string dir = root.back() == '/' ? root : root + "/";
  const std::string images_path = dir + prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = dir + prefix + "-labels-idx1-ubyte.gz";

  torch::Tensor images = read_idx(images_path);
  torch::Tensor labels = read_idx(labels_path);
  TORCH_CHECK(images.dim() == 3 && images.size(1) == 28 && images.size(2) == 28, "FashionMNIST: '",
              images_path, "' must hold [N, 28, 28] images, got shape ", images.sizes());
  TORCH_CHECK(labels.dim() == 1, "FashionMNIST: '", labels_path,
              "' must hold [N] labels, got shape ", labels.sizes());
  TORCH_CHECK(images.size(0) == labels.size(0), "FashionMNIST: '", images_path, "' has ",
              images.size(0), " images but '", labels_path, "' has ", labels.size(0), " labels");
  TORCH_CHECK(images.size(0) == expected, "FashionMNIST: the ", prefix, " split must have ",
              expected, " samples, got ", images.size(0), " in '", images_path, "'");
  const int64_t max_label = labels.max().item<int64_t>();
  TORCH_CHECK(max_label <= 9, "FashionMNIST: '", labels_path, "' has labels outside 0..9 (max ",
              max_label, ")");

  images_ = images.to(torch::kFloat32).div_(255.0);
  if (normalize) images_.sub_(kMean).div_(kStd);
  images_ = images_.unsqueeze(1);
  targets_ = labels.to(torch::kInt64);
}

Batch FashionMNIST::get(size_t index) {
  const auto n = static_cast<size_t>(images_.size(0));
  TORCH_CHECK_INDEX(index < n, "FashionMNIST: index ", index, " is out of range for ", n,
                    " samples");
  const auto i = static_cast<int64_t>(index);
  return {images_[i], targets_[i]};
}

torch::optional<size_t> FashionMNIST::size() const { return static_cast<size_t>(images_.size(0)); }

}  // namespace wick
