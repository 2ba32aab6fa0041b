// Rate and spend limit arithmetic. Pure: the caller passes the time and the
// stored state, and stores what comes back.
//
//   auto r = policy::TakeToken(bucket, rate, now);
//   if (!r.allowed) printf("retry in %.0f s\n", r.retry_after_seconds);
#pragma once

#include <cstdint>
#include <string>

#include "custody/policy/model.h"

namespace custody::policy {

// A token bucket: starts full (`count` tokens), refills continuously at
// count/period, one token per operation.
struct Bucket {
  double tokens = -1;  // < 0: never used, treat as full
  double updated_at = 0;  // unix seconds
};

struct TakeResult {
  bool allowed = false;
  Bucket next;                 // the state to store (unchanged when refused)
  double retry_after_seconds = 0;
};

TakeResult TakeToken(const Bucket& bucket, const Rate& rate, double now);

// UTC day ("2026-11-29") and month ("2026-11") keys, and when each ends.
std::string DayKey(int64_t unix_seconds);
std::string MonthKey(int64_t unix_seconds);
int64_t EndOfDay(int64_t unix_seconds);
int64_t EndOfMonth(int64_t unix_seconds);

}  // namespace custody::policy
