// `custody token check`'s report, and its comparison with a report saved
// from another token (`--against`). Apart from token_check.cc so that the
// comparison, which reads a file a person hands over, is fuzzed
// (fuzz/token_report_fuzz.cc) without a token.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "custody/common/result.h"

namespace custody::cli {

struct Capability {
  std::string id;    // stable key, for --against
  std::string what;  // for people
  bool required = false;
  bool present = false;
  std::string detail;      // what the token answered
  std::string without_it;  // what custody does without it
};

// The differences between `caps` (this token) and `saved`, the text of a
// saved `custody token check --json` report, one printable line each.
// `path` names the saved report in the error: kIntegrity when `saved` is not
// such a report. Nothing in `saved` is trusted: it never throws, and what it
// names (the other token) reaches a line escaped.
Result<std::vector<std::string>> CompareWithSaved(const std::vector<Capability>& caps, std::string_view saved,
                                                  std::string_view path);

}  // namespace custody::cli
