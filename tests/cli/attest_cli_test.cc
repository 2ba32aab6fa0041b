// `custody attest` and `attest verify` end to end: a statement from a real
// SoftHSM2 token (and a swtpm TPM) verifies offline, with the stock openssl
// command too; any change to any field, a wrong or missing nonce, or another
// token's key makes verify fail with 65 naming what failed.
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "../support/cli_fixture.h"
#include "custody/common/base64.h"

namespace custody::test {
namespace {

using nlohmann::json;

constexpr const char* kNonce = "00112233445566778899aabbccddeeff";

std::string Policy() {
  return R"(version = 1
admins = ["user:root"]
[principals."user:root"]
uid = 0
[projects.payments.environments.prod]
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
)";
}

class AttestCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (SoftHsmToken* t : {&a_, &b_}) {
      ASSERT_NO_FATAL_FAILURE(InitWithPolicy(*t, Policy()));
      ASSERT_EQ(Cli(*t, {"secret", "put", "payments/prod/k"}, "v").exit_code, 0);
      ASSERT_EQ(Cli(*t, {"audit", "checkpoint"}).exit_code, 0);
    }
  }
  RunResult Cli(const SoftHsmToken& t, const std::vector<std::string>& args, const std::string& in = "") {
    return RunCli(t.CliEnv(), args, in);
  }
  // A statement from token `t` with its attestation public key beside it.
  std::string Attest(const SoftHsmToken& t, std::vector<std::string> extra = {}) {
    std::string out = t.dir() / "statement.json";
    std::vector<std::string> args{"attest", "--out", out, "--pubkey-out", t.dir() / "ak.pem"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = Cli(t, args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return out;
  }
  RunResult Verify(const std::string& file, const std::string& pubkey, std::vector<std::string> extra = {}) {
    std::vector<std::string> args{"attest", "verify", file, "--pubkey", pubkey};
    args.insert(args.end(), extra.begin(), extra.end());
    return RunCustody(args, {});  // offline: no config, no token
  }
  static void Expect65(const RunResult& r, const std::string& says) {
    EXPECT_EQ(r.exit_code, 65) << r.out << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(says), std::string::npos) << "expected '" << says << "' in: " << r.err;
  }

  SoftHsmToken a_{"token-a"}, b_{"token-b"};
};

TEST_F(AttestCliTest, AStatementVerifiesOfflineAndWithOpenssl) {
  std::string st = Attest(a_, {"--nonce", kNonce});
  auto ok = Verify(st, a_.dir() / "ak.pem", {"--nonce", kNonce});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.out.find("statement verified"), std::string::npos);
  EXPECT_NE(ok.out.find("nonce matches"), std::string::npos);
  auto ossl = RunProgram("/usr/bin/openssl",
                         {"dgst", "-sha256", "-verify", a_.dir() / "ak.pem", "-signature", st + ".sig", st + ".bin"}, {});
  EXPECT_EQ(ossl.exit_code, 0) << ossl.err;
  EXPECT_NE(ossl.out.find("Verified OK"), std::string::npos);

  // What it says, as the token reports it: the KEK, the audit key and the
  // attestation key, all local and never extractable; the policy's hash;
  // the audit head.
  auto j = json::parse(ReadFile(st));
  const json& p = j["statement"];
  EXPECT_EQ(p["nonce"], kNonce);
  EXPECT_EQ(p["token"]["label"], "token-a");
  std::set<std::string> roles;
  for (const auto& k : p["keys"]) {
    roles.insert(k["role"].get<std::string>());
    EXPECT_EQ(k["attributes"]["never_extractable"], true) << k.dump();
    EXPECT_EQ(k["attributes"]["local"], true) << k.dump();
    EXPECT_EQ(k["attributes"]["extractable"], false) << k.dump();
  }
  EXPECT_EQ(roles, (std::set<std::string>{"kek", "audit", "attestation"}));
  EXPECT_EQ(p["policy"]["sha256"].get<std::string>().size(), 64u);
  EXPECT_GT(p["audit"]["head_seq"].get<uint64_t>(), 0u);
}

