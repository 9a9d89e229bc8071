#include <wick/pipeline.h>

#include <ATen/autocast_mode.h>
#ifdef WICK_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <thread>

namespace wick {

// ---------------------------------------------------------------- splitting

std::vector<torch::nn::Sequential> split_sequential(const torch::nn::Sequential& model,
                                                    const std::vector<int64_t>& sizes) {
  TORCH_CHECK(!sizes.empty(), "split_sequential: sizes is empty");
  int64_t total = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    TORCH_CHECK(sizes[i] >= 1, "split_sequential: every part needs at least one module, part ", i,
                " has ", sizes[i]);
    total += sizes[i];
  }
  TORCH_CHECK(total == static_cast<int64_t>(model->size()), "split_sequential: sizes sum to ",
              total, " but the Sequential has ", model->size(), " modules");
  const auto children =
      model->named_children();  // names kept, so parameter names stay recognisable
  std::vector<torch::nn::Sequential> parts;
  size_t next = 0;
  for (int64_t n : sizes) {
    torch::nn::Sequential part;
    for (int64_t k = 0; k < n; ++k, ++next) {
      part->push_back(children[next].key(), *(model->begin() + static_cast<std::ptrdiff_t>(next)));
    }
    parts.push_back(part);
  }
  return parts;
}

std::vector<torch::nn::Sequential> split_sequential(const torch::nn::Sequential& model,
                                                    int64_t parts) {
  const auto n = static_cast<int64_t>(model->size());
  TORCH_CHECK(parts >= 1 && parts <= n, "split_sequential: parts must be in [1, ", n,
              "] (the modules), got ", parts);
  std::vector<int64_t> params(n);
  for (int64_t i = 0; i < n; ++i) {
    for (const auto& p : model->ptr(i)->parameters()) params[i] += p.numel();
  }
  const double total =
      static_cast<double>(std::accumulate(params.begin(), params.end(), int64_t{0}));
  // Greedy: close a part once the running count reaches its share, leaving
  // at least one module for every part still to come.
  std::vector<int64_t> sizes;
  int64_t start = 0, running = 0;
  for (int64_t i = 0; i < n; ++i) {
    running += params[i];
    const int64_t left_parts = parts - static_cast<int64_t>(sizes.size()) - 1;
    const int64_t left_modules = n - i - 1;
    const double target =
        total * static_cast<double>(sizes.size() + 1) / static_cast<double>(parts);
    if (left_parts > 0 && (static_cast<double>(running) >= target || left_modules == left_parts)) {
      sizes.push_back(i - start + 1);
      start = i + 1;
    }
  }
  sizes.push_back(n - start);
  return split_sequential(model, sizes);
}

// ---------------------------------------------------------------- Pipeline

PipelineImpl::PipelineImpl(std::vector<PipelineStage> stages, PipelineOptions options)
    : stages_(std::move(stages)), options_(options) {
  TORCH_CHECK(!stages_.empty(), "Pipeline: no stages");
  TORCH_CHECK(options_.chunks() >= 1, "Pipeline: chunks must be >= 1, got ", options_.chunks());
  for (size_t s = 0; s < stages_.size(); ++s) {
    TORCH_CHECK(stages_[s].module && stages_[s].module->size() > 0, "Pipeline: stage ", s,
                " has no modules");
    stages_[s].module->to(stages_[s].device);
    register_module("stage" + std::to_string(s), stages_[s].module);
  }
}

namespace {

std::string stage_name(size_t s, const PipelineStage& stage) {
  return c10::str("stage ", s, " (", stage.device, ")");
}

void check_move(const std::vector<PipelineStage>& stages, const torch::Device& device) {
  for (size_t s = 0; s < stages.size(); ++s) {
    TORCH_CHECK(
        stages[s].device == device, "Pipeline: cannot move the pipeline to ", device, ": ",
        stage_name(s, stages[s]),
        " has its own device (build the Pipeline with the devices you want; in a Trainer, leave "
        "TrainerOptions::device unset)");
  }
}

}  // namespace

void PipelineImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  check_move(stages_, device);
  torch::nn::Module::to(device, dtype, non_blocking);
}

void PipelineImpl::to(torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(dtype, non_blocking);
}

void PipelineImpl::to(torch::Device device, bool non_blocking) {
  check_move(stages_, device);
  torch::nn::Module::to(device, non_blocking);
}

namespace {

// Rows of each micro-batch: `chunks` near-equal parts (fewer when rows are few).
std::vector<int64_t> chunk_rows(int64_t rows, int64_t chunks) {
  TORCH_CHECK(rows >= 1, "Pipeline: the batch is empty");
  const int64_t m = std::min(rows, chunks);
  std::vector<int64_t> out(m, rows / m);
  for (int64_t i = 0; i < rows % m; ++i) ++out[i];
  return out;
}

}  // namespace

torch::Tensor PipelineImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(input.defined() && input.dim() >= 1, "Pipeline: input must have a batch dimension");
  std::vector<torch::Tensor> outputs;
  int64_t offset = 0;
  for (int64_t rows : chunk_rows(input.size(0), options_.chunks())) {
    torch::Tensor x = input.narrow(0, offset, rows);
    offset += rows;
    for (size_t s = 0; s < stages_.size(); ++s) {
      try {
        x = stages_[s].module->forward(x.to(stages_[s].device));
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "Pipeline: ", stage_name(s, stages_[s]),
                    " failed on its input of shape ", x.sizes(), ": ", e.what_without_backtrace());
      }
    }
    outputs.push_back(x);
  }
  return outputs.size() == 1 ? outputs[0] : torch::cat(outputs);
}

namespace {

// Tensors handed from one stage's thread to another's, by micro-batch. On
// CUDA, each stage's thread works on a stream of its own: put() records an
// event on the producer's stream after the tensor was computed, take() makes
// the consumer's stream wait for it (on the GPU, the host does not block) and
// tells the caching allocator the tensor is used on that stream.
class Mailbox {
 public:
  void put(int64_t m, torch::Tensor t) {
    Item item{std::move(t), nullptr};
#ifdef WICK_WITH_CUDA
    if (item.tensor.is_cuda()) {
      item.ready = std::make_shared<at::cuda::CUDAEvent>();
      item.ready->record(c10::cuda::getCurrentCUDAStream(item.tensor.device().index()));
    }
#endif
    {
      std::lock_guard<std::mutex> lock(mutex_);
      items_[m] = std::move(item);
    }
    cv_.notify_all();
  }
  torch::Tensor take(int64_t m, const std::atomic<bool>& abort) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return abort.load() || items_.count(m) != 0; });
    if (abort.load()) throw std::runtime_error("aborted");
    Item item = std::move(items_[m]);
    items_.erase(m);
    lock.unlock();
#ifdef WICK_WITH_CUDA
    if (item.ready) {
      auto stream = c10::cuda::getCurrentCUDAStream(item.tensor.device().index());
      item.ready->block(stream);
      item.tensor.record_stream(stream);
    }
#endif
    return item.tensor;
  }
  void wake() { cv_.notify_all(); }

 private:
  struct Item {
    torch::Tensor tensor;
#ifdef WICK_WITH_CUDA
    std::shared_ptr<at::cuda::CUDAEvent> ready;
#else
    std::shared_ptr<void> ready;
#endif
  };
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<int64_t, Item> items_;
};

// The calling thread's autocast state, to be set in the stages' threads.
struct AutocastState {
  bool cpu = false, cuda = false;
  at::ScalarType cpu_dtype = at::kBFloat16, cuda_dtype = at::kHalf;
  static AutocastState current() {
    AutocastState s;
    s.cpu = at::autocast::is_autocast_enabled(at::kCPU);
    s.cuda = at::autocast::is_autocast_enabled(at::kCUDA);
    s.cpu_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    s.cuda_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
    return s;
  }
  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }
};

enum class Op { kForward, kBackward };

