#pragma once
// safetensors files: the weight format of the Python ecosystem (Hugging Face
// Hub, transformers, diffusers, vLLM), read and written by wick.
//
//   // Named tensors, as Python's safetensors.torch.save_file / load_file:
//   wick::save_safetensors("w.safetensors", {{"w", w}, {"b", b}}, {{"source", "wick"}});
//   wick::SafetensorsFile f = wick::load_safetensors("w.safetensors");  // memory-mapped
//   torch::Tensor w2 = f.get("w");
//
//   // A module's parameters and buffers, by the names named_parameters() gives:
//   wick::save_safetensors("model.safetensors", *model);
//   wick::load_safetensors("model.safetensors", *model);  // names, shapes, dtypes checked
//
// The format (https://github.com/huggingface/safetensors): an 8-byte
// little-endian header length N, N bytes of JSON mapping each tensor's name to
// {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional
// "__metadata__" object of strings), then the tensors' bytes, contiguous,
// row-major, little-endian, covering the rest of the file exactly. Every file
// wick reads is checked as the reference implementation checks it (header
// size, JSON, dtypes, shapes against byte counts, offsets neither overlapping
// nor leaving gaps, sizes that overflow) and a bad one is an error naming the
// file, the tensor and the rule, never a crash.
//
// Dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL C64 F8_E4M3
// F8_E4M3FNUZ F8_E5M2 F8_E5M2FNUZ F8_E8M0 and F4 (torch's float4_e2m1fn_x2,
// two values a byte: the file's last dimension counts values, twice torch's).
// The file's F6 types have no LibTorch dtype and are refused by name.

#include <torch/torch.h>

#include <cstddef>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace wick {

/// Tensors with their names, in order.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

/// What a safetensors file holds.
struct SafetensorsFile {
  /// The tensors in file order (by position of their data), each with the
  /// file's dtype and shape.
  NamedTensors tensors;
  /// The header's "__metadata__" (empty when the file has none).
  std::map<std::string, std::string> metadata;

  /// The tensor named `name`; throws naming it (and what the file has) when absent.
  torch::Tensor get(const std::string& name) const;
  /// Name -> tensor, for lookups by name.
  std::map<std::string, torch::Tensor> to_map() const;
};

struct SafetensorsLoadOptions {
  /// Device the tensors are placed on. On the CPU they are read in place
  /// (see `mmap`); elsewhere they are copied there from the file. Default CPU.
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  /// Map the file into memory and make each CPU tensor a view of its bytes
  /// (no copy; pages are read when first touched; writing to a tensor copies
  /// that page, the file never changes). The mapping lives as long as any of
  /// its tensors; truncating the file meanwhile makes reads of the lost pages
  /// fault (SIGBUS), as with any mapped file. false: read each tensor into
  /// memory of its own and close the file. A tensor whose bytes are not
  /// aligned to its element size in the file is copied either way. Default true.
  TORCH_ARG(bool, mmap) = true;
};

/// Writes `tensors` (any device, made contiguous; names unique, not
/// "__metadata__") and `metadata` to `path` atomically: a temporary file
/// beside it, fsynced, renamed into place; on failure throws naming the path
/// and the reason and leaves any previous file at `path` intact. The data is
/// laid out largest element size first (stable otherwise), as the Python
/// package does, so that every tensor is aligned for a zero-copy load.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// Reads the file at `path`. Throws a c10::Error naming the file and what is
/// wrong with it.
SafetensorsFile load_safetensors(const std::string& path,
                                 const SafetensorsLoadOptions& options = {});

/// `module`'s parameters and buffers (every defined one, recursively) under
/// their dotted `named_parameters()` / `named_buffers()` names.
void save_safetensors(const std::string& path, const torch::nn::Module& module,
                      const std::map<std::string, std::string>& metadata = {});

/// Restores `module`'s parameters and buffers from the file, with the checks
/// of Checkpoint::restore_module: every name missing from the file, every
/// tensor the module lacks, every shape that differs and every dtype that
/// cannot be converted to the module's is named in one error, and then the
/// module is unchanged. Values keep the module's devices and dtypes. Returns
/// the file's metadata.
std::map<std::string, std::string> load_safetensors(const std::string& path,
                                                    torch::nn::Module& module);

/// The bytes of a safetensors file holding `tensors` and `metadata` (as
/// Python's safetensors.torch.save).
std::string save_safetensors_to_bytes(const NamedTensors& tensors,
                                      const std::map<std::string, std::string>& metadata = {});

/// Parses the bytes of a safetensors file (as Python's safetensors.torch.load);
/// the tensors are copies, independent of `data`. `what` names the bytes in
/// errors.
SafetensorsFile load_safetensors_from_bytes(const void* data, size_t size,
                                            const std::string& what = "<in memory>");

}  // namespace wick
