// The `custody` binary on the TPM backend (swtpm, one per test): init,
// policy, put/get, rotate/revoke, KEK rotation, the signed audit log (and a
// stock openssl check of a checkpoint signed by the TPM key), a PCR-bound
// configuration, and interop with tpm2-tools.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "../support/cli_fixture.h"

namespace custody::test {
namespace {

using nlohmann::json;

constexpr const char* kPolicy = R"(version = 1
admins = ["user:root"]
[principals."user:root"]
uid = 0
[principals."svc:ci"]
uid = 4242
[projects.payments]
grace = "1h"
[projects.payments.environments.prod]
[projects.payments.environments.dev]
production = false
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
[[projects.payments.grants]]
principal = "svc:ci"
role = "ci"
[projects.billing.environments.prod]
rate = "2/min"
[[projects.billing.grants]]
principal = "user:root"
role = "owner"
)";

class TpmCliTest : public CliFixture {
 protected:
  // Only the config: the keys live in the TPM, so the CLI needs nothing of
  // SoftHSM2's.
  TpmCliTest() { cli_env_ = {{"CUSTODY_CONFIG", token_.config_path()}}; }

  void Init(std::vector<std::string> extra = {}) {
    CUSTODY_REQUIRE_SWTPM(swtpm_);
    auto r = InitTpm(swtpm_, extra);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto p = Apply(kPolicy);
    ASSERT_EQ(p.exit_code, 0) << p.err;
  }
  Swtpm swtpm_;  // the token_ is only for its folder and PIN file
};

TEST_F(TpmCliTest, TheWholeFlowRunsOnTheTpm) {
  Init();
  if (IsSkipped()) return;
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/stripe"}, "sk-live-on-tpm").exit_code, 0);
  auto get = Cli({"secret", "get", "payments/prod/stripe"});
  ASSERT_EQ(get.exit_code, 0) << get.err;
  EXPECT_EQ(get.out, "sk-live-on-tpm");

  // The policy decides as on the token: ci may not read production.
  auto denied = Cli({"policy", "explain", "svc:ci", "get", "payments/prod/stripe"});
  EXPECT_EQ(denied.exit_code, 77);
  // Limits hold too.
  ASSERT_EQ(Cli({"secret", "put", "billing/prod/k"}, "v").exit_code, 0);
  ASSERT_EQ(Cli({"secret", "get", "billing/prod/k"}).exit_code, 0);
  auto limited = Cli({"secret", "get", "billing/prod/k"});
  EXPECT_EQ(limited.exit_code, 75) << limited.err;

  auto rot = Cli({"secret", "rotate", "payments/prod/stripe", "--generate", "24", "--prefix", "sk-"});
  ASSERT_EQ(rot.exit_code, 0) << rot.err;
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe", "--version", "1"}).out, "sk-live-on-tpm");
  ASSERT_EQ(Cli({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "test"}).exit_code, 0);
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out, "sk-live-on-tpm");

