// A small client for custodyd, for applications that fetch keys in-process
// and for the `custody` CLI when CUSTODY_ADDR is set.
//
//   auto c = custody::client::Client::Connect("unix:/run/custody/custody.sock");
//   auto key = c->Get("payments/prod/stripe-key");          // SecretBuffer, wiped on release
//   use(key->value.RevealString(custody::SecretAccess{}));
//
// Errors come back as custody::Error with the same categories (and so the
// same CLI exit codes) as in direct mode: 401/403 denied, 404 not found,
// 429 limit (with the server's reason and refill time), 503 unavailable.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "custody/common/result.h"
#include "custody/common/secret.h"

namespace custody::client {

struct Fetched {
  SecretBuffer value;
  uint32_t version = 0;
};

class Client {
 public:
  // "unix:/path/to/custody.sock", or "https://host:port" with the client
  // certificate, its key and the CA that signed the server's certificate in
  // CUSTODY_CLIENT_CERT, CUSTODY_CLIENT_KEY and CUSTODY_CA (PEM files).
  static Result<Client> Connect(const std::string& address);

  Result<Fetched> Get(const std::string& path, std::optional<uint32_t> version = std::nullopt) const;
  Result<uint32_t> Put(const std::string& path, const SecretBuffer& value) const;
  // GET any endpoint, the body as text (for /v1/usage, /v1/health, /metrics).
  Result<std::string> Fetch(const std::string& target) const;

 private:
  explicit Client(std::string socket_path);
  struct Tls {
    std::string host, port, cert, key, ca;
  };
  std::shared_ptr<Tls> tls_;  // set for https://
  struct Response {
    int status = 0;
    std::string body;
  };
  Result<Response> Request(const std::string& method, const std::string& target, std::string* body) const;
  std::string socket_path_;
  // One kept-alive connection, reused across requests (and re-opened once
  // if the server closed it meanwhile). Requests on one Client take turns.
  struct Connection;
  std::shared_ptr<Connection> conn_;
};

}  // namespace custody::client
