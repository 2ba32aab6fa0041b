// Fuzzes the node list of CUSTODY_ADDR (client/src/addresses.h). Whatever
// the bytes: no crash; a refusal is a config error whose message is one
// printable line; an accepted list has 1 to 64 nodes, each a socket path or
// a host with a port from 1 to 65535, and joined back with commas it spells
// the input (no address lost, split or invented).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "addresses.h"

namespace {

void Require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "addresses_fuzz: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace custody;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  auto r = client::ParseAddressList(input);
  if (!r.ok()) {
    Require(r.error().category() == Category::kConfig, "a refusal that is not a config error");
    for (unsigned char c : r.error().message()) Require(c >= 0x20 && c != 0x7f, "an unprintable byte in a refusal");
    return 0;
  }
  Require(!r->empty() && r->size() <= client::kMaxNodes, "a list of no nodes, or of too many");
  std::string back;
  for (const auto& n : *r) {
    if (!back.empty()) back += ',';
    if (!n.tls()) {
      Require(!n.socket_path.empty(), "an empty socket path");
      back += "unix:" + n.socket_path;
      continue;
    }
    Require(!n.host.empty(), "an empty host");
    const unsigned long port = std::strtoul(n.port.c_str(), nullptr, 10);
    Require(port >= 1 && port <= 65535, "a port out of range");
    back += "https://" + n.host + ":" + n.port;
  }
  // A trailing slash after the port is the one spelling the parser drops.
  std::string spelled(input);
  std::string normalised;
  size_t pos = 0;
  for (;;) {
    size_t comma = spelled.find(',', pos);
    std::string part = spelled.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (part.starts_with("https://") && part.ends_with("/")) part.pop_back();
    normalised += (normalised.empty() && pos == 0 ? "" : ",") + part;
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  Require(back == normalised, "the accepted list does not spell the input back");
  return 0;
}
