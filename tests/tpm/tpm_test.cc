// The TPM layer against a real swtpm (one per test, no resource manager):
// sealing, unsealing, PCR policy, errors, no transient-slot leaks, the
// signing key, and interop with tpm2-tools.
#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include "../support/testenv.h"
#include "custody/audit/audit.h"
#include "custody/common/hex.h"
#include "custody/tpm/tpm.h"

namespace custody::tpm {
namespace {

using test::Swtpm;

SecretBuffer S(std::string_view s) { return SecretBuffer::Copy(s); }

class TpmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CUSTODY_REQUIRE_SWTPM(swtpm_);
    auto t = Tpm::Open({.tcti = swtpm_.tcti()});
    ASSERT_TRUE(t.ok()) << t.error().message();
    tpm_ = std::move(*t);
  }
  Swtpm swtpm_;
  std::unique_ptr<Tpm> tpm_;
};

// The TPM restarts (swtpm killed and started on the same state): the
// connection and every transient object are gone. The failure says so
// (LooksLost), Reconnect makes a new connection with the same SRK, what was
// sealed before unseals, and no transient object is left over.
TEST_F(TpmTest, AfterTheTpmRestartsAReconnectServesAgainWithNoHandleLeft) {
  auto obj = tpm_->Seal(S("0123456789abcdef"), S("auth-value"), {});
  ASSERT_TRUE(obj.ok()) << obj.error().message();
  const auto srk = tpm_->GetInfo();
  ASSERT_TRUE(srk.ok());
  ASSERT_TRUE(swtpm_.Restart());
  auto lost = tpm_->Unseal(*obj, S("auth-value"));
  ASSERT_FALSE(lost.ok()) << "the old connection cannot work after a restart";
  EXPECT_TRUE(Tpm::LooksLost(lost.error())) << lost.error().message();
  ASSERT_TRUE(tpm_->Reconnect().ok());
  EXPECT_EQ(tpm_->reconnects(), 1u);
  for (int i = 0; i < 5; ++i) {
    auto back = tpm_->Unseal(*obj, S("auth-value"));
    ASSERT_TRUE(back.ok()) << back.error().message();
    EXPECT_EQ(back->RevealString(SecretAccess{}), "0123456789abcdef");
  }
  auto info = tpm_->GetInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->srk_name, srk->srk_name) << "the same SRK, pinned at Open";
  EXPECT_EQ(*tpm_->TransientObjects(), 1u) << "the new SRK only";
  // While the TPM is down a reconnect fails; the next call tries again.
  swtpm_.Kill();
  EXPECT_FALSE(tpm_->Reconnect().ok());
  EXPECT_FALSE(tpm_->Unseal(*obj, S("auth-value")).ok());
  ASSERT_TRUE(swtpm_.Restart());
  auto again = tpm_->Unseal(*obj, S("auth-value"));
  ASSERT_TRUE(again.ok()) << "a call after the TPM is back reconnects by itself: " << again.error().message();
  EXPECT_EQ(*tpm_->TransientObjects(), 1u);
  // A wrong auth value is not a lost connection: not retried.
  auto wrong = tpm_->Unseal(*obj, S("other"));
  ASSERT_FALSE(wrong.ok());
  EXPECT_FALSE(Tpm::LooksLost(wrong.error())) << wrong.error().message();
}

