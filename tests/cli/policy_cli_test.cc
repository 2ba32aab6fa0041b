// Policy through the real binary: check, apply, explain, usage, and the
// refusals a user sees (77 denied, 75 limits), with a real store, on both
// backends (parameterised): a SoftHSM2 token, and a TPM (swtpm).
#include <gtest/gtest.h>

#include <memory>

#include "../support/cli_fixture.h"

namespace custody::test {
namespace {

std::string PolicyWith(const std::string& root_role_in_payments, const std::string& extra_payments = "",
                       const std::string& prod_extra = "") {
  return R"(version = 1
admins = ["user:root"]

[principals."user:root"]
uid = 0
[principals."svc:ci"]
uid = 4242
[principals."svc:web-prod"]
tls_san = "web-prod.payments.internal"

[projects.payments]
)" + extra_payments + R"(
[projects.payments.environments.dev]
production = false
[projects.payments.environments.prod]
)" + prod_extra + R"(
[[projects.payments.grants]]
principal = "user:root"
role = ")" + root_role_in_payments + R"("
[[projects.payments.grants]]
principal = "svc:ci"
role = "ci"
[[projects.payments.grants]]
principal = "svc:web-prod"
role = "reader"
environments = ["prod"]
secrets = ["stripe-*"]

[projects.billing.environments.prod]
[[projects.billing.grants]]
principal = "user:root"
role = "owner"
)";
}

class PolicyCliTest : public CliFixture, public ::testing::WithParamInterface<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "pkcs11") {
      token_.InitCli();
      return;
    }
    swtpm_ = std::make_unique<Swtpm>();
    CUSTODY_REQUIRE_SWTPM(*swtpm_);
    auto r = InitTpm(*swtpm_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  static void Expect(const RunResult& r, int code, const std::string& says) {
    EXPECT_EQ(r.exit_code, code) << r.err << r.out;
    EXPECT_NE((r.err + r.out).find(says), std::string::npos) << "expected '" << says << "' in: " << r.err << r.out;
  }

  std::unique_ptr<Swtpm> swtpm_;
};

TEST_P(PolicyCliTest, NothingIsAllowedBeforeAPolicyIsInForce) {
  Expect(Cli({"secret", "list"}), 77, "no policy in force");
  Expect(Cli({"project", "create", "payments"}), 77, "no policy in force");
  Expect(Cli({"secret", "put", "payments/prod/x"}, "v"), 77, "no policy in force");
}