TEST_F(AttestCliTest, ChangingAnyFieldOfTheStatementMakesVerifyFail) {
  std::string st = Attest(a_, {"--nonce", kNonce});
  json file = json::parse(ReadFile(st));
  auto payload_bytes = Base64Decode(file["payload"].get<std::string>());
  ASSERT_TRUE(payload_bytes.has_value());
  json payload = json::parse(std::string(payload_bytes->begin(), payload_bytes->end()));
  // Every leaf of the signed payload, changed one at a time.
  std::vector<json::json_pointer> leaves;
  std::function<void(const json&, json::json_pointer)> walk = [&](const json& v, json::json_pointer at) {
    if (v.is_object()) {
      for (const auto& [k, x] : v.items()) walk(x, at / k);
    } else if (v.is_array()) {
      for (size_t i = 0; i < v.size(); ++i) walk(v[i], at / i);
    } else {
      leaves.push_back(at);
    }
  };
  walk(payload, json::json_pointer());
  ASSERT_GT(leaves.size(), 30u);
  std::string bad = a_.dir() / "bad.json";
  for (const auto& at : leaves) {
    json changed = payload;
    json& leaf = changed[at];
    if (leaf.is_boolean()) leaf = !leaf.get<bool>();
    else if (leaf.is_number()) leaf = leaf.get<int64_t>() + 1;
    else if (leaf.is_string()) leaf = leaf.get<std::string>() + "0";
    else leaf = "x";
    json f = file;
    f["payload"] = Base64Encode(changed.dump());
    WriteFile(bad, f.dump());
    auto r = Verify(bad, a_.dir() / "ak.pem");
    EXPECT_EQ(r.exit_code, 65) << "changing " << at.to_string() << " went unnoticed";
  }
  // The signature, and the frame around it.
  json f = file;
  std::string sig = f["signature"];
  sig[10] = sig[10] == 'A' ? 'B' : 'A';
  f["signature"] = sig;
  WriteFile(bad, f.dump());
  Expect65(Verify(bad, a_.dir() / "ak.pem"), "the signature does not verify");
  f = file;
  f["format"] = "custody-attestation-v0";
  WriteFile(bad, f.dump());
  Expect65(Verify(bad, a_.dir() / "ak.pem"), "format 'custody-attestation-v0'");
  WriteFile(bad, "{not json");
  Expect65(Verify(bad, a_.dir() / "ak.pem"), "not a JSON object");
  f = file;
  f.erase("payload");
  WriteFile(bad, f.dump());
  Expect65(Verify(bad, a_.dir() / "ak.pem"), "field 'payload' is missing");
}

// The file's readable copy is for people; verify vouches only for the
// signed bytes. A copy edited to show another key, policy or nonce beside a
// valid signature is refused (65, naming the first field that differs), and
// what verify prints comes from the signed bytes.
TEST_F(AttestCliTest, AReadableCopyThatDiffersFromTheSignedBytesIsRefused) {
  std::string st = Attest(a_, {"--nonce", kNonce});
  std::string ak = a_.dir() / "ak.pem";
  json file = json::parse(ReadFile(st));
  auto bytes = Base64Decode(file["payload"].get<std::string>());
  ASSERT_TRUE(bytes.has_value());
  json signed_payload = json::parse(std::string(bytes->begin(), bytes->end()));

  // Untouched: verified, and every value shown is the signed one.
  auto ok = Verify(st, ak, {"--nonce", kNonce});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.out.find("nonce matches"), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find(signed_payload["policy"]["sha256"].get<std::string>()), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find(signed_payload["audit"]["head_hash"].get<std::string>()), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find(std::string(kNonce) + " (matches)"), std::string::npos) << ok.out;
  size_t kek = signed_payload["keys"].size();
  for (size_t i = 0; i < signed_payload["keys"].size(); ++i) {
    const json& k = signed_payload["keys"][i];
    EXPECT_NE(ok.out.find(k["label"].get<std::string>()), std::string::npos) << ok.out;
    EXPECT_NE(ok.out.find(k["fingerprint"].get<std::string>()), std::string::npos) << ok.out;
    if (k.contains("id")) {
      EXPECT_NE(ok.out.find("id " + k["id"].get<std::string>()), std::string::npos) << ok.out;
    }
    if (k["role"] == "kek") kek = i;
  }
  ASSERT_LT(kek, signed_payload["keys"].size());
  auto j = RunCustody({"--json", "attest", "verify", st, "--pubkey", ak, "--nonce", kNonce}, {});
  ASSERT_EQ(j.exit_code, 0) << j.err;
  json shown = json::parse(j.out);
  EXPECT_EQ(shown["policy_sha256"], signed_payload["policy"]["sha256"]);
  EXPECT_EQ(shown["nonce"], kNonce);
  EXPECT_EQ(shown["key_list"][kek]["id"], signed_payload["keys"][kek]["id"]);

  // The readable copy alone edited: the signature still verifies, the file
  // is refused all the same.
  std::string bad = a_.dir() / "edited.json";
  std::string at_kek = "keys[" + std::to_string(kek) + "]";
  struct Edit {
    json::json_pointer at;
    json value;
    std::string says;
  };
  std::vector<Edit> edits{
      {json::json_pointer("/keys/" + std::to_string(kek) + "/id"), "00112233445566778899aabbccddeeff",
       "field " + at_kek + ".id of the readable copy differs"},
      {json::json_pointer("/policy/sha256"), std::string(64, 'a'), "field policy.sha256 of the readable copy differs"},
      {json::json_pointer("/nonce"), "ffeeddccbbaa99887766554433221100", "field nonce of the readable copy differs"},
      {json::json_pointer("/keys/" + std::to_string(kek) + "/attributes/extractable"), false,
       "field " + at_kek + ".attributes.extractable"},
  };
  for (const auto& e : edits) {
    json f = file;
    if (e.value.is_boolean()) {
      f["statement"][e.at] = !f["statement"][e.at].get<bool>();
    } else {
      f["statement"][e.at] = e.value;
    }
    WriteFile(bad, f.dump(2));
    Expect65(Verify(bad, ak, {"--nonce", kNonce}), e.says);
  }
  // A field added to the copy, or one taken away, is a difference too.
  json f = file;
  f["statement"]["hardware_attested"] = true;
  WriteFile(bad, f.dump(2));
  Expect65(Verify(bad, ak), "field hardware_attested of the readable copy differs");
  f = file;
  f["statement"]["keys"].erase(kek);
  WriteFile(bad, f.dump(2));
  Expect65(Verify(bad, ak), "of the readable copy differs");
  f = file;
  f["statement"] = "trust me";
  WriteFile(bad, f.dump(2));
  Expect65(Verify(bad, ak), "the readable copy differs");
  // Without a readable copy there is nothing to mislead: it verifies.
  f = file;
  f.erase("statement");
  WriteFile(bad, f.dump(2));
  EXPECT_EQ(Verify(bad, ak, {"--nonce", kNonce}).exit_code, 0);
}

