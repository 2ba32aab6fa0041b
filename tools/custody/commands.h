// The `custody` CLI commands. Each returns a Status; main() turns an error
// into one line on stderr and its sysexits.h code.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "custody/common/result.h"

namespace custody::cli {

struct Globals {
  std::optional<std::string> config;
  bool json = false;
  std::optional<int> pin_fd;
  std::string progress = "auto";  // --progress auto|lines|none (progress.h)
  // A command that succeeded but must fail a check (rotation status
  // --fail-on-overdue) sets this; main() exits with it.
  mutable int check_failed_exit = 0;
};

// Before any command: --config, CUSTODY_CONFIG and CUSTODY_ADDR must be
// text custody can record (an error naming a path goes into the audit
// record). Each command checks its own arguments the same way (io.h).
Status CheckGlobals(const Globals& g);

struct InitArgs {
  std::string backend = "pkcs11";
  std::string module, token;        // pkcs11
  std::string tcti;                 // tpm
  std::vector<int> pcrs;            // tpm: bind KEKs to these PCRs
  bool persist_srk = false;         // tpm
  std::optional<std::string> pin_file;
  std::string state_dir = "/var/lib/custody";
  std::optional<std::string> store;     // SQLite path or PostgreSQL URL; default state_dir/custody.db
  std::vector<std::string> module_env;  // NAME=VALUE
  bool force = false;
};
Status Init(const Globals& g, const InitArgs& a);

Status ProjectCreate(const Globals& g, const std::string& name, const std::vector<std::string>& envs);
Status ProjectList(const Globals& g);
Status EnvCreate(const Globals& g, const std::string& project, const std::string& env);

struct PutArgs {
  std::string path;
  std::optional<std::string> from_file;
  bool keep_newline = false;
  std::optional<uint32_t> if_version;  // check-and-set: 0 = only if there is no version yet
};
Status SecretPut(const Globals& g, const PutArgs& a);

struct GetArgs {
  std::string path;
  std::optional<uint32_t> version;
  std::optional<std::string> out;
};
Status SecretGet(const Globals& g, const GetArgs& a);
// Fetches each NAME=PROJECT/ENV/SECRET and replaces this process with
// `command`, the values in its environment only.
Status Exec(const Globals& g, const std::vector<std::string>& envs, const std::vector<std::string>& command);
Status SecretList(const Globals& g, const std::string& scope);
Status SecretDelete(const Globals& g, const std::string& path);

Status TokenInfo(const Globals& g);

// Rotation (rotation_commands.cc).
struct RotateArgs {
  std::string path;
  std::optional<std::string> from_file;
  std::optional<size_t> generate;  // bytes from the token's RNG
  std::string format = "base64url";
  std::string prefix;
  std::optional<std::string> exec;  // provider command, run through /bin/sh -c
  int timeout_seconds = 30;
  bool keep_newline = false;
};
Status SecretRotate(const Globals& g, const RotateArgs& a);
Status SecretRevoke(const Globals& g, const std::string& path, uint32_t version, const std::string& reason);
Status SecretVersions(const Globals& g, const std::string& path);
// Exit code when --fail-on-overdue finds an overdue secret.
inline constexpr int kExitOverdue = 1;
Status RotationStatus(const Globals& g, const std::string& project, bool fail_on_overdue);
struct KekRotateArgs {
  std::string project;
  bool dry_run = false;
  size_t batch = 128;
};
Status KekRotate(const Globals& g, const KekRotateArgs& a);
Status KekList(const Globals& g, const std::string& project);

// Moving a deployment between stores (store_commands.cc): every row of
// --from into --to (which must hold no deployment) in one transaction, then
// every copied version unsealed from --to through the token.
struct StoreCopyArgs {
  std::string from, to;  // SQLite paths or PostgreSQL URLs
};
Status StoreCopy(const Globals& g, const StoreCopyArgs& a);

// Attestation (attest_commands.cc).
struct AttestArgs {
  std::optional<std::string> project;
  std::optional<std::string> nonce;  // hex, from the verifier
  std::string out;
  std::optional<std::string> pubkey_out;  // also write the attestation public key (PEM)
  std::optional<std::string> challenge;   // an EK challenge file (`attest challenge`) instead of --nonce
};
Status Attest(const Globals& g, const AttestArgs& a);
struct AttestVerifyArgs {
  std::string statement, pubkey;
  std::optional<std::string> nonce, ek_ca, challenge_key;
};
Status AttestVerify(const Globals& g, const AttestVerifyArgs& a);
struct AttestChallengeArgs {
  std::string statement, pubkey, ek_ca, out, key_out;
};
Status AttestChallenge(const Globals& g, const AttestChallengeArgs& a);

struct TokenCheckArgs {
  std::optional<std::string> against;             // a saved --json report to compare with
  std::optional<std::string> module, token;       // without a config: this module and token URI
  std::optional<std::string> pin_file;            // with --module: the PIN's file (or CUSTODY_PIN, --pin-fd)
};
// Exit 0 when every required capability is present, 1 (check_failed_exit) when one is missing.
Status TokenCheck(const Globals& g, const TokenCheckArgs& a);

// Access tokens of the Vault-compatible API (docs/VAULT_COMPAT.md).
struct TokenIssueArgs {
  std::string principal;
  std::string ttl;                      // "1h", "30m", "3600"; default [server] token_ttl_seconds
  std::optional<std::string> max_ttl;   // default [server] token_max_ttl_seconds (at least ttl)
};
// Prints the token once, on stdout; policy admins only.
Status TokenIssue(const Globals& g, const TokenIssueArgs& a);
Status TokenRevoke(const Globals& g, const std::string& accessor, const std::string& principal);
Status TokenList(const Globals& g);

struct SandboxArgs {
  std::string dir;
  std::optional<std::string> project;  // a minimal policy: the caller owns this project
  std::optional<std::string> policy;   // or this policy file
  bool serve = false;                  // start custodyd on DIR/custody.sock
  bool stop = false;                   // stop the custodyd --serve started
};
// Prints, on stdout, environment lines for `eval`; everything else on stderr.
Status Sandbox(const Globals& g, const SandboxArgs& a);

Status PolicyCheck(const Globals& g, const std::string& file);
Status PolicyApply(const Globals& g, const std::string& file);
Status PolicyExplain(const Globals& g, const std::string& principal, const std::string& action,
                     const std::string& target);
Status Usage(const Globals& g, const std::string& project);

Status AuditVerify(const Globals& g, const std::vector<std::string>& files, const std::string& pubkey_file);
struct AuditShowArgs {
  std::optional<std::string> project, principal, since, action;
};
Status AuditShow(const Globals& g, const AuditShowArgs& a);
struct AuditExportArgs {
  std::optional<std::string> since, node, out;
};
Status AuditExport(const Globals& g, const AuditExportArgs& a);
Status AuditPubkey(const Globals& g, const std::optional<std::string>& out);
Status AuditCheckpoint(const Globals& g);
// Retention: removes the oldest segments of the file log whose records are
// all older than `before` and already signed by a checkpoint, after writing
// the audit.prune record that lets `audit verify` accept the shorter log.
struct AuditPruneArgs {
  std::string before;
  bool dry_run = false;
};
Status AuditPrune(const Globals& g, const AuditPruneArgs& a);

}  // namespace custody::cli
