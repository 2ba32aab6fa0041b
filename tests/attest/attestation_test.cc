// attest verify's checks of TPM evidence, with statements signed here by a
// software key (so the test can write any payload) around a real swtpm
// quote: the evidence must carry the statement's nonce, a valid TPM
// signature by the quote's key, and exactly the quoted PCR values.
#include <gtest/gtest.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <array>
#include <functional>
#include <nlohmann/json.hpp>

#include "../support/testenv.h"
#include "custody/attest/attestation.h"
#include "custody/attest/endorsement.h"
#include "custody/audit/audit.h"
#include "custody/common/base64.h"
#include "custody/common/hex.h"
#include "custody/hsm/objects.h"
#include "custody/tpm/tpm.h"

namespace custody::core {
namespace {

using nlohmann::json;

struct SoftwareKey {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  ~SoftwareKey() { EVP_PKEY_free(key); }
  std::string Pem() const {
    BIO* b = BIO_new(BIO_s_mem());
    PEM_write_bio_PUBKEY(b, key);
    char* p = nullptr;
    long n = BIO_get_mem_data(b, &p);
    std::string out(p, static_cast<size_t>(n));
    BIO_free(b);
    return out;
  }
  std::vector<uint8_t> Sign(const std::string& msg) const {
    EVP_MD_CTX* c = EVP_MD_CTX_new();
    size_t len = 0;
    EVP_DigestSignInit(c, nullptr, EVP_sha256(), nullptr, key);
    EVP_DigestSign(c, nullptr, &len, reinterpret_cast<const unsigned char*>(msg.data()), msg.size());
    std::vector<uint8_t> sig(len);
    EVP_DigestSign(c, sig.data(), &len, reinterpret_cast<const unsigned char*>(msg.data()), msg.size());
    sig.resize(len);
    EVP_MD_CTX_free(c);
    return sig;
  }
};

constexpr const char* kNonce = "00112233445566778899aabbccddeeff";

class TpmEvidenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CUSTODY_REQUIRE_SWTPM(swtpm_);
    auto t = tpm::Tpm::Open({.tcti = swtpm_.tcti()});
    ASSERT_TRUE(t.ok()) << t.error().message();
    std::vector<uint8_t> nonce;
    for (size_t i = 0; i < 32; i += 2) nonce.push_back(static_cast<uint8_t>(std::stoi(std::string(kNonce).substr(i, 2), nullptr, 16)));
    auto q = (*t)->QuotePcrs(nonce, {0, 1, 2, 3});
    ASSERT_TRUE(q.ok()) << q.error().message();
    quote_ = *q;
    tpm_ = std::move(*t);
  }
  // A statement around `quote`, signed by the software key.
  std::string Statement(const json& tpm_quote, const json& keys = json::array()) {
    auto fp = PublicKeyFingerprint(key_.Pem());
    json p{{"format", kStatementFormat}, {"time", "2026-11-29T00:00:00Z"}, {"nonce", kNonce}, {"backend", "tpm"},
           {"token", json::object()}, {"keys", keys}, {"policy", {{"sha256", "x"}}},
           {"audit", {{"head_seq", 1}, {"head_hash", "h"}}}, {"attestation_key", {{"fingerprint", *fp}}},
           {"tpm_quote", tpm_quote}};
    std::string bytes = p.dump();
    return EncodeStatementFile(bytes, key_.Sign(bytes), key_.Pem());
  }
  json QuoteJson() {
    return {{"pcrs", quote_.pcrs}, {"pcr_values", ToHex(quote_.pcr_values)},
            {"message", Base64Encode(quote_.attested.message)}, {"signature", Base64Encode(quote_.attested.signature)},
            {"ak_public_key", *P256PublicKeyPem(quote_.ak_point)}, {"ak_name", quote_.ak_name}};
  }
  test::Swtpm swtpm_;
  tpm::Quote quote_;
  SoftwareKey key_;
  std::unique_ptr<tpm::Tpm> tpm_;
};

