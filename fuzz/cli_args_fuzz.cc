// Fuzzes the CLI's edge checks on what arrives from argv and the
// environment before it can reach an audit record or an answer: the text
// check every free-text argument goes through (CheckArgText, CheckEnvText)
// and the principal names of `policy explain`. An accepted argument must be
// printable UTF-8 within the limit; a refusal must be one printable line that
// names the argument and never echoes the refused bytes.
//
// Input: the argument's name (up to the first 0x00, at most 64 bytes), then
// its value.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "../tools/custody/io.h"
#include "custody/common/untrusted.h"
#include "custody/policy/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  size_t nul = in.find('\0');
  std::string_view what = nul == std::string_view::npos ? "--arg" : in.substr(0, std::min<size_t>(nul, 64));
  std::string_view value = nul == std::string_view::npos ? in : in.substr(nul + 1);
  if (!custody::PrintableText(what)) what = "--arg";  // names are custody's own

  for (size_t max : {custody::cli::kMaxArgBytes, size_t{500}}) {
    custody::Status s = custody::cli::CheckArgText(what, value, max);
    if (s.ok()) {
      if (!custody::PrintableText(value) || value.size() > max) std::abort();
    } else {
      const std::string& m = s.error().message();
      if (s.error().category() != custody::Category::kUsage) std::abort();
      if (!custody::PrintableText(m) || m.find(what) == std::string::npos) std::abort();
      if (!custody::PrintableText(value) && value.size() >= 4 && m.find(value) != std::string::npos) std::abort();
    }
  }
  custody::Status env = custody::cli::CheckEnvText("CUSTODY_CONFIG", value);
  if (env.ok() != custody::PrintableText(value) && value.size() <= custody::cli::kMaxArgBytes) std::abort();
  if (!env.ok() && env.error().category() != custody::Category::kConfig) std::abort();
  if (custody::policy::ValidPrincipalName(value) && !custody::PrintableText(value)) std::abort();
  return 0;
}
