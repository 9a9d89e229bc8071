// Tests for include/wick/data.h: the IDX reader (on files written here, plain
// and gzip'd, and on the real Fashion-MNIST files), FashionMNIST, and the
// batch sources.

#include "wick/data.h"

#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "support.h"

namespace {

using wick::testing::TempDir;
using wick::testing::tensors_equal;
using Bytes = std::vector<uint8_t>;

// An IDX header: 0x00 0x00, type, ndims, then each dimension big-endian.
Bytes idx_header(uint8_t type, const std::vector<uint32_t>& dims) {
  Bytes b{0, 0, type, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims) {
    b.push_back(static_cast<uint8_t>(d >> 24));
    b.push_back(static_cast<uint8_t>(d >> 16));
    b.push_back(static_cast<uint8_t>(d >> 8));
    b.push_back(static_cast<uint8_t>(d));
  }
  return b;
}

Bytes concat(Bytes a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Bytes iota_bytes(size_t n, uint8_t start = 0) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(start + i);
  return b;
}

std::string write_plain(const TempDir& dir, const std::string& name, const Bytes& bytes) {
  auto path = (dir.path() / name).string();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return path;
}

std::string write_gzip(const TempDir& dir, const std::string& name, const Bytes& bytes) {
  auto path = (dir.path() / name).string();
  gzFile f = gzopen(path.c_str(), "wb");
  EXPECT_NE(f, nullptr);
  if (!bytes.empty()) {
    EXPECT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
              static_cast<int>(bytes.size()));
  }
  gzclose(f);
  return path;
}

torch::Tensor u8(const Bytes& b, std::vector<int64_t> shape) {
  return torch::tensor(std::vector<int64_t>(b.begin(), b.end()), torch::kInt64)
      .to(torch::kUInt8)
      .reshape(shape);
}

// ---------------------------------------------------------------------------
// read_idx

TEST(ReadIdxTest, ReadsPlainFile) {
  TempDir dir;
  auto data = iota_bytes(2 * 3 * 4, 7);
  auto path = write_plain(dir, "a.idx", concat(idx_header(0x08, {2, 3, 4}), data));
  auto t = wick::read_idx(path);
  EXPECT_TRUE(tensors_equal(t, u8(data, {2, 3, 4})));
}

TEST(ReadIdxTest, ReadsGzipFile) {
  TempDir dir;
  auto data = iota_bytes(5 * 2 * 3 * 2, 200);  // wraps past 255
  auto path = write_gzip(dir, "a.idx.gz", concat(idx_header(0x08, {5, 2, 3, 2}), data));
  auto t = wick::read_idx(path);
  EXPECT_TRUE(tensors_equal(t, u8(data, {5, 2, 3, 2})));
}

TEST(ReadIdxTest, ReadsOneDimensionalLabels) {
  TempDir dir;
  Bytes data{9, 0, 0, 3, 255};
  auto path = write_gzip(dir, "l.gz", concat(idx_header(0x08, {5}), data));
  auto t = wick::read_idx(path);
  EXPECT_TRUE(tensors_equal(t, u8(data, {5})));
}

TEST(ReadIdxTest, ReadsLargerThanOneReadChunk) {
  // 3 MiB of data crosses zlib's buffer and read_idx's reserve boundaries.
  TempDir dir;
  const uint32_t rows = 3 * 1024, cols = 1024;
  Bytes data(size_t{rows} * cols);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>((i * 31) ^ (i >> 10));
  auto path = write_gzip(dir, "big.gz", concat(idx_header(0x08, {rows, cols}), data));
  auto t = wick::read_idx(path);
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{rows, cols}));
  ASSERT_TRUE(t.is_contiguous());
  EXPECT_EQ(std::memcmp(t.data_ptr<uint8_t>(), data.data(), data.size()), 0);
}

TEST(ReadIdxTest, MissingFileNamesThePath) {
  TempDir dir;
  auto path = (dir.path() / "nope-images-idx3-ubyte.gz").string();
  EXPECT_THROWS_WITH(wick::read_idx(path), path);
  EXPECT_THROWS_WITH(wick::read_idx(path), "does not exist");
}