// The AK's public area, when a statement carries it, must be the quoted
// AK's (its Name) and a restricted signing key made in the TPM; the signing
// key a statement says the AK certified must be the key that signed it.
TEST_F(TpmEvidenceTest, TheAkPublicAreaAndTheCertifiedSignerMustBeTheOnesUsed) {
  json q = QuoteJson();
  q["ak_public_area"] = Base64Encode(quote_.ak_public);
  auto ok = VerifyStatementFile(Statement(q), key_.Pem(), std::string(kNonce));
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_EQ(ok->ak_public_area, quote_.ak_public);
  EXPECT_FALSE(ok->signer_certified);
  // Another TPM key's public area (unrestricted, another Name).
  auto other = tpm_->CreateSigningKey(SecretBuffer::Copy("a"));
  ASSERT_TRUE(other.ok()) << other.error().message();
  q["ak_public_area"] = Base64Encode(other->blobs.public_area);
  auto v = VerifyStatementFile(Statement(q), key_.Pem(), std::string(kNonce));
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.error().message().find("is not the public area of the AK named in the quote"), std::string::npos)
      << v.error().message();
  // An attestation key entry whose certified TPM key is not the key that
  // signed the statement (here a software key signs).
  q["ak_public_area"] = Base64Encode(quote_.ak_public);
  std::vector<uint8_t> nonce = *FromHex(kNonce);
  auto cert = tpm_->Certify(other->blobs, SecretBuffer::Copy("a"), nonce);
  ASSERT_TRUE(cert.ok()) << cert.error().message();
  auto described = tpm::Describe(other->blobs);
  json keys = json::array({json{{"role", "attestation"}, {"label", "custody:attest:v1"}, {"attributes", json::object()},
                                {"fingerprint", *PublicKeyFingerprint(key_.Pem())}, {"tpm_name", described->name},
                                {"public_area", Base64Encode(other->blobs.public_area)},
                                {"certify", {{"message", Base64Encode(cert->message)},
                                             {"signature", Base64Encode(cert->signature)}}}}});
  v = VerifyStatementFile(Statement(q, keys), key_.Pem(), std::string(kNonce));
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.error().message().find("is not the key that signed the statement"), std::string::npos)
      << v.error().message();
  // The same entry with another object's public area.
  keys[0]["public_area"] = Base64Encode(quote_.ak_public);
  v = VerifyStatementFile(Statement(q, keys), key_.Pem(), std::string(kNonce));
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.error().message().find("is not the certified object's public area"), std::string::npos)
      << v.error().message();
}

// The positive case: a statement signed by a TPM signing key that the AK
// certified with the nonce, its public area beside it, is the TPM's
// (signer_certified), as `custody attest` makes them.
TEST_F(TpmEvidenceTest, AStatementSignedByAKeyTheAkCertifiedIsTheTpms) {
  const SecretBuffer auth = SecretBuffer::Copy("attest-key-auth");
  auto key = tpm_->CreateSigningKey(auth);
  ASSERT_TRUE(key.ok()) << key.error().message();
  auto pem = P256PublicKeyPem(key->point);
  ASSERT_TRUE(pem.ok());
  auto fp = PublicKeyFingerprint(*pem);
  ASSERT_TRUE(fp.ok());
  auto cert = tpm_->Certify(key->blobs, auth, *FromHex(kNonce));
  ASSERT_TRUE(cert.ok()) << cert.error().message();
  auto described = tpm::Describe(key->blobs);
  ASSERT_TRUE(described.ok());
  json q = QuoteJson();
  q["ak_public_area"] = Base64Encode(quote_.ak_public);
  json keys = json::array({json{{"role", "attestation"}, {"label", "custody:attest:v1"}, {"attributes", json::object()},
                                {"fingerprint", *fp}, {"tpm_name", described->name},
                                {"public_area", Base64Encode(key->blobs.public_area)},
                                {"certify", {{"message", Base64Encode(cert->message)},
                                             {"signature", Base64Encode(cert->signature)}}}}});
  json p{{"format", kStatementFormat}, {"time", "2026-11-29T00:00:00Z"}, {"nonce", kNonce}, {"backend", "tpm"},
         {"token", json::object()}, {"keys", keys}, {"policy", {{"sha256", "x"}}},
         {"audit", {{"head_seq", 1}, {"head_hash", "h"}}}, {"attestation_key", {{"fingerprint", *fp}}},
         {"tpm_quote", q}};
  const std::string bytes = p.dump();
  std::array<uint8_t, 32> digest{};
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest.data(), &len, EVP_sha256(), nullptr);
  auto rs = tpm_->Sign(*key, auth, digest);
  ASSERT_TRUE(rs.ok()) << rs.error().message();
  auto der = P256SignatureDer(*rs);
  ASSERT_TRUE(der.ok());
  auto v = VerifyStatementFile(EncodeStatementFile(bytes, *der, *pem), *pem, std::string(kNonce));
  ASSERT_TRUE(v.ok()) << v.error().message();
  EXPECT_TRUE(v->signer_certified);
  EXPECT_EQ(v->ak_name, quote_.ak_name);
}

