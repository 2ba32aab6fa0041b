// Token faults in direct CLI mode: the module is a forwarding shim over
// SoftHSM2 (tests/support/faulty_pkcs11.cc) that answers one PKCS#11
// function with an error a real token gives (a stale session, a lost login,
// a stale object handle, a device error) while a command runs. Each command
// must stop with one clear line on stderr and the documented exit code, and
// leave nothing half-written: the store and the audit log still verify,
// every value still reads, and the same command without the fault succeeds.
// Exit codes (README, "Exit codes"; hsm/src/rv.cc maps each return value):
// a stale session, a lost login (CKR_USER_NOT_LOGGED_IN: custody always
// logs in, so the token lost it) or a stale object handle is 69
// (unavailable).
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "../support/cli_fixture.h"

namespace custody::test {
namespace {

using nlohmann::json;

constexpr const char* kPolicy = R"(version = 1
admins = ["user:root"]

[principals."user:root"]
uid = 0

[projects.payments.environments.prod]
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
)";

class FaultCliTest : public CliFixture {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(InitWithPolicy(token_, kPolicy));
    ASSERT_NO_FATAL_FAILURE(Put("payments/prod/a", "value-a"));
    ASSERT_EQ(Cli({"audit", "checkpoint"}).exit_code, 0);
    // From here on, through the fault module.
    std::string cfg = ReadFile(token_.config_path());
    const std::string from = std::string("'") + SoftHsmToken::kModule + "'";  // as `custody init` wrote it
    const size_t at = cfg.find(from);
    ASSERT_NE(at, std::string::npos) << cfg;
    WriteFile(token_.config_path(), cfg.replace(at, from.size(), std::string("'") + FAULTY_PKCS11 + "'"));
    cli_env_["CUSTODY_FAULT_CONTROL"] = control_;
    cli_env_["CUSTODY_FAULT_CALLS"] = calls_;
  }

  // Runs `args` while the module answers `fn` with `rv`, then heals it.
  // Fails the test unless the fault reached the token at least once.
  RunResult Faulted(const std::string& rv, const std::string& fn, const std::vector<std::string>& args,
                    const std::string& in = "") {
    WriteFile(control_, "fail " + rv + " " + fn);
    std::filesystem::remove(calls_);
    auto r = Cli(args, in);
    ::unlink(control_.c_str());
    EXPECT_NE(ReadFile(calls_).find(fn + " " + rv), std::string::npos)
        << "the fault never reached the token: " << fn << " did not answer " << rv << "; calls:\n"
        << ReadFile(calls_);
    return r;
  }

