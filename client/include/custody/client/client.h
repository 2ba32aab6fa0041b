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
//
// Several nodes: Connect("unix:/run/a.sock,unix:/run/b.sock,https://c:8443")
// (CUSTODY_ADDR takes the same list). A GET goes to the node that answered
// last and moves on to the next when a node cannot be reached, does not
// answer within CUSTODY_TIMEOUT seconds (default 10) or answers 503. A PUT
// carries a fresh Idempotency-Key and moves on in the same cases: if a node
// stored it and then failed to answer, the next node finds the key in the
// shared store and answers with that version instead of making a second.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

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
  static Result<Client> Connect(const std::string& addresses);

  Result<Fetched> Get(const std::string& path, std::optional<uint32_t> version = std::nullopt) const;
  // `expect_current` (check-and-set): store only if the secret's newest
  // version is this one, 0 only if it has none yet (If-Match /
  // If-None-Match); otherwise kUsage with precondition_failed().
  Result<uint32_t> Put(const std::string& path, const SecretBuffer& value,
                       std::optional<uint32_t> expect_current = std::nullopt) const;
  // Revokes `version` at once (POST {"revoke": N, "reason": ...}): never
  // readable again. Returns the current version afterwards (0: none). Not
  // sent to another node once one took it: a revoke carries no
  // Idempotency-Key, and its retry would be refused as already done.
  Result<uint32_t> Revoke(const std::string& path, uint32_t version, const std::string& reason) const;
  // GET any endpoint, the body as text (for /v1/usage, /v1/health, /metrics),
  // with `headers` added (X-Vault-Token for the Vault-compatible API).
  using Headers = std::vector<std::pair<std::string, std::string>>;
  Result<std::string> Fetch(const std::string& target, const Headers& headers = {}) const;

 private:
  Client() = default;
  struct Tls {
    std::string host, port, cert, key, ca;
  };
  struct Response {
    int status = 0;
    std::string body;
  };
  // One kept-alive connection per node, reused across requests (and
  // re-opened once if the server closed it meanwhile).
  struct Connection;
  struct Node {
    std::string socket_path;    // unix:
    std::shared_ptr<Tls> tls;   // https://
    std::shared_ptr<Connection> conn;
  };
  // `idempotency_key`: sent as Idempotency-Key; with it, a request that was
  // sent may be asked again of another node (the store answers a retry
  // with what the first one did).
  Result<Response> Request(const std::string& method, const std::string& target, std::string* body,
                           const std::string& idempotency_key = "", const Headers& headers = {}) const;
  // One attempt on one node. `sent`: whether any byte of the request left.
  struct Outgoing;  // the HTTP request, built once for every attempt
  Result<Response> RequestOn(const Node& node, Outgoing& out, bool* sent) const;
  std::vector<Node> nodes_;
  int timeout_seconds_ = 10;
  // The node that answered last; where the next request starts. Requests
  // on one Client take turns (`turn`).
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace custody::client
