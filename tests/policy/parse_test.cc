#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "custody/policy/engine.h"
#include "custody/policy/parse.h"

namespace custody::policy {
namespace {

std::vector<std::string> Errors(const std::string& text) {
  auto r = ParsePolicy(text, "policy.toml");
  EXPECT_EQ(r.policy.has_value(), r.errors.empty());
  return r.errors;
}

void ExpectError(const std::string& text, const std::string& where, const std::string& says) {
  auto errors = Errors(text);
  bool found = false;
  for (const auto& e : errors) found = found || (e.rfind(where, 0) == 0 && e.find(says) != std::string::npos);
  std::string all;
  for (const auto& e : errors) all += e + "\n";
  EXPECT_TRUE(found) << "expected an error at " << where << " saying '" << says << "', got:\n" << all;
}

const std::string kBase = R"(version = 1
[principals."user:alice"]
uid = 1000
[projects.payments.environments.prod]
)";

TEST(ParsePolicy, AMinimalPolicyParses) {
  auto r = ParsePolicy(kBase, "p.toml");
  ASSERT_TRUE(r.errors.empty()) << r.errors[0];
  ASSERT_EQ(r.policy->projects.size(), 1u);
  EXPECT_TRUE(r.policy->projects[0].environments[0].production);
}

TEST(ParsePolicy, SyntaxErrorHasFileLineAndColumn) {
  ExpectError("version = 1\n[projects.x\n", "policy.toml:2:", "");
}

TEST(ParsePolicy, UnknownRole) {
  ExpectError(kBase + "[[projects.payments.grants]]\nprincipal = \"user:alice\"\nrole = \"admin\"\n",
              "policy.toml:7:8:", "unknown role 'admin' (roles: owner, reader, auditor, ci)");
}

TEST(ParsePolicy, DuplicateProjectOrEnvironment) {
  ExpectError(kBase + "[projects.payments.environments.prod]\n", "policy.toml:5:", "prod");
  ExpectError("version = 1\n[projects.payments]\nrate = \"1/s\"\n[projects.payments]\nrate = \"2/s\"\n",
              "policy.toml:4:", "payments");
}

TEST(ParsePolicy, GrantNamingAnUnknownPrincipalOrEnvironment) {
  ExpectError(kBase + "[[projects.payments.grants]]\nprincipal = \"user:bob\"\nrole = \"reader\"\n",
              "policy.toml:5:1:", "unknown principal 'user:bob'");
  ExpectError(kBase + "[[projects.payments.grants]]\nprincipal = \"user:alice\"\nrole = \"reader\"\nenvironments = [\"qa\"]\n",
              "policy.toml:5:1:", "unknown environment 'qa'");
}

TEST(ParsePolicy, InvalidRateStrings) {
  for (const char* bad : {"600", "/min", "0/min", "ten/min", "600/fortnight", "600/min/extra", "-5/s"}) {
    ExpectError(std::string("version = 1\n[projects.p]\nrate = \"") + bad + "\"\n[projects.p.environments.e]\n",
                "policy.toml:3:8:", "invalid rate");
  }
}

TEST(ParsePolicy, OverlappingIdentities) {
  ExpectError(kBase + "[principals.\"user:bob\"]\nuid = 1000\n", "policy.toml:6:7:",
              "identity 1000 of user:bob is already user:alice's (line 2)");
}

TEST(ParsePolicy, TlsSansAreTypedAndABareOneIsADnsName) {
  auto r = ParsePolicy(kBase + R"([principals."svc:a"]
tls_san = ["Web.Prod.Internal", "DNS:api.internal", "uri:spiffe://x/Y", "Email:Ops@X.internal"]
)",
                       "policy.toml");
  ASSERT_TRUE(r.errors.empty()) << r.errors[0];
  std::vector<std::string> sans;
  for (const auto& pr : r.policy->principals) {
    if (pr.name != "svc:a") continue;
    for (const auto& id : pr.identities) sans.push_back(id.value);
  }
  EXPECT_EQ(sans, (std::vector<std::string>{"dns:web.prod.internal", "dns:api.internal", "uri:spiffe://x/Y",
                                            "email:Ops@X.internal"}));
}

