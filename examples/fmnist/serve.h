#pragma once
// wick-fmnist --serve: the test set sent image by image from many client
// threads through a wick::DynamicBatcher to a wick::InferenceSession.

#include <wick/inference.h>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

namespace fmnist {

struct ServeOptions {
  int clients = 0;         ///< client threads, each sending one image at a time (0: no serving)
  int64_t max_batch = 64;  ///< BatcherOptions::max_batch_size
  int64_t max_delay_us = 1000;  ///< BatcherOptions::max_delay, microseconds
  int64_t workers = 1;          ///< BatcherOptions::num_workers
  /// Serve the int8 copy (wick-fmnist --serve-int8 with --quantize). Its
  /// Linear layers quantize each image's activations with the image's own
  /// scale (QuantizeOptions::per_row_activations), so an image's int8 answer
  /// does not depend on its batch mates: served and offline answers are
  /// compared bit for bit (serve_int8_differ).
  bool int8 = false;
};

struct ServeReport {
  int64_t requests = 0;
  double seconds = 0;
  double requests_per_s = 0;
  double p50_ms = 0, p99_ms = 0;  ///< client-side latency: submit() to the answer
  double mean_batch = 0;
  int64_t batches = 0;
  int64_t serve_correct = 0, offline_correct = 0;
  double serve_accuracy = 0, offline_accuracy = 0;
  /// Images whose served class differs from the offline one. Batches of other
  /// sizes may change fp32 logits in the last bits (CPU kernels block by batch
  /// size), so a near-tie could flip; the accuracies must still be equal.
  int64_t predictions_differing = 0;
  /// Images whose served logits differ from the offline ones in any bit, and
  /// how many of them ran in a batch of one (whose fp32 convolutions take
  /// another oneDNN kernel on some CPUs: the CNN's served answer can then
  /// differ in the last bits, int8 or not; docs/quantization.md).
  int64_t logits_differing = 0;
  int64_t logits_differing_alone = 0;
  /// Requests that ran in batches of one (the size whose fp32 convolutions
  /// take another oneDNN kernel here, docs/batching.md).
  int64_t requests_in_batches_of_one = 0;
};

/// Serves `model` (loaded from `checkpoint` unless it is "", after
/// session_options.transform) to options.clients threads that send every image
/// of `images` [N, 1, 28, 28] once, one request at a time, and compares the
/// answers' accuracy with the offline accuracy (the same session on batches of
/// 1000). Throws when the two differ. The model is whatever the caller built:
/// the trained fp32 network, or its int8 form.
ServeReport serve_test_set(torch::nn::Sequential model, const std::string& checkpoint,
                           wick::InferenceSessionOptions session_options,
                           const torch::Tensor& images, const torch::Tensor& targets,
                           const ServeOptions& options);

/// Serves the model of a session the caller built: the same as
/// serve_test_set after its session is made. wick-fmnist --serve-model builds
/// one with wick::InferenceSession::load from an exported file.
ServeReport serve_session(const wick::InferenceSession& session, const torch::Tensor& images,
                          const torch::Tensor& targets, const ServeOptions& options);

/// The report for a person.
void print_serve_report(const ServeReport& report, const ServeOptions& options);
/// serve_requests_per_s, serve_p50_ms, serve_p99_ms, serve_mean_batch,
/// serve_test_accuracy, offline_test_accuracy, serve_logits_differ (and
/// serve_int8_differ when serving int8), and the serving options.
void add_serve_fields(nlohmann::json& j, const ServeReport& report, const ServeOptions& options);

}  // namespace fmnist
