#include "serve.h"

#include <wick/batcher.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <future>
#include <thread>
#include <vector>

namespace fmnist {
namespace {

using Clock = std::chrono::steady_clock;

// Nearest-rank percentile of sorted values.
double percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

}  // namespace

ServeReport serve_test_set(torch::nn::Sequential model, const std::string& checkpoint,
                           wick::InferenceSessionOptions session_options,
                           const torch::Tensor& images, const torch::Tensor& targets,
                           const ServeOptions& options) {
  TORCH_CHECK(images.dim() == 4, "serve: images must be [N, 1, 28, 28], got ", images.sizes());
  if (session_options.warmup_shape().empty()) {
    session_options.warmup_shape(
        {options.max_batch, images.size(1), images.size(2), images.size(3)});
  }
  wick::InferenceSession session(std::move(model), checkpoint, session_options);
  return serve_session(session, images, targets, options);
}

ServeReport serve_session(const wick::InferenceSession& session, const torch::Tensor& images,
                          const torch::Tensor& targets, const ServeOptions& options) {
  TORCH_CHECK(options.clients >= 1, "--serve must be >= 1 clients, got ", options.clients);
  TORCH_CHECK(images.dim() == 4 && images.size(0) == targets.size(0),
              "serve: images must be [N, 1, 28, 28] with N targets, got ", images.sizes(), " and ",
              targets.sizes());
  const int64_t n = images.size(0);

  ServeReport r;
  r.requests = n;

  // Offline: the same session on batches of 1000, in order.
  std::vector<int64_t> offline_pred(static_cast<size_t>(n));
  std::vector<torch::Tensor> offline_parts;
  for (int64_t start = 0; start < n; start += 1000) {
    const int64_t len = std::min<int64_t>(1000, n - start);
    auto logits = session.run(images.narrow(0, start, len)).cpu();
    offline_parts.push_back(logits);
    auto pred = logits.argmax(1);
    auto acc = pred.accessor<int64_t, 1>();
    for (int64_t i = 0; i < len; ++i) offline_pred[static_cast<size_t>(start + i)] = acc[i];
  }
  const torch::Tensor offline_logits = torch::cat(offline_parts);

  // Online: each client sends images c, c + clients, ... one at a time. The
  // batch function notes the size of the batch each image ran in (an image is
  // a view of `images`, so its address says which one it is).
  std::vector<int64_t> batch_of(static_cast<size_t>(n), 0);
  const auto* base = static_cast<const char*>(images.data_ptr());
  const auto image_bytes = static_cast<int64_t>(images[0].numel() * images.element_size());
  auto batch_fn = [fn = session.batch_fn(), &batch_of, base, image_bytes,
                   n](std::vector<torch::Tensor>&& xs) {
    for (const auto& x : xs) {
      const auto offset = static_cast<const char*>(x.data_ptr()) - base;
      const int64_t i = offset / image_bytes;
      if (offset >= 0 && i < n) batch_of[static_cast<size_t>(i)] = static_cast<int64_t>(xs.size());
    }
    return fn(std::move(xs));
  };
  wick::TensorBatcher batcher(batch_fn,
                              wick::BatcherOptions()
                                  .max_batch_size(options.max_batch)
                                  .max_delay(std::chrono::microseconds(options.max_delay_us))
                                  .num_workers(options.workers)
                                  .max_queue_size(std::max<int64_t>(1024, options.clients)));
  std::vector<int64_t> served_pred(static_cast<size_t>(n), -1);
  std::vector<torch::Tensor> served_logits(static_cast<size_t>(n));
  std::vector<std::vector<double>> latencies(static_cast<size_t>(options.clients));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(options.clients));
  const auto t0 = Clock::now();
  {
    std::vector<std::thread> clients;
    for (int c = 0; c < options.clients; ++c) {
      clients.emplace_back([&, c] {
        try {
          auto& lat = latencies[static_cast<size_t>(c)];
          for (int64_t i = c; i < n; i += options.clients) {
            const auto sent = Clock::now();
            torch::Tensor logits = batcher.submit(images[i]).get();  // [10]
            lat.push_back(std::chrono::duration<double, std::milli>(Clock::now() - sent).count());
            served_pred[static_cast<size_t>(i)] = logits.argmax().item<int64_t>();
            served_logits[static_cast<size_t>(i)] = logits;
          }
        } catch (...) {
          errors[static_cast<size_t>(c)] = std::current_exception();
        }
      });
    }
    for (auto& t : clients) t.join();
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  batcher.shutdown();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }

