// Several custodyd nodes as one service, for real: three custodyd
// processes, each with its own node name, socket and audit chain, on one
// PostgreSQL server (started by the test) and one SoftHSM2 token that all
// three load (as the nodes of a network HSM share a partition). What a
// change made through one node does on the others, limits shared exactly,
// clients failing over when a node is killed, and every node's audit chain
// verifying afterwards.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../support/pg_server.h"
#include "../support/server_fixture.h"
#include "custody/app/config.h"
#include "custody/audit/audit.h"
#include "custody/client/client.h"

namespace custody::test {
namespace {

using namespace std::chrono_literals;

// Root owns payments and limited; limited/prod allows 100 reads an hour in
// all (an hour, so that no token refills while the test runs: the count is
// exact).
constexpr const char* kClusterPolicy = R"(version = 1
admins = ["user:root"]
[principals."user:root"]
uid = 0
[principals."user:nobody"]
uid = 65534
[projects.payments]
[projects.payments.environments.prod]
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
[projects.limited]
[projects.limited.environments.prod]
rate = "100/hour"
[[projects.limited.grants]]
principal = "user:root"
role = "owner"
)";

class ClusterTest : public CliFixture {
 protected:
  static constexpr int kNodes = 3;

  void SetUp() override {
    std::string why;
    pg_.reset(PgServer::StartNew(&why));
    if (!pg_) {
      if (InCi()) FAIL() << "PostgreSQL is required in CI: " << why;
      GTEST_SKIP() << "PostgreSQL test skipped: " << why;
    }
    url_ = pg_->NewDatabase();
    auto r = RunCustody({"init", "--module", SoftHsmToken::kModule, "--token", token_.uri(), "--pin-file",
                         token_.pin_file(), "--state-dir", token_.dir() / "state", "--store", url_},
                        {.env = token_.CliEnv()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ASSERT_EQ(Apply(kClusterPolicy).exit_code, 0);
    Put("payments/prod/stripe", "stripe-v1");
    Put("limited/prod/key", "limited-value");
    ::chmod(run_.path().c_str(), 0755);
    auto base = core::LoadConfig(token_.config_path());
    ASSERT_TRUE(base.ok()) << base.error().message();
    // One access-token key for every node (as an operator copies it): a
    // PostgreSQL store has no default one.
    const std::string token_key = token_.dir() / "state/access-token.key";
    WriteFile(token_key, std::string(32, '\x5a'));
    ::chmod(token_key.c_str(), 0600);
    base->server.token_key_file = token_key;
    for (int i = 0; i < kNodes; ++i) {
      core::Config c = *base;
      c.node = {Name(i), true};
      c.audit.checkpoint_every = 50;
      c.server.socket_path = Socket(i);
      c.server.threads = 4;
      ASSERT_TRUE(core::WriteConfig(c, Config(i)).ok());
    }
    // All three at once on a token that has no audit signing key yet: one
    // makes it (under the store's lock), the others find it. Two keys
    // would stop every later start (the label must name one key).
    for (int i = 0; i < kNodes; ++i) pid_[i] = StartCustodyd(Start(i, /*wait=*/false));
    for (int i = 0; i < kNodes; ++i) ASSERT_NO_FATAL_FAILURE(WaitUntilServing(Start(i)));
    // The test token's PIN in argv: pkcs11-tool takes it no other way, and
    // this token holds test data only.
    auto keys = RunProgram("/usr/bin/pkcs11-tool", {"--module", SoftHsmToken::kModule, "--token-label",
                                                    token_.label(), "--list-objects", "--type", "privkey", "--login",
                                                    "--pin", SoftHsmToken::kPin},
                           {.env = {{"SOFTHSM2_CONF", token_.conf()}}});
    size_t signing_keys = 0;
    for (size_t at = keys.out.find("custody:audit"); at != std::string::npos;
         at = keys.out.find("custody:audit", at + 1)) {
      ++signing_keys;
    }
    EXPECT_EQ(signing_keys, 1u) << keys.out << keys.err;
  }

  CustodydStart Start(int i, bool wait = true) const {
    return {.config = Config(i), .softhsm_conf = token_.conf(), .socket = Socket(i), .log = Log(i), .env = {},
            .append_log = true, .wait = wait};
  }

  void TearDown() override {
    for (int i = 0; i < kNodes; ++i) {
      if (pid_[i] > 0) {
        ::kill(pid_[i], SIGKILL);
        ::waitpid(pid_[i], nullptr, 0);
      }
    }
    if (HasFailure()) {
      for (int i = 0; i < kNodes; ++i) std::fprintf(stderr, "%s log:\n%s\n", Name(i).c_str(), ReadFile(Log(i)).c_str());
    }
  }

  static std::string Name(int i) { return "node-" + std::string(1, static_cast<char>('a' + i)); }
  std::string Socket(int i) const { return run_ / (Name(i) + ".sock"); }
  std::string Config(int i) const { return token_.dir() / ("state/" + Name(i) + ".toml"); }
  std::string Log(int i) const { return run_ / (Name(i) + ".log"); }
  // Every node's address, node `first` first (a client asks the first
  // one until it fails).
  std::string AllAddresses(int first = 0) const {
    std::string all;
    for (int i = 0; i < kNodes; ++i) all += (i ? ",unix:" : "unix:") + Socket((first + i) % kNodes);
    return all;
  }

  void StartNode(int i) {
    ::unlink(Socket(i).c_str());
    pid_[i] = StartCustodyd(Start(i));
    if (HasFailure()) FAIL() << Name(i) << " did not start";
  }

  std::string Health(int i) { return Raw(Socket(i), "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"); }

  // A GET of `path` through node i as root: the value, or the error line.
  std::string GetVia(int i, const std::string& path) {
    auto c = client::Client::Connect("unix:" + Socket(i));
    if (!c) return "error: " + c.error().message();
    auto got = c->Get(path);
    if (!got) return "error " + std::to_string(got.error().exit_code()) + ": " + got.error().message();
    return std::string(got->value.RevealString(SecretAccess{}));
  }

  // Waits at most `limit` for `ok` to hold; how long it took, or nullopt.
  static std::optional<std::chrono::milliseconds> Within(std::chrono::milliseconds limit,
                                                        const std::function<bool()>& ok) {
    const auto start = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - start < limit) {
      if (ok()) return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
      std::this_thread::sleep_for(20ms);
    }
    return std::nullopt;
  }

  // The records of node i's chain (in the store) with `action` and `result`.
  size_t Records(int i, const std::string& action, const std::string& result) {
    size_t n = 0;
    for (const auto& r : TrailRecords(Config(0), Name(i))) {
      n += r.type == "event" && r.event.action == action && core::AuditResultName(r.event.result) == result;
      EXPECT_TRUE(r.node == Name(i)) << "a record of " << Name(i) << "'s chain names node '" << r.node << "'";
    }
    return n;
  }

  // `custody audit verify` on node i's host: it verifies every node's chain.
  RunResult VerifyAudit(int i) {
    return RunCustody({"audit", "verify"},
                      {.env = {{"CUSTODY_CONFIG", Config(i)}, {"SOFTHSM2_CONF", token_.conf()}}});
  }

  std::unique_ptr<PgServer> pg_;
  std::string url_;
  TempDir run_;
  std::array<pid_t, kNodes> pid_{-1, -1, -1};
};

// An access token (the Vault-compatible API) issued from one host is good
// on every node that shares the store and the key; revoked from another
// host, every node refuses it within two seconds.
TEST_F(ClusterTest, AnAccessTokenWorksOnEveryNodeUntilARevocationReachesThemAll) {
  auto env = [&](int i) { return RunOptions{.env = {{"CUSTODY_CONFIG", Config(i)}, {"SOFTHSM2_CONF", token_.conf()}}}; };
  auto issued = RunCustody({"token", "issue", "--principal", "user:root", "--ttl", "1h"}, env(0));
  ASSERT_EQ(issued.exit_code, 0) << issued.err;
  const std::string token = issued.out.substr(0, 36);
  auto get = [&](int i) {
    return Raw(Socket(i), "GET /v1/payments/data/prod/stripe HTTP/1.1\r\nHost: x\r\nX-Vault-Token: " + token +
                              "\r\nConnection: close\r\n\r\n");
  };
  for (int i = 0; i < kNodes; ++i) {
    const std::string a = get(i);
    EXPECT_NE(a.find("200 OK"), std::string::npos) << Name(i) << ": " << a;
    EXPECT_NE(a.find("stripe-v1"), std::string::npos) << Name(i) << ": " << a;
  }
  auto revoked = RunCustody({"token", "revoke", "--principal", "user:root"}, env(1));
  ASSERT_EQ(revoked.exit_code, 0) << revoked.err;
  for (int i = 0; i < kNodes; ++i) {
    auto took = Within(2000ms, [&] { return get(i).find("403 Forbidden") != std::string::npos; });
    EXPECT_TRUE(took) << Name(i) << " still takes the revoked token: " << get(i);
  }
  EXPECT_NE(get(2).find("was revoked"), std::string::npos) << get(2);
  // Each refusal is in the node's own chain.
  for (int i = 0; i < kNodes; ++i) EXPECT_GE(Records(i, "secret.get", "refused"), 1u) << Name(i);
}

// A revoke, a delete and a policy apply done through one node (or from the
// CLI on any host) are in force on every other node within 2 s; each node
// names itself and the policy it enforces in /v1/health.
TEST_F(ClusterTest, ChangesThroughOneNodeHoldOnEveryNodeWithinTwoSeconds) {
  for (int i = 0; i < kNodes; ++i) {
    auto h = Health(i);
    EXPECT_NE(h.find("\"node\":\"" + Name(i) + "\""), std::string::npos) << h;
    EXPECT_NE(h.find("\"policy_version\":1"), std::string::npos) << h;
    EXPECT_NE(h.find("\"store\":\"ok\""), std::string::npos) << h;
    EXPECT_EQ(GetVia(i, "payments/prod/stripe"), "stripe-v1");
  }
  // v2 through node a; b and c read it at once (no node caches a value).
  auto a = client::Client::Connect("unix:" + Socket(0));
  ASSERT_TRUE(a.ok());
  auto v2 = a->Put("payments/prod/stripe", SecretBuffer::Copy("stripe-v2"));
  ASSERT_TRUE(v2.ok()) << v2.error().message();
  EXPECT_EQ(GetVia(1, "payments/prod/stripe"), "stripe-v2");
  EXPECT_EQ(GetVia(2, "payments/prod/stripe"), "stripe-v2");

  // Revoke v2 (through node a's host, in direct mode, as an owner would).
  ASSERT_EQ(Cli({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "leaked"}).exit_code, 0);
  for (int i : {1, 2}) {
    auto took = Within(2000ms, [&] { return GetVia(i, "payments/prod/stripe") == "stripe-v1"; });
    EXPECT_TRUE(took) << Name(i) << " still serves the revoked version: " << GetVia(i, "payments/prod/stripe");
  }
  auto revoked = client::Client::Connect("unix:" + Socket(2));
  ASSERT_TRUE(revoked.ok());
  auto old = revoked->Get("payments/prod/stripe", 2);
  ASSERT_FALSE(old.ok()) << "a revoked version is never readable again, through any node";
  EXPECT_NE(old.error().message().find("revoked"), std::string::npos) << old.error().message();

  // A policy that takes root's grant on payments away.
  std::string p2 = kClusterPolicy;
  p2.replace(p2.find("[[projects.payments.grants]]\nprincipal = \"user:root\"\nrole = \"owner\"\n"),
             std::string("[[projects.payments.grants]]\nprincipal = \"user:root\"\nrole = \"owner\"\n").size(),
             "[[projects.payments.grants]]\nprincipal = \"user:nobody\"\nrole = \"reader\"\n");
  ASSERT_EQ(Apply(p2, "policy2.toml").exit_code, 0);
  for (int i = 0; i < kNodes; ++i) {
    auto took = Within(2000ms, [&] { return Health(i).find("\"policy_version\":2") != std::string::npos; });
    EXPECT_TRUE(took) << Name(i) << ": " << Health(i);
    EXPECT_EQ(GetVia(i, "payments/prod/stripe").rfind("error 77", 0), 0u) << Name(i);
  }

  // Delete through the CLI; the other nodes answer 404 at once.
  ASSERT_EQ(Apply(kClusterPolicy, "policy3.toml").exit_code, 0);
  for (int i = 0; i < kNodes; ++i) {
    ASSERT_TRUE(Within(2000ms, [&] { return Health(i).find("\"policy_version\":3") != std::string::npos; }));
  }
  ASSERT_EQ(Cli({"secret", "delete", "payments/prod/stripe"}).exit_code, 0);
  for (int i = 0; i < kNodes; ++i) {
    auto took = Within(2000ms, [&] { return GetVia(i, "payments/prod/stripe").rfind("error 66", 0) == 0; });
    EXPECT_TRUE(took) << Name(i) << ": " << GetVia(i, "payments/prod/stripe");
  }
}

// A rate limit holds across nodes exactly: with 100 an hour on
// limited/prod, of which the put in SetUp took one, and 150 GETs spread
// over three nodes by 12 clients at once, exactly 99 are answered with the
// value and 51 with 429.
TEST_F(ClusterTest, ARateLimitIsExactAcrossNodes) {
  std::atomic<int> ok{0}, limited{0}, other{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 12; ++t) {
    clients.emplace_back([&, t] {
      auto c = client::Client::Connect("unix:" + Socket(t % kNodes));
      if (!c) {
        other += 1;
        return;
      }
      for (int n = 0; n < (t < 6 ? 13 : 12); ++n) {
        auto got = c->Get("limited/prod/key");
        if (got) {
          ++ok;
        } else if (got.error().exit_code() == 75) {
          ++limited;
        } else {
          ++other;
        }
      }
    });
  }
  for (auto& c : clients) c.join();
  EXPECT_EQ(ok.load(), 99);
  EXPECT_EQ(limited.load(), 51);
  EXPECT_EQ(other.load(), 0);
  size_t recorded = 0;
  for (int i = 0; i < kNodes; ++i) recorded += Records(i, "secret.get", "ok");
  EXPECT_EQ(recorded, 99u) << "one record per value handed out, over the three logs";
}

// 16 clients, each with the list of all three nodes; node b is killed
// (SIGKILL) in the middle. The clients fail over and none fails; every
// answered GET has its record in some node's log (a request node b made
// durable but could not answer may add one, never more than one per
// client); node b comes back, and every node's chain verifies.
TEST_F(ClusterTest, ClientsFailOverWhenANodeIsKilledAndEveryChainVerifies) {
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0};
  std::atomic<int> failed{0};
  std::string first_failure;
  std::mutex mu;
  std::vector<std::thread> clients;
  for (int t = 0; t < 16; ++t) {
    clients.emplace_back([&, t] {
      auto c = client::Client::Connect(AllAddresses(t % kNodes));
      if (!c) {
        ++failed;
        return;
      }
      while (!stop.load()) {
        auto got = c->Get("payments/prod/stripe");
        if (got && got->value.RevealString(SecretAccess{}) == "stripe-v1") {
          ++answered;
        } else {
          ++failed;
          std::lock_guard lock(mu);
          if (first_failure.empty()) first_failure = got ? "a wrong value" : got.error().message();
        }
      }
    });
  }
  ASSERT_TRUE(Within(10000ms, [&] { return answered.load() >= 200; }));
  ::kill(pid_[1], SIGKILL);
  ::waitpid(pid_[1], nullptr, 0);
  pid_[1] = -1;
  const int at_kill = answered.load();
  ASSERT_TRUE(Within(10000ms, [&] { return answered.load() >= at_kill + 300; }))
      << "the clients did not go on after node-b was killed";
  stop = true;
  for (auto& c : clients) c.join();
  EXPECT_EQ(failed.load(), 0) << first_failure;

