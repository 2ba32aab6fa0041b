// The custodyd HTTP server: HTTP/1.1 with JSON bodies (Boost.Beast) on a Unix
// socket, where the kernel (SO_PEERCRED) says who the peer is. Every request
// goes through core::Custodian (policy, limits, audit, token).
//
//   Server server(config, custodian, log);
//   CUSTODY_RETURN_IF_ERROR(server.Listen());
//   server.Run(threads);   // until Stop()
#pragma once

#include <openssl/evp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "custody/common/result.h"
#include "custody/server/settings.h"
#include "custody/service/custodian.h"

namespace custody::server {

// The [server] settings, and what custodyd's main adds that no config can.
struct ServerOptions : ServerSettings {
  // Who is on a Unix socket connection, instead of SO_PEERCRED: only the
  // HTTP fuzz harness sets it, to play peers the fuzzer chooses. custodyd's
  // main never does, and no config can.
  std::function<std::optional<core::RequestContext>(int fd)> unix_peer_for_fuzzing;
  // Loads a pkcs11: tls_key from the token (set by main, which holds the PIN).
  std::function<Result<EVP_PKEY*>(const std::string& uri)> token_key;
  // [node] name: in /v1/health and as the `node` label of every metric.
  // Checked by the config ([A-Za-z0-9._-]); empty: no label.
  std::string node_name;
  // custody's version, for Vault's sys/health.
  std::string version;
};

class Server {
 public:
  Server(ServerOptions options, core::Custodian& custodian);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds the Unix socket (replacing a stale one), sets its mode, and the
  // TLS listener when one is configured.
  Status Listen();
  // Runs the I/O loop on `threads` threads until Stop() has drained.
  // False when requests were still waiting for their audit records at the
  // drain deadline (a disk that does not answer): the caller must then end
  // the process without destroying the server, as their answers (never
  // values: no record, no value) may still be posted to it.
  [[nodiscard]] bool Run(unsigned threads);
  // A reload: max_connections, max_connections_per_peer,
  // idle_timeout_seconds, max_header_bytes and max_body_bytes from `fresh`
  // apply from the next connection or request.
  // The other options are fixed for the life of the server.
  void SetLimits(const ServerOptions& fresh);
  // Stops accepting, lets requests in flight finish (at most `grace`), then ends Run.
  void Stop(std::chrono::seconds grace = std::chrono::seconds(10));
  // Runs `fn` on the server's loop (signal handlers, timers).
  void Post(std::function<void()> fn);
  // Calls `fn` every `period` on the loop until Stop().
  void Every(std::chrono::seconds period, std::function<void()> fn);

  int open_connections() const;

  struct Impl;

 private:
  Status ListenTls();
  std::unique_ptr<Impl> impl_;
};

}  // namespace custody::server