// VerifyEndorsement's own checks, each alone: a summary that passes, then
// the same with one property taken away.
TEST(EkEndorsement, EachMissingLinkOfTheChainIsRefusedByName) {
  test::Swtpm swtpm({.ek_certificate = true});
  CUSTODY_REQUIRE_SWTPM(swtpm);
  auto t = tpm::Tpm::Open({.tcti = swtpm.tcti()});
  ASSERT_TRUE(t.ok());
  auto cert = (*t)->EkCertificate();
  ASSERT_TRUE(cert.ok()) << cert.error().message();
  auto q = (*t)->QuotePcrs(*FromHex(kNonce), {0});
  ASSERT_TRUE(q.ok());
  std::string ca = test::ReadFile(swtpm.ek_ca());
  StatementSummary s;
  s.ak_name = q->ak_name;
  s.ak_public_area = q->ak_public;
  s.ek_certificate = *cert;
  s.signer_certified = true;
  auto c = MakeEkChallenge(s, ca);
  ASSERT_TRUE(c.ok()) << c.error().message();
  auto key = ParseEkChallengeKey(c->key);
  ASSERT_TRUE(key.ok()) << key.error().message();
  s.nonce = key->nonce;
  auto good = VerifyEndorsement(s, ca, *key);
  ASSERT_TRUE(good.ok()) << good.error().message();
  EXPECT_EQ(good->ek_issuer, "CN=swtpm-localca");
  auto refused = [&](StatementSummary changed, const std::string& says) {
    auto r = VerifyEndorsement(changed, ca, *key);
    ASSERT_FALSE(r.ok()) << says;
    EXPECT_EQ(r.error().category(), Category::kIntegrity);
    EXPECT_NE(r.error().message().find(says), std::string::npos) << r.error().message();
  };
  StatementSummary x = s;
  x.nonce = kNonce;
  refused(x, "not the challenge's secret");
  x = s;
  x.ek_certificate.clear();
  refused(x, "carries no EK certificate");
  x = s;
  x.ak_name.back() = x.ak_name.back() == '0' ? '1' : '0';
  refused(x, "not the one the challenge was bound to");
  x = s;
  x.signer_certified = false;
  refused(x, "not certified by the AK");
  x = s;
  x.ak_public_area.clear();
  refused(x, "does not carry its AK's public area");
  // A key kept for a challenge to another EK certificate (the nonce the same).
  EkChallengeKey other_cert = *key;
  other_cert.ek_cert_sha256 = std::string(64, '0');
  auto mismatch = VerifyEndorsement(s, ca, other_cert);
  ASSERT_FALSE(mismatch.ok());
  EXPECT_NE(mismatch.error().message().find("not the one the challenge was made for"), std::string::npos)
      << mismatch.error().message();
  // The challenge carries no secret in clear, and parses back.
  auto parsed = ParseEkChallenge(c->challenge);
  ASSERT_TRUE(parsed.ok()) << parsed.error().message();
  EXPECT_EQ(parsed->ak_name, q->ak_name);
  EXPECT_EQ(c->challenge.find(key->nonce), std::string::npos);
  // The secret goes back only through the TPM.
  auto back = (*t)->ActivateCredential(parsed->credential_blob, parsed->encrypted_secret);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(ToHex(*back), key->nonce);
}

