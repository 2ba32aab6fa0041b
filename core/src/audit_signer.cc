#include "custody/core/audit_signer.h"

#include <openssl/bn.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>

#include "custody/hsm/objects.h"

namespace custody::core {

Result<std::unique_ptr<TokenAuditSigner>> TokenAuditSigner::Open(hsm::SessionPool& pool, bool create) {
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool.Acquire());
  CUSTODY_ASSIGN_OR_RETURN(auto found, hsm::FindEcKey(*lease, kLabel));
  if (found) return std::unique_ptr<TokenAuditSigner>(new TokenAuditSigner(pool, std::move(*found)));
  if (!create) {
    return Error(Category::kNotFound, std::string("the token has no audit signing key (") + kLabel +
                                          "); it is made with the first checkpoint");
  }
  CUSTODY_ASSIGN_OR_RETURN(auto key, hsm::GenerateEcKey(*lease, kLabel));
  return std::unique_ptr<TokenAuditSigner>(new TokenAuditSigner(pool, std::move(key)));
}

std::string TokenAuditSigner::key_id() const { return hsm::ToHex(key_.id); }

Result<std::vector<uint8_t>> TokenAuditSigner::Sign(std::string_view message) {
  std::array<uint8_t, 32> digest{};
  unsigned int len = 0;
  EVP_Digest(message.data(), message.size(), digest.data(), &len, EVP_sha256(), nullptr);
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());
  std::lock_guard lock(mu_);
  if (pool_.module().generation() != generation_) {
    // The module was re-initialised: the cached handles are dead (and their
    // numbers may name other objects now). Find the key again by its label.
    CUSTODY_ASSIGN_OR_RETURN(auto found, hsm::FindEcKey(*lease, kLabel));
    if (!found) return Error(Category::kNotFound, std::string("the audit signing key ") + kLabel + " is gone from the token");
    key_ = std::move(*found);
    generation_ = pool_.module().generation();
  }
  CUSTODY_ASSIGN_OR_RETURN(auto rs, hsm::SignDigest(*lease, key_.private_key, digest));
  // PKCS#11 gives r||s; X.509 tools (openssl dgst -verify) want DER.
  ECDSA_SIG* sig = ECDSA_SIG_new();
  ECDSA_SIG_set0(sig, BN_bin2bn(rs.data(), 32, nullptr), BN_bin2bn(rs.data() + 32, 32, nullptr));
  int n = i2d_ECDSA_SIG(sig, nullptr);
  std::vector<uint8_t> der(static_cast<size_t>(n));
  unsigned char* p = der.data();
  i2d_ECDSA_SIG(sig, &p);
  ECDSA_SIG_free(sig);
  return der;
}

Result<std::string> TokenAuditSigner::PublicKeyPem() const { return P256PublicKeyPem(key_.point); }

}  // namespace custody::core
