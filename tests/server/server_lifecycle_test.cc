// custodyd's signals: SIGHUP reloads the config and the policy in force
// (and keeps the old ones when the new ones do not load), SIGTERM drains
// and stops.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "../support/server_fixture.h"
#include "custody/app/config.h"
#include "custody/client/client.h"
#include "custody/app/backend.h"
#include "custody/store/store.h"

namespace custody::test {
namespace {

// custodyd's own arguments: an empty --config or --pin-fd (a unit's unset
// variable) is refused naming it, not read as not given (another config, the
// PIN from elsewhere); an unexpected argument is named escaped.
TEST(CustodydArguments, AnEmptyValueOrAStrayArgumentIsOneEscapedLineAndExit64) {
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--config", ""}, {"--config="}, {"--pin-fd", ""}}) {
    auto r = RunProgram(CUSTODYD_BIN, args, {});
    EXPECT_EQ(r.exit_code, 64) << args[0] << ": " << r.err;
    EXPECT_NE(r.err.find(args[0].substr(0, args[0].find('=')) + ":"), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  auto stray = RunProgram(CUSTODYD_BIN, {"\x1b[31mred"}, {});
  EXPECT_EQ(stray.exit_code, 64) << stray.err;
  EXPECT_NE(stray.err.find("\\x1b[31mred"), std::string::npos) << stray.err;
  EXPECT_EQ(stray.err.find('\x1b'), std::string::npos) << "the escape byte reached the terminal";
}

TEST_F(ServerTest, SighupWithABrokenConfigKeepsTheOldOneAndAGoodOneLoadsTheNewPolicy) {
  std::string cfg = ReadFile(token_.config_path());
  WriteFile(token_.config_path(), "this is [ not toml");
  ::kill(pid_, SIGHUP);
  // Wait for the server to say it refused (reloads are asynchronous).
  for (int i = 0; i < 200 && ReadFile(token_.dir() / "custodyd.log").find("reload refused") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  auto health = Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(health.find("\"policy_version\":1"), std::string::npos) << health;
  EXPECT_NE(ReadFile(token_.dir() / "custodyd.log").find("reload refused"), std::string::npos);
  WriteFile(token_.config_path(), cfg);
  // A new policy in force (applied in direct mode), picked up on SIGHUP.
  std::string p2 = std::string(kPolicy) + "\n# v2\n";
  WriteFile(token_.dir() / "policy2.toml", p2);
  ASSERT_EQ(Cli({"policy", "apply", token_.dir() / "policy2.toml"}).exit_code, 0);
  ::kill(pid_, SIGHUP);
  for (int i = 0; i < 200; ++i) {
    health = Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
    if (health.find("\"policy_version\":2") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  EXPECT_NE(health.find("\"policy_version\":2"), std::string::npos) << health;
}

// A policy applied while custodyd runs (here in direct mode, as from another
// host sharing the store) is in force within 2 s with no signal; a newer
// one in the store that does not load leaves the one in force, and
// /v1/health and /metrics say so; once a good one follows, it is in force.
TEST_F(ServerTest, APolicyAppliedElsewhereIsInForceWithinTwoSecondsWithoutASignal) {
  auto health_within = [&](const std::string& text, std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    std::string h;
    while (std::chrono::steady_clock::now() < deadline) {
      h = Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
      if (h.find(text) != std::string::npos) return h;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ADD_FAILURE() << "not within " << limit.count() << " ms: " << text << "\n" << h;
    return h;
  };
  // Nobody reads payments only after v2 grants it.
  EXPECT_EQ(AsUser(65534, {"secret", "get", "payments/prod/stripe"}).exit_code, 77);
  std::string p2 = std::string(kPolicy) +
                   "[[projects.payments.grants]]\nprincipal = \"user:nobody\"\nrole = \"reader\"\n";
  WriteFile(token_.dir() / "policy2.toml", p2);
  ASSERT_EQ(Cli({"policy", "apply", token_.dir() / "policy2.toml"}).exit_code, 0);
  health_within("\"policy_version\":2", std::chrono::milliseconds(2000));
  auto got = AsUser(65534, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(got.exit_code, 0) << got.err;

  auto config = core::LoadConfig(token_.config_path());
  ASSERT_TRUE(config.ok()) << config.error().message();
  auto store = core::OpenStore(*config, false);
  ASSERT_TRUE(store.ok());
  // As a damaged store would hold it: `custody policy apply` never stores this.
  ASSERT_TRUE((*store)->SavePolicy("this is [ not a policy", std::string(64, '0'), "test").ok());
  auto h = health_within("policy v3 in the store cannot be loaded", std::chrono::milliseconds(2000));
  EXPECT_NE(h.find("\"policy_version\":2"), std::string::npos) << h;
  EXPECT_NE(h.find("v2 stays in force"), std::string::npos) << h;
  EXPECT_NE(h.find("HTTP/1.1 200"), std::string::npos) << "it still serves under v2: " << h;
  auto metrics = Raw(socket_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(MetricValue(metrics, "custody_policy_load_failing"), 1) << metrics;
  EXPECT_EQ(MetricValue(metrics, "custody_policy_version"), 2) << metrics;
  EXPECT_EQ(AsUser(65534, {"secret", "get", "payments/prod/stripe"}).exit_code, 0) << "v2 still grants it";

  // `policy apply` itself refuses to run over a stored policy that does not
  // load (it could not tell who may apply one): the good v4 goes in as a
  // repaired store would hold it.
  ASSERT_TRUE((*store)->SavePolicy(kPolicy, std::string(64, '1'), "test").ok());
  h = health_within("\"policy_version\":4", std::chrono::milliseconds(2000));
  EXPECT_NE(h.find("\"policy\":\"ok\""), std::string::npos) << h;
  EXPECT_EQ(AsUser(65534, {"secret", "get", "payments/prod/stripe"}).exit_code, 77) << "v4 no longer grants it";
  metrics = Raw(socket_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(MetricValue(metrics, "custody_policy_load_failing"), 0) << metrics;
}

// A reload applies the new limits at once and names what needs a restart;
// a policy in the store that no longer loads is refused and the one in
// force stays.
TEST_F(ServerTest, SighupAppliesNewLimitsAndKeepsThePolicyWhenTheStoredOneIsBroken) {
  auto log_has = [&](const std::string& text) {
    for (int i = 0; i < 200; ++i) {
      if (ReadFile(token_.dir() / "custodyd.log").find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return false;
  };
  const std::string body = "{\"value\":\"" + std::string(2000, 'v') + "\"}";
  const std::string put = "PUT /v1/secrets/payments/dev/big HTTP/1.1\r\nHost: x\r\nContent-Length: " +
                          std::to_string(body.size()) + "\r\n\r\n" + body;
  EXPECT_NE(Raw(socket_, put).find("201 Created"), std::string::npos) << "2000 bytes fit under 4096";
  std::string cfg = ReadFile(token_.config_path());
  cfg.replace(cfg.find("max_body_bytes = 4096"), 21, "max_body_bytes = 1024\nsocket_mode = \"0600\"");
  WriteFile(token_.config_path(), cfg);
  ::kill(pid_, SIGHUP);
  ASSERT_TRUE(log_has("reloaded: policy v1")) << ReadFile(token_.dir() / "custodyd.log");
  auto refused = Raw(socket_, put);
  EXPECT_NE(refused.find("413"), std::string::npos) << refused;
  EXPECT_NE(refused.find("larger than 1024 bytes"), std::string::npos) << refused;
  EXPECT_TRUE(log_has("reload: [server] socket_mode changed; restart custodyd to apply it"));

  {
    auto config = core::LoadConfig(token_.config_path());
    ASSERT_TRUE(config.ok()) << config.error().message();
    auto store = core::OpenStore(*config, false);
    ASSERT_TRUE(store.ok());
    // As a damaged store would hold it: `custody policy apply` never stores this.
    ASSERT_TRUE((*store)->SavePolicy("this is [ not a policy", std::string(64, '0'), "test").ok());
  }
  ::kill(pid_, SIGHUP);
  EXPECT_TRUE(log_has("reload refused, keeping policy v1")) << ReadFile(token_.dir() / "custodyd.log");
  auto health = Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(health.find("\"policy_version\":1"), std::string::npos) << health;
  auto got = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(got.exit_code, 0) << got.err;
  EXPECT_EQ(got.out, kSecret);
}

// SIGTERM drains: a request in flight is answered in full, connections
// waiting for a request are closed at once, no new connection is taken,
// and custodyd exits 0. The request in flight is a GET whose answer is
// larger than the socket can buffer (60,000 tabs,
// each sent as \u0009), asked by a client that reads only the start of
// it before the signal: the server is still writing the answer when it
// stops accepting, and must go on writing it.
TEST_F(ServerTest, SigtermDrainsAndStops) {
  const std::string big(60000, '\t');
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/big"}, big).exit_code, 0);
  // Idle connections do not hold the stop: one kept alive after a request,
  // one that never sent anything. Both are closed at once (the drain would
  // otherwise wait out its 10 s grace, past this test's 5 s).
  auto kept = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(kept.ok());
  ASSERT_TRUE(kept->Get("payments/prod/stripe").ok());
  int silent = ConnectUnix(socket_);
  ASSERT_GE(silent, 0);

  int slow = ConnectUnix(socket_);
  ASSERT_GE(slow, 0);
  SendAll(slow, "GET /v1/secrets/payments/prod/big HTTP/1.1\r\nHost: x\r\n\r\n");
  std::string answer;
  char buf[4096];
  while (answer.find("\r\n\r\n") == std::string::npos) {
    ssize_t n = ::recv(slow, buf, sizeof buf, 0);
    ASSERT_GT(n, 0) << "the answer's head never came: " << answer;
    answer.append(buf, static_cast<size_t>(n));
  }
  const size_t head = answer.find("\r\n\r\n") + 4;
  ASSERT_NE(answer.find("200 OK"), std::string::npos) << answer.substr(0, head);
  const size_t at = answer.find("Content-Length: ");
  ASSERT_NE(at, std::string::npos) << answer.substr(0, head);
  const size_t length = std::strtoul(answer.c_str() + at + 16, nullptr, 10);
  // In flight for certain: what came and what waits in the socket is less
  // than the whole answer, so the server still has the rest to write (and
  // cannot write it before this client reads).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  int queued = 0;
  ASSERT_EQ(::ioctl(slow, FIONREAD, &queued), 0);
  ASSERT_LT(answer.size() + static_cast<size_t>(queued), head + length)
      << "the whole answer fits in the socket's buffers: no request would be in flight";

  ::kill(pid_, SIGTERM);
  // Stop() has run once the socket file is gone.
  for (int i = 0; i < 200 && std::filesystem::exists(socket_); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_FALSE(std::filesystem::exists(socket_)) << "custodyd did not stop listening";
  EXPECT_EQ(ConnectUnix(socket_), -1) << "a connection after SIGTERM";
  // The rest of the answer, then the end of the connection.
  ssize_t n;
  while ((n = ::recv(slow, buf, sizeof buf, 0)) > 0) answer.append(buf, static_cast<size_t>(n));
  ::close(slow);
  ASSERT_EQ(answer.size(), head + length) << "the answer in flight was cut off after " << answer.size() << " of "
                                          << head + length << " bytes";
  auto body = nlohmann::json::parse(answer.substr(head), nullptr, false);
  ASSERT_TRUE(body.is_object()) << answer.substr(head, 200);
  EXPECT_EQ(body.value("value", ""), big) << "the request in flight got its value";

  auto status = WaitForExit(pid_, std::chrono::seconds(5));
  ASSERT_TRUE(status.has_value()) << "custodyd did not exit within 5 s of its last answer";
  ASSERT_TRUE(WIFEXITED(*status)) << "status " << *status;
  EXPECT_EQ(WEXITSTATUS(*status), 0);
  EXPECT_NE(ReadFile(token_.dir() / "custodyd.log").find("stopped"), std::string::npos);
  // Closed: end of file if the server had accepted it, a reset if it was
  // still in the listen backlog when the server stopped.
  char byte = 0;
  n = ::read(silent, &byte, 1);
  EXPECT_TRUE(n == 0 || (n < 0 && errno == ECONNRESET)) << "read gave " << n << ": " << std::strerror(errno);
  ::close(silent);
}

}  // namespace
}  // namespace custody::test