TEST_F(AttestCliTest, AWrongOrMissingNonceFailsWhenOneIsRequired) {
  std::string with = Attest(a_, {"--nonce", kNonce});
  Expect65(Verify(with, a_.dir() / "ak.pem", {"--nonce", "ffeeddccbbaa99887766554433221100"}), "it is not fresh");
  std::string without = Attest(a_);
  Expect65(Verify(without, a_.dir() / "ak.pem", {"--nonce", kNonce}), "carries no nonce");
  EXPECT_EQ(Verify(without, a_.dir() / "ak.pem").exit_code, 0) << "no nonce required, none given";
  auto bad = Verify(with, a_.dir() / "ak.pem", {"--nonce", "xyz"});
  EXPECT_EQ(bad.exit_code, 64) << bad.err;
}

TEST_F(AttestCliTest, AStatementFromOneTokenDoesNotVerifyWithAnothersKey) {
  std::string from_a = Attest(a_);
  Attest(b_);
  Expect65(Verify(from_a, b_.dir() / "ak.pem"), "made by another key");
  EXPECT_EQ(Verify(from_a, a_.dir() / "ak.pem").exit_code, 0);
}

TEST(AttestTpmCliTest, ATpmStatementVerifies) {
  Swtpm swtpm;
  CUSTODY_REQUIRE_SWTPM(swtpm);
  SoftHsmToken t;
  RunOptions o;
  o.env = {{"CUSTODY_CONFIG", t.config_path()}};
  auto init = InitTpm(t, swtpm, o.env);
  ASSERT_EQ(init.exit_code, 0) << init.err;
  WriteFile(t.dir() / "policy.toml", Policy());
  ASSERT_EQ(RunCustody({"policy", "apply", t.dir() / "policy.toml"}, o).exit_code, 0);
  ASSERT_EQ(RunCustody({"audit", "checkpoint"}, o).exit_code, 0);
  std::string st = t.dir() / "statement.json";
  auto r = RunCustody({"attest", "--nonce", kNonce, "--out", st, "--pubkey-out", t.dir() / "ak.pem"}, o);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto v = RunCustody({"attest", "verify", st, "--pubkey", t.dir() / "ak.pem", "--nonce", kNonce}, {});
  EXPECT_EQ(v.exit_code, 0) << v.err;
  // The TPM's quote, over PCRs 0-7 with the nonce, verifies with the stock tool.
  auto cq = RunProgram("/usr/bin/tpm2_checkquote",
                       {"-u", st + ".ak.pem", "-m", st + ".quote.msg", "-s", st + ".quote.sig", "-f", st + ".quote.pcrs",
                        "-g", "sha256", "-q", kNonce},
                       {});
  EXPECT_EQ(cq.exit_code, 0) << cq.out << cq.err;
  auto cq_wrong = RunProgram("/usr/bin/tpm2_checkquote",
                             {"-u", st + ".ak.pem", "-m", st + ".quote.msg", "-s", st + ".quote.sig", "-g", "sha256",
                              "-q", "ffeeddccbbaa99887766554433221100"},
                             {});
  EXPECT_NE(cq_wrong.exit_code, 0) << "another nonce must not pass";
  auto j = json::parse(ReadFile(st));
  EXPECT_EQ(j["statement"]["backend"], "tpm");
  EXPECT_TRUE(j["statement"].contains("tpm_quote"));
  bool kek = false;
  for (const auto& k : j["statement"]["keys"]) {
    if (k["role"] != "kek") continue;
    kek = true;
    EXPECT_EQ(k["attributes"]["fixed_tpm"], true);
    EXPECT_EQ(k["fingerprint"].get<std::string>().rfind("tpm-name:000b", 0), 0u) << k.dump();
    EXPECT_TRUE(k.contains("certify")) << "TPM2_Certify of the KEK's sealed object";
  }
  EXPECT_TRUE(kek);
}

