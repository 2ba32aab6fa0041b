#include "custody/common/inplace_json.h"
#include "custody/common/untrusted.h"

#include <rapidjson/document.h>
#include <rapidjson/error/en.h>

#include <algorithm>
#include <vector>

namespace custody {

struct InPlaceJson::Doc {
  rapidjson::Document d;
};

InPlaceJson::InPlaceJson(std::unique_ptr<Doc> doc) : doc_(std::move(doc)) {}
InPlaceJson::InPlaceJson(InPlaceJson&&) noexcept = default;
InPlaceJson& InPlaceJson::operator=(InPlaceJson&&) noexcept = default;
InPlaceJson::~InPlaceJson() = default;

// RapidJSON 1.1.0's own check (kParseValidateEncodingFlag) reads up to three
// bytes past the end of the text after a truncated sequence, so the text is
// checked with this instead.
bool WellFormedUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t len = Utf8SequenceAt(s, i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

bool SendableAsJsonText(std::string_view s) {
  for (unsigned char c : s) {
    if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') return false;
  }
  return WellFormedUtf8(s);
}

void AppendJsonEscaped(std::string& out, std::string_view s) {
  static const char* kHex = "0123456789abcdef";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      out += "\\u00";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    } else {
      out += static_cast<char>(c);
    }
  }
}

namespace {

// RapidJSON 1.1.0 turns a lone surrogate escape ("\\udc00") into bytes that
// are not UTF-8, where JSON (RFC 8259, 8.2) leaves the result undefined and
// other parsers refuse. Every decoded name and string is checked again.
bool StringsWellFormed(const rapidjson::Value& v, int depth = 0) {
  if (depth > 64) return false;  // no body custody reads nests this deep
  if (v.IsString()) return WellFormedUtf8(std::string_view(v.GetString(), v.GetStringLength()));
  if (v.IsArray()) {
    for (const auto& e : v.GetArray()) {
      if (!StringsWellFormed(e, depth + 1)) return false;
    }
  }
  if (v.IsObject()) {
    for (const auto& m : v.GetObject()) {
      if (!StringsWellFormed(m.name, depth + 1) || !StringsWellFormed(m.value, depth + 1)) return false;
    }
  }
  return true;
}

}  // namespace

Result<InPlaceJson> InPlaceJson::Parse(std::string& text) {
  // In-situ parsing stops at the first NUL (std::string keeps one past the
  // end): one inside would silently cut the text short.
  if (text.find('\0') != std::string::npos) return Error(Category::kUsage, "not JSON: a NUL byte inside");
  if (!WellFormedUtf8(text)) return Error(Category::kUsage, "not JSON: the text is not UTF-8");
  auto doc = std::make_unique<Doc>();
  // Iterative: a body of nested brackets must not run the thread's stack out.
  // A leading byte order mark is passed over, as general parsers do.
  const size_t bom = text.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;
  doc->d.ParseInsitu<rapidjson::kParseIterativeFlag>(text.data() + bom);
  if (doc->d.HasParseError()) {
    return Error(Category::kUsage, std::string("not JSON: ") + rapidjson::GetParseError_En(doc->d.GetParseError()) +
                                       " at byte " + std::to_string(doc->d.GetErrorOffset()));
  }
  if (!doc->d.IsObject()) return Error(Category::kUsage, "not a JSON object");
  if (!StringsWellFormed(doc->d)) return Error(Category::kUsage, "not JSON: an escape that is not a character, or nesting past 64");
  // A name given twice is refused, not resolved: parsers disagree on which
  // one wins, and a proxy that read the other one would have checked a
  // different value than the one stored.
  // (Sorted, not compared pairwise: a body may have many members.)
  std::vector<std::string_view> names;
  names.reserve(doc->d.MemberCount());
  for (auto m = doc->d.MemberBegin(); m != doc->d.MemberEnd(); ++m) {
    names.emplace_back(m->name.GetString(), m->name.GetStringLength());
  }
  std::sort(names.begin(), names.end());
  if (std::adjacent_find(names.begin(), names.end()) != names.end()) {
    return Error(Category::kUsage, "a member name appears twice");
  }
  return InPlaceJson(std::move(doc));
}

namespace {

const rapidjson::Value* Member(const rapidjson::Value& d, std::string_view key) {
  rapidjson::Value k(rapidjson::StringRef(key.data(), static_cast<rapidjson::SizeType>(key.size())));
  auto it = d.FindMember(k);
  return it == d.MemberEnd() ? nullptr : &it->value;
}

}  // namespace

std::optional<std::string_view> InPlaceJson::String(std::string_view key) const {
  const rapidjson::Value* v = Member(doc_->d, key);
  if (v == nullptr || !v->IsString()) return std::nullopt;
  return std::string_view(v->GetString(), v->GetStringLength());
}

std::optional<uint64_t> InPlaceJson::Uint(std::string_view key) const {
  const rapidjson::Value* v = Member(doc_->d, key);
  if (v == nullptr || !v->IsUint64()) return std::nullopt;
  return v->GetUint64();
}

bool InPlaceJson::Has(std::string_view key) const { return Member(doc_->d, key) != nullptr; }

std::optional<std::vector<std::string_view>> InPlaceJson::ObjectKeys(std::string_view object) const {
  const rapidjson::Value* o = Member(doc_->d, object);
  if (o == nullptr || !o->IsObject()) return std::nullopt;
  std::vector<std::string_view> names;
  for (auto m = o->MemberBegin(); m != o->MemberEnd(); ++m) {
    names.emplace_back(m->name.GetString(), m->name.GetStringLength());
  }
  return names;
}

std::optional<uint64_t> InPlaceJson::Uint(std::string_view object, std::string_view key) const {
  const rapidjson::Value* o = Member(doc_->d, object);
  if (o == nullptr || !o->IsObject()) return std::nullopt;
  const rapidjson::Value* v = Member(*o, key);
  if (v == nullptr || !v->IsUint64()) return std::nullopt;
  return v->GetUint64();
}

std::optional<std::string_view> InPlaceJson::String(std::string_view object, std::string_view key) const {
  const rapidjson::Value* o = Member(doc_->d, object);
  if (o == nullptr || !o->IsObject()) return std::nullopt;
  const rapidjson::Value* v = Member(*o, key);
  if (v == nullptr || !v->IsString()) return std::nullopt;
  return std::string_view(v->GetString(), v->GetStringLength());
}

}  // namespace custody
