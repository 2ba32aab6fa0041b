// ECDSA P-256 keys inside the token: generate (non-extractable), find by
// label, sign a SHA-256 digest, and read the public point.
//
//   auto key = hsm::FindEcKey(session, "custody:audit:v1");
//   if (!*key) key = hsm::GenerateEcKey(session, "custody:audit:v1");
//   auto rs = hsm::SignDigest(session, (*key)->private_key, digest);  // r||s, 64 bytes
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "custody/common/result.h"
#include "custody/hsm/session.h"

namespace custody::hsm {

struct EcKey {
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
  std::vector<uint8_t> id;     // CKA_ID shared by the pair
  std::vector<uint8_t> point;  // uncompressed point 04||X||Y (65 bytes)
};

// Generates a P-256 key pair as token objects: the private key sensitive,
// non-extractable, private and sign-only; the public key verify-only.
Result<EcKey> GenerateEcKey(Session& s, const std::string& label);

// The pair with this label, or nullopt. More than one pair is kIntegrity.
Result<std::optional<EcKey>> FindEcKey(Session& s, const std::string& label);

// Raw ECDSA (CKM_ECDSA) over a SHA-256 digest: r||s, 64 bytes.
Result<std::vector<uint8_t>> SignDigest(Session& s, CK_OBJECT_HANDLE private_key, std::span<const uint8_t, 32> digest);

}  // namespace custody::hsm
