// Sealer: seals and unseals secret values under a project's KEK, and makes
// those KEKs. One interface, two backends, each beside its token layer:
//   Pkcs11Sealer  the KEK is a token object; AES-256-GCM runs in the token
//                 (custody/hsm/pkcs11_sealer.h)
//   TpmSealer     the KEK is a TPM sealed-data object (custody/tpm/tpm_sealer.h)
// Both write the same blob format (docs/BLOB_FORMAT.md).
//
//   core::Pkcs11Sealer sealer(pool, ledger);
//   auto kek  = sealer.CreateKek("payments", 1);
//   auto blob = sealer.Seal(*kek, {"payments", "prod", "stripe", 1}, value);
//   auto back = sealer.Unseal(*kek, {"payments", "prod", "stripe", 1}, *blob);
//
// Random 96-bit GCM nonces are safe for at most 2^32 encryptions under one
// key (NIST SP 800-38D, 8.3), so every seal draws from a per-KEK usage
// budget kept durable by a KekUsageLedger; a KEK past its budget refuses to
// seal (kLimit) and must be rotated.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string_view>
#include <vector>

#include "custody/common/result.h"
#include "custody/common/secret.h"
#include "custody/seal/blob.h"

namespace custody::core {

// Durable count of encryptions per KEK. Reserve(kek, n) records that n more
// encryptions may happen and fails with kLimit if that would pass `limit`.
// Reservations that are never used are lost on exit: the safe direction.
class KekUsageLedger {
 public:
  virtual ~KekUsageLedger() = default;
  virtual Status Reserve(const KekRef& kek, uint64_t n, uint64_t limit) = 0;
};

// Backend-specific KEK material kept in the store beside the KEK record
// (the TPM's sealed object; nothing for PKCS#11, whose KEK is in the token).
class KekMaterialSource {
 public:
  virtual ~KekMaterialSource() = default;
  virtual Result<std::vector<uint8_t>> KekMaterial(const KekRef& kek) = 0;
};

struct KekLabel {
  // "custody:kek:<project>:v<version>": shown by `pkcs11-tool -O`.
  static std::string For(std::string_view project, uint32_t version);
};

// The per-KEK encryption budget, drawn from the ledger in growing blocks.
class KekBudget {
 public:
  KekBudget(KekUsageLedger& ledger, uint64_t max_encryptions) : ledger_(ledger), max_(max_encryptions) {}
  Status TakeUse(const KekRef& kek);

 private:
  struct Budget {
    uint64_t left = 0;   // reserved and not yet used
    uint64_t block = 1;  // next reservation size: doubles up to kMaxBlock
  };
  KekUsageLedger& ledger_;
  uint64_t max_;
  std::mutex mu_;
  std::map<KekId, Budget> budgets_;
};

class Sealer {
 public:
  static constexpr uint64_t kMaxEncryptionsPerKek = uint64_t{1} << 32;
  virtual ~Sealer() = default;

  // Makes a new KEK for `project`. Backend material the store must keep
  // with the KEK record goes to `material` (left empty when there is none).
  virtual Result<KekRef> CreateKek(std::string_view project, uint32_t version, std::vector<uint8_t>* material) = 0;
  Result<KekRef> CreateKek(std::string_view project, uint32_t version) { return CreateKek(project, version, nullptr); }
  // Destroys a KEK (explicit: token objects outlive processes). kNotFound if
  // the backend has no such key.
  virtual Status DestroyKek(const KekRef& kek) = 0;
  // Destroys KEKs labelled `label` whose id is not in `keep`: what an
  // interrupted KEK rotation left behind before the store recorded it (no
  // blob was ever sealed under such a key), a half-written object whose id
  // cannot be read included. Returns how many went.
  virtual Result<size_t> DestroyUnrecorded(const std::string& label, const std::vector<KekId>& keep) = 0;
  // How KEK rotation re-seals on this backend, for people (--dry-run, docs).
  virtual std::string ResealMode() = 0;
  // Bytes from the backend's RNG.
  virtual Status Random(std::span<uint8_t> out) = 0;

  virtual Result<std::vector<uint8_t>> Seal(const KekRef& kek, const SealContext& ctx, const SecretBuffer& value) = 0;
  // Checks the blob names `expected` (the KEK the store recorded for it),
  // then decrypts. Tampering, truncation or a different context is kIntegrity.
  virtual Result<SecretBuffer> Unseal(const KekRef& expected, const SealContext& ctx,
                                      std::span<const uint8_t> blob) = 0;

  // After a Seal or Unseal failed with `failure`: when it says the
  // backend's session or device was lost (a token reset, a dead session),
  // re-open and log in again, and return true: the operation may be tried
  // once more. False for any other failure. So the request flow recovers
  // without knowing PKCS#11 or TPM codes; a backend without recovery keeps
  // the default.
  virtual bool Recover(const Error& failure) {
    (void)failure;
    return false;
  }
  // Recoveries that succeeded, and how many of them re-initialised the
  // backend (for health and metrics).
  struct Recoveries {
    uint64_t recovered = 0, reinitialized = 0;
  };
  virtual Recoveries recoveries() const { return {}; }
  // Calls that did not return within their deadline (DeadlineSealer): how
  // many ever, how many are still out now, and since when (unix seconds,
  // the oldest; 0 when none is out). For health and metrics.
  struct Stalls {
    uint64_t timed_out = 0;
    size_t hung = 0;
    int64_t hung_since = 0;
  };
  virtual Stalls stalls() const { return {}; }
};

}  // namespace custody::core