  // Node b back on its own chain: the batch the kill cut short was never
  // committed, so there is nothing to repair.
  ASSERT_NO_FATAL_FAILURE(StartNode(1));
  EXPECT_EQ(GetVia(1, "payments/prod/stripe"), "stripe-v1");
  for (int i = 0; i < kNodes; ++i) {
    EXPECT_EQ(StopWithin(pid_[i], 20), 0) << Name(i);
  }
  size_t recorded = 0;
  for (int i = 0; i < kNodes; ++i) recorded += Records(i, "secret.get", "ok");
  const size_t answered_all = static_cast<size_t>(answered.load()) + 1;  // with the GET through b after its restart
  EXPECT_GE(recorded, answered_all);
  EXPECT_LE(recorded, answered_all + 16) << "at most one unanswered record per client in flight at the kill";
  // One command on any host verifies every node's chain in the store.
  auto v = VerifyAudit(2);
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_NE(v.out.find("audit trail intact: "), std::string::npos) << v.out;
  // (The CLI commands of the set-up wrote a chain of their own, under the
  // test host's name.)
  for (int i = 0; i < kNodes; ++i) EXPECT_NE(v.out.find("  node " + Name(i) + ": "), std::string::npos) << v.out;
}

// PostgreSQL restarted under load: while it is down no node hangs (health
// answers at once, and says the store and the audit trail are failing),
// requests are refused rather than answered without their record, and
// once it is back every node serves again without a restart; every
// answered GET has its record, and every chain verifies.
TEST_F(ClusterTest, APostgresRestartUnderLoadLosesNothingAndNoNodeHangs) {
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0};
  std::atomic<int> refused{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&, t] {
      while (!stop.load()) {
        // A fresh client per GET: a node that hung would hold it past its
        // CUSTODY_TIMEOUT (10 s), and the loop below would see no progress.
        auto c = client::Client::Connect("unix:" + Socket(t % kNodes));
        auto got = c ? c->Get("payments/prod/stripe") : Result<client::Fetched>(c.error());
        if (got && got->value.RevealString(SecretAccess{}) == "stripe-v1") {
          ++answered;
        } else {
          ++refused;
          std::this_thread::sleep_for(50ms);
        }
      }
    });
  }
  ASSERT_TRUE(Within(10000ms, [&] { return answered.load() >= 100; }));
  pg_->Stop();
  // Down: every node still answers its health check, with 503 and why.
  for (int i = 0; i < kNodes; ++i) {
    std::string h;
    EXPECT_TRUE(Within(5000ms, [&] {
      h = Health(i);
      return h.find("HTTP/1.1 503") != std::string::npos;
    })) << Name(i) << ": " << h;
  }
  const int refused_before = refused.load();
  EXPECT_TRUE(Within(5000ms, [&] { return refused.load() > refused_before + 8; })) << "requests were not refused";
  std::string why;
  ASSERT_TRUE(pg_->Start(&why)) << why;
  const int at_restart = answered.load();
  EXPECT_TRUE(Within(15000ms, [&] { return answered.load() >= at_restart + 200; }))
      << "the nodes did not resume after PostgreSQL came back";
  for (int i = 0; i < kNodes; ++i) {
    std::string h;
    EXPECT_TRUE(Within(5000ms, [&] {
      h = Health(i);
      return h.find("HTTP/1.1 200") != std::string::npos;
    })) << Name(i) << ": " << h;
  }
  stop = true;
  for (auto& c : clients) c.join();
  for (int i = 0; i < kNodes; ++i) EXPECT_EQ(StopWithin(pid_[i], 20), 0) << Name(i);
  size_t recorded = 0;
  for (int i = 0; i < kNodes; ++i) recorded += Records(i, "secret.get", "ok");
  EXPECT_GE(recorded, static_cast<size_t>(answered.load())) << "an answered GET has no record";
  auto v = VerifyAudit(0);
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