  auto kek = Cli({"kek", "rotate", "payments"});
  ASSERT_EQ(kek.exit_code, 0) << kek.err;
  EXPECT_NE(kek.err.find("a TPM is no bulk cipher"), std::string::npos) << kek.err;
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out, "sk-live-on-tpm");

  // The audit log, with a checkpoint signed by the TPM key, verifies, also
  // with the stock openssl command.
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  auto verify = Cli({"audit", "verify"});
  EXPECT_EQ(verify.exit_code, 0) << verify.out << verify.err;
  std::string pem = token_.dir() / "audit.pem";
  ASSERT_EQ(Cli({"audit", "pubkey", "--out", pem}).exit_code, 0);
  std::string msg;
  for (const auto& e : std::filesystem::directory_iterator(token_.dir() / "state/audit/checkpoints")) {
    if (e.path().extension() == ".msg") msg = e.path().string();
  }
  ASSERT_FALSE(msg.empty());
  std::string sig = msg.substr(0, msg.size() - 4) + ".sig";
  auto ossl = RunProgram("/usr/bin/openssl", {"dgst", "-sha256", "-verify", pem, "-signature", sig, msg}, {});
  EXPECT_EQ(ossl.exit_code, 0) << ossl.out << ossl.err;
  EXPECT_NE(ossl.out.find("Verified OK"), std::string::npos);

  auto info = Cli({"--json", "token", "info"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  auto j = json::parse(info.out);
  EXPECT_EQ(j["backend"], "tpm");
  EXPECT_EQ(j["objects"].size(), 3u) << "payments v1 (destroyed), v2, billing v1";
}

TEST_F(TpmCliTest, APcrBoundSetupRefusesAfterThePcrChanges) {
  Init({"--pcrs", "16"});
  if (IsSkipped()) return;
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/k"}, "bound-value").exit_code, 0);
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/k"}).out, "bound-value");
  // Another boot state: PCR 16 extended with tpm2-tools.
  auto ext = RunProgram("/usr/bin/tpm2_pcrextend",
                        {"16:sha256=0000000000000000000000000000000000000000000000000000000000000001", "-T",
                         swtpm_.tcti()},
                        {});
  ASSERT_EQ(ext.exit_code, 0) << ext.err;
  auto r = Cli({"secret", "get", "payments/prod/k"});
  EXPECT_EQ(r.exit_code, 77) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("sealed to another boot state"), std::string::npos) << r.err;
  EXPECT_EQ(r.out, "");
}

TEST_F(TpmCliTest, TpmReadpublicShowsTheSrkTokenInfoReports) {
  Init({"--persist-srk"});
  if (IsSkipped()) return;
  auto info = Cli({"--json", "token", "info"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  auto j = json::parse(info.out);
  EXPECT_EQ(j["srk"], "0x81000001");
  std::string name = j["srk_name"];
  auto r = RunProgram("/usr/bin/tpm2_readpublic", {"-c", "0x81000001", "-T", swtpm_.tcti()}, {});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("name: " + name), std::string::npos) << name << "\n" << r.out;
}

TEST_F(TpmCliTest, AnotherTpmsSrkIsRefused) {
  Init();
  if (IsSkipped()) return;
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/k"}, "v").exit_code, 0);
  // The config now points at another TPM (another SRK): the salt of every
  // encrypted session would go to a key custody never saw.
  Swtpm other;
  ASSERT_TRUE(other.available());
  std::string cfg = ReadFile(token_.config_path());
  size_t at = cfg.find(swtpm_.tcti());
  ASSERT_NE(at, std::string::npos) << cfg;
  cfg.replace(at, swtpm_.tcti().size(), other.tcti());
  WriteFile(token_.config_path(), cfg);
  auto r = Cli({"secret", "get", "payments/prod/k"});
  EXPECT_EQ(r.exit_code, 65) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("is not the one custody was set up with"), std::string::npos) << r.err;
  EXPECT_EQ(r.out, "");
}

TEST_F(TpmCliTest, BadTpmSetupIsOneClearLine) {
  CUSTODY_REQUIRE_SWTPM(swtpm_);
  auto unreachable = Cli({"init", "--backend", "tpm", "--tcti", "swtpm:host=127.0.0.1,port=1", "--pin-file",
                          token_.pin_file(), "--state-dir", token_.dir() / "state"});
  EXPECT_EQ(unreachable.exit_code, 69) << unreachable.err;
  EXPECT_EQ(std::count(unreachable.err.begin(), unreachable.err.end(), '\n'), 1) << unreachable.err;
  EXPECT_NE(unreachable.err.find("cannot open the TPM through TCTI"), std::string::npos) << unreachable.err;
  EXPECT_FALSE(std::filesystem::exists(token_.config_path())) << "nothing written";
  auto mixed = Cli({"init", "--backend", "tpm", "--tcti", swtpm_.tcti(), "--module", "/x.so", "--pin-file",
                    token_.pin_file()});
  EXPECT_EQ(mixed.exit_code, 64) << mixed.err;
  auto bad_pcr = Cli({"init", "--backend", "tpm", "--tcti", swtpm_.tcti(), "--pcrs", "30", "--pin-file",
                      token_.pin_file()});
  EXPECT_EQ(bad_pcr.exit_code, 64) << bad_pcr.err;
}

}  // namespace
}  // namespace custody::test
