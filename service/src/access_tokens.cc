#include "custody/service/access_tokens.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "custody/common/base64.h"
#include "custody/common/hex.h"

namespace custody::core {
namespace {

constexpr size_t kKeyBytes = 32;
constexpr size_t kTokenBytes = 24;  // 192 bits
constexpr std::string_view kPrefix = "cst.";
constexpr auto kCacheFor = std::chrono::seconds(1);
constexpr size_t kCacheMax = 10000;

std::string Base64Url(std::span<const uint8_t> bytes) {
  std::string s = Base64Encode(bytes);
  for (char& c : s) {
    if (c == '+') c = '-';
    if (c == '/') c = '_';
  }
  while (!s.empty() && s.back() == '=') s.pop_back();
  return s;
}

}  // namespace

Result<SecretBuffer> AccessTokens::LoadKey(const std::string& path, bool create) {
  if (create) {
    // O_EXCL: a key another process made first is read, never overwritten.
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd >= 0) {
      // Made by root (an admin's `custody token issue`): handed to whoever
      // owns the folder, the account custodyd runs as, or custodyd could
      // not read it.
      const std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/') + 1);
      struct stat st {};
      if (::geteuid() == 0 && ::stat(dir.c_str(), &st) == 0 && st.st_uid != 0) {
        if (::fchown(fd, st.st_uid, st.st_gid) != 0) {
          const int saved = errno;
          ::close(fd);
          ::unlink(path.c_str());
          return Error::Os(saved, "cannot give the access-token key " + path + " to the state folder's owner",
                           Category::kConfig);
        }
      }
      SecretBuffer key(kKeyBytes);
      auto bytes = key.RevealMutable(SecretAccess{});
      bool ok = RAND_priv_bytes(bytes.data(), static_cast<int>(bytes.size())) == 1;
      ok = ok && ::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()) && ::fsync(fd) == 0;
      const int saved = errno;
      ::close(fd);
      if (!ok) {
        ::unlink(path.c_str());
        return Error::Os(saved, "cannot write the access-token key " + path, Category::kConfig);
      }
      return key;
    }
    if (errno != EEXIST) return Error::Os(errno, "cannot create the access-token key " + path, Category::kConfig);
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

std::string AccessTokens::Hash(std::string_view token) const {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  auto key = key_.Reveal(SecretAccess{});
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(token.data()),
       token.size(), mac, &len);
  return ToHex(std::span<const uint8_t>(mac, len));
}

Result<AccessTokens::Issued> AccessTokens::Issue(const std::string& principal, int64_t ttl, int64_t max_ttl,
                                                 const std::string& issued_by, int64_t now) {
  if (ttl <= 0 || max_ttl < ttl) return Error(Category::kUsage, "a token's ttl must be positive and at most its max ttl");
  uint8_t raw[kTokenBytes], acc[8];
  if (RAND_priv_bytes(raw, sizeof raw) != 1 || RAND_bytes(acc, sizeof acc) != 1) {
    return Error(Category::kUnavailable, "the random number generator failed");
  }
  std::string text = std::string(kPrefix) + Base64Url(raw);
  OPENSSL_cleanse(raw, sizeof raw);
  Issued out{SecretBuffer::Copy(text), {}};
  const std::string hash = Hash(text);
  OPENSSL_cleanse(text.data(), text.size());
  out.record = AccessTokenRecord{ToHex(acc), principal, issued_by, now, ttl, now + ttl, now + max_ttl, std::nullopt};
  CUSTODY_RETURN_IF_ERROR(store_.AddAccessToken(hash, out.record, now));
  return out;
}

Result<AccessTokenRecord> AccessTokens::Check(std::string_view token, int64_t now) {
  if (!LooksLikeToken(token)) return Error(Category::kDenied, "the access token is not a custody token");
  const std::string hash = Hash(token);
  const auto t = std::chrono::steady_clock::now();
  std::optional<AccessTokenRecord> record;
  {
    std::lock_guard lock(mu_);
    if (auto it = cache_.find(hash); it != cache_.end() && t - it->second.read < kCacheFor) record = it->second.record;
  }
  if (!record) {
    auto found = store_.FindAccessToken(hash);
    if (!found) {
      if (found.error().category() == Category::kNotFound) {
        return Error(Category::kDenied, "the access token is unknown (never issued here, or forgotten)");
      }
      return std::move(found).error();
    }
    record = std::move(*found);
    std::lock_guard lock(mu_);
    if (cache_.size() >= kCacheMax) cache_.clear();
    cache_[hash] = Cached{*record, t};
  }
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
  const std::string hash = Hash(token);
  CUSTODY_RETURN_IF_ERROR(store_.SetAccessTokenExpiry(hash, r.expires_at));
  std::lock_guard lock(mu_);
  cache_.erase(hash);
  return r;
}

Result<size_t> AccessTokens::Revoke(const std::string& accessor, const std::string& principal, int64_t now) {
  CUSTODY_ASSIGN_OR_RETURN(size_t n, store_.RevokeAccessTokens(accessor, principal, now));
  std::lock_guard lock(mu_);
  cache_.clear();
  return n;
}

}  // namespace custody::core
