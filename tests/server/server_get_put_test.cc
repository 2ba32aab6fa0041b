// custodyd serving gets and puts for real (tests/support/server_fixture.h):
// who may read what over the socket, values of every shape, the same answers
// as in direct mode and from custody-full, and many clients at once, on a
// SoftHSM2 token and on a TPM.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>
#include <vector>

#include "../support/server_fixture.h"
#include "custody/client/client.h"
#include "custody/common/base64.h"

namespace custody::test {
namespace {

TEST_F(ServerTest, AnAllowedPrincipalGetsItsSecretAndTheCallIsAudited) {
  size_t before = AuditCount("secret.get");
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c.ok());
  auto f = c->Get("payments/prod/stripe");
  ASSERT_TRUE(f.ok()) << f.error().message();
  EXPECT_EQ(f->value.RevealString(SecretAccess{}), kSecret);
  EXPECT_EQ(f->version, 1u);
  EXPECT_EQ(AuditCount("secret.get"), before + 1);
  auto show = Cli({"--json", "audit", "show", "--action", "secret.get"});
  EXPECT_NE(show.out.find("via unix socket"), std::string::npos) << show.out;
}

TEST_F(ServerTest, AnotherUidGets403AndAnAuditRecord) {
  auto r = AsUser(65534, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(r.exit_code, 77) << r.err;
  EXPECT_NE(r.err.find("user:nobody has no grant in project payments"), std::string::npos) << r.err;
  EXPECT_EQ(r.out, "");
  auto ok = AsUser(65534, {"secret", "get", "billing/prod/invoice-key"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(ok.out, "billing-value");
  auto show = Cli({"--json", "audit", "show", "--principal", "user:nobody"});
  EXPECT_NE(show.out.find("\"decision\": \"deny\""), std::string::npos) << show.out;
  EXPECT_NE(show.out.find("uid 65534 (nobody)"), std::string::npos) << show.out;
  auto raw = Raw(socket_, "GET /v1/secrets/payments/prod/stripe HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(raw.find("200 OK"), std::string::npos) << "root may";
  auto status = CurlAs(65534, "/v1/secrets/payments/prod/stripe");
  EXPECT_NE(status.find("HTTP/1.1 403 Forbidden"), std::string::npos) << status;
  EXPECT_EQ(status.find(kSecret), std::string::npos);
}

TEST_F(ServerTest, AnUnknownUidGets401) {
  auto r = AsUser(12345, {"secret", "get", "billing/prod/invoice-key"});
  EXPECT_EQ(r.exit_code, 77) << r.err;
  EXPECT_NE(r.err.find("uid 12345 is not a principal in the policy"), std::string::npos) << r.err;
  // The CLI says 77 for both 401 and 403; the status itself tells them apart.
  auto status = CurlAs(12345, "/v1/secrets/billing/prod/invoice-key");
  EXPECT_NE(status.find("HTTP/1.1 401 Unauthorized"), std::string::npos) << status;
  EXPECT_EQ(status.find("billing-value"), std::string::npos);
}

// Bytes that are not well-formed UTF-8 (an overlong form, a surrogate, a
// lead byte past U+10FFFF) go out as base64 and come back as they went in.
// A looser check once sent them as a JSON string, and the JSON writer threw:
// one stored value stopped the server at its next GET.
TEST_F(ServerTest, AValueThatIsNotWellFormedUtf8ComesBackAsBase64AndTheServerStaysUp) {
  const std::vector<std::string> values{std::string("\xC0\x80", 2), "ok\xED\xA0\x80", "\xF5\x80\x80\x80",
                                        "tab\tand\x7f", std::string("nul\0inside", 10)};
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c.ok());
  for (size_t i = 0; i < values.size(); ++i) {
    std::string path = "payments/prod/odd-" + std::to_string(i);
    RunOptions o;
    o.stdin_data = "{\"value_base64\": \"" + Base64Encode(std::string_view(values[i])) + "\"}";
    auto put = RunProgram("/usr/bin/curl",
                          {"-s", "-X", "PUT", "--unix-socket", socket_, "--data-binary", "@-", "http://custody/v1/secrets/" + path},
                          o);
    ASSERT_NE(put.out.find("\"version\""), std::string::npos) << put.out << put.err;
    auto raw = Raw(socket_, "GET /v1/secrets/" + path + " HTTP/1.1\r\nHost: x\r\n\r\n");
    ASSERT_NE(raw.find("200 OK"), std::string::npos) << raw;
    bool text = i == 3;  // a tab and DEL are text; the others are not UTF-8 or hold a NUL
    EXPECT_NE(raw.find(text ? "\"value\":" : "\"value_base64\":"), std::string::npos) << raw;
    auto f = c->Get(path);
    ASSERT_TRUE(f.ok()) << f.error().message();
    EXPECT_EQ(f->value.RevealString(SecretAccess{}), values[i]);
  }
  auto ok = Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(ok.find("200 OK"), std::string::npos) << ok;
}

// `custody` is a lean front that serves `secret get` and `exec` through the
// server itself and hands everything else to custody-full. A user must not
// be able to tell which one answered: same output, same line on stderr,
// same exit code, for successes and for each kind of refusal.
TEST_F(ServerTest, TheLeanFrontAnswersExactlyAsTheFullTool) {
  struct Case {
    std::vector<std::string> args;
    std::optional<int> uid;
    int want;
  };
  const std::vector<Case> cases = {
      {{"secret", "get", "payments/prod/stripe"}, std::nullopt, 0},
      {{"--json", "secret", "get", "--version=1", "payments/prod/stripe"}, std::nullopt, 0},
      {{"secret", "get", "payments/prod/missing"}, std::nullopt, 66},
      {{"secret", "get", "payments/prod/stripe", "--version", "99"}, std::nullopt, 66},
      {{"secret", "get", "payments/prod/stripe", "--version", "0"}, std::nullopt, 64},
      {{"secret", "get", "Payments!/prod/stripe"}, std::nullopt, 64},
      {{"secret", "get", "payments/prod/stripe"}, 65534, 77},
      {{"exec", "--env", "K=payments/prod/stripe", "--", "/bin/sh", "-c", "printf %s \"$K\""}, std::nullopt, 0},
      {{"exec", "--env=K=payments/prod/stripe", "--", "/bin/sh", "-c", "printf %s \"$K\""}, std::nullopt, 0},
      {{"exec", "--env", "K=payments/prod/stripe", "/bin/true"}, std::nullopt, 64},
      {{"exec", "--env", "K=payments/prod/missing", "--", "/bin/true"}, std::nullopt, 66},
      {{"exec", "--env", "K=payments/prod/stripe", "--", "/bin/true"}, 65534, 77},
      {{"exec", "--env", "1K=payments/prod/stripe", "--", "/bin/true"}, std::nullopt, 64},
  };
  auto run = [&](const char* binary, const Case& c) { return ClientAs(binary, c.uid, c.args); };
  for (const auto& c : cases) {
    std::string line;
    for (const auto& a : c.args) line += a + " ";
    auto front = run(CUSTODY_BIN, c);
    auto full = run(CUSTODY_FULL_BIN, c);
    EXPECT_EQ(front.exit_code, c.want) << line << front.err;
    EXPECT_EQ(front.exit_code, full.exit_code) << line;
    EXPECT_EQ(front.out, full.out) << line;
    EXPECT_EQ(front.err, full.err) << line;
    if (c.want == 0) {
      EXPECT_EQ(front.out, kSecret) << line;
    }
  }
  // --out writes the same 0600 file and says so in the same words.
  auto front = run(CUSTODY_BIN, {{"secret", "get", "payments/prod/stripe", "--out", run_ / "a"}, std::nullopt, 0});
  auto full = run(CUSTODY_FULL_BIN, {{"secret", "get", "payments/prod/stripe", "--out", run_ / "b"}, std::nullopt, 0});
  ASSERT_EQ(front.exit_code, 0) << front.err;
  ASSERT_EQ(full.exit_code, 0) << full.err;
  EXPECT_EQ(ReadFile(run_ / "a"), kSecret);
  EXPECT_EQ(ReadFile(run_ / "b"), kSecret);
  struct stat st {};
  ASSERT_EQ(::stat((run_ / "a").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(front.err.substr(0, front.err.rfind(' ')), full.err.substr(0, full.err.rfind(' ')));
}

// A tampered blob is refused the same way through the server as in direct
// mode: exit 65, no value. The server answers 500 with category
// "integrity", which the client maps back.
TEST_F(ServerTest, ATamperedBlobExits65AsInDirectMode) {
  TamperWithStripe(token_.config_path());
  ASSERT_FALSE(HasFatalFailure());
  auto direct = Cli({"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(direct.exit_code, 65) << direct.err;
  auto served = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(served.exit_code, 65) << served.err;
  EXPECT_EQ(served.out, "");
  auto raw = Raw(socket_, "GET /v1/secrets/payments/prod/stripe HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(raw.find("HTTP/1.1 500"), std::string::npos) << raw;
  EXPECT_NE(raw.find("\"category\":\"integrity\""), std::string::npos) << raw;
  EXPECT_EQ(raw.find(kSecret), std::string::npos);
}

TEST_F(ServerTest, PutThroughTheServerAndExecWithTheValueInTheEnvironmentOnly) {
  auto put = AsUser(std::nullopt, {"secret", "put", "payments/dev/db"});
  EXPECT_EQ(put.exit_code, 64) << "no value on stdin is an empty value, a usage error as in direct mode";
  RunOptions o;
  o.env = {{"CUSTODY_ADDR", "unix:" + socket_}};
  o.stdin_data = "db-password-42";
  auto p = RunCustody({"secret", "put", "payments/dev/db"}, o);
  ASSERT_EQ(p.exit_code, 0) << p.err;
  EXPECT_NE(p.out.find("sealed payments/dev/db version 1"), std::string::npos);
  // Check-and-set through the server and in direct mode alike: exit 64
  // naming the newest version, nothing stored.
  o.stdin_data = "db-password-stale";
  auto stale = RunCustody({"secret", "put", "payments/dev/db", "--if-version", "0"}, o);
  EXPECT_EQ(stale.exit_code, 64) << stale.err;
  EXPECT_NE(stale.err.find("payments/dev/db is at v1, not absent"), std::string::npos) << stale.err;
  RunOptions direct;
  direct.env = token_.CliEnv();
  direct.stdin_data = "db-password-stale";
  auto stale_direct = RunCustody({"secret", "put", "payments/dev/db", "--if-version", "2"}, direct);
  EXPECT_EQ(stale_direct.exit_code, 64) << stale_direct.err;
  EXPECT_NE(stale_direct.err.find("payments/dev/db is at v1, not v2"), std::string::npos) << stale_direct.err;
  // An empty condition (a script's unset variable) is refused, not read
  // as no condition.
  auto empty = RunCustody({"secret", "put", "payments/dev/db", "--if-version", ""}, direct);
  EXPECT_EQ(empty.exit_code, 64) << empty.err;
  EXPECT_NE(empty.err.find("--if-version: empty; give a version number"), std::string::npos) << empty.err;
  direct.stdin_data = "db-password-43";
  auto stored = RunCustody({"secret", "put", "payments/dev/db", "--if-version", "1"}, direct);
  EXPECT_EQ(stored.exit_code, 0) << stored.err;
  EXPECT_NE(stored.out.find("sealed payments/dev/db version 2"), std::string::npos) << stored.out;
  o.stdin_data = "db-password-42";
  auto back = RunCustody({"secret", "put", "payments/dev/db", "--if-version", "2"}, o);
  ASSERT_EQ(back.exit_code, 0) << back.err;
  EXPECT_NE(back.out.find("sealed payments/dev/db version 3"), std::string::npos) << back.out;
  auto e = RunCustody({"exec", "--env", "DB_PASSWORD=payments/dev/db", "--env", "STRIPE=payments/prod/stripe", "--",
                       "/bin/sh", "-c", "printf '%s|%s' \"$DB_PASSWORD\" \"$STRIPE\""},
                      {.env = {{"CUSTODY_ADDR", "unix:" + socket_}}});
  EXPECT_EQ(e.exit_code, 0) << e.err;
  EXPECT_EQ(e.out, std::string("db-password-42|") + kSecret);
  auto denied = AsUser(65534, {"exec", "--env", "X=payments/prod/stripe", "--", "/bin/true"});
  EXPECT_EQ(denied.exit_code, 77) << "exec runs nothing when a value is refused";
  auto usage = AsUser(std::nullopt, {"usage", "payments"});
  EXPECT_EQ(usage.exit_code, 0) << usage.err;
  EXPECT_NE(usage.out.find("payments/dev"), std::string::npos) << usage.out;
  EXPECT_EQ(AsUser(65534, {"usage", "payments"}).exit_code, 77) << "nobody has no grant in payments";
}

// `custody secret revoke` with CUSTODY_ADDR goes through custodyd: a
// responder needs neither the store nor the PIN, and gets the words and
// exit codes of direct mode.
TEST_F(ServerTest, SecretRevokeThroughCustodydNeedsNoStore) {
  RunOptions o;
  o.env = {{"CUSTODY_ADDR", "unix:" + socket_}};
  o.stdin_data = "second-value";
  ASSERT_EQ(RunCustody({"secret", "put", "payments/prod/stripe"}, o).exit_code, 0);
  auto denied = AsUser(65534, {"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "x"});
  EXPECT_EQ(denied.exit_code, 77) << denied.err;
  auto r = AsUser(std::nullopt, {"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason",
                                 "leaked in a CI log"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("revoked version 2 of payments/prod/stripe"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("current version: 1"), std::string::npos) << r.out;
  auto again = AsUser(std::nullopt, {"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "again"});
  EXPECT_EQ(again.exit_code, 64) << again.err;
  EXPECT_NE(again.err.find("was already revoked at"), std::string::npos) << again.err;
  auto missing = AsUser(std::nullopt, {"secret", "revoke", "payments/prod/stripe", "--version", "9", "--reason", "x"});
  EXPECT_EQ(missing.exit_code, 66) << missing.err;
  auto get = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(get.exit_code, 0) << get.err;
  EXPECT_EQ(get.out, kSecret);
  auto old = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe", "--version", "2"});
  EXPECT_EQ(old.exit_code, 77) << old.err;
  EXPECT_EQ(old.out.find("second-value"), std::string::npos);
  auto recs = Cli({"--json", "audit", "show", "--action", "secret.revoke"});
  ASSERT_EQ(recs.exit_code, 0) << recs.err;
  EXPECT_NE(recs.out.find("via custodyd; reason: leaked in a CI log"), std::string::npos) << recs.out;
}

TEST_F(ServerTest, ManyConcurrentClientsGetNoErrorsAndExactlyOneAuditRecordEach) {
  size_t before = AuditCount("secret.get");
  constexpr int kThreads = 16, kEach = 25;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      auto c = client::Client::Connect("unix:" + socket_);
      for (int i = 0; i < kEach; ++i) {
        auto f = c->Get("payments/prod/stripe");
        if (!f.ok() || f->value.RevealString(SecretAccess{}) != kSecret) ++errors;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(AuditCount("secret.get"), before + kThreads * kEach);
  auto verify = Cli({"audit", "verify"});
  EXPECT_EQ(verify.exit_code, 0) << verify.err;
}

TEST_F(TpmServerTest, ServesGetsAndPutsFromTheTpmToConcurrentClientsAndAuditsEach) {
  size_t before = AuditCount("secret.get");
  // From here until custodyd has stopped no command runs in direct mode (a
  // direct-mode command signs a checkpoint when one is due, as the set-up's
  // did): every checkpoint the log gains meanwhile is custodyd's.
  const std::vector<uint64_t> checkpoints_before = CheckpointSeqs();
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c.ok());
  auto f = c->Get("payments/prod/stripe");
  ASSERT_TRUE(f.ok()) << f.error().message();
  EXPECT_EQ(f->value.RevealString(SecretAccess{}), kSecret);
  EXPECT_EQ(AsUser(65534, {"secret", "get", "payments/prod/stripe"}).exit_code, 77);
  auto put = c->Put("payments/dev/db", SecretBuffer::Copy(std::string_view("tpm-sealed-value")));
  ASSERT_TRUE(put.ok()) << put.error().message();
  EXPECT_EQ(*put, 1u);
  // One TPM behind the server, many clients at once: every answer right.
  constexpr int kThreads = 6, kEach = 6;
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      auto cc = client::Client::Connect("unix:" + socket_);
      for (int i = 0; i < kEach; ++i) {
        auto g = cc->Get(i % 2 ? "payments/dev/db" : "payments/prod/stripe");
        if (!g.ok() || g->value.RevealString(SecretAccess{}) != (i % 2 ? "tpm-sealed-value" : kSecret)) ++wrong;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  auto health = Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(health.find("200 OK"), std::string::npos) << health;
  ::kill(pid_, SIGTERM);
  auto status = WaitForExit(pid_, std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "custodyd did not exit within 30 s of SIGTERM";
  ASSERT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "status " << *status;
  // custodyd signed checkpoints of its own with the TPM key (on its timer
  // as the records came, at the latest as it stopped).
  const std::vector<uint64_t> checkpoints = CheckpointSeqs();
  EXPECT_GT(checkpoints.size(), checkpoints_before.size())
      << "custodyd signed no checkpoint: the log has only the " << checkpoints_before.size()
      << " of the set-up's commands";
  EXPECT_EQ(AuditCount("secret.get"), before + 2 + kThreads * kEach);
  // Stopped, the TPM is free again: the log, those checkpoints included,
  // verifies.
  auto verify = Cli({"--json", "audit", "verify"});
  EXPECT_EQ(verify.exit_code, 0) << verify.out << verify.err;
  auto report = nlohmann::json::parse(verify.out, nullptr, false);
  ASSERT_FALSE(report.is_discarded()) << verify.out;
  EXPECT_TRUE(report.value("intact", false)) << verify.out;
  EXPECT_GE(report.value("checkpoints", size_t{0}), checkpoints.size()) << verify.out;
}

// A PUT with an Idempotency-Key, sent twice (a client retrying after a lost
// answer): the second is answered 200 with the version the first stored,
// nothing new is stored, and the audit trail says it was a retry. A key
// that is not 16 to 64 of [A-Za-z0-9_-] is refused with 400 naming it.
TEST_F(ServerTest, APutRetriedWithItsIdempotencyKeyIsStoredOnce) {
  auto put = [&](const std::string& key, const std::string& value) {
    const std::string body = "{\"value\":\"" + value + "\"}";
    return Raw(socket_, "PUT /v1/secrets/payments/dev/idem HTTP/1.1\r\nHost: x\r\nIdempotency-Key: " + key +
                            "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
  };
  const std::string key = "retry-0123456789abcdef";
  auto first = put(key, "value-one");
  EXPECT_NE(first.find("HTTP/1.1 201"), std::string::npos) << first;
  EXPECT_NE(first.find("\"version\":1"), std::string::npos) << first;
  EXPECT_NE(first.find("\"replayed\":false"), std::string::npos) << first;
  auto again = put(key, "value-one");
  EXPECT_NE(again.find("HTTP/1.1 200"), std::string::npos) << again;
  EXPECT_NE(again.find("\"version\":1"), std::string::npos) << again;
  EXPECT_NE(again.find("\"replayed\":true"), std::string::npos) << again;
  auto v2 = Raw(socket_, "GET /v1/secrets/payments/dev/idem?version=2 HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(v2.find("HTTP/1.1 404"), std::string::npos) << "the retry stored a second version: " << v2;
  bool recorded = false;
  for (const auto& r : TrailRecords(token_.config_path())) {
    recorded = recorded || (r.event.action == "secret.put" && r.event.version == 1u &&
                            r.event.detail.find("a retry: v1 was stored by an earlier put") != std::string::npos);
  }
  EXPECT_TRUE(recorded) << "the retry has no record saying so";
  // A new key makes a new version.
  EXPECT_NE(put("retry-fedcba9876543210", "value-two").find("\"version\":2"), std::string::npos);
  for (const std::string& bad : std::vector<std::string>{"short", "has space 0123456789", std::string(65, 'a'), "quote\"0123456789abc"}) {
    auto r = put(bad, "value-x");
    EXPECT_NE(r.find("HTTP/1.1 400"), std::string::npos) << bad << ": " << r;
    EXPECT_NE(r.find("Idempotency-Key header must be 16 to 64 characters"), std::string::npos) << r;
    EXPECT_EQ(r.find(bad), std::string::npos) << "the refused key is quoted back: " << r;
  }
}

// Check-and-set on the native API (RFC 9110 conditional requests): a GET
// gives the version as its ETag; a PUT with If-Match: "N" stores only if N
// is still the newest version, one with If-None-Match: * only if there is
// no version yet; otherwise 412, nothing stored, and a record that says so.
// Of writers racing with the same ETag, exactly one stores.
TEST_F(ServerTest, AConditionalPutStoresOnlyOverTheVersionItRead) {
  auto put = [&](const std::string& header, const std::string& value) {
    const std::string body = "{\"value\":\"" + value + "\"}";
    return Raw(socket_, "PUT /v1/secrets/payments/dev/cas HTTP/1.1\r\nHost: x\r\n" + header +
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
  };
  const std::string none_body = "{\"value\":\"nothing-yet\"}";
  auto none = Raw(socket_, "PUT /v1/secrets/payments/dev/cas-none HTTP/1.1\r\nHost: x\r\nIf-Match: \"1\"\r\n"
                           "Content-Length: " + std::to_string(none_body.size()) + "\r\n\r\n" + none_body);
  EXPECT_NE(none.find("HTTP/1.1 412"), std::string::npos) << none;
  EXPECT_NE(none.find("payments/dev/cas-none has no version, not v1"), std::string::npos) << none;
  auto first = put("If-None-Match: *\r\n", "value-one");
  EXPECT_NE(first.find("HTTP/1.1 201"), std::string::npos) << first;
  auto twice = put("If-None-Match: *\r\n", "value-two");
  EXPECT_NE(twice.find("HTTP/1.1 412"), std::string::npos) << twice;
  EXPECT_NE(twice.find("payments/dev/cas is at v1, not absent"), std::string::npos) << twice;
  auto got = Raw(socket_, "GET /v1/secrets/payments/dev/cas HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(got.find("ETag: \"1\""), std::string::npos) << got;
  EXPECT_NE(got.find("value-one"), std::string::npos) << got;
  auto second = put("If-Match: \"1\"\r\n", "value-two");
  EXPECT_NE(second.find("HTTP/1.1 201"), std::string::npos) << second;
  EXPECT_NE(second.find("\"version\":2"), std::string::npos) << second;
  auto stale = put("If-Match: \"1\"\r\n", "value-stale");
  EXPECT_NE(stale.find("HTTP/1.1 412"), std::string::npos) << stale;
  EXPECT_NE(stale.find("is at v2, not v1"), std::string::npos) << stale;
  got = Raw(socket_, "GET /v1/secrets/payments/dev/cas HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(got.find("value-two"), std::string::npos) << "a refused put changed the value: " << got;
  EXPECT_NE(got.find("ETag: \"2\""), std::string::npos) << got;
  bool recorded = false;
  for (const auto& r : TrailRecords(token_.config_path())) {
    recorded = recorded || (r.event.action == "secret.put" && r.event.result == core::AuditResult::kError &&
                            r.event.error.find("is at v2, not v1") != std::string::npos);
  }
  EXPECT_TRUE(recorded) << "the refused put has no record saying why";
  // A retry of a stored conditional put (same Idempotency-Key) is the same
  // request: answered with its version although the condition now fails.
  auto keyed = put("If-Match: \"2\"\r\nIdempotency-Key: cas-retry-0123456789\r\n", "value-three");
  EXPECT_NE(keyed.find("HTTP/1.1 201"), std::string::npos) << keyed;
  auto retried = put("If-Match: \"2\"\r\nIdempotency-Key: cas-retry-0123456789\r\n", "value-three");
  EXPECT_NE(retried.find("HTTP/1.1 200"), std::string::npos) << retried;
  EXPECT_NE(retried.find("\"replayed\":true"), std::string::npos) << retried;
  EXPECT_NE(retried.find("\"version\":3"), std::string::npos) << retried;
  // Malformed conditions are refused before anything is sealed, and the
  // header's text is not quoted back.
  for (const std::string& bad : {std::string("If-Match: 2\r\n"), std::string("If-Match: W/\"2\"\r\n"),
                                 std::string("If-Match: \"2\", \"3\"\r\n"), std::string("If-Match: \"02\"\r\n"),
                                 std::string("If-Match: \"4294967296\"\r\n"), std::string("If-Match: *\r\n"),
                                 std::string("If-Match: \"0\"\r\n"), std::string("If-None-Match: \"2\"\r\n"),
                                 std::string("If-Match: \"2\"\r\nIf-None-Match: *\r\n")}) {
    auto r = put(bad, "value-x");
    EXPECT_NE(r.find("HTTP/1.1 400"), std::string::npos) << bad << ": " << r;
  }
  // A writer that read a replaced version is refused before the limits are
  // charged: billing/prod allows 3 requests a minute, and five stale
  // conditional puts leave room for a good one.
  auto billing = [&](const std::string& header) {
    const std::string body = "{\"value\":\"invoice-2\"}";
    return Raw(socket_, "PUT /v1/secrets/billing/prod/invoice-key HTTP/1.1\r\nHost: x\r\n" + header +
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
  };
  for (int i = 0; i < 5; ++i) {
    auto r = billing("If-None-Match: *\r\n");
    EXPECT_NE(r.find("HTTP/1.1 412"), std::string::npos) << r;
  }
  auto good = billing("If-Match: \"1\"\r\n");
  EXPECT_NE(good.find("HTTP/1.1 201"), std::string::npos) << "stale puts were charged to the limit: " << good;
  // Racing writers that read the same version: one stores, the others get
  // 412, and the versions stay one apart.
  constexpr int kWriters = 6;
  std::vector<std::string> answers(kWriters);
  std::vector<std::thread> writers;
  for (int i = 0; i < kWriters; ++i) {
    writers.emplace_back([&, i] { answers[static_cast<size_t>(i)] = put("If-Match: \"3\"\r\n", "racer-" + std::to_string(i)); });
  }
  for (auto& t : writers) t.join();
  int stored = 0, refused = 0;
  for (const auto& a : answers) {
    stored += a.find("HTTP/1.1 201") != std::string::npos ? 1 : 0;
    refused += a.find("HTTP/1.1 412") != std::string::npos ? 1 : 0;
  }
  EXPECT_EQ(stored, 1);
  EXPECT_EQ(refused, kWriters - 1);
  auto v5 = Raw(socket_, "GET /v1/secrets/payments/dev/cas?version=5 HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(v5.find("HTTP/1.1 404"), std::string::npos) << "two racers stored: " << v5;
}

}  // namespace
}  // namespace custody::test
