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
// SHA-256 of those bytes), "public_key" (PEM, informational), "statement"
// (the payload again as readable JSON, for people)}. The signed bytes are
// what `openssl dgst -sha256 -verify` checks; `custody attest` writes them
// beside the file (.bin, .sig) for exactly that. Verify reads the signed
// bytes only, and refuses a file whose readable copy says anything else: a
// person reading the file must see what was signed.
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
  // The readable copy ("statement"), as compact JSON; absent in a file
  // without one.
  std::optional<std::string> readable;
};
// Structure only (the fuzz target's entry): JSON object with the format,
// base64 payload and signature. Errors are kIntegrity and name the field.
Result<StatementFile> ParseStatementFile(std::string_view text);

// One key as the signed payload lists it (id empty where it has none).
struct StatementKey {
  std::string role, label, id, fingerprint;
};
// What a verified statement says, every field taken from the signed bytes.
struct StatementSummary {
  std::string time, backend, token, nonce, policy_sha256, audit_head_hash, attestation_key;
  std::optional<uint64_t> policy_version;
  size_t keys = 0;
  std::vector<StatementKey> key_list;
  uint64_t audit_head_seq = 0;
  // TPM statements. ak_name: the quote's AK (hex Name). ak_public_area: its
  // TPM2B_PUBLIC, checked to hash to that Name and to be a restricted
  // signing key made in the TPM (empty in statements made before it was
  // added). ek_certificate: the TPM's EK certificate (DER) as the statement
  // carries it, NOT checked here (see endorsement.h). signer_certified: the
  // key that signed the statement is certified by the AK (TPM2_Certify with
  // the nonce), so the whole statement, not only the quote, is the TPM's.
  std::string ak_name;
  std::vector<uint8_t> ak_public_area, ek_certificate;
  bool signer_certified = false;
};
// Verifies, in order: the file's structure; the signature over the payload
// with `public_key_pem`; that the readable copy, if the file has one, is
// exactly the signed payload (else the first field where they differ is
// named, e.g. "keys[0].id"); the payload's structure (every field a
// verifier relies on, with its type); that the payload names this key as
// its attestation key; and, if `nonce_hex` is given, that the payload
// carries exactly that nonce. Any failure is kIntegrity naming what failed.
Result<StatementSummary> VerifyStatementFile(std::string_view text, const std::string& public_key_pem,
                                             const std::optional<std::string>& nonce_hex);

// SHA-256 (hex) of a PEM public key's DER SubjectPublicKeyInfo: the
// fingerprint statements use for public keys.
Result<std::string> PublicKeyFingerprint(const std::string& public_key_pem);

}  // namespace custody::core