TEST(ReadIdxTest, RejectsBadMagic) {
  TempDir dir;
  auto bytes = concat(idx_header(0x08, {2}), {1, 2});
  bytes[1] = 0x01;
  auto path = write_plain(dir, "bad-magic", bytes);
  EXPECT_THROWS_WITH(wick::read_idx(path), "bad magic number");
  EXPECT_THROWS_WITH(wick::read_idx(path), path);
  // A text file is not an IDX file either.
  auto text = write_gzip(dir, "text.gz", Bytes{'h', 'e', 'l', 'l', 'o', '\n'});
  EXPECT_THROWS_WITH(wick::read_idx(text), "bad magic number");
}

TEST(ReadIdxTest, RejectsUnsupportedTypeNamingIt) {
  TempDir dir;
  auto path = write_plain(dir, "float.idx", concat(idx_header(0x0D, {2}), Bytes(8, 0)));
  EXPECT_THROWS_WITH(wick::read_idx(path), "data type 0x0D (float)");
  EXPECT_THROWS_WITH(wick::read_idx(path), path);
  auto path2 = write_gzip(dir, "int.idx.gz", concat(idx_header(0x0C, {2}), Bytes(8, 0)));
  EXPECT_THROWS_WITH(wick::read_idx(path2), "data type 0x0C (int)");
}

TEST(ReadIdxTest, RejectsTruncatedDataWithExpectedAndActualBytes) {
  TempDir dir;
  auto bytes = concat(idx_header(0x08, {2, 3}), iota_bytes(4));
  for (bool gz : {false, true}) {
    auto path = gz ? write_gzip(dir, "t.gz", bytes) : write_plain(dir, "t", bytes);
    EXPECT_THROWS_WITH(wick::read_idx(path), "truncated");
    EXPECT_THROWS_WITH(wick::read_idx(path), "6 bytes of data, but the file has 4");
    EXPECT_THROWS_WITH(wick::read_idx(path), path);
  }
}

TEST(ReadIdxTest, RejectsTrailingBytes) {
  TempDir dir;
  auto bytes = concat(idx_header(0x08, {2, 3}), iota_bytes(9));
  for (bool gz : {false, true}) {
    auto path = gz ? write_gzip(dir, "t.gz", bytes) : write_plain(dir, "t", bytes);
    EXPECT_THROWS_WITH(wick::read_idx(path), "3 trailing bytes");
    EXPECT_THROWS_WITH(wick::read_idx(path), "6 bytes of data, but the file has 9");
    EXPECT_THROWS_WITH(wick::read_idx(path), path);
  }
}

TEST(ReadIdxTest, RejectsTruncatedHeader) {
  TempDir dir;
  auto empty = write_plain(dir, "empty", {});
  EXPECT_THROWS_WITH(wick::read_idx(empty), "truncated");
  auto header = idx_header(0x08, {2, 3});
  header.resize(header.size() - 2);
  auto path = write_gzip(dir, "h.gz", header);
  EXPECT_THROWS_WITH(wick::read_idx(path), "header ends inside dimension 1 of 2");
}

TEST(ReadIdxTest, RejectsWrongDimensions) {
  TempDir dir;
  auto zero_dims = write_plain(dir, "d0", Bytes{0, 0, 0x08, 0});
  EXPECT_THROWS_WITH(wick::read_idx(zero_dims), "number of dimensions: must be 1..4, got 0");
  auto five = write_plain(dir, "d5", concat(idx_header(0x08, {1, 1, 1, 1, 1}), {7}));
  EXPECT_THROWS_WITH(wick::read_idx(five), "number of dimensions: must be 1..4, got 5");
  auto zero_size = write_plain(dir, "z", idx_header(0x08, {3, 0}));
  EXPECT_THROWS_WITH(wick::read_idx(zero_size), "dimension 1 of size 0");
  // A header that claims 2^31-1 x 2^31-1 bytes is corrupt, whatever follows.
  auto huge = write_plain(dir, "huge", concat(idx_header(0x08, {0x7FFFFFFF, 0x7FFFFFFF}), {1}));
  EXPECT_THROWS_WITH(wick::read_idx(huge), "corrupt header");
  auto too_big_dim = write_plain(dir, "big", concat(idx_header(0x08, {0x80000000u}), {1}));
  EXPECT_THROWS_WITH(wick::read_idx(too_big_dim), "more than 2^31 - 1");
}

TEST(ReadIdxTest, RejectsCorruptGzipStream) {
  TempDir dir;
  auto good = write_gzip(dir, "g.gz", concat(idx_header(0x08, {64}), iota_bytes(64)));
  std::ifstream in(good, std::ios::binary);
  Bytes gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Flip bits in the deflate payload (after the 10-byte gzip header), keep the rest.
  for (size_t i = 12; i < gz.size() - 8; ++i) gz[i] ^= 0x5A;
  auto bad = write_plain(dir, "bad.gz", gz);
  EXPECT_THROWS_WITH(wick::read_idx(bad), bad);
}