TEST_F(TpmEvidenceTest, AGenuineQuoteVerifies) {
  auto v = VerifyStatementFile(Statement(QuoteJson()), key_.Pem(), std::string(kNonce));
  EXPECT_TRUE(v.ok()) << v.error().message();
}

TEST_F(TpmEvidenceTest, PcrValuesOtherThanTheQuotedOnesAreRefused) {
  json q = QuoteJson();
  std::string values = q["pcr_values"];
  values[0] = values[0] == 'f' ? '0' : 'f';
  q["pcr_values"] = values;
  auto v = VerifyStatementFile(Statement(q), key_.Pem(), std::string(kNonce));
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.error().message().find("not the ones the TPM quoted"), std::string::npos) << v.error().message();
}

TEST_F(TpmEvidenceTest, AQuoteSignedByAnotherKeyOrForgedIsRefused) {
  // The quote's AK replaced by another key: the TPM signature no longer verifies.
  SoftwareKey other;
  json q = QuoteJson();
  q["ak_public_key"] = other.Pem();
  auto v = VerifyStatementFile(Statement(q), key_.Pem(), std::string(kNonce));
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.error().message().find("TPM signature does not verify"), std::string::npos) << v.error().message();
  // A quote message changed after the TPM signed it.
  q = QuoteJson();
  auto msg = quote_.attested.message;
  msg.back() ^= 1;
  q["message"] = Base64Encode(msg);
  v = VerifyStatementFile(Statement(q), key_.Pem(), std::string(kNonce));
  EXPECT_FALSE(v.ok());
}

// The file's readable copy must be the signed payload, to the last field:
// verify names the first one that differs, though the signature is good.
TEST(StatementReadableCopy, MustBeExactlyTheSignedPayload) {
  SoftwareKey key;
  auto fp = PublicKeyFingerprint(key.Pem());
  ASSERT_TRUE(fp.ok());
  json p{{"format", kStatementFormat}, {"time", "2026-11-29T00:00:00Z"}, {"nonce", kNonce}, {"backend", "pkcs11"},
         {"token", json::object()},
         {"keys", {{{"role", "kek"}, {"label", "custody:kek:payments:v1"}, {"id", "0099ec18"}, {"fingerprint", "kcv:1a2b3c"},
                    {"attributes", {{"extractable", false}}}}}},
         {"policy", {{"version", 3}, {"sha256", "5f1c"}}}, {"audit", {{"head_seq", 42}, {"head_hash", "9ab0"}}},
         {"attestation_key", {{"fingerprint", *fp}}}};
  std::string bytes = p.dump();
  json file = json::parse(EncodeStatementFile(bytes, key.Sign(bytes), key.Pem()));
  auto v = VerifyStatementFile(file.dump(), key.Pem(), std::string(kNonce));
  ASSERT_TRUE(v.ok()) << v.error().message();
  // What it reports is the signed payload's.
  EXPECT_EQ(v->policy_sha256, "5f1c");
  EXPECT_EQ(v->policy_version, 3u);
  EXPECT_EQ(v->audit_head_hash, "9ab0");
  ASSERT_EQ(v->key_list.size(), 1u);
  EXPECT_EQ(v->key_list[0].id, "0099ec18");
  EXPECT_EQ(v->key_list[0].fingerprint, "kcv:1a2b3c");
  EXPECT_EQ(v->attestation_key, *fp);

  const std::pair<std::string, std::string> edits[] = {
      {"/keys/0/id", "keys[0].id"},
      {"/policy/sha256", "policy.sha256"},
      {"/nonce", "nonce"},
      {"/audit/head_seq", "audit.head_seq"},
  };
  for (const auto& [at, field] : edits) {
    json f = file;
    json& leaf = f["statement"][json::json_pointer(at)];
    leaf = leaf.is_number() ? json(7) : json("ffee");
    auto bad = VerifyStatementFile(f.dump(), key.Pem(), std::nullopt);
    ASSERT_FALSE(bad.ok()) << at;
    EXPECT_EQ(bad.error().category(), Category::kIntegrity);
    EXPECT_EQ(bad.error().message(), "attestation statement: field " + field +
                                         " of the readable copy differs from the signed payload: the file was "
                                         "changed after it was signed");
  }
}

