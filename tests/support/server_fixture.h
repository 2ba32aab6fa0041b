// Test support for custodyd for real: its own SoftHSM2 token (or swtpm), a
// policy and two secrets put in direct mode, the server started as its own
// process on a real Unix socket, and the clients the tests talk to it with:
// the CLI (as root or, through setpriv, as another user), curl, raw bytes.
//
//   TEST_F(ServerTest, X) {
//     EXPECT_EQ(AsUser(65534, {"secret", "get", "payments/prod/stripe"}).exit_code, 77);
//     EXPECT_NE(Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").find("200 OK"), std::string::npos);
//   }
//
// A test that needs another server set-up derives from ServerTest and
// overrides ExtraServerConfig(), BeforeStart() or ExtraServerEnv().
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cli_fixture.h"
#include "custody/audit/audit.h"

namespace custody::test {

// A connection to the Unix socket at `socket`, or -1 if none can be made.
int ConnectUnix(const std::string& socket);
// Sends all of `data` on the connection `fd`, or as much as the server takes
// before it closes.
void SendAll(int fd, const std::string& data);

// A raw request on the Unix socket (the write side shut after it); what the
// server answered, or "connect failed".
std::string Raw(const std::string& socket, const std::string& request);

// Waits at most `within` for the child `pid` to end. Its wait status (for
// WIFEXITED and WEXITSTATUS) once waitpid has reaped it, and pid is then -1;
// nullopt if it still runs at the deadline (pid is kept: ServerTest's
// TearDown kills it).
std::optional<int> WaitForExit(pid_t& pid, std::chrono::seconds within);

// SIGTERM to `pid`, then its exit status within `seconds` (128 + the signal
// if a signal ended it; pid is then -1). nullopt: still running.
std::optional<int> StopWithin(pid_t& pid, int seconds);

// custodyd started as its own process: its config and SoftHSM2 config, the
// socket to wait for (it is ready once it accepts a connection), its stderr
// (truncated, or appended to when a test restarts a node), and NAME=value
// strings added to its environment.
struct CustodydStart {
  std::string config, softhsm_conf, socket, log;
  std::vector<std::string> env;
  bool append_log = false;
  bool wait = true;  // false: return at once; WaitUntilServing later
};
// Its pid; a test failure naming the log if it did not start within 15 s
// (the pid is still returned, for the caller to kill).
pid_t StartCustodyd(const CustodydStart& how);
// Waits at most 15 s for the custodyd of `how` to accept a connection; a
// test failure naming its log otherwise.
void WaitUntilServing(const CustodydStart& how);

// The [node] name ServerTest's custody.toml gives (its metrics' label).
inline constexpr const char* kNode = "node-a";

// The value of the sample `name` (a metric with no label but the node's) in
// a /metrics answer, or nullopt if it has no such line.
std::optional<long> MetricValue(const std::string& metrics, const std::string& name);

// Flips the last byte (the GCM tag's) of payments/prod/stripe's stored blob,
// through the store the config at `config_path` names.
void TamperWithStripe(const std::string& config_path);


class ServerTest : public CliFixture {
 protected:
  static constexpr const char* kSecret = "sk-live-SERVERTEST-0123456789-ABCDEFGHIJKLMNOP";

  // Root owns payments and billing; nobody (65534) reads billing; a TLS
  // client named web-prod reads payments/prod. billing/prod is limited to
  // 3 requests a minute, payments/dev retires and is overdue after 1 s.
  static constexpr const char* kPolicy = R"(version = 1
admins = ["user:root"]
[principals."user:root"]
uid = 0
[principals."user:nobody"]
uid = 65534
[principals."svc:web-prod"]
tls_san = "web-prod.payments.internal"
[projects.payments]
[projects.payments.environments.dev]
production = false
max_age = "1s"
grace = "1s"
[projects.payments.environments.prod]
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
[[projects.payments.grants]]
principal = "svc:web-prod"
role = "reader"
environments = ["prod"]
[projects.billing]
[projects.billing.environments.prod]
rate = "3/min"
[[projects.billing.grants]]
principal = "user:root"
role = "owner"
[[projects.billing.grants]]
principal = "user:nobody"
role = "reader"
)";

  // Init(), the policy applied, payments/prod/stripe (kSecret) and
  // billing/prod/invoice-key put, the [server] section written, then Start().
  void SetUp() override;
  // Kills the server if it still runs, and shows its log if the test failed.
  void TearDown() override;

  // `custody init` for the backend under test (a SoftHSM2 token here).
  virtual void Init() { token_.InitCli(); }
  // Lines added to the config's [server] section.
  virtual std::string ExtraServerConfig() { return ""; }
  virtual void BeforeStart() {}
  // NAME=value strings added to custodyd's environment.
  virtual std::vector<std::string> ExtraServerEnv() { return {}; }

  // Starts custodyd (its stderr to custodyd.log beside the token) and waits
  // until it accepts a connection.
  void Start();

  // The CLI as a client of the server, as another user if `uid` is given.
  RunResult AsUser(std::optional<int> uid, const std::vector<std::string>& args);
  // The same with another client binary (custody-full, say).
  RunResult ClientAs(const std::string& binary, std::optional<int> uid, const std::vector<std::string>& args);
  // The raw answer (status line, headers, body) to a GET sent by curl as `uid`.
  std::string CurlAs(int uid, const std::string& target);
  // How many records of `action` the audit log holds (read in direct mode).
  size_t AuditCount(const std::string& action);
  // The http.refused summary records (docs/AUDIT.md), one line each: who
  // (identified_by), then the detail, once they count at least `n` refusals
  // for `reason` (a reason seen over several periods is in several records),
  // or what they hold after 10 s. Set refusal_summary_seconds = 1 in the
  // config, or the first summary comes a minute later.
  std::string RefusalSummaries(const std::string& reason, uint64_t n);
  // How many refusals for `reason` those lines count.
  static uint64_t RefusalCount(const std::string& summaries, const std::string& reason);
  // The seqs of the signed checkpoint records in the audit log, read from
  // its segment files (no command runs, so none is added).
  std::vector<uint64_t> CheckpointSeqs();

  TempDir run_;
  std::string socket_;
  pid_t pid_ = -1;
};

// custodyd on a TPM: the same server, with the KEKs sealed in a swtpm. The
// setup's CLI commands use the TPM first; then custodyd holds swtpm's one
// connection (a host's /dev/tpmrm0 or tpm2-abrmd would share it).
class TpmServerTest : public ServerTest {
 protected:
  void Init() override;
  // Checkpoints every few records: the server's timer has the TPM sign
  // them, when the timing falls so, while request threads unseal on the
  // same TPM; at the latest custodyd signs one as it stops.
  void BeforeStart() override;
  Swtpm swtpm_;
};

}  // namespace custody::test
