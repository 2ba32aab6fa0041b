// Fuzzes the client-certificate-to-principal mapping: a certificate whose
// SANs (DNS, URI, e-mail) and subject hold whatever bytes the fuzzer
// chooses goes through custodyd's PeerFromCertificate and the policy's
// Identify, and its identified_by into an audit record. Nothing may throw
// or crash; identified_by must be printable UTF-8; a SAN of one type must
// never identify a principal whose tls_san is of another type.
//
// Input: fields separated by 0x00: [type byte + SAN bytes]..., the last
// field is the subject CN.
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "custody/common/untrusted.h"
#include "custody/policy/engine.h"
#include "custody/policy/parse.h"
#include "custody/server/peer.h"

namespace {

constexpr const char* kPolicy = R"(version = 1
[principals."svc:dns"]
tls_san = "dns:web.prod.demo.internal"
[principals."svc:uri"]
tls_san = "uri:spiffe://demo/web"
[principals."svc:mail"]
tls_san = "email:ops@demo.internal"
[principals."svc:subject"]
tls_subject = "CN=web,O=demo"
)";

const custody::policy::Engine& Engine() {
  static const custody::policy::Engine* engine = [] {
    auto p = custody::policy::ParsePolicy(kPolicy, "peer_fuzz");
    if (!p.policy) std::abort();
    return new custody::policy::Engine(std::move(*p.policy));
  }();
  return *engine;
}

std::vector<std::string> Split(std::string_view in) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i <= in.size(); ++i) {
    if (i == in.size() || in[i] == '\0') {
      out.emplace_back(in.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto fields = Split(std::string_view(reinterpret_cast<const char*>(data), size));
  std::unique_ptr<X509, decltype(&X509_free)> cert(X509_new(), X509_free);
  const std::string cn = fields.back();
  fields.pop_back();
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(cn.data()),
                             static_cast<int>(cn.size()), -1, 0);
  GENERAL_NAMES* sans = sk_GENERAL_NAME_new_null();
  std::vector<int> types;
  for (const auto& f : fields) {
    if (f.empty()) continue;
    const int type = f[0] % 3 == 0 ? GEN_DNS : f[0] % 3 == 1 ? GEN_URI : GEN_EMAIL;
    ASN1_IA5STRING* s = ASN1_IA5STRING_new();
    ASN1_STRING_set(s, f.data() + 1, static_cast<int>(f.size() - 1));
    GENERAL_NAME* g = GENERAL_NAME_new();
    GENERAL_NAME_set0_value(g, type, s);
    sk_GENERAL_NAME_push(sans, g);
    types.push_back(type);
  }
  if (!types.empty()) X509_add1_ext_i2d(cert.get(), NID_subject_alt_name, sans, 0, X509V3_ADD_DEFAULT);
  GENERAL_NAMES_free(sans);

  custody::core::RequestContext rc = custody::server::PeerFromCertificate(cert.get());
  if (!custody::PrintableText(rc.identified_by)) std::abort();
  if (rc.caller.tls_sans.size() != types.size()) std::abort();
  for (size_t i = 0; i < types.size(); ++i) {
    const char* prefix = types[i] == GEN_DNS ? "dns:" : types[i] == GEN_URI ? "uri:" : "email:";
    if (rc.caller.tls_sans[i].rfind(prefix, 0) != 0) std::abort();
  }
  std::string why;
  auto who = Engine().Identify(rc.caller, &why);
  if (who) {
    // Identified by a SAN only through a SAN of the principal's own type.
    const std::string& principal = Engine().PrincipalName(*who);
    bool has_dns = false, has_uri = false, has_mail = false;
    for (int t : types) {
      has_dns = has_dns || t == GEN_DNS;
      has_uri = has_uri || t == GEN_URI;
      has_mail = has_mail || t == GEN_EMAIL;
    }
    if (principal == "svc:dns" && !has_dns) std::abort();
    if (principal == "svc:uri" && !has_uri) std::abort();
    if (principal == "svc:mail" && !has_mail) std::abort();
  }
  return 0;
}
