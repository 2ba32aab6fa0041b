// The sealed blob format, version 1. Written down in docs/BLOB_FORMAT.md.
//
//   offset size  field
//   0      4     magic "CSTB"
//   4      1     format version (1)
//   5      1     mechanism (1 = AES-256-GCM, 96-bit nonce, 128-bit tag)
//   6      2     header length, little-endian (40 for v1)
//   8      16    KEK id (the KEK's CKA_ID in the token)
//   24     4     KEK version, little-endian
//   28     12    nonce, from the token's RNG
//   40     n     ciphertext
//   40+n   16    GCM tag
//
// The AEAD's associated data is the whole 40-byte header followed by the
// context (project, environment, name, version; see ContextAad). The context
// is not stored in the blob: it comes from where the blob is found, so a blob
// copied to another name, environment, project or version fails to
// authenticate.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "custody/common/result.h"

namespace custody::core {

inline constexpr std::array<uint8_t, 4> kMagic = {'C', 'S', 'T', 'B'};
inline constexpr uint8_t kFormatVersion = 1;
inline constexpr uint8_t kMechAes256Gcm = 1;
inline constexpr size_t kHeaderSize = 40;
inline constexpr size_t kNonceSize = 12;
inline constexpr size_t kTagSize = 16;
inline constexpr size_t kKekIdSize = 16;
inline constexpr size_t kMaxSecretSize = 64 * 1024;

using KekId = std::array<uint8_t, kKekIdSize>;

struct KekRef {
  KekId id{};
  uint32_t version = 0;
  bool operator==(const KekRef&) const = default;
};

struct SealContext {
  std::string_view project;
  std::string_view environment;
  std::string_view name;
  uint32_t version = 0;
};

struct BlobHeader {
  uint8_t format_version = kFormatVersion;
  uint8_t mechanism = kMechAes256Gcm;
  KekRef kek;
  std::array<uint8_t, kNonceSize> nonce{};
};

// A parsed blob: views into the caller's bytes.
struct BlobView {
  BlobHeader header;
  std::span<const uint8_t> header_bytes;  // the 40 bytes, for the AAD
  std::span<const uint8_t> ciphertext_and_tag;
};

std::array<uint8_t, kHeaderSize> EncodeHeader(const BlobHeader& h);

// Parses and checks structure only (the token checks authenticity). Errors
// are kIntegrity and say what is wrong: too short, bad magic, unknown
// version or mechanism, wrong header length, impossible ciphertext length.
Result<BlobView> ParseBlob(std::span<const uint8_t> blob);
// ParseBlob, and the KEK the header names must be `expected` (the one the
// store records for this version): kIntegrity otherwise.
Result<BlobView> ParseBlobFor(const KekRef& expected, std::span<const uint8_t> blob);

// header || "custody-seal-v1" || len16(project) project || len16(env) env ||
// len16(name) name || u32le(version). Lengths make the encoding injective.
std::vector<uint8_t> ContextAad(std::span<const uint8_t> header_bytes, const SealContext& ctx);

}  // namespace custody::core
