#include "wick/async_checkpoint.h"

#include "host_snapshot.h"
#include "module_state.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

namespace wick {

namespace {

using Clock = std::chrono::steady_clock;

double elapsed_s(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A c10::Error carrying `msg`, as an exception_ptr.
std::exception_ptr async_error(const std::string& msg) {
  try {
    C10_THROW_ERROR(Error, msg);
  } catch (...) {
    return std::current_exception();
  }
}

}  // namespace

struct AsyncCheckpointWriter::State {
  explicit State(AsyncCheckpointWriterOptions o)
      : options(o), staging(std::make_shared<detail::HostStaging>(o.reuse_host_buffers())) {}

  // Joins the background save when it is over (or, with `block`, once it is),
  // then recycles its host buffers; the thread destroyed its checkpoint first.
  void join(bool block) {
    if (!thread.joinable()) return;
    if (!block && !done.load(std::memory_order_acquire)) return;
    thread.join();
    staging->recycle();
  }

  // Throws the failure not raised yet, once.
  void raise() {
    std::exception_ptr e;
    {
      std::lock_guard<std::mutex> lock(mutex);
      std::swap(e, error);
    }
    if (e) std::rethrow_exception(e);
  }

  // The background part of a save, on `thread`.
  void write(std::unique_ptr<Checkpoint> ckpt, Job job, const std::string& path,
             const AfterWrite& after_write) {
    const auto t0 = Clock::now();
    std::exception_ptr failure;
    bool written = false;
    try {
      job(*ckpt);
      written = true;
      if (after_write) after_write();
    } catch (const std::exception& e) {
      failure = async_error(
          written ? c10::str("AsyncCheckpointWriter: '", path,
                             "' was saved, but after_write failed: ", detail::message_of(e))
                  : c10::str("AsyncCheckpointWriter: the background save of '", path,
                             "' failed: ", detail::message_of(e)));
    } catch (...) {
      failure = std::current_exception();
    }
    job = nullptr;  // and the host copies it holds
    ckpt.reset();   // its host copies are free for recycle() from here
    {
      std::lock_guard<std::mutex> lock(mutex);
      stats.last_write_s = elapsed_s(t0);
      if (failure) {
        stats.saves_failed += 1;
        error = failure;
      } else {
        stats.saves_completed += 1;
        stats.last_completed_path = path;
      }
    }
    done.store(true, std::memory_order_release);
  }

  AsyncCheckpointWriterOptions options;
  std::shared_ptr<detail::HostStaging> staging;
  std::thread thread;  // the save in flight, or a finished one not joined yet
  std::atomic<bool> done{true};
  mutable std::mutex mutex;  // guards stats and error
  AsyncCheckpointStats stats;
  std::exception_ptr error;  // a failure not raised yet
};

AsyncCheckpointWriter::AsyncCheckpointWriter(AsyncCheckpointWriterOptions options)
    : state_(std::make_unique<State>(options)) {}

AsyncCheckpointWriter::~AsyncCheckpointWriter() {
  if (state_->thread.joinable()) state_->thread.join();
  std::exception_ptr e;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    e = state_->error;
  }
  if (!e) return;
  try {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      TORCH_WARN("AsyncCheckpointWriter destroyed with a failed background save nobody raised ",
                 "(call wait() before destroying it): ", detail::message_of(ex));
    }
  } catch (...) {
    // A warning handler that throws: a destructor never throws.
  }
}

void AsyncCheckpointWriter::save(const std::string& path, const Build& build,
                                 AfterWrite after_write) {
  TORCH_CHECK(!path.empty(), "AsyncCheckpointWriter: save() needs a path, got an empty string");
  TORCH_CHECK(build, "AsyncCheckpointWriter: save('", path, "') needs a build function");
  submit(
      path,
      [&](Checkpoint& ckpt, detail::HostStaging&) -> Job {
        build(ckpt);
        return [path](Checkpoint& c) { c.save(path); };
      },
      std::move(after_write));
}

void AsyncCheckpointWriter::submit(const std::string& path, const Snapshot& snapshot,
                                   AfterWrite after_write) {
  State& s = *state_;
  const auto t0 = Clock::now();
  s.join(/*block=*/true);  // at most one in flight
  const double wait_s = elapsed_s(t0);
  s.raise();

  const auto t1 = Clock::now();
  auto ckpt = std::make_unique<Checkpoint>(Checkpoint::host_snapshot(s.staging));
  Job job;
  try {
    job = snapshot(*ckpt, *s.staging);
  } catch (...) {
    ckpt.reset();
    s.staging->recycle();
    throw;
  }
  s.staging->end_snapshot();
  const int64_t bytes = s.staging->bytes();
  const double snapshot_s = elapsed_s(t1);

  s.done.store(false, std::memory_order_release);
  try {
    s.thread = std::thread([&s, ckpt = std::move(ckpt), job = std::move(job), path,
                            after = std::move(after_write)]() mutable {
      s.write(std::move(ckpt), std::move(job), path, after);
    });
  } catch (const std::system_error& e) {
    s.done.store(true, std::memory_order_release);
    s.staging->recycle();
    TORCH_CHECK(false, "AsyncCheckpointWriter: cannot start the background save of '", path,
                "': ", e.what());
  }
  std::lock_guard<std::mutex> lock(s.mutex);
  s.stats.saves_started += 1;
  s.stats.last_blocked_s = elapsed_s(t0);
  s.stats.last_wait_s = wait_s;
  s.stats.last_snapshot_s = snapshot_s;
  s.stats.last_snapshot_bytes = bytes;
}

void AsyncCheckpointWriter::check() {
  state_->join(/*block=*/false);
  state_->raise();
}

void AsyncCheckpointWriter::wait() {
  state_->join(/*block=*/true);
  state_->raise();
}

bool AsyncCheckpointWriter::in_flight() const {
  return !state_->done.load(std::memory_order_acquire);
}

AsyncCheckpointStats AsyncCheckpointWriter::stats() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->stats;
}

}  // namespace wick
