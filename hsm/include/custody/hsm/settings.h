// [token] of custody.toml for backend = "pkcs11": which module, which token.
#pragma once

#include <string>

namespace custody::hsm {

struct TokenSettings {
  std::string module;  // the PKCS#11 module (.so) to load
  std::string uri;     // RFC 7512 token URI: "pkcs11:token=custody"

  bool operator==(const TokenSettings&) const = default;
};

}  // namespace custody::hsm