// ---------------------------------------------------------------------------
// FashionMNIST on the real files (Debian's dataset-fashion-mnist)

std::string real_root() { return wick::FashionMNIST::default_root(); }

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

#define WICK_REQUIRE_FASHION_MNIST()                    \
  if (!is_directory(real_root()))                       \
  GTEST_SKIP() << "no Fashion-MNIST at " << real_root() \
               << " (install dataset-fashion-mnist or set WICK_FASHION_MNIST_DIR)"

// Expected values below come from independent Python (gzip + numpy), e.g.
//   python -c "import gzip,numpy as np; d='/usr/share/datasets/fashion-mnist/';
//     x=np.frombuffer(gzip.open(d+'t10k-images-idx3-ubyte.gz').read(),np.uint8,offset=16)
//       .reshape(-1,784).astype(np.int64);
//     print(x[0].sum(), (x[0]*np.arange(784)).sum(), x.sum(), x[-1].sum())"
//   -> 33456 15975114 573469082 24390
constexpr int64_t kTestFirstImageSum = 33456;
constexpr int64_t kTestFirstImageWeightedSum = 15975114;
constexpr int64_t kTestAllPixelsSum = 573469082;
constexpr int64_t kTestLastImageSum = 24390;

TEST(FashionMNISTTest, ReadsRawTestFilesLikePython) {
  WICK_REQUIRE_FASHION_MNIST();
  auto images = wick::read_idx(real_root() + "/t10k-images-idx3-ubyte.gz");
  ASSERT_EQ(images.sizes(), (std::vector<int64_t>{10000, 28, 28}));
  auto first = images[0].flatten().to(torch::kInt64);
  EXPECT_EQ(first.sum().item<int64_t>(), kTestFirstImageSum);
  EXPECT_EQ((first * torch::arange(784)).sum().item<int64_t>(), kTestFirstImageWeightedSum);
  EXPECT_EQ(images.to(torch::kInt64).sum().item<int64_t>(), kTestAllPixelsSum);
  EXPECT_EQ(images[9999].to(torch::kInt64).sum().item<int64_t>(), kTestLastImageSum);
}

TEST(FashionMNISTTest, LoadsTestSplit) {
  WICK_REQUIRE_FASHION_MNIST();
  wick::FashionMNIST raw(real_root(), wick::FashionMNIST::Split::kTest, /*normalize=*/false);
  ASSERT_EQ(raw.size().value(), 10000u);
  ASSERT_EQ(raw.images().sizes(), (std::vector<int64_t>{10000, 1, 28, 28}));
  EXPECT_EQ(raw.images().scalar_type(), torch::kFloat32);
  EXPECT_EQ(raw.targets().scalar_type(), torch::kInt64);
  // Python: np.bincount(labels) -> 1000 per class; labels[:10] -> 9 2 1 1 6 1 4 6 5 7
  EXPECT_TRUE(tensors_equal(torch::bincount(raw.targets()), torch::full({10}, 1000, torch::kLong)));
  EXPECT_TRUE(tensors_equal(raw.targets().slice(0, 0, 10),
                            torch::tensor({9, 2, 1, 1, 6, 1, 4, 6, 5, 7}, torch::kLong)));
  // x/255 scaling: the first image sums to 33456/255.
  EXPECT_NEAR(raw.images()[0].sum().item<double>(), kTestFirstImageSum / 255.0, 1e-3);
  EXPECT_GE(raw.images().min().item<float>(), 0.0f);
  EXPECT_LE(raw.images().max().item<float>(), 1.0f);

  // Normalized: Python ((x[0]/255 - 0.2860)/0.3530).sum() = -263.5240793201
  wick::FashionMNIST norm(real_root(), wick::FashionMNIST::Split::kTest);
  EXPECT_NEAR(norm.images()[0].sum().item<double>(), -263.5240793201, 1e-3);
  EXPECT_TRUE(tensors_equal(norm.targets(), raw.targets()));

  auto example = norm.get(3);
  EXPECT_TRUE(tensors_equal(example.data, norm.images()[3]));
  EXPECT_EQ(example.target.item<int64_t>(), 1);
  EXPECT_THROWS_WITH(norm.get(10000), "out of range");
}

