#include "wick/inference.h"

#include <wick/checkpoint.h>

#include <ATen/Parallel.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <exception>
#include <utility>

#include "fs.h"

namespace wick {
namespace {

// Where the module's parameters (else buffers) live; CPU for one without any.
torch::Device device_of(const torch::nn::Module& module) {
  for (const auto& p : module.parameters()) return p.device();
  for (const auto& b : module.buffers()) return b.device();
  return torch::kCPU;
}

// The kinds of archive load() tells apart. Both TorchScript files and .pt2
// packages are PyTorch zip archives (one top folder, records below it).
enum class ArchiveKind { kTorchScript, kAOTInductor, kExportedProgram, kTorchSave, kUnknown };

struct Archive {
  ArchiveKind kind = ArchiveKind::kUnknown;
  std::vector<std::string> aoti_models;  // names under data/aotinductor/
};

Archive inspect_archive(const std::string& path) {
  // Missing and unreadable files get the system's reason, before the zip
  // reader's less direct "failed finding central directory".
  const auto kind = detail::path_kind(path, "InferenceSession", /*follow_symlinks=*/true);
  TORCH_CHECK(kind != detail::PathKind::kMissing, "InferenceSession: cannot load model '", path,
              "': no such file");
  TORCH_CHECK(kind == detail::PathKind::kRegular, "InferenceSession: cannot load model '", path,
              "': not a regular file");
  if (FILE* f = std::fopen(path.c_str(), "rb")) {
    std::fclose(f);
  } else {
    const int err = errno;
    TORCH_CHECK(false, "InferenceSession: cannot load model '", path,
                "': ", detail::errno_text(err));
  }
  std::vector<std::string> records;
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    records = reader.getAllRecords();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "InferenceSession: '", path,
                "' is neither a TorchScript file nor an AOTInductor package (.pt2): it is not a "
                "PyTorch zip archive (",
                e.msg(), ")");
  }
  Archive a;
  bool code = false, data_pkl = false, archive_format = false;
  const std::string aoti_prefix = "data/aotinductor/";
  for (const auto& r : records) {
    code = code || r.rfind("code/", 0) == 0;
    data_pkl = data_pkl || r == "data.pkl";
    archive_format = archive_format || r == "archive_format";
    if (r.rfind(aoti_prefix, 0) == 0) {
      const auto end = r.find('/', aoti_prefix.size());
      if (end != std::string::npos) {
        auto name = r.substr(aoti_prefix.size(), end - aoti_prefix.size());
        if (std::find(a.aoti_models.begin(), a.aoti_models.end(), name) == a.aoti_models.end())
          a.aoti_models.push_back(std::move(name));
      }
    }
  }
  if (!a.aoti_models.empty()) {
    a.kind = ArchiveKind::kAOTInductor;
  } else if (archive_format) {
    a.kind = ArchiveKind::kExportedProgram;
  } else if (code && data_pkl) {
    a.kind = ArchiveKind::kTorchScript;
  } else if (data_pkl) {
    a.kind = ArchiveKind::kTorchSave;
  }
  return a;
}

void check_cuda(const torch::Device& device, const std::string& path) {
  TORCH_CHECK(!device.is_cuda() || torch::cuda::is_available(), "InferenceSession: device ", device,
              " requested for '", path, "', but CUDA is not available");
  TORCH_CHECK(!device.is_cuda() || !device.has_index() ||
                  device.index() < static_cast<int>(torch::cuda::device_count()),
              "InferenceSession: device ", device, " requested for '", path, "', but there are ",
              torch::cuda::device_count(), " CUDA devices");
  TORCH_CHECK(device.is_cpu() || device.is_cuda(),
              "InferenceSession: device must be cpu or cuda, got ", device, " for '", path, "'");
}

// A TorchScript module whose forward takes one tensor and returns one.
InferenceSession::Forward torchscript_forward(const std::string& path,
                                              const std::optional<torch::Device>& requested,
                                              torch::Device* device) {
  if (requested) check_cuda(*requested, path);
  auto module = std::make_shared<torch::jit::Module>();
  try {
    *module = requested ? torch::jit::load(path, *requested) : torch::jit::load(path);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "InferenceSession: cannot load TorchScript model '", path, "': ", e.msg());
  }
  const auto method = module->find_method("forward");
  TORCH_CHECK(method.has_value(), "InferenceSession: TorchScript model '", path,
              "' has no forward method");
  const auto& schema = method->function().getSchema();
  // arguments()[0] is self.
  TORCH_CHECK(schema.arguments().size() == 2, "InferenceSession: TorchScript model '", path,
              "' has ", schema, "; a session serves models of one input tensor");
  TORCH_CHECK(
      schema.returns().size() == 1 &&
          schema.returns()[0].type()->kind() == c10::TypeKind::TensorType,
      "InferenceSession: TorchScript model '", path, "' returns ",
      schema.returns().empty() ? std::string("nothing") : schema.returns()[0].type()->repr_str(),
      " from forward; a session serves models that return one Tensor");
  torch::Device dev = requested.value_or(torch::kCPU);
  if (!requested) {
    for (const auto& p : module->parameters()) {
      dev = p.device();
      break;
    }
  }
  module->to(dev);
  module->eval();
  *device = dev;
  return [module](const torch::Tensor& x) -> torch::Tensor {
    // No lock: each call gets its own interpreter frame; the graph executor
    // locks itself while it profiles and optimizes the graph.
    return module->forward({x}).toTensor();
  };
}

