#include "cli_fixture.h"

#include <algorithm>

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

}  // namespace custody::test
