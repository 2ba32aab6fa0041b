#include "custody/hsm/token_signer.h"

#include <openssl/evp.h>

#include "custody/common/hex.h"
#include "custody/hsm/objects.h"

namespace custody::core {

Result<std::unique_ptr<TokenAuditSigner>> TokenAuditSigner::Open(hsm::SessionPool& pool, bool create,
                                                                 const std::string& label) {
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool.Acquire());
  CUSTODY_ASSIGN_OR_RETURN(auto found, hsm::FindEcKey(*lease, label));
  if (found) return std::unique_ptr<TokenAuditSigner>(new TokenAuditSigner(pool, std::move(*found), label));
  if (!create) {
    return Error(Category::kNotFound, "the token has no signing key " + label +
                                          (label == kLabel ? "; it is made with the first checkpoint" : ""));
  }
  CUSTODY_ASSIGN_OR_RETURN(auto key, hsm::GenerateEcKey(*lease, label));
  return std::unique_ptr<TokenAuditSigner>(new TokenAuditSigner(pool, std::move(key), label));
}

Result<hsm::ObjectSummary> TokenAuditSigner::DescribePrivateKey() {
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());
  std::lock_guard lock(mu_);
  return hsm::Describe(*lease, key_.private_key);
}

std::string TokenAuditSigner::key_id() const { return ToHex(key_.id); }

Result<std::vector<uint8_t>> TokenAuditSigner::Sign(std::string_view message) {
  std::array<uint8_t, 32> digest{};
  unsigned int len = 0;
  EVP_Digest(message.data(), message.size(), digest.data(), &len, EVP_sha256(), nullptr);
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());
  std::lock_guard lock(mu_);
  if (pool_.module().generation() != generation_) {
    // The module was re-initialised: the cached handles are dead (and their
    // numbers may name other objects now). Find the key again by its label.
    CUSTODY_ASSIGN_OR_RETURN(auto found, hsm::FindEcKey(*lease, label_));
    if (!found) return Error(Category::kNotFound, "the signing key " + label_ + " is gone from the token");
    key_ = std::move(*found);
    generation_ = pool_.module().generation();
  }
  CUSTODY_ASSIGN_OR_RETURN(auto rs, hsm::SignDigest(*lease, key_.private_key, digest));
  // PKCS#11 gives r||s; X.509 tools (openssl dgst -verify) want DER.
  return P256SignatureDer(rs);
}

Result<std::string> TokenAuditSigner::PublicKeyPem() const { return P256PublicKeyPem(key_.point); }

}  // namespace custody::core

