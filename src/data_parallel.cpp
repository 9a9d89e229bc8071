#include "data_parallel.h"

#include "wick/distributed.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>

namespace wick::detail {
namespace {

int64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  int64_t out;
  std::memcpy(&out, &h, sizeof(out));
  return out;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << c10::IntArrayRef(shape);
  return os.str();
}

struct ParamSpec {
  int64_t name_hash = 0;
  int64_t dtype = 0;
  std::vector<int64_t> shape;
};

}  // namespace

void check_same_parameters(ProcessGroup& pg,
                           const std::vector<std::pair<std::string, torch::Tensor>>& named,
                           const char* who) {
  const int64_t rank = pg.rank();
  std::vector<ParamSpec> mine;
  std::vector<int64_t> encoded;
  for (const auto& [name, t] : named) {
    ParamSpec s{fnv1a(name), static_cast<int64_t>(t.scalar_type()), t.sizes().vec()};
    encoded.push_back(s.name_hash);
    encoded.push_back(s.dtype);
    encoded.push_back(static_cast<int64_t>(s.shape.size()));
    encoded.insert(encoded.end(), s.shape.begin(), s.shape.end());
    mine.push_back(std::move(s));
  }
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64).device(pg.device());
  auto header =
      torch::tensor({static_cast<int64_t>(mine.size()), static_cast<int64_t>(encoded.size())},
                    torch::kInt64)
          .to(pg.device());
  pg.broadcast({header}, 0);
  header = header.cpu();
  const int64_t n0 = header[0].item<int64_t>(), len0 = header[1].item<int64_t>();
  torch::Tensor enc0 =
      rank == 0 ? torch::tensor(encoded, torch::kInt64).to(pg.device()) : torch::zeros({len0}, i64);
  if (len0 > 0) pg.broadcast({enc0}, 0);
  enc0 = enc0.cpu();
  const auto* e = enc0.data_ptr<int64_t>();
  std::vector<ParamSpec> theirs;
  for (int64_t pos = 0, i = 0; i < n0; ++i) {
    ParamSpec s;
    s.name_hash = e[pos++];
    s.dtype = e[pos++];
    const int64_t ndim = e[pos++];
    s.shape.assign(e + pos, e + pos + ndim);
    pos += ndim;
    theirs.push_back(std::move(s));
  }

  int64_t first_bad = -1;
  std::string message;
  const size_t common = std::min(mine.size(), theirs.size());
  for (size_t i = 0; i < common && first_bad < 0; ++i) {
    const auto& m = mine[i];
    const auto& t = theirs[i];
    const auto& name = named[i].first;
    std::ostringstream os;
    if (m.name_hash != t.name_hash) {
      os << "parameter #" << i << " is '" << name << "' on rank " << rank
         << " but has another name on rank 0";
    } else if (m.shape != t.shape) {
      os << "parameter '" << name << "' has shape " << shape_str(m.shape) << " on rank " << rank
         << " but " << shape_str(t.shape) << " on rank 0";
    } else if (m.dtype != t.dtype) {
      os << "parameter '" << name << "' has dtype " << c10::ScalarType(m.dtype) << " on rank "
         << rank << " but " << c10::ScalarType(t.dtype) << " on rank 0";
    } else {
      continue;
    }
    first_bad = static_cast<int64_t>(i);
    message = os.str();
  }
  if (first_bad < 0 && mine.size() != theirs.size()) {
    first_bad = static_cast<int64_t>(common);
    std::ostringstream os;
    os << "rank " << rank << " has " << mine.size() << " parameters but rank 0 has "
       << theirs.size();
    if (mine.size() > theirs.size()) os << " (first extra: '" << named[common].first << "')";
    message = os.str();
  }

  // Every rank learns every rank's verdict, so all of them throw together
  // rather than some waiting forever in the broadcast that follows.
  auto verdicts = torch::zeros({pg.world_size()}, i64);
  if (first_bad >= 0) verdicts[rank].fill_(first_bad + 1);
  pg.allreduce_sum({verdicts});
  verdicts = verdicts.cpu();
  const auto* v = verdicts.data_ptr<int64_t>();
  if (first_bad >= 0) {
    TORCH_CHECK(false, who, ": the ranks' models differ: ", message,
                "; every rank must build the same model");
  }
  for (int64_t r = 0; r < pg.world_size(); ++r) {
    if (v[r] == 0) continue;
    const int64_t i = v[r] - 1;
    std::ostringstream os;
    os << who << ": the ranks' models differ: rank " << r << " differs from rank 0 at parameter #"
       << i;
    if (i < static_cast<int64_t>(named.size())) {
      os << " ('" << named[i].first << "', shape " << named[i].second.sizes() << " on rank " << rank
         << ")";
    }
    os << "; every rank must build the same model";
    TORCH_CHECK(false, os.str());
  }
}

void broadcast_coalesced(ProcessGroup& pg, const std::vector<torch::Tensor>& tensors) {
  std::map<std::pair<int, std::string>, std::vector<torch::Tensor>> groups;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    groups[{static_cast<int>(t.scalar_type()), t.device().str()}].push_back(t);
  }
  torch::NoGradGuard no_grad;
  for (auto& [key, group] : groups) {
    std::vector<torch::Tensor> flat_views;
    flat_views.reserve(group.size());
    for (const auto& t : group) flat_views.push_back(t.detach().reshape({-1}));
    auto flat = torch::cat(flat_views);
    pg.broadcast({flat}, 0);
    int64_t offset = 0;
    for (const auto& t : group) {
      t.detach().copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

}  // namespace wick::detail
