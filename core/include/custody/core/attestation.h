// Attestation statements: a signed, offline-verifiable account of what the
// custody host holds (the token and its keys with their attributes as the
// token reports them), which policy is in force, and where the audit log
// stands, bound to a verifier's nonce.
//
//   std::string file = core::EncodeStatementFile(payload, der_signature, pubkey_pem);
//   auto check = core::VerifyStatementFile(file, pubkey_pem, nonce_hex);   // `custody attest verify`
//
// The file is JSON: {"format", "payload" (base64 of the exact signed
// bytes: a canonical JSON object), "signature" (base64 DER ECDSA P-256 over
// SHA-256 of those bytes), "public_key" (PEM, informational)}. The signed
// bytes are what `openssl dgst -sha256 -verify` checks; `custody attest`
// writes them beside the file (.bin, .sig) for exactly that.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "custody/common/result.h"

namespace custody::core {

inline constexpr const char* kStatementFormat = "custody-attestation-v1";

std::string EncodeStatementFile(const std::string& payload, std::span<const uint8_t> signature,
                                const std::string& public_key_pem);

struct StatementFile {
  std::string payload;             // the signed bytes
  std::vector<uint8_t> signature;  // DER
};
// Structure only (the fuzz target's entry): JSON object with the format,
// base64 payload and signature. Errors are kIntegrity and name the field.
Result<StatementFile> ParseStatementFile(std::string_view text);

struct StatementSummary {
  std::string time, backend, token, nonce, policy_sha256;
  size_t keys = 0;
  uint64_t audit_head_seq = 0;
};
// Verifies, in order: the file's structure; the signature over the payload
// with `public_key_pem`; the payload's structure (every field a verifier
// relies on, with its type); that the payload names this key as its
// attestation key; and, if `nonce_hex` is given, that the payload carries
// exactly that nonce. Any failure is kIntegrity naming what failed.
Result<StatementSummary> VerifyStatementFile(std::string_view text, const std::string& public_key_pem,
                                             const std::optional<std::string>& nonce_hex);

// SHA-256 (hex) of a PEM public key's DER SubjectPublicKeyInfo: the
// fingerprint statements use for public keys.
Result<std::string> PublicKeyFingerprint(const std::string& public_key_pem);

}  // namespace custody::core
