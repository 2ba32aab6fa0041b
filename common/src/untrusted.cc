#include "custody/common/untrusted.h"

namespace custody {

size_t Utf8SequenceAt(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // bounds of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 1;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 2;
    if (c == 0xE0) lo = 0xA0;  // no overlong forms
    if (c == 0xED) hi = 0x9F;  // no surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 3;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;  // nothing past U+10FFFF
  } else {
    return 0;
  }
  if (s.size() - i - 1 < n) return 0;
  if (b(i + 1) < lo || b(i + 1) > hi) return 0;
  for (size_t k = 2; k <= n; ++k) {
    if (b(i + k) < 0x80 || b(i + k) > 0xBF) return 0;
  }
  return n + 1;
}

namespace {

// C0, DEL, and the C1 controls (U+0080..U+009F, as C2 80..C2 9F).
bool IsControl(std::string_view s, size_t i, size_t len) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (len == 1) return c < 0x20 || c == 0x7F;
  return len == 2 && c == 0xC2 && static_cast<unsigned char>(s[i + 1]) < 0xA0;
}

void AppendHexByte(std::string& out, unsigned char c) {
  static const char* kHex = "0123456789abcdef";
  out += "\\x";
  out += kHex[c >> 4];
  out += kHex[c & 0xf];
}

}  // namespace

bool PrintableText(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t len = Utf8SequenceAt(s, i);
    if (len == 0 || IsControl(s, i, len)) return false;
    i += len;
  }
  return true;
}

std::string EscapeUntrusted(std::string_view s, size_t max_bytes) {
  std::string out;
  const std::string_view kept = s.substr(0, max_bytes);
  out.reserve(kept.size() + 16);
  for (size_t i = 0; i < kept.size();) {
    const size_t len = Utf8SequenceAt(kept, i);
    if (len == 0 || IsControl(kept, i, len)) {
      // One byte at a time: a sequence cut by max_bytes, or a control
      // character's two bytes, are each shown as what they are.
      AppendHexByte(out, static_cast<unsigned char>(kept[i]));
      ++i;
      continue;
    }
    if (kept[i] == '\\') out += '\\';
    out.append(kept.substr(i, len));
    i += len;
  }
  if (s.size() > max_bytes) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string ValidUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t len = Utf8SequenceAt(s, i);
    if (len == 0) {
      AppendHexByte(out, static_cast<unsigned char>(s[i]));
      ++i;
      continue;
    }
    out.append(s.substr(i, len));
    i += len;
  }
  return out;
}

}  // namespace custody