TEST(FashionMNISTTest, TrainSplitMatchesNormalizationConstants) {
  WICK_REQUIRE_FASHION_MNIST();
  wick::FashionMNIST train(real_root(), wick::FashionMNIST::Split::kTrain, /*normalize=*/false);
  ASSERT_EQ(train.size().value(), 60000u);
  EXPECT_TRUE(
      tensors_equal(torch::bincount(train.targets()), torch::full({10}, 6000, torch::kLong)));
  // Python over the raw training bytes: x.mean() = 0.2860405969887955, x.std() =
  // 0.35302424451492254 (x = bytes/255 in float64; pixel sum 3431114169).
  auto x = train.images().to(torch::kFloat64);
  // float32 x/255 values: agree to ~1e-8.
  EXPECT_NEAR(x.mean().item<double>(), 0.2860405969887955, 1e-7);
  EXPECT_NEAR(x.std(/*unbiased=*/false).item<double>(), 0.35302424451492254, 1e-7);
  EXPECT_NEAR(wick::FashionMNIST::kMean, 0.2860405969887955, 5e-5);
  EXPECT_NEAR(wick::FashionMNIST::kStd, 0.35302424451492254, 5e-5);
}

TEST(FashionMNISTTest, MissingRootNamesItAndThePackage) {
  TempDir dir;
  auto root = (dir.path() / "absent").string();
  EXPECT_THROWS_WITH(wick::FashionMNIST(root, wick::FashionMNIST::Split::kTest), root);
  EXPECT_THROWS_WITH(wick::FashionMNIST(root, wick::FashionMNIST::Split::kTest),
                     "dataset-fashion-mnist");
  // A directory without the files: read_idx names the missing file.
  EXPECT_THROWS_WITH(wick::FashionMNIST(dir.str(), wick::FashionMNIST::Split::kTest),
                     "t10k-images-idx3-ubyte.gz");
}

TEST(FashionMNISTTest, ValidatesShapesCountsAndLabels) {
  TempDir dir;
  auto root = dir.str();
  auto images = [&](std::vector<uint32_t> dims) {
    size_t n = 1;
    for (auto d : dims) n *= d;
    write_gzip(dir, "t10k-images-idx3-ubyte.gz", concat(idx_header(0x08, dims), Bytes(n, 0)));
  };
  auto labels = [&](const Bytes& l) {
    write_gzip(dir, "t10k-labels-idx1-ubyte.gz",
               concat(idx_header(0x08, {static_cast<uint32_t>(l.size())}), l));
  };
  using Split = wick::FashionMNIST::Split;
  images({3, 28, 27});
  labels({0, 1, 2});
  EXPECT_THROWS_WITH(wick::FashionMNIST(root, Split::kTest), "[N, 28, 28]");
  images({3, 28, 28});
  labels({0, 1});
  EXPECT_THROWS_WITH(wick::FashionMNIST(root, Split::kTest), "has 3 images but");
  labels({0, 1, 2});
  EXPECT_THROWS_WITH(wick::FashionMNIST(root, Split::kTest), "must have 10000 samples, got 3");
  images({10000, 28, 28});
  Bytes l(10000, 4);
  l[5] = 10;
  labels(l);
  EXPECT_THROWS_WITH(wick::FashionMNIST(root, Split::kTest), "labels outside 0..9 (max 10)");
  l[5] = 9;
  labels(l);
  wick::FashionMNIST ok(root, Split::kTest, /*normalize=*/false);
  EXPECT_EQ(ok.size().value(), 10000u);
  EXPECT_EQ(ok.targets()[5].item<int64_t>(), 9);
}

TEST(FashionMNISTTest, DefaultRootFollowsEnvironment) {
  const char* old = std::getenv("WICK_FASHION_MNIST_DIR");
  std::string saved = old ? old : "";
  ::setenv("WICK_FASHION_MNIST_DIR", "/some/where", 1);
  EXPECT_EQ(wick::FashionMNIST::default_root(), "/some/where");
  ::unsetenv("WICK_FASHION_MNIST_DIR");
  EXPECT_EQ(wick::FashionMNIST::default_root(), "/usr/share/datasets/fashion-mnist");
  if (old) ::setenv("WICK_FASHION_MNIST_DIR", saved.c_str(), 1);
}

// ---------------------------------------------------------------------------
// TensorBatchSource

