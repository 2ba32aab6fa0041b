#include "custody/core/usage_buffer.h"

#include <algorithm>
#include <vector>

#include "custody/policy/limits.h"

namespace custody::core {

void UsageBuffer::Add(const UsageKey& key, UsageEvent event, int64_t now) {
  bool due = false;
  {
    std::lock_guard lock(mu_);
    std::string day = policy::DayKey(now);
    auto [it, fresh] = pending_.try_emplace(Key{key.project, key.environment, key.principal, day});
    if (fresh) {
      it->second.key = key;
      it->second.day = std::move(day);
    }
    ++it->second.by_event[static_cast<size_t>(event)];
    it->second.last_use = std::max(it->second.last_use, now);
    auto t = std::chrono::steady_clock::now();
    if (!flushing_ && t - last_flush_ >= period_) {
      // This caller writes the batch; the others go on counting meanwhile.
      flushing_ = true;
      last_flush_ = t;
      due = true;
    }
  }
  if (due) {
    (void)Flush();
    std::lock_guard lock(mu_);
    flushing_ = false;
  }
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
