// Base64 (RFC 4648, with padding) through OpenSSL's EVP_EncodeBlock. Used for
// checkpoint signatures in the audit log and for binary values in the API.
//
//   std::string text = Base64Encode(bytes);
//   auto value = Base64DecodeSecret(text);   // into locked memory
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "custody/common/secret.h"

namespace custody {

std::string Base64Encode(std::span<const uint8_t> bytes);
inline std::string Base64Encode(std::string_view bytes) {
  return Base64Encode(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
}
// nullopt when `text` is not padded base64.
std::optional<std::vector<uint8_t>> Base64Decode(std::string_view text);
// The same, decoded straight into a SecretBuffer (for values).
std::optional<SecretBuffer> Base64DecodeSecret(std::string_view text);

}  // namespace custody
