#include "serve.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

namespace gpt {

struct ContinuousBatcher::Running {
  Request request;
  at::Generator generator;
  std::string output;
  int64_t slot = 0;
  int64_t length = 0;  // positions in the slot's cache
  int64_t next = 0;    // the newest token, not yet in the cache
};

ContinuousBatcher::ContinuousBatcher(GPT model, ServeOptions options)
    : model_(std::move(model)), options_(options) {
  TORCH_CHECK(options_.max_batch >= 1, "ContinuousBatcher: max_batch must be >= 1, got ",
              options_.max_batch);
  model_->eval();
  worker_ = std::thread([this] { loop(); });
}

ContinuousBatcher::~ContinuousBatcher() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

std::future<std::string> ContinuousBatcher::submit(std::string prompt, SampleOptions options) {
  Request r{std::move(prompt), options, {}};
  auto future = r.answer.get_future();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) {
      r.answer.set_exception(
          std::make_exception_ptr(std::runtime_error("ContinuousBatcher: shutting down")));
      return future;
    }
    if (r.prompt.empty()) {
      r.answer.set_exception(
          std::make_exception_ptr(std::invalid_argument("ContinuousBatcher: the prompt is empty")));
      return future;
    }
    queue_.push_back(std::move(r));
  }
  cv_.notify_all();
  return future;
}

ServeStats ContinuousBatcher::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ServeStats s = stats_;
  s.mean_batch =
      s.decode_steps ? static_cast<double>(batch_sum_) / static_cast<double>(s.decode_steps) : 0.0;
  return s;
}

void ContinuousBatcher::loop() {
  c10::InferenceMode guard;
  const int64_t context = model_->config().context;
  SlotCache cache = model_->make_slot_cache(options_.max_batch);
  const auto device = model_->head->weight.device();
  std::vector<int64_t> free_slots;
  for (int64_t s = options_.max_batch - 1; s >= 0; --s) free_slots.push_back(s);
  std::vector<Running> running;

  auto finish = [&](Running& r) {
    {
      std::lock_guard<std::mutex> lock(mutex_);  // counted before the answer is seen
      ++stats_.requests;
    }
    free_slots.push_back(r.slot);
    r.request.answer.set_value(std::move(r.output));
  };
  // Samples the next token from `logits`; false when the sequence is done.
  auto advance = [&](Running& r, const torch::Tensor& logits) {
    r.next = sample_token(logits.cpu(), r.request.options, r.generator);
    r.output.push_back(static_cast<char>(r.next));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.tokens;
    }
    return static_cast<int64_t>(r.output.size()) < r.request.options.max_new_tokens;
  };

  while (true) {
    // Admit: every waiting request while slots are free (static batching:
    // only when the previous batch has finished entirely).
    std::vector<Request> admitted;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || !running.empty(); });
      if (stopping_ && queue_.empty() && running.empty()) return;
      const bool may_admit = options_.mode == BatchingMode::kContinuous || running.empty();
      while (may_admit && !queue_.empty() && free_slots.size() > admitted.size()) {
        admitted.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
    }
    for (auto& request : admitted) {
      Running r{std::move(request), at::Generator(), {}, 0, 0, 0};
      r.generator = at::make_generator<at::CPUGeneratorImpl>(r.request.options.seed);
      try {
        // Prefill alone, as generate() does, then move its cache into a slot.
        std::vector<int64_t> ids;
        for (unsigned char c : r.request.prompt) ids.push_back(c);
        if (static_cast<int64_t>(ids.size()) > context - 1)
          ids.erase(ids.begin(), ids.end() - (context - 1));
        KVCache single;
        auto logits = model_->forward(torch::tensor(ids).unsqueeze(0).to(device), &single);
        r.slot = free_slots.back();
        free_slots.pop_back();
        GPTImpl::store(single, cache, r.slot);
        r.length = single.length();
        if (r.request.options.max_new_tokens <= 0 || !advance(r, logits[0][-1])) {
          finish(r);
        } else {
          running.push_back(std::move(r));
        }
      } catch (...) {
        r.request.answer.set_exception(std::current_exception());
      }
    }
    if (running.empty()) continue;

    // One decode step for every running sequence.
    std::vector<int64_t> tokens, slots, positions;
    for (const auto& r : running) {
      tokens.push_back(r.next);
      slots.push_back(r.slot);
      positions.push_back(r.length);
    }
    try {
      auto logits = model_->decode_slots(torch::tensor(tokens, torch::kLong).to(device), slots,
                                         positions, cache);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ++stats_.decode_steps;
        batch_sum_ += static_cast<int64_t>(running.size());
        stats_.max_batch_seen =
            std::max<int64_t>(stats_.max_batch_seen, static_cast<int64_t>(running.size()));
      }
      std::vector<Running> still;
      for (size_t b = 0; b < running.size(); ++b) {
        auto& r = running[b];
        ++r.length;
        // generate() stops once the cache holds the whole context.
        if (r.length >= context || !advance(r, logits[static_cast<int64_t>(b)])) {
          finish(r);
        } else {
          still.push_back(std::move(r));
        }
      }
      running = std::move(still);
    } catch (...) {
      for (auto& r : running) {
        r.request.answer.set_exception(std::current_exception());
        free_slots.push_back(r.slot);
      }
      running.clear();
    }
  }
}

}  // namespace gpt
