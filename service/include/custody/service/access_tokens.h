// AccessTokens: the bearer tokens of the Vault-compatible API (X-Vault-Token;
// docs/VAULT_COMPAT.md). custody issues them itself, to one principal each,
// with an expiry: `custody token issue`, or a cert login over mutual TLS.
//
//   auto key = core::AccessTokens::LoadKey(path, /*create=*/true);
//   core::AccessTokens tokens(store, std::move(*key));
//   auto issued = tokens.Issue("svc:web", 3600, 86400, "cert login dns:web", now);
//   auto who = tokens.Check(token_text, now);   // the record, or kDenied
//
// A token is 192 random bits ("cst." and 32 base64url characters). The
// store keeps only HMAC-SHA-256(key, token) in hex: a copy of the store
// names no usable token, and someone who can write to the database cannot
// add a token of their own without the key, which is a file on the nodes
// (0600, never in the store). Every node that shares a store must have the
// same key file.
//
// Thread-safe. Checks are cached for one second per token, so a revocation
// reaches every node within a second.
#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "custody/common/result.h"
#include "custody/common/secret.h"
#include "custody/store/store.h"

struct evp_mac_ctx_st;  // OpenSSL's EVP_MAC_CTX

namespace custody::core {

class AccessTokens {
 public:
  // 32 bytes of key. kConfig naming the file if it is unreadable, not 32
  // bytes, or readable by group or others. `create`: make it (from the OS
  // RNG, O_EXCL, 0600) when it does not exist yet.
  static Result<SecretBuffer> LoadKey(const std::string& path, bool create);
  // Whether `text` has a custody token's form (checked before anything is
  // looked up, so a header of any other shape is refused without a query).
  static bool LooksLikeToken(std::string_view text);

  AccessTokens(Store& store, SecretBuffer key);
  ~AccessTokens();
  AccessTokens(const AccessTokens&) = delete;
  AccessTokens& operator=(const AccessTokens&) = delete;

  struct Issued {
    SecretBuffer token;  // shown once, to its holder
    AccessTokenRecord record;
  };
  // `ttl` seconds now, renewable up to `max_ttl` seconds after issue.
  Result<Issued> Issue(const std::string& principal, int64_t ttl, int64_t max_ttl, const std::string& issued_by,
                       int64_t now);
  // The token's record, or kDenied saying why (unknown, expired, revoked):
  // never quoting the token.
  Result<AccessTokenRecord> Check(std::string_view token, int64_t now);
  // Extends the token by its ttl (or `increment` seconds, if shorter), never
  // past its max; returns the record after.
  Result<AccessTokenRecord> Renew(std::string_view token, int64_t increment, int64_t now);
  Result<size_t> Revoke(const std::string& accessor, const std::string& principal, int64_t now);

 private:
  // Hex of HMAC-SHA-256(key, token); nullopt if OpenSSL fails.
  std::optional<std::string> Hash(std::string_view token) const;
  Store& store_;
  const SecretBuffer key_;
  // HMAC-SHA-256 keyed once; each hash works on a copy (OpenSSL 3 looks an
  // algorithm up on every one-shot HMAC(), which cost more than the hash).
  evp_mac_ctx_st* mac_ = nullptr;
  std::mutex mu_;
  struct Cached {
    std::optional<AccessTokenRecord> record;  // nullopt: unknown
    std::chrono::steady_clock::time_point read;
  };
  std::map<std::string, Cached, std::less<>> cache_;  // by hash
};

}  // namespace custody::core
