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

// The audit key of the token that wrote the seed corpus/audit/pruned_chain.jsonl
// (a throwaway SoftHSM2 token): with it the seed verifies, signed prune
// statement and checkpoints included, and mutations reach the signature
// checks rather than stopping at the first hash.
constexpr const char* kSeedKey =
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEbQuB3VLDSkmN2qStLIuIQ9J2hCM1\n"
    "pnCo7zpmU0G1RyTRLz2qMlPYB/8oT8CN9ssKzuXCT6xvtziBZCWxqUShtg==\n"
    "-----END PUBLIC KEY-----\n";

void FuzzChain(std::string_view input) {
  std::vector<custody::core::AuditChainLine> lines;
  for (size_t pos = 0; pos < input.size();) {
    size_t nl = input.find('\n', pos);
    if (nl == std::string_view::npos) nl = input.size();
    lines.push_back({"line " + std::to_string(lines.size() + 1), std::string(input.substr(pos, nl - pos))});
    pos = nl + 1;
  }
  for (const char* key : {"", kSeedKey}) {
    custody::core::AuditVerifyOptions o;
    o.public_key_pem = key;
    auto rep = custody::core::VerifyAuditChain(lines, false, o, "", std::nullopt);
    if (!rep.ok()) std::abort();  // errors only for a key that is not PEM
    // A start past seq 1 is taken only on a signed statement, so never
    // without the key.
    if (rep->intact && rep->first_seq > 1 && (rep->pruned_by == 0 || *key == '\0')) std::abort();
  }
  if (auto st = custody::core::FindAuditPruneStatement(input)) {
    if (st->first_kept_seq == 0 || st->prev_hash.size() != 64 || st->signature_b64.empty()) std::abort();
    const std::string said = "the log now starts at seq " + std::to_string(st->first_kept_seq) + " after hash " +
                             st->prev_hash + "; signature " + st->signature_b64;
    if (input.find(said) == std::string_view::npos) std::abort();
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