// One TPM host for the EK tests: its swtpm (with or without an EK
// certificate from its own local CA), its token folder and config, a policy
// and a KEK, and a first statement with a plain nonce.
struct TpmHost {
  explicit TpmHost(bool ek_certificate) : swtpm({.ek_certificate = ek_certificate}) {}
  void SetUp() {
    CUSTODY_REQUIRE_SWTPM(swtpm);
    o.env = {{"CUSTODY_CONFIG", t.config_path()}};
    auto init = InitTpm(t, swtpm, o.env);
    ASSERT_EQ(init.exit_code, 0) << init.err;
    WriteFile(t.dir() / "policy.toml", Policy());
    ASSERT_EQ(RunCustody({"policy", "apply", t.dir() / "policy.toml"}, o).exit_code, 0);
    auto put = RunCustody({"secret", "put", "payments/prod/k"}, RunOptions{.env = o.env, .stdin_data = "v"});
    ASSERT_EQ(put.exit_code, 0) << put.err;
    first = t.dir() / "first.json";
    ak = t.dir() / "ak.pem";
    auto r = RunCustody({"attest", "--nonce", kNonce, "--out", first, "--pubkey-out", ak}, o);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  RunResult Run(const std::vector<std::string>& args) const { return RunCustody(args, o); }
  Swtpm swtpm;
  SoftHsmToken t;
  RunOptions o;
  std::string first, ak;
};

RunResult Offline(const std::vector<std::string>& args) { return RunCustody(args, {}); }

// The whole EK chain, as a verifier who trusts only the TPM manufacturer's
// CA would run it: a challenge made from a statement's EK certificate and
// AK, answered by the host's TPM, and a statement whose nonce is the
// challenge's secret, checked against the CA. Another TPM cannot answer the
// challenge; another CA, a plain nonce or another challenge's key fail.
TEST(AttestTpmCliTest, AnEkChallengeChainsTheStatementToTheTpmManufacturersCa) {
  TpmHost host(true);
  ASSERT_NO_FATAL_FAILURE(host.SetUp());
  if (::testing::Test::IsSkipped()) return;
  auto first = json::parse(ReadFile(host.first));
  ASSERT_TRUE(first["statement"]["tpm_ek"]["certificate"].is_string()) << first["statement"].dump();
  std::string dir = host.t.dir().path();
  std::string ch = dir + "/challenge.json", key = dir + "/challenge.key";
  auto c = Offline({"attest", "challenge", host.first, "--pubkey", host.ak, "--ek-ca", host.swtpm.ek_ca(), "--out", ch,
                    "--key-out", key});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  EXPECT_NE(c.out.find("issued by CN=swtpm-localca"), std::string::npos) << c.out;
  auto secret = json::parse(ReadFile(key))["nonce"].get<std::string>();
  EXPECT_EQ(ReadFile(ch).find(secret), std::string::npos) << "the challenge must not carry its secret in clear";

  std::string st = dir + "/answer.json";
  auto answer = host.Run({"attest", "--challenge", ch, "--out", st});
  ASSERT_EQ(answer.exit_code, 0) << answer.err;
  auto signed_part = json::parse(ReadFile(st))["statement"];
  EXPECT_EQ(signed_part["nonce"], secret) << "only the TPM that holds the EK could recover it";
  auto v = Offline({"attest", "verify", st, "--pubkey", host.ak, "--ek-ca", host.swtpm.ek_ca(), "--challenge-key", key});
  ASSERT_EQ(v.exit_code, 0) << v.err;
  EXPECT_NE(v.out.find("activated the challenge"), std::string::npos) << v.out;
  auto vj = Offline({"attest", "verify", st, "--pubkey", host.ak, "--ek-ca", host.swtpm.ek_ca(), "--challenge-key", key,
                     "--json"});
  ASSERT_EQ(vj.exit_code, 0) << vj.err;
  EXPECT_EQ(json::parse(vj.out)["ek_chained"], true);
  // Without the EK check, verify says the AK is not shown to be genuine.
  auto plain = Offline({"attest", "verify", st, "--pubkey", host.ak});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_NE(plain.out.find("not checked: the AK is not shown to be a genuine TPM"), std::string::npos) << plain.out;

  // Another TPM, with its own EK certificate and CA.
  TpmHost other(true);
  ASSERT_NO_FATAL_FAILURE(other.SetUp());
  // ... cannot answer this TPM's challenge,
  auto stolen = other.Run({"attest", "--challenge", ch, "--out", other.t.dir() / "stolen.json"});
  ExpectOneLine(stolen, 65, "not made for this TPM's endorsement key");
  // ... and its CA does not vouch for this TPM's EK.
  auto wrong_ca = Offline({"attest", "verify", st, "--pubkey", host.ak, "--ek-ca", other.swtpm.ek_ca(),
                           "--challenge-key", key});
  ExpectOneLine(wrong_ca, 65, "does not chain to --ek-ca");
  auto wrong_ca_challenge = Offline({"attest", "challenge", host.first, "--pubkey", host.ak, "--ek-ca",
                                     other.swtpm.ek_ca(), "--out", dir + "/c2.json", "--key-out", dir + "/c2.key"});
  ExpectOneLine(wrong_ca_challenge, 65, "does not chain to --ek-ca");
  // A statement with a nonce of its own choosing is not an answer.
  auto replay = Offline({"attest", "verify", host.first, "--pubkey", host.ak, "--ek-ca", host.swtpm.ek_ca(),
                         "--challenge-key", key});
  ExpectOneLine(replay, 65, "not fresh");
  // The other TPM's answer to its own challenge does not pass for this one's.
  std::string och = other.t.dir() / "challenge.json", okey = other.t.dir() / "challenge.key";
  ASSERT_EQ(Offline({"attest", "challenge", other.first, "--pubkey", other.ak, "--ek-ca", other.swtpm.ek_ca(), "--out",
                     och, "--key-out", okey})
                .exit_code,
            0);
  std::string ost = other.t.dir() / "answer.json";
  ASSERT_EQ(other.Run({"attest", "--challenge", och, "--out", ost}).exit_code, 0);
  ExpectOneLine(Offline({"attest", "verify", ost, "--pubkey", other.ak, "--ek-ca", host.swtpm.ek_ca(),
                         "--challenge-key", okey}),
                65, "does not chain to --ek-ca");
  ExpectOneLine(Offline({"attest", "verify", ost, "--pubkey", other.ak, "--ek-ca", other.swtpm.ek_ca(),
                         "--challenge-key", key}),
                65, "not fresh");
  // The EK CA alone proves nothing about the AK: it needs the challenge.
  auto no_key = Offline({"attest", "verify", st, "--pubkey", host.ak, "--ek-ca", host.swtpm.ek_ca()});
  EXPECT_EQ(no_key.exit_code, 64) << no_key.err;
  // A file that is not a challenge is refused before the TPM is asked.
  auto garbage = host.Run({"attest", "--challenge", host.ak, "--out", dir + "/x.json"});
  ExpectOneLine(garbage, 65, "EK challenge");
}

TEST(AttestTpmCliTest, ATpmWithoutAnEkCertificateCannotBeChallenged) {
  TpmHost host(false);
  ASSERT_NO_FATAL_FAILURE(host.SetUp());
  if (::testing::Test::IsSkipped()) return;
  auto first = json::parse(ReadFile(host.first));
  EXPECT_TRUE(first["statement"]["tpm_ek"]["certificate"].is_null());
  Swtpm with_ca({.ek_certificate = true});
  CUSTODY_REQUIRE_SWTPM(with_ca);
  auto c = Offline({"attest", "challenge", host.first, "--pubkey", host.ak, "--ek-ca", with_ca.ek_ca(), "--out",
                    host.t.dir() / "c.json", "--key-out", host.t.dir() / "c.key"});
  ExpectOneLine(c, 65, "carries no EK certificate");
}

}  // namespace
}  // namespace custody::test