// With a list of nodes: a GET passes a node that does not answer (stopped
// with SIGSTOP) after CUSTODY_TIMEOUT and one that is gone at once. A PUT
// does too: it carries an Idempotency-Key, so when the silent node wakes
// and finishes the put it took, it finds that key in the store (another
// node stored the put under it) and stores nothing: one version, not two.
TEST_F(ClusterTest, ClientsPassDeadAndHungNodesAndAPutIsStoredOnce) {
  ::setenv("CUSTODY_TIMEOUT", "1", 1);
  ASSERT_EQ(StopWithin(pid_[0], 20), 0);  // node a is gone
  auto c = client::Client::Connect(AllAddresses(0));
  ASSERT_TRUE(c.ok()) << c.error().message();
  auto got = c->Get("payments/prod/stripe");
  ASSERT_TRUE(got.ok()) << got.error().message();
  EXPECT_EQ(got->value.RevealString(SecretAccess{}), "stripe-v1");
  auto v2 = c->Put("payments/prod/stripe", SecretBuffer::Copy("stripe-v2"));
  ASSERT_TRUE(v2.ok()) << "node a refused the connection, so node b takes the put: " << v2.error().message();
  EXPECT_EQ(*v2, 2u);

  ASSERT_NO_FATAL_FAILURE(StartNode(0));
  ::kill(pid_[0], SIGSTOP);  // node a hangs: it takes connections and never answers
  auto hung = client::Client::Connect(AllAddresses(0));
  ASSERT_TRUE(hung.ok());
  const auto t0 = std::chrono::steady_clock::now();
  got = hung->Get("payments/prod/stripe");
  ASSERT_TRUE(got.ok()) << got.error().message();
  EXPECT_EQ(got->value.RevealString(SecretAccess{}), "stripe-v2");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s) << "the GET waited far past CUSTODY_TIMEOUT";
  auto hung_put = client::Client::Connect(AllAddresses(0));
  ASSERT_TRUE(hung_put.ok());
  auto v3 = hung_put->Put("payments/prod/stripe", SecretBuffer::Copy("stripe-v3"));
  ASSERT_TRUE(v3.ok()) << "sent to a node that went silent, then to the next with the same key: " << v3.error().message();
  EXPECT_EQ(*v3, 3u);
  ::kill(pid_[0], SIGCONT);
  // Node a wakes and finishes the put it took: its twin is in the store,
  // so it stores nothing and records the retry.
  auto b = client::Client::Connect("unix:" + Socket(1));
  ASSERT_TRUE(b.ok());
  bool retry_recorded = false;
  ASSERT_TRUE(Within(10000ms, [&] {
    for (const auto& r : TrailRecords(Config(0), Name(0))) {
      retry_recorded = retry_recorded || (r.event.action == "secret.put" &&
                                          r.event.detail.find("a retry: v3 was stored by an earlier put") != std::string::npos);
    }
    return retry_recorded;
  })) << "node a did not record the put it finished after waking as a retry";
  EXPECT_EQ(GetVia(0, "payments/prod/stripe"), "stripe-v3");
  auto v4 = b->Get("payments/prod/stripe", 4);
  ASSERT_FALSE(v4.ok()) << "a second copy of the put was stored";
  EXPECT_EQ(v4.error().exit_code(), 66) << v4.error().message();
  ::unsetenv("CUSTODY_TIMEOUT");
}

