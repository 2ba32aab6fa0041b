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
//   path = "/var/lib/custody/custody.db"   # SQLite, the embedded default; or
//   # url = "postgresql://custody@db.internal/custody?sslmode=verify-full"
//   #       (any libpq connection string or URI, never with a password)
//   [node]                                 # optional
//   name = "custody-1"                     # default: the host name
//   [audit]                                # optional
//   dir = "/var/lib/custody/audit"         # default: state_dir/audit
//   checkpoint_every = 1000                # records between signed checkpoints
//   checkpoint_seconds = 300               # seconds between signed checkpoints
//   group_commit_us = 500                  # longest a batch waits for GETs under way; 0: off
//
// The config never holds a PIN: only where to read one.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "custody/audit/options.h"
#include "custody/common/result.h"
#include "custody/common/secret.h"
#include "custody/hsm/settings.h"
#include "custody/server/settings.h"
#include "custody/store/settings.h"
#include "custody/tpm/settings.h"

namespace custody::core {

// [token]: which backend, where its PIN is, and the backend's own settings
// (each owned by its layer: hsm/settings.h, tpm/settings.h).
struct TokenSection {
  std::string backend = "pkcs11";  // "pkcs11" (pkcs11 below) or "tpm" (tpm below)
  hsm::TokenSettings pkcs11;
  tpm::TpmSettings tpm;
  std::optional<std::string> pin_file;
  // [token.environment]: set before the module loads (SOFTHSM2_CONF, ...).
  std::vector<std::pair<std::string, std::string>> environment;
  // How long custodyd lets one token or TPM call run before the request
  // that made it is refused (503); the call itself goes on on its own
  // thread (seal/deadline_sealer.h). 100 to 600,000 ms.
  int call_timeout_ms = 5000;

  bool operator==(const TokenSection&) const = default;
};

// [node]: this custodyd among the nodes that share one store. The name is
// written into every audit record (AuditOptions::node), /v1/health and the
// /metrics labels, so a record or a sample says which node made it.
struct NodeSettings {
  std::string name;  // [A-Za-z0-9][A-Za-z0-9._-]*, at most 63; default the host name
  // Written in the file (WriteConfig writes it back); false: the host name,
  // which a copied config must not pin.
  bool named = false;
  bool operator==(const NodeSettings&) const = default;
};

// The whole file: one struct per table, each with its defaults in one place
// and a defaulted operator== (custodyd's reload compares them).
struct Config {
  std::string state_dir;
  TokenSection token;
  StoreSettings store;             // [store]: store/settings.h
  NodeSettings node;               // [node]
  AuditOptions audit;              // [audit]: audit/options.h; dir defaults to state_dir/audit
  server::ServerSettings server;   // [server]: server/settings.h

  bool operator==(const Config&) const = default;
};

// What no single table can check: a TPM backend with a PostgreSQL store is
// refused (kConfig), since a KEK sealed by one host's TPM cannot be unsealed
// by any other node that shares the store. LoadConfig and `custody init`
// both call it.
Status CheckConfigCoherence(const Config& config);

// The host name as a node name (the default of [node] name); kConfig
// naming `what` when the host's name is not one.
Result<std::string> HostNodeName(const std::string& what);
// A node name as [node] name takes it; kConfig naming `what` otherwise.
Status ValidateNodeName(const std::string& name, const std::string& what);

// --config, then $CUSTODY_CONFIG, then /etc/custody/custody.toml.
std::string LocateConfig(const std::optional<std::string>& flag);

// kNotFound if the file is missing; kConfig naming file:line:column for a
// syntax error or a missing or mistyped key.
Result<Config> LoadConfig(const std::string& path);

// A store named on the command line (`init --store`, `store copy`): a
// PostgreSQL URI (postgresql:// or postgres://) or libpq key=value string,
// else a SQLite file path (made absolute). kConfig for a URL with a password.
Result<StoreSettings> StoreFromArg(const std::string& arg);
// The store for people: the SQLite path, or the PostgreSQL host and
// database (never the whole URL).
std::string DescribeStore(const StoreSettings& store);

// Writes atomically (temporary file, fsync, rename), mode 0600.
Status WriteConfig(const Config& config, const std::string& path);

// Sets [token.environment] variables not already set in the process.
void ApplyTokenEnvironment(const Config& config);

// The user PIN: from descriptor `pin_fd` if given, else $CUSTODY_PIN (which
// is then removed from the environment, so children do not inherit it), else
// the config's pin_file (which must be mode 0600 or stricter). One trailing
// newline is dropped.
Result<SecretBuffer> ResolvePin(const Config& config, std::optional<int> pin_fd);

// The access-token key ([server] token_key_file; docs/VAULT_COMPAT.md), or
// nothing when this deployment issues no tokens (a PostgreSQL store with
// no key file named). The default file, state_dir/access-token.key, is
// made at first use.
Result<std::optional<SecretBuffer>> LoadAccessTokenKey(const Config& config);

}  // namespace custody::core
