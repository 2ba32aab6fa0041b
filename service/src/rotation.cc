#include "custody/service/rotation.h"

#include <algorithm>
#include <ctime>

namespace custody::core {

const char* VersionStateName(VersionState s) {
  switch (s) {
    case VersionState::kCurrent: return "current";
    case VersionState::kPrevious: return "previous";
    case VersionState::kRetired: return "retired";
    case VersionState::kRevoked: return "revoked";
  }
  return "unknown";
}

const char* UrgencyName(Urgency u) {
  switch (u) {
    case Urgency::kOverdue: return "overdue";
    case Urgency::kNoCurrent: return "no-current-version";
    case Urgency::kDueSoon: return "due-soon";
    case Urgency::kOk: return "ok";
    case Urgency::kNoSchedule: return "no-schedule";
  }
  return "unknown";
}

VersionState StateOf(const SecretVersionRecord& rec, uint64_t grace, int64_t now) {
  if (rec.revoked_at) return VersionState::kRevoked;
  if (rec.version == rec.current_version) return VersionState::kCurrent;
  // A version older than the current one with no superseded time (never the
  // case for rows written by this store) is treated as retired: fail closed.
  if (rec.superseded_at && now < *rec.superseded_at + static_cast<int64_t>(grace)) return VersionState::kPrevious;
  return VersionState::kRetired;
}

std::optional<int64_t> GraceEnds(const SecretVersionRecord& rec, uint64_t grace, int64_t now) {
  if (StateOf(rec, grace, now) != VersionState::kPrevious) return std::nullopt;
  return *rec.superseded_at + static_cast<int64_t>(grace);
}

namespace {
}  // namespace

Status CheckReadable(const SecretPath& path, const SecretVersionRecord& rec, uint64_t grace, int64_t now) {
  std::string v = "version " + std::to_string(rec.version) + " of " + path.str();
  std::string current = rec.current_version != 0 ? "; the current version is " + std::to_string(rec.current_version)
                                                 : "; the secret has no current version";
  switch (StateOf(rec, grace, now)) {
    case VersionState::kCurrent:
    case VersionState::kPrevious:
      return Status::Ok();
    case VersionState::kRetired: {
      const int64_t ended = rec.superseded_at.value_or(rec.created_at) + static_cast<int64_t>(grace);
      return Error(Category::kDenied, v + " is retired: its grace period ended at " + FormatUtc(ended) + current)
          .WithVersionGone({rec.version, rec.created_at, ended});
    }
    case VersionState::kRevoked:
      return Error(Category::kDenied, v + " was revoked at " + FormatUtc(*rec.revoked_at) +
                                          (rec.revoked_reason.empty() ? "" : " (" + rec.revoked_reason + ")") +
                                          current)
          .WithVersionGone({rec.version, rec.created_at, *rec.revoked_at});
  }
  return Error(Category::kInternal, "unknown version state");
}

std::vector<uint32_t> VersionsToTrim(const std::vector<SecretVersionRecord>& versions, uint32_t keep,
                                     uint64_t grace, int64_t now) {
  std::vector<uint32_t> out;
  if (keep == 0 || versions.size() <= keep) return out;
  size_t excess = versions.size() - keep;
  for (const auto& r : versions) {  // oldest first
    if (out.size() == excess) break;
    VersionState st = StateOf(r, grace, now);
    if (st == VersionState::kRetired || st == VersionState::kRevoked) out.push_back(r.version);
  }
  return out;
}

std::vector<RotationItem> RotationStatus(const std::vector<SecretSummary>& secrets, const policy::Engine& engine,
                                         int64_t now) {
  std::vector<RotationItem> out;
  out.reserve(secrets.size());
  for (const auto& s : secrets) {
    RotationItem it;
    it.project = s.project;
    it.environment = s.environment;
    it.name = s.name;
    it.current_version = s.current_version;
    it.current_since = s.current_since;
    it.versions = s.version_count;
    it.revoked = s.revoked_count;
    auto settings = engine.RotationFor(s.project, s.environment);
    it.max_age = settings.max_age;
    if (s.current_version == 0) {
      it.urgency = Urgency::kNoCurrent;
    } else {
      it.age_seconds = std::max<int64_t>(0, now - s.current_since);
      if (settings.max_age) {
        it.due_at = s.current_since + static_cast<int64_t>(*settings.max_age);
        if (now >= *it.due_at) {
          it.urgency = Urgency::kOverdue;
        } else if (now >= *it.due_at - static_cast<int64_t>(settings.warn_before)) {
          it.urgency = Urgency::kDueSoon;
        } else {
          it.urgency = Urgency::kOk;
        }
      }
    }
    out.push_back(std::move(it));
  }
  std::stable_sort(out.begin(), out.end(), [](const RotationItem& a, const RotationItem& b) {
    if (a.urgency != b.urgency) return a.urgency < b.urgency;
    if (a.due_at && b.due_at && *a.due_at != *b.due_at) return *a.due_at < *b.due_at;
    return false;
  });
  return out;
}

}  // namespace custody::core