// Check-and-set across nodes: in each of five rounds, nine writers (three
// on each node) put their own value over the version they all read. The
// nodes share nothing but the store, whose unique version number decides:
// exactly one writer per round stores, the other eight are told the
// version is gone (412, exit 64) naming the one that won, and every node
// then serves the winner's value. One put record per attempt, each saying
// what happened.
TEST_F(ClusterTest, ConditionalPutsRacingThroughEveryNodeStoreExactlyOnePerVersion) {
  constexpr int kWriters = 9, kRounds = 5;
  std::set<std::string> before;  // the puts of SetUp, by request id
  for (int i = 0; i < kNodes; ++i) {
    for (const auto& r : TrailRecords(Config(0), Name(i))) before.insert(r.event.request_id);
  }
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t read = static_cast<uint32_t>(round + 1);  // stripe-v1 from SetUp, then each winner
    std::vector<std::string> outcome(kWriters);
    std::atomic<int> ready{0};
    std::vector<std::thread> writers;
    for (int w = 0; w < kWriters; ++w) {
      writers.emplace_back([&, w] {
        auto c = client::Client::Connect("unix:" + Socket(w % kNodes));
        ready.fetch_add(1);
        while (ready.load() < kWriters) std::this_thread::yield();
        if (!c) {
          outcome[w] = "connect: " + c.error().message();
          return;
        }
        auto v = c->Put("payments/prod/stripe", SecretBuffer::Copy("r" + std::to_string(round) + "-w" + std::to_string(w)),
                        read);
        if (v) {
          outcome[w] = "stored v" + std::to_string(*v);
        } else {
          outcome[w] = (v.error().precondition_failed() ? "412 " : "other ") + std::to_string(v.error().exit_code()) +
                       ": " + v.error().message();
        }
      });
    }
    for (auto& t : writers) t.join();
    int stored = -1, refused = 0;
    for (int w = 0; w < kWriters; ++w) {
      if (outcome[w] == "stored v" + std::to_string(read + 1)) {
        EXPECT_EQ(stored, -1) << "round " << round << ": writers " << stored << " and " << w << " both stored";
        stored = w;
      } else if (outcome[w].rfind("412 64: ", 0) == 0) {
        ++refused;
        EXPECT_NE(outcome[w].find("payments/prod/stripe is at v" + std::to_string(read + 1) + ", not v" +
                                  std::to_string(read)),
                  std::string::npos)
            << "round " << round << " writer " << w << ": " << outcome[w];
      } else {
        ADD_FAILURE() << "round " << round << " writer " << w << ": " << outcome[w];
      }
    }
    ASSERT_NE(stored, -1) << "round " << round << ": no writer stored";
    EXPECT_EQ(refused, kWriters - 1) << "round " << round;
    const std::string winner = "r" + std::to_string(round) + "-w" + std::to_string(stored);
    for (int i = 0; i < kNodes; ++i) {
      EXPECT_EQ(GetVia(i, "payments/prod/stripe"), winner) << Name(i) << ", round " << round;
    }
  }
  // No version past the last winner's: nothing was stored twice.
  auto c = client::Client::Connect("unix:" + Socket(0));
  ASSERT_TRUE(c.ok());
  auto past = c->Get("payments/prod/stripe", kRounds + 2);
  ASSERT_FALSE(past.ok()) << "a version past the last round's was stored";
  EXPECT_EQ(past.error().exit_code(), 66) << past.error().message();
  // A put is recorded before the store commits it; one that then loses the
  // race gets a second record with its request id saying so. So each
  // attempt's last record tells how it ended (docs/AUDIT.md).
  std::map<std::string, const char*> last;  // request id -> result of its last secret.put record
  for (int i = 0; i < kNodes; ++i) {
    for (const auto& r : TrailRecords(Config(0), Name(i))) {
      if (r.event.action == "secret.put" && !before.count(r.event.request_id)) {
        last[r.event.request_id] = core::AuditResultName(r.event.result);
      }
    }
  }
  EXPECT_EQ(last.size(), static_cast<size_t>(kRounds * kWriters)) << "one request id per attempt";
  size_t ended_ok = 0, ended_error = 0;
  for (const auto& [id, result] : last) {
    ended_ok += std::string(result) == "ok";
    ended_error += std::string(result) == "error";
  }
  EXPECT_EQ(ended_ok, static_cast<size_t>(kRounds)) << "one stored put per round, on record";
  EXPECT_EQ(ended_error, static_cast<size_t>(kRounds * (kWriters - 1)));
}

