// Fuzzes the audit record parser used by `custody audit verify`: any line
// must parse or be refused, never crash or read out of bounds; a line it
// accepts must be self-consistent (its hash is the hash of its content).
#include <openssl/evp.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "custody/audit/audit.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view line(reinterpret_cast<const char*>(data), size);
  auto r = custody::core::ParseAuditRecord(line);
  if (!r.ok()) return 0;
  if (r->seq == 0 || r->hash.size() != 64 || r->prev.size() != 64) std::abort();
  std::string body(line.substr(0, line.size() - 75));
  body += '}';
  unsigned char md[32];
  unsigned int n = 0;
  EVP_Digest(body.data(), body.size(), md, &n, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string h;
  for (unsigned char c : md) {
    h.push_back(hex[c >> 4]);
    h.push_back(hex[c & 15]);
  }
  if (h != r->hash) std::abort();
  return 0;
}
