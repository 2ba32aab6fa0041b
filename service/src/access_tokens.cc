#include "custody/service/access_tokens.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "custody/common/hex.h"

namespace custody::core {
namespace {

constexpr size_t kKeyBytes = 32;
constexpr size_t kTokenBytes = 24;  // 192 bits
constexpr std::string_view kPrefix = "cst.";
constexpr auto kCacheFor = std::chrono::seconds(1);
constexpr size_t kCacheMax = 10000;

}  // namespace

Result<SecretBuffer> AccessTokens::LoadKey(const std::string& path, bool create) {
  if (create && ::access(path.c_str(), F_OK) != 0 && errno == ENOENT) {
    // Written whole under a temporary name, then linked into place: a
    // reader never sees half a key, a crash leaves none, and a key another
    // process linked first wins (link() never replaces one).
    const std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
    std::string tmp = path + ".XXXXXX";
    int fd = ::mkstemp(tmp.data());
    if (fd < 0) return Error::Os(errno, "cannot create the access-token key " + path, Category::kConfig);
    auto fail = [&](int err, const std::string& what) {
      ::close(fd);
      ::unlink(tmp.c_str());
      return Error::Os(err, what + " " + path, Category::kConfig);
    };
    // Made by root (an admin's `custody token issue`): handed to whoever
    // owns the folder, the account custodyd runs as, or custodyd could not
    // read it.
    struct stat st {};
    if (::geteuid() == 0 && ::stat(dir.c_str(), &st) == 0 && st.st_uid != 0 && ::fchown(fd, st.st_uid, st.st_gid) != 0) {
      return fail(errno, "cannot give the state folder's owner the access-token key");
    }
    SecretBuffer key(kKeyBytes);
    auto bytes = key.RevealMutable(SecretAccess{});
    if (RAND_priv_bytes(bytes.data(), static_cast<int>(bytes.size())) != 1) return fail(EIO, "no random bytes for");
    if (::fchmod(fd, 0600) != 0 || ::write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size()) ||
        ::fsync(fd) != 0) {
      return fail(errno, "cannot write the access-token key");
    }
    ::close(fd);
    const int linked = ::link(tmp.c_str(), path.c_str());
    const int err = errno;
    ::unlink(tmp.c_str());
    if (linked == 0) {
      if (int d = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); d >= 0) {
        (void)::fsync(d);
        ::close(d);
      }
      return key;
    }
    if (err != EEXIST) return Error::Os(err, "cannot create the access-token key " + path, Category::kConfig);
  }
  auto key = SecretBuffer::ReadFile(path, kKeyBytes + 1, /*require_private=*/true);
  if (!key) {
    return Error(key.error().category() == Category::kNotFound ? Category::kNotFound : Category::kConfig,
                 "access-token key " + path + ": " + key.error().message());
  }
  if (key->size() != kKeyBytes) {
    return Error(Category::kConfig, "access-token key " + path + " is not 32 bytes; it is made by custodyd or "
                                    "'custody token issue' (head -c 32 /dev/urandom would do too)");
  }
  return std::move(*key);
}

bool AccessTokens::LooksLikeToken(std::string_view text) {
  if (text.size() != kPrefix.size() + 32 || text.substr(0, kPrefix.size()) != kPrefix) return false;
  return text.substr(kPrefix.size()).find_first_not_of(
             "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") == std::string_view::npos;
}

AccessTokens::AccessTokens(Store& store, SecretBuffer key) : store_(store), key_(std::move(key)) {
  EVP_MAC* hmac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  if (hmac != nullptr) {
    mac_ = EVP_MAC_CTX_new(hmac);
    EVP_MAC_free(hmac);
  }
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0), OSSL_PARAM_construct_end()};
  auto k = key_.Reveal(SecretAccess{});
  if (mac_ != nullptr && EVP_MAC_init(mac_, k.data(), k.size(), params) != 1) {
    EVP_MAC_CTX_free(mac_);
    mac_ = nullptr;
  }
}

AccessTokens::~AccessTokens() { EVP_MAC_CTX_free(mac_); }

std::optional<std::string> AccessTokens::Hash(std::string_view token) const {
  unsigned char mac[EVP_MAX_MD_SIZE];
  size_t len = 0;
  EVP_MAC_CTX* ctx = mac_ != nullptr ? EVP_MAC_CTX_dup(mac_) : nullptr;
  const bool ok = ctx != nullptr &&
                  EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(token.data()), token.size()) == 1 &&
                  EVP_MAC_final(ctx, mac, &len, sizeof mac) == 1;
  EVP_MAC_CTX_free(ctx);
  if (!ok) return std::nullopt;
  return ToHex(std::span<const uint8_t>(mac, len));
}

