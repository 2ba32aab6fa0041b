// Usage counts that a long-running process (custodyd) writes behind.
//
//   core::UsageBuffer usage(store);
//   usage.Add({"payments", "prod", "svc:api"}, core::UsageEvent::kUnseal, now);   // memory only
//   (void)usage.Flush();                                                         // one transaction
//
// Only requests that no rate or spend limit applies to are counted here
// (core::Authorizer::Admit decides): a request under a limit is charged in
// the store at once, so limits stay exact across custodyd and direct-mode
// CLI processes. What may lag is the count `custody usage` shows, by at
// most `period` (and what a crash loses is at most that much counting; the
// audit log holds every request). A thread of its own ("usage-writer")
// writes the counts every `period`, never the thread of a counted request: a
// store whose write lock another process holds (a long KEK rotation batch,
// say) makes that thread wait out the busy timeout, not a GET. (A caller of
// Flush, such as a usage read, does wait.) The destructor stops the thread
// and tries once more to write what is left.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>

#include "custody/store/store.h"

namespace custody::core {

class UsageBuffer {
 public:
  explicit UsageBuffer(Store& store, std::chrono::milliseconds period = std::chrono::milliseconds(100));
  ~UsageBuffer();
  UsageBuffer(const UsageBuffer&) = delete;
  UsageBuffer& operator=(const UsageBuffer&) = delete;

  void Add(const UsageKey& key, UsageEvent event, int64_t now);
  // Writes every pending count in one transaction. On failure the counts
  // stay pending and the next flush tries again.
  Status Flush();
  // Flushes that failed (their counts stayed pending), for the metrics.
  uint64_t flush_failures() const { return flush_failures_.load(); }

 private:
  using Key = std::tuple<std::string, std::string, std::string, std::string>;  // project, env, principal, day
  Store& store_;
  const std::chrono::milliseconds period_;
  std::mutex mu_;
  std::map<Key, UsageCount> pending_;
  std::atomic<uint64_t> flush_failures_{0};
  std::mutex flush_mu_;  // one flush at a time, so counts are never written twice
  std::mutex wake_mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread writer_;  // last: started once everything above exists
};

}  // namespace custody::core