TEST(ParsePolicy, AnUnknownTlsSanTypeIsRefusedNamingThePrincipal) {
  ExpectError(kBase + "[principals.\"svc:web\"]\ntls_san = \"ip:10.0.0.7\"\n", "policy.toml:6:11:",
              "tls_san 'ip:10.0.0.7' of principal svc:web is not a SAN custody can match");
  // A URI needs its prefix: without it, its scheme reads as an unknown type.
  ExpectError(kBase + "[principals.\"svc:web\"]\ntls_san = \"spiffe://x/web\"\n", "policy.toml:6:11:",
              "tls_san 'spiffe://x/web' of principal svc:web");
  ExpectError(kBase + "[principals.\"svc:web\"]\ntls_san = \"dns:\"\n", "policy.toml:6:11:", "tls_san 'dns:'");
}

TEST(ParsePolicy, OverlappingTlsSansAreFoundInTheirTypedForm) {
  // The same DNS name, bare and typed, in two cases: one identity.
  ExpectError(kBase + "[principals.\"svc:a\"]\ntls_san = \"web.internal\"\n[principals.\"svc:b\"]\n"
                      "tls_san = \"DNS:WEB.internal\"\n",
              "policy.toml:8:", "identity dns:web.internal of svc:b is already svc:a's");
  // The same text as a DNS name and as an e-mail address: two identities.
  auto r = ParsePolicy(kBase + "[principals.\"svc:a\"]\ntls_san = \"web.internal\"\n[principals.\"svc:b\"]\n"
                               "tls_san = \"email:web.internal\"\n",
                       "policy.toml");
  EXPECT_TRUE(r.errors.empty()) << r.errors[0];
}

TEST(ParsePolicy, UnknownKeysAreErrors) {
  ExpectError(kBase + "[projects.payments.environments.dev]\nproduciton = false\n", "policy.toml:6:",
              "unknown key 'produciton'");
  ExpectError("version = 1\nadmin = [\"user:alice\"]\n", "policy.toml:2:", "unknown key 'admin'");
}

TEST(ParsePolicy, AdminMustBeAPrincipal) {
  ExpectError("admins = [\"user:root\"]\n" + kBase, "policy.toml:1:", "admin 'user:root' is not a declared principal");
}

TEST(ParsePolicy, EveryErrorIsReportedNotJustTheFirst) {
  auto errors = Errors(kBase + "[[projects.payments.grants]]\nprincipal = \"user:x\"\nrole = \"boss\"\n"
                               "[projects.bad_rate]\nrate = \"fast\"\n[projects.bad_rate.environments.e]\n");
  EXPECT_GE(errors.size(), 3u);
}

TEST(ParsePolicy, MissingVersionAndBadNames) {
  ExpectError("[projects.p.environments.e]\n", "policy.toml:", "missing 'version = 1'");
  ExpectError("version = 1\n[principals.alice]\nuid = 1\n", "policy.toml:2:", "must be user:NAME or svc:NAME");
  ExpectError("version = 1\n[projects.Pay]\n[projects.Pay.environments.e]\n", "policy.toml:", "project name 'Pay'");
  ExpectError("version = 1\n[projects.p]\n", "policy.toml:2:", "has no environments");
}

TEST(ParsePolicy, TheDocumentedExampleIsValid) {
  std::ifstream in(CUSTODY_SOURCE_DIR "/docs/examples/policy.toml");
  std::stringstream ss;
  ss << in.rdbuf();
  ASSERT_FALSE(ss.str().empty());
  auto r = ParsePolicy(ss.str(), "docs/examples/policy.toml");
  ASSERT_TRUE(r.errors.empty()) << r.errors[0];
  EXPECT_EQ(r.policy->projects.size(), 2u);
}

