#include <gtest/gtest.h>

#include "custody/policy/limits.h"

namespace custody::policy {
namespace {

TEST(TokenBucket, StartsFullAllowsABurstThenRefillsSteadily) {
  Rate r = *ParseRate("3/min");
  Bucket b;
  double now = 1000;
  for (int i = 0; i < 3; ++i) {
    auto t = TakeToken(b, r, now);
    ASSERT_TRUE(t.allowed) << i;
    b = t.next;
  }
  auto refused = TakeToken(b, r, now);
  EXPECT_FALSE(refused.allowed);
  EXPECT_NEAR(refused.retry_after_seconds, 20.0, 1e-9);  // one token per 20 s
  EXPECT_FALSE(TakeToken(b, r, now + 19.9).allowed);
  EXPECT_TRUE(TakeToken(b, r, now + 20.0).allowed);
  // Never more than the capacity, however long it rested.
  auto rested = TakeToken(b, r, now + 1e6);
  EXPECT_NEAR(rested.next.tokens, 2.0, 1e-9);
}

TEST(TokenBucket, ClockGoingBackwardsRefillsNothing) {
  Rate r = *ParseRate("1/s");
  auto t = TakeToken(Bucket{}, r, 100);
  ASSERT_TRUE(t.allowed);
  EXPECT_FALSE(TakeToken(t.next, r, 50).allowed);
}

TEST(Windows, DayAndMonthKeysAndEnds) {
  int64_t t = 1796000000;  // 2026-11-30T...Z
  EXPECT_EQ(DayKey(t), "2026-11-30");
  EXPECT_EQ(MonthKey(t), "2026-11");
  EXPECT_EQ(DayKey(EndOfDay(t)), "2026-12-01");
  EXPECT_EQ(EndOfDay(t) % 86400, 0);
  EXPECT_EQ(DayKey(EndOfMonth(t)), "2026-12-01");
  int64_t dec = 1798700000;  // 2026-12-31
  EXPECT_EQ(MonthKey(dec), "2026-12");
  EXPECT_EQ(DayKey(EndOfMonth(dec)), "2027-01-01");
}

}  // namespace
}  // namespace custody::policy
