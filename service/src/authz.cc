#include "custody/service/authz.h"

#include <openssl/evp.h>

#include <algorithm>
#include <chrono>

namespace custody::core {
namespace {

std::string TargetText(const policy::Target& t) {
  std::string s(t.project);
  if (!t.environment.empty()) s += "/" + std::string(t.environment);
  if (!t.secret.empty()) s += "/" + std::string(t.secret);
  return s;
}

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

std::string HumanDuration(int64_t s) {
  if (s < 120) return std::to_string(s) + " s";
  if (s < 7200) return std::to_string((s + 59) / 60) + " min";
  if (s < 172800) return std::to_string(s / 3600) + " h " + std::to_string((s % 3600 + 59) / 60) + " min";
  return std::to_string(s / 86400) + " days " + std::to_string((s % 86400) / 3600) + " h";
}

Result<Authorizer> Authorizer::Load(Store& store) {
  CUSTODY_ASSIGN_OR_RETURN(auto current, store.CurrentPolicy());
  if (!current) {
    return Error(Category::kDenied,
                 "no policy in force: write one (see docs/POLICY.md) and run 'custody policy apply FILE'");
  }
  return FromText(store, current->text, current->version);
}

Result<Authorizer> Authorizer::FromText(Store& store, const std::string& text, uint32_t version) {
  auto parsed = policy::ParsePolicy(text, "policy v" + std::to_string(version));
  if (!parsed.policy) {
    return Error(Category::kIntegrity, "the stored policy v" + std::to_string(version) +
                                           " does not parse: " + parsed.errors.front());
  }
  return Authorizer(store, std::make_shared<const policy::Engine>(std::move(*parsed.policy)), version);
}

Result<policy::PrincipalId> Authorizer::Identify(const policy::Caller& caller) const {
  std::string why;
  auto id = engine_->Identify(caller, &why);
  if (!id) return Error(Category::kDenied, "denied: " + why + " (policy v" + std::to_string(version_) + ")");
  return *id;
}

bool Authorizer::Allows(policy::PrincipalId who, policy::Action action, const policy::Target& target) const {
  return engine_->Decide(who, action, target).allowed;
}

Status Authorizer::Check(policy::PrincipalId who, policy::Action action, const policy::Target& target,
                         policy::Decision* decision) const {
  policy::Decision d = engine_->Decide(who, action, target);
  if (decision) *decision = d;
  if (d.allowed) return Status::Ok();
  if (!target.project.empty()) {
    // Best effort: a refusal that cannot be counted is still a refusal.
    (void)store_->Record({std::string(target.project), std::string(target.environment), engine_->PrincipalName(who)},
                         UsageEvent::kDenied, static_cast<int64_t>(NowSeconds()));
  }
  std::string what = std::string(policy::ActionName(action));
  if (!target.project.empty()) what += " " + TargetText(target);
  return Error(Category::kDenied, "denied: " + engine_->PrincipalName(who) + " may not " + what + ": " + d.reason);
}

Status Authorizer::Admit(policy::PrincipalId who, const policy::Target& target, UsageEvent event,
                         UsageBuffer* deferred) const {
  auto rules = engine_->LimitsFor(target.project, target.environment, who);
  UsageKey key{std::string(target.project), std::string(target.environment), engine_->PrincipalName(who)};
  if (deferred != nullptr && rules.empty()) {
    deferred->Add(key, event, static_cast<int64_t>(NowSeconds()));
    return Status::Ok();
  }
  CUSTODY_ASSIGN_OR_RETURN(Admission a, store_->Admit(key, rules, event, NowSeconds()));
  if (a.allowed) return Status::Ok();
  return Error(Category::kLimit, "limit reached: " + a.limit + " for " + TargetText(target) + "; it refills in " +
                                     HumanDuration(a.retry_after_seconds))
      .WithRetryAfter(static_cast<uint64_t>(std::max<int64_t>(1, a.retry_after_seconds)));
}

}  // namespace custody::core
