#include "custody/attest/endorsement.h"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "custody/common/base64.h"
#include "custody/common/hex.h"
#include "custody/common/owned.h"
#include "custody/tpm/tpm.h"

namespace custody::core {
namespace {

using nlohmann::json;

Error Bad(const std::string& what) { return Error(Category::kIntegrity, "EK attestation: " + what); }

using X509Ptr = Owned<X509, X509_free>;
using StorePtr = Owned<X509_STORE, X509_STORE_free>;
using StoreCtxPtr = Owned<X509_STORE_CTX, X509_STORE_CTX_free>;
using BioPtr = Owned<BIO, BIO_free_all>;

// A certificate name as RFC 2253 text, with every byte outside printable
// ASCII escaped by OpenSSL: certificate fields are untrusted.
std::string NameText(const X509_NAME* name) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || X509_NAME_print_ex(bio.get(), name, 0, XN_FLAG_RFC2253) < 0) return "?";
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  std::string out(data, static_cast<size_t>(n > 0 ? n : 0));
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
  }
  return out.empty() ? "(empty)" : out;
}

struct CheckedEk {
  X509Ptr cert;
  std::string sha256, subject, issuer;
};

// The statement's EK certificate, chained to the verifier's CA file (every
// certificate in it a trust anchor).
Result<CheckedEk> CheckEkCertificate(const std::vector<uint8_t>& der, const std::string& ca_pem) {
  if (der.empty()) {
    return Bad("the statement carries no EK certificate (the TPM holds none at NV 0x01c00002), so its AK cannot be "
               "chained to a manufacturer's CA");
  }
  const unsigned char* p = der.data();
  CheckedEk out;
  out.cert.reset(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  if (!out.cert || p != der.data() + der.size()) return Bad("tpm_ek.certificate is not a DER certificate");
  StorePtr store(X509_STORE_new());
  BioPtr bio(BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size())));
  if (!store || !bio) return Error(Category::kInternal, "out of memory");
  size_t anchors = 0;
  while (X509* ca = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store.get(), ca);
    X509_free(ca);
    ++anchors;
  }
  if (anchors == 0) return Error(Category::kUsage, "--ek-ca holds no PEM certificate");
  // Any certificate of the file may end the chain (an intermediate the
  // verifier chose to trust), not only a self-signed root.
  X509_STORE_set_flags(store.get(), X509_V_FLAG_PARTIAL_CHAIN);
  StoreCtxPtr ctx(X509_STORE_CTX_new());
  if (!ctx || X509_STORE_CTX_init(ctx.get(), store.get(), out.cert.get(), nullptr) != 1) {
    return Error(Category::kInternal, "out of memory");
  }
  if (X509_verify_cert(ctx.get()) != 1) {
    return Bad(std::string("the EK certificate does not chain to --ek-ca: ") +
               X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())));
  }
  unsigned char md[32];
  unsigned int len = 0;
  EVP_Digest(der.data(), der.size(), md, &len, EVP_sha256(), nullptr);
  out.sha256 = ToHex(std::span<const uint8_t>(md, len));
  out.subject = NameText(X509_get_subject_name(out.cert.get()));
  out.issuer = NameText(X509_get_issuer_name(out.cert.get()));
  return out;
}

Result<std::string> Field(const json& j, const char* key, const char* what) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) {
    return Error(Category::kIntegrity, std::string(what) + ": field '" + key + "' is missing or not a string");
  }
  return it->get<std::string>();
}

// A challenge file or key: a JSON object with this format.
Result<json> Framed(std::string_view text, const char* what, const char* format) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Error(Category::kIntegrity, std::string(what) + ": not a JSON object");
  CUSTODY_ASSIGN_OR_RETURN(std::string f, Field(j, "format", what));
  if (f != format) return Error(Category::kIntegrity, std::string(what) + ": the format is not " + format);
  return j;
}

}  // namespace

