#include "addresses.h"

#include "custody/common/untrusted.h"

namespace custody::client {

Result<std::vector<NodeAddress>> ParseAddressList(std::string_view list) {
  std::vector<NodeAddress> out;
  auto bad = [](std::string_view address, const std::string& why) {
    return Error(Category::kConfig, "CUSTODY_ADDR '" + EscapeUntrusted(address, 200) + "' " + why);
  };
  size_t pos = 0;
  for (;;) {
    const size_t comma = list.find(',', pos);
    const std::string_view address = list.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos);
    if (out.size() == kMaxNodes) {
      return Error(Category::kConfig, "CUSTODY_ADDR names more than " + std::to_string(kMaxNodes) + " nodes");
    }
    NodeAddress n;
    if (address.empty()) {
      return Error(Category::kConfig, "CUSTODY_ADDR has an empty address (two commas, or one at an end)");
    }
    if (address.find('\0') != std::string_view::npos) return bad(address, "holds a NUL byte");
    if (address.starts_with("unix:")) {
      n.socket_path = std::string(address.substr(5));
      if (n.socket_path.empty()) return bad(address, "names no socket");
    } else if (address.starts_with("https://")) {
      std::string_view hostport = address.substr(8);
      if (!hostport.empty() && hostport.back() == '/') hostport.remove_suffix(1);
      const size_t colon = hostport.rfind(':');
      if (colon == std::string_view::npos) return bad(address, "needs a port");
      n.host = std::string(hostport.substr(0, colon));
      n.port = std::string(hostport.substr(colon + 1));
      // An IPv6 literal keeps its brackets: [::1]:8443.
      if (n.host.empty() || n.host.find_first_of("/?#@") != std::string::npos) return bad(address, "names no host");
      unsigned long port = 0;
      bool digits = !n.port.empty() && n.port.size() <= 5;
      for (char c : n.port) {
        digits = digits && c >= '0' && c <= '9';
        if (digits) port = port * 10 + static_cast<unsigned long>(c - '0');
      }
      if (!digits || port == 0 || port > 65535) return bad(address, "needs a port from 1 to 65535");
    } else {
      return bad(address, "must be unix:/path/to/custody.sock or https://host:port (several: comma-separated)");
    }
    out.push_back(std::move(n));
    if (comma == std::string_view::npos) return out;
    pos = comma + 1;
  }
}

}  // namespace custody::client