// data row i = [i, -i] so rows can be matched to targets (= i).
struct Samples {
  torch::Tensor data, targets;
  explicit Samples(int64_t n) {
    targets = torch::arange(n, torch::kLong);
    data = torch::stack({targets.to(torch::kFloat32), -targets.to(torch::kFloat32)}, 1);
  }
};

std::vector<torch::Tensor> epoch_targets(wick::BatchSource& source, int64_t epoch) {
  source.reset(epoch);
  std::vector<torch::Tensor> out;
  while (auto b = source.next()) out.push_back(b->target);
  return out;
}

torch::Tensor epoch_order(wick::BatchSource& source, int64_t epoch) {
  auto batches = epoch_targets(source, epoch);
  return torch::cat(batches);
}

TEST(TensorBatchSourceTest, VisitsEverySampleOncePerEpoch) {
  Samples s(103);
  wick::TensorBatchSource source(s.data, s.targets, wick::TensorBatchSourceOptions(10).seed(5));
  EXPECT_EQ(source.size().value(), 11);
  for (int64_t epoch : {0, 1, 2}) {
    source.reset(epoch);
    std::vector<int64_t> sizes;
    std::vector<torch::Tensor> targets;
    while (auto b = source.next()) {
      sizes.push_back(b->target.size(0));
      // Rows travel with their targets.
      EXPECT_TRUE(tensors_equal(b->data.select(1, 0), b->target.to(torch::kFloat32)));
      EXPECT_TRUE(tensors_equal(b->data.select(1, 1), -b->target.to(torch::kFloat32)));
      targets.push_back(b->target);
    }
    EXPECT_EQ(sizes, (std::vector<int64_t>{10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 3}));
    EXPECT_TRUE(tensors_equal(std::get<0>(torch::cat(targets).sort()), s.targets));
    EXPECT_FALSE(source.next().has_value());  // stays at the end
  }
}

TEST(TensorBatchSourceTest, DropLastDropsTheShortBatch) {
  Samples s(103);
  wick::TensorBatchSource source(s.data, s.targets,
                                 wick::TensorBatchSourceOptions(10).drop_last(true).seed(2));
  EXPECT_EQ(source.size().value(), 10);
  auto batches = epoch_targets(source, 0);
  ASSERT_EQ(batches.size(), 10u);
  for (auto& b : batches) EXPECT_EQ(b.size(0), 10);
  auto seen = torch::cat(batches);
  EXPECT_EQ(std::get<0>(torch::_unique(seen)).size(0), 100);

  Samples exact(30);
  wick::TensorBatchSource even(exact.data, exact.targets,
                               wick::TensorBatchSourceOptions(10).drop_last(true));
  EXPECT_EQ(even.size().value(), 3);
  EXPECT_EQ(epoch_targets(even, 0).size(), 3u);
}

TEST(TensorBatchSourceTest, WithoutShuffleKeepsTheOrder) {
  Samples s(25);
  wick::TensorBatchSource source(s.data, s.targets,
                                 wick::TensorBatchSourceOptions(7).shuffle(false).seed(9));
  for (int64_t epoch : {0, 3}) EXPECT_TRUE(tensors_equal(epoch_order(source, epoch), s.targets));
}

TEST(TensorBatchSourceTest, ShuffleDependsOnlyOnSeedAndEpoch) {
  Samples s(200);
  auto opts = wick::TensorBatchSourceOptions(16).seed(123);
  wick::TensorBatchSource a(s.data, s.targets, opts);
  wick::TensorBatchSource b(s.data, s.targets, opts);
  auto a0 = epoch_order(a, 0);
  auto a1 = epoch_order(a, 1);
  EXPECT_FALSE(torch::equal(a0, s.targets));  // shuffled
  EXPECT_FALSE(torch::equal(a0, a1));         // differs between epochs
  // Same (seed, epoch), another instance, other epochs in between, torch's global seed changed.
  torch::manual_seed(999);
  EXPECT_TRUE(tensors_equal(epoch_order(b, 1), a1));
  EXPECT_TRUE(tensors_equal(epoch_order(b, 0), a0));
  EXPECT_TRUE(tensors_equal(epoch_order(a, 0), a0));
  wick::TensorBatchSource other(s.data, s.targets, wick::TensorBatchSourceOptions(16).seed(124));
  EXPECT_FALSE(torch::equal(epoch_order(other, 0), a0));
}

