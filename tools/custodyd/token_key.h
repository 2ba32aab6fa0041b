// The server's TLS private key, kept in the token and used by OpenSSL through
// libp11, so it never leaves the token.
//
//   auto key = LoadTokenKey(config, "pkcs11:token=custody;object=tls-server", pin);
//   SSL_CTX_use_PrivateKey(ctx, *key);
#pragma once

#include <openssl/evp.h>

#include <string>

#include "custody/app/config.h"
#include "custody/common/result.h"
#include "custody/common/secret.h"

namespace custody::server {

// The private key named by a pkcs11: URI (token= and object= or id=) in the
// configured module. libp11 shares the module with custody's own sessions:
// custody initialised it first, so libp11 finds it initialised and its
// context is never unloaded (unloading would C_Finalize under custody).
Result<EVP_PKEY*> LoadTokenKey(const core::Config& config, const std::string& uri, const SecretBuffer& pin);

}  // namespace custody::server