// A responder revokes through one node (POST {"revoke": N}): that node
// serves the version before it at once (its own write clears its read
// cache), the other nodes within two seconds, and none serves the revoked
// version again. Vault's destroy through a third node withdraws the next.
TEST_F(ClusterTest, ARevokeThroughOneNodeHoldsOnEveryNode) {
  auto a = client::Client::Connect("unix:" + Socket(0));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(a->Put("payments/prod/stripe", SecretBuffer::Copy("stripe-v2")).ok());
  ASSERT_TRUE(a->Put("payments/prod/stripe", SecretBuffer::Copy("stripe-v3")).ok());
  for (int i = 0; i < kNodes; ++i) ASSERT_EQ(GetVia(i, "payments/prod/stripe"), "stripe-v3") << Name(i);
  const std::string body = R"({"revoke":3,"reason":"seen in a public repository"})";
  const std::string answer = Raw(Socket(1), "POST /v1/secrets/payments/prod/stripe HTTP/1.1\r\nHost: x\r\n"
                                            "Content-Type: application/json\r\nContent-Length: " +
                                                std::to_string(body.size()) + "\r\n\r\n" + body);
  ASSERT_EQ(answer.substr(0, answer.find("\r\n")), "HTTP/1.1 200 OK") << answer;
  EXPECT_NE(answer.find(R"("current_version":2)"), std::string::npos) << answer;
  EXPECT_EQ(GetVia(1, "payments/prod/stripe"), "stripe-v2") << "the node that revoked served its cached read";
  for (int i : {0, 2}) {
    EXPECT_TRUE(Within(2000ms, [&] { return GetVia(i, "payments/prod/stripe") == "stripe-v2"; }))
        << Name(i) << " still serves the revoked version: " << GetVia(i, "payments/prod/stripe");
  }
  const std::string destroy = R"({"versions":[2]})";
  const std::string vault = Raw(Socket(2), "POST /v1/payments/destroy/prod/stripe HTTP/1.1\r\nHost: x\r\n"
                                           "Content-Length: " + std::to_string(destroy.size()) + "\r\n\r\n" + destroy);
  ASSERT_EQ(vault.substr(0, vault.find("\r\n")), "HTTP/1.1 204 No Content") << vault;
  EXPECT_EQ(GetVia(2, "payments/prod/stripe"), "stripe-v1");
  for (int i : {0, 1}) {
    EXPECT_TRUE(Within(2000ms, [&] { return GetVia(i, "payments/prod/stripe") == "stripe-v1"; })) << Name(i);
  }
  for (int i = 0; i < kNodes; ++i) {
    for (uint32_t v : {2u, 3u}) {
      auto c = client::Client::Connect("unix:" + Socket(i));
      ASSERT_TRUE(c.ok());
      auto old = c->Get("payments/prod/stripe", v);
      ASSERT_FALSE(old.ok()) << Name(i) << " served revoked v" << v;
      EXPECT_EQ(old.error().exit_code(), 77) << old.error().message();
    }
  }
  EXPECT_EQ(Records(1, "secret.revoke", "ok"), 1u);
  EXPECT_EQ(Records(2, "secret.revoke", "ok"), 1u);
  auto verified = VerifyAudit(0);
  EXPECT_EQ(verified.exit_code, 0) << verified.out << verified.err;
}