TEST_P(PolicyCliTest, ApplyCreatesTheDeclaredProjectsAndRecordsTheVersionAndHash) {
  auto r = Apply(PolicyWith("owner"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("policy v1 in force (sha256 "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("bootstrap (uid 0)"), std::string::npos);
  EXPECT_NE(r.out.find("created project payments"), std::string::npos);
  EXPECT_NE(r.out.find("created project billing"), std::string::npos);
  auto list = Cli({"project", "list"});
  EXPECT_NE(list.out.find("payments  dev,prod"), std::string::npos) << list.out;
  auto again = Apply(PolicyWith("owner") + "\n# a comment changes the hash\n");
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.out.find("policy v2 in force"), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("applied by user:root"), std::string::npos);
  EXPECT_EQ(again.out.find("created"), std::string::npos) << "nothing new to create";
}

TEST_P(PolicyCliTest, CheckPrintsEveryErrorWithFileLineAndColumn) {
  std::string bad = R"(version = 1
[principals."user:root"]
uid = 0
[principals."user:twin"]
uid = 0
[projects.payments]
rate = "lots"
[projects.payments.environments.prod]
[[projects.payments.grants]]
principal = "user:ghost"
role = "superuser"
)";
  std::string file = token_.dir() / "bad.toml";
  WriteFile(file, bad);
  auto r = Cli({"policy", "check", file});
  EXPECT_EQ(r.exit_code, 65) << r.err;
  EXPECT_NE(r.err.find(file + ":5:7: identity 0 of user:twin is already user:root's"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(file + ":7:8: invalid rate 'lots'"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(file + ":11:8: unknown role 'superuser'"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(file + ":9:1: grant in project payments names unknown principal 'user:ghost'"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("(4 errors in "), std::string::npos) << r.err;

  WriteFile(file, PolicyWith("owner"));
  auto ok = Cli({"policy", "check", file});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.out.find("valid: 2 projects, 3 principals, 4 grants"), std::string::npos) << ok.out;
}

TEST_P(PolicyCliTest, AnInvalidPolicyIsNeverAppliedAndThePreviousOneStays) {
  ASSERT_EQ(Apply(PolicyWith("reader")).exit_code, 0);
  auto bad = Apply(PolicyWith("owner") + "[projects.payments.environments.prod]\n", "bad.toml");
  EXPECT_EQ(bad.exit_code, 65) << bad.err;
  // Still v1, where root is only a reader in payments.
  Expect(Cli({"secret", "put", "payments/prod/x"}, "v"), 77,
         "user:root is reader in project payments, which does not allow put");
  auto explain = Cli({"policy", "explain", "user:root", "put", "payments/prod/x"});
  EXPECT_NE(explain.out.find("policy v1"), std::string::npos) << explain.out;
}

TEST_P(PolicyCliTest, ApplyRefusesToLockTheCallerOut) {
  ASSERT_EQ(Apply(PolicyWith("owner")).exit_code, 0);
  std::string no_admin = PolicyWith("owner");
  no_admin.replace(no_admin.find("admins = [\"user:root\"]"), 22, "admins = [\"svc:ci\"]");
  Expect(Apply(no_admin, "lockout.toml"), 64, "would lock you out");
  EXPECT_NE(Cli({"policy", "explain", "user:root", "apply-policy", "payments"}).out.find("policy v1"),
            std::string::npos);
}

TEST_P(PolicyCliTest, ReaderMayGetButNotPutRotateOrDelete) {
  ASSERT_EQ(Apply(PolicyWith("owner")).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/stripe-key"}, "sk-value").exit_code, 0);
  ASSERT_EQ(Apply(PolicyWith("reader")).exit_code, 0);
  auto get = Cli({"secret", "get", "payments/prod/stripe-key"});
  EXPECT_EQ(get.exit_code, 0) << get.err;
  EXPECT_EQ(get.out, "sk-value");
  Expect(Cli({"secret", "put", "payments/prod/stripe-key"}, "new"), 77,
         "denied: user:root may not put payments/prod/stripe-key: user:root is reader in project payments");
  Expect(Cli({"secret", "delete", "payments/prod/stripe-key"}), 77, "which does not allow delete");
  Expect(Cli({"env", "create", "payments", "qa"}), 77, "which does not allow create-env");
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe-key"}).out, "sk-value") << "nothing was changed";
}

TEST_P(PolicyCliTest, ExplainShowsTheDecidingRule) {
  ASSERT_EQ(Apply(PolicyWith("owner")).exit_code, 0);
  auto allow = Cli({"policy", "explain", "svc:web-prod", "get", "payments/prod/stripe-live"});
  EXPECT_EQ(allow.exit_code, 0) << allow.err;
  EXPECT_NE(allow.out.find("allow: allowed by projects.payments grant #3"), std::string::npos) << allow.out;
  EXPECT_NE(allow.out.find("svc:web-prod is reader in prod for stripe-*"), std::string::npos) << allow.out;

  auto other = Cli({"policy", "explain", "svc:web-prod", "get", "payments/prod/db-password"});
  EXPECT_EQ(other.exit_code, 77);
  EXPECT_NE(other.out.find("deny: svc:web-prod's reader grant in project payments does not cover secret 'db-password'"),
            std::string::npos)
      << other.out;

  auto ci = Cli({"--json", "policy", "explain", "svc:ci", "get", "payments/prod/stripe-live"});
  EXPECT_EQ(ci.exit_code, 77);
  EXPECT_NE(ci.out.find("\"decision\": \"deny\""), std::string::npos) << ci.out;
  EXPECT_NE(ci.out.find("ci never reaches production environment prod"), std::string::npos) << ci.out;
  EXPECT_EQ(Cli({"policy", "explain", "svc:ci", "get", "payments/dev/stripe-live"}).exit_code, 0);
  EXPECT_EQ(Cli({"policy", "explain", "svc:ci", "get", "billing/prod/x"}).exit_code, 77);

  Expect(Cli({"policy", "explain", "svc:nope", "get", "payments/prod/x"}), 66, "principal 'svc:nope' is not in the policy");
  Expect(Cli({"policy", "explain", "svc:ci", "steal", "payments/prod/x"}), 64, "unknown action 'steal'");
}

TEST_P(PolicyCliTest, RateLimitRefusesWith75SaysWhichAndWhenAndSparesOtherProjects) {
  ASSERT_EQ(Apply(PolicyWith("owner", "", "rate = \"3/min\"\n")).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/k"}, "v").exit_code, 0);  // 1 of 3
  ASSERT_EQ(Cli({"secret", "put", "billing/prod/k"}, "v").exit_code, 0);
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/k"}).exit_code, 0);  // 2
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/k"}).exit_code, 0);  // 3
  auto r = Cli({"secret", "get", "payments/prod/k"});
  Expect(r, 75, "limit reached: environment payments/prod rate 3/min for payments/prod/k; it refills in ");
  EXPECT_EQ(r.out, "") << "no value on refusal";
  // Another environment and another project keep their own budgets.
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/k"}, "v").exit_code, 0);
  EXPECT_EQ(Cli({"secret", "get", "payments/dev/k"}).exit_code, 0);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(Cli({"secret", "get", "billing/prod/k"}).exit_code, 0) << i;
}

TEST_P(PolicyCliTest, SpendLimitCountsUnsealsPerProjectPerDay) {
  ASSERT_EQ(Apply(PolicyWith("owner", "unseals_per_day = 2\n")).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/k"}, "v").exit_code, 0);
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/k"}, "v").exit_code, 0);
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/k"}).exit_code, 0);
  EXPECT_EQ(Cli({"secret", "get", "payments/dev/k"}).exit_code, 0);  // the project's budget covers every env
  auto r = Cli({"secret", "get", "payments/prod/k"});
  Expect(r, 75, "limit reached: project payments budget of 2 unseals per day");
  EXPECT_NE(r.err.find("it refills in"), std::string::npos);
  // Seals are not unseals: putting still works.
  EXPECT_EQ(Cli({"secret", "put", "payments/prod/k"}, "v2").exit_code, 0);

  auto usage = Cli({"--json", "usage", "payments"});
  ASSERT_EQ(usage.exit_code, 0) << usage.err;
  EXPECT_NE(usage.out.find("\"spend_limited\": 1"), std::string::npos) << usage.out;
  EXPECT_NE(usage.out.find("\"unseals\": 1"), std::string::npos) << usage.out;
  EXPECT_NE(usage.out.find("\"seals\": 2"), std::string::npos) << usage.out;
  auto table = Cli({"usage"});
  EXPECT_NE(table.out.find("PROJECT/ENV"), std::string::npos);
  EXPECT_NE(table.out.find("payments/prod  user:root"), std::string::npos) << table.out;
}

TEST_P(PolicyCliTest, UsageCountsDenials) {
  ASSERT_EQ(Apply(PolicyWith("reader")).exit_code, 0);
  Expect(Cli({"secret", "put", "payments/prod/k"}, "v"), 77, "does not allow put");
  Expect(Cli({"usage", "payments"}), 77, "does not allow read-usage");  // readers do not read usage
  ASSERT_EQ(Apply(PolicyWith("owner")).exit_code, 0);
  auto usage = Cli({"--json", "usage", "payments"});
  ASSERT_EQ(usage.exit_code, 0) << usage.err;
  // One refusal in payments/prod (the put), one project-wide (reading usage).
  size_t first = usage.out.find("\"denied\": 1");
  ASSERT_NE(first, std::string::npos) << usage.out;
  EXPECT_NE(usage.out.find("\"denied\": 1", first + 1), std::string::npos) << usage.out;
  EXPECT_NE(usage.out.find("\"environment\": \"prod\""), std::string::npos) << usage.out;
}

TEST_P(PolicyCliTest, AnEnvironmentOnAnotherTokenIsRefusedForNow) {
  Expect(Apply(PolicyWith("owner", "", "token = \"pkcs11:token=prod-hsm\"\n")), 64,
         GetParam() == "tpm" ? "custody serves every environment from the TPM"
                             : "custody serves every environment from pkcs11:token=custody-test for now");
  Expect(Cli({"secret", "list"}), 77, "no policy in force");
}

INSTANTIATE_TEST_SUITE_P(Backends, PolicyCliTest, ::testing::Values("pkcs11", "tpm"),
                         [](const auto& p) { return p.param; });

}  // namespace
}  // namespace custody::test