TEST(TensorBatchSourceTest, OrderMatchesPythonRandperm) {
  // The epoch's order is torch.randperm(n, generator=torch.Generator().manual_seed(s)) with
  // s = splitmix64-finalizer(seed * 1000003 + epoch). Python, independently:
  //   def mix64(z):
  //     M=(1<<64)-1; z&=M; z=((z^(z>>30))*0xbf58476d1ce4e5b9)&M
  //     z=((z^(z>>27))*0x94d049bb133111eb)&M; return z^(z>>31)
  //   torch.randperm(10, generator=torch.Generator().manual_seed(mix64(seed*1000003+epoch)))
  //   (1,0) -> [7,8,4,9,5,0,6,2,3,1]  (1,1) -> [5,0,4,8,3,2,1,6,9,7]  (42,3) ->
  //   [4,8,6,1,3,2,9,5,7,0]
  Samples s(10);
  wick::TensorBatchSource one(s.data, s.targets, wick::TensorBatchSourceOptions(4).seed(1));
  EXPECT_TRUE(tensors_equal(epoch_order(one, 0),
                            torch::tensor({7, 8, 4, 9, 5, 0, 6, 2, 3, 1}, torch::kLong)));
  EXPECT_TRUE(tensors_equal(epoch_order(one, 1),
                            torch::tensor({5, 0, 4, 8, 3, 2, 1, 6, 9, 7}, torch::kLong)));
  wick::TensorBatchSource forty_two(s.data, s.targets, wick::TensorBatchSourceOptions(3).seed(42));
  EXPECT_TRUE(tensors_equal(epoch_order(forty_two, 3),
                            torch::tensor({4, 8, 6, 1, 3, 2, 9, 5, 7, 0}, torch::kLong)));
}

TEST(TensorBatchSourceTest, SkipThenNextEqualsFreshRun) {
  Samples s(53);
  for (bool drop_last : {false, true}) {
    auto opts = wick::TensorBatchSourceOptions(5).seed(77).drop_last(drop_last);
    wick::TensorBatchSource fresh(s.data, s.targets, opts);
    auto all = epoch_targets(fresh, 4);
    for (int64_t n = 0; n <= static_cast<int64_t>(all.size()) + 2; ++n) {
      wick::TensorBatchSource resumed(s.data, s.targets, opts);
      resumed.reset(4);
      resumed.skip(n);
      auto b = resumed.next();
      if (n < static_cast<int64_t>(all.size())) {
        ASSERT_TRUE(b.has_value()) << "n=" << n;
        EXPECT_TRUE(tensors_equal(b->target, all[n])) << "n=" << n;
      } else {
        EXPECT_FALSE(b.has_value()) << "n=" << n;
      }
    }
  }
  // Skips add up within an epoch; reset starts over.
  wick::TensorBatchSource src(s.data, s.targets, wick::TensorBatchSourceOptions(5).seed(77));
  auto all = epoch_targets(src, 4);
  src.reset(4);
  src.skip(2);
  src.next();
  src.skip(3);
  EXPECT_TRUE(tensors_equal(src.next()->target, all[6]));
}

// A source that only implements next(), so skip() is BatchSource's default.
class CountingSource : public wick::BatchSource {
 public:
  explicit CountingSource(int64_t batches) : batches_(batches) {}
  void reset(int64_t) override { pos_ = 0; }
  std::optional<wick::Batch> next() override {
    ++calls;
    if (pos_ >= batches_) return std::nullopt;
    auto v = torch::full({1}, pos_++, torch::kLong);
    return wick::Batch(v, v);
  }
  int64_t calls = 0;

 private:
  int64_t batches_, pos_ = 0;
};

TEST(BatchSourceTest, DefaultSkipCallsNext) {
  CountingSource src(5);
  src.reset(0);
  src.skip(3);
  EXPECT_EQ(src.calls, 3);
  EXPECT_EQ(src.next()->target.item<int64_t>(), 3);
  src.skip(10);  // stops at the end of the epoch
  EXPECT_EQ(src.calls, 4 + 2);
  EXPECT_FALSE(src.next().has_value());
  EXPECT_THROWS_WITH(src.skip(-1), "skip count must be >= 0, got -1");
}

