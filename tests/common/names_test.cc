#include <gtest/gtest.h>

#include "custody/common/names.h"

namespace custody::core {
namespace {

TEST(SecretPath, ParsesThreeParts) {
  auto p = SecretPath::Parse("payments/prod/stripe-key.v2");
  ASSERT_TRUE(p.ok()) << p.error().message();
  EXPECT_EQ(p->project, "payments");
  EXPECT_EQ(p->environment, "prod");
  EXPECT_EQ(p->name, "stripe-key.v2");
  EXPECT_EQ(p->str(), "payments/prod/stripe-key.v2");
}

TEST(SecretPath, RefusesMalformedPathsAsUsageErrors) {
  for (const char* bad : {"", "payments", "payments/prod", "payments/prod/x/y", "/prod/x", "payments//x",
                          "Payments/prod/x", "payments/prod/.hidden", "pay ments/prod/x", "payments/prod/a b",
                          "../etc/passwd"}) {
    auto p = SecretPath::Parse(bad);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.error().category(), Category::kUsage) << bad;
  }
}

TEST(Names, LengthLimits) {
  EXPECT_TRUE(ValidateProjectName(std::string(63, 'a')).ok());
  EXPECT_FALSE(ValidateProjectName(std::string(64, 'a')).ok());
  EXPECT_TRUE(ValidateSecretName(std::string(128, 'A')).ok());
  EXPECT_FALSE(ValidateSecretName(std::string(129, 'A')).ok());
}

TEST(Names, NonPrintableCharactersAreNotEchoed) {
  auto s = ValidateSecretName(std::string("ab\x1b[2Jc"));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().message().find('\x1b'), std::string::npos);
}

TEST(Scope, ProjectOrProjectAndEnv) {
  auto a = Scope::Parse("");
  ASSERT_TRUE(a.ok());
  EXPECT_FALSE(a->project.has_value());
  auto b = Scope::Parse("payments/prod");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b->project, "payments");
  EXPECT_EQ(*b->environment, "prod");
  EXPECT_FALSE(Scope::Parse("payments/prod/x").ok());
}

}  // namespace
}  // namespace custody::core