Result<EkChallenge> MakeEkChallenge(const StatementSummary& s, const std::string& ca_pem) {
  if (s.ak_public_area.empty()) {
    return Bad("the statement does not carry its AK's public area (made by an older custody, or not on a TPM)");
  }
  CUSTODY_ASSIGN_OR_RETURN(CheckedEk ek, CheckEkCertificate(s.ek_certificate, ca_pem));
  unsigned char* der = nullptr;
  int n = i2d_PUBKEY(X509_get0_pubkey(ek.cert.get()), &der);
  if (n <= 0) return Bad("the EK certificate's public key cannot be read");
  std::vector<uint8_t> ek_public(der, der + n);
  OPENSSL_free(der);
  auto ak_name = FromHex(s.ak_name);
  if (!ak_name) return Bad("the statement's AK Name is not hex");
  std::vector<uint8_t> secret(32);
  if (RAND_bytes(secret.data(), static_cast<int>(secret.size())) != 1) {
    return Error(Category::kInternal, "no randomness for the challenge");
  }
  auto cred = tpm::MakeCredential(ek_public, *ak_name, secret);
  std::string nonce = ToHex(secret);
  OPENSSL_cleanse(secret.data(), secret.size());
  if (!cred) return std::move(cred).error().Wrap("EK attestation");
  EkChallenge out;
  out.challenge = json{{"format", kEkChallengeFormat},
                       {"ak_name", s.ak_name},
                       {"credential", Base64Encode(cred->blob)},
                       {"encrypted_secret", Base64Encode(cred->encrypted_secret)}}
                      .dump(2) +
                  "\n";
  out.key = json{{"format", kEkChallengeKeyFormat},
                 {"nonce", nonce},
                 {"ek_certificate_sha256", ek.sha256},
                 {"ak_name", s.ak_name}}
                .dump(2) +
            "\n";
  out.ek_subject = ek.subject;
  out.ek_issuer = ek.issuer;
  return out;
}

Result<ParsedEkChallenge> ParseEkChallenge(std::string_view text) {
  constexpr const char* kWhat = "EK challenge";
  CUSTODY_ASSIGN_OR_RETURN(json j, Framed(text, kWhat, kEkChallengeFormat));
  ParsedEkChallenge out;
  CUSTODY_ASSIGN_OR_RETURN(out.ak_name, Field(j, "ak_name", kWhat));
  if (!IsLowerHex(out.ak_name, 68)) return Error(Category::kIntegrity, "EK challenge: ak_name is not a SHA-256 Name");
  CUSTODY_ASSIGN_OR_RETURN(std::string blob, Field(j, "credential", kWhat));
  CUSTODY_ASSIGN_OR_RETURN(std::string secret, Field(j, "encrypted_secret", kWhat));
  auto b = Base64Decode(blob);
  auto e = Base64Decode(secret);
  if (!b || b->empty() || !e || e->empty()) {
    return Error(Category::kIntegrity, "EK challenge: credential or encrypted_secret is not base64");
  }
  out.credential_blob = std::move(*b);
  out.encrypted_secret = std::move(*e);
  return out;
}

Result<EkChallengeKey> ParseEkChallengeKey(std::string_view text) {
  constexpr const char* kWhat = "EK challenge key";
  CUSTODY_ASSIGN_OR_RETURN(json j, Framed(text, kWhat, kEkChallengeKeyFormat));
  EkChallengeKey k;
  CUSTODY_ASSIGN_OR_RETURN(k.nonce, Field(j, "nonce", kWhat));
  CUSTODY_ASSIGN_OR_RETURN(k.ek_cert_sha256, Field(j, "ek_certificate_sha256", kWhat));
  CUSTODY_ASSIGN_OR_RETURN(k.ak_name, Field(j, "ak_name", kWhat));
  if (!IsLowerHex(k.nonce, 64) || !IsLowerHex(k.ek_cert_sha256, 64) || !IsLowerHex(k.ak_name, 68)) {
    return Error(Category::kIntegrity, "EK challenge key: nonce, ek_certificate_sha256 or ak_name is malformed");
  }
  return k;
}

Result<Endorsement> VerifyEndorsement(const StatementSummary& s, const std::string& ca_pem, const EkChallengeKey& key) {
  if (s.nonce != key.nonce) {
    return Bad("the statement's nonce is not the challenge's secret: it was not made in answer to this challenge");
  }
  CUSTODY_ASSIGN_OR_RETURN(CheckedEk ek, CheckEkCertificate(s.ek_certificate, ca_pem));
  if (ek.sha256 != key.ek_cert_sha256) {
    return Bad("the statement's EK certificate is not the one the challenge was made for");
  }
  if (s.ak_name != key.ak_name) return Bad("the statement's AK is not the one the challenge was bound to");
  if (s.ak_public_area.empty()) return Bad("the statement does not carry its AK's public area");
  if (!s.signer_certified) {
    return Bad("the key that signed the statement is not certified by the AK: the quote would be the TPM's, the rest "
               "of the statement not");
  }
  return Endorsement{ek.subject, ek.issuer, ek.sha256};
}

}  // namespace custody::core
