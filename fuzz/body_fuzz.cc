// Fuzzes InPlaceJson, the parser for request and answer bodies that carry a
// secret (they come from the network). Whatever the bytes: no crash or read
// out of bounds, every view stays inside the text, and what it accepts a
// general JSON parser accepts too, with the same strings (a differential
// check against nlohmann, which custodyd used before).
#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "custody/common/inplace_json.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string original(reinterpret_cast<const char*>(data), size);
  std::string text = original;
  auto j = custody::InPlaceJson::Parse(text);
  if (!j.ok()) return 0;
  auto general = nlohmann::json::parse(original, nullptr, /*allow_exceptions=*/false);
  if (general.is_discarded() || !general.is_object()) std::abort();
  for (const char* key : {"value", "value_base64", "version"}) {
    auto v = j->String(key);
    if (v) {
      if (v->data() < text.data() || v->data() + v->size() > text.data() + text.size()) std::abort();
      if (!general[key].is_string() || general[key].get<std::string>() != *v) std::abort();
    }
    // JSON's -0 is the integer zero: rapidjson reads it as 0 (unsigned) and
    // nlohmann as a signed 0, so the check compares values, not the parser's
    // choice of signed or unsigned storage.
    auto n = j->Uint(key);
    if (n) {
      const auto& g = general[key];
      if (!g.is_number_integer()) std::abort();
      if (!g.is_number_unsigned() && g.get<int64_t>() < 0) std::abort();
      if (g.get<uint64_t>() != *n) std::abort();
    }
  }
  // The Vault write's nested form, {"data": {"value": "..."}}: the same
  // views-inside-the-text rule, the same strings, and the member names
  // nlohmann sees (it keeps the last of repeated names, so only a count of
  // distinct names is compared).
  for (const char* object : {"data", "options"}) {
    auto keys = j->ObjectKeys(object);
    const bool is_object = general.contains(object) && general[object].is_object();
    if (keys.has_value() != is_object) std::abort();
    if (!keys) continue;
    for (std::string_view k : *keys) {
      if (k.data() < text.data() || k.data() + k.size() > text.data() + text.size()) std::abort();
      if (!general[object].contains(std::string(k))) std::abort();
    }
    if (keys->size() < general[object].size()) std::abort();
    auto v = j->String(object, "value");
    if (v) {
      if (v->data() < text.data() || v->data() + v->size() > text.data() + text.size()) std::abort();
      const auto& g = general[object]["value"];
      if (!g.is_string()) std::abort();
      // Repeated "value" names: the parsers may keep different ones.
      size_t repeats = 0;
      for (std::string_view k : *keys) repeats += k == "value";
      if (repeats == 1 && g.get<std::string>() != *v) std::abort();
    }
  }
  return 0;
}
