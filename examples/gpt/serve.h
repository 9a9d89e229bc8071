#pragma once
// Continuous batching of generation requests (iteration-level scheduling, as
// in Orca and vLLM): the model decodes one position for every running
// sequence per step; a new request joins the running batch at the next step,
// a finished one leaves at once and frees its slot.

#include "model.h"

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace gpt {

enum class BatchingMode {
  kContinuous,  ///< join and leave at every step
  kStatic,      ///< a batch is formed when the previous one has finished entirely
};

struct ServeOptions {
  int64_t max_batch = 32;  ///< slots: sequences decoded together
  BatchingMode mode = BatchingMode::kContinuous;
};

struct ServeStats {
  int64_t requests = 0;
  int64_t tokens = 0;        ///< generated
  int64_t decode_steps = 0;  ///< batched forward passes
  double mean_batch = 0;     ///< sequences per decode step
  int64_t max_batch_seen = 0;
};

/// Serves generate() requests from any number of threads. Each answer is what
/// generate(model, prompt, options) gives for that request alone (the same
/// prompt trimming, sampling and stopping rules).
class ContinuousBatcher {
 public:
  ContinuousBatcher(GPT model, ServeOptions options = {});
  /// Stops taking requests, finishes the running and queued ones, joins.
  ~ContinuousBatcher();
  ContinuousBatcher(const ContinuousBatcher&) = delete;
  ContinuousBatcher& operator=(const ContinuousBatcher&) = delete;

  std::future<std::string> submit(std::string prompt, SampleOptions options);
  ServeStats stats() const;

 private:
  struct Request {
    std::string prompt;
    SampleOptions options;
    std::promise<std::string> answer;
  };
  struct Running;
  void loop();

  GPT model_;
  ServeOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Request> queue_;
  bool stopping_ = false;
  ServeStats stats_;
  int64_t batch_sum_ = 0;
  std::thread worker_;
};

}  // namespace gpt
