// custody.toml: where the token, the PIN and the store are.
//
//   state_dir = "/var/lib/custody"
//   [token]
//   module   = "/usr/lib/softhsm/libsofthsm2.so"
//   uri      = "pkcs11:token=custody"
//   pin_file = "/etc/custody/pin"          # optional; else CUSTODY_PIN or --pin-fd
//   [token.environment]                    # optional; set before the module loads
//   SOFTHSM2_CONF = "/var/lib/custody/softhsm2.conf"
//   [store]
//   path = "/var/lib/custody/custody.db"
//   [audit]                                # optional
//   dir = "/var/lib/custody/audit"         # default: state_dir/audit
//   checkpoint_every = 1000                # records between signed checkpoints
//   checkpoint_seconds = 300               # seconds between signed checkpoints
//
// The config never holds a PIN: only where to read one.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "custody/common/result.h"
#include "custody/common/secret.h"

namespace custody::core {

struct Config {
  std::string state_dir;
  // [token] backend = "pkcs11" (module + uri) or "tpm" (tcti, pcrs, ...).
  std::string backend = "pkcs11";
  std::string token_module;
  std::string token_uri;
  std::string tpm_tcti;               // "device:/dev/tpmrm0", "swtpm:host=...,port=...", "tabrmd"
  std::vector<uint8_t> tpm_pcrs;      // bind new KEKs to these SHA-256 PCRs
  bool tpm_persist_srk = false;       // make the SRK persistent at 0x81000001 if absent
  std::string tpm_srk_name;           // the SRK's Name at init: a TPM with another SRK is refused
  int tpm_kek_cache_seconds = 0;      // keep unsealed KEKs in locked memory this long
  std::optional<std::string> pin_file;
  std::vector<std::pair<std::string, std::string>> token_environment;
  std::string store_path;
  std::string audit_dir;  // default: state_dir/audit
  uint64_t audit_checkpoint_every = 1000;
  int64_t audit_checkpoint_seconds = 300;
  uint64_t audit_segment_bytes = 16 * 1024 * 1024;
  // [server]: custodyd
  std::string server_socket;          // Unix socket path; empty: no Unix listener
  uint32_t server_socket_mode = 0666; // who may connect; the policy decides what they get
  // Request threads; 0 (the default): one per CPU, at least 2. They never
  // wait for the disk (a GET's audit fsync is waited for without a thread),
  // so more than the CPUs only contend on the token's and the store's locks
  // (bench/server_bench).
  uint32_t server_threads = 0;
  uint32_t server_max_connections = 256;
  // From one peer (a uid on the Unix socket, an address over TLS): one
  // local user cannot take every place.
  uint32_t server_max_connections_per_peer = 64;
  // Connections from peers the policy does not identify (a uid no
  // principal has; a TLS client before its handshake, or whose certificate
  // maps to no principal) share at most this many of max_connections: the
  // rest are kept for principals, so strangers cannot starve them. Never
  // more than half of max_connections, whatever this says.
  uint32_t server_max_unidentified_connections = 32;
  // Who may read /metrics and the details of /v1/health besides policy
  // admins and auditors: a scraper's uid or certificate SAN ("dns:...",
  // "uri:...", "email:..."; a bare name is a DNS name).
  std::vector<uint32_t> server_metrics_uids;
  std::vector<std::string> server_metrics_tls_sans;
  // Refusals that no request record covers (malformed requests, connection
  // limits, timeouts) are summed per peer and written as one audit record
  // per peer this often (docs/AUDIT.md).
  uint32_t server_refusal_summary_seconds = 60;
  uint32_t server_idle_timeout_seconds = 30;
  uint32_t server_max_header_bytes = 8 * 1024;
  uint32_t server_max_body_bytes = 128 * 1024;
  std::string server_tls_listen, server_tls_cert, server_tls_key, server_tls_client_ca;

  bool operator==(const Config&) const = default;
};

// --config, then $CUSTODY_CONFIG, then /etc/custody/custody.toml.
std::string LocateConfig(const std::optional<std::string>& flag);

// kNotFound if the file is missing; kConfig naming file:line:column for a
// syntax error or a missing or mistyped key.
Result<Config> LoadConfig(const std::string& path);

// Writes atomically (temporary file, fsync, rename), mode 0600.
Status WriteConfig(const Config& config, const std::string& path);

// Sets [token.environment] variables not already set in the process.
void ApplyTokenEnvironment(const Config& config);

// The user PIN: from descriptor `pin_fd` if given, else $CUSTODY_PIN (which
// is then removed from the environment, so children do not inherit it), else
// the config's pin_file (which must be mode 0600 or stricter). One trailing
// newline is dropped.
Result<SecretBuffer> ResolvePin(const Config& config, std::optional<int> pin_fd);

}  // namespace custody::core
