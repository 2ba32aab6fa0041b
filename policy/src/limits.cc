#include "custody/policy/limits.h"

#include <algorithm>
#include <ctime>

namespace custody::policy {

TakeResult TakeToken(const Bucket& bucket, const Rate& rate, double now) {
  const double capacity = static_cast<double>(rate.count);
  const double per_second = capacity / static_cast<double>(rate.period_seconds);
  double tokens = bucket.tokens < 0 ? capacity : bucket.tokens;
  // A clock that went backwards refills nothing (and takes nothing away).
  double elapsed = std::max(0.0, now - bucket.updated_at);
  tokens = std::min(capacity, tokens + elapsed * per_second);
  TakeResult r;
  if (tokens >= 1.0) {
    r.allowed = true;
    r.next = Bucket{tokens - 1.0, now};
  } else {
    r.allowed = false;
    r.next = bucket;
    r.retry_after_seconds = (1.0 - tokens) / per_second;
  }
  return r;
}

namespace {
std::tm Utc(int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  return tm;
}
}  // namespace

std::string DayKey(int64_t t) {
  std::tm tm = Utc(t);
  char buf[16];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", &tm);
  return buf;
}

std::string MonthKey(int64_t t) {
  std::tm tm = Utc(t);
  char buf[16];
  std::strftime(buf, sizeof buf, "%Y-%m", &tm);
  return buf;
}

int64_t EndOfDay(int64_t t) { return (t / 86400 + 1) * 86400; }

int64_t EndOfMonth(int64_t t) {
  std::tm tm = Utc(t);
  tm.tm_mday = 1;
  tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
  tm.tm_mon += 1;
  return static_cast<int64_t>(timegm(&tm));  // timegm normalises month 12 to January
}

}  // namespace custody::policy
