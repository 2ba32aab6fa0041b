// Time as custody uses it: Unix seconds from an injectable clock, and UTC
// written one way (RFC 3339, "2026-12-01T13:39:05Z") wherever people or
// records see it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

namespace custody {

// Unix seconds. Injected wherever a state depends on time, so tests can move
// it; production passes SystemClock.
using Clock = std::function<int64_t()>;
int64_t SystemNow();
inline Clock SystemClock() { return &SystemNow; }

// "YYYY-MM-DDTHH:MM:SSZ".
std::string FormatUtc(int64_t unix_seconds);
// "YYYY-MM-DDTHH:MM:SS.mmmZ" (audit records), and the whole seconds of `tp`.
std::string FormatUtcMillis(std::chrono::system_clock::time_point tp, int64_t* unix_seconds = nullptr);

}  // namespace custody
