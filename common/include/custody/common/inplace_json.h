// A small JSON object parsed where it lies, for bodies that carry a secret.
//
// A general JSON parser copies every string it reads into buffers of its own
// (nlohmann's lexer keeps two) and frees them unwiped, so a value sent in a
// body would stay in the heap after the body itself was wiped. Here the text
// is parsed in place (RapidJSON's in-situ mode): escapes are undone inside
// `text`, and each string read is a view into it. The caller copies what it
// needs (a secret into a SecretBuffer) and wipes `text`: then no copy is left.
//
//   auto body = InPlaceJson::Parse(request_body);      // request_body is modified
//   if (auto v = body->String("value")) value = SecretBuffer::Copy(*v);
//   OPENSSL_cleanse(request_body.data(), request_body.size());
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "custody/common/result.h"

namespace custody {

// Well-formed UTF-8 (Unicode table 3-7): no overlong forms, surrogates or
// code points past U+10FFFF. JSON text must be this; so must a value sent in
// a JSON string rather than as base64.
bool WellFormedUtf8(std::string_view s);

// Whether a value may travel as a JSON string: well-formed UTF-8 with no
// control character other than tab, newline and return. Anything else
// travels as base64 ("value_base64"). Client and server use the same rule.
bool SendableAsJsonText(std::string_view s);

// Appends `s` as the inside of a JSON string, escaping what JSON requires.
// Reserve 6 bytes per byte of `s` first: a body that never reallocates
// frees no copy of the value unwiped.
void AppendJsonEscaped(std::string& out, std::string_view s);

class InPlaceJson {
 public:
  // Parses `text`, which must hold one JSON object and nothing else, and
  // modifies it. Views returned later point into `text`: it must outlive
  // this object and not change. kUsage if it is not a JSON object (a NUL
  // byte inside counts as malformed).
  static Result<InPlaceJson> Parse(std::string& text);

  InPlaceJson(InPlaceJson&&) noexcept;
  InPlaceJson& operator=(InPlaceJson&&) noexcept;
  ~InPlaceJson();

  // A top-level string member, or nullopt if absent or not a string.
  std::optional<std::string_view> String(std::string_view key) const;
  // A top-level non-negative integer member, or nullopt.
  std::optional<uint64_t> Uint(std::string_view key) const;
  bool Has(std::string_view key) const;
  // The member names of a top-level object member (repeats included, in
  // order), or nullopt if it is absent or not an object.
  std::optional<std::vector<std::string_view>> ObjectKeys(std::string_view object) const;
  // A string member of a top-level object member: {"data": {"value": "..."}}.
  std::optional<std::string_view> String(std::string_view object, std::string_view key) const;
  // A non-negative integer member of a top-level object member: {"options": {"cas": 3}}.
  std::optional<uint64_t> Uint(std::string_view object, std::string_view key) const;

 private:
  struct Doc;
  explicit InPlaceJson(std::unique_ptr<Doc> doc);
  std::unique_ptr<Doc> doc_;
};

}  // namespace custody
