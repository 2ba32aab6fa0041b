// Secret version states and rotation schedules: pure functions of stored
// facts, the policy's settings and a time, so they are tested with any
// clock and give the same answer in the CLI and the server.
//
//   auto state = core::StateOf(rec, settings.grace, now);
//   CUSTODY_RETURN_IF_ERROR(core::CheckReadable(path, rec, settings.grace, now));
//   auto report = core::RotationStatus(summaries, engine, now);
//
// States of a version:
//   current   the newest version not revoked; what `get` returns
//   previous  replaced less than `grace` ago: still readable by version, so
//             servers can switch over
//   retired   replaced longer ago; kept (until retention trims it), not readable
//   revoked   withdrawn at once, never readable again
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "custody/common/names.h"
#include "custody/common/result.h"
#include "custody/common/time.h"
#include "custody/policy/engine.h"
#include "custody/store/store.h"

namespace custody::core {

enum class VersionState : uint8_t { kCurrent, kPrevious, kRetired, kRevoked };
const char* VersionStateName(VersionState s);

VersionState StateOf(const SecretVersionRecord& rec, uint64_t grace, int64_t now);
// When a previous version stops being readable (nullopt unless kPrevious).
std::optional<int64_t> GraceEnds(const SecretVersionRecord& rec, uint64_t grace, int64_t now);

// OK for current and previous; kDenied naming the state (and, for revoked,
// when and why) otherwise.
Status CheckReadable(const SecretPath& path, const SecretVersionRecord& rec, uint64_t grace, int64_t now);

// Retention: the versions to delete so that at most `keep` remain, oldest
// first, never the current one and never one still in its grace period.
// `versions` is every stored version, oldest first.
std::vector<uint32_t> VersionsToTrim(const std::vector<SecretVersionRecord>& versions, uint32_t keep,
                                     uint64_t grace, int64_t now);

// One secret's place in the rotation schedule.
enum class Urgency : uint8_t { kOverdue, kNoCurrent, kDueSoon, kOk, kNoSchedule };
const char* UrgencyName(Urgency u);

struct RotationItem {
  std::string project, environment, name;
  uint32_t current_version = 0;  // 0: none (every version revoked)
  int64_t current_since = 0;
  int64_t age_seconds = 0;
  std::optional<uint64_t> max_age;
  std::optional<int64_t> due_at;  // current_since + max_age
  Urgency urgency = Urgency::kNoSchedule;
  uint32_t versions = 0, revoked = 0;
};

// Every summarised secret with its urgency under the policy's settings,
// most urgent first: overdue (longest overdue first), no current version,
// due soon (soonest first), on schedule (soonest first), no schedule.
std::vector<RotationItem> RotationStatus(const std::vector<SecretSummary>& secrets, const policy::Engine& engine,
                                         int64_t now);

}  // namespace custody::core
