#include "custody/seal/blob.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "custody/common/hex.h"

namespace custody::core {
namespace {

void PutU16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint16_t GetU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t GetU32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

void AppendField(std::vector<uint8_t>& out, std::string_view s) {
  uint8_t len[2];
  PutU16(len, static_cast<uint16_t>(s.size()));
  out.insert(out.end(), len, len + 2);
  out.insert(out.end(), s.begin(), s.end());
}

}  // namespace

std::array<uint8_t, kHeaderSize> EncodeHeader(const BlobHeader& h) {
  std::array<uint8_t, kHeaderSize> out{};
  std::copy(kMagic.begin(), kMagic.end(), out.begin());
  out[4] = h.format_version;
  out[5] = h.mechanism;
  PutU16(&out[6], static_cast<uint16_t>(kHeaderSize));
  std::copy(h.kek.id.begin(), h.kek.id.end(), out.begin() + 8);
  PutU32(&out[24], h.kek.version);
  std::copy(h.nonce.begin(), h.nonce.end(), out.begin() + 28);
  return out;
}

Result<BlobView> ParseBlob(std::span<const uint8_t> blob) {
  auto bad = [](std::string what) {
    return Error(Category::kIntegrity, "sealed blob is corrupt: " + std::move(what));
  };
  if (blob.size() < 8) return bad("too short for a header (" + std::to_string(blob.size()) + " bytes)");
  if (!std::equal(kMagic.begin(), kMagic.end(), blob.begin())) return bad("bad magic");
  if (blob[4] != kFormatVersion) {
    return bad("unknown format version " + std::to_string(blob[4]) + " (this custody reads version 1)");
  }
  if (blob[5] != kMechAes256Gcm) return bad("unknown mechanism " + std::to_string(blob[5]));
  if (GetU16(&blob[6]) != kHeaderSize) return bad("header length is not 40");
  if (blob.size() < kHeaderSize + kTagSize) {
    return bad("truncated (" + std::to_string(blob.size()) + " bytes, at least " +
               std::to_string(kHeaderSize + kTagSize) + " needed)");
  }
  if (blob.size() > kHeaderSize + kMaxSecretSize + kTagSize) return bad("longer than any sealed value");
  BlobView v;
  v.header.format_version = blob[4];
  v.header.mechanism = blob[5];
  std::copy_n(blob.begin() + 8, kKekIdSize, v.header.kek.id.begin());
  v.header.kek.version = GetU32(&blob[24]);
  std::copy_n(blob.begin() + 28, kNonceSize, v.header.nonce.begin());
  v.header_bytes = blob.first(kHeaderSize);
  v.ciphertext_and_tag = blob.subspan(kHeaderSize);
  return v;
}

Result<BlobView> ParseBlobFor(const KekRef& expected, std::span<const uint8_t> blob) {
  CUSTODY_ASSIGN_OR_RETURN(BlobView view, ParseBlob(blob));
  if (!(view.header.kek == expected)) {
    return Error(Category::kIntegrity, "sealed blob names KEK " + ToHex(view.header.kek.id) + " v" +
                                           std::to_string(view.header.kek.version) +
                                           " but the store records another; refusing");
  }
  return view;
}

std::vector<uint8_t> ContextAad(std::span<const uint8_t> header_bytes, const SealContext& ctx) {
  static constexpr std::string_view kDomain = "custody-seal-v1";
  std::vector<uint8_t> out;
  out.reserve(header_bytes.size() + kDomain.size() + ctx.project.size() +
              ctx.environment.size() + ctx.name.size() + 10);
  out.insert(out.end(), header_bytes.begin(), header_bytes.end());
  out.insert(out.end(), kDomain.begin(), kDomain.end());
  AppendField(out, ctx.project);
  AppendField(out, ctx.environment);
  AppendField(out, ctx.name);
  uint8_t v[4];
  PutU32(v, ctx.version);
  out.insert(out.end(), v, v + 4);
  return out;
}

}  // namespace custody::core
