// TokenAuditSigner: signs audit checkpoints with an ECDSA P-256 key that is
// generated inside the token (non-extractable) and found again by label.
//
//   auto signer = core::TokenAuditSigner::Open(pool, /*create=*/true);
//   auto seq = log.Checkpoint(**signer);
//   std::string pem = *(*signer)->PublicKeyPem();     // `custody audit pubkey`
#pragma once

#include <mutex>

#include <memory>
#include <string>

#include "custody/core/audit.h"
#include "custody/hsm/ec.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/session.h"
#include "custody/tpm/tpm.h"

namespace custody::core {

// TpmAuditSigner: the same checkpoints signed by an ECDSA P-256 key made by
// the TPM under the SRK (sensitive part never leaves it in clear). Its
// public and private blobs are kept in the state folder
// (`audit-key.tpm`); its auth value is HMAC-SHA256(PIN, kLabel).
class TpmAuditSigner final : public AuditSigner {
 public:
  static constexpr const char* kLabel = "custody:audit:v1";
  // `label` and `file` name another key of the same kind (the attestation
  // key: "custody:attest:v1", "attest-key.tpm").
  static Result<std::unique_ptr<TpmAuditSigner>> Open(tpm::Tpm& tpm, const std::string& state_dir,
                                                      const SecretBuffer& pin, bool create,
                                                      const std::string& label = kLabel,
                                                      const std::string& file = "audit-key.tpm");
  Result<std::vector<uint8_t>> Sign(std::string_view message) override;
  std::string key_id() const override;
  Result<std::string> PublicKeyPem() const override;

 private:
  TpmAuditSigner(tpm::Tpm& tpm, tpm::SigningKey key, SecretBuffer auth)
      : tpm_(tpm), key_(std::move(key)), auth_(std::move(auth)) {}
  tpm::Tpm& tpm_;
  tpm::SigningKey key_;
  SecretBuffer auth_;
};

class TokenAuditSigner final : public AuditSigner {
 public:
  static constexpr const char* kLabel = "custody:audit:v1";

  // Finds the key; with `create`, makes it when the token has none.
  // `label` names another key of the same kind (the attestation key).
  static Result<std::unique_ptr<TokenAuditSigner>> Open(hsm::SessionPool& pool, bool create,
                                                        const std::string& label = kLabel);
  // The token's own view of the private key (for attestation statements).
  Result<hsm::ObjectSummary> DescribePrivateKey();

  Result<std::vector<uint8_t>> Sign(std::string_view message) override;
  std::string key_id() const override;
  Result<std::string> PublicKeyPem() const override;

 private:
  TokenAuditSigner(hsm::SessionPool& pool, hsm::EcKey key, std::string label)
      : pool_(pool), key_(std::move(key)), label_(std::move(label)), generation_(pool.module().generation()) {}
  hsm::SessionPool& pool_;
  std::mutex mu_;
  hsm::EcKey key_;
  std::string label_;
  uint64_t generation_;  // key_'s handles belong to this module generation
};

}  // namespace custody::core