TEST(ParseRate, Units) {
  EXPECT_EQ(ParseRate("600/min")->period_seconds, 60u);
  EXPECT_EQ(ParseRate("10/s")->count, 10u);
  EXPECT_EQ(ParseRate("5/hour")->period_seconds, 3600u);
  EXPECT_EQ(ParseRate("1/day")->period_seconds, 86400u);
  EXPECT_FALSE(ParseRate("1/ms"));
  EXPECT_FALSE(ParseRate("1000000001/s"));
}

}  // namespace
}  // namespace custody::policy

namespace custody::policy {
namespace {

TEST(ParseDuration, UnitsAndBounds) {
  EXPECT_EQ(ParseDuration("45s"), 45u);
  EXPECT_EQ(ParseDuration("30m"), 1800u);
  EXPECT_EQ(ParseDuration("12h"), 43200u);
  EXPECT_EQ(ParseDuration("90d"), 90u * 86400);
  EXPECT_EQ(ParseDuration("2w"), 14u * 86400);
  for (const char* bad : {"", "d", "0d", "-1d", "1.5d", "10", "10y", "1 d", "99999999999d"}) {
    EXPECT_FALSE(ParseDuration(bad).has_value()) << bad;
  }
  EXPECT_EQ(FormatDuration(86400), "1d");
  EXPECT_EQ(FormatDuration(90 * 60), "90m");
  EXPECT_EQ(FormatDuration(1209600), "2w");
}

const std::string kRotation = R"(version = 1
[principals."user:alice"]
uid = 1000
[projects.payments]
max_age = "90d"
grace = "2d"
[projects.payments.environments.prod]
keep_versions = 4
[projects.payments.environments.dev]
production = false
max_age = "7d"
grace = "1h"
warn_before = "1d"
)";

TEST(ParsePolicy, RotationSettingsAndTheirPrecedence) {
  auto r = ParsePolicy(kRotation, "p.toml");
  ASSERT_TRUE(r.errors.empty()) << r.errors[0];
  Engine engine(std::move(*r.policy));
  auto prod = engine.RotationFor("payments", "prod");
  EXPECT_EQ(prod.max_age, 90u * 86400) << "from the project";
  EXPECT_EQ(prod.grace, 2u * 86400);
  EXPECT_EQ(prod.warn_before, Engine::kDefaultWarnBefore);
  EXPECT_EQ(prod.keep_versions, 4u) << "the environment's own";
  auto dev = engine.RotationFor("payments", "dev");
  EXPECT_EQ(dev.max_age, 7u * 86400) << "the environment wins over the project";
  EXPECT_EQ(dev.grace, 3600u);
  EXPECT_EQ(dev.warn_before, 86400u);
  EXPECT_EQ(dev.keep_versions, Engine::kDefaultKeepVersions);
  auto unknown = engine.RotationFor("nope", "prod");
  EXPECT_FALSE(unknown.max_age.has_value());
  EXPECT_EQ(unknown.grace, Engine::kDefaultGrace);
}

TEST(ParsePolicy, BadRotationSettingsAreErrorsWithTheirPlace) {
  ExpectError(kBase + "max_age = \"90 days\"\n", "policy.toml:5:",
              "invalid duration '90 days' for projects.payments.environments.prod.max_age");
  ExpectError(kBase + "keep_versions = 0\n", "policy.toml:5:", "keep_versions must be a whole number from 1 to 10000");
  ExpectError(kBase + "grace = 3600\n", "policy.toml:5:", "grace must be a string");
  ExpectError(kBase + "max_age = \"10d\"\nwarn_before = \"10d\"\n", "policy.toml:",
              "warn_before (10d) must be shorter than max_age (10d)");
  ExpectError(kBase + "max_agee = \"7d\"\n", "policy.toml:5:", "unknown key 'max_agee'");
}

}  // namespace
}  // namespace custody::policy
