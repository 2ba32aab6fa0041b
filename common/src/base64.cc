#include "custody/common/base64.h"

#include <openssl/evp.h>

namespace custody {
namespace {

// Decodes into `out` (at least 3/4 of the input), returning the length, or -1.
long Decode(std::string_view in, uint8_t* out) {
  if (in.empty() || in.size() % 4 != 0) return -1;
  // Padding only at the end, at most two characters.
  size_t first_pad = in.find('=');
  if (first_pad != std::string_view::npos &&
      (in.size() - first_pad > 2 || in.find_first_not_of('=', first_pad) != std::string_view::npos)) {
    return -1;
  }
  int n = EVP_DecodeBlock(out, reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()));
  if (n < 0) return -1;
  // EVP_DecodeBlock counts the padding as zero bytes.
  size_t pad = (in.back() == '=') + (in.size() > 1 && in[in.size() - 2] == '=');
  return static_cast<long>(n) - static_cast<long>(pad);
}

}  // namespace

std::string Base64Encode(std::span<const uint8_t> bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), bytes.data(), static_cast<int>(bytes.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

std::optional<std::vector<uint8_t>> Base64Decode(std::string_view text) {
  std::vector<uint8_t> out(text.size() / 4 * 3 + 3);
  long n = Decode(text, out.data());
  if (n < 0) return std::nullopt;
  out.resize(static_cast<size_t>(n));
  return out;
}

std::optional<SecretBuffer> Base64DecodeSecret(std::string_view text) {
  SecretBuffer out(text.size() / 4 * 3 + 3);
  long n = Decode(text, out.RevealMutable(SecretAccess{}).data());
  if (n < 0) return std::nullopt;
  out.Truncate(static_cast<size_t>(n));
  return out;
}

}  // namespace custody
