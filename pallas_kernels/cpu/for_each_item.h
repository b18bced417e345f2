// Runs a kernel's work items on the calling thread and helper threads, and adds up the partial
// sums of items split along the inputs (AddSplits), shared by the CPU kernels in this folder.
//
// A decode of one sequence runs hundreds of small products a step, a few microseconds each and
// a few microseconds apart. Handing one to a thread of XLA's pool costs tens of microseconds
// (a futex wake-up), so small calls used to run on the caller alone. Calls that read less than
// kTeamBytes now go to this library's own helper threads (Team), which keep spinning for
// kSpinMicros after each call, so that the next call finds them awake; larger calls (a step of
// many sequences: milliseconds) go to XLA's pool as before, whose threads XLA's own parallel
// work also needs (docs/perf.md has the figures both ways).

#ifndef EMBER_PALLAS_KERNELS_CPU_FOR_EACH_ITEM_H_
#define EMBER_PALLAS_KERNELS_CPU_FOR_EACH_ITEM_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ember_cpu {

// Bytes a call reads per helper worth waking on XLA's pool, where waking one costs as much as
// reading a few hundred kilobytes.
constexpr int64_t kBytesPerHelper = 512 << 10;
// Calls reading less than this (asking for fewer helpers than kTeamBytes / kBytesPerHelper) run
// on the Team instead.
constexpr int64_t kTeamBytes = 4 << 20;
constexpr int64_t kSpinMicros = 100;   // a Team thread's spin after a call, then it sleeps
constexpr int kPausesBeforeYield = 2000;   // ~30 us of pauses, then spinning yields the core

// The helpers worth waking for a call that reads `bytes` (ForEachItem's `helpers`).
inline int64_t HelpersFor(int64_t bytes) { return bytes / kBytesPerHelper; }

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// One call's items, shared by its caller and the threads that join it. A thread that joins
// after the work is done finds nothing left and never calls item, whose captures (the call's
// buffers) may be gone by then.
struct Work {
  std::function<void(int64_t)> item;
  int64_t total = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int64_t> seats{0};   // Team threads that may still join

  void Run() {
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      item(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// This library's helper threads (as many as XLA's pool has threads, less the caller, and no
// more than a Team call asks for): each spins on the generation of the posted work, joins the
// newest, then spins again for kSpinMicros (yielding the core after kPausesBeforeYield) before
// it sleeps.
class Team {
 public:
  static Team& Get(int64_t threads) {
    static Team* team = new Team(threads);   // never destroyed: its threads are detached
    return *team;
  }

  int64_t size() const { return size_; }

  void Post(const std::shared_ptr<Work>& work) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = work;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
  }

 private:
  explicit Team(int64_t threads) : size_(std::max<int64_t>(threads, 0)) {
    for (int64_t i = 0; i < size(); ++i) std::thread([this] { Loop(); }).detach();
  }

  void Loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        Pause();
        if (spins > kPausesBeforeYield) std::this_thread::yield();
        if (spins % 256 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
          break;
        }
      }
      std::shared_ptr<Work> work;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load();
        work = current_;
      }
      if (work && work->seats.fetch_sub(1) > 0) work->Run();
    }
  }

  const int64_t size_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::shared_ptr<Work> current_;
};

// Calls item(i) once for each i < total, from the caller and up to `helpers` other threads (at
// most XLA's pool's size - 1), and returns when all are done.
inline void ForEachItem(xla::ffi::ThreadPool& pool, int64_t total,
                        std::function<void(int64_t)> item, int64_t helpers = INT64_MAX) {
  auto work = std::make_shared<Work>();
  work->item = std::move(item);
  work->total = total;
  if (helpers < kTeamBytes / kBytesPerHelper) {
    Team& team = Team::Get(std::min<int64_t>(pool.num_threads(), kTeamBytes / kBytesPerHelper) - 1);
    work->seats.store(std::min({helpers, team.size(), total - 1}));
    if (work->seats.load() > 0) team.Post(work);
    work->Run();
    for (int spins = 1; work->done.load(std::memory_order_acquire) != total; ++spins) {
      Pause();
      if (spins > kPausesBeforeYield) std::this_thread::yield();   // a helper may want a core
    }
    work->seats.store(0);
    return;
  }
  // A large call: XLA's pool threads.
  auto finished = std::make_shared<std::pair<std::mutex, std::condition_variable>>();
  const int64_t threads = std::clamp<int64_t>(helpers, 0, pool.num_threads() - 1) + 1;
  for (int64_t helper = 1; helper < std::min(threads, total); ++helper) {
    pool.Schedule([work, finished] {
      work->Run();
      std::lock_guard<std::mutex> lock(finished->first);
      finished->second.notify_all();
    });
  }
  work->Run();
  std::unique_lock<std::mutex> lock(finished->first);
  finished->second.wait(lock, [&] { return work->done.load() == work->total; });
}

// A product's items, panels of `width` columns each split along the inputs, wrote partial
// sums: partial[((panel * splits + split) * rows + r) * width + c]. Adds each panel's splits
// into y[r * cols + panel * width + c] for rows r < rows, over the panel's columns (the last
// panel's are fewer).
inline void AddSplits(const float* partial, int64_t panels, int64_t splits, int64_t rows,
                      int64_t width, int64_t cols, float* y) {
  for (int64_t panel = 0; panel < panels; ++panel) {
    const int64_t first = panel * width, n = std::min(width, cols - first);
    for (int64_t r = 0; r < rows; ++r) {
      float* into = y + r * cols + first;
      const float* from = partial + (panel * splits * rows + r) * width;
      std::copy_n(from, n, into);
      for (int64_t split = 1; split < splits; ++split) {
        from += rows * width;
        for (int64_t c = 0; c < n; ++c) into[c] += from[c];
      }
    }
  }
}

}  // namespace ember_cpu

#endif  // EMBER_PALLAS_KERNELS_CPU_FOR_EACH_ITEM_H_
