// Version states, retention and rotation schedules: pure functions, tested
// at chosen instants.
#include <gtest/gtest.h>

#include "custody/policy/parse.h"
#include "custody/service/rotation.h"

namespace custody::core {
namespace {

constexpr int64_t kT = 1'800'000'000;  // an arbitrary instant
constexpr uint64_t kGrace = 3600;

SecretVersionRecord V(uint32_t version, uint32_t current, std::optional<int64_t> superseded = {},
                      std::optional<int64_t> revoked = {}) {
  SecretVersionRecord r;
  r.version = version;
  r.current_version = current;
  r.created_at = kT - 100000 + version;
  r.superseded_at = superseded;
  r.revoked_at = revoked;
  if (revoked) r.revoked_reason = "leaked";
  return r;
}

TEST(VersionState, CurrentPreviousRetiredRevoked) {
  EXPECT_EQ(StateOf(V(3, 3), kGrace, kT), VersionState::kCurrent);
  EXPECT_EQ(StateOf(V(2, 3, kT - 10), kGrace, kT), VersionState::kPrevious);
  EXPECT_EQ(StateOf(V(2, 3, kT - 3599), kGrace, kT), VersionState::kPrevious) << "one second left";
  EXPECT_EQ(StateOf(V(2, 3, kT - 3600), kGrace, kT), VersionState::kRetired) << "the grace period is half-open";
  EXPECT_EQ(StateOf(V(2, 3, kT - 10), 0, kT), VersionState::kRetired) << "no grace: replaced means retired";
  EXPECT_EQ(StateOf(V(3, 2, {}, kT - 1), kGrace, kT), VersionState::kRevoked);
  EXPECT_EQ(StateOf(V(2, 3, kT - 10, kT - 5), kGrace, kT), VersionState::kRevoked) << "revocation has no grace";
  EXPECT_EQ(StateOf(V(1, 3), kGrace, kT), VersionState::kRetired) << "older with no superseded time: fail closed";
  EXPECT_EQ(GraceEnds(V(2, 3, kT - 10), kGrace, kT), kT - 10 + 3600);
  EXPECT_FALSE(GraceEnds(V(3, 3), kGrace, kT).has_value());
}

TEST(VersionState, ReadableSaysWhyNot) {
  SecretPath p{"payments", "prod", "stripe"};
  EXPECT_TRUE(CheckReadable(p, V(2, 3, kT - 10), kGrace, kT).ok());
  Status retired = CheckReadable(p, V(2, 3, kT - 7200), kGrace, kT);
  ASSERT_FALSE(retired.ok());
  EXPECT_EQ(retired.error().category(), Category::kDenied);
  EXPECT_NE(retired.error().message().find("version 2 of payments/prod/stripe is retired"), std::string::npos);
  EXPECT_NE(retired.error().message().find("the current version is 3"), std::string::npos);
  Status revoked = CheckReadable(p, V(3, 0, {}, kT - 5), kGrace, kT);
  ASSERT_FALSE(revoked.ok());
  EXPECT_NE(revoked.error().message().find("was revoked at"), std::string::npos);
  EXPECT_NE(revoked.error().message().find("(leaked)"), std::string::npos);
  EXPECT_NE(revoked.error().message().find("no current version"), std::string::npos);
}

TEST(Retention, TrimsOldestRetiredOrRevokedOnly) {
  // v1 retired, v2 revoked, v3 in grace, v4 in grace, v5 current; keep 2.
  std::vector<SecretVersionRecord> vs{V(1, 5, kT - 9000), V(2, 5, kT - 8000, kT - 100), V(3, 5, kT - 60),
                                      V(4, 5, kT - 30), V(5, 5)};
  EXPECT_EQ(VersionsToTrim(vs, 2, kGrace, kT), (std::vector<uint32_t>{1, 2})) << "never one in grace";
  EXPECT_EQ(VersionsToTrim(vs, 4, kGrace, kT), (std::vector<uint32_t>{1}));
  EXPECT_TRUE(VersionsToTrim(vs, 5, kGrace, kT).empty());
  // An hour later v3 and v4 have left their grace too.
  EXPECT_EQ(VersionsToTrim(vs, 1, kGrace, kT + 3600), (std::vector<uint32_t>{1, 2, 3, 4}));
  // A current version is never trimmed, even with nothing else left to cut.
  std::vector<SecretVersionRecord> only{V(7, 7)};
  EXPECT_TRUE(VersionsToTrim(only, 1, kGrace, kT).empty());
}

TEST(RotationSchedule, UrgencyAndOrder) {
  auto parsed = policy::ParsePolicy(R"(version = 1
[principals."user:a"]
uid = 1
[projects.p]
max_age = "10d"
warn_before = "2d"
[projects.p.environments.prod]
[projects.p.environments.lab]
production = false
[projects.q.environments.prod]
)",
                                    "p.toml");
  ASSERT_TRUE(parsed.errors.empty()) << parsed.errors[0];
  policy::Engine engine(std::move(*parsed.policy));
  auto sum = [](std::string project, std::string name, uint32_t current, int64_t since) {
    SecretSummary s;
    s.project = std::move(project);
    s.environment = "prod";
    s.name = std::move(name);
    s.current_version = current;
    s.current_since = since;
    s.version_count = current == 0 ? 1 : current;
    return s;
  };
  constexpr int64_t kDay = 86400;
  auto items = RotationStatus({sum("p", "ok", 1, kT - 1 * kDay), sum("q", "unscheduled", 1, kT - 400 * kDay),
                               sum("p", "soon", 1, kT - 9 * kDay), sum("p", "late", 1, kT - 11 * kDay),
                               sum("p", "later", 1, kT - 30 * kDay), sum("p", "gone", 0, 0)},
                              engine, kT);
  std::vector<std::string> order;
  for (const auto& i : items) order.push_back(i.name + ":" + UrgencyName(i.urgency));
  EXPECT_EQ(order, (std::vector<std::string>{"later:overdue", "late:overdue", "gone:no-current-version",
                                             "soon:due-soon", "ok:ok", "unscheduled:no-schedule"}));
  EXPECT_EQ(items[1].due_at, kT - 11 * kDay + 10 * kDay);
  EXPECT_EQ(items[1].age_seconds, 11 * kDay);
}

}  // namespace
}  // namespace custody::core
