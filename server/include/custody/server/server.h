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

#include "custody/app/config.h"
#include "custody/common/result.h"
#include "custody/service/custodian.h"

namespace custody::server {

struct ServerOptions {
  std::string socket_path;
  uint32_t socket_mode = 0666;
  uint32_t max_connections = 256;
  uint32_t max_connections_per_peer = 64;  // per uid (Unix socket) or address (TLS)
  // Connections from peers the policy does not know share at most this
  // many places (the rest are kept for principals): see core::Config.
  uint32_t max_unidentified_connections = 32;
  // Who may read /metrics and /v1/health's details besides policy admins
  // and auditors (typed SANs: "dns:...", "uri:...", "email:...").
  std::vector<uint32_t> metrics_uids;
  std::vector<std::string> metrics_tls_sans;
  // How often refusals without a request record are written as one
  // summary record per peer.
  uint32_t refusal_summary_seconds = 60;
  uint32_t idle_timeout_seconds = 30;
  uint32_t max_header_bytes = 8 * 1024;
  uint32_t max_body_bytes = 128 * 1024;
  // TCP with TLS 1.3 and client certificates; empty tls_listen: none.
  std::string tls_listen;     // "127.0.0.1:8443"
  std::string tls_cert;       // server certificate chain, PEM
  std::string tls_key;        // server private key, PEM file
  std::string tls_client_ca;  // CA certificates that client certificates must chain to
  // Who is on a Unix socket connection, instead of SO_PEERCRED: only the
  // HTTP fuzz harness sets it, to play peers the fuzzer chooses. custodyd's
  // main never does, and no config can.
  std::function<std::optional<core::RequestContext>(int fd)> unix_peer_for_fuzzing;
  // Loads a pkcs11: tls_key from the token (set by main, which holds the PIN).
  std::function<Result<EVP_PKEY*>(const std::string& uri)> token_key;
};

ServerOptions OptionsFrom(const core::Config& c);

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
