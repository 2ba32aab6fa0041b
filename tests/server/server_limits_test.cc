// custodyd's limits: a rate limit answers 429, and slow, hoarding or
// unknown clients cannot take the places of the others (max_connections,
// the per-peer share, the strangers' share, the idle timeout).
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "../support/server_fixture.h"
#include "custody/client/client.h"

namespace custody::test {
namespace {

TEST_F(ServerTest, ALimitAnswers429WithRetryAfter) {
  auto c = client::Client::Connect("unix:" + socket_);
  // The put in SetUp took one of the three tokens.
  ASSERT_TRUE(c->Get("billing/prod/invoice-key").ok());
  ASSERT_TRUE(c->Get("billing/prod/invoice-key").ok());
  auto raw = Raw(socket_, "GET /v1/secrets/billing/prod/invoice-key HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(raw.find("429 Too Many Requests"), std::string::npos) << raw;
  EXPECT_NE(raw.find("Retry-After: "), std::string::npos) << raw;
  EXPECT_NE(raw.find("limit reached: environment billing/prod rate 3/min"), std::string::npos) << raw;
  auto r = AsUser(std::nullopt, {"secret", "get", "billing/prod/invoice-key"});
  EXPECT_EQ(r.exit_code, 75) << "the same exit code as in direct mode";
  auto metrics = Raw(socket_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(metrics.find("custody_limit_refusals_total{node=\"node-a\",project=\"billing\",environment=\"prod\"}"), std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("custody_request_duration_seconds_bucket{node=\"node-a\",action=\"secret.get\""), std::string::npos);
  EXPECT_NE(metrics.find("custody_audit_healthy{node=\"node-a\"} 1"), std::string::npos);
  // Four GETs so far (two served, two refused by the limit), each with its
  // record, written in at least one batch and at most one each.
  const auto records = MetricValue(metrics, "custody_audit_records_total");
  const auto batches = MetricValue(metrics, "custody_audit_batches_total");
  ASSERT_TRUE(records && batches) << metrics;
  EXPECT_GE(*records, 4) << metrics;
  EXPECT_GE(*batches, 1) << metrics;
  EXPECT_LE(*batches, *records) << metrics;
  // Usage written behind (payments has no limit) is stored without a
  // failure: a GET's count, flushed by a usage read (which then shows it),
  // leaves the failure counter at 0. (UsageThatCannotBeWrittenIsCountedAndNotLost
  // makes it move.)
  ASSERT_TRUE(c->Get("payments/prod/stripe").ok());
  auto usage = c->Fetch("/v1/usage?project=payments");
  ASSERT_TRUE(usage.ok()) << usage.error().message();
  EXPECT_NE(usage->find("\"unseals\":1"), std::string::npos) << "the GET's count was written: " << *usage;
  metrics = Raw(socket_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(MetricValue(metrics, "custody_usage_write_failures_total"), 0) << metrics;
}

// A connection that sends the start of a request and then nothing more.
int Stall(const std::string& socket) {
  int fd = ConnectUnix(socket);
  if (fd < 0) return -1;
  const std::string part = "GET /v1/secrets/payments/prod/str";
  (void)::send(fd, part.data(), part.size(), MSG_NOSIGNAL);
  return fd;
}

class LimitsServerTest : public ServerTest {
 protected:
  // A GET as root, tried again while the server still answers "too many
  // connections" (a closed connection's place is given back when the server
  // notices the close), for up to 5 s.
  RunResult GetOnceAPlaceIsFree() {
    RunResult r;
    for (int i = 0; i < 50; ++i) {
      r = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
      if (r.exit_code != 69) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return r;
  }
  // Waits until the server has accepted the stalled connections: a
  // connection is made (and can write) while it still waits in the listen
  // backlog, and a GET that got in first would take its place. Asks
  // /metrics as another user (nobody), whose own connection counts too;
  // when the server is full, that ask is refused instead.
  void WaitUntilAccepted(int open, bool full = false) {
    std::string m;
    for (int i = 0; i < 250; ++i) {
      m = CurlAs(65534, "/metrics");
      if (full ? m.find("503 Service Unavailable") != std::string::npos
               : m.find("custody_connections_open{node=\"node-a\"} " + std::to_string(open + 1) + "\n") != std::string::npos) {
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    size_t at = m.find("\ncustody_connections_open{");
    ADD_FAILURE() << "the server did not accept " << open << " connection(s): "
                  << (at == std::string::npos ? m : m.substr(at, 30));
  }
  // `n` connections from root that stall mid-request, once the server holds
  // them all. The start-up probe's connection is gone first (it would count).
  std::vector<int> StallAccepted(int n) {
    WaitUntilAccepted(0);
    std::vector<int> fds;
    for (int i = 0; i < n; ++i) fds.push_back(Stall(socket_));
    WaitUntilAccepted(n);
    return fds;
  }
  // nobody reads /metrics here as the configured scraper.
  std::string ExtraServerConfig() override {
    // 4 s: the stalled connections must outlast a whole CLI run (slow under
    // ThreadSanitizer) before the test fills the last place.
    return "max_connections = 4\nidle_timeout_seconds = 4\nmetrics_uids = [65534]\nrefusal_summary_seconds = 1\n";
  }
};

// Slow or hoarding clients cannot stop the others: while some connections
// stall mid-request, the others are served; past max_connections a new one
// is told 503 and why (the CLI exits 69); a stalled connection is closed
// when its idle time runs out, and its place is free again.
TEST_F(LimitsServerTest, StalledClientsCannotStopTheOthers) {
  std::vector<int> stalled = StallAccepted(3);
  for (int fd : stalled) ASSERT_GE(fd, 0);
  auto served = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(served.exit_code, 0) << served.err;
  EXPECT_EQ(served.out, kSecret);

  stalled.push_back(Stall(socket_));
  ASSERT_GE(stalled.back(), 0);
  WaitUntilAccepted(4, /*full=*/true);
  auto busy = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(busy.exit_code, 69) << busy.err;
  EXPECT_EQ(busy.out, "");
  EXPECT_NE(busy.err.find("too many connections"), std::string::npos) << busy.err;

  // The idle timeout (4 s here) ends each stalled request: the server closes
  // the connection. The 10 s read timeout only keeps a broken server from
  // hanging the test.
  for (int fd : stalled) {
    timeval tv{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[512];
    ssize_t n;
    std::string got;
    while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) got.append(buf, static_cast<size_t>(n));
    EXPECT_TRUE(n == 0 || (n < 0 && errno == ECONNRESET)) << "not closed by the server: " << std::strerror(errno);
    EXPECT_EQ(got.find(kSecret), std::string::npos);
    ::close(fd);
  }
  // Their places are free again (the count drops as each session ends).
  RunResult again = GetOnceAPlaceIsFree();
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(again.out, kSecret);
  // Neither refusal had a request to record: both are in root's summary.
  const std::string summaries = RefusalSummaries("request not complete within the idle timeout", 4);
  EXPECT_NE(summaries.find("uid 0"), std::string::npos) << summaries;
  EXPECT_GE(RefusalCount(summaries, "503 connection limit"), 1u) << summaries;
  EXPECT_EQ(RefusalCount(summaries, "request not complete within the idle timeout"), 4u) << summaries;
}

class PerPeerLimitServerTest : public LimitsServerTest {
 protected:
  std::string ExtraServerConfig() override {
    return "max_connections = 8\nmax_connections_per_peer = 3\nmetrics_uids = [65534]\n";
  }
};

// One user cannot take every place: past its share, that user is told 503
// (exit 69) naming its uid, while another user is still served; a closed
// connection gives its place back.
TEST_F(PerPeerLimitServerTest, OneUserCannotTakeEveryPlace) {
  std::vector<int> stalled = StallAccepted(3);
  for (int fd : stalled) ASSERT_GE(fd, 0);
  auto busy = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(busy.exit_code, 69) << busy.err;
  EXPECT_NE(busy.err.find("too many connections from uid 0; retry"), std::string::npos) << busy.err;
  auto other = AsUser(65534, {"secret", "get", "billing/prod/invoice-key"});
  EXPECT_EQ(other.exit_code, 0) << other.err;
  EXPECT_EQ(other.out, "billing-value");
  ::close(stalled.back());
  stalled.pop_back();
  RunResult again = GetOnceAPlaceIsFree();
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(again.out, kSecret);
  for (int fd : stalled) ::close(fd);
}

class StrangerSlotsServerTest : public ServerTest {
 protected:
  std::string ExtraServerConfig() override {
    return "max_connections = 8\nmax_connections_per_peer = 8\nmax_unidentified_connections = 4\nmetrics_uids = [0]\n"
           "refusal_summary_seconds = 1\n";
  }
};

// Strangers cannot take the principals' places: a uid the policy does not
// know holds as many idle connections as it may (8 per peer here), yet it
// gets only the 4 places strangers share; root and nobody, who are
// principals, are still served.
TEST_F(StrangerSlotsServerTest, StrangersCannotTakeThePlacesOfPrincipals) {
  int report[2];
  ASSERT_EQ(::pipe(report), 0);
  int release[2];
  ASSERT_EQ(::pipe(release), 0);
  pid_t child = ::fork();
  if (child == 0) {
    ::close(report[0]);
    ::close(release[1]);
    if (::setgroups(0, nullptr) != 0 || ::setgid(12345) != 0 || ::setuid(12345) != 0) ::_exit(2);
    std::vector<int> fds;
    for (int i = 0; i < 8; ++i) fds.push_back(Stall(socket_));
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    int refused = 0;
    for (int fd : fds) {
      char buf[512] = {};
      ssize_t n = ::recv(fd, buf, sizeof buf - 1, MSG_DONTWAIT);
      if (n > 0 && std::string(buf, static_cast<size_t>(n)).find("policy does not know") != std::string::npos) ++refused;
    }
    const std::string line = std::to_string(refused) + "\n";
    (void)::write(report[1], line.data(), line.size());
    char byte;
    (void)::read(release[0], &byte, 1);  // hold the others until the parent is done
    ::_exit(0);
  }
  ::close(report[1]);
  ::close(release[0]);
  char buf[16] = {};
  ASSERT_GT(::read(report[0], buf, sizeof buf - 1), 0);
  EXPECT_EQ(std::atoi(buf), 4) << "strangers' connections refused";
  auto root = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(root.exit_code, 0) << root.err;
  EXPECT_EQ(root.out, kSecret);
  auto nobody = AsUser(65534, {"secret", "get", "billing/prod/invoice-key"});
  EXPECT_EQ(nobody.exit_code, 0) << nobody.err;
  ::close(release[1]);
  ::waitpid(child, nullptr, 0);
  ::close(report[0]);
  // The four refused places leave one summary record for that uid.
  const std::string summaries = RefusalSummaries("503 connection limit for unidentified peers", 4);
  EXPECT_NE(summaries.find("uid 12345"), std::string::npos) << summaries;
  EXPECT_EQ(RefusalCount(summaries, "503 connection limit for unidentified peers"), 4u) << summaries;
}

}  // namespace
}  // namespace custody::test