// Statements changed and then signed again with the right key: the
// signature is good, so each refusal below comes from verify's structure and
// key-binding checks, which a plain tampering test (failing at the
// signature) never reaches.
TEST(StatementChecksBehindAGoodSignature, EachMalformedOrUnboundStatementIsRefusedForItsOwnReason) {
  SoftwareKey key;
  auto fp = PublicKeyFingerprint(key.Pem());
  ASSERT_TRUE(fp.ok());
  const json genuine{{"format", kStatementFormat}, {"time", "2026-11-29T00:00:00Z"}, {"nonce", kNonce},
                     {"backend", "pkcs11"}, {"token", json::object()},
                     {"keys", {{{"role", "kek"}, {"label", "custody:kek:payments:v1"}, {"id", "0099ec18"},
                                {"fingerprint", "kcv:1a2b3c"}, {"attributes", {{"extractable", false}}}}}},
                     {"policy", {{"version", 3}, {"sha256", "5f1c"}}},
                     {"audit", {{"head_seq", 42}, {"head_hash", "9ab0"}}},
                     {"attestation_key", {{"fingerprint", *fp}}}};
  auto verify = [&](const json& payload) {
    std::string bytes = payload.dump();
    return VerifyStatementFile(EncodeStatementFile(bytes, key.Sign(bytes), key.Pem()), key.Pem(),
                               std::string(kNonce));
  };
  ASSERT_TRUE(verify(genuine).ok());
  struct Case {
    const char* what;
    std::function<void(json&)> change;
    const char* refusal;
  };
  const Case cases[] = {
      {"another format", [](json& p) { p["format"] = "custody-attest/0"; }, "payload format is not"},
      {"a key that is not an object", [](json& p) { p["keys"][0] = "kek"; }, "payload field keys[0] is not an object"},
      {"an attribute that is not a boolean", [](json& p) { p["keys"][0]["attributes"]["extractable"] = "no"; },
       "is not true or false"},
      {"no policy", [](json& p) { p.erase("policy"); }, "is missing or has the wrong type"},
      {"another attestation key named", [](json& p) { p["attestation_key"]["fingerprint"] = "sha256:00"; },
       "the payload names attestation key sha256:00"},
      {"a stale nonce", [](json& p) { p["nonce"] = "ffeeddccbbaa99887766554433221100"; }, "it is not fresh"},
  };
  for (const auto& c : cases) {
    json p = genuine;
    c.change(p);
    auto v = verify(p);
    ASSERT_FALSE(v.ok()) << c.what << " was accepted";
    EXPECT_EQ(v.error().category(), Category::kIntegrity) << c.what;
    EXPECT_EQ(v.error().message().find("signature does not verify"), std::string::npos)
        << c.what << ": refused at the signature, not by its own check";
    EXPECT_NE(v.error().message().find(c.refusal), std::string::npos) << c.what << ": " << v.error().message();
  }
}

}  // namespace
}  // namespace custody::core