TEST_F(TpmTest, SealUnsealRoundTripLeavesNoTransientObjects) {
  auto before = tpm_->TransientObjects();
  ASSERT_TRUE(before.ok()) << before.error().message();
  EXPECT_EQ(*before, 1u) << "the transient SRK only";
  auto obj = tpm_->Seal(S("0123456789abcdef0123456789abcdef"), S("auth-value"), {});
  ASSERT_TRUE(obj.ok()) << obj.error().message();
  // Many operations on a TPM with no resource manager: each object is
  // flushed after use, or the three transient slots would run out.
  for (int i = 0; i < 40; ++i) {
    auto back = tpm_->Unseal(*obj, S("auth-value"));
    ASSERT_TRUE(back.ok()) << i << ": " << back.error().message();
    EXPECT_EQ(back->RevealString(SecretAccess{}), "0123456789abcdef0123456789abcdef");
  }
  EXPECT_EQ(*tpm_->TransientObjects(), 1u);
  // Round trip through the store's encoding.
  auto decoded = SealedObject::Decode(obj->Encode());
  ASSERT_TRUE(decoded.ok());
  EXPECT_TRUE(tpm_->Unseal(*decoded, S("auth-value")).ok());
}

TEST_F(TpmTest, AWrongAuthValueIsDeniedAndSaysSo) {
  auto obj = tpm_->Seal(S("secret-kek-material"), S("right"), {});
  ASSERT_TRUE(obj.ok());
  auto back = tpm_->Unseal(*obj, S("wrong"));
  ASSERT_FALSE(back.ok());
  EXPECT_EQ(back.error().category(), Category::kDenied);
  EXPECT_EQ(back.error().backend(), Backend::kTpm);
  EXPECT_NE(back.error().message().find("wrong auth value"), std::string::npos) << back.error().message();
  EXPECT_NE(back.error().message().find("dictionary-attack"), std::string::npos);
  EXPECT_EQ(*tpm_->TransientObjects(), 1u) << "flushed on the error path too";
  EXPECT_TRUE(tpm_->Unseal(*obj, S("right")).ok());
}

TEST_F(TpmTest, APcrBoundObjectFailsAfterTheExtendWithTheBootStateError) {
  auto obj = tpm_->Seal(S("pcr-bound-kek"), S("auth"), {.pcrs = {16}});
  ASSERT_TRUE(obj.ok()) << obj.error().message();
  auto back = tpm_->Unseal(*obj, S("auth"));
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->RevealString(SecretAccess{}), "pcr-bound-kek");
  ASSERT_TRUE(tpm_->ExtendPcr(16, std::vector<uint8_t>{1, 2, 3}).ok());
  auto after = tpm_->Unseal(*obj, S("auth"));
  ASSERT_FALSE(after.ok());
  EXPECT_EQ(after.error().category(), Category::kDenied);
  EXPECT_NE(after.error().message().find("sealed to another boot state"), std::string::npos)
      << after.error().message();
  EXPECT_EQ(*tpm_->TransientObjects(), 1u);
}

TEST_F(TpmTest, ATamperedObjectIsAnIntegrityError) {
  auto obj = tpm_->Seal(S("material"), S("auth"), {});
  ASSERT_TRUE(obj.ok());
  SealedObject bad = *obj;
  bad.private_area[bad.private_area.size() / 2] ^= 0x01;
  auto back = tpm_->Unseal(bad, S("auth"));
  ASSERT_FALSE(back.ok());
  EXPECT_EQ(back.error().category(), Category::kIntegrity) << back.error().message();
  auto garbage = SealedObject::Decode(std::vector<uint8_t>{'C', 'S', 'T', 'K', 1, 0, 0, 9});
  EXPECT_EQ(garbage.error().category(), Category::kIntegrity);
}

