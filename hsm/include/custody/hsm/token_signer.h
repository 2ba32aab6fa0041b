// TokenAuditSigner: signs audit checkpoints with an ECDSA P-256 key that is
// generated inside the token (non-extractable) and found again by label.
//
//   auto signer = core::TokenAuditSigner::Open(pool, /*create=*/true);
//   auto seq = log.Checkpoint(**signer);
//   std::string pem = *(*signer)->PublicKeyPem();     // `custody audit pubkey`
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "custody/audit/audit.h"
#include "custody/hsm/ec.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/session.h"

namespace custody::core {

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