TEST(TensorBatchSourceTest, RejectsBadInput) {
  Samples s(10);
  using Opts = wick::TensorBatchSourceOptions;
  EXPECT_THROWS_WITH(wick::TensorBatchSource(s.data, s.targets.slice(0, 0, 9), Opts(2)),
                     "same number of samples, got 10 and 9");
  EXPECT_THROWS_WITH(
      wick::TensorBatchSource(s.data.slice(0, 0, 0), s.targets.slice(0, 0, 0), Opts(2)),
      "at least one sample, got 0");
  EXPECT_THROWS_WITH(wick::TensorBatchSource(s.data, s.targets, Opts(0)),
                     "batch_size must be >= 1, got 0");
  EXPECT_THROWS_WITH(wick::TensorBatchSource(torch::tensor(1.0), s.targets, Opts(2)),
                     "sample dimension");
  EXPECT_THROWS_WITH(wick::TensorBatchSource(torch::Tensor(), s.targets, Opts(2)), "defined");
  wick::TensorBatchSource source(s.data, s.targets, Opts(2));
  EXPECT_THROWS_WITH(source.next(), "TensorBatchSource: next() before reset()");
  EXPECT_THROWS_WITH(source.skip(1), "before reset()");
  EXPECT_THROWS_WITH(source.reset(-1), "epoch must be >= 0, got -1");
  source.reset(0);
  EXPECT_THROWS_WITH(source.skip(-2), "skip count must be >= 0, got -2");
}

TEST(TensorBatchSourceTest, MovesBatchesToCuda) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  Samples s(37);
  for (bool pinned : {false, true}) {
    auto data = pinned ? s.data.pin_memory() : s.data;
    auto targets = pinned ? s.targets.pin_memory() : s.targets;
    auto opts = wick::TensorBatchSourceOptions(8).seed(3).device(torch::kCUDA);
    wick::TensorBatchSource gpu(data, targets, opts);
    wick::TensorBatchSource cpu(s.data, s.targets, opts.device(torch::kCPU));
    gpu.reset(2);
    cpu.reset(2);
    while (auto b = gpu.next()) {
      auto c = cpu.next();
      ASSERT_TRUE(c.has_value());
      EXPECT_TRUE(b->data.is_cuda());
      EXPECT_TRUE(b->target.is_cuda());
      EXPECT_TRUE(tensors_equal(b->data, c->data));
      EXPECT_TRUE(tensors_equal(b->target, c->target));
    }
    EXPECT_FALSE(cpu.next().has_value());
  }
  // Data already on the GPU.
  wick::TensorBatchSource on_gpu(s.data.cuda(), s.targets.cuda(),
                                 wick::TensorBatchSourceOptions(8).seed(3).device(torch::kCUDA));
  wick::TensorBatchSource ref(s.data, s.targets, wick::TensorBatchSourceOptions(8).seed(3));
  EXPECT_TRUE(tensors_equal(epoch_order(on_gpu, 1).cpu(), epoch_order(ref, 1)));
}

// ---------------------------------------------------------------------------
// DataLoaderSource over LibTorch's data loaders

// The first `n` samples of another dataset.
template <typename Inner>
class Head : public torch::data::datasets::Dataset<Head<Inner>, wick::Batch> {
 public:
  Head(Inner inner, size_t n) : inner_(std::move(inner)), n_(n) {}
  wick::Batch get(size_t index) override { return inner_.get(index); }
  torch::optional<size_t> size() const override { return n_; }

 private:
  Inner inner_;
  size_t n_;
};

// A small in-memory dataset: sample i is [i, i + 0.5], target 10 * i.
class Toy : public torch::data::datasets::Dataset<Toy, wick::Batch> {
 public:
  explicit Toy(int64_t n) : n_(n) {}
  wick::Batch get(size_t index) override {
    auto i = static_cast<double>(index);
    return {torch::tensor({i, i + 0.5}, torch::kFloat32),
            torch::tensor(static_cast<int64_t>(10 * index), torch::kLong)};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(n_); }

 private:
  int64_t n_;
};

TEST(DataLoaderSourceTest, StacksSequentialBatchesOfASmallDataset) {
  auto loader = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      Toy(11).map(torch::data::transforms::Stack<>()),
      torch::data::DataLoaderOptions().batch_size(4));
  wick::DataLoaderSource source(*loader);
  EXPECT_THROWS_WITH(source.next(), "next() before reset()");
  for (int64_t epoch : {0, 1}) {
    source.reset(epoch);
    std::vector<int64_t> sizes;
    int64_t start = 0;
    while (auto b = source.next()) {
      const int64_t n = b->data.size(0);
      sizes.push_back(n);
      auto idx = torch::arange(start, start + n, torch::kFloat32);
      EXPECT_TRUE(tensors_equal(b->data, torch::stack({idx, idx + 0.5f}, 1)));
      EXPECT_TRUE(tensors_equal(b->target, torch::arange(start, start + n, torch::kLong) * 10));
      start += n;
    }
    EXPECT_EQ(sizes, (std::vector<int64_t>{4, 4, 3}));
  }
  // The default skip() steps through the loader.
  source.reset(2);
  source.skip(2);
  auto last = source.next();
  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(last->target[0].item<int64_t>(), 80);
  EXPECT_FALSE(source.next().has_value());
}

