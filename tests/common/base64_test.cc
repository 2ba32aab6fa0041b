#include <gtest/gtest.h>

#include "custody/common/base64.h"

namespace custody {
namespace {

TEST(Base64, RoundTripsEveryLength) {
  for (size_t n = 0; n < 40; ++n) {
    std::vector<uint8_t> in(n);
    for (size_t i = 0; i < n; ++i) in[i] = static_cast<uint8_t>(i * 37 + 11);
    std::string text = Base64Encode(in);
    EXPECT_EQ(text.size() % 4, 0u);
    if (n == 0) continue;
    auto back = Base64Decode(text);
    ASSERT_TRUE(back) << n;
    EXPECT_EQ(*back, in) << n;
    auto secret = Base64DecodeSecret(text);
    ASSERT_TRUE(secret);
    EXPECT_EQ(secret->size(), n);
  }
  EXPECT_EQ(Base64Encode(std::string_view("sk-live")), "c2stbGl2ZQ==");
}

TEST(Base64, RefusesWhatIsNotPaddedBase64) {
  EXPECT_FALSE(Base64Decode(""));
  EXPECT_FALSE(Base64Decode("abc"));
  EXPECT_FALSE(Base64Decode("ab!d"));
  EXPECT_FALSE(Base64DecodeSecret("a==="));
}

}  // namespace
}  // namespace custody
