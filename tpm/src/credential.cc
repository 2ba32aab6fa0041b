// TPM2_MakeCredential without a TPM (TPM 2.0 Library, Part 1, sections 24
// "Credential Protection" and 11.4.10 "Key Derivation Functions"). A verifier
// needs only the EK's public key and the Name of the key it expects the EK's
// TPM to hold; everything here is public-key and symmetric work that OpenSSL
// does (RSA-OAEP, SP 800-108 KBKDF in counter mode, which is the TPM's KDFa,
// AES-CFB and HMAC). The TPM checks our output in ActivateCredential, so the
// integration test (a real swtpm activating it) is the proof that it matches.
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <memory>

#include "custody/common/owned.h"
#include "custody/tpm/tpm.h"

namespace custody::tpm {
namespace {

using Pkey = Owned<EVP_PKEY, EVP_PKEY_free>;
using PkeyCtx = Owned<EVP_PKEY_CTX, EVP_PKEY_CTX_free>;
using CipherCtx = Owned<EVP_CIPHER_CTX, EVP_CIPHER_CTX_free>;
using Kdf = Owned<EVP_KDF, EVP_KDF_free>;
using KdfCtx = Owned<EVP_KDF_CTX, EVP_KDF_CTX_free>;

Error Fail(const char* what) { return Error(Category::kInternal, std::string("MakeCredential: ") + what); }

void PutU16(std::vector<uint8_t>& out, size_t v) {
  out.push_back(static_cast<uint8_t>(v >> 8));
  out.push_back(static_cast<uint8_t>(v));
}

// KDFa(SHA-256, key, label, context, bits): K(i) = HMAC(key, [i]32 || label
// || 0x00 || context || [bits]32), which is OpenSSL's KBKDF in counter mode
// with its defaults (a 32-bit counter, the zero separator and L appended).
Result<std::vector<uint8_t>> KdfaSha256(std::span<const uint8_t> key, const std::string& label,
                                        std::span<const uint8_t> context, size_t bytes) {
  Kdf kdf(EVP_KDF_fetch(nullptr, "KBKDF", nullptr));
  if (!kdf) return Fail("OpenSSL has no KBKDF");
  KdfCtx ctx(EVP_KDF_CTX_new(kdf.get()));
  if (!ctx) return Fail("out of memory");
  char mode[] = "COUNTER", mac[] = "HMAC", digest[] = "SHA256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_MODE, mode, 0),
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_MAC, mac, 0),
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<uint8_t*>(key.data()), key.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<char*>(label.data()), label.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<uint8_t*>(context.data()), context.size()),
      OSSL_PARAM_construct_end()};
  std::vector<uint8_t> out(bytes);
  if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1) return Fail("KDFa failed");
  return out;
}

}  // namespace

