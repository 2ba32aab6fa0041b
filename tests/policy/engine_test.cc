// The decision engine, exhaustively: every principal kind by every role by
// every action by every environment, against the rulebook written out again
// here independently of the engine's switch.
#include <gtest/gtest.h>

#include "custody/policy/engine.h"
#include "custody/policy/parse.h"

namespace custody::policy {
namespace {

constexpr const char* kPolicy = R"(
version = 1
admins = ["user:admin"]

[principals."user:admin"]
unix_user = "admin"
[principals."user:owner"]
uid = 1001
[principals."user:reader"]
uid = 1002
[principals."user:auditor"]
uid = 1003
[principals."svc:ci"]
uid = 1004
[principals."user:nobody"]
uid = 1005
[principals."svc:ops-group"]
gid = 500

[projects.payments]
[projects.payments.environments.dev]
production = false
[projects.payments.environments.staging]
production = false
[projects.payments.environments.prod]
production = true

[[projects.payments.grants]]
principal = "user:owner"
role = "owner"
[[projects.payments.grants]]
principal = "user:reader"
role = "reader"
[[projects.payments.grants]]
principal = "user:auditor"
role = "auditor"
[[projects.payments.grants]]
principal = "svc:ci"
role = "ci"

[projects.billing]
[projects.billing.environments.prod]
[[projects.billing.grants]]
principal = "user:reader"
role = "reader"
environments = ["prod"]
secrets = ["stripe-*", "db.password"]
)";

Engine Make(const char* text = kPolicy) {
  auto r = ParsePolicy(text, "test.toml");
  EXPECT_TRUE(r.errors.empty()) << (r.errors.empty() ? "" : r.errors[0]);
  return Engine(std::move(*r.policy));
}

// The rulebook, restated for the test: may `role` do `action` in an
// environment that is or is not production?
bool Expected(std::optional<Role> role, Action a, bool production) {
  if (!role) return false;  // no grant: nothing, ever
  switch (*role) {
    case Role::kOwner:
      return a != Action::kApplyPolicy && a != Action::kCreateProject;
    case Role::kReader:
      return a == Action::kGet || a == Action::kList;
    case Role::kAuditor:
      return a == Action::kList || a == Action::kReadUsage || a == Action::kReadAudit;
    case Role::kCi:
      return !production && (a == Action::kGet || a == Action::kList);
  }
  return false;
}

TEST(Engine, FullMatrixOfPrincipalsRolesActionsAndEnvironments) {
  Engine e = Make();
  struct Who {
    const char* name;
    std::optional<Role> role;
  };
  const Who principals[] = {{"user:owner", Role::kOwner},     {"user:reader", Role::kReader},
                            {"user:auditor", Role::kAuditor}, {"svc:ci", Role::kCi},
                            {"user:nobody", std::nullopt},    {"svc:ops-group", std::nullopt},
                            {"user:admin", std::nullopt}};
  const std::pair<const char*, bool> envs[] = {{"dev", false}, {"staging", false}, {"prod", true}};
  int checked = 0;
  for (const Who& w : principals) {
    auto id = e.FindPrincipal(w.name);
    ASSERT_TRUE(id) << w.name;
    for (Action a : kAllActions) {
      if (a == Action::kApplyPolicy || a == Action::kCreateProject) continue;  // org actions below
      for (auto [env, production] : envs) {
        Decision d = e.Decide(*id, a, {"payments", env, "stripe-key"});
        EXPECT_EQ(d.allowed, Expected(w.role, a, production))
            << w.name << " " << ActionName(a) << " payments/" << env << ": " << d.reason;
        EXPECT_FALSE(d.reason.empty());
        EXPECT_FALSE(d.rule.empty());
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 7 * 9 * 3);
}

TEST(Engine, APrincipalWithoutAGrantNeverReceivesAnything) {
  Engine e = Make();
  auto nobody = *e.FindPrincipal("user:nobody");
  for (Action a : kAllActions) {
    for (const char* project : {"payments", "billing", "unknown"}) {
      for (const char* env : {"", "dev", "staging", "prod", "qa"}) {
        for (const char* secret : {"", "stripe-key", "db.password"}) {
          Decision d = e.Decide(nobody, a, {project, env, secret});
          EXPECT_FALSE(d.allowed) << ActionName(a) << " " << project << "/" << env << "/" << secret;
        }
      }
    }
  }
  Decision d = e.Decide(nobody, Action::kGet, {"payments", "dev", "x"});
  EXPECT_EQ(d.reason, "user:nobody has no grant in project payments");
  EXPECT_EQ(d.rule, "deny by default");
}

TEST(Engine, CiNeverReachesAProductionEnvironment) {
  Engine e = Make();
  auto ci = *e.FindPrincipal("svc:ci");
  for (Action a : kAllActions) {
    Decision d = e.Decide(ci, a, {"payments", "prod", "stripe-key"});
    EXPECT_FALSE(d.allowed) << ActionName(a);
  }
  Decision d = e.Decide(ci, Action::kGet, {"payments", "prod", "stripe-key"});
  EXPECT_NE(d.reason.find("ci never reaches production environment prod"), std::string::npos) << d.reason;
  EXPECT_TRUE(e.Decide(ci, Action::kGet, {"payments", "dev", "stripe-key"}).allowed);
}

TEST(Engine, EnvironmentsDefaultToProduction) {
  // billing/prod has no production flag: it counts as production, so a ci
  // grant on it is refused when the policy is parsed.
  std::string text = std::string(kPolicy) + R"(
[[projects.billing.grants]]
principal = "svc:ci"
role = "ci"
environments = ["prod"]
)";
  auto r = ParsePolicy(text, "p.toml");
  ASSERT_FALSE(r.errors.empty());
  EXPECT_NE(r.errors[0].find("ci only reaches environments marked production = false"), std::string::npos)
      << r.errors[0];
}

TEST(Engine, AReaderCannotRotateOrChangeMembersOrWrite) {
  Engine e = Make();
  auto reader = *e.FindPrincipal("user:reader");
  for (Action a : {Action::kRotate, Action::kManageMembers, Action::kPut, Action::kDelete, Action::kCreateEnv}) {
    for (const char* env : {"dev", "staging", "prod"}) {
      Decision d = e.Decide(reader, a, {"payments", env, "stripe-key"});
      EXPECT_FALSE(d.allowed) << ActionName(a);
      EXPECT_NE(d.reason.find("is reader in project payments, which does not allow"), std::string::npos) << d.reason;
    }
  }
}

TEST(Engine, GrantsAreNarrowedByEnvironmentAndSecretPattern) {
  Engine e = Make();
  auto reader = *e.FindPrincipal("user:reader");
  EXPECT_TRUE(e.Decide(reader, Action::kGet, {"billing", "prod", "stripe-live"}).allowed);
  EXPECT_TRUE(e.Decide(reader, Action::kGet, {"billing", "prod", "db.password"}).allowed);
  Decision d = e.Decide(reader, Action::kGet, {"billing", "prod", "github-token"});
  EXPECT_FALSE(d.allowed);
  EXPECT_NE(d.reason.find("does not cover secret 'github-token'"), std::string::npos) << d.reason;
  // Listing is allowed; the caller filters names through the patterns.
  EXPECT_TRUE(e.Decide(reader, Action::kList, {"billing", "prod", ""}).allowed);
  EXPECT_FALSE(e.Decide(reader, Action::kList, {"billing", "prod", "github-token"}).allowed);
}

TEST(Engine, OneProjectsRoleGivesNothingInAnother) {
  Engine e = Make();
  auto owner = *e.FindPrincipal("user:owner");
  for (Action a : kAllActions) EXPECT_FALSE(e.Decide(owner, a, {"billing", "prod", "x"}).allowed) << ActionName(a);
}

TEST(Engine, OrganisationActionsAreForAdminsOnly) {
  Engine e = Make();
  for (const char* who : {"user:owner", "user:reader", "user:auditor", "svc:ci", "user:nobody"}) {
    for (Action a : {Action::kApplyPolicy, Action::kCreateProject}) {
      Decision d = e.Decide(*e.FindPrincipal(who), a, {"payments", "", ""});
      EXPECT_FALSE(d.allowed) << who;
      EXPECT_NE(d.reason.find("only policy admins"), std::string::npos);
    }
  }
  EXPECT_TRUE(e.Decide(*e.FindPrincipal("user:admin"), Action::kApplyPolicy, {}).allowed);
  // Admin is an organisation role, not a project role: no secrets for it.
  EXPECT_FALSE(e.Decide(*e.FindPrincipal("user:admin"), Action::kGet, {"payments", "dev", "x"}).allowed);
}

TEST(Engine, UnknownProjectOrEnvironmentIsDeniedWithItsName) {
  Engine e = Make();
  auto owner = *e.FindPrincipal("user:owner");
  EXPECT_EQ(e.Decide(owner, Action::kGet, {"nope", "dev", "x"}).reason,
            "project 'nope' is not in the policy in force");
  EXPECT_EQ(e.Decide(owner, Action::kGet, {"payments", "qa", "x"}).reason,
            "environment 'qa' of project payments is not in the policy in force");
}

TEST(Engine, AllowsNameTheGrantAndItsLine) {
  Engine e = Make();
  Decision d = e.Decide(*e.FindPrincipal("user:reader"), Action::kGet, {"payments", "prod", "k"});
  ASSERT_TRUE(d.allowed);
  EXPECT_EQ(d.rule, "projects.payments grant #2 (line 31): user:reader is reader");
}

TEST(Engine, IdentifyByUidUserGroupAndCertificate) {
  Engine e = Make();
  EXPECT_EQ(e.PrincipalName(*e.Identify({.uid = 1001})), "user:owner");
  EXPECT_EQ(e.PrincipalName(*e.Identify({.uid = 9999, .user = "admin"})), "user:admin");
  // A group matches only when nothing personal does.
  EXPECT_EQ(e.PrincipalName(*e.Identify({.uid = 9999, .gids = {500}})), "svc:ops-group");
  EXPECT_EQ(e.PrincipalName(*e.Identify({.uid = 1001, .gids = {500}})), "user:owner");
  std::string why;
  EXPECT_FALSE(e.Identify({.uid = 9999, .user = "mallory"}, &why));
  EXPECT_EQ(why, "user mallory (uid 9999) is not a principal in the policy");
  // uid of one principal, user name of another: ambiguous, nobody.
  EXPECT_FALSE(e.Identify({.uid = 1001, .user = "admin"}, &why));
  EXPECT_NE(why.find("more than one principal"), std::string::npos);
}

// A SAN identifies a principal only through an identity of its own type.
// The server reports each SAN typed ("dns:", "uri:", "email:"); the policy
// writes them typed too, a bare value meaning a DNS name.
constexpr const char* kSanPolicy = R"(
version = 1
[principals."svc:web"]
tls_san = "web.prod.demo.internal"
[principals."svc:web-dns"]
tls_san = "dns:Api.Prod.Demo.Internal"
[principals."svc:spiffe"]
tls_san = "uri:spiffe://demo.internal/web"
[principals."svc:mailer"]
tls_san = "email:ops@demo.internal"
[projects.demo.environments.prod]
)";

std::optional<std::string> IdentifiedAs(const Engine& e, std::vector<std::string> sans, std::string* why = nullptr) {
  auto id = e.Identify({.tls_sans = std::move(sans)}, why);
  if (!id) return std::nullopt;
  return e.PrincipalName(*id);
}

TEST(Engine, AnEmailSanDoesNotMatchADnsIdentity) {
  Engine e = Make(kSanPolicy);
  std::string why;
  EXPECT_EQ(IdentifiedAs(e, {"email:web.prod.demo.internal"}, &why), std::nullopt);
  EXPECT_EQ(why, "certificate SAN email:web.prod.demo.internal is not a principal in the policy");
  EXPECT_EQ(IdentifiedAs(e, {"uri:web.prod.demo.internal"}), std::nullopt);
  // A SAN without its type is matched against nothing: the server always
  // says which kind of name it is.
  EXPECT_EQ(IdentifiedAs(e, {"web.prod.demo.internal"}), std::nullopt);
  EXPECT_EQ(IdentifiedAs(e, {"DNS:web.prod.demo.internal"}), std::nullopt);
  // And the other way round: an address is not a host either.
  EXPECT_EQ(IdentifiedAs(e, {"dns:ops@demo.internal"}), std::nullopt);
  EXPECT_EQ(IdentifiedAs(e, {"email:ops@demo.internal"}), "svc:mailer");
  // Another type beside the right one does not get in the way.
  EXPECT_EQ(IdentifiedAs(e, {"email:someone@else", "dns:web.prod.demo.internal"}), "svc:web");
}

TEST(Engine, ABareTlsSanIsADnsNameComparedWithoutCase) {
  Engine e = Make(kSanPolicy);
  EXPECT_EQ(IdentifiedAs(e, {"dns:web.prod.demo.internal"}), "svc:web");
  EXPECT_EQ(IdentifiedAs(e, {"dns:WEB.Prod.demo.internal"}), "svc:web");
  EXPECT_EQ(IdentifiedAs(e, {"dns:api.prod.demo.internal"}), "svc:web-dns");
  EXPECT_EQ(IdentifiedAs(e, {"dns:API.PROD.DEMO.INTERNAL"}), "svc:web-dns");
}

TEST(Engine, AUriSanMatchesAUriIdentityExactly) {
  Engine e = Make(kSanPolicy);
  EXPECT_EQ(IdentifiedAs(e, {"uri:spiffe://demo.internal/web"}), "svc:spiffe");
  EXPECT_EQ(IdentifiedAs(e, {"uri:spiffe://demo.internal/Web"}), std::nullopt);
  EXPECT_EQ(IdentifiedAs(e, {"dns:spiffe://demo.internal/web"}), std::nullopt);
  EXPECT_EQ(IdentifiedAs(e, {"email:spiffe://demo.internal/web"}), std::nullopt);
  EXPECT_EQ(IdentifiedAs(e, {"email:OPS@demo.internal"}), std::nullopt) << "addresses compare exactly";
}

TEST(Engine, RoleTableIsExhaustive) {
  // Every role/action pair has an answer, and no role reaches organisation actions.
  for (Role r : kAllRoles) {
    EXPECT_FALSE(RoleAllows(r, Action::kApplyPolicy));
    EXPECT_FALSE(RoleAllows(r, Action::kCreateProject));
    for (Action a : kAllActions) EXPECT_EQ(RoleAllows(r, a), Expected(r, a, false)) << RoleName(r) << ActionName(a);
  }
}

TEST(Engine, LimitsForNamesProjectAndEnvironmentRulesWithSeparateKeys) {
  Engine e = Make(R"(
version = 1
[principals."user:a"]
uid = 1
[projects.p]
rate = "600/min"
principal_rate = "60/min"
unseals_per_day = 1000
unseals_per_month = 20000
[projects.p.environments.prod]
rate = "10/s"
[projects.p.environments.dev]
production = false
[projects.q]
rate = "600/min"
[projects.q.environments.prod]
)");
  auto a = *e.FindPrincipal("user:a");
  auto prod = e.LimitsFor("p", "prod", a);
  ASSERT_EQ(prod.size(), 5u);
  EXPECT_EQ(prod[0].key, "rate:p");
  EXPECT_EQ(prod[0].label, "project p rate 600/min");
  EXPECT_EQ(prod[1].key, "prate:p:user:a");
  EXPECT_EQ(prod[2].kind, LimitRule::kUnsealsPerDay);
  EXPECT_EQ(prod[2].limit, 1000u);
  EXPECT_EQ(prod[3].kind, LimitRule::kUnsealsPerMonth);
  EXPECT_EQ(prod[4].key, "rate:p/prod");
  EXPECT_EQ(prod[4].label, "environment p/prod rate 10/s");
  EXPECT_EQ(e.LimitsFor("p", "dev", a).size(), 4u);
  // Another project's rule never shares a key with this one's.
  EXPECT_EQ(e.LimitsFor("q", "prod", a)[0].key, "rate:q");
}

}  // namespace
}  // namespace custody::policy
