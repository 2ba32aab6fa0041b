// The attestation key chained to the TPM's endorsement key (EK), for a
// verifier that trusts the TPM manufacturer's CA and nothing on the host.
//
//   host:      custody attest --nonce N --out first.json          (carries the EK certificate and the AK)
//   verifier:  auto c = core::MakeEkChallenge(first, ca_pem);      // `custody attest challenge`
//              // send c->challenge to the host, keep c->key
//   host:      custody attest --challenge challenge.json --out st.json
//              // the TPM's ActivateCredential recovers the secret, which becomes the nonce
//   verifier:  core::VerifyEndorsement(summary_of_st, ca_pem, key)  // `attest verify --ek-ca --challenge-key`
//
// Why it holds: the secret is wrapped (TPM2_MakeCredential) to the EK's public
// key from a certificate that chains to the CA, and bound to the AK's Name.
// Only the TPM holding that EK can unwrap it, and only while an object with
// that Name is loaded in it; the Name commits to the AK's attributes
// (fixedTPM, restricted). A statement that carries the secret as its nonce,
// with a quote by that AK and the statement's own signing key certified by
// it, can only come from that TPM.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "custody/attest/attestation.h"
#include "custody/common/result.h"

namespace custody::core {

inline constexpr const char* kEkChallengeFormat = "custody-ek-challenge-v1";
inline constexpr const char* kEkChallengeKeyFormat = "custody-ek-challenge-key-v1";

// What the verifier sends (`challenge`, JSON) and keeps (`key`, JSON: the
// secret nonce, the EK certificate's SHA-256 and the AK Name it was made
// for). The key must stay with the verifier until the answer comes back.
struct EkChallenge {
  std::string challenge, key;
  std::string ek_subject, ek_issuer;  // RFC 2253, escaped, for the user
};
// Checks the statement's EK certificate against `ca_pem` (every certificate
// in it is a trust anchor: the manufacturer's root and intermediates) and
// that it is an RSA 2048 key, then wraps a fresh 32-byte secret to it for
// the statement's AK. `s` must come from VerifyStatementFile and carry the
// AK's public area. Failures are kIntegrity (or kUsage for an unreadable CA).
Result<EkChallenge> MakeEkChallenge(const StatementSummary& s, const std::string& ca_pem);

// The host's side: the challenge file, untrusted bytes (fuzzed).
struct ParsedEkChallenge {
  std::vector<uint8_t> credential_blob, encrypted_secret;
  std::string ak_name;  // hex
};
Result<ParsedEkChallenge> ParseEkChallenge(std::string_view text);

struct EkChallengeKey {
  std::string nonce;           // hex, 32 bytes
  std::string ek_cert_sha256;  // hex
  std::string ak_name;         // hex
};
Result<EkChallengeKey> ParseEkChallengeKey(std::string_view text);

struct Endorsement {
  std::string ek_subject, ek_issuer, ek_cert_sha256;
};
// The verifier's last step, on a statement VerifyStatementFile accepted with
// `key.nonce` as the required nonce: its EK certificate chains to `ca_pem`
// and is the one the challenge was made for, its AK is the one the
// challenge was bound to, and the key that signed it is certified by that
// AK. kIntegrity naming the first thing that fails.
Result<Endorsement> VerifyEndorsement(const StatementSummary& s, const std::string& ca_pem, const EkChallengeKey& key);

}  // namespace custody::core
