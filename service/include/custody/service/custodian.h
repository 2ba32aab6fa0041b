// Custodian: one request, end to end, for a caller its front identified
// (custodyd: SO_PEERCRED or the TLS certificate; the CLI in direct mode:
// the local user). It is the one flow every front drives:
//   identify the caller -> ask the policy -> read the environment, version
//   and KEK in one snapshot -> charge rate and spend limits -> unseal in the
//   token -> make the audit record durable (fail closed) -> hand the value
//   over. A put seals, then makes its record durable, then commits.
//
//   core::Custodian c(store, audit, sealer, std::make_shared<const core::Authorizer>(std::move(authz)));
//   core::RequestContext rc{.caller = peer, .identified_by = "uid 1000 (alice)", .request_id = core::NewRequestId()};
//   auto r = c.Get(rc, *core::SecretPath::Parse("payments/prod/stripe"), std::nullopt);
//
// Thread-safe: the server calls it from several threads at once. The policy
// can be swapped while requests run (SIGHUP); each request keeps the one it
// started with.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "custody/audit/audit.h"
#include "custody/common/names.h"
#include "custody/common/result.h"
#include "custody/service/access_tokens.h"
#include "custody/service/authz.h"
#include "custody/service/rotation.h"
#include "custody/service/service.h"
#include "custody/service/usage_buffer.h"
#include "custody/store/store.h"

namespace custody::core {

struct RequestContext {
  policy::Caller caller;
  std::string identified_by;  // "uid 1000 (alice) pid 4242"
  std::string request_id;
  std::string via = "custodyd";  // the front, for the record's detail: "custodyd", "cli"
};

// Counters the server exports as metrics.
struct CustodianStats {
  std::atomic<uint64_t> token_errors{0};
  std::atomic<uint64_t> audit_failures{0};
  std::atomic<bool> audit_healthy{true};
  std::atomic<bool> token_healthy{true};
  // False once the store could not be read (RefreshPolicy asks it twice a
  // second); true again at the next read that works.
  std::atomic<bool> store_healthy{true};
  std::atomic<uint64_t> token_recoveries{0};
  std::atomic<uint64_t> token_reinitializations{0};
  // Token or TPM calls past [token] call_timeout (DeadlineSealer): ever,
  // still out now, and since when the oldest is out (unix s; 0: none).
  // Refreshed from the sealer by Custodian::RefreshTokenStalls().
  std::atomic<uint64_t> token_timeouts{0};
  std::atomic<uint64_t> token_hung{0};
  std::atomic<int64_t> token_hung_since{0};
  // The audit batch being written now has been at it this long (ms; 0:
  // none, or not yet past kAuditStallMs), and batches or callbacks of the
  // log that threw. Refreshed by Custodian::RefreshAuditStall().
  std::atomic<int64_t> audit_write_stalled_ms{0};
  std::atomic<uint64_t> audit_failed_batches{0};
  std::atomic<uint64_t> audit_failed_callbacks{0};
  std::atomic<uint64_t> audit_batches{0};
  std::atomic<uint64_t> audit_records{0};

  // An audit append failed (`why`), or one worked (nullopt): audit_healthy,
  // and the reason /v1/health gives its readers.
  void NoteAudit(const std::optional<std::string>& why) { Note(audit_healthy, audit_problem_, why); }
  std::string audit_problem() const { return Problem(audit_problem_); }
  // The store could not be read (`why`: the store's own words), or it could.
  void NoteStore(const std::optional<std::string>& why) { Note(store_healthy, store_problem_, why); }
  std::string store_problem() const { return Problem(store_problem_); }

 private:
  void Note(std::atomic<bool>& healthy, std::string& problem, const std::optional<std::string>& why) {
    std::lock_guard lock(problem_mu_);
    if (why) problem = *why;
    healthy.store(!why);
  }
  std::string Problem(const std::string& problem) const {
    std::lock_guard lock(problem_mu_);
    return problem;
  }
  mutable std::mutex problem_mu_;
  std::string audit_problem_;
  std::string store_problem_;
};

class Custodian {
 public:
  // The sealer recovers its own backend (Sealer::Recover): nothing here
  // knows whether it is a PKCS#11 token or a TPM.
  Custodian(Store& store, AuditLog& audit, Sealer& sealer, std::shared_ptr<const Authorizer> authz)
      : store_(store), audit_(audit), sealer_(sealer), authz_(std::move(authz)) {}

