// Test support: a real SoftHSM2 token per test in a temporary folder, and a
// runner that drives the real `custody` binary.
//
//   custody::test::SoftHsmToken token;          // own SOFTHSM2_CONF, own token
//   auto r = custody::test::RunCustody({"secret", "list"}, {.env = token.CliEnv()});
//   EXPECT_EQ(r.exit_code, 0) << r.err;
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "custody/common/secret.h"

namespace custody::test {

// A temporary folder removed (with its contents) on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Creates a fresh SoftHSM2 token in its own folder with softhsm2-util and
// points this process's SOFTHSM2_CONF at it. One per test: tests never share
// a token, and ctest runs each test in its own process.
class SoftHsmToken {
 public:
  static constexpr const char* kModule = "/usr/lib/softhsm/libsofthsm2.so";
  static constexpr const char* kPin = "test-pin-1234";
  static constexpr const char* kSoPin = "test-so-pin-5678";

  explicit SoftHsmToken(const std::string& label = "custody-test");
  // A second token in the same SoftHSM config (another slot).
  void AddToken(const std::string& label);

  const TempDir& dir() const { return dir_; }
  const std::string& conf() const { return conf_; }
  const std::string& label() const { return label_; }
  std::string uri() const { return "pkcs11:token=" + label_; }
  SecretBuffer pin() const { return SecretBuffer::Copy(std::string_view(kPin)); }
  std::string pin_file() const { return dir_ / "pin"; }
  std::string config_path() const { return dir_ / "state/custody.toml"; }
  std::string store_path() const { return dir_ / "state/custody.db"; }

  // The token's key files in SoftHSM2's file store (every `*.object` but
  // token.object), for tests that damage one as a crash would.
  std::vector<std::string> ObjectFiles() const;

  // Environment for running the CLI against this token (CUSTODY_CONFIG).
  std::map<std::string, std::string> CliEnv() const;
  // Runs `custody init` for this token; fails the test if it fails.
  void InitCli() const;

 private:
  TempDir dir_;
  std::string conf_;
  std::string label_;
};

// A swtpm TPM 2.0 simulator for one test: its own state folder and free
// ports, started with the test and stopped (SIGTERM, then SIGKILL) after.
// When swtpm is not installed, available() is false and the test must skip
// (CUSTODY_REQUIRE_SWTPM), never pass silently; in CI it fails. Its ports
// are bound here and handed to swtpm, so parallel tests cannot race for them.
struct SwtpmOptions {
  // Manufactured first by `swtpm_setup --create-ek-cert` with a local CA of
  // the test's own: the TPM then holds an RSA EK certificate at 0x01c00002.
  bool ek_certificate = false;
};
class Swtpm {
 public:
  explicit Swtpm(const SwtpmOptions& options = {});
  ~Swtpm();
  Swtpm(const Swtpm&) = delete;
  Swtpm& operator=(const Swtpm&) = delete;
  bool available() const { return pid_ > 0; }
  const std::string& why_not() const { return why_not_; }
  int port() const { return port_; }
  std::string tcti() const { return "swtpm:host=127.0.0.1,port=" + std::to_string(port_); }
  // kill -9, as a crash would: every connection to it breaks, and what a
  // TPM holds only while powered (transient objects, sessions) is gone.
  void Kill();
  // Starts it again on the same state and ports (a TPM power cycle: the
  // seeds, so the SRK's Name, are kept). False if it did not come up.
  bool Restart();
  // With ek_certificate: the local CA's root and issuing certificates (PEM),
  // what a verifier passes as `attest verify --ek-ca`.
  std::string ek_ca() const { return ca_ / "ek-ca.pem"; }

 private:
  // Starts swtpm on `port` (control on port + 1); false if it exited.
  bool Launch(int port);
  TempDir dir_;
  TempDir ca_;
  int pid_ = -1;
  int port_ = 0;
  std::string why_not_;
};

// The store the integration tests' `custody init` uses: none (SQLite in the
// state folder, the default) unless CUSTODY_TEST_STORE=postgres (or
// postgres:DIR, the server in DIR), which the `postgres` CTest variants set:
// then a fresh database on this process's
// PostgreSQL server (pg_server.h), as `--store` arguments. Fails the test if
// that server cannot start.
std::vector<std::string> TestStoreArgs();
bool TestOnPostgres();

// Whether this runs in CI (CI set, and not "false" or "0"). There a test
// that would skip for a component ci/install-deps.sh provides fails instead:
// a green run must not hide a missing part.
bool InCi();

#define CUSTODY_REQUIRE_SWTPM(swtpm)                                                        \
  do {                                                                                      \
    if (!(swtpm).available()) {                                                             \
      if (::custody::test::InCi()) FAIL() << "swtpm is required in CI: " << (swtpm).why_not(); \
      GTEST_SKIP() << "TPM test skipped: " << (swtpm).why_not();                             \
    }                                                                                       \
  } while (0)

struct RunOptions {
  std::map<std::string, std::string> env = {};  // added to a minimal environment
  std::string stdin_data = {};
  std::vector<int> keep_fds = {};  // descriptors the child inherits as they are
  // If set, the child is sent SIGKILL this long after it started (unless it
  // finished first): a crash at an arbitrary point. exit_code is then 137.
  std::optional<std::chrono::microseconds> kill_after = {};
  // If set (with kill_after), kill_after counts from the moment the child's
  // stderr first holds this text, not from the start: a crash placed in a
  // phase of the run (say, after its first progress line).
  std::string kill_after_stderr = {};
};

struct RunResult {
  int exit_code = -1;
  std::string out, err;
  // With kill_after_stderr: how long after the start the text was seen.
  std::optional<std::chrono::microseconds> stderr_seen_after = {};
  // From the start until the child ended (or was killed).
  std::chrono::microseconds elapsed{0};
};

// Runs the custody binary built alongside the tests with `args`.
RunResult RunCustody(const std::vector<std::string>& args, const RunOptions& options);
// Runs any program (softhsm2-util, sqlite3 ...) by path.
RunResult RunProgram(const std::string& path, const std::vector<std::string>& args, const RunOptions& options);

std::string ReadFile(const std::string& path);
void WriteFile(const std::string& path, const std::string& data);

// A TCP port on 127.0.0.1 that was free a moment ago, or 0 if none was found.
int FreePort();

// Runs `sql` on the SQLite file `db` through a connection of its own, as
// someone with write access to the file could; fails the test if it fails.
void ExecSql(const std::string& db, const std::string& sql);

}  // namespace custody::test
