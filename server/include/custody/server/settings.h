// [server] of custody.toml: custodyd's listeners and limits. Owned here, by
// the server; the config loader (app/) reads the table into it and custodyd
// hands it to the Server as the base of ServerOptions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace custody::server {

struct ServerSettings {
  std::string socket_path;    // "socket": the Unix socket; empty: no Unix listener
  uint32_t socket_mode = 0666;  // who may connect; the policy decides what they get
  // Request threads; 0: one per CPU, at least 2. Under load they never wait
  // for the disk (a GET's audit fsync is waited for without a thread); a GET
  // alone in flight writes its own record when the log is idle, while the
  // other threads serve. More threads than CPUs only contend on the token's
  // and the store's locks (bench/server_bench).
  uint32_t threads = 0;
  uint32_t max_connections = 256;
  // From one peer (a uid on the Unix socket, an address over TLS): one local
  // user cannot take every place.
  uint32_t max_connections_per_peer = 64;
  // Connections from peers the policy does not identify (a uid no principal
  // has; a TLS client before its handshake, or whose certificate maps to no
  // principal) share at most this many of max_connections: the rest are
  // kept for principals, so strangers cannot starve them. Never more than
  // half of max_connections, whatever this says.
  uint32_t max_unidentified_connections = 32;
  // Who may read /metrics and the details of /v1/health besides policy
  // admins and auditors: a scraper's uid or certificate SAN, typed as the
  // policy's tls_san ("dns:...", "uri:...", "email:...").
  std::vector<uint32_t> metrics_uids;
  std::vector<std::string> metrics_tls_sans;
  // Refusals that no request record covers (malformed requests, connection
  // limits, timeouts) are summed per peer and written as one audit record per
  // peer this often (docs/AUDIT.md).
  uint32_t refusal_summary_seconds = 60;
  uint32_t idle_timeout_seconds = 30;
  uint32_t max_header_bytes = 8 * 1024;
  uint32_t max_body_bytes = 128 * 1024;
  // TCP with TLS 1.3 and client certificates; empty tls_listen: none.
  std::string tls_listen;     // "127.0.0.1:8443"
  std::string tls_cert;       // server certificate chain, PEM
  std::string tls_key;        // server private key: a PEM file or a pkcs11: URI
  std::string tls_client_ca;  // CA certificates that client certificates must chain to
  // "required" (the default): no TLS connection without a client
  // certificate from tls_client_ca. "optional": a client may come without
  // one; it is then nobody until it sends an access token (X-Vault-Token),
  // for Vault clients that can neither log in by certificate nor use the
  // Unix socket (docs/VAULT_COMPAT.md). A certificate that is sent must
  // still chain to tls_client_ca.
  bool tls_client_certificate_optional = false;
  // Access tokens of the Vault-compatible API (docs/VAULT_COMPAT.md): the
  // 32-byte key their hashes are keyed with. Empty: state_dir/access-token.key,
  // made at first use, with a SQLite store; with a PostgreSQL store every
  // node must name the same key file, and without one no token is issued.
  std::string token_key_file;
  uint32_t token_ttl_seconds = 3600;      // a new token's life, and a renewal's step
  uint32_t token_max_ttl_seconds = 86400;  // no renewal goes past issue + this

  bool operator==(const ServerSettings&) const = default;
};

// What a reload cannot apply to a running server (everything but the limits
// Server::SetLimits takes): the [server] keys that differ between `running`
// and `fresh`, for the reload's warnings. Empty when a reload applies all.
std::vector<std::string> ChangesNeedingRestart(const ServerSettings& running, const ServerSettings& fresh);

}  // namespace custody::server
