// The audit log through the real binary: every operation leaves a record,
// nothing secret is in it, the CLI refuses to work without it, and `audit
// verify` / `audit show` tell the user what they need to know.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

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
  // Every record in the log's segments, in order, each line parsed: fails
  // the test on a line that is not a JSON object or a sequence that skips.
  std::vector<nlohmann::json> AuditRecords() const {
    std::vector<std::string> segments;
    for (const auto& e : std::filesystem::directory_iterator(AuditDir())) {
      const std::string name = e.path().filename().string();
      if (name.rfind("audit-", 0) == 0 && e.path().extension() == ".jsonl") segments.push_back(e.path().string());
    }
    std::sort(segments.begin(), segments.end());
    std::vector<nlohmann::json> records;
    for (const auto& seg : segments) {
      std::istringstream lines(ReadFile(seg));
      std::string line;
      while (std::getline(lines, line)) {
        auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        EXPECT_TRUE(j.is_object()) << seg << ": " << line;
        if (!j.is_object()) continue;
        EXPECT_EQ(j.value("seq", 0u), records.size() + 1) << seg << ": " << line;
        records.push_back(std::move(j));
      }
    }
    return records;
  }
};

TEST_F(AuditCliTest, EveryOperationAllowedOrRefusedLeavesOneRecord) {
  // Each operation, its exit code, and the one record it must add: counted
  // in the log's segments (checkpoints aside), not looked for as text.
  struct Op {
    std::vector<std::string> args;
    std::string in;
    int exit_code;
    std::string action, name, decision, result;
    std::string error = "";  // what the record's error says, if the operation failed
  };
  auto run = [&](const Op& op) {
    std::string line;
    for (const auto& a : op.args) line += a + " ";
    SCOPED_TRACE(line);
    const size_t before = AuditRecords().size();
    auto r = Cli(op.args, op.in);
    ASSERT_EQ(r.exit_code, op.exit_code) << r.err;
    auto all = AuditRecords();
    std::vector<nlohmann::json> added;
    for (size_t i = before; i < all.size(); ++i) {
      if (all[i].value("type", "") != "checkpoint") added.push_back(all[i]);
    }
    ASSERT_EQ(added.size(), 1u) << "records added: " << nlohmann::json(added).dump(1);
    const auto& rec = added[0];
    EXPECT_EQ(rec.value("type", ""), "event") << rec.dump();
    EXPECT_EQ(rec.value("action", ""), op.action) << rec.dump();
    EXPECT_EQ(rec.value("name", ""), op.name) << rec.dump();
    EXPECT_EQ(rec.value("decision", ""), op.decision) << rec.dump();
    EXPECT_EQ(rec.value("result", ""), op.result) << rec.dump();
    EXPECT_NE(rec.value("error", "").find(op.error), std::string::npos) << rec.dump();
    if (op.error.empty()) {
      EXPECT_EQ(rec.value("error", ""), "") << rec.dump();
    }
  };
  run({{"secret", "put", "payments/prod/stripe"}, kSecret, 0, "secret.put", "stripe", "allow", "ok"});
  run({{"secret", "get", "payments/prod/stripe"}, "", 0, "secret.get", "stripe", "allow", "ok"});
  run({{"secret", "put", "billing/prod/x"}, "v", 77, "secret.put", "x", "deny", "refused",
       "user:root is reader in project billing"});
  run({{"secret", "get", "payments/prod/stripe"}, "", 0, "secret.get", "stripe", "allow", "ok"});
  run({{"secret", "get", "payments/prod/stripe"}, "", 0, "secret.get", "stripe", "allow", "ok"});
  run({{"secret", "get", "payments/prod/stripe"}, "", 75, "secret.get", "stripe", "limit", "refused",
       "limit reached: environment payments/prod rate 4/min"});
  WriteFile(token_.pin_file(), "wrong-pin-1111\n");
  // The policy allows it; the token refuses the login.
  run({{"secret", "put", "payments/dev/x"}, "v", 77, "secret.put", "x", "allow", "refused",
       "C_Login failed: CKR_PIN_INCORRECT"});
  WriteFile(token_.pin_file(), std::string(SoftHsmToken::kPin) + "\n");

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
