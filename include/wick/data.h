#pragma once
// Data for training: the batch type, batch sources the Trainer reads, and the
// datasets the examples use (Fashion-MNIST's IDX files).
//
//   auto train = wick::FashionMNIST(wick::FashionMNIST::default_root(),
//   wick::FashionMNIST::Split::kTrain); wick::TensorBatchSource source(train.images(),
//   train.targets(),
//                                  wick::TensorBatchSourceOptions(64).shuffle(true).seed(1));
//   source.reset(/*epoch=*/0);
//   while (auto batch = source.next()) { /* batch->data, batch->target */ }

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace wick {

/// One batch: inputs and targets, as LibTorch's data API stacks them.
using Batch = torch::data::Example<torch::Tensor, torch::Tensor>;

/// Where the Trainer gets its batches. An epoch is reset(epoch), then next()
/// until it returns nullopt. Sources whose order is a function of the epoch
/// alone (TensorBatchSource) make mid-epoch resume exact.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  /// Starts `epoch` (0-based).
  virtual void reset(int64_t epoch) = 0;
  /// The next batch of the epoch, or nullopt at its end.
  virtual std::optional<Batch> next() = 0;
  /// Batches per epoch when known.
  virtual std::optional<int64_t> size() const { return std::nullopt; }
  /// Skips `n` batches of the current epoch (resume); the default calls next() n times.
  virtual void skip(int64_t n);
};

struct TensorBatchSourceOptions {
  /* implicit */ TensorBatchSourceOptions(int64_t batch_size) : batch_size_(batch_size) {}
  /// Samples per batch, >= 1.
  TORCH_ARG(int64_t, batch_size);
  /// Reshuffle every epoch with a generator seeded by (seed, epoch).
  TORCH_ARG(bool, shuffle) = true;
  /// Seed of the shuffling.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Drop the last batch when it is smaller than batch_size.
  TORCH_ARG(bool, drop_last) = false;
  /// Data-parallel sharding: this rank reads its share of every epoch, as
  /// DistributedSampler(n, rank, world_size, {shuffle, seed}) gives it (the
  /// order shuffled the same on every rank, padded to a multiple of
  /// world_size). world_size 1: no sharding.
  TORCH_ARG(int64_t, rank) = 0;
  TORCH_ARG(int64_t, world_size) = 1;
  /// Moves each batch there (non-blocking when pinned). Unset: batches stay
  /// on the device of the data.
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
};

/// Batches of in-memory tensors (first dimension = samples). The order of an
/// epoch depends only on (seed, epoch), so skip() is O(1) and resume exact.
/// Without shuffling (and without a device move) a batch is a view of the
/// data (narrow), not a copy: do not modify batches in place.
class TensorBatchSource : public BatchSource {
 public:
  TensorBatchSource(torch::Tensor data, torch::Tensor targets, TensorBatchSourceOptions options);
  void reset(int64_t epoch) override;
  std::optional<Batch> next() override;
  std::optional<int64_t> size() const override;
  void skip(int64_t n) override;

 private:
  torch::Tensor data_, targets_, order_;
  TensorBatchSourceOptions options_;
  int64_t cursor_ = 0;         // next sample position in order_
  int64_t epoch_samples_ = 0;  // this rank's samples per epoch
};

/// Adapts a LibTorch data loader (torch::data::make_data_loader with a
/// Stack<> transform) to a BatchSource. Each reset() restarts the loader; its
/// sampler decides the order (a RandomSampler draws from torch's global
/// generator, so mid-epoch resume replays the order only with a sequential one).
/// A reset() in mid-epoch with workers > 0 first reads out the rest of the
/// epoch: LibTorch refuses a new iterator while batches are in flight.
template <typename Loader>
class DataLoaderSource : public BatchSource {
 public:
  explicit DataLoaderSource(Loader& loader) : loader_(loader) {}
  void reset(int64_t) override {
    if (it_.has_value() && loader_.options().workers > 0) {
      auto end = loader_.end();
      while (*it_ != end) ++*it_;
    }
    it_.reset();
    it_.emplace(loader_.begin());
  }
  std::optional<Batch> next() override {
    TORCH_CHECK(it_.has_value(), "DataLoaderSource: next() before reset()");
    if (*it_ == loader_.end()) return std::nullopt;
    Batch batch = **it_;
    ++*it_;
    return batch;
  }

 private:
  Loader& loader_;
  std::optional<decltype(std::declval<Loader&>().begin())> it_;
};

/// Reads an IDX file (optionally gzip-compressed): magic, dimensions, data.
/// Supports unsigned byte data (type 0x08), the type MNIST-style datasets use.
/// Throws naming the file for a bad magic number, an unsupported type, a size
/// that does not match the header, or truncated data.
torch::Tensor read_idx(const std::string& path);

/// Fashion-MNIST from the IDX files of Debian's dataset-fashion-mnist
/// ({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz under `root`).
class FashionMNIST : public torch::data::datasets::Dataset<FashionMNIST> {
 public:
  enum class Split { kTrain, kTest };
  static constexpr double kMean = 0.2860;  ///< pixel mean of the training images (0..1 scale)
  static constexpr double kStd = 0.3530;   ///< pixel standard deviation

  /// $WICK_FASHION_MNIST_DIR when set, else /usr/share/datasets/fashion-mnist.
  static std::string default_root();

  /// Loads and validates the split: 60 000 (train) or 10 000 (test) 28x28
  /// images and labels in 0..9. `normalize`: (x/255 - kMean) / kStd, else x/255.
  FashionMNIST(const std::string& root, Split split, bool normalize = true);

  Batch get(size_t index) override;
  torch::optional<size_t> size() const override;

  /// [N, 1, 28, 28] float32.
  const torch::Tensor& images() const { return images_; }
  /// [N] int64 in 0..9.
  const torch::Tensor& targets() const { return targets_; }

 private:
  torch::Tensor images_, targets_;
};

}  // namespace wick