  auto tgt = targets.to(torch::kInt64).cpu();
  auto t = tgt.accessor<int64_t, 1>();
  for (int64_t i = 0; i < n; ++i) {
    r.serve_correct += served_pred[static_cast<size_t>(i)] == t[i];
    r.offline_correct += offline_pred[static_cast<size_t>(i)] == t[i];
    r.predictions_differing +=
        served_pred[static_cast<size_t>(i)] != offline_pred[static_cast<size_t>(i)];
    const bool differs =
        !torch::equal(served_logits[static_cast<size_t>(i)].cpu(), offline_logits[i]);
    r.logits_differing += differs;
    r.logits_differing_alone += differs && batch_of[static_cast<size_t>(i)] == 1;
  }
  r.serve_accuracy = static_cast<double>(r.serve_correct) / static_cast<double>(n);
  r.offline_accuracy = static_cast<double>(r.offline_correct) / static_cast<double>(n);
  r.requests_per_s = static_cast<double>(n) / r.seconds;
  std::vector<double> all;
  for (auto& l : latencies) all.insert(all.end(), l.begin(), l.end());
  std::sort(all.begin(), all.end());
  r.p50_ms = percentile(all, 0.50);
  r.p99_ms = percentile(all, 0.99);
  const auto stats = batcher.stats();
  r.mean_batch = stats.mean_batch_size;
  r.batches = stats.batches_run;
  if (stats.batch_size_histogram.size() > 1)
    r.requests_in_batches_of_one = stats.batch_size_histogram[1];
  TORCH_CHECK(stats.requests_succeeded == n, "serve: the batcher answered ",
              stats.requests_succeeded, " of ", n, " requests with a result");
  TORCH_CHECK(r.serve_correct == r.offline_correct, "serve: serving accuracy ", r.serve_accuracy,
              " (", r.serve_correct, " correct) differs from the offline accuracy ",
              r.offline_accuracy, " (", r.offline_correct, " correct) of the same model; ",
              r.predictions_differing, " images got another class when served");
  return r;
}

void print_serve_report(const ServeReport& r, const ServeOptions& o) {
  std::printf(
      "serve:      %lld requests from %d clients in %.2f s: %.0f requests/s, latency p50 %.2f ms "
      "p99 %.2f ms\n",
      static_cast<long long>(r.requests), o.clients, r.seconds, r.requests_per_s, r.p50_ms,
      r.p99_ms);
  std::printf(
      "            %lld batches, mean size %.1f (max %lld, max delay %lld us, %lld worker%s)\n",
      static_cast<long long>(r.batches), r.mean_batch, static_cast<long long>(o.max_batch),
      static_cast<long long>(o.max_delay_us), static_cast<long long>(o.workers),
      o.workers == 1 ? "" : "s");
  std::printf(
      "            accuracy served %.4f %s offline %.4f (%lld of %lld correct; %lld predictions "
      "differ)\n",
      r.serve_accuracy, r.serve_correct == r.offline_correct ? "=" : "vs", r.offline_accuracy,
      static_cast<long long>(r.serve_correct), static_cast<long long>(r.requests),
      static_cast<long long>(r.predictions_differing));
  std::printf(
      "            %s logits served = offline bit for bit for %lld of %lld images (%lld differ, "
      "%lld "
      "of them run alone; %lld requests ran in batches of one)\n",
      o.int8 ? "int8" : "fp32", static_cast<long long>(r.requests - r.logits_differing),
      static_cast<long long>(r.requests), static_cast<long long>(r.logits_differing),
      static_cast<long long>(r.logits_differing_alone),
      static_cast<long long>(r.requests_in_batches_of_one));
  std::fflush(stdout);
}

void add_serve_fields(nlohmann::json& j, const ServeReport& r, const ServeOptions& o) {
  j["serve_clients"] = o.clients;
  j["serve_max_batch"] = o.max_batch;
  j["serve_max_delay_us"] = o.max_delay_us;
  j["serve_requests_per_s"] = r.requests_per_s;
  j["serve_p50_ms"] = r.p50_ms;
  j["serve_p99_ms"] = r.p99_ms;
  j["serve_mean_batch"] = r.mean_batch;
  j["serve_test_accuracy"] = r.serve_accuracy;
  j["offline_test_accuracy"] = r.offline_accuracy;
  j["serve_logits_differ"] = r.logits_differing;
  j["serve_requests_in_batches_of_one"] = r.requests_in_batches_of_one;
  j["serve_logits_differ_alone"] = r.logits_differing_alone;
  if (o.int8) {
    j["serve_int8_differ"] = r.logits_differing;
    j["serve_int8_differ_alone"] = r.logits_differing_alone;
  }
}

}  // namespace fmnist
