// Sealer: seals and unseals secret values with a project's KEK inside the
// token (AES-256-GCM via C_Encrypt/C_Decrypt), and creates those KEKs.
//
//   core::Sealer sealer(pool, ledger);
//   auto kek  = sealer.CreateKek("payments", 1);
//   auto blob = sealer.Seal(*kek, {"payments", "prod", "stripe", 1}, value);
//   auto back = sealer.Unseal(*kek, {"payments", "prod", "stripe", 1}, *blob);
//
// The KEK never leaves the token: it is generated there as a sensitive,
// non-extractable, private token object. Nonces come from the token's RNG.
// Random 96-bit nonces are safe for at most 2^32 encryptions under one key
// (NIST SP 800-38D, 8.3), so every seal draws from a per-KEK usage budget
// kept durable by a KekUsageLedger; a KEK past its budget refuses to seal
// (kLimit) and must be rotated.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string_view>
#include <vector>

#include "custody/common/result.h"
#include "custody/common/secret.h"
#include "custody/core/blob.h"
#include "custody/hsm/session.h"

namespace custody::core {

// Durable count of encryptions per KEK. Reserve(kek, n) records that n more
// encryptions may happen and fails with kLimit if that would pass `limit`.
// Reservations that are never used are lost on exit: the safe direction.
class KekUsageLedger {
 public:
  virtual ~KekUsageLedger() = default;
  virtual Status Reserve(const KekRef& kek, uint64_t n, uint64_t limit) = 0;
};

struct KekLabel {
  // "custody:kek:<project>:v<version>": shown by `pkcs11-tool -O`.
  static std::string For(std::string_view project, uint32_t version);
};

class Sealer {
 public:
  static constexpr uint64_t kMaxEncryptionsPerKek = uint64_t{1} << 32;

  Sealer(hsm::SessionPool& pool, KekUsageLedger& ledger, uint64_t max_encryptions = kMaxEncryptionsPerKek)
      : pool_(pool), ledger_(ledger), max_encryptions_(max_encryptions) {}

  // Generates a new AES-256 KEK inside the token for `project`.
  Result<KekRef> CreateKek(std::string_view project, uint32_t version);
  // Destroys a KEK token object (explicit: token objects outlive processes).
  // kNotFound if the token has no such object.
  Status DestroyKek(const KekRef& kek);
  // Destroys KEK objects labelled `label` whose id is not in `keep`: what an
  // interrupted KEK rotation left in the token before the store recorded it
  // (no blob was ever sealed under such a key). Returns how many went.
  Result<size_t> DestroyUnrecorded(const std::string& label, const std::vector<KekId>& keep);
  // Whether the token offers AES-GCM as a wrap and unwrap mechanism
  // (C_GetMechanismInfo: CKF_WRAP and CKF_UNWRAP), the precondition for
  // re-sealing inside the token.
  bool GcmWrapOffered();
  // Bytes from the token's RNG.
  Status Random(std::span<uint8_t> out);

  Result<std::vector<uint8_t>> Seal(const KekRef& kek, const SealContext& ctx, const SecretBuffer& value);

  // Checks the blob names `expected` (the KEK the store recorded for it),
  // then decrypts in the token. Tampering, truncation or a different context
  // is kIntegrity.
  Result<SecretBuffer> Unseal(const KekRef& expected, const SealContext& ctx,
                              std::span<const uint8_t> blob);

 private:
  Result<CK_OBJECT_HANDLE> KekHandle(hsm::Session& s, const KekRef& kek);
  void ForgetHandle(const KekRef& kek);
  Status TakeUse(const KekRef& kek);
  Status NextNonce(hsm::Session& s, std::span<uint8_t, kNonceSize> out);

  hsm::SessionPool& pool_;
  KekUsageLedger& ledger_;
  uint64_t max_encryptions_;

  // Token object handles stay valid for the application's lifetime on the
  // token, so each KEK is searched once, not on every request.
  std::shared_mutex handles_mu_;
  std::map<KekId, CK_OBJECT_HANDLE> handles_;
  uint64_t handles_generation_ = 0;  // hsm::Module::generation() they belong to

  struct Budget {
    uint64_t left = 0;   // reserved and not yet used
    uint64_t block = 1;  // next reservation size: doubles up to kMaxBlock
  };
  std::mutex budget_mu_;
  std::map<KekId, Budget> budgets_;

  // Nonces are drawn from the token's RNG in batches: one C_GenerateRandom
  // per 32 seals instead of one per seal.
  std::mutex nonce_mu_;
  std::vector<uint8_t> nonce_pool_;
  size_t nonce_off_ = 0;
};

}  // namespace custody::core