  Result<Unsealed> Get(const RequestContext& rc, const SecretPath& path, std::optional<uint32_t> version);
  // The same flow, but the wait for the audit record's fsync holds no
  // thread: `done` gets the value (or the refusal) once the record is
  // durable, on the audit log's writer thread (keep it short: post the
  // answer to the transport's own threads). Fail closed as Get: no value
  // is handed over unless its record was written.
  // `lead_if_idle`: the record is written on this thread when the log is
  // idle (AuditLog::AppendAsync), and `done` may then run here before
  // GetAsync returns. For a caller alone in flight: see custodyd's StartGet.
  using GetDone = std::function<void(Result<Unsealed>)>;
  void GetAsync(const RequestContext& rc, const SecretPath& path, std::optional<uint32_t> version, GetDone done,
                bool lead_if_idle = false);
  // Withdraws one version at once (`custody secret revoke`, the server's
  // revocations and Vault's destroy): never readable again; if it was
  // current, the newest remaining version becomes current. For principals
  // the policy lets rotate. `reason` (printable UTF-8, 1 to
  // kMaxRevokeReasonBytes) goes into the store and the record, which is
  // written before the store changes. A version already revoked is kUsage,
  // or with `already_ok` an answer that changes nothing (Vault's destroy
  // is idempotent) and says so in its record. Returns the current version
  // afterwards (0: none). `must_exist`: versions checked before anything
  // changes (a destroy of several is refused as a whole, kUsage naming the
  // first that does not exist, when one of them does not).
  static constexpr size_t kMaxRevokeReasonBytes = 500;
  Result<uint32_t> Revoke(const RequestContext& rc, const SecretPath& path, uint32_t version,
                          const std::string& reason, bool already_ok = false,
                          const std::vector<uint32_t>& must_exist = {});
  // `put_key`: the request's Idempotency-Key, or empty. A put whose key
  // already stored a version of this secret is answered with that version
  // (`*replayed` set): nothing is sealed, stored or charged again, and its
  // audit record says so.
  // `expect_current`: check-and-set, see SecretService::Put.
  Result<uint32_t> Put(const RequestContext& rc, const SecretPath& path, const SecretBuffer& value,
                       const std::string& put_key = "", bool* replayed = nullptr,
                       std::optional<uint32_t> expect_current = std::nullopt);
  Result<std::vector<UsageRow>> Usage(const RequestContext& rc, const std::optional<std::string>& project);
  // Names and versions (never values) in one environment (or the whole
  // project when `env` is empty), filtered by the caller's list grants;
  // audited as secret.list.
  Result<std::vector<SecretSummary>> List(const RequestContext& rc, const std::string& project, const std::string& env);
  // Every version of one secret (no blobs); audited as secret.metadata.
  Result<std::vector<SecretVersionRecord>> Versions(const RequestContext& rc, const SecretPath& path);

  // Access tokens of the Vault-compatible API (docs/VAULT_COMPAT.md); none
  // until SetAccessTokens. Every use below writes its audit record, which
  // names the token by its accessor, never by its text.
  void SetAccessTokens(AccessTokens* tokens) { tokens_ = tokens; }
  bool has_access_tokens() const { return tokens_ != nullptr; }
  // Checks an X-Vault-Token. Good: `rc` now speaks for the token's principal
  // (its transport identity stays in identified_by). Refused: a record of
  // `action` refused for that reason is written, and kDenied returned.
  // `project` and `env` (may be empty) name what the request was about.
  Result<AccessTokenRecord> Authenticate(RequestContext& rc, std::string_view token, const std::string& action,
                                         const std::string& project = "", const std::string& env = "");
  // A token for the caller itself (the cert login): ttl and max_ttl seconds.
  Result<AccessTokens::Issued> Login(const RequestContext& rc, int64_t ttl, int64_t max_ttl);
  // A token for `principal`, asked by a policy admin (`custody token issue`).
  Result<AccessTokens::Issued> IssueToken(const RequestContext& rc, const std::string& principal, int64_t ttl,
                                          int64_t max_ttl);
  // lookup-self and renew-self, for a caller Authenticate accepted.
  Result<AccessTokenRecord> LookupSelf(const RequestContext& rc, const AccessTokenRecord& token);
  Result<AccessTokenRecord> RenewSelf(const RequestContext& rc, std::string_view token, int64_t increment);
  // Policy admins only: revoke by accessor or by principal; list.
  Result<size_t> RevokeTokens(const RequestContext& rc, const std::string& accessor, const std::string& principal);
  Result<std::vector<AccessTokenRecord>> ListTokens(const RequestContext& rc);