// Stage s's order of work for p stages and m micro-batches.
std::vector<std::pair<Op, int64_t>> stage_schedule(PipelineSchedule schedule, int64_t s, int64_t p,
                                                   int64_t m) {
  std::vector<std::pair<Op, int64_t>> ops;
  if (schedule == PipelineSchedule::kGPipe) {
    for (int64_t i = 0; i < m; ++i) ops.emplace_back(Op::kForward, i);
    for (int64_t i = 0; i < m; ++i) ops.emplace_back(Op::kBackward, i);
    return ops;
  }
  const int64_t warmup = std::min(p - s - 1, m);
  for (int64_t i = 0; i < warmup; ++i) ops.emplace_back(Op::kForward, i);
  for (int64_t i = 0; i < m - warmup; ++i) {
    ops.emplace_back(Op::kForward, warmup + i);
    ops.emplace_back(Op::kBackward, i);
  }
  for (int64_t i = m - warmup; i < m; ++i) ops.emplace_back(Op::kBackward, i);
  return ops;
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

torch::Tensor PipelineImpl::train_step(const torch::Tensor& input, const torch::Tensor& target,
                                       const PipelineLossFn& loss_fn, double grad_scale) {
  TORCH_CHECK(input.defined() && input.dim() >= 1, "Pipeline: input must have a batch dimension");
  TORCH_CHECK(target.defined() && target.dim() >= 1 && target.size(0) == input.size(0),
              "Pipeline: target must have the input's batch size ", input.size(0), ", got shape ",
              target.defined() ? target.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(loss_fn, "Pipeline: no loss function");
  TORCH_CHECK(
      torch::GradMode::is_enabled() && !c10::InferenceMode::is_enabled(),
      "Pipeline: train_step needs gradients; it was called under NoGradGuard or InferenceMode");
  const auto rows = chunk_rows(input.size(0), options_.chunks());
  const auto p = static_cast<int64_t>(stages_.size());
  const auto m = static_cast<int64_t>(rows.size());
  const double total_rows = static_cast<double>(input.size(0));
  const auto& last_device = stages_.back().device;

  std::vector<torch::Tensor> inputs, targets;
  int64_t offset = 0;
  for (int64_t r : rows) {
    inputs.push_back(input.narrow(0, offset, r));
    targets.push_back(target.narrow(0, offset, r).to(last_device));
    offset += r;
  }
  std::vector<torch::Tensor> losses(m);  // each micro-batch's weighted loss, detached

  std::vector<Mailbox> activations(p), gradients(p);  // [s]: what stage s receives
  std::atomic<bool> abort{false};
  std::mutex error_mutex;
  std::exception_ptr error;
  std::string error_where;
  std::vector<double> busy(p, 0.0);
  const AutocastState autocast = AutocastState::current();
  const auto& checkpointing = options_.checkpointing();

#ifdef WICK_WITH_CUDA
  // Each CUDA stage computes on a stream from the pool; the caller's stream
  // waits for all of them at the end, so what follows the step (the
  // optimizer) sees the gradients.
  std::vector<std::optional<c10::cuda::CUDAStream>> streams(p);
  for (int64_t s = 0; s < p; ++s) {
    if (stages_[s].device.is_cuda())
      streams[s] = c10::cuda::getStreamFromPool(false, stages_[s].device.index());
  }
#endif
  auto run_stage = [&](int64_t s) {
    autocast.apply();
    torch::AutoGradMode grad_mode(true);
#ifdef WICK_WITH_CUDA
    std::optional<c10::cuda::CUDAStreamGuard> on_stream;
    if (streams[s]) {
      // The stage's stream waits for work the caller queued before the step.
      at::cuda::CUDAEvent before;
      before.record(c10::cuda::getCurrentCUDAStream(streams[s]->device_index()));
      before.block(*streams[s]);
      on_stream.emplace(*streams[s]);
    }
#endif
    auto& module = stages_[s].module;
    const auto& device = stages_[s].device;
    const bool last = s == p - 1;
    const bool recompute = checkpointing == ActivationCheckpointing::kAlways ||
                           (checkpointing == ActivationCheckpointing::kExceptLast && !last);
    struct Stash {
      torch::Tensor input,
          output;  // output (or the loss, last stage) with its graph, unless recomputing
    };
    std::map<int64_t, Stash> stash;
    auto stage_output = [&](const torch::Tensor& x, int64_t mb) {
      torch::Tensor y = module->forward(x);
      if (!last) return y;
      return loss_fn(y, targets[mb]) * (static_cast<double>(rows[mb]) / total_rows);
    };
    int64_t mb = -1;
    Op op = Op::kForward;
    try {
      for (const auto& [next_op, next_mb] : stage_schedule(options_.schedule(), s, p, m)) {
        op = next_op;
        mb = next_mb;
        if (op == Op::kForward) {
          torch::Tensor x = s == 0 ? inputs[mb] : activations[s].take(mb, abort);
          const auto t0 = std::chrono::steady_clock::now();
          x = x.to(device, /*non_blocking=*/true);
          if (s > 0 && x.is_floating_point()) x = x.detach().requires_grad_(true);
          torch::Tensor y;
          if (recompute) {
            torch::NoGradGuard no_grad;
            y = stage_output(x, mb);
          } else {
            y = stage_output(x, mb);
          }
          if (last) {
            losses[mb] = y.detach();
          } else {
            activations[s + 1].put(mb, y.detach());
          }
          stash[mb] = Stash{x, recompute ? torch::Tensor() : y};
          busy[s] += since(t0);
        } else {
          torch::Tensor grad = last ? torch::Tensor() : gradients[s].take(mb, abort);
          const auto t0 = std::chrono::steady_clock::now();
          Stash st = std::move(stash.at(mb));
          stash.erase(mb);
          torch::Tensor y = recompute ? stage_output(st.input, mb) : st.output;
          if (last) {
            (y * grad_scale).backward();
          } else if (y.requires_grad()) {
            torch::autograd::backward({y}, {grad.to(y.device(), /*non_blocking=*/true)});
          }
          if (s > 0) {
            const auto& g = st.input.grad();
            gradients[s - 1].put(mb, g.defined() ? g : torch::zeros_like(st.input));
          }
          busy[s] += since(t0);
        }
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error && !abort.load()) {
        error = std::current_exception();
        error_where = c10::str(stage_name(s, stages_[s]), ", ",
                               op == Op::kForward ? "forward" : "backward", " of micro-batch ", mb);
      }
      abort = true;
      for (auto& box : activations) box.wake();
      for (auto& box : gradients) box.wake();
    }
  };

  const auto t0 = std::chrono::steady_clock::now();
  if (p == 1) {
    run_stage(0);
  } else {
    std::vector<std::thread> threads;
    for (int64_t s = 0; s < p; ++s) threads.emplace_back(run_stage, s);
    for (auto& t : threads) t.join();
  }
#ifdef WICK_WITH_CUDA
  for (int64_t s = 0; s < p; ++s) {
    if (!streams[s]) continue;
    at::cuda::CUDAEvent done;
    done.record(*streams[s]);
    done.block(c10::cuda::getCurrentCUDAStream(streams[s]->device_index()));
  }
#endif
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "Pipeline: ", error_where, " failed: ", e.what_without_backtrace());
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "Pipeline: ", error_where, " failed: ", e.what());
    }
  }
  stats_.stages = p;
  stats_.micro_batches = m;
  stats_.step_seconds = since(t0);
  stats_.busy_seconds = busy;
  const double mean_busy = std::accumulate(busy.begin(), busy.end(), 0.0) / static_cast<double>(p);
  stats_.bubble_fraction = stats_.step_seconds > 0 ? 1.0 - mean_busy / stats_.step_seconds : 0.0;
  stats_.ideal_bubble_fraction = static_cast<double>(p - 1) / static_cast<double>(m + p - 1);
  torch::Tensor loss = losses[0];
  for (int64_t i = 1; i < m; ++i) loss = loss + losses[i];
  return loss;
}