// `custody kek rotate` while the three nodes serve: no GET fails, and every
// secret reads back afterwards through every node.
TEST_F(ClusterTest, AKekRotationWhileEveryNodeServesFailsNoGet) {
  for (int n = 0; n < 20; ++n) Put("payments/prod/s" + std::to_string(n), "value-" + std::to_string(n));
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0}, failed{0};
  std::string first_failure;
  std::mutex mu;
  std::vector<std::thread> clients;
  for (int t = 0; t < 6; ++t) {
    clients.emplace_back([&, t] {
      auto c = client::Client::Connect("unix:" + Socket(t % kNodes));
      if (!c) return;
      for (int n = 0; !stop.load(); n = (n + 1) % 20) {
        auto got = c->Get("payments/prod/s" + std::to_string(n));
        if (got && got->value.RevealString(SecretAccess{}) == "value-" + std::to_string(n)) {
          ++answered;
        } else {
          ++failed;
          std::lock_guard lock(mu);
          if (first_failure.empty()) first_failure = got ? "a wrong value" : got.error().message();
        }
      }
    });
  }
  ASSERT_TRUE(Within(10000ms, [&] { return answered.load() >= 50; }));
  auto rotated = Cli({"kek", "rotate", "payments", "--batch", "5"});
  const int after_rotation = answered.load();
  ASSERT_TRUE(Within(10000ms, [&] { return answered.load() >= after_rotation + 50; }));
  stop = true;
  for (auto& c : clients) c.join();
  ASSERT_EQ(rotated.exit_code, 0) << rotated.out << rotated.err;
  EXPECT_EQ(failed.load(), 0) << first_failure;
  for (int i = 0; i < kNodes; ++i) {
    for (int n = 0; n < 20; ++n) {
      EXPECT_EQ(GetVia(i, "payments/prod/s" + std::to_string(n)), "value-" + std::to_string(n)) << Name(i);
    }
  }
}

}  // namespace
}  // namespace custody::test
