#include "token_report.h"

#include <map>
#include <nlohmann/json.hpp>

#include "custody/common/untrusted.h"

namespace custody::cli {

Result<std::vector<std::string>> CompareWithSaved(const std::vector<Capability>& caps, std::string_view saved,
                                                  std::string_view path) {
  using nlohmann::json;
  const json other = json::parse(saved, nullptr, /*allow_exceptions=*/false);
  // Read without value() or get() on a field not checked first: either
  // throws on a field of another type, and the file is anyone's.
  auto format = other.is_object() ? other.find("format") : other.end();
  auto list = other.is_object() ? other.find("capabilities") : other.end();
  if (other.is_discarded() || !other.is_object() || format == other.end() || !format->is_string() ||
      *format != "custody-token-check-v1" || list == other.end() || !list->is_array()) {
    return Error(Category::kIntegrity,
                 "--against " + std::string(path) + " is not a saved `custody token check --json` report");
  }
  std::map<std::string, bool, std::less<>> theirs;
  for (const auto& c : *list) {
    if (!c.is_object()) continue;
    auto id = c.find("id");
    auto present = c.find("present");
    if (id != c.end() && id->is_string() && present != c.end() && present->is_boolean()) {
      theirs[id->get<std::string>()] = present->get<bool>();
    }
  }
  auto token = other.find("token");
  const std::string their_token =
      token != other.end() && token->is_string() ? EscapeUntrusted(token->get<std::string>()) : "the other token";
  std::vector<std::string> out;
  for (const auto& c : caps) {
    auto it = theirs.find(c.id);
    if (it == theirs.end()) {
      out.push_back(c.id + ": not in the saved report");
    } else if (it->second != c.present) {
      out.push_back(c.id + ": " + (c.present ? "present here, missing on " : "missing here, present on ") +
                    their_token + (c.required ? " (required)" : " (optional)"));
    }
  }
  return out;
}

}  // namespace custody::cli
