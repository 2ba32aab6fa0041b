// Refusals summed per peer (RefusalLog).
// Private to the server library: included by its own sources only.
#pragma once

#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "custody/audit/audit.h"

namespace custody::server {

// Refusals that no request record covers: a malformed or oversized
// request, a method or endpoint that does not exist, a connection over a
// limit, a request not finished within the idle timeout. Writing one
// record each would let a stranger fill the disk, so they are summed per
// peer and written as one "http.refused" record per peer and period.
// Bounded: past kMaxPeers distinct peers in one period, the rest are summed
// under one entry.
class RefusalLog {
 public:
  static constexpr size_t kMaxPeers = 256;
  static constexpr const char* kOtherPeers = "other peers (more than 256 in this period)";

  // `peer` is shown in the record: it must already be escaped.
  void Count(const std::string& peer, const std::string& what) {
    std::lock_guard lock(mu_);
    auto it = counts_.find(peer);
    if (it == counts_.end()) {
      it = counts_.size() < kMaxPeers ? counts_.emplace(peer, Counts{}).first : counts_.try_emplace(kOtherPeers).first;
    }
    ++it->second[what];
  }

  // A peer the policy does not know gets a request record (and the
  // policy's answer) for its first request of each period; true for that
  // one. Its other requests of the period are refused before the policy
  // and counted here: a stranger cannot grow the audit log at the rate it
  // sends. Bounded like the counts.
  bool FirstRecordOf(const std::string& peer) {
    std::lock_guard lock(mu_);
    if (recorded_.size() >= kMaxPeers) return false;
    return recorded_.insert(peer).second;
  }

  // The records for what was counted since the last call.
  std::vector<core::AuditEvent> Take(uint32_t period_seconds) {
    std::map<std::string, Counts> counts;
    {
      std::lock_guard lock(mu_);
      counts.swap(counts_);
      recorded_.clear();
    }
    std::vector<core::AuditEvent> out;
    for (const auto& [peer, what] : counts) {
      core::AuditEvent e;
      e.action = "http.refused";
      e.identified_by = peer;
      e.decision = core::AuditDecision::kNone;
      e.result = core::AuditResult::kRefused;
      e.request_id = core::NewRequestId();
      std::string detail;
      uint64_t total = 0;
      for (const auto& [reason, n] : what) {
        detail += (detail.empty() ? "" : ", ") + reason + " x" + std::to_string(n);
        total += n;
      }
      e.detail = std::to_string(total) + " refused in at most " + std::to_string(period_seconds) + " s: " + detail;
      out.push_back(std::move(e));
    }
    return out;
  }

 private:
  using Counts = std::map<std::string, uint64_t>;
  std::mutex mu_;
  std::map<std::string, Counts> counts_;
  std::set<std::string> recorded_;  // strangers whose record this period was written
};


}  // namespace custody::server
