#include "custody/common/error.h"

#include <gtest/gtest.h>

#include "custody/common/result.h"

namespace custody {
namespace {

TEST(ExitCode, EachCategoryHasItsDocumentedSysexitsCode) {
  EXPECT_EQ(ExitCode(Category::kUsage), 64);
  EXPECT_EQ(ExitCode(Category::kIntegrity), 65);
  EXPECT_EQ(ExitCode(Category::kNotFound), 66);
  EXPECT_EQ(ExitCode(Category::kUnavailable), 69);
  EXPECT_EQ(ExitCode(Category::kInternal), 70);
  EXPECT_EQ(ExitCode(Category::kLimit), 75);
  EXPECT_EQ(ExitCode(Category::kDenied), 77);
  EXPECT_EQ(ExitCode(Category::kConfig), 78);
}

TEST(Error, WrapKeepsCategoryAndBackendCode) {
  Error e = Error(Category::kDenied, "C_Login failed", Backend::kPkcs11, 0xA0).Wrap("opening token");
  EXPECT_EQ(e.message(), "opening token: C_Login failed");
  EXPECT_EQ(e.category(), Category::kDenied);
  EXPECT_EQ(e.backend(), Backend::kPkcs11);
  EXPECT_EQ(e.code(), 0xA0u);
}

Result<int> Half(int x) {
  if (x % 2 != 0) return Error(Category::kUsage, "odd");
  return x / 2;
}

Result<int> Quarter(int x) {
  CUSTODY_ASSIGN_OR_RETURN(int h, Half(x));
  CUSTODY_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

TEST(Result, AssignOrReturnPropagatesTheFirstError) {
  EXPECT_EQ(*Quarter(8), 2);
  auto r = Quarter(6);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message(), "odd");
}

}  // namespace
}  // namespace custody
