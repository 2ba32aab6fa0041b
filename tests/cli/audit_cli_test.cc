// The audit log through the real binary: every operation leaves a record,
// nothing secret is in it, the CLI refuses to work without it, and `audit
// verify` / `audit show` tell the user what they need to know.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "../support/cli_fixture.h"

namespace custody::test {
namespace {

constexpr const char* kSecret = "sk-live-AUDITTEST-9f8e7d6c5b4a";

constexpr const char* kPolicy = R"(version = 1
admins = ["user:root"]
[principals."user:root"]
uid = 0
[projects.payments]
[projects.payments.environments.dev]
production = false
[projects.payments.environments.prod]
rate = "4/min"
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
[projects.billing.environments.prod]
[[projects.billing.grants]]
principal = "user:root"
role = "reader"
)";

class AuditCliTest : public CliFixture {
 protected:
  void SetUp() override { InitWithPolicy(token_, kPolicy); }
  std::string AuditDir() const { return token_.dir() / "state/audit"; }
  std::string AllAuditBytes() const {
    std::string all;
    for (const auto& e : std::filesystem::recursive_directory_iterator(AuditDir())) {
      if (e.is_regular_file()) all += ReadFile(e.path().string());
    }
    return all;
  }
};

TEST_F(AuditCliTest, EveryOperationAllowedOrRefusedLeavesOneRecord) {
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/stripe"}, kSecret).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "put", "billing/prod/x"}, "v").exit_code, 77);  // reader: denied
  ASSERT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).exit_code, 75);  // 4/min: limit
  WriteFile(token_.pin_file(), "wrong-pin-1111\n");
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/x"}, "v").exit_code, 77);  // failed login

  auto show = Cli({"--json", "audit", "show", "--project", "payments"});
  ASSERT_EQ(show.exit_code, 0) << show.err;
  const std::string& j = show.out;
  EXPECT_NE(j.find("\"action\": \"secret.put\""), std::string::npos);
  EXPECT_NE(j.find("\"kek_id\": \""), std::string::npos);
  EXPECT_NE(j.find("\"decision\": \"limit\""), std::string::npos) << j;
  EXPECT_NE(j.find("limit reached: environment payments/prod rate 4/min"), std::string::npos);
  EXPECT_NE(j.find("C_Login failed: CKR_PIN_INCORRECT"), std::string::npos) << "failed logins are recorded";
  EXPECT_NE(j.find("\"principal\": \"user:root\""), std::string::npos);
  EXPECT_NE(j.find("\"identified_by\": \"uid 0 (root)\""), std::string::npos);

  auto denied = Cli({"--json", "audit", "show", "--project", "billing"});
  EXPECT_NE(denied.exit_code, 0) << "a reader of billing may not read its audit";
  auto all = Cli({"--json", "audit", "show", "--action", "secret.put"});
  ASSERT_EQ(all.exit_code, 0);
  EXPECT_NE(all.out.find("\"decision\": \"deny\""), std::string::npos) << all.out;
  EXPECT_NE(all.out.find("is reader in project billing"), std::string::npos) << all.out;
  EXPECT_EQ(all.out.find("\"action\": \"secret.get\""), std::string::npos);

  auto table = Cli({"audit", "show", "--principal", "user:root", "--since", "1h"});
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_NE(table.out.find("SEQ  TIME"), std::string::npos);
  EXPECT_NE(table.out.find("secret.get"), std::string::npos);
  EXPECT_EQ(Cli({"audit", "show", "--since", "yesterday"}).exit_code, 64);
}

TEST_F(AuditCliTest, NoSecretValueOrPinEverReachesTheLog) {
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/stripe"}, kSecret).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out, kSecret);
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  std::string all = AllAuditBytes();
  ASSERT_FALSE(all.empty());
  EXPECT_EQ(all.find(kSecret), std::string::npos);
  EXPECT_EQ(all.find("AUDITTEST"), std::string::npos);
  EXPECT_EQ(all.find(SoftHsmToken::kPin), std::string::npos);
}

