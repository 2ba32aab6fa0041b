// Pkcs11Sealer: the Sealer (custody/seal/sealer.h) on a PKCS#11 token.
#pragma once

#include <map>
#include <mutex>
#include <shared_mutex>

#include "custody/hsm/session.h"
#include "custody/seal/sealer.h"

namespace custody::core {

// PKCS#11: the KEK never leaves the token. It is generated there as a
// sensitive, non-extractable, private token object; AES-256-GCM runs in the
// token; nonces come from the token's RNG.
class Pkcs11Sealer final : public Sealer {
 public:
  Pkcs11Sealer(hsm::SessionPool& pool, KekUsageLedger& ledger, uint64_t max_encryptions = kMaxEncryptionsPerKek)
      : pool_(pool), budget_(ledger, max_encryptions) {}

  using Sealer::CreateKek;
  Result<KekRef> CreateKek(std::string_view project, uint32_t version, std::vector<uint8_t>* material) override;
  Status DestroyKek(const KekRef& kek) override;
  Result<size_t> DestroyUnrecorded(const std::string& label, const std::vector<KekId>& keep) override;
  std::string ResealMode() override;
  Status Random(std::span<uint8_t> out) override;
  Result<std::vector<uint8_t>> Seal(const KekRef& kek, const SealContext& ctx, const SecretBuffer& value) override;
  Result<SecretBuffer> Unseal(const KekRef& expected, const SealContext& ctx, std::span<const uint8_t> blob) override;
  bool Recover(const Error& failure) override;
  Recoveries recoveries() const override;

  // Whether the token offers AES-GCM as a wrap and unwrap mechanism
  // (C_GetMechanismInfo: CKF_WRAP and CKF_UNWRAP), the precondition for
  // re-sealing inside the token.
  bool GcmWrapOffered();

 private:
  // The KEK's object handle (cached per module generation). A search that
  // finds nothing on a session that is not logged in (its login lost when
  // every session was closed, say) is a session fault, not a missing key:
  // the session is discarded and CKR_USER_NOT_LOGGED_IN returned, which
  // the caller recovers from and retries.
  Result<CK_OBJECT_HANDLE> KekHandle(hsm::SessionPool::Lease& lease, const KekRef& kek);
  void ForgetHandle(const KekRef& kek);
  Status NextNonce(hsm::Session& s, std::span<uint8_t, kNonceSize> out);

  hsm::SessionPool& pool_;
  KekBudget budget_;

  // Token object handles stay valid for the application's lifetime on the
  // token, so each KEK is searched once, not on every request.
  std::shared_mutex handles_mu_;
  std::map<KekId, CK_OBJECT_HANDLE> handles_;
  uint64_t handles_generation_ = 0;  // hsm::Module::generation() they belong to

  // Nonces are drawn from the token's RNG in batches: one C_GenerateRandom
  // per 32 seals instead of one per seal.
  std::mutex nonce_mu_;
  std::vector<uint8_t> nonce_pool_;
  size_t nonce_off_ = 0;
};

}  // namespace custody::core
