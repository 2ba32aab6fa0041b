#include "custody/server/peer.h"

#include <grp.h>
#include <openssl/bio.h>
#include <openssl/x509v3.h>
#include <pwd.h>

#include <chrono>
#include <map>
#include <mutex>

#include "custody/common/untrusted.h"

namespace custody::server {
namespace {

// User name and groups per uid, from NSS, cached for a minute: looking them
// up reads /etc/passwd and /etc/group, too slow for every connection.
struct Account {
  std::optional<std::string> user;
  std::vector<uint32_t> gids;
  std::chrono::steady_clock::time_point expires;
};

Account LookUp(uint32_t uid, uint32_t gid) {
  static std::mutex mu;
  static std::map<uint32_t, Account> cache;
  auto now = std::chrono::steady_clock::now();
  {
    std::lock_guard lock(mu);
    auto it = cache.find(uid);
    if (it != cache.end() && it->second.expires > now) return it->second;
  }
  Account a;
  a.expires = now + std::chrono::seconds(60);
  struct passwd pw {};
  struct passwd* found = nullptr;
  char buf[4096];
  if (::getpwuid_r(uid, &pw, buf, sizeof buf, &found) == 0 && found != nullptr) {
    a.user = found->pw_name;
    gid_t groups[64];
    int n = 64;
    if (::getgrouplist(found->pw_name, found->pw_gid, groups, &n) >= 0) {
      for (int i = 0; i < n; ++i) {
        if (static_cast<uint32_t>(groups[i]) != gid) a.gids.push_back(groups[i]);
      }
    }
  }
  std::lock_guard lock(mu);
  if (cache.size() > 4096) cache.clear();
  cache[uid] = a;
  return a;
}

}  // namespace

core::RequestContext PeerFromAccount(uint32_t uid, uint32_t pid, std::optional<std::string> user,
                                     std::vector<uint32_t> gids) {
  core::RequestContext rc;
  rc.caller.uid = uid;
  rc.caller.gids = std::move(gids);
  rc.caller.user = std::move(user);
  // A user name is whatever the account database holds: shown escaped.
  rc.identified_by = "uid " + std::to_string(uid) +
                     (rc.caller.user ? " (" + EscapeUntrusted(*rc.caller.user, 64) + ")" : "") + " pid " +
                     std::to_string(pid) + " via unix socket";
  return rc;
}

core::RequestContext PeerFromCredentials(uint32_t uid, uint32_t gid, uint32_t pid) {
  Account a = LookUp(uid, gid);
  std::vector<uint32_t> gids{gid};
  gids.insert(gids.end(), a.gids.begin(), a.gids.end());
  return PeerFromAccount(uid, pid, a.user, std::move(gids));
}

core::RequestContext PeerFromCertificate(X509* cert) {
  core::RequestContext rc;
  auto* names = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  for (int i = 0; names != nullptr && i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
    // The type goes with the name: an e-mail SAN must never pass for the
    // DNS name of the same spelling (docs/POLICY.md).
    const char* type = n->type == GEN_DNS ? "dns:" : n->type == GEN_URI ? "uri:" : n->type == GEN_EMAIL ? "email:" : nullptr;
    if (type == nullptr) continue;
    const ASN1_STRING* str = n->d.ia5;
    rc.caller.tls_sans.push_back(type + std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(str)),
                                                    static_cast<size_t>(ASN1_STRING_length(str))));
  }
  GENERAL_NAMES_free(names);
  if (BIO* bio = BIO_new(BIO_s_mem())) {
    if (X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
      char* data = nullptr;
      long len = BIO_get_mem_data(bio, &data);
      if (data != nullptr && len > 0) rc.caller.tls_subject = std::string(data, static_cast<size_t>(len));
    }
    BIO_free(bio);
  }
  // Shown escaped and cut: a certificate may carry any bytes, of any length.
  rc.identified_by = "tls client certificate " +
                     (rc.caller.tls_sans.empty() ? std::string() : "san " + EscapeUntrusted(rc.caller.tls_sans.front(), 128) + ", ") +
                     "subject " + EscapeUntrusted(rc.caller.tls_subject.value_or(""), 256);
  return rc;
}

}  // namespace custody::server