  // Nothing half-written: the store file passes SQLite's integrity check,
  // the audit log verifies, the project has one active KEK that seals all
  // `versions` stored versions, and every value reads back.
  void ExpectIntact(size_t versions, const std::vector<std::pair<std::string, std::string>>& values) {
    // (On the PostgreSQL run the database keeps its own integrity; the
    // checks below hold for both stores.)
    if (!TestOnPostgres()) {
      sqlite3* raw = nullptr;
      ASSERT_EQ(sqlite3_open_v2(token_.store_path().c_str(), &raw, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
      std::unique_ptr<sqlite3, int (*)(sqlite3*)> db(raw, &sqlite3_close);
      std::string check;
      sqlite3_exec(
          db.get(), "PRAGMA integrity_check",
          [](void* out, int, char** v, char**) {
            *static_cast<std::string*>(out) += v[0] ? v[0] : "";
            return 0;
          },
          &check, nullptr);
      EXPECT_EQ(check, "ok");
    }
    auto audit = Cli({"audit", "verify"});
    EXPECT_EQ(audit.exit_code, 0) << audit.out << audit.err;
    auto keks = Cli({"--json", "kek", "list", "payments"});
    ASSERT_EQ(keks.exit_code, 0) << keks.err;
    int active = 0;
    for (const auto& k : json::parse(keks.out)) {
      if (k["state"] == "active") {
        ++active;
        EXPECT_EQ(k["sealed_versions"], versions) << keks.out;
      }
    }
    EXPECT_EQ(active, 1) << keks.out;
    for (const auto& [path, value] : values) {
      auto g = Cli({"secret", "get", path});
      EXPECT_EQ(g.exit_code, 0) << path << ": " << g.err;
      EXPECT_EQ(g.out, value) << path;
    }
  }

  size_t Versions(const std::string& path) {
    auto r = Cli({"--json", "secret", "versions", path});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0 ? json::parse(r.out).size() : 0;
  }

  std::string control_ = token_.dir() / "fault";
  std::string calls_ = token_.dir() / "pkcs11-calls";
};

// put: a stale session while sealing, a stale handle while finding the KEK.
TEST_F(FaultCliTest, PutStopsCleanly) {
  ExpectOneLine(Faulted("CKR_SESSION_HANDLE_INVALID", "C_EncryptInit", {"secret", "put", "payments/prod/a"}, "new"),
                69, "CKR_SESSION_HANDLE_INVALID");
  ExpectOneLine(Faulted("CKR_OBJECT_HANDLE_INVALID", "C_FindObjects", {"secret", "put", "payments/prod/b"}, "b"), 69,
                "CKR_OBJECT_HANDLE_INVALID");
  EXPECT_EQ(Versions("payments/prod/a"), 1u) << "no version was added";
  ExpectIntact(1, {{"payments/prod/a", "value-a"}});
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/a"}, "new").exit_code, 0);
  ExpectIntact(2, {{"payments/prod/a", "new"}});
}

// get: a lost login, a stale session while unsealing.
TEST_F(FaultCliTest, GetStopsCleanly) {
  auto lost = Faulted("CKR_USER_NOT_LOGGED_IN", "C_DecryptInit", {"secret", "get", "payments/prod/a"});
  EXPECT_EQ(lost.out, "") << "no value";
  ExpectOneLine(lost, 69, "C_DecryptInit failed: CKR_USER_NOT_LOGGED_IN");
  auto stale = Faulted("CKR_SESSION_HANDLE_INVALID", "C_Decrypt", {"secret", "get", "payments/prod/a"});
  EXPECT_EQ(stale.out, "");
  ExpectOneLine(stale, 69, "CKR_SESSION_HANDLE_INVALID");
  ExpectIntact(1, {{"payments/prod/a", "value-a"}});
}

// rotate: the token's RNG on a stale session; a stale handle while sealing.
TEST_F(FaultCliTest, RotateStopsCleanly) {
  ExpectOneLine(Faulted("CKR_SESSION_HANDLE_INVALID", "C_GenerateRandom",
                        {"secret", "rotate", "payments/prod/a", "--generate", "32"}),
                69, "CKR_SESSION_HANDLE_INVALID");
  ExpectOneLine(Faulted("CKR_OBJECT_HANDLE_INVALID", "C_EncryptInit", {"secret", "rotate", "payments/prod/a"}, "two"),
                69, "CKR_OBJECT_HANDLE_INVALID");
  EXPECT_EQ(Versions("payments/prod/a"), 1u) << "no version was added";
  ExpectIntact(1, {{"payments/prod/a", "value-a"}});
  ASSERT_EQ(Cli({"secret", "rotate", "payments/prod/a"}, "two").exit_code, 0);
  ExpectIntact(2, {{"payments/prod/a", "two"}});
}

// kek rotate: the new key cannot be made; the old one cannot be destroyed
// (the rotation stops in "destroying" and the next run finishes it).
TEST_F(FaultCliTest, KekRotateStopsCleanlyAndTheNextRunFinishes) {
  ExpectOneLine(Faulted("CKR_SESSION_HANDLE_INVALID", "C_GenerateKey", {"kek", "rotate", "payments"}), 69,
                "CKR_SESSION_HANDLE_INVALID");
  auto keks = json::parse(Cli({"--json", "kek", "list", "payments"}).out);
  EXPECT_EQ(keks.size(), 1u) << "no KEK recorded: " << keks.dump();
  ExpectIntact(1, {{"payments/prod/a", "value-a"}});

  // Its progress lines come first; the refusal is the one last line.
  auto stopped = Faulted("CKR_OBJECT_HANDLE_INVALID", "C_DestroyObject", {"kek", "rotate", "payments"});
  EXPECT_EQ(stopped.exit_code, 69) << stopped.err;
  std::vector<std::string> lines;
  std::istringstream err(stopped.err);
  for (std::string l; std::getline(err, l);) lines.push_back(l);
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines.back().rfind("custody: KEK rotation of payments stopped; run it again to finish: destroying "
                               "custody:kek:payments:v1: C_DestroyObject failed: CKR_OBJECT_HANDLE_INVALID",
                               0),
            0u)
      << stopped.err;
  for (size_t i = 0; i + 1 < lines.size(); ++i) {
    EXPECT_EQ(lines[i].find("failed"), std::string::npos) << "only the last line is the refusal: " << stopped.err;
  }
  keks = json::parse(Cli({"--json", "kek", "list", "payments"}).out);
  ASSERT_EQ(keks.size(), 2u) << keks.dump();
  ExpectIntact(1, {{"payments/prod/a", "value-a"}});

  auto again = Cli({"kek", "rotate", "payments"});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.out.find("finished the KEK rotation of payments"), std::string::npos) << again.out;
  keks = json::parse(Cli({"--json", "kek", "list", "payments"}).out);
  ASSERT_EQ(keks.size(), 2u) << keks.dump();
  EXPECT_EQ(keks[0]["state"], "destroyed") << keks.dump();
  ExpectIntact(1, {{"payments/prod/a", "value-a"}});
  // And the token holds the new KEK only: the old one was really destroyed.
  auto info = Cli({"--json", "token", "info"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  std::vector<std::string> kek_objects;
  const json listed = json::parse(info.out);
  for (const auto& ob : listed["objects"]) {
    const std::string label = ob.value("label", "");
    if (label.rfind("custody:kek:payments:", 0) == 0) kek_objects.push_back(label);
  }
  EXPECT_EQ(kek_objects, std::vector<std::string>{"custody:kek:payments:v2"}) << info.out;
}

// token info: the object search on a stale session, a lost login.
TEST_F(FaultCliTest, TokenInfoStopsCleanly) {
  ExpectOneLine(Faulted("CKR_SESSION_HANDLE_INVALID", "C_FindObjects", {"token", "info"}), 69,
                "CKR_SESSION_HANDLE_INVALID");
  ExpectOneLine(Faulted("CKR_USER_NOT_LOGGED_IN", "C_FindObjectsInit", {"token", "info"}), 69,
                "C_FindObjectsInit failed: CKR_USER_NOT_LOGGED_IN");
  ExpectIntact(1, {{"payments/prod/a", "value-a"}});
  EXPECT_EQ(Cli({"token", "info"}).exit_code, 0);
}

// attest: the key's attributes cannot be read; the signature on a lost login.
TEST_F(FaultCliTest, AttestStopsCleanly) {
  const std::string out = token_.dir() / "statement.json";
  ExpectOneLine(Faulted("CKR_OBJECT_HANDLE_INVALID", "C_GetAttributeValue", {"attest", "--out", out}), 69,
                "CKR_OBJECT_HANDLE_INVALID");
  auto nothing_written = [&] {
    for (const char* suffix : {"", ".bin", ".sig"}) {
      EXPECT_FALSE(std::filesystem::exists(out + suffix)) << out + suffix << " written by a failed attest";
    }
  };
  nothing_written();
  ExpectOneLine(Faulted("CKR_USER_NOT_LOGGED_IN", "C_Sign", {"attest", "--out", out}), 69,
                "C_Sign(CKM_ECDSA) failed: CKR_USER_NOT_LOGGED_IN");
  nothing_written();
  ExpectIntact(1, {{"payments/prod/a", "value-a"}});
  auto ok = Cli({"attest", "--out", out});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_TRUE(std::filesystem::exists(out));
}

}  // namespace
}  // namespace custody::test
