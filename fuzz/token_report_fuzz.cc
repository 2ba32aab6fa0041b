// Fuzzes `custody token check --against FILE`: the saved report is a file a
// person hands over (from another team, another machine), so its bytes are
// untrusted. The comparison must never throw; a refusal is kIntegrity and
// names the file; every difference line is printable, starts with one of
// this token's capability ids and never carries the other token's name
// unescaped.
//
// Input: one byte whose bits say which of this token's capabilities are
// present, then the saved report's text. Besides the input as the saved
// report, a report written from those same capabilities must compare with
// no difference, and one with some of them flipped must differ in exactly
// those.
#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "../tools/custody/token_report.h"
#include "custody/common/untrusted.h"

namespace {

using custody::cli::Capability;

std::vector<Capability> Caps(uint8_t bits) {
  const char* ids[] = {"login",         "pin_counters", "rng",      "aes256_keygen", "aes_gcm",
                       "ec_p256_ecdsa", "aes_wrap",     "sessions", "memory"};
  std::vector<Capability> caps;
  for (size_t i = 0; i < std::size(ids); ++i) {
    Capability c;
    c.id = ids[i];
    c.required = i < 6;
    c.present = ((bits >> (i % 8)) & 1) != 0;
    caps.push_back(c);
  }
  return caps;
}

std::string Saved(const std::vector<Capability>& caps, const std::string& token) {
  nlohmann::json list = nlohmann::json::array();
  for (const auto& c : caps) list.push_back({{"id", c.id}, {"required", c.required}, {"present", c.present}});
  nlohmann::json j{{"format", "custody-token-check-v1"}, {"token", token}, {"capabilities", list}};
  return j.dump();
}

void CheckLines(const std::vector<Capability>& caps, const std::vector<std::string>& lines) {
  if (lines.size() > caps.size()) std::abort();
  std::set<std::string> ids;
  for (const auto& c : caps) ids.insert(c.id);
  for (const auto& l : lines) {
    if (!custody::PrintableText(l)) std::abort();
    size_t colon = l.find(": ");
    if (colon == std::string::npos || ids.count(l.substr(0, colon)) == 0) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto caps = Caps(data[0]);
  std::string_view saved(reinterpret_cast<const char*>(data + 1), size - 1);
  const std::string path = "saved.json";

  auto r = custody::cli::CompareWithSaved(caps, saved, path);
  if (r.ok()) {
    CheckLines(caps, *r);
  } else {
    const auto& m = r.error().message();
    if (r.error().category() != custody::Category::kIntegrity) std::abort();
    if (!custody::PrintableText(m) || m.find(path) == std::string::npos) std::abort();
  }

  // The input's bytes as the other token's name: a report of the same
  // capabilities has no difference; one with the first `k` flipped differs
  // in exactly those.
  // (Only a name that is UTF-8: a report cannot hold another.)
  std::string token(saved.substr(0, 64));
  if (token == custody::ValidUtf8(token)) {
    auto same = custody::cli::CompareWithSaved(caps, Saved(caps, token), path);
    if (!same.ok() || !same->empty()) std::abort();
    auto flipped = caps;
    const size_t k = data[0] % (caps.size() + 1);
    for (size_t i = 0; i < k; ++i) flipped[i].present = !flipped[i].present;
    auto diff = custody::cli::CompareWithSaved(caps, Saved(flipped, token), path);
    if (!diff.ok() || diff->size() != k) std::abort();
    CheckLines(caps, *diff);
  }
  return 0;
}
