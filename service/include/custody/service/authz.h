// Authorizer: the policy in force, applied to one caller. Every command asks
// it before it touches a secret; custodyd asks it (through core::Custodian)
// on every request, which makes it a boundary there. In the CLI, run by the
// user who holds the token PIN, it is a guard against mistakes.
//
//   CUSTODY_ASSIGN_OR_RETURN(auto authz, core::Authorizer::Load(store));
//   CUSTODY_ASSIGN_OR_RETURN(auto who, authz.Identify(caller));
//   CUSTODY_RETURN_IF_ERROR(authz.Check(who, policy::Action::kGet, {"payments", "prod", "stripe"}));
//   CUSTODY_RETURN_IF_ERROR(authz.Admit(who, {"payments", "prod", "stripe"}, core::UsageEvent::kUnseal));
#pragma once

#include <memory>
#include <string>

#include "custody/common/hex.h"
#include "custody/common/result.h"
#include "custody/policy/engine.h"
#include "custody/policy/parse.h"
#include "custody/service/usage_buffer.h"
#include "custody/store/store.h"

namespace custody::core {

class Authorizer {
 public:
  // kDenied when no policy has been applied yet.
  static Result<Authorizer> Load(Store& store);
  // Parses `text` (a stored policy must always parse; if not, kIntegrity).
  static Result<Authorizer> FromText(Store& store, const std::string& text, uint32_t version);

  // kDenied naming the caller when no principal (or more than one) matches.
  Result<policy::PrincipalId> Identify(const policy::Caller& caller) const;

  // Asks the engine; a refusal is recorded as usage and returned as
  // kDenied: "<principal> may not <action> <target>: <reason>".
  Status Check(policy::PrincipalId who, policy::Action action, const policy::Target& target,
               policy::Decision* decision = nullptr) const;
  // Same decision, nothing recorded (for filtering lists).
  bool Allows(policy::PrincipalId who, policy::Action action, const policy::Target& target) const;

  // Rate and spend limits for an operation that passed Check; records the
  // use. kLimit: "<limit> reached; it refills in N s".
  // With `deferred` (custodyd), a request no limit applies to is only
  // counted there, to be written behind; one under a limit is charged in
  // the store at once either way.
  Status Admit(policy::PrincipalId who, const policy::Target& target, UsageEvent event,
               UsageBuffer* deferred = nullptr) const;

  const policy::Engine& engine() const { return *engine_; }
  uint32_t version() const { return version_; }

 private:
  Authorizer(Store& store, std::shared_ptr<const policy::Engine> engine, uint32_t version)
      : store_(&store), engine_(std::move(engine)), version_(version) {}
  Store* store_;
  std::shared_ptr<const policy::Engine> engine_;
  uint32_t version_;
};

// "3 h 20 min", "42 s": for refill times.
std::string HumanDuration(int64_t seconds);

}  // namespace custody::core
