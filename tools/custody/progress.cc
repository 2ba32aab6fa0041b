#include "progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "commands.h"

namespace custody::cli {
namespace {

std::string Duration(double seconds) {
  const auto s = static_cast<long long>(seconds + 0.5);
  if (s < 60) return std::to_string(s) + " s";
  if (s < 3600) return std::to_string(s / 60) + " min " + std::to_string(s % 60) + " s";
  return std::to_string(s / 3600) + " h " + std::to_string(s % 3600 / 60) + " min";
}

}  // namespace

Progress::Progress(const Globals& g, std::string verb, std::string unit)
    : verb_(std::move(verb)), unit_(std::move(unit)) {
  if (g.progress == "lines") {
    mode_ = Mode::kLines;
  } else if (g.progress == "none" || g.json || ::isatty(STDERR_FILENO) != 1) {
    mode_ = Mode::kNone;
  } else {
    mode_ = Mode::kBar;
  }
}

Progress::~Progress() {
  if (open_line_) std::fputc('\n', stderr);
}

void Progress::Update(uint64_t done, uint64_t total) {
  if (mode_ == Mode::kNone || total == 0) return;
  const auto now = std::chrono::steady_clock::now();
  if (mode_ == Mode::kLines) {
    // About every tenth, and the last.
    const uint64_t step = std::max<uint64_t>(1, total / 10);
    if (done >= total || done / step != last_ / step) {
      std::fprintf(stderr, "custody: %s %llu/%llu\n", verb_.c_str(), static_cast<unsigned long long>(done),
                   static_cast<unsigned long long>(total));
    }
    last_ = done;
    return;
  }
  // A terminal: at most ten redraws a second, and the last.
  if (done < total && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0;
  std::string tail;
  if (done >= total) {
    tail = "done in " + Duration(elapsed);
  } else if (rate > 0) {
    tail = Duration(static_cast<double>(total - done) / rate) + " left";
  } else {
    tail = "starting";
  }
  std::fprintf(stderr, "\r\033[Kcustody: %s %llu/%llu %s (%.0f/s, %s)", verb_.c_str(),
               static_cast<unsigned long long>(done), static_cast<unsigned long long>(total), unit_.c_str(), rate,
               tail.c_str());
  open_line_ = done < total;
  if (done >= total) std::fputc('\n', stderr);
  std::fflush(stderr);
}

}  // namespace custody::cli
