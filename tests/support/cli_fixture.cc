#include "cli_fixture.h"

#include <algorithm>

#include "custody/app/backend.h"
#include "custody/app/config.h"

namespace custody::test {

RunResult RunCli(const std::map<std::string, std::string>& env, const std::vector<std::string>& args,
                 const std::string& in, RunOptions options) {
  std::map<std::string, std::string> all = env;
  for (const auto& [k, v] : options.env) all[k] = v;
  options.env = std::move(all);
  options.stdin_data = in;
  return RunCustody(args, options);
}

void InitWithPolicy(const SoftHsmToken& token, const std::string& policy) {
  token.InitCli();
  WriteFile(token.dir() / "policy.toml", policy);
  auto r = RunCli(token.CliEnv(), {"policy", "apply", token.dir() / "policy.toml"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

RunResult InitTpm(const SoftHsmToken& token, const Swtpm& swtpm, const std::map<std::string, std::string>& env,
                  const std::vector<std::string>& extra) {
  std::vector<std::string> args{"init", "--backend", "tpm", "--tcti", swtpm.tcti(), "--pin-file", token.pin_file(),
                                "--state-dir", token.dir() / "state"};
  for (auto& a : TestStoreArgs()) args.push_back(std::move(a));
  args.insert(args.end(), extra.begin(), extra.end());
  return RunCli(env, args);
}

void ExpectOneLine(const RunResult& r, int code, const std::string& says) {
  EXPECT_EQ(r.exit_code, code) << r.err;
  EXPECT_EQ(r.err.rfind("custody: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line, got: " << r.err;
  EXPECT_NE(r.err.find(says), std::string::npos) << "expected '" << says << "' in: " << r.err;
  EXPECT_EQ(r.err.find(SoftHsmToken::kPin), std::string::npos);
}

RunResult CliFixture::Apply(const std::string& text, const std::string& name) {
  WriteFile(token_.dir() / name, text);
  return Cli({"policy", "apply", token_.dir() / name});
}

void CliFixture::Put(const std::string& path, const std::string& value) {
  auto r = Cli({"secret", "put", path}, value);
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

std::vector<std::string> TrailLines(const std::string& config_path, const std::optional<std::string>& chain) {
  std::vector<std::string> out;
  auto config = core::LoadConfig(config_path);
  EXPECT_TRUE(config.ok()) << (config.ok() ? "" : config.error().message());
  if (!config.ok()) return out;
  auto storage = core::OpenAuditStorage(*config);
  EXPECT_TRUE(storage.ok()) << (storage.ok() ? "" : storage.error().message());
  if (!storage.ok()) return out;
  auto chains = (*storage)->Chains();
  EXPECT_TRUE(chains.ok()) << (chains.ok() ? "" : chains.error().message());
  if (!chains.ok()) return out;
  for (const auto& c : *chains) {
    if (chain && c != *chain) continue;
    Status read = (*storage)->Read(c, [&](core::AuditChainLine&& l) { out.push_back(std::move(l.text)); });
    EXPECT_TRUE(read.ok()) << (read.ok() ? "" : read.error().message());
  }
  return out;
}

std::vector<core::AuditRecord> TrailRecords(const std::string& config_path, const std::optional<std::string>& chain) {
  std::vector<core::AuditRecord> out;
  for (const auto& line : TrailLines(config_path, chain)) {
    auto r = core::ParseAuditRecord(line);
    EXPECT_TRUE(r.ok()) << line << ": " << (r.ok() ? "" : r.error().message());
    if (r.ok()) out.push_back(std::move(*r));
  }
  return out;
}

}  // namespace custody::test