TEST(DataLoaderSourceTest, ResetsMidEpochWithWorkers) {
  // LibTorch refuses a new iterator while a worker loader has batches in flight.
  auto loader = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      Toy(40).map(torch::data::transforms::Stack<>()),
      torch::data::DataLoaderOptions().batch_size(4).workers(2));
  wick::DataLoaderSource source(*loader);
  source.reset(0);
  ASSERT_TRUE(source.next().has_value());
  source.reset(1);
  int64_t batches = 0, first = -1;
  while (auto b = source.next()) {
    if (batches++ == 0) first = b->target[0].item<int64_t>();
  }
  EXPECT_EQ(batches, 10);
  EXPECT_EQ(first, 0);
}

TEST(DataLoaderSourceTest, ServesFashionMNISTThroughWorkers) {
  WICK_REQUIRE_FASHION_MNIST();
  // doc-example: data.md "LibTorch data loaders"
  wick::FashionMNIST test(wick::FashionMNIST::default_root(), wick::FashionMNIST::Split::kTest);
  auto dataset = Head<wick::FashionMNIST>(test, 100).map(torch::data::transforms::Stack<>());
  auto loader = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      std::move(dataset), torch::data::DataLoaderOptions().batch_size(32).workers(2));
  wick::DataLoaderSource source(*loader);
  source.reset(0);
  int64_t seen = 0;
  while (auto batch = source.next()) {
    const int64_t n = batch->data.size(0);
    EXPECT_EQ(batch->data.sizes(), (std::vector<int64_t>{n, 1, 28, 28}));
    EXPECT_TRUE(tensors_equal(batch->data, test.images().slice(0, seen, seen + n)));
    EXPECT_TRUE(tensors_equal(batch->target, test.targets().slice(0, seen, seen + n)));
    seen += n;
  }
  // end doc-example
  EXPECT_EQ(seen, 100);
  // The first batch's raw pixels are Python's numbers: sample 0 sums to 33456/255 before
  // normalization.
  source.reset(1);
  auto first = source.next();
  ASSERT_TRUE(first.has_value());
  auto raw0 = first->data[0].mul(wick::FashionMNIST::kStd).add(wick::FashionMNIST::kMean).sum();
  EXPECT_NEAR(raw0.item<double>(), kTestFirstImageSum / 255.0, 1e-2);
}

// ---------------------------------------------------------------------------
// The example of docs/data.md

TEST(DataDocTest, TrainsOnTensorBatchSource) {
  WICK_REQUIRE_FASHION_MNIST();
  torch::manual_seed(0);
  // doc-example: data.md "TensorBatchSource"
  wick::FashionMNIST data(wick::FashionMNIST::default_root(), wick::FashionMNIST::Split::kTest);
  wick::TensorBatchSource source(data.images(), data.targets(),
                                 wick::TensorBatchSourceOptions(100).shuffle(true).seed(1));
  torch::nn::Linear model(28 * 28, 10);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  int64_t samples = 0;
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    source.reset(epoch);
    while (auto batch = source.next()) {
      // batch->data: [100, 1, 28, 28] float32, batch->target: [100] int64
      auto logits = model->forward(batch->data.flatten(1));
      auto loss = torch::nn::functional::cross_entropy(logits, batch->target);
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      samples += batch->target.size(0);
    }
  }
  // end doc-example
  EXPECT_EQ(source.size().value(), 100);
  EXPECT_EQ(samples, 20000);
  torch::NoGradGuard no_grad;
  auto accuracy = (model->forward(data.images().flatten(1)).argmax(1) == data.targets())
                      .to(torch::kFloat64)
                      .mean()
                      .item<double>();
  // A linear classifier reaches ~80% on Fashion-MNIST; a broken pairing of
  // images and labels would stay near chance (10%).
  EXPECT_GT(accuracy, 0.70) << "accuracy " << accuracy;
}

}  // namespace
