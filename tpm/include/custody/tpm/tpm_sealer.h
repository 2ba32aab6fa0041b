// TpmSealer: the Sealer for a TPM 2.0. Each project KEK is 32 random bytes
// from the TPM's RNG, sealed as a TPM sealed-data object under the SRK. Its
// public and private parts are kept in the store with the KEK record; the
// TPM holds nothing between uses.
//
//   core::TpmSealer sealer(tpm, store, store, pin, {.pcrs = {7}});
//
// The object's auth value is HMAC-SHA256(PIN, "custody:kek:<project>:v<n>"):
// unsealing needs the PIN and the object's own context, so a sealed object
// copied to another project's record does not open. With PCRs configured,
// the object's policy is PolicyPCR + PolicyAuthValue: it opens only in the
// boot state it was sealed in.
//
// The TPM is no bulk cipher: AES-256-GCM runs in the host with the unsealed
// KEK, in locked memory (OpenSSL's secure heap), with the same blob format
// and the same per-KEK nonce budget as the PKCS#11 backend. Unsealed KEKs
// may be kept for `kek_cache_seconds` (0: unseal for every operation).
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>

#include "custody/seal/sealer.h"
#include "custody/tpm/tpm.h"

namespace custody::core {

class TpmSealer final : public Sealer {
 public:
  struct Options {
    std::vector<uint8_t> pcrs;     // bind new KEKs to these SHA-256 PCRs
    int kek_cache_seconds = 0;     // keep unsealed KEKs this long
    uint64_t max_encryptions = kMaxEncryptionsPerKek;
  };
  TpmSealer(tpm::Tpm& tpm, KekUsageLedger& ledger, KekMaterialSource& material, const SecretBuffer& pin,
            Options options);

  using Sealer::CreateKek;
  Result<KekRef> CreateKek(std::string_view project, uint32_t version, std::vector<uint8_t>* material) override;
  // The KEK lives in the store's record; there is no TPM object to destroy.
  Status DestroyKek(const KekRef& kek) override;
  Result<size_t> DestroyUnrecorded(const std::string&, const std::vector<KekId>&) override { return size_t{0}; }
  std::string ResealMode() override;
  Status Random(std::span<uint8_t> out) override;
  Result<std::vector<uint8_t>> Seal(const KekRef& kek, const SealContext& ctx, const SecretBuffer& value) override;
  Result<SecretBuffer> Unseal(const KekRef& expected, const SealContext& ctx, std::span<const uint8_t> blob) override;

  // A lost connection or a restarted TPM (Tpm::LooksLost): reconnects
  // (Tpm::Reconnect), and the request is tried once more. Any other failure
  // (a wrong PIN, a PCR mismatch, a lockout) is not retried.
  bool Recover(const Error& failure) override;
  Recoveries recoveries() const override { return {tpm_.reconnects(), 0}; }

  // TPM2_Certify of a project KEK's sealed object (for attestation).
  Result<tpm::Attested> CertifyKek(const KekRef& kek, std::string_view project, std::span<const uint8_t> qualifying);

 private:
  SecretBuffer AuthFor(std::string_view project, uint32_t version) const;
  // The KEK bytes, unsealed by the TPM (or from the cache).
  Result<SecretBuffer> Kek(const KekRef& kek, std::string_view project);

  tpm::Tpm& tpm_;
  KekMaterialSource& material_;
  SecretBuffer pin_;
  Options options_;
  KekBudget budget_;
  struct Cached {
    SecretBuffer key;
    std::chrono::steady_clock::time_point until;
  };
  std::mutex cache_mu_;
  std::map<KekId, Cached> cache_;
  std::atomic<bool> pin_refused_{false};
};

}  // namespace custody::core
