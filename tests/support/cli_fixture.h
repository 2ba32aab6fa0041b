// Test support for tests that drive the real `custody` binary: a state
// folder on its own SoftHSM2 token (or on a swtpm TPM), `custody init`, a
// policy written beside it and applied, and a runner that gives back the
// exit code, stdout and stderr.
//
//   class MyCliTest : public custody::test::CliFixture {
//    protected:
//     void SetUp() override { InitWithPolicy(token_, kPolicy); }
//   };
//   TEST_F(MyCliTest, X) { EXPECT_EQ(Cli({"secret", "list"}).exit_code, 0); }
#pragma once

#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "custody/audit/audit.h"
#include "testenv.h"

namespace custody::test {

// Runs `custody args` with `env` (and options.env on top of it, a test's own
// additions winning) and `in` on stdin.
RunResult RunCli(const std::map<std::string, std::string>& env, const std::vector<std::string>& args,
                 const std::string& in = "", RunOptions options = {});

// `custody init` on `token` (SoftHSM2), then `policy` written beside it as
// policy.toml and applied. Fails the test if either step fails.
void InitWithPolicy(const SoftHsmToken& token, const std::string& policy);

// `custody init --backend tpm` on `swtpm`, with the token's folder for the
// state and its PIN file (the keys live in the TPM), and `extra` arguments.
RunResult InitTpm(const SoftHsmToken& token, const Swtpm& swtpm, const std::map<std::string, std::string>& env,
                  const std::vector<std::string>& extra = {});

// Fails the test unless `r` is the CLI's one-line refusal: exit `code`, a
// single line on stderr starting "custody: " and saying `says`, and no PIN.
// The lines of the audit trail the config at `config_path` names (the file
// log, or the store's chains), read as `custody audit` reads them: every
// chain, or only `chain` (a node name).
std::vector<std::string> TrailLines(const std::string& config_path,
                                    const std::optional<std::string>& chain = std::nullopt);
// The records of the audit trail the config at `config_path` names (the
// file log, or the store's chains), read as `custody audit` reads them:
// every chain, or only `chain` (a node name). A record that does not parse
// fails the test.
std::vector<core::AuditRecord> TrailRecords(const std::string& config_path,
                                            const std::optional<std::string>& chain = std::nullopt);
void ExpectOneLine(const RunResult& r, int code, const std::string& says);

// The smallest policy: root (uid 0, as the tests run) is its admin.
inline constexpr const char* kRootAdminPolicy = "version = 1\nadmins = [\"user:root\"]\n[principals.\"user:root\"]\nuid = 0\n";

// One token, and the CLI run against it. Tests set up the state they need
// (InitWithPolicy, InitTpm) in their own SetUp.
class CliFixture : public ::testing::Test {
 protected:
  CliFixture() = default;
  // A token with another label, for tests that check the label shows.
  explicit CliFixture(const std::string& label) : token_(label) {}

  RunResult Cli(const std::vector<std::string>& args, const std::string& in = "", RunOptions options = {}) {
    return RunCli(cli_env_, args, in, std::move(options));
  }
  // Writes `text` beside the token as `name` and applies it.
  RunResult Apply(const std::string& text, const std::string& name = "policy.toml");
  RunResult InitTpm(const Swtpm& swtpm, const std::vector<std::string>& extra = {}) {
    return test::InitTpm(token_, swtpm, cli_env_, extra);
  }
  // `custody secret put`; fails the test if it fails.
  void Put(const std::string& path, const std::string& value);

  SoftHsmToken token_;
  // What every Cli() run sees: the config and the SoftHSM2 config. A TPM
  // test may leave SoftHSM2 out.
  std::map<std::string, std::string> cli_env_ = token_.CliEnv();
};

}  // namespace custody::test
