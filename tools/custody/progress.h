// Progress of a long command (kek rotate, store copy, audit verify), on
// stderr, never on stdout (what a command prints there is its answer):
//   --progress auto   (the default) a line rewritten in place on a terminal:
//                     counts, rate and time left; nothing when stderr is not a
//                     terminal or --json is given;
//   --progress lines  plain lines, about every tenth and the last, for logs
//                     (a cron job or a systemd unit that wants to see a long
//                     rotation move);
//   --progress none   nothing.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace custody::cli {

struct Globals;

class Progress {
 public:
  // `verb` says what a unit of work did ("re-sealed", "copied", "checked"),
  // `unit` what it is counted in ("versions", "records").
  Progress(const Globals& g, std::string verb, std::string unit);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  void Update(uint64_t done, uint64_t total);

 private:
  enum class Mode { kNone, kBar, kLines };
  Mode mode_;
  std::string verb_, unit_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), last_draw_{};
  uint64_t last_ = 0;
  bool open_line_ = false;  // a bar line not yet ended
};

}  // namespace custody::cli
