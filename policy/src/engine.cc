#include "custody/policy/engine.h"

#include <fnmatch.h>

#include <string>

namespace custody::policy {
namespace {

uint64_t Key(uint32_t principal, uint32_t project) { return (uint64_t{principal} << 32) | project; }

bool IsOrgAction(Action a) { return a == Action::kApplyPolicy || a == Action::kCreateProject; }

// Actions about one environment's secrets (as opposed to the whole project).
bool IsSecretAction(Action a) {
  return a == Action::kGet || a == Action::kPut || a == Action::kList || a == Action::kDelete || a == Action::kRotate;
}

std::string GrantRule(const Project& pj, size_t i, const Grant& g) {
  std::string r = "projects." + pj.name + " grant #" + std::to_string(i + 1) + " (line " +
                  std::to_string(g.where.line) + "): " + g.principal + " is " + RoleName(g.role);
  if (!g.environments.empty()) {
    r += " in ";
    for (size_t k = 0; k < g.environments.size(); ++k) r += (k ? "," : "") + g.environments[k];
  }
  if (!g.secrets.empty()) {
    r += " for ";
    for (size_t k = 0; k < g.secrets.size(); ++k) r += (k ? "," : "") + g.secrets[k];
  }
  return r;
}

}  // namespace

bool RoleAllows(Role role, Action action) {
  // The rulebook, written out as the table in engine.h. Every (role, action)
  // pair is decided here by an exhaustive switch: a new action or role does
  // not compile silently into "allowed".
  switch (action) {
    case Action::kGet:
      return role == Role::kOwner || role == Role::kReader || role == Role::kCi;
    case Action::kList:
      return role == Role::kOwner || role == Role::kReader || role == Role::kAuditor || role == Role::kCi;
    case Action::kPut:
    case Action::kDelete:
    case Action::kRotate:
    case Action::kCreateEnv:
    case Action::kManageMembers:
      return role == Role::kOwner;
    case Action::kReadUsage:
    case Action::kReadAudit:
      return role == Role::kOwner || role == Role::kAuditor;
    case Action::kApplyPolicy:
    case Action::kCreateProject:
      return false;  // organisation actions: admins only, never through a project role
  }
  return false;
}

bool NameMatches(std::string_view pattern, std::string_view name) {
  std::string p(pattern), n(name);
  return ::fnmatch(p.c_str(), n.c_str(), 0) == 0;
}

Engine::Engine(Policy policy) : policy_(std::move(policy)) {
  admin_.assign(policy_.principals.size(), false);
  for (uint32_t i = 0; i < policy_.principals.size(); ++i) {
    Principal& pr = policy_.principals[i];
    principals_.emplace(pr.name, i);
    for (Identity& id : pr.identities) {
      // The parser types every SAN already; a policy built in code may not
      // have. One it cannot type identifies nobody.
      if (id.kind == IdentityKind::kTlsSan) id.value = PolicyTlsSan(id.value).value_or("");
      if (id.kind == IdentityKind::kTlsSan && id.value.empty()) continue;
      switch (id.kind) {
        case IdentityKind::kUid: by_uid_.emplace(static_cast<uint32_t>(std::stoul(id.value)), i); break;
        case IdentityKind::kGid: by_gid_.emplace(static_cast<uint32_t>(std::stoul(id.value)), i); break;
        case IdentityKind::kUnixUser: by_user_.emplace(id.value, i); break;
        case IdentityKind::kTlsSan: by_san_.emplace(id.value, i); break;
        case IdentityKind::kTlsSubject: by_subject_.emplace(id.value, i); break;
      }
    }
  }
  for (const std::string& a : policy_.admins) {
    if (auto it = principals_.find(a); it != principals_.end()) admin_[it->second] = true;
  }
  for (uint32_t p = 0; p < policy_.projects.size(); ++p) {
    const Project& pj = policy_.projects[p];
    projects_.emplace(pj.name, p);
    for (uint32_t g = 0; g < pj.grants.size(); ++g) {
      if (auto it = principals_.find(pj.grants[g].principal); it != principals_.end()) {
        grants_[Key(it->second, p)].push_back(g);
      }
    }
  }
}

std::optional<PrincipalId> Engine::FindPrincipal(std::string_view name) const {
  if (auto it = principals_.find(name); it != principals_.end()) return PrincipalId{it->second};
  return std::nullopt;
}

std::optional<PrincipalId> Engine::Identify(const Caller& c, std::string* why) const {
  // Personal identities (uid, user name, certificate) first; group ids only
  // when nothing personal matches. Two different principals at the same
  // level is ambiguous and identifies nobody.
  if (c.token_principal) {
    if (auto id = FindPrincipal(*c.token_principal)) return id;
    // The token outlived its principal (a policy applied since): nobody.
    if (why) *why = "the access token's principal " + *c.token_principal + " is no longer in the policy";
    return std::nullopt;
  }
  std::optional<uint32_t> found;
  bool ambiguous = false;
  auto consider = [&](auto& map, const auto& key) {
    if (auto it = map.find(key); it != map.end()) {
      if (found && *found != it->second) ambiguous = true;
      found = it->second;
    }
  };
  if (c.uid) consider(by_uid_, *c.uid);
  if (c.user) consider(by_user_, std::string_view(*c.user));
  // Only a SAN of the identity's own type: an e-mail SAN spelt like a host
  // name is not that host.
  for (const auto& san : c.tls_sans) {
    if (auto typed = CallerTlsSan(san)) consider(by_san_, std::string_view(*typed));
  }
  if (c.tls_subject) consider(by_subject_, std::string_view(*c.tls_subject));
  if (!found && !ambiguous) {
    for (uint32_t g : c.gids) consider(by_gid_, g);
  }
  std::string who;
  if (c.user) who = "user " + *c.user;
  if (c.uid) who += (who.empty() ? "uid " : " (uid ") + std::to_string(*c.uid) + (who.empty() ? "" : ")");
  if (who.empty() && !c.tls_sans.empty()) {
    // Typed as the server reports it ("certificate SAN email:..."), so a
    // refusal says which kind of name did not match.
    who = "certificate SAN " + c.tls_sans[0];
    if (c.tls_sans.size() > 1) who += " (and " + std::to_string(c.tls_sans.size() - 1) + " more)";
  }
  if (who.empty() && c.tls_subject) who = "certificate subject " + *c.tls_subject;
  if (ambiguous) {
    if (why) *why = who + " matches more than one principal in the policy; refusing";
    return std::nullopt;
  }
  if (!found) {
    if (why) *why = who + " is not a principal in the policy";
    return std::nullopt;
  }
  return PrincipalId{*found};
}

const Project* Engine::FindProject(std::string_view name) const {
  if (auto it = projects_.find(name); it != projects_.end()) return &policy_.projects[it->second];
  return nullptr;
}

const Environment* Engine::FindEnvironment(std::string_view project, std::string_view env) const {
  const Project* pj = FindProject(project);
  if (pj == nullptr) return nullptr;
  for (const auto& e : pj->environments) {
    if (e.name == env) return &e;
  }
  return nullptr;
}

std::vector<LimitRule> Engine::LimitsFor(std::string_view project, std::string_view env, PrincipalId who) const {
  std::vector<LimitRule> out;
  const Project* pj = FindProject(project);
  if (pj == nullptr) return out;
  const std::string& name = PrincipalName(who);
  auto add = [&](const Limits& l, const std::string& scope, const std::string& what, const std::string& env_name) {
    if (l.rate) {
      out.push_back({LimitRule::kRate, "rate:" + scope, what + " rate " + l.rate->text, *l.rate, 0, pj->name, env_name});
    }
    if (l.principal_rate) {
      out.push_back({LimitRule::kRate, "prate:" + scope + ":" + name,
                     what + " rate for " + name + " " + l.principal_rate->text, *l.principal_rate, 0, pj->name,
                     env_name});
    }
    if (l.unseals_per_day) {
      out.push_back({LimitRule::kUnsealsPerDay, scope,
                     what + " budget of " + std::to_string(*l.unseals_per_day) + " unseals per day", Rate{},
                     *l.unseals_per_day, pj->name, env_name});
    }
    if (l.unseals_per_month) {
      out.push_back({LimitRule::kUnsealsPerMonth, scope,
                     what + " budget of " + std::to_string(*l.unseals_per_month) + " unseals per month", Rate{},
                     *l.unseals_per_month, pj->name, env_name});
    }
  };
  add(pj->limits, pj->name, "project " + pj->name, "");
  if (const Environment* e = FindEnvironment(project, env)) {
    add(e->limits, pj->name + "/" + e->name, "environment " + pj->name + "/" + e->name, e->name);
  }
  return out;
}

Decision Engine::Decide(PrincipalId who, Action action, const Target& t) const {
  const std::string& name = PrincipalName(who);
  Decision d;
  if (IsOrgAction(action)) {
    d.allowed = admin_[who.index];
    d.rule = "admins";
    d.reason = d.allowed ? name + " is a policy admin"
                         : name + " may not " + ActionName(action) + ": only policy admins may (admins = [...])";
    return d;
  }
  auto pit = projects_.find(t.project);
  if (pit == projects_.end()) {
    d.rule = "deny by default";
    d.reason = "project '" + std::string(t.project) + "' is not in the policy in force";
    return d;
  }
  const Project& pj = policy_.projects[pit->second];
  const Environment* env = nullptr;
  if (!t.environment.empty()) {
    for (const auto& e : pj.environments) {
      if (e.name == t.environment) env = &e;
    }
    if (env == nullptr) {
      d.rule = "deny by default";
      d.reason = "environment '" + std::string(t.environment) + "' of project " + pj.name +
                 " is not in the policy in force";
      return d;
    }
  }
  auto git = grants_.find(Key(who.index, pit->second));
  if (git == grants_.end()) {
    d.rule = "deny by default";
    d.reason = name + " has no grant in project " + pj.name;
    return d;
  }
  // The most specific reason a grant did not apply, and that grant, for the refusal.
  std::string closest, closest_rule;
  for (uint32_t gi : git->second) {
    const Grant& g = pj.grants[gi];
    if (!RoleAllows(g.role, action)) {
      if (closest.empty()) {
        closest = name + " is " + RoleName(g.role) + " in project " + pj.name + ", which does not allow " +
                  ActionName(action);
        closest_rule = GrantRule(pj, gi, g) + "; role table";
      }
      continue;
    }
    if (!g.environments.empty()) {
      bool in = false;
      for (const auto& e : g.environments) in = in || (env != nullptr && e == env->name);
      if (!in) {
        closest = name + "'s " + RoleName(g.role) + " grant in project " + pj.name +
                  (env ? " does not cover environment " + env->name : " is limited to some environments");
        closest_rule = GrantRule(pj, gi, g);
        continue;
      }
    }
    if (g.role == Role::kCi) {
      // ci is bound to non-production environments, whatever the grant says.
      if (env == nullptr || env->production) {
        closest = name + " is ci in project " + pj.name + " and ci never reaches " +
                  (env ? "production environment " + env->name : "project-wide actions");
        closest_rule = GrantRule(pj, gi, g) + "; ci is for non-production environments only";
        continue;
      }
    }
    if (!g.secrets.empty() && !t.secret.empty() && IsSecretAction(action)) {
      bool match = false;
      for (const auto& pat : g.secrets) match = match || NameMatches(pat, t.secret);
      if (!match) {
        closest = name + "'s " + RoleName(g.role) + " grant in project " + pj.name + " does not cover secret '" +
                  std::string(t.secret) + "'";
        closest_rule = GrantRule(pj, gi, g);
        continue;
      }
    }
    d.allowed = true;
    d.rule = GrantRule(pj, gi, g);
    d.reason = "allowed by " + d.rule;
    return d;
  }
  d.rule = closest_rule.empty() ? "deny by default" : closest_rule;
  d.reason = closest;
  return d;
}

}  // namespace custody::policy

namespace custody::policy {

Engine::RotationSettings Engine::RotationFor(std::string_view project, std::string_view env) const {
  RotationSettings out;
  const Project* pj = FindProject(project);
  if (pj == nullptr) return out;
  const Environment* e = FindEnvironment(project, env);
  auto pick = [&](auto member) {
    if (e != nullptr && (e->rotation.*member)) return e->rotation.*member;
    return pj->rotation.*member;
  };
  out.max_age = pick(&Rotation::max_age);
  if (auto g = pick(&Rotation::grace)) out.grace = *g;
  if (auto w = pick(&Rotation::warn_before)) out.warn_before = *w;
  if (auto k = pick(&Rotation::keep_versions)) out.keep_versions = *k;
  return out;
}

}  // namespace custody::policy