TEST_F(TpmTest, TheSigningKeySignsWhatOpenSslVerifies) {
  auto key = tpm_->CreateSigningKey(S("sign-auth"));
  ASSERT_TRUE(key.ok()) << key.error().message();
  std::array<uint8_t, 32> digest{};
  unsigned int len = 0;
  EVP_Digest("checkpoint", 10, digest.data(), &len, EVP_sha256(), nullptr);
  auto rs = tpm_->Sign(*key, S("sign-auth"), digest);
  ASSERT_TRUE(rs.ok()) << rs.error().message();
  // Verified as any X.509 tool would: the PEM public key and a DER signature.
  auto pem = core::P256PublicKeyPem(key->point);
  ASSERT_TRUE(pem.ok());
  BIO* bio = BIO_new_mem_buf(pem->data(), static_cast<int>(pem->size()));
  EVP_PKEY* pub = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  ASSERT_NE(pub, nullptr);
  ECDSA_SIG* sig = ECDSA_SIG_new();
  ECDSA_SIG_set0(sig, BN_bin2bn(rs->data(), 32, nullptr), BN_bin2bn(rs->data() + 32, 32, nullptr));
  unsigned char* der = nullptr;
  int der_len = i2d_ECDSA_SIG(sig, &der);
  ECDSA_SIG_free(sig);
  auto verify = [&](const std::array<uint8_t, 32>& d) {
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(pub, nullptr);
    EVP_PKEY_verify_init(ctx);
    int ok = EVP_PKEY_verify(ctx, der, static_cast<size_t>(der_len), d.data(), d.size());
    EVP_PKEY_CTX_free(ctx);
    return ok;
  };
  EXPECT_EQ(verify(digest), 1);
  auto other = digest;
  other[0] ^= 1;
  EXPECT_NE(verify(other), 1);
  OPENSSL_free(der);
  EVP_PKEY_free(pub);
  EXPECT_FALSE(tpm_->Sign(*key, S("wrong"), digest).ok());
}

TEST(TpmOpen, AnUnreachableTpmIsUnavailableWithTheTcti) {
  auto t = Tpm::Open({.tcti = "swtpm:host=127.0.0.1,port=1"});
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.error().category(), Category::kUnavailable);
  EXPECT_NE(t.error().message().find("TCTI"), std::string::npos) << t.error().message();
}

TEST(TpmInterop, TpmReadpublicShowsThePersistentSrkWeUse) {
  Swtpm swtpm;
  CUSTODY_REQUIRE_SWTPM(swtpm);
  std::string name;
  {
    auto t = Tpm::Open({.tcti = swtpm.tcti(), .persist_srk = true});
    ASSERT_TRUE(t.ok()) << t.error().message();
    auto info = (*t)->GetInfo();
    ASSERT_TRUE(info.ok()) << info.error().message();
    EXPECT_EQ(info->srk_handle, kSrkHandle);
    EXPECT_FALSE(info->manufacturer.empty());
    name = info->srk_name;
  }  // swtpm serves one connection at a time: let go before tpm2-tools connects
  auto r = test::RunProgram("/usr/bin/tpm2_readpublic", {"-c", "0x81000001", "-T", swtpm.tcti()}, {});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("name: " + name), std::string::npos) << "ours: " << name << "\n" << r.out;
  // A second process finds the persistent SRK instead of making another.
  auto again = Tpm::Open({.tcti = swtpm.tcti()});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->GetInfo()->srk_name, name);
  EXPECT_EQ(*(*again)->TransientObjects(), 0u) << "a persistent SRK takes no transient slot";
}