// An AOTInductor package: one model instance per concurrent run, up to `runners`.
InferenceSession::Forward aoti_forward(const std::string& path, const Archive& archive,
                                       const std::optional<torch::Device>& requested,
                                       int64_t runners, torch::Device* device) {
  const std::string model_name = "model";
  TORCH_CHECK(std::find(archive.aoti_models.begin(), archive.aoti_models.end(), model_name) !=
                  archive.aoti_models.end(),
              "InferenceSession: AOTInductor package '", path, "' has no model '", model_name,
              "' (it has: ", c10::Join(", ", archive.aoti_models), ")");
  std::unordered_map<std::string, std::string> metadata;
  try {
    metadata =
        torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, model_name);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "InferenceSession: cannot read the metadata of AOTInductor package '", path,
                "': ", e.what());
  }
  const auto key = metadata.find("AOTI_DEVICE_KEY");
  TORCH_CHECK(key != metadata.end(), "InferenceSession: AOTInductor package '", path,
              "' names no device (AOTI_DEVICE_KEY) in its metadata");
  const std::string compiled_for = key->second;
  TORCH_CHECK(compiled_for == "cpu" || compiled_for == "cuda",
              "InferenceSession: AOTInductor package '", path, "' was compiled for '", compiled_for,
              "'; a session runs cpu and cuda packages");
  torch::Device dev = requested.value_or(compiled_for == "cuda" ? torch::Device(torch::kCUDA, 0)
                                                                : torch::Device(torch::kCPU));
  TORCH_CHECK(dev.type() == torch::Device(compiled_for).type(),
              "InferenceSession: AOTInductor package '", path, "' was compiled for ", compiled_for,
              " and runs only there; device ", dev,
              " was requested (export it again on that device)");
  check_cuda(dev, path);
  if (dev.is_cuda() && !dev.has_index()) dev = torch::Device(torch::kCUDA, 0);
  std::shared_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    // run_single_threaded = false: run() then takes the container's
    // thread-safe path, which hands each call a free model instance.
    loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(
        path, model_name, /*run_single_threaded=*/false, static_cast<size_t>(runners),
        dev.is_cuda() ? dev.index() : static_cast<c10::DeviceIndex>(-1));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "InferenceSession: cannot load AOTInductor package '", path,
                "': ", e.what());
  }
  *device = dev;
  return [loader, path](const torch::Tensor& x) -> torch::Tensor {
    std::vector<torch::Tensor> out;
    try {
      // The compiled code assumes the strides it was exported with (contiguous).
      out = loader->run({x.contiguous()});
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "InferenceSession: AOTInductor package '", path,
                  "' failed on an input of shape ", x.sizes(), " and dtype ", x.dtype(), ": ",
                  e.what());
    }
    TORCH_CHECK(out.size() == 1, "InferenceSession: AOTInductor package '", path, "' returned ",
                out.size(), " tensors; a session serves models that return one Tensor");
    return out[0];
  };
}

}  // namespace

std::string to_string(ModelFormat format) {
  switch (format) {
    case ModelFormat::kModule:
      return "module";
    case ModelFormat::kTorchScript:
      return "torchscript";
    case ModelFormat::kAOTInductor:
      return "aotinductor";
  }
  return "unknown";
}

void InferenceSession::check_options(const InferenceSessionOptions& options) {
  TORCH_CHECK(options.num_threads() >= 0, "InferenceSession: num_threads must be >= 0, got ",
              options.num_threads());
  TORCH_CHECK(options.warmup_iterations() >= 0,
              "InferenceSession: warmup_iterations must be >= 0, got ",
              options.warmup_iterations());
  TORCH_CHECK(options.aoti_runners() >= 1, "InferenceSession: aoti_runners must be >= 1, got ",
              options.aoti_runners());
  for (int64_t d : options.warmup_shape()) {
    TORCH_CHECK(d >= 0, "InferenceSession: warmup_shape must have sizes >= 0, got ",
                c10::IntArrayRef(options.warmup_shape()));
  }
}

void InferenceSession::warm_up() const {
  if (options_.warmup_shape().empty()) return;
  auto x =
      torch::zeros(options_.warmup_shape(), torch::TensorOptions().dtype(options_.warmup_dtype()));
  for (int64_t i = 0; i < options_.warmup_iterations(); ++i) run(x);
}

