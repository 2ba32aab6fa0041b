// Policy files (TOML, parsed by toml++) to a validated Policy.
//
//   auto r = policy::ParsePolicy(text, "policy.toml");
//   if (!r.errors.empty()) for (auto& e : r.errors) puts(e.c_str());
//
// Every problem is reported, each as "FILE:LINE:COLUMN: what is wrong", and a
// policy with any error is never returned as valid. Pure: no file or system
// access (the caller reads the file).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "custody/policy/model.h"

namespace custody::policy {

struct ParseResult {
  std::optional<Policy> policy;     // set only when errors is empty
  std::vector<std::string> errors;  // "file:line:col: message"
};

ParseResult ParsePolicy(std::string_view text, std::string_view file_name);

}  // namespace custody::policy