  // Every secret's place in the rotation schedule under the policy in force
  // (for the server's metrics: counts, never names or values).
  Result<std::vector<RotationItem>> RotationSchedule();

  void SwapPolicy(std::shared_ptr<const Authorizer> authz);
  std::shared_ptr<const Authorizer> policy() const;

  // Puts the store's newest policy in force when its version is not the one
  // in force: how a `policy apply` through any node (or the CLI on any
  // host) reaches every node that shares the store. custodyd calls it every
  // half second and on SIGHUP. A newer policy that cannot be loaded leaves
  // the one in force, and PolicyState says why (once per version in the
  // log). Returns the version in force afterwards. `retry`: load it again
  // even if that version was refused before (SIGHUP).
  Result<uint32_t> RefreshPolicy(bool retry = false);
  struct PolicyState {
    uint32_t in_force = 0;
    uint32_t newest_in_store = 0;  // as last read
    std::string problem;           // why newest_in_store is not in force; empty when it is
  };
  PolicyState policy_state() const;
  CustodianStats& stats() { return stats_; }
  // Copies the sealer's stalled calls into stats() (for health and metrics).
  void RefreshTokenStalls() {
    const Sealer::Stalls s = sealer_.stalls();
    stats_.token_timeouts.store(s.timed_out);
    stats_.token_hung.store(s.hung);
    stats_.token_hung_since.store(s.hung_since);
    // Recoveries made inside a call (a TPM reconnect at the next call once
    // it is back) are counted too, not only those of RecoverFrom.
    const Sealer::Recoveries n = sealer_.recoveries();
    stats_.token_recoveries.store(n.recovered);
    stats_.token_reinitializations.store(n.reinitialized);
  }
  // A write to the audit log that has not returned within this long makes
  // the node unhealthy: a sound disk syncs a batch in milliseconds, and
  // meanwhile every GET and PUT of this node waits for its record.
  static constexpr int64_t kAuditStallMs = 2000;
  // Copies the audit log's write in progress into stats(); true when it is
  // stalled (for health and metrics).
  bool RefreshAuditStall() {
    const int64_t ms = audit_.write_in_progress_for().count();
    stats_.audit_write_stalled_ms.store(ms >= kAuditStallMs ? ms : 0);
    stats_.audit_failed_batches.store(audit_.failed_batches());
    stats_.audit_failed_callbacks.store(audit_.failed_callbacks());
    stats_.audit_batches.store(audit_.batches_written());
    stats_.audit_records.store(audit_.records_written());
    return ms >= kAuditStallMs;
  }
  // The log every request's record goes to (custodyd also writes its
  // summaries of refused connections there).
  AuditLog& audit() { return audit_; }
  // Write-behind usage counts that could not be written yet (they are kept
  // and written with the next flush).
  uint64_t usage_flush_failures() const { return usage_.flush_failures(); }

 private:
  struct Flow;
  // Get up to (not including) its audit record.
  Result<Unsealed> GetUnrecorded(Flow& f, const RequestContext& rc, const SecretPath& path,
                                 std::optional<uint32_t> version);
  // When `r` failed because the backend lost its session or device: has
  // the sealer recover it, counts it, and says to try once more.
  template <typename T>
  bool RecoverFrom(const Result<T>& r);
  Store& store_;
  AuditLog& audit_;
  Sealer& sealer_;
  mutable std::mutex mu_;
  std::shared_ptr<const Authorizer> authz_;
  uint32_t newest_in_store_ = 0;  // under mu_
  std::string policy_problem_;    // under mu_
  CustodianStats stats_;
  // Usage of requests no limit applies to, written behind (usage_buffer.h).
  UsageBuffer usage_{store_};
  AccessTokens* tokens_ = nullptr;
};

}  // namespace custody::core
