// Sanitizer canaries, built only in a WICK_SANITIZE build (tests/CMakeLists.txt,
// scripts/sanitize, docs/sanitizers.md). Each case runs this binary again as
// a child that commits one deliberate bug, under the options and suppression
// files the suite runs with (inherited from ctest's environment), and
// expects the sanitizer's report and a failing exit. They show that those
// options, tests/lsan.supp and tests/tsan.supp (which names LibTorch's
// libraries) leave the sanitizers able to see a bug in wick's own code.
// No LibTorch here: the child's bug is the only thing that can report.

#include <gtest/gtest.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

// GCC defines __SANITIZE_ADDRESS__ / __SANITIZE_THREAD__; clang 14 only
// answers __has_feature.
#if defined(__SANITIZE_THREAD__)
#define WICK_CANARY_TSAN 1
#elif defined(__SANITIZE_ADDRESS__)
#define WICK_CANARY_ASAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define WICK_CANARY_TSAN 1
#elif __has_feature(address_sanitizer)
#define WICK_CANARY_ASAN 1
#endif
#endif

namespace {

struct ChildRun {
  int status = -1;  // exit status, or 128 + signal
  std::string output;
};

// Runs this binary's disabled test `test` in a child process and returns how
// it ended and what it printed (stdout and stderr).
ChildRun run_child(const std::string& test) {
  char path[] = "/tmp/wick-canary-XXXXXX";
  const int fd = ::mkstemp(path);
  if (fd < 0) return {};
  ::unlink(path);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    const std::string filter = "--gtest_filter=" + test;
    ::execl("/proc/self/exe", "sanitizer-canary-child", filter.c_str(),
            "--gtest_also_run_disabled_tests", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ChildRun run;
  int status = 0;
  if (pid > 0 && ::waitpid(pid, &status, 0) == pid)
    run.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  ::lseek(fd, 0, SEEK_SET);
  char buf[4096];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;)
    run.output.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return run;
}

::testing::AssertionResult reported(const ChildRun& run, const std::string& report) {
  if (run.status == 0 || run.output.find(report) == std::string::npos)
    return ::testing::AssertionFailure() << "expected a failing exit with '" << report << "'; exit "
                                         << run.status << ", output:\n"
                                         << run.output;
  return ::testing::AssertionSuccess();
}

// Kept out of the optimizer's reach.
volatile int g_index = 4;
volatile int g_big = INT_MAX;
void* volatile g_sink = nullptr;

}  // namespace

#if defined(WICK_CANARY_TSAN)

struct Counter {
  int value = 0;
};

TEST(SanitizerCanaryChild, DISABLED_DataRaceOnAWickObject) {
  auto* counter = new Counter;
  auto bump = [counter] {
    for (int i = 0; i < 1000; ++i) counter->value = counter->value + 1;
  };
  std::thread a(bump), b(bump);
  a.join();
  b.join();
  std::printf("value %d\n", counter->value);
  delete counter;
}

TEST(SanitizerCanary, ThreadSanitizerReportsARaceInWicksCode) {
  EXPECT_TRUE(reported(run_child("SanitizerCanaryChild.DISABLED_DataRaceOnAWickObject"),
                       "WARNING: ThreadSanitizer: data race"));
}

#elif defined(WICK_CANARY_ASAN)

TEST(SanitizerCanaryChild, DISABLED_HeapBufferOverflow) {
  // Through a volatile pointer: UBSan's object-size check, which sees the
  // allocation's size when the compiler does, would report it first.
  int* volatile p = new int[4]();
  std::printf("%d\n", p[g_index]);
  delete[] p;
}

TEST(SanitizerCanaryChild, DISABLED_Leak) {
  g_sink = new char[64];
  g_sink = nullptr;
}

TEST(SanitizerCanaryChild, DISABLED_SignedOverflow) { std::printf("%d\n", g_big + 1); }

TEST(SanitizerCanary, AddressSanitizerReportsAHeapBufferOverflow) {
  EXPECT_TRUE(reported(run_child("SanitizerCanaryChild.DISABLED_HeapBufferOverflow"),
                       "ERROR: AddressSanitizer: heap-buffer-overflow"));
}

TEST(SanitizerCanary, LeakSanitizerReportsALeak) {
  EXPECT_TRUE(reported(run_child("SanitizerCanaryChild.DISABLED_Leak"),
                       "ERROR: LeakSanitizer: detected memory leaks"));
}

TEST(SanitizerCanary, UndefinedBehaviorSanitizerStopsOnASignedOverflow) {
  EXPECT_TRUE(reported(run_child("SanitizerCanaryChild.DISABLED_SignedOverflow"),
                       "runtime error: signed integer overflow"));
}

#else
#error "sanitizer_canary.cpp is built only under WICK_SANITIZE=address or thread"
#endif
