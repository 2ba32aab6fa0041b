#include "custody/common/time.h"

#include <cstdio>
#include <ctime>

namespace custody {

int64_t SystemNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

namespace {
// gmtime_r, not gmtime: the formatter runs on many threads at once.
std::tm Utc(int64_t unix_seconds) {
  std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  gmtime_r(&t, &tm);
  return tm;
}
}  // namespace

std::string FormatUtc(int64_t unix_seconds) {
  const std::tm tm = Utc(unix_seconds);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                tm.tm_hour, tm.tm_min, tm.tm_sec);
  return buf;
}

std::string FormatUtcMillis(std::chrono::system_clock::time_point tp, int64_t* unix_seconds) {
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(tp.time_since_epoch()).count();
  // Floor division, so a time before 1970 still gets 0..999 milliseconds.
  int64_t secs = ms / 1000, rem = ms % 1000;
  if (rem < 0) {
    secs -= 1;
    rem += 1000;
  }
  if (unix_seconds) *unix_seconds = secs;
  const std::tm tm = Utc(secs);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(rem));
  return buf;
}

}  // namespace custody
