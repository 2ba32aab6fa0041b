// The policy model: principals, projects, environments, grants and limits,
// as parsed from a policy file. Plain data; the decisions are in engine.h.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace custody::policy {

enum class Role : uint8_t { kOwner, kReader, kAuditor, kCi };

// Everything a principal can ask to do. Project-scoped actions name a
// project (and, for secret actions, an environment and a secret name);
// organisation actions (kApplyPolicy, kCreateProject) are for admins.
enum class Action : uint8_t {
  kGet,            // unseal a secret value
  kPut,            // seal a new version
  kList,           // list secret names and versions (never values)
  kDelete,         // delete a secret
  kRotate,         // rotate a secret or the project's KEK
  kCreateEnv,      // add an environment
  kManageMembers,  // change who has which role
  kReadUsage,      // usage counts
  kReadAudit,      // the audit trail
  kApplyPolicy,    // organisation: put a policy in force
  kCreateProject,  // organisation: create a project
};
inline constexpr Action kAllActions[] = {Action::kGet,        Action::kPut,          Action::kList,
                                         Action::kDelete,     Action::kRotate,       Action::kCreateEnv,
                                         Action::kManageMembers, Action::kReadUsage, Action::kReadAudit,
                                         Action::kApplyPolicy, Action::kCreateProject};
inline constexpr Role kAllRoles[] = {Role::kOwner, Role::kReader, Role::kAuditor, Role::kCi};

const char* RoleName(Role r);
const char* ActionName(Action a);
std::optional<Role> ParseRole(std::string_view s);
std::optional<Action> ParseAction(std::string_view s);

// "600/min": `count` tokens per `period_seconds`, as a token bucket whose
// capacity is `count` (a full minute's worth may come as one burst).
struct Rate {
  uint64_t count = 0;
  uint64_t period_seconds = 0;
  std::string text;
};
// Parses N/sec|s|second|min|m|minute|hour|h|day|d; N from 1 to 10^9.
std::optional<Rate> ParseRate(std::string_view text);

struct Limits {
  std::optional<Rate> rate;                  // all principals together
  std::optional<Rate> principal_rate;        // each principal on its own
  std::optional<uint64_t> unseals_per_day;   // UTC days
  std::optional<uint64_t> unseals_per_month; // UTC calendar months
};

// "90d", "12h", "30m", "45s", "2w": a whole number and one unit. Seconds,
// from 1 second to 100 years; nullopt for anything else.
std::optional<uint64_t> ParseDuration(std::string_view text);
// The shortest exact spelling ParseDuration reads back: 86400 -> "1d".
std::string FormatDuration(uint64_t seconds);

// Rotation settings of a project or an environment; an environment's own
// settings win over its project's, and unset ones fall back to the defaults
// in Engine::RotationFor.
struct Rotation {
  std::optional<uint64_t> max_age;        // seconds a version may stay current
  std::optional<uint64_t> grace;          // seconds a replaced version stays readable
  std::optional<uint64_t> warn_before;    // seconds before max_age that status warns
  std::optional<uint32_t> keep_versions;  // versions kept; older sealed blobs are trimmed
};

struct Location {
  int line = 0, column = 0;
};

enum class IdentityKind : uint8_t { kUnixUser, kUid, kGid, kTlsSan, kTlsSubject };
struct Identity {
  IdentityKind kind;
  std::string value;  // user name, decimal id, typed SAN ("dns:NAME", see below) or subject DN
  Location where;
};

// A certificate SAN, typed: "dns:NAME", "uri:URI" or "email:ADDR". A SAN
// identifies a principal only through an identity of the same type: an
// e-mail SAN that reads like a host name is not that host. DNS names
// compare without regard to case (lower-cased here), URIs and addresses
// exactly.
//
// As a policy writes it: a bare value is a DNS name; the type prefix may be
// written in any case ("DNS:", as openssl prints it). nullopt for another
// type ("ip:") or an empty value.
std::optional<std::string> PolicyTlsSan(std::string_view text);
// As the server reports a client certificate's SAN: the type prefix must be
// exactly "dns:", "uri:" or "email:" (anything else, bare values included,
// matches no identity: nullopt).
std::optional<std::string> CallerTlsSan(std::string_view typed);

// user:NAME or svc:NAME, NAME of 1 to 128 letters, digits, '-', '_', '.', '@'.
bool ValidPrincipalName(std::string_view name);

struct Principal {
  std::string name;  // "user:alice", "svc:web-prod"
  std::vector<Identity> identities;
  Location where;
};

struct Grant {
  std::string principal;
  Role role = Role::kReader;
  std::vector<std::string> environments;  // empty: all environments of the project
  std::vector<std::string> secrets;       // glob patterns; empty: every secret
  Location where;
};

struct Environment {
  std::string name;
  bool production = false;
  std::optional<std::string> token_uri;
  Limits limits;
  Rotation rotation;
  Location where;
};

struct Project {
  std::string name;
  std::vector<Environment> environments;
  std::vector<Grant> grants;
  Limits limits;
  Rotation rotation;
  // The key of data.data a Vault KV v2 client reads the value under.
  std::string vault_value_key = "value";
  Location where;
};

struct Policy {
  int version = 1;
  std::vector<std::string> admins;  // principals who may apply policy and create projects
  std::vector<Principal> principals;
  std::vector<Project> projects;
};

}  // namespace custody::policy
