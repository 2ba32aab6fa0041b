#include <gtest/gtest.h>

#include "custody/seal/blob.h"

namespace custody::core {
namespace {

BlobHeader SampleHeader() {
  BlobHeader h;
  for (size_t i = 0; i < h.kek.id.size(); ++i) h.kek.id[i] = static_cast<uint8_t>(i + 1);
  h.kek.version = 0x01020304;
  for (size_t i = 0; i < h.nonce.size(); ++i) h.nonce[i] = static_cast<uint8_t>(0xA0 + i);
  return h;
}

std::vector<uint8_t> SampleBlob(size_t ct_len) {
  auto hdr = EncodeHeader(SampleHeader());
  std::vector<uint8_t> blob(hdr.begin(), hdr.end());
  blob.resize(blob.size() + ct_len + kTagSize, 0x5A);
  return blob;
}

TEST(Blob, HeaderLayoutIsAsDocumented) {
  auto h = EncodeHeader(SampleHeader());
  EXPECT_EQ(std::string(h.begin(), h.begin() + 4), "CSTB");
  EXPECT_EQ(h[4], 1);        // format version
  EXPECT_EQ(h[5], 1);        // AES-256-GCM
  EXPECT_EQ(h[6], 40);       // header length, little-endian
  EXPECT_EQ(h[7], 0);
  EXPECT_EQ(h[8], 1);        // KEK id starts
  EXPECT_EQ(h[24], 0x04);    // KEK version, little-endian
  EXPECT_EQ(h[27], 0x01);
  EXPECT_EQ(h[28], 0xA0);    // nonce starts
  EXPECT_EQ(h[39], 0xAB);
}

TEST(Blob, ParseRoundTrips) {
  auto blob = SampleBlob(64);
  auto v = ParseBlob(blob);
  ASSERT_TRUE(v.ok()) << v.error().message();
  EXPECT_EQ(v->header.kek, SampleHeader().kek);
  EXPECT_EQ(v->header.nonce, SampleHeader().nonce);
  EXPECT_EQ(v->ciphertext_and_tag.size(), 64 + kTagSize);
  EXPECT_EQ(v->header_bytes.size(), kHeaderSize);
}

void ExpectCorrupt(const std::vector<uint8_t>& blob, const std::string& says) {
  auto v = ParseBlob(blob);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.error().category(), Category::kIntegrity);
  EXPECT_NE(v.error().message().find(says), std::string::npos) << v.error().message();
}

TEST(Blob, RefusesEachKindOfDamage) {
  ExpectCorrupt({}, "too short");
  auto b = SampleBlob(8);
  b[0] = 'X';
  ExpectCorrupt(b, "bad magic");
  b = SampleBlob(8);
  b[4] = 2;
  ExpectCorrupt(b, "unknown format version 2");
  b = SampleBlob(8);
  b[5] = 9;
  ExpectCorrupt(b, "unknown mechanism 9");
  b = SampleBlob(8);
  b[6] = 41;
  ExpectCorrupt(b, "header length");
  b = SampleBlob(0);
  b.resize(kHeaderSize + kTagSize - 1);
  ExpectCorrupt(b, "truncated");
  b = SampleBlob(kMaxSecretSize + 1);
  ExpectCorrupt(b, "longer than");
}

TEST(Blob, EveryTruncationIsRefusedOrLeftToTheTag) {
  // Any prefix shorter than header+tag must be refused by the parser itself.
  auto blob = SampleBlob(16);
  for (size_t n = 0; n < kHeaderSize + kTagSize; ++n) {
    std::vector<uint8_t> cut(blob.begin(), blob.begin() + static_cast<ptrdiff_t>(n));
    EXPECT_FALSE(ParseBlob(cut).ok()) << n;
  }
}

TEST(ContextAad, DiffersForEveryContextField) {
  auto hdr = EncodeHeader(SampleHeader());
  SealContext base{"payments", "prod", "stripe", 1};
  auto a = ContextAad(hdr, base);
  EXPECT_NE(a, ContextAad(hdr, {"payment", "prod", "stripe", 1}));
  EXPECT_NE(a, ContextAad(hdr, {"payments", "staging", "stripe", 1}));
  EXPECT_NE(a, ContextAad(hdr, {"payments", "prod", "stripe2", 1}));
  EXPECT_NE(a, ContextAad(hdr, {"payments", "prod", "stripe", 2}));
  // Length prefixes keep boundaries: moving a character between fields changes the AAD.
  EXPECT_NE(ContextAad(hdr, {"ab", "c", "x", 1}), ContextAad(hdr, {"a", "bc", "x", 1}));
  EXPECT_EQ(a, ContextAad(hdr, base));
}

}  // namespace
}  // namespace custody::core
