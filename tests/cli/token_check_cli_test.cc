// `custody token check` on a real SoftHSM2 token, and on the same token
// behind the fault module with AES-GCM taken away: what a user sees is the
// table (or --json), exit 0 when custody has all it needs and 1 naming what
// is missing, and with --against the differences from a saved report.
#include <gtest/gtest.h>

#include <algorithm>

#include <nlohmann/json.hpp>

#include "../support/cli_fixture.h"

namespace custody::test {
namespace {

using nlohmann::json;

class TokenCheckCliTest : public CliFixture {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(InitWithPolicy(token_, kRootAdminPolicy)); }
  static bool Present(const json& report, const std::string& id) {
    for (const auto& c : report["capabilities"]) {
      if (c["id"] == id) return c["present"].get<bool>();
    }
    ADD_FAILURE() << "no capability " << id << " in " << report.dump();
    return false;
  }
  // The same token through the fault module, without a config, with the
  // mechanisms in `hide` (hex, comma-separated) taken away.
  RunResult Bare(const std::vector<std::string>& extra, const std::string& hide) {
    std::vector<std::string> args{"token", "check", "--module", FAULTY_PKCS11, "--token", token_.uri(), "--pin-file",
                                  token_.pin_file()};
    args.insert(args.end(), extra.begin(), extra.end());
    RunOptions o;
    o.env = {{"SOFTHSM2_CONF", token_.conf()}, {"CUSTODY_FAULT_NO_MECHS", hide}};
    return RunCustody(args, o);
  }
};

TEST_F(TokenCheckCliTest, SoftHsmHasEverythingCustodyNeedsAndNothingIsLeftInTheToken) {
  auto before = Cli({"--json", "token", "info"});
  ASSERT_EQ(before.exit_code, 0) << before.err;
  auto r = Cli({"--json", "token", "check"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  auto j = json::parse(r.out);
  for (const char* id : {"login", "rng", "aes256_keygen", "aes_gcm", "ec_p256_ecdsa"}) EXPECT_TRUE(Present(j, id)) << id;
  EXPECT_TRUE(j["missing_required"].empty());
  auto text = Cli({"token", "check"});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_NE(text.out.find("aes_gcm"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("a tampered tag is refused"), std::string::npos) << text.out;
  // Only session objects were made: the token's objects are as before.
  auto after = Cli({"--json", "token", "info"});
  EXPECT_EQ(json::parse(after.out)["objects"], json::parse(before.out)["objects"]);
  // The check is audited like token info.
  auto shown = Cli({"audit", "show", "--action", "token.check"});
  EXPECT_NE(shown.out.find("token.check"), std::string::npos) << shown.out << shown.err;
}

TEST_F(TokenCheckCliTest, ATokenWithoutAesGcmExits1NamingItAndDiffersFromTheSavedReport) {
  auto saved = Cli({"--json", "token", "check"});
  ASSERT_EQ(saved.exit_code, 0) << saved.err;
  const std::string report = token_.dir() / "softhsm-report.json";
  WriteFile(report, saved.out);
  // Without a config, through the fault module with CKM_AES_GCM (0x1087) hidden.
  auto r = Bare({}, "0x1087");
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("required capability missing: aes_gcm"), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("MISSING"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("secrets cannot be sealed"), std::string::npos) << "what custody does without it: " << r.out;
  auto j = Bare({"--json", "--against", report}, "0x1087");
  EXPECT_EQ(j.exit_code, 1) << j.err;
  auto parsed = json::parse(j.out);
  EXPECT_FALSE(Present(parsed, "aes_gcm"));
  EXPECT_TRUE(Present(parsed, "aes256_keygen"));
  ASSERT_EQ(parsed["differences"].size(), 1u) << parsed.dump();
  EXPECT_NE(parsed["differences"][0].get<std::string>().find("aes_gcm: missing here, present on"), std::string::npos);
  // The same token with nothing hidden matches the saved report.
  auto same = Bare({"--json", "--against", report}, "");
  EXPECT_EQ(same.exit_code, 0) << same.err;
  EXPECT_TRUE(json::parse(same.out)["differences"].empty()) << same.out;
  // A report that is not one is refused naming the file.
  for (const char* junk : {"{\"x\":1}", "{\"format\":5,\"capabilities\":[]}", "[1,2]", "not json",
                           "{\"format\":\"custody-token-check-v1\",\"capabilities\":{}}"}) {
    WriteFile(token_.dir() / "junk.json", junk);
    ExpectOneLine(Bare({"--against", token_.dir() / "junk.json"}, ""), 65,
                  "is not a saved `custody token check --json` report");
  }
  // Nor is a file far larger than any report (read no further than 1 MiB).
  WriteFile(token_.dir() / "junk.json", "{\"format\":\"custody-token-check-v1\",\"capabilities\":[]}" +
                                            std::string(2 * 1024 * 1024, ' '));
  ExpectOneLine(Bare({"--against", token_.dir() / "junk.json"}, ""), 65, "(larger than 1 MiB)");
  // Entries of the wrong shape inside a good frame are skipped, not trusted.
  WriteFile(token_.dir() / "odd.json",
            "{\"format\":\"custody-token-check-v1\",\"token\":7,\"capabilities\":[1,{\"id\":2},{\"id\":\"rng\",\"present\":\"yes\"}]}");
  auto odd = Bare({"--json", "--against", token_.dir() / "odd.json"}, "");
  ASSERT_EQ(odd.exit_code, 0) << odd.err;
  const auto diffs = json::parse(odd.out)["differences"];
  EXPECT_NE(std::find(diffs.begin(), diffs.end(), "rng: not in the saved report"), diffs.end()) << diffs.dump();
}

}  // namespace
}  // namespace custody::test
