// Fuzzes what `custody attest verify` reads from a statement file before
// and after the signature check: the outer frame and the signed payload's
// structure checks, and the two EK challenge files (the host reads the
// verifier's challenge; the verifier reads its kept key). Must never crash
// or accept a frame without its fields.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "custody/attest/attestation.h"
#include "custody/attest/endorsement.h"

namespace {
// A fixed P-256 public key: fuzzed statements never carry its signature, so
// verification must refuse them all.
constexpr const char* kPem =
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEzLDB/9+W29fA28pbx+PJTzqZT3qv\n"
    "ejAJm9Eh8HGAKxWQxymrqjgoGlo1VKvVOskJNhYNFLyXn6IpKjpnksOr+g==\n"
    "-----END PUBLIC KEY-----\n";
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto f = custody::core::ParseStatementFile(text);
  if (f.ok() && f->signature.empty()) std::abort();
  auto v = custody::core::VerifyStatementFile(text, kPem, std::string("00112233445566778899"));
  if (v.ok()) std::abort();  // nothing fuzzed can carry a valid signature
  auto c = custody::core::ParseEkChallenge(text);
  if (c.ok() && (c->credential_blob.empty() || c->encrypted_secret.empty() || c->ak_name.size() != 68)) std::abort();
  auto k = custody::core::ParseEkChallengeKey(text);
  if (k.ok() && (k->nonce.size() != 64 || k->ak_name.size() != 68)) std::abort();
  return 0;
}
