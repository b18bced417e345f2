// Runs a kernel's work items on the calling thread and XLA's intra-op thread pool, shared by
// the CPU kernels in this folder.

#ifndef EMBER_PALLAS_KERNELS_CPU_FOR_EACH_ITEM_H_
#define EMBER_PALLAS_KERNELS_CPU_FOR_EACH_ITEM_H_

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ember_cpu {

// Waking a pool thread costs tens of microseconds on a loaded machine, as long as reading a few
// hundred kilobytes: a call that reads less than this per helper runs on fewer helpers (none
// below it), since a decode of one sequence runs hundreds of small products a step.
constexpr int64_t kBytesPerHelper = 512 << 10;

// The helpers worth waking for a call that reads `bytes` (ForEachItem's `helpers`).
inline int64_t HelpersFor(int64_t bytes) { return bytes / kBytesPerHelper; }

// Calls item(i) once for each i < total, from the caller and up to helpers of the pool's
// threads (at most num_threads - 1; items are claimed in order, one at a time), and returns
// when all are done.
// The state is shared with the pool's tasks: one that starts after the work is done finds
// nothing left and never calls item, whose captures (the call's buffers) may be gone by then.
inline void ForEachItem(xla::ffi::ThreadPool& pool, int64_t total,
                        std::function<void(int64_t)> item, int64_t helpers = INT64_MAX) {
  struct State {
    std::function<void(int64_t)> item;
    int64_t total = 0;
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;

    void Run() {
      for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
        item(i);
        if (done.fetch_add(1) + 1 == total) {
          std::lock_guard<std::mutex> lock(mutex);
          finished.notify_all();
        }
      }
    }
  };
  auto state = std::make_shared<State>();
  state->item = std::move(item);
  state->total = total;
  const int64_t threads = std::clamp<int64_t>(helpers, 0, pool.num_threads() - 1) + 1;
  for (int64_t helper = 1; helper < std::min(threads, total); ++helper) {
    pool.Schedule([state] { state->Run(); });
  }
  state->Run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == state->total; });
}

}  // namespace ember_cpu

#endif  // EMBER_PALLAS_KERNELS_CPU_FOR_EACH_ITEM_H_