TEST_F(AuditCliTest, WithoutAWritableLogNothingIsReleasedOrStored) {
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/stripe"}, kSecret).exit_code, 0);
  std::filesystem::rename(AuditDir(), token_.dir() / "audit.moved");
  WriteFile(AuditDir(), "not a folder");
  auto get = Cli({"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(get.exit_code, 69) << get.err;
  EXPECT_EQ(get.out, "") << "no value without a durable record";
  EXPECT_NE(get.err.find("audit log"), std::string::npos) << get.err;
  EXPECT_NE(get.err.find("refusing to work without an audit log"), std::string::npos) << get.err;
  auto put = Cli({"secret", "put", "payments/prod/stripe"}, "new-value");
  EXPECT_EQ(put.exit_code, 69);
  // Restore the log: the secret still has one version, the first.
  std::filesystem::remove(AuditDir());
  std::filesystem::rename(token_.dir() / "audit.moved", AuditDir());
  auto list = Cli({"--json", "secret", "list"});
  EXPECT_NE(list.out.find("\"versions\": 1"), std::string::npos) << list.out;
}

TEST_F(AuditCliTest, VerifyFindsTamperingAndExits65) {
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/stripe"}, kSecret).exit_code, 0);
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).exit_code, 0);
  auto ok = Cli({"audit", "verify"});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.out.find("audit log intact"), std::string::npos);

  std::string seg = AuditDir() + "/audit-000001.jsonl";
  std::string data = ReadFile(seg);
  std::string edited = data;
  edited.replace(edited.find("secret.put"), 10, "secret.PUT");
  WriteFile(seg, edited);
  auto bad = Cli({"audit", "verify"});
  EXPECT_EQ(bad.exit_code, 65);
  EXPECT_NE(bad.err.find("audit log is NOT intact: record at audit-000001.jsonl:"), std::string::npos) << bad.err;
  EXPECT_NE(bad.err.find("modified"), std::string::npos) << bad.err;
  WriteFile(seg, data);
  EXPECT_EQ(Cli({"audit", "verify"}).exit_code, 0);
}

TEST_F(AuditCliTest, TruncationPastACheckpointIsCaughtThroughTheStore) {
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/a"}, "v").exit_code, 0);
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/b"}, "v").exit_code, 0);
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  std::string seg = AuditDir() + "/audit-000001.jsonl";
  std::ifstream in(seg);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  lines.resize(lines.size() - 3);  // back past the last checkpoint
  std::string cut;
  for (const auto& l : lines) cut += l + "\n";
  WriteFile(seg, cut);
  std::filesystem::remove_all(AuditDir() + "/checkpoints");
  auto r = Cli({"audit", "verify"});
  EXPECT_EQ(r.exit_code, 65);
  EXPECT_NE(r.err.find("truncated: the log ends at seq"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("the store records a checkpoint"), std::string::npos) << r.err;
}

TEST_F(AuditCliTest, OfflineVerifyWithThePublicKeyAndTheStockOpensslCommand) {
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/a"}, "v").exit_code, 0);
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  std::string pem = token_.dir() / "audit.pem";
  auto pub = Cli({"audit", "pubkey", "--out", pem});
  ASSERT_EQ(pub.exit_code, 0) << pub.err;
  EXPECT_NE(ReadFile(pem).find("-----BEGIN PUBLIC KEY-----"), std::string::npos);
  // An auditor's copy, far from the config and the token.
  std::string copy = token_.dir() / "copy";
  std::filesystem::create_directories(copy);
  std::filesystem::copy_file(AuditDir() + "/audit-000001.jsonl", copy + "/audit-000001.jsonl");
  RunOptions offline;  // no CUSTODY_CONFIG, no SOFTHSM2_CONF
  auto r = RunCustody({"audit", "verify", copy + "/audit-000001.jsonl", "--pubkey", pem}, offline);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("signed checkpoints"), std::string::npos);
  // The stock openssl command checks a checkpoint from its two files.
  std::string msg, sig;
  for (const auto& e : std::filesystem::directory_iterator(AuditDir() + "/checkpoints")) {
    if (e.path().extension() == ".msg") msg = e.path().string();
  }
  ASSERT_FALSE(msg.empty());
  sig = msg.substr(0, msg.size() - 4) + ".sig";
  auto ossl = RunProgram("/usr/bin/openssl", {"dgst", "-sha256", "-verify", pem, "-signature", sig, msg}, {});
  EXPECT_EQ(ossl.exit_code, 0) << ossl.err;
  EXPECT_NE(ossl.out.find("Verified OK"), std::string::npos);
  // Offline without a key is a usage question, answered clearly.
  auto nokey = RunCustody({"audit", "verify", copy + "/audit-000001.jsonl"}, offline);
  EXPECT_EQ(nokey.exit_code, 78) << nokey.err;
  EXPECT_NE(nokey.err.find("audit verify needs --pubkey or a config"), std::string::npos) << nokey.err;
}

}  // namespace
}  // namespace custody::test