InferenceSession::InferenceSession(std::shared_ptr<torch::nn::Module> module, Forward forward,
                                   const std::string& checkpoint, InferenceSessionOptions options)
    : checkpoint_(checkpoint), options_(std::move(options)) {
  TORCH_CHECK(module != nullptr, "InferenceSession: module must not be null");
  TORCH_CHECK(forward != nullptr, "InferenceSession: forward must be a function, got an empty one");
  check_options(options_);
  if (options_.num_threads() > 0) torch::set_num_threads(options_.num_threads());

  // Transform first: the checkpoint's structure is the transformed model's.
  if (options_.transform()) options_.transform()(*module);

  if (!checkpoint.empty()) {
    Checkpoint ckpt;
    try {
      ckpt = Checkpoint::load(checkpoint);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "InferenceSession: cannot load checkpoint '", checkpoint,
                  "': ", e.what_without_backtrace());
    }
    TORCH_CHECK(ckpt.has(options_.section()), "InferenceSession: checkpoint '", checkpoint,
                "' has no section '", options_.section(),
                "' (it has: ", c10::Join(", ", ckpt.sections()), ")");
    try {
      ckpt.restore_module(options_.section(), *module);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "InferenceSession: the model does not fit checkpoint '", checkpoint, "'",
                  options_.transform() ? " (after the transform)" : "", ": ",
                  e.what_without_backtrace());
    }
  }

  auto state = std::make_shared<State>();
  state->device = options_.device().value_or(device_of(*module));
  module->to(state->device);
  module->eval();
  state->module = std::move(module);
  state->forward = std::move(forward);
  state_ = std::move(state);
  warm_up();
}

InferenceSession::InferenceSession(std::shared_ptr<const State> state, std::string model_path,
                                   InferenceSessionOptions options)
    : state_(std::move(state)), model_path_(std::move(model_path)), options_(std::move(options)) {
  warm_up();
}

InferenceSession InferenceSession::load(const std::string& path, InferenceSessionOptions options) {
  check_options(options);
  TORCH_CHECK(!options.transform(), "InferenceSession: transform applies to torch::nn modules; '",
              path, "' is loaded as exported, so leave it empty");
  TORCH_CHECK(options.section() == InferenceSessionOptions().section(),
              "InferenceSession: section applies to wick checkpoints; '", path,
              "' is loaded as exported, so leave it at \"model\" (got \"", options.section(),
              "\")");
  const Archive archive = inspect_archive(path);
  const char* neither = "' is neither a TorchScript file nor an AOTInductor package (.pt2): ";
  TORCH_CHECK(archive.kind != ArchiveKind::kExportedProgram, "InferenceSession: '", path, neither,
              "it is a torch.export archive without AOTInductor code; compile it with "
              "torch._inductor.aoti_compile_and_package");
  TORCH_CHECK(archive.kind != ArchiveKind::kTorchSave, "InferenceSession: '", path, neither,
              "it is a torch.save archive (tensors or a state_dict, no code); save the model with "
              "torch.jit.script(model).save(...) or export it with torch.export");
  TORCH_CHECK(archive.kind != ArchiveKind::kUnknown, "InferenceSession: '", path, neither,
              "a zip archive of neither layout");

  if (options.num_threads() > 0) torch::set_num_threads(options.num_threads());
  auto state = std::make_shared<State>();
  if (archive.kind == ArchiveKind::kTorchScript) {
    state->format = ModelFormat::kTorchScript;
    state->forward = torchscript_forward(path, options.device(), &state->device);
  } else {
    state->format = ModelFormat::kAOTInductor;
    state->forward =
        aoti_forward(path, archive, options.device(), options.aoti_runners(), &state->device);
  }
  return InferenceSession(std::shared_ptr<const State>(std::move(state)), path, std::move(options));
}

torch::Tensor InferenceSession::run_on(const State& state, const torch::Tensor& input) {
  TORCH_CHECK(input.defined(), "InferenceSession: run() needs a defined input tensor");
  // A thread's first run takes torch's intra-op thread count (num_threads):
  // OpenMP's team size is per thread, and MKL / oneDNN calls made from a
  // thread that never ran an ATen parallel loop use every core, whatever
  // torch::set_num_threads said (on 2 cores shared with 64 client threads,
  // their spinning made batches 20-50x slower).
  at::internal::lazy_init_num_threads();
  c10::InferenceMode guard;
  return state.forward(input.device() == state.device ? input : input.to(state.device));
}

torch::Tensor InferenceSession::run(const torch::Tensor& input) const {
  return run_on(*state_, input);
}

TensorBatcher::BatchFn InferenceSession::batch_fn() const {
  return stack_batches([state = state_](const torch::Tensor& x) { return run_on(*state, x); });
}

}  // namespace wick
