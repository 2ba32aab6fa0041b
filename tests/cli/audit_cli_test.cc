// The audit log through the real binary: every operation leaves a record,
// nothing secret is in it, the CLI refuses to work without it, and `audit
// verify` / `audit show` tell the user what they need to know.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <ctime>

#include "../support/cli_fixture.h"
#include "../support/pg_server.h"

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

// A time for `audit prune --before` (UTC, whole seconds) that every record
// written before the call is older than, and none written after it.
std::string CutOff() {
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  const std::time_t cut = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&cut, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &tm);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  return text;
}

class AuditCliTest : public CliFixture {
 protected:
  void SetUp() override { InitWithPolicy(token_, kPolicy); }
  std::string AuditDir() const { return token_.dir() / "state/audit"; }
  // Every command's batch in a segment of its own, so that there are
  // segments to prune.
  void OneSegmentPerBatch() {
    std::string config = ReadFile(token_.config_path());
    const size_t at = config.find("segment_bytes = ");
    ASSERT_NE(at, std::string::npos) << config;
    config.replace(at, config.find('\n', at) - at, "segment_bytes = 1");
    WriteFile(token_.config_path(), config);
  }
  // Everything the audit trail holds: its records (files or the store),
  // and a file log's checkpoint files.
  std::string AllAuditBytes() const {
    std::string all;
    for (const auto& line : TrailLines(token_.config_path())) all += line + "\n";
    if (std::filesystem::exists(AuditDir())) {
      for (const auto& e : std::filesystem::recursive_directory_iterator(AuditDir())) {
        if (e.is_regular_file()) all += ReadFile(e.path().string());
      }
    }
    return all;
  }
  // Every record of the trail (this host's one chain), in order, each line
  // parsed: fails the test on a line that is not a JSON object or a
  // sequence that skips.
  std::vector<nlohmann::json> AuditRecords() const {
    std::vector<nlohmann::json> records;
    for (const auto& line : TrailLines(token_.config_path())) {
      auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      EXPECT_TRUE(j.is_object()) << line;
      if (!j.is_object()) continue;
      EXPECT_EQ(j.value("seq", 0u), records.size() + 1) << line;
      records.push_back(std::move(j));
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

// `audit export` writes the records as they are stored, byte for byte the
// file log's lines, so a SIEM gets what `audit verify` checks: the export of
// a chain verifies offline with the audit key's PEM, as a log file does.
TEST_F(AuditCliTest, ExportWritesTheRecordsAsStoredAndTheExportVerifiesOffline) {
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/stripe"}, kSecret).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).exit_code, 0);
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  const std::string out = token_.dir() / "export.jsonl", pem = token_.dir() / "audit.pem";
  ASSERT_EQ(Cli({"audit", "pubkey", "--out", pem}).exit_code, 0);
  // What an export killed half way by an older custody left, or what
  // another user put there first: neither stops the export nor receives it.
  WriteFile(out + ".tmp", "left over\n");
  auto r = Cli({"audit", "export", "--out", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFile(out + ".tmp"), "left over\n");
  std::filesystem::remove(out + ".tmp");
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::path(out).parent_path())) {
    EXPECT_EQ(e.path().filename().string().rfind(".custody-", 0), std::string::npos)
        << "a temporary file was left beside the export: " << e.path();
  }
  struct stat st {};
  ASSERT_EQ(::stat(out.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  const std::string exported = ReadFile(out);
  const std::vector<std::string> stored = TrailLines(token_.config_path());
  std::string expected;
  // The trail now also holds the export's own record, written after it.
  for (size_t i = 0; i + 1 < stored.size(); ++i) expected += stored[i] + "\n";
  EXPECT_EQ(exported, expected);
  EXPECT_NE(stored.back().find("\"action\":\"audit.export\""), std::string::npos) << stored.back();
  auto offline = RunCustody({"audit", "verify", out, "--pubkey", pem}, {});
  EXPECT_EQ(offline.exit_code, 0) << offline.out << offline.err;
  EXPECT_NE(offline.out.find("audit log intact"), std::string::npos) << offline.out;
  // To stdout, and filtered by time: nothing is newer than the year 2099.
  auto later = Cli({"audit", "export", "--since", "2099-01-01"});
  EXPECT_EQ(later.exit_code, 0) << later.err;
  EXPECT_EQ(later.out, "");
  ExpectOneLine(Cli({"audit", "export", "--node", "bad name!"}), 64, "--node");
  // An export that cannot be written leaves no file behind.
  ExpectOneLine(Cli({"audit", "export", "--out", token_.dir() / "no-such-dir/x.jsonl"}), 64, "--out");
  EXPECT_FALSE(std::filesystem::exists(token_.dir() / "no-such-dir"));
}

// Retention: `audit prune --before T` removes the oldest segments whose
// records are all older than T and signed by a checkpoint, writes first the
// record that lets `audit verify` accept the shorter log, and refuses to
// prune a log that does not verify.
TEST_F(AuditCliTest, PruneRemovesSignedSegmentsOlderThanBeforeAndTheRestStillVerifies) {
  ASSERT_NO_FATAL_FAILURE(OneSegmentPerBatch());
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/a"}, "value-a").exit_code, 0);
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/b"}, "value-b").exit_code, 0);
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  const std::vector<core::AuditRecord> before_prune = TrailRecords(token_.config_path());
  uint64_t checkpoint_seq = 0;
  for (const auto& r : before_prune) {
    if (r.type == "checkpoint") checkpoint_seq = r.seq;
  }
  ASSERT_GT(checkpoint_seq, 3u);
  // Everything so far is older than the cut-off; what comes after is not.
  const std::string cutoff = CutOff();
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/c"}, "value-c").exit_code, 0);
  auto segments = [&] {
    size_t n = 0;
    for (const auto& e : std::filesystem::directory_iterator(AuditDir())) {
      n += e.path().filename().string().rfind("audit-", 0) == 0;
    }
    return n;
  };
  const size_t segments_before = segments();

  // What a dry run says, and that it removes nothing. The checkpoint record
  // signs the records before it, so the prune stops there.
  const std::string span = "seq 1 to " + std::to_string(checkpoint_seq - 1);
  auto dry = Cli({"audit", "prune", "--before", cutoff, "--dry-run"});
  ASSERT_EQ(dry.exit_code, 0) << dry.err;
  EXPECT_NE(dry.out.find("would prune " + span + " ("), std::string::npos) << dry.out;
  EXPECT_NE(dry.out.find("the checkpoints sign only up to seq " + std::to_string(checkpoint_seq - 1)),
            std::string::npos)
      << dry.out;
  EXPECT_TRUE(std::filesystem::exists(AuditDir() + "/audit-000001.jsonl"));
  EXPECT_EQ(segments(), segments_before + 1);  // the dry run's own record
  auto dry_json = Cli({"--json", "audit", "prune", "--before", cutoff, "--dry-run"});
  ASSERT_EQ(dry_json.exit_code, 0) << dry_json.err;
  const auto j = nlohmann::json::parse(dry_json.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << dry_json.out;
  EXPECT_EQ(j.value("pruned", true), false);
  EXPECT_EQ(j.value("first_seq", 0u), 1u);
  EXPECT_EQ(j.value("last_seq", 0u), checkpoint_seq - 1);
  EXPECT_EQ(j.value("starts_at_seq", 0u), checkpoint_seq);
  ASSERT_TRUE(j.contains("segments") && j["segments"].is_array());
  EXPECT_EQ(j["segments"].front(), "audit-000001.jsonl");

  auto pruned = Cli({"audit", "prune", "--before", cutoff});
  ASSERT_EQ(pruned.exit_code, 0) << pruned.err;
  EXPECT_NE(pruned.out.find("pruned " + span + " ("), std::string::npos) << pruned.out;
  EXPECT_NE(pruned.out.find("the log now starts at seq " + std::to_string(checkpoint_seq)), std::string::npos)
      << pruned.out;
  EXPECT_FALSE(std::filesystem::exists(AuditDir() + "/audit-000001.jsonl"));
  const std::vector<core::AuditRecord> after = TrailRecords(token_.config_path());
  ASSERT_FALSE(after.empty());
  EXPECT_EQ(after.front().seq, checkpoint_seq);
  // The prune's own record: who, and where the log starts.
  const core::AuditRecord* prune_record = nullptr;
  for (const auto& r : after) {
    if (r.event.action == "audit.prune" && r.event.detail.find("dry run") == std::string::npos) prune_record = &r;
  }
  ASSERT_NE(prune_record, nullptr);
  EXPECT_EQ(prune_record->event.principal, "user:root");
  EXPECT_EQ(prune_record->event.result, core::AuditResult::kOk);
  EXPECT_NE(prune_record->event.detail.find("the log now starts at seq " + std::to_string(checkpoint_seq) +
                                            " after hash " + before_prune[checkpoint_seq - 2].hash),
            std::string::npos)
      << prune_record->event.detail;

  auto verify = Cli({"audit", "verify"});
  ASSERT_EQ(verify.exit_code, 0) << verify.err;
  EXPECT_NE(verify.out.find("audit log intact"), std::string::npos) << verify.out;
  EXPECT_NE(verify.out.find("starts at seq " + std::to_string(checkpoint_seq) +
                            ": the records before it were pruned (the audit.prune record at seq " +
                            std::to_string(prune_record->seq) + " says so)"),
            std::string::npos)
      << verify.out;
  // The statement was signed before anything went: a checkpoint follows it.
  EXPECT_EQ(after.back().type, "checkpoint");
  EXPECT_EQ(after.back().covers_seq, prune_record->seq);
  // The values were never in the log: all three are still there.
  EXPECT_EQ(Cli({"secret", "get", "payments/dev/a"}).out, "value-a");
  // An export of the pruned log verifies offline, the statement inside it.
  const std::string out = token_.dir() / "export.jsonl", pem = token_.dir() / "audit.pem";
  ASSERT_EQ(Cli({"audit", "pubkey", "--out", pem}).exit_code, 0);
  ASSERT_EQ(Cli({"audit", "export", "--out", out}).exit_code, 0);
  auto offline = RunCustody({"audit", "verify", out, "--pubkey", pem}, {});
  EXPECT_EQ(offline.exit_code, 0) << offline.out << offline.err;

  // Again: the checkpoint segment is now signed (by the prune's own
  // checkpoint) and goes; then the put made after the cut-off stops it.
  auto again = Cli({"audit", "prune", "--before", cutoff});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  const std::string next = std::to_string(checkpoint_seq);
  EXPECT_NE(again.out.find("pruned seq " + next + " to " + next + " (1 segment, "), std::string::npos) << again.out;
  auto third = Cli({"audit", "prune", "--before", cutoff});
  ASSERT_EQ(third.exit_code, 0) << third.err;
  EXPECT_NE(third.out.find("nothing to prune: audit-"), std::string::npos) << third.out;
  EXPECT_NE(third.out.find(".jsonl has records from 20"), std::string::npos) << third.out;
  EXPECT_EQ(Cli({"audit", "verify"}).exit_code, 0);
  EXPECT_EQ(Cli({"secret", "get", "payments/dev/c"}).out, "value-c");

  // Refused, naming the argument.
  ExpectOneLine(Cli({"audit", "prune"}), 64, "--before");
  ExpectOneLine(Cli({"audit", "prune", "--before", "2099-01-01"}), 64, "--before '2099-01-01' is in the future");
  ExpectOneLine(Cli({"audit", "prune", "--before", "yesterday"}), 64, "--before 'yesterday' is not a date");
  ExpectOneLine(Cli({"audit", "prune", "--before", "999999999999999d"}), 64, "--before '999999999999999d' is not a date");
  ExpectOneLine(Cli({"audit", "prune", "--before", "2026-01-01\xff"}), 64, "--before");
  ExpectOneLine(Cli({"audit", "prune", "--before", std::string(100000, '9') + "d"}), 64, "--before");
  // A segment removed by hand is a deletion: verify says so, and prune
  // will not remove more of a log that does not verify.
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(AuditDir())) {
    if (e.path().filename().string().rfind("audit-", 0) == 0) names.push_back(e.path().string());
  }
  std::sort(names.begin(), names.end());
  ASSERT_GE(names.size(), 3u);
  const uint64_t first_kept = TrailRecords(token_.config_path()).front().seq;
  std::filesystem::remove(names.front());
  ExpectOneLine(Cli({"audit", "verify"}), 65, "deleted: seq 1 to " + std::to_string(first_kept));
  ExpectOneLine(Cli({"audit", "prune", "--before", "1m"}), 65, "the audit log is NOT intact");
  for (size_t i = 1; i < names.size(); ++i) EXPECT_TRUE(std::filesystem::exists(names[i])) << names[i];
}

// A prune whose removal fails after its statement is in the log: exit 69
// naming the failure, a second record saying it did not finish (same
// request id), nothing removed, and the log still verifies; the next run
// finishes the job.
TEST_F(AuditCliTest, APruneThatCannotRemoveASegmentSaysSoInTheLogAndTheNextRunFinishes) {
  ASSERT_NO_FATAL_FAILURE(OneSegmentPerBatch());
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/a"}, "value-a").exit_code, 0);
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  const std::string cutoff = CutOff();
  std::string asan = std::getenv("ASAN_OPTIONS") ? std::getenv("ASAN_OPTIONS") : "";
  auto failed = Cli({"audit", "prune", "--before", cutoff}, "",
                    {.env = {{"LD_PRELOAD", FAIL_UNLINK},
                             {"CUSTODY_TEST_FAIL_UNLINK", "audit-000001.jsonl"},
                             {"ASAN_OPTIONS", asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"}}});
  ExpectOneLine(failed, 69, "audit-000001.jsonl");
  EXPECT_TRUE(std::filesystem::exists(AuditDir() + "/audit-000001.jsonl"));
  const std::vector<core::AuditRecord> records = TrailRecords(token_.config_path());
  const core::AuditRecord* said = nullptr;
  const core::AuditRecord* undone = nullptr;
  for (const auto& r : records) {
    if (r.event.action != "audit.prune") continue;
    if (r.event.result == core::AuditResult::kOk) said = &r;
    if (r.event.result == core::AuditResult::kError) undone = &r;
  }
  ASSERT_NE(said, nullptr);
  ASSERT_NE(undone, nullptr) << "the log claims a prune that did not happen";
  EXPECT_GT(undone->seq, said->seq);
  EXPECT_EQ(undone->event.request_id, said->event.request_id);
  EXPECT_NE(undone->event.detail.find("did not finish"), std::string::npos) << undone->event.detail;
  EXPECT_NE(undone->event.error.find("audit-000001.jsonl"), std::string::npos) << undone->event.error;
  EXPECT_EQ(Cli({"audit", "verify"}).exit_code, 0);
  // Without the fault, the next run removes what the first meant to.
  auto again = Cli({"audit", "prune", "--before", cutoff});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.out.find("pruned seq 1 to "), std::string::npos) << again.out;
  EXPECT_FALSE(std::filesystem::exists(AuditDir() + "/audit-000001.jsonl"));
  auto verify = Cli({"audit", "verify"});
  EXPECT_EQ(verify.exit_code, 0) << verify.err;
  EXPECT_NE(verify.out.find("the records before it were pruned"), std::string::npos) << verify.out;
}

// The audit trail in PostgreSQL, always (also in the first run): each
// node's chain in the database, verified from any host; tampering with a
// row (modified, deleted, inserted, reordered, cut off, moved from another
// node's chain) is found as in the file log, naming the node and the
// record.
class PostgresAuditCliTest : public CliFixture {
 protected:
  void SetUp() override {
    pg_ = PgServer::Shared();
    CUSTODY_REQUIRE_PG(pg_);
    url_ = pg_->NewDatabase();
    db_ = PgServer::DatabaseOf(url_);
    ASSERT_FALSE(db_.empty()) << url_;
    auto r = RunCli(token_.CliEnv(), {"init", "--module", SoftHsmToken::kModule, "--token", token_.uri(), "--pin-file",
                                      token_.pin_file(), "--state-dir", token_.dir() / "state", "--store", url_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    WriteFile(token_.dir() / "policy.toml", kPolicy);
    ASSERT_EQ(Cli({"policy", "apply", token_.dir() / "policy.toml"}).exit_code, 0);
    // A second node's config: the same store, its own name.
    const std::string text = ReadFile(token_.config_path());
    WriteFile(NodeB(), text + "\n[node]\nname = \"node-b\"\n");
  }
  std::string NodeB() const { return token_.dir() / "node-b.toml"; }
  RunResult AsNodeB(const std::vector<std::string>& args, const std::string& in = "") {
    return RunCli({{"CUSTODY_CONFIG", NodeB()}, {"SOFTHSM2_CONF", token_.conf()}}, args, in);
  }
  std::string Sql(const std::string& sql) { return pg_->Sql(db_, sql); }

  PgServer* pg_ = nullptr;
  std::string url_, db_;
};

TEST_F(PostgresAuditCliTest, EveryNodesChainVerifiesAndTamperingWithAnyRowIsFound) {
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(Cli({"secret", "put", "payments/dev/k" + std::to_string(i)}, kSecret).exit_code, 0);
    auto got = AsNodeB({"secret", "get", "payments/dev/k" + std::to_string(i)});
    ASSERT_EQ(got.exit_code, 0) << got.err;
  }
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  ASSERT_EQ(AsNodeB({"audit", "checkpoint"}).exit_code, 0);
  ASSERT_EQ(AsNodeB({"secret", "list"}).exit_code, 0);
  EXPECT_EQ(std::filesystem::exists(token_.dir() / "state/audit"), false) << "no audit files with the store";
  auto ok = AsNodeB({"audit", "verify"});
  ASSERT_EQ(ok.exit_code, 0) << ok.out << ok.err;
  EXPECT_NE(ok.out.find("audit trail intact: 2 node chains"), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find("  node node-b: "), std::string::npos) << ok.out;
  const std::string a = Sql("SELECT node FROM audit_heads WHERE node <> 'node-b'");
  const std::string node_a = a.substr(0, a.find_first_of("\n "));
  ASSERT_FALSE(node_a.empty());
  Sql("CREATE TABLE saved AS SELECT * FROM audit_records; CREATE TABLE saved_heads AS SELECT * FROM audit_heads");
  auto restore = [&] {
    Sql("DELETE FROM audit_records; INSERT INTO audit_records SELECT * FROM saved; "
        "DELETE FROM audit_heads; INSERT INTO audit_heads SELECT * FROM saved_heads");
  };
  struct Case {
    const char* what;
    std::string sql;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"modified", "UPDATE audit_records SET line = replace(line, 'secret.get', 'secret.GET') WHERE node = 'node-b' AND seq = 1",
       "node node-b: record at node node-b row 1: modified"},
      {"deleted", "DELETE FROM audit_records WHERE node = 'node-b' AND seq = 3", "node node-b: record seq 4 (node node-b row 4): deleted: seq 3"},
      {"inserted", "INSERT INTO audit_records SELECT node, 100, line FROM saved WHERE node = 'node-b' AND seq = 2",
       "inserted: a second copy of seq 2"},
      {"reordered",
       "UPDATE audit_records r SET line = s.line FROM saved s WHERE r.node = 'node-b' AND s.node = 'node-b' AND "
       "((r.seq = 2 AND s.seq = 3) OR (r.seq = 3 AND s.seq = 2))",
       "reordered"},
      {"cut off", "DELETE FROM audit_records WHERE node = 'node-b' AND seq > 4",
       "node node-b: truncated: the log ends at seq 4 but the head row of node node-b points at seq"},
      {"moved", "UPDATE audit_records r SET line = s.line FROM saved s WHERE r.node = 'node-b' AND r.seq = 2 AND "
                "s.node = '" + node_a + "' AND s.seq = 2",
       "node node-b: record seq 2 (node node-b row 2): moved: the record names node '" + node_a + "'"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    Sql(c.sql);
    auto bad = Cli({"audit", "verify"});
    EXPECT_EQ(bad.exit_code, 65) << bad.out << bad.err;
    EXPECT_NE(bad.err.find("audit trail is NOT intact: "), std::string::npos) << bad.err;
    EXPECT_NE(bad.err.find(c.says), std::string::npos) << bad.err;
    EXPECT_EQ(bad.err.find("node " + node_a + ":"), std::string::npos) << "only node-b's chain is bad: " << bad.err;
    restore();
    auto again = Cli({"audit", "verify"});
    EXPECT_EQ(again.exit_code, 0) << again.out << again.err;
  }
  // What a SIEM gets: one node's chain, which verifies offline as a file.
  const std::string pem = token_.dir() / "audit.pem", out = token_.dir() / "node-b.jsonl";
  ASSERT_EQ(Cli({"audit", "pubkey", "--out", pem}).exit_code, 0);
  auto e = Cli({"audit", "export", "--node", "node-b", "--out", out});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  auto offline = RunCustody({"audit", "verify", out, "--pubkey", pem}, {});
  EXPECT_EQ(offline.exit_code, 0) << offline.out << offline.err;
  auto shown = Cli({"audit", "show", "--action", "secret.get"});
  EXPECT_EQ(shown.exit_code, 0) << shown.err;
  EXPECT_NE(shown.out.find("NODE"), std::string::npos) << shown.out;
  EXPECT_NE(shown.out.find("node-b"), std::string::npos) << shown.out;
}

// Retention with the trail in PostgreSQL: a node prunes its own chain (the
// prune's record goes into the chain it shortens), row by row up to the
// cut-off; the other node's chain is untouched and both still verify.
TEST_F(PostgresAuditCliTest, APruneRemovesThisNodesOldRowsOnlyAndEveryChainStillVerifies) {
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(Cli({"secret", "put", "payments/dev/k" + std::to_string(i)}, kSecret).exit_code, 0);
    ASSERT_EQ(AsNodeB({"secret", "get", "payments/dev/k" + std::to_string(i)}).exit_code, 0);
  }
  ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
  ASSERT_EQ(AsNodeB({"audit", "checkpoint"}).exit_code, 0);
  const std::string a = Sql("SELECT node FROM audit_heads WHERE node <> 'node-b'");
  const std::string node_a = a.substr(0, a.find_first_of("\n "));
  ASSERT_FALSE(node_a.empty());
  const std::string b_rows = Sql("SELECT count(*) FROM audit_records WHERE node = 'node-b'");
  const std::string cutoff = CutOff();
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/later"}, "v").exit_code, 0);
  // Node a's checkpoint record is the last one signed-over; it and what
  // follows stay.
  const std::string ckpt = Sql("SELECT max(seq) FROM audit_records WHERE node = '" + node_a +
                               "' AND line LIKE '%\"type\":\"checkpoint\"%'");
  const uint64_t checkpoint_seq = std::stoull(ckpt);
  ASSERT_GT(checkpoint_seq, 2u);

  auto pruned = Cli({"audit", "prune", "--before", cutoff});
  ASSERT_EQ(pruned.exit_code, 0) << pruned.err;
  EXPECT_NE(pruned.out.find("pruned seq 1 to " + std::to_string(checkpoint_seq - 1) + " (node " + node_a + ", "),
            std::string::npos)
      << pruned.out;
  EXPECT_EQ(std::stoull(Sql("SELECT min(seq) FROM audit_records WHERE node = '" + node_a + "'")), checkpoint_seq);
  EXPECT_EQ(Sql("SELECT count(*) FROM audit_records WHERE node = 'node-b'"), b_rows) << "node-b's chain is its own";
  auto verify = AsNodeB({"audit", "verify"});
  ASSERT_EQ(verify.exit_code, 0) << verify.out << verify.err;
  EXPECT_NE(verify.out.find("audit trail intact: 2 node chains"), std::string::npos) << verify.out;
  EXPECT_NE(verify.out.find("    starts at seq " + std::to_string(checkpoint_seq) + ": the records before it were pruned"),
            std::string::npos)
      << verify.out;
  // Rows deleted past what the statement says are a deletion.
  Sql("DELETE FROM audit_records WHERE node = '" + node_a + "' AND seq = " + std::to_string(checkpoint_seq));
  auto bad = Cli({"audit", "verify"});
  EXPECT_EQ(bad.exit_code, 65) << bad.out;
  EXPECT_NE(bad.err.find("node " + node_a + ": record seq " + std::to_string(checkpoint_seq + 1)), std::string::npos)
      << bad.err;
  EXPECT_NE(bad.err.find("deleted: seq 1 to " + std::to_string(checkpoint_seq) + " missing"), std::string::npos)
      << bad.err;
}

}  // namespace
}  // namespace custody::test
