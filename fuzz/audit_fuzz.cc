// Fuzzes the audit record parser used by `custody audit verify`: any line
// must parse or be refused, never crash or read out of bounds; a line it
// accepts must be self-consistent (its hash is the hash of its content).
// The input's lines are also verified as one chain (where a chain that
// starts past seq 1 is accepted only on an audit.prune record's word), and
// searched for a prune statement, whose reading must round-trip.
#include <openssl/evp.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "custody/audit/audit.h"

namespace {

void FuzzChain(std::string_view input) {
  std::vector<custody::core::AuditChainLine> lines;
  for (size_t pos = 0; pos < input.size();) {
    size_t nl = input.find('\n', pos);
    if (nl == std::string_view::npos) nl = input.size();
    lines.push_back({"line " + std::to_string(lines.size() + 1), std::string(input.substr(pos, nl - pos))});
    pos = nl + 1;
  }
  auto rep = custody::core::VerifyAuditChain(lines, false, {}, "", std::nullopt);
  if (!rep.ok()) std::abort();  // errors only for a bad key, and none is given
  if (rep->intact && rep->first_seq > 1 && rep->pruned_by == 0) std::abort();
  if (auto st = custody::core::FindAuditPruneStatement(input)) {
    if (st->first == 0 || st->second.size() != 64) std::abort();
    if (input.find(custody::core::AuditPruneStatement(st->first, st->second)) == std::string_view::npos) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzChain(std::string_view(reinterpret_cast<const char*>(data), size));
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