// The EK chain: a verifier with only the EK certificate's public key and the
// AK's Name wraps a secret in software (MakeCredential); the TPM that holds
// that EK gives it back only for that AK. Another AK Name or another EK is
// refused, and nothing stays loaded.
TEST(TpmEndorsement, ASoftwareCredentialIsActivatedOnlyByItsTpmAndForItsAk) {
  Swtpm swtpm({.ek_certificate = true});
  CUSTODY_REQUIRE_SWTPM(swtpm);
  auto t = Tpm::Open({.tcti = swtpm.tcti()});
  ASSERT_TRUE(t.ok()) << t.error().message();
  Tpm& tpm = **t;
  auto cert = tpm.EkCertificate();
  ASSERT_TRUE(cert.ok()) << cert.error().message();
  const unsigned char* p = cert->data();
  X509* x = d2i_X509(nullptr, &p, static_cast<long>(cert->size()));
  ASSERT_NE(x, nullptr) << "the EK certificate is DER";
  unsigned char* der = nullptr;
  int der_len = i2d_PUBKEY(X509_get0_pubkey(x), &der);
  ASSERT_GT(der_len, 0);
  std::vector<uint8_t> ek_pub(der, der + der_len);
  OPENSSL_free(der);
  X509_free(x);
  auto quote = tpm.QuotePcrs(std::vector<uint8_t>(16, 7), {0});
  ASSERT_TRUE(quote.ok()) << quote.error().message();
  auto ak_name = FromHex(quote->ak_name);
  ASSERT_TRUE(ak_name.has_value());
  SealedObject ak_public;
  ak_public.public_area = quote->ak_public;
  auto ak = Describe(ak_public);
  ASSERT_TRUE(ak.ok()) << ak.error().message();
  EXPECT_EQ(ak->name, quote->ak_name) << "the public area given out hashes to the AK's Name";
  EXPECT_TRUE(ak->fixed_tpm && ak->restricted && ak->sign && !ak->decrypt);

  std::vector<uint8_t> secret(32);
  ASSERT_EQ(RAND_bytes(secret.data(), 32), 1);
  auto cred = MakeCredential(ek_pub, *ak_name, secret);
  ASSERT_TRUE(cred.ok()) << cred.error().message();
  const size_t sessions = *tpm.LoadedSessions();
  auto back = tpm.ActivateCredential(cred->blob, cred->encrypted_secret);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(*back, secret);
  EXPECT_EQ(*tpm.TransientObjects(), 1u) << "the SRK only: the EK and the AK are flushed";
  EXPECT_EQ(*tpm.LoadedSessions(), sessions) << "the EK's policy session is flushed";

  // Made for another AK: the TPM's integrity check fails.
  auto other_name = *ak_name;
  other_name.back() ^= 1;
  auto wrong_ak = MakeCredential(ek_pub, other_name, secret);
  ASSERT_TRUE(wrong_ak.ok());
  auto refused = tpm.ActivateCredential(wrong_ak->blob, wrong_ak->encrypted_secret);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().category(), Category::kIntegrity) << refused.error().message();

  // Made for another EK (software that claims this EK certificate but holds
  // another key cannot answer, and this TPM cannot answer another's).
  EVP_PKEY* other = EVP_RSA_gen(2048);
  ASSERT_NE(other, nullptr);
  der = nullptr;
  der_len = i2d_PUBKEY(other, &der);
  std::vector<uint8_t> other_pub(der, der + der_len);
  OPENSSL_free(der);
  EVP_PKEY_free(other);
  auto wrong_ek = MakeCredential(other_pub, *ak_name, secret);
  ASSERT_TRUE(wrong_ek.ok());
  refused = tpm.ActivateCredential(wrong_ek->blob, wrong_ek->encrypted_secret);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().category(), Category::kIntegrity) << refused.error().message();
  EXPECT_EQ(*tpm.TransientObjects(), 1u);
  EXPECT_EQ(*tpm.LoadedSessions(), sessions) << "no policy session left by a refused activation";
  // Garbage is refused before it reaches the TPM.
  std::vector<uint8_t> junk(7, 0xff);
  EXPECT_EQ(tpm.ActivateCredential(junk, cred->encrypted_secret).error().category(), Category::kIntegrity);
}

TEST(TpmEndorsement, ATpmWithoutAnEkCertificateSaysSo) {
  Swtpm swtpm;
  CUSTODY_REQUIRE_SWTPM(swtpm);
  auto t = Tpm::Open({.tcti = swtpm.tcti()});
  ASSERT_TRUE(t.ok());
  auto cert = (*t)->EkCertificate();
  ASSERT_FALSE(cert.ok());
  EXPECT_EQ(cert.error().category(), Category::kNotFound) << cert.error().message();
  EXPECT_NE(cert.error().message().find("--create-ek-cert"), std::string::npos) << cert.error().message();
}

}  // namespace
}  // namespace custody::tpm
