#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "custody/audit/audit.h"
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
  // TPM2_Certify of this key by the TPM's attestation key, with
  // `qualifying` (the verifier's nonce): the TPM vouches that the key with
  // this public area is loaded in it.
  Result<tpm::Attested> Certify(std::span<const uint8_t> qualifying) {
    return tpm_.Certify(key_.blobs, auth_, qualifying);
  }
  const std::vector<uint8_t>& public_area() const { return key_.blobs.public_area; }

 private:
  TpmAuditSigner(tpm::Tpm& tpm, tpm::SigningKey key, SecretBuffer auth)
      : tpm_(tpm), key_(std::move(key)), auth_(std::move(auth)) {}
  tpm::Tpm& tpm_;
  tpm::SigningKey key_;
  SecretBuffer auth_;
};

}  // namespace custody::core
