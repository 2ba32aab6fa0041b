// What custodyd counts and who may read the counts: usage written behind
// (and kept when the store cannot take it), the rotation states in
// /metrics, and /metrics and health details for admins, auditors and the
// configured scraper only.
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "../support/server_fixture.h"
#include "custody/client/client.h"

namespace custody::test {
namespace {

// Unlimited requests are counted in memory and written behind; the usage
// the server reports includes every request before it, and a direct-mode
// reader sees them once the server has written them (at the latest when
// it stops).
TEST_F(ServerTest, UsageCountsEveryGetAlthoughItIsWrittenBehind) {
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c.ok());
  auto unseals = [](const std::string& body) {
    auto rows = nlohmann::json::parse(body, nullptr, false);
    uint64_t n = 0;
    for (const auto& r : rows) {
      if (r.value("environment", "") == "prod") n += r.value("unseals", uint64_t{0});
    }
    return n;
  };
  auto before = c->Fetch("/v1/usage?project=payments");
  ASSERT_TRUE(before.ok()) << before.error().message();
  for (int i = 0; i < 7; ++i) ASSERT_TRUE(c->Get("payments/prod/stripe").ok());
  auto after = c->Fetch("/v1/usage?project=payments");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(unseals(*after), unseals(*before) + 7) << *after;
  ASSERT_TRUE(c->Get("payments/prod/stripe").ok());
  ::kill(pid_, SIGTERM);
  auto status = WaitForExit(pid_, std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "custodyd did not exit within 30 s of SIGTERM";
  ASSERT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "status " << *status;
  auto direct = Cli({"--json", "usage", "payments"});
  ASSERT_EQ(direct.exit_code, 0) << direct.err;
  EXPECT_EQ(unseals(direct.out), unseals(*before) + 8) << direct.out;
}

// When the store cannot take the written-behind usage counts (another
// process holds its write lock past the busy timeout), GETs go on without
// waiting, the failure shows in /metrics, the counts are kept, and the first
// flush after the lock is gone writes every one of them.
TEST_F(ServerTest, UsageThatCannotBeWrittenIsCountedAndNotLost) {
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c.ok());
  auto unseals = [](const std::string& body) {
    uint64_t n = 0;
    for (const auto& r : nlohmann::json::parse(body, nullptr, false)) {
      if (r.value("environment", "") == "prod") n += r.value("unseals", uint64_t{0});
    }
    return n;
  };
  auto failures = [&] {
    return MetricValue(Raw(socket_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), "custody_usage_write_failures_total")
        .value_or(-1);
  };
  // Healthy first: a GET's count written (the usage read flushes it) is no
  // failure.
  ASSERT_TRUE(c->Get("payments/prod/stripe").ok());
  auto before = c->Fetch("/v1/usage?project=payments");
  ASSERT_TRUE(before.ok()) << before.error().message();
  ASSERT_GE(unseals(*before), 1u) << *before;
  EXPECT_EQ(failures(), 0);