Result<AccessTokens::Issued> AccessTokens::Issue(const std::string& principal, int64_t ttl, int64_t max_ttl,
                                                 const std::string& issued_by, int64_t now) {
  if (ttl <= 0 || max_ttl < ttl) return Error(Category::kUsage, "a token's ttl must be positive and at most its max ttl");
  uint8_t raw[kTokenBytes], acc[8];
  if (RAND_priv_bytes(raw, sizeof raw) != 1 || RAND_bytes(acc, sizeof acc) != 1) {
    return Error(Category::kUnavailable, "the random number generator failed");
  }
  // Built in locked memory: "cst." and the 24 bytes as 32 base64url
  // characters (no padding: 24 is a multiple of 3).
  Issued out{SecretBuffer(kPrefix.size() + 32), {}};
  auto text = out.token.RevealMutable(SecretAccess{});
  std::memcpy(text.data(), kPrefix.data(), kPrefix.size());
  unsigned char encoded[33];
  EVP_EncodeBlock(encoded, raw, sizeof raw);
  OPENSSL_cleanse(raw, sizeof raw);
  for (size_t i = 0; i < 32; ++i) {
    const unsigned char c = encoded[i];
    text[kPrefix.size() + i] = c == '+' ? '-' : c == '/' ? '_' : c;
  }
  OPENSSL_cleanse(encoded, sizeof encoded);
  const std::optional<std::string> hash = Hash(out.token.RevealString(SecretAccess{}));
  if (!hash) return Error(Category::kUnavailable, "OpenSSL could not compute HMAC-SHA-256");
  out.record = AccessTokenRecord{ToHex(acc), principal, issued_by, now, ttl, now + ttl, now + max_ttl, std::nullopt};
  CUSTODY_RETURN_IF_ERROR(store_.AddAccessToken(*hash, out.record, now));
  return out;
}

Result<AccessTokenRecord> AccessTokens::Check(std::string_view token, int64_t now) {
  if (!LooksLikeToken(token)) return Error(Category::kDenied, "the access token is not a custody token");
  const std::optional<std::string> hashed = Hash(token);
  if (!hashed) return Error(Category::kUnavailable, "OpenSSL could not compute HMAC-SHA-256");
  const std::string& hash = *hashed;
  const auto t = std::chrono::steady_clock::now();
  std::optional<AccessTokenRecord> record;
  bool cached = false;
  {
    std::lock_guard lock(mu_);
    if (auto it = cache_.find(hash); it != cache_.end() && t - it->second.read < kCacheFor) {
      record = it->second.record;
      cached = true;
    }
  }
  if (!cached) {
    auto found = store_.FindAccessToken(hash);
    if (!found && found.error().category() != Category::kNotFound) return std::move(found).error();
    // Unknown tokens are remembered too: one guessing client costs the
    // store one query per token a second, not one per request.
    if (found) record = std::move(*found);
    std::lock_guard lock(mu_);
    if (cache_.size() >= kCacheMax) cache_.clear();
    cache_[hash] = Cached{record, t};
  }
  if (!record) return Error(Category::kDenied, "the access token is unknown (never issued here, or forgotten)");
  if (record->revoked_at) {
    return Error(Category::kDenied, "the access token " + record->accessor + " was revoked");
  }
  if (record->expires_at <= now) {
    return Error(Category::kDenied, "the access token " + record->accessor + " has expired");
  }
  return *record;
}

Result<AccessTokenRecord> AccessTokens::Renew(std::string_view token, int64_t increment, int64_t now) {
  CUSTODY_ASSIGN_OR_RETURN(AccessTokenRecord r, Check(token, now));
  const int64_t by = increment > 0 ? std::min(increment, r.ttl) : r.ttl;
  r.expires_at = std::min(r.max_expires_at, now + by);
  const std::optional<std::string> hash = Hash(token);
  if (!hash) return Error(Category::kUnavailable, "OpenSSL could not compute HMAC-SHA-256");
  // The store decides, not this node's cache: a token revoked elsewhere a
  // moment ago is not renewed (the UPDATE skips revoked rows).
  Status set = store_.SetAccessTokenExpiry(*hash, r.expires_at);
  {
    std::lock_guard lock(mu_);
    cache_.erase(*hash);
  }
  if (!set.ok() && set.error().category() == Category::kNotFound) {
    return Error(Category::kDenied, "the access token " + r.accessor + " was revoked");
  }
  CUSTODY_RETURN_IF_ERROR(set);
  return r;
}

Result<size_t> AccessTokens::Revoke(const std::string& accessor, const std::string& principal, int64_t now) {
  CUSTODY_ASSIGN_OR_RETURN(size_t n, store_.RevokeAccessTokens(accessor, principal, now));
  std::lock_guard lock(mu_);
  cache_.clear();
  return n;
}

}  // namespace custody::core
