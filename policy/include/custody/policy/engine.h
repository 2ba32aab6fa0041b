// The decision engine: given a policy, who may do what where. Pure: no I/O,
// no clock, no globals; safe to call from many threads at once.
//
//   policy::Engine engine(std::move(policy));
//   auto who = engine.Identify(policy::Caller{.uid = 1000, .user = "alice"});
//   auto d = engine.Decide(*who, Action::kGet, {"payments", "prod", "stripe"});
//   if (!d.allowed) puts(d.reason.c_str());
//
// Deny by default: what no grant allows is refused, and the refusal names
// what is missing. The role table (RoleAllows, below) is the whole rulebook:
//
//   action          owner reader auditor ci
//   get               x     x             x (non-production only)
//   put               x
//   list              x     x      x      x (non-production only)
//   delete            x
//   rotate            x
//   create-env        x
//   manage-members    x
//   read-usage        x            x
//   read-audit        x            x
//   apply-policy / create-project: policy admins only
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "custody/policy/model.h"

namespace custody::policy {

// How the caller was identified, filled by the CLI (uid, gid, user name) or
// by the server (SO_PEERCRED, or the TLS client certificate).
struct Caller {
  std::optional<uint32_t> uid = {};
  std::vector<uint32_t> gids = {};
  std::optional<std::string> user = {};
  std::vector<std::string> tls_sans = {};
  std::optional<std::string> tls_subject = {};
  // A principal named by a custody access token the front already checked
  // (X-Vault-Token). When set, it alone decides who the caller is: the
  // transport's identities (uid, certificate) are only recorded.
  std::optional<std::string> token_principal = {};
};

struct Target {
  std::string_view project;
  std::string_view environment;  // empty for project-wide actions
  std::string_view secret;       // empty when not about one secret
};

struct Decision {
  bool allowed = false;
  std::string rule;    // the grant that allowed, or the rule that refused
  std::string reason;  // for a person: why
};

// One limit to check, with a stable key for its stored state.
struct LimitRule {
  enum Kind : uint8_t { kRate, kUnsealsPerDay, kUnsealsPerMonth } kind;
  std::string key;    // bucket key ("rate:payments/prod"), or spend scope ("payments/prod")
  std::string label;  // for people: "project payments rate 600/min"
  Rate rate;          // kRate
  uint64_t limit = 0; // spend kinds
  std::string project, environment;  // spend scope: environment empty = whole project
};

struct PrincipalId {
  uint32_t index = 0;  // into Engine::policy().principals
};

class Engine {
 public:
  explicit Engine(Policy policy);

  const Policy& policy() const { return policy_; }

  // Which principal the caller is. Identities were checked not to overlap
  // when the policy was parsed, except that a caller can match a uid rule of
  // one principal and a user-name rule of another: then nullopt and
  // `ambiguous` is set, and nothing is allowed.
  std::optional<PrincipalId> Identify(const Caller& caller, std::string* why = nullptr) const;
  std::optional<PrincipalId> FindPrincipal(std::string_view name) const;
  const std::string& PrincipalName(PrincipalId id) const { return policy_.principals[id.index].name; }

  Decision Decide(PrincipalId who, Action action, const Target& target) const;

  const Project* FindProject(std::string_view name) const;
  const Environment* FindEnvironment(std::string_view project, std::string_view env) const;

  // Every limit that applies to `who` acting in project/env. The project's
  // limits cover the whole project (all environments together); an
  // environment's own limits cover it alone and apply as well.
  std::vector<LimitRule> LimitsFor(std::string_view project, std::string_view env, PrincipalId who) const;

  // The rotation settings in force for project/env: the environment's own,
  // else the project's, else the defaults (no max_age, grace 24h,
  // warn_before 7d, keep_versions 10). A project or environment the policy
  // does not name gets the defaults.
  struct RotationSettings {
    std::optional<uint64_t> max_age;
    uint64_t grace = kDefaultGrace;
    uint64_t warn_before = kDefaultWarnBefore;
    uint32_t keep_versions = kDefaultKeepVersions;
  };
  static constexpr uint64_t kDefaultGrace = 86400;
  static constexpr uint64_t kDefaultWarnBefore = 7 * 86400;
  static constexpr uint32_t kDefaultKeepVersions = 10;
  RotationSettings RotationFor(std::string_view project, std::string_view env) const;

 private:
  struct GrantRef {
    uint32_t project;
    uint32_t grant;
  };
  Policy policy_;
  std::unordered_map<std::string_view, uint32_t> principals_;
  std::unordered_map<std::string_view, uint32_t> projects_;
  // (principal index, project index) -> grants, so a decision looks at the
  // few grants of one principal in one project, whatever the policy's size.
  std::unordered_map<uint64_t, std::vector<uint32_t>> grants_;
  std::vector<bool> admin_;
  std::unordered_map<uint32_t, uint32_t> by_uid_, by_gid_;
  std::unordered_map<std::string_view, uint32_t> by_user_, by_san_, by_subject_;
};

// Whether `role` may do `action` at all (the table above, without the
// production rule for ci and without patterns).
bool RoleAllows(Role role, Action action);

// Glob match for secret-name patterns (`*`, `?`, `[...]`), via fnmatch.
bool NameMatches(std::string_view pattern, std::string_view name);

}  // namespace custody::policy