Result<Credential> MakeCredential(std::span<const uint8_t> ek_public_der, std::span<const uint8_t> ak_name,
                                  std::span<const uint8_t> secret) {
  if (secret.empty() || secret.size() > 32) return Error(Category::kUsage, "a credential holds 1 to 32 bytes");
  if (ak_name.size() != 34 || ak_name[0] != 0x00 || ak_name[1] != 0x0b) {
    return Error(Category::kIntegrity, "the attestation key's Name is not a SHA-256 Name");
  }
  const unsigned char* p = ek_public_der.data();
  Pkey ek(d2i_PUBKEY(nullptr, &p, static_cast<long>(ek_public_der.size())));
  if (!ek || p != ek_public_der.data() + ek_public_der.size()) {
    return Error(Category::kIntegrity, "the endorsement key is not a DER public key");
  }
  if (EVP_PKEY_get_base_id(ek.get()) != EVP_PKEY_RSA || EVP_PKEY_get_bits(ek.get()) != 2048) {
    // The ECC EK's credential protection (ECDH with KDFe) is not done here.
    return Error(Category::kIntegrity, "the endorsement key is not RSA 2048 (only the RSA EK is supported)");
  }
  // The seed: as long as the EK's nameAlg digest (SHA-256), sent under
  // RSA-OAEP(SHA-256) with the label "IDENTITY" and its terminating zero.
  std::vector<uint8_t> seed(32);
  if (RAND_bytes(seed.data(), static_cast<int>(seed.size())) != 1) return Fail("no randomness");
  struct Wipe {
    std::vector<uint8_t>& v;
    ~Wipe() { OPENSSL_cleanse(v.data(), v.size()); }
  } wipe_seed{seed};
  PkeyCtx ectx(EVP_PKEY_CTX_new(ek.get(), nullptr));
  static const char kIdentity[] = "IDENTITY";  // with its 0 byte
  void* label = OPENSSL_memdup(kIdentity, sizeof kIdentity);
  if (!ectx || label == nullptr || EVP_PKEY_encrypt_init(ectx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(ectx.get(), RSA_PKCS1_OAEP_PADDING) != 1 ||
      EVP_PKEY_CTX_set_rsa_oaep_md(ectx.get(), EVP_sha256()) != 1 ||
      EVP_PKEY_CTX_set_rsa_mgf1_md(ectx.get(), EVP_sha256()) != 1 ||
      EVP_PKEY_CTX_set0_rsa_oaep_label(ectx.get(), label, sizeof kIdentity) != 1) {
    OPENSSL_free(label);
    return Fail("cannot set up RSA-OAEP");
  }
  size_t enc_len = 0;
  if (EVP_PKEY_encrypt(ectx.get(), nullptr, &enc_len, seed.data(), seed.size()) != 1) return Fail("RSA-OAEP failed");
  std::vector<uint8_t> enc(enc_len);
  if (EVP_PKEY_encrypt(ectx.get(), enc.data(), &enc_len, seed.data(), seed.size()) != 1) return Fail("RSA-OAEP failed");
  enc.resize(enc_len);

  // The symmetric key binds the credential to the AK's Name; AES-128 because
  // the EK template's symmetric algorithm is AES-128-CFB.
  CUSTODY_ASSIGN_OR_RETURN(auto sym_key, KdfaSha256(seed, "STORAGE", ak_name, 16));
  struct Wipe wipe_sym{sym_key};
  std::vector<uint8_t> plain;
  PutU16(plain, secret.size());  // the credential as a TPM2B_DIGEST
  plain.insert(plain.end(), secret.begin(), secret.end());
  std::vector<uint8_t> enc_identity(plain.size());
  {
    CipherCtx c(EVP_CIPHER_CTX_new());
    uint8_t iv[16] = {};
    int n = 0, fin = 0;
    if (!c || EVP_EncryptInit_ex(c.get(), EVP_aes_128_cfb128(), nullptr, sym_key.data(), iv) != 1 ||
        EVP_EncryptUpdate(c.get(), enc_identity.data(), &n, plain.data(), static_cast<int>(plain.size())) != 1 ||
        EVP_EncryptFinal_ex(c.get(), enc_identity.data() + n, &fin) != 1) {
      OPENSSL_cleanse(plain.data(), plain.size());
      return Fail("AES-128-CFB failed");
    }
  }
  OPENSSL_cleanse(plain.data(), plain.size());
  CUSTODY_ASSIGN_OR_RETURN(auto hmac_key, KdfaSha256(seed, "INTEGRITY", {}, 32));
  struct Wipe wipe_hmac{hmac_key};
  std::vector<uint8_t> mac_input = enc_identity;
  mac_input.insert(mac_input.end(), ak_name.begin(), ak_name.end());
  uint8_t mac[32];
  unsigned int mac_len = 0;
  if (HMAC(EVP_sha256(), hmac_key.data(), static_cast<int>(hmac_key.size()), mac_input.data(), mac_input.size(), mac,
           &mac_len) == nullptr) {
    return Fail("HMAC failed");
  }

  Credential out;
  // TPM2B_ID_OBJECT: size, then the integrity HMAC as a TPM2B_DIGEST, then
  // the encrypted identity.
  PutU16(out.blob, 2 + mac_len + enc_identity.size());
  PutU16(out.blob, mac_len);
  out.blob.insert(out.blob.end(), mac, mac + mac_len);
  out.blob.insert(out.blob.end(), enc_identity.begin(), enc_identity.end());
  PutU16(out.encrypted_secret, enc.size());
  out.encrypted_secret.insert(out.encrypted_secret.end(), enc.begin(), enc.end());
  return out;
}

}  // namespace custody::tpm
