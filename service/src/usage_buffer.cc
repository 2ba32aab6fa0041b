#include "custody/service/usage_buffer.h"

#include <pthread.h>

#include <algorithm>
#include <vector>

#include "custody/policy/limits.h"

namespace custody::core {

UsageBuffer::UsageBuffer(Store& store, std::chrono::milliseconds period) : store_(store), period_(period) {
  writer_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "usage-writer");
    std::unique_lock lock(wake_mu_);
    while (!wake_.wait_for(lock, period_, [this] { return stop_; })) {
      lock.unlock();
      (void)Flush();  // a failure keeps the counts and is counted
      lock.lock();
    }
  });
}

UsageBuffer::~UsageBuffer() {
  {
    std::lock_guard lock(wake_mu_);
    stop_ = true;
  }
  wake_.notify_all();
  writer_.join();
  (void)Flush();
}

void UsageBuffer::Add(const UsageKey& key, UsageEvent event, int64_t now) {
  std::lock_guard lock(mu_);
  std::string day = policy::DayKey(now);
  auto [it, fresh] = pending_.try_emplace(Key{key.project, key.environment, key.principal, day});
  if (fresh) {
    it->second.key = key;
    it->second.day = std::move(day);
  }
  ++it->second.by_event[static_cast<size_t>(event)];
  it->second.last_use = std::max(it->second.last_use, now);
}

Status UsageBuffer::Flush() {
  std::lock_guard one(flush_mu_);
  std::map<Key, UsageCount> batch;
  {
    std::lock_guard lock(mu_);
    batch.swap(pending_);
  }
  if (batch.empty()) return Status::Ok();
  std::vector<UsageCount> counts;
  counts.reserve(batch.size());
  for (auto& [k, c] : batch) counts.push_back(c);
  Status s = store_.AddUsage(counts);
  if (!s.ok()) {
    flush_failures_.fetch_add(1);
    // Nothing was written (one transaction): put the counts back.
    std::lock_guard lock(mu_);
    for (auto& [k, c] : batch) {
      auto [it, fresh] = pending_.try_emplace(k, c);
      if (fresh) continue;
      for (size_t i = 0; i < 5; ++i) it->second.by_event[i] += c.by_event[i];
      it->second.last_use = std::max(it->second.last_use, c.last_use);
    }
  }
  return s;
}

}  // namespace custody::core
