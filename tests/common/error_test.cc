#include <gtest/gtest.h>

#include "custody/common/error.h"
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

TEST(Error, ATypedDetailIsSeparateFromTheBackendCode) {
  // SQLITE_ERROR is 1: no code value means "version taken", only the detail.
  Error plain(Category::kInternal, "store: no such table", Backend::kStore, 1);
  EXPECT_EQ(plain.detail(), ErrorDetail::kNone);
  EXPECT_FALSE(plain.version_taken());
  EXPECT_FALSE(plain.retry_after());
  EXPECT_FALSE(plain.needs_authentication());

  Error taken = Error(Category::kUnavailable, "version 2 was taken", Backend::kStore, 1555).WithVersionTaken();
  EXPECT_TRUE(taken.version_taken());
  EXPECT_EQ(taken.code(), 1555u) << "the backend's code is kept as it was";
  Error wrapped = std::move(taken).Wrap("putting a");
  EXPECT_TRUE(wrapped.version_taken()) << "Wrap keeps the detail";

  Error limit = Error(Category::kLimit, "limit reached").WithRetryAfter(30);
  EXPECT_EQ(limit.retry_after(), 30u);
  EXPECT_EQ(limit.code(), 0u);
  EXPECT_EQ(limit.http_status(), 429);
  EXPECT_EQ(Error(Category::kLimit, "limit reached").WithRetryAfter(0).retry_after(), 1u) << "never Retry-After: 0";
  // One detail at a time: the last one set.
  EXPECT_FALSE(Error(Category::kLimit, "x").WithRetryAfter(5).WithVersionTaken().retry_after());
}

TEST(Error, OnlyADeniedCallerNobodyKnowsGets401) {
  EXPECT_EQ(Error(Category::kDenied, "no principal matches").WithNeedsAuthentication().http_status(), 401);
  EXPECT_EQ(Error(Category::kDenied, "policy says no").http_status(), 403);
  // A code of 401 from some backend means nothing to the HTTP status.
  EXPECT_EQ(Error(Category::kDenied, "policy says no", Backend::kNone, 401).http_status(), 403);
  EXPECT_EQ(Error(Category::kUnavailable, "down").WithNeedsAuthentication().http_status(), 503);
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