  sqlite3* holder = nullptr;
  ASSERT_EQ(sqlite3_open(token_.store_path().c_str(), &holder), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(holder, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), SQLITE_OK);
  // Spread over more than the 100 ms flush period, so flushes are due while
  // the lock is held. The usage writer has its own thread, so a GET does not
  // wait for one (before, the GET that found a flush due waited out the 5 s
  // busy timeout: this loop took 15 s). Not asserted: no timing in tests.
  for (int i = 0; i < 3; ++i) {
    auto f = c->Get("payments/prod/stripe");
    ASSERT_TRUE(f.ok()) << f.error().message();
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
  }
  // The flush gives up after the store's 5 s busy timeout.
  long seen = 0;
  for (int i = 0; i < 150 && seen < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    seen = failures();
  }
  EXPECT_GE(seen, 1) << "the failed flush is counted";
  // The writing has a thread of its own (the GETs above did not wait for
  // it; that is not timed here).
  bool writer = false;
  for (const auto& t : std::filesystem::directory_iterator("/proc/" + std::to_string(pid_) + "/task")) {
    writer = writer || ReadFile((t.path() / "comm").string()) == "usage-writer\n";
  }
  EXPECT_TRUE(writer) << "custodyd has no usage-writer thread";
  ASSERT_EQ(sqlite3_exec(holder, "ROLLBACK", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(holder);
  auto after = c->Fetch("/v1/usage?project=payments");
  ASSERT_TRUE(after.ok()) << after.error().message();
  EXPECT_EQ(unseals(*after), unseals(*before) + 3) << "the kept counts were written: " << *after;
}

TEST_F(ServerTest, VersionStatesHoldOverTheSocketAndMetricsCountOverdueSecrets) {
  ASSERT_EQ(Cli({"secret", "put", "payments/dev/hook"}, "hook-v1").exit_code, 0);
  ASSERT_EQ(Cli({"secret", "rotate", "payments/dev/hook"}, "hook-v2").exit_code, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));  // dev: grace 1s, max_age 1s
  auto retired = Raw(socket_, "GET /v1/secrets/payments/dev/hook?version=1 HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(retired.find("403 Forbidden"), std::string::npos) << retired;
  EXPECT_NE(retired.find("version 1 of payments/dev/hook is retired"), std::string::npos) << retired;
  EXPECT_EQ(retired.find("hook-v1"), std::string::npos);

  ASSERT_EQ(Cli({"secret", "revoke", "payments/dev/hook", "--version", "2", "--reason", "exposed"}).exit_code, 0);
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c.ok());
  auto f = c->Get("payments/dev/hook");
  ASSERT_TRUE(f.ok()) << f.error().message();
  EXPECT_EQ(f->value.RevealString(SecretAccess{}), "hook-v1") << "revoking the current falls back to the newest left";
  auto revoked = AsUser(std::nullopt, {"secret", "get", "payments/dev/hook", "--version", "2"});
  EXPECT_EQ(revoked.exit_code, 77) << revoked.err;
  EXPECT_NE(revoked.err.find("was revoked at"), std::string::npos) << revoked.err;

  auto metrics = Raw(socket_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(metrics.find("custody_secrets{node=\"node-a\",project=\"payments\",environment=\"dev\",state=\"overdue\"} 1"),
            std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("custody_secrets{node=\"node-a\",project=\"payments\",environment=\"prod\",state=\"no-schedule\"} 1"),
            std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("custody_secrets_overdue{node=\"node-a\"} 1"), std::string::npos) << metrics;
  EXPECT_EQ(metrics.find("hook"), std::string::npos) << "counts only, never names";
}

class MetricsAccessServerTest : public ServerTest {
 protected:
  std::string ExtraServerConfig() override { return "metrics_uids = [12345]\n"; }
};

// /metrics and the details of /v1/health are for policy admins and
// auditors and the configured scraper; everyone else who can connect gets
// only whether the node can serve.
TEST_F(MetricsAccessServerTest, MetricsAndHealthDetailsAreForAdminsAuditorsAndTheScraper) {
  auto reader = CurlAs(65534, "/metrics");  // nobody: a reader of billing only
  EXPECT_NE(reader.find("HTTP/1.1 403"), std::string::npos) << reader;
  EXPECT_EQ(reader.find("custody_operations_total"), std::string::npos) << reader;
  auto stranger = CurlAs(23456, "/metrics");
  EXPECT_NE(stranger.find("HTTP/1.1 401"), std::string::npos) << stranger;
  auto scraper = CurlAs(12345, "/metrics");
  EXPECT_NE(scraper.find("HTTP/1.1 200"), std::string::npos) << scraper;
  EXPECT_NE(scraper.find("custody_policy_version{node=\"node-a\"} 1"), std::string::npos) << scraper;
  auto admin = Raw(socket_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(admin.find("custody_policy_version{node=\"node-a\"} 1"), std::string::npos) << admin;

  auto health = CurlAs(23456, "/v1/health");
  EXPECT_NE(health.find("HTTP/1.1 200"), std::string::npos) << health;
  EXPECT_NE(health.find("{\"node\":\"node-a\",\"status\":\"ok\"}"), std::string::npos) << health;
  EXPECT_EQ(health.find("policy_version"), std::string::npos) << health;
  auto detailed = Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(detailed.find("\"policy_version\":1"), std::string::npos) << detailed;

  // An auditor of one project (uid 34567, in policy v2) reads them too; as
  // a stranger before that policy, it could not.
  EXPECT_NE(CurlAs(34567, "/metrics").find("HTTP/1.1 401"), std::string::npos);
  std::string p2 = kPolicy;
  p2 += "[principals.\"user:audit\"]\nuid = 34567\n[[projects.billing.grants]]\nprincipal = \"user:audit\"\n"
        "role = \"auditor\"\n";
  ASSERT_EQ(Apply(p2, "policy2.toml").exit_code, 0);
  std::string auditor;
  for (int i = 0; i < 50; ++i) {
    auditor = CurlAs(34567, "/metrics");
    if (auditor.find("HTTP/1.1 200") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(auditor.find("HTTP/1.1 200"), std::string::npos) << auditor;
  EXPECT_NE(auditor.find("custody_policy_version{node=\"node-a\"} 2"), std::string::npos) << auditor;
  EXPECT_NE(CurlAs(34567, "/v1/health").find("\"policy_version\":2"), std::string::npos);
}

}  // namespace
}  // namespace custody::test
