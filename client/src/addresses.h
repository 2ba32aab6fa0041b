// The node list CUSTODY_ADDR (and Client::Connect) takes: comma-separated
// unix:/path/to/custody.sock or https://host:port. A parser of its own, with
// no transport in it, so that a fuzz target covers it alone.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "custody/common/result.h"

namespace custody::client {

struct NodeAddress {
  std::string socket_path;  // unix:
  std::string host, port;   // https://
  bool tls() const { return socket_path.empty(); }
};

inline constexpr size_t kMaxNodes = 64;

// Every address of the list, in order. kConfig naming the address (escaped:
// the variable may hold any bytes) for an empty one, an unknown scheme, a
// missing or bad port, or more than kMaxNodes.
Result<std::vector<NodeAddress>> ParseAddressList(std::string_view list);

}  // namespace custody::client