// ---------------------------------------------------------------- PipelineTask

namespace {

// The loss PipelineTask hands the Trainer. Its forward has already run the
// pipeline's forwards and backwards at scale `provisional`, and kept those
// gradients apart; backward(g) adds g / provisional times them to .grad,
// which is what backward of g x loss would have added (gradients are linear
// in the loss's scale).
struct PipelineLoss : torch::autograd::Function<PipelineLoss> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& anchor,
                               PipelineImpl* pipeline, const torch::Tensor& input,
                               const torch::Tensor& target, const PipelineLossFn* loss_fn,
                               double provisional) {
    std::vector<torch::Tensor> params = pipeline->parameters();
    std::vector<torch::Tensor> before;  // gradients from earlier micro-steps, set aside
    for (auto& p : params) {
      before.push_back(p.grad());
      p.mutable_grad() = torch::Tensor();
    }
    torch::Tensor loss;
    try {
      torch::AutoGradMode enable(true);
      loss = pipeline->train_step(input, target, *loss_fn, provisional);
    } catch (...) {
      for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = before[i];
      throw;
    }
    c10::List<std::optional<at::Tensor>> computed;
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& g = params[i].grad();
      computed.push_back(g.defined() ? std::optional<at::Tensor>(g) : std::nullopt);
      params[i].mutable_grad() = before[i];
    }
    ctx->saved_data["grads"] = computed;
    ctx->saved_data["provisional"] = provisional;
    ctx->saved_data["pipeline"] = reinterpret_cast<int64_t>(pipeline);
    return loss.to(anchor.device());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    // The pointer saved by forward, round-tripped through an IValue int; the
    // Pipeline outlives the graph built in its own step.
    auto* pipeline = reinterpret_cast<PipelineImpl*>(  // NOLINT(performance-no-int-to-ptr)
        ctx->saved_data["pipeline"].toInt());
    const double provisional = ctx->saved_data["provisional"].toDouble();
    const auto computed = ctx->saved_data["grads"].to<c10::List<std::optional<at::Tensor>>>();
    const torch::Tensor& g = grad_outputs[0];
    torch::NoGradGuard no_grad;
    auto params = pipeline->parameters();
    TORCH_CHECK(computed.size() == params.size(),
                "PipelineTask: the pipeline's parameters changed during a step");
    for (size_t i = 0; i < params.size(); ++i) {
      const std::optional<at::Tensor> c = computed.get(i);
      if (!c.has_value()) continue;
      torch::Tensor add = *c * (g.to(c->device(), c->scalar_type()) / provisional);
      auto& grad = params[i].mutable_grad();
      if (grad.defined()) {
        grad.add_(add);
      } else {
        grad = add;
      }
    }
    return {torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

PipelineTask::PipelineTask(Pipeline pipeline, PipelineLossFn loss_fn)
    : pipeline_(std::move(pipeline)),
      loss_fn_(std::move(loss_fn)),
      // Validation: the pipeline's output brought back to the batch's device.
      validation_(
          pipeline_.ptr(),
          [p = pipeline_](const torch::Tensor& x) mutable { return p->forward(x).to(x.device()); },
          loss_fn_),
      anchor_(torch::zeros({}, torch::TensorOptions().requires_grad(true))) {
  TORCH_CHECK(loss_fn_, "PipelineTask: no loss function");
}

StepOutput PipelineTask::training_step(const Batch& batch) {
  const double provisional = grad_scale_source_ ? grad_scale_source_() : 1.0;
  TORCH_CHECK(provisional > 0 && std::isfinite(provisional),
              "PipelineTask: the grad scale source gave ", provisional);
  return PipelineLoss::apply(anchor_, pipeline_.get(), batch.data, batch.target, &loss_fn_,
                             provisional);
}

std::map<std::string, torch::Tensor> PipelineTask::validation_step(const Batch& batch) {
  return validation_.validation_step(batch);
}

}  // namespace wick
