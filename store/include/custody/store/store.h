// Store: projects, environments, KEK records, secrets and their sealed
// versions. Never a plaintext value: only sealed blobs.
//
//   auto store = core::OpenStore(config, /*create=*/false);   // custody/app/backend.h
//   auto env = (*store)->FindEnvironment("payments", "prod");
//
// This interface is all that code above the store sees. SQLite implements it
// now; a PostgreSQL implementation for multi-server deployments comes later,
// so nothing here may expose SQLite types or semantics. Every mutating call
// is one transaction: it happens whole or not at all.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "custody/audit/audit.h"
#include "custody/common/result.h"
#include "custody/seal/blob.h"
#include "custody/seal/sealer.h"
#include "custody/policy/engine.h"

namespace custody::core {

struct ProjectRecord {
  int64_t id = 0;
  std::string name;
  int64_t created_at = 0;  // unix seconds
};

struct EnvironmentRecord {
  int64_t id = 0;
  int64_t project_id = 0;
  std::string project;
  std::string name;
};

// A KEK's life: active (new seals use the newest active one); retiring
// (a newer KEK exists, blobs still sealed under this one are being re-sealed);
// destroying (no blob needs it, the token object is being destroyed);
// destroyed (the token object is gone; the record stays as history).
enum class KekState : uint8_t { kActive, kRetiring, kDestroying, kDestroyed };
// The state's word as the store keeps it and people read it ("active"), and
// back. A word no state has parses as kDestroyed: never sealed under.
const char* KekStateName(KekState s);
KekState ParseKekState(std::string_view word);

struct KekRecord {
  int64_t id = 0;
  int64_t project_id = 0;
  KekRef ref;
  std::string label;
  KekState state = KekState::kActive;
  uint64_t encryptions_reserved = 0;
  int64_t created_at = 0;
};

struct SecretVersionRecord {
  uint32_t version = 0;
  int64_t kek_record_id = 0;
  std::vector<uint8_t> blob;  // empty from ListVersions
  int64_t created_at = 0;
  // When a newer version was stored (the start of this one's grace period).
  std::optional<int64_t> superseded_at;
  std::optional<int64_t> revoked_at;
  std::string revoked_reason, revoked_by;
  // The secret's current version (the newest not revoked); 0 if none.
  uint32_t current_version = 0;
};

struct SecretSummary {
  std::string project, environment, name;
  uint32_t latest_version = 0;
  uint32_t version_count = 0;
  int64_t updated_at = 0;
  uint32_t current_version = 0;  // 0: every version is revoked
  int64_t current_since = 0;     // created_at of the current version
  uint32_t revoked_count = 0;
};

// One sealed version for KEK rotation to re-seal.
struct SealedItem {
  int64_t secret_id = 0;
  std::string environment, name;
  uint32_t version = 0;
  std::vector<uint8_t> blob;
};
struct Resealed {
  int64_t secret_id = 0;
  uint32_t version = 0;
  std::vector<uint8_t> blob;
};

struct PolicyRecord {
  uint32_t version = 0;
  std::string sha256;  // hex, of the exact text
  std::string text;
  int64_t applied_at = 0;
  std::string applied_by;  // principal name, or "bootstrap (uid N)"
};

// Usage is counted per project, environment and principal, per UTC day.
struct UsageKey {
  std::string project, environment, principal;
};
enum class UsageEvent : uint8_t { kUnseal, kSeal, kDenied, kRateLimited, kSpendLimited };

struct Admission {
  bool allowed = true;
  std::string limit;              // the limit that refused, for people
  int64_t retry_after_seconds = 0;  // when it refills (rounded up)
};

// Counts gathered in memory (core::UsageBuffer) for one key and UTC day.
struct UsageCount {
  UsageKey key;
  std::string day;             // policy::DayKey
  uint64_t by_event[5] = {};   // indexed by UsageEvent
  int64_t last_use = 0;
};

struct UsageRow {
  std::string project, environment, principal;
  uint64_t unseals = 0, seals = 0, denied = 0, rate_limited = 0, spend_limited = 0;
  uint64_t unseals_today = 0;
  int64_t last_use = 0;
};

// Who holds a store lock: a process on a host. `started` (when the process
// started, in clock ticks since boot) tells a reused pid from the holder;
// `instance` (the kernel's boot id and the pid namespace) tells containers
// that share a host name apart, whose pids mean nothing to each other.
struct LockHolder {
  std::string host;
  int64_t pid = 0;
  int64_t started = 0;
  std::string instance;
  bool operator==(const LockHolder&) const = default;
};

// A store lock that a write must still hold: checked, and renewed, inside
// the write's own transaction, so a run that lost its lock cannot write.
struct LockFence {
  std::string name;
  LockHolder holder;
  int64_t ttl = 0;
};

struct HeldLock {
  std::string name;
  LockHolder holder;
  int64_t expires_at = 0;  // unix seconds
};

// What a GET needs from the store, read in one snapshot.
// A Vault-style access token custody issued (`custody token issue`, cert
// login). The token itself is never stored: rows are keyed by its keyed
// hash (service/access_tokens.h), so a copy of the store cannot be used to
// call custodyd, nor can a writer of the database make a token of its own.
struct AccessTokenRecord {
  std::string accessor;   // public handle (16 hex): lists, audit records, revoke
  std::string principal;  // the policy principal the token speaks for
  std::string issued_by;  // "cert login dns:web.internal", "alice (uid 1000)"
  int64_t issued_at = 0;
  int64_t ttl = 0;             // seconds a renewal extends it by
  int64_t expires_at = 0;      // unix seconds
  int64_t max_expires_at = 0;  // no renewal goes past this
  std::optional<int64_t> revoked_at;
};

struct UnsealInputs {
  EnvironmentRecord env;
  SecretVersionRecord version;  // the current one, or the one asked for
  KekRecord kek;                // the KEK its blob is sealed under
};

// A whole deployment's rows, as `custody store copy` moves them from one
// store to another (Store::Export, Store::Import). Ids are kept so that
// references between rows hold; blobs are sealed bytes, copied as they are.
// The named locks are not part of it (they belong to running processes).
struct SnapshotProject {
  int64_t id = 0;
  std::string name;
  int64_t created_at = 0;

  bool operator==(const SnapshotProject&) const = default;
};
struct SnapshotEnvironment {
  int64_t id = 0, project_id = 0;
  std::string name;
  int64_t created_at = 0;

  bool operator==(const SnapshotEnvironment&) const = default;
};
struct SnapshotKek {
  int64_t id = 0, project_id = 0;
  int64_t version = 0;
  std::vector<uint8_t> token_id;
  std::string label, state;
  int64_t encryptions_reserved = 0;
  int64_t created_at = 0;
  std::optional<std::vector<uint8_t>> material;

  bool operator==(const SnapshotKek&) const = default;
};
struct SnapshotSecret {
  int64_t id = 0, environment_id = 0;
  std::string name;
  int64_t created_at = 0;

  bool operator==(const SnapshotSecret&) const = default;
};
struct SnapshotVersion {
  int64_t secret_id = 0;
  int64_t version = 0;
  int64_t kek_id = 0;
  std::vector<uint8_t> blob;
  int64_t created_at = 0;
  std::optional<int64_t> superseded_at, revoked_at;
  std::optional<std::string> revoked_reason, revoked_by;

  bool operator==(const SnapshotVersion&) const = default;
};
struct SnapshotPolicy {
  int64_t version = 0;
  std::string sha256, text;
  int64_t applied_at = 0;
  std::string applied_by;

  bool operator==(const SnapshotPolicy&) const = default;
};
struct SnapshotUsage {
  std::string project, environment, principal, day;
  int64_t unseals = 0, seals = 0, denied = 0, rate_limited = 0, spend_limited = 0;
  int64_t last_use = 0;

  bool operator==(const SnapshotUsage&) const = default;
};
struct SnapshotBucket {
  std::string key;
  double tokens = 0, updated_at = 0;

  bool operator==(const SnapshotBucket&) const = default;
};
struct SnapshotCheckpoint {
  std::string node;
  int64_t seq = 0;
  std::string covers_hash;
  int64_t created_at = 0;

  bool operator==(const SnapshotCheckpoint&) const = default;
};
struct StoreSnapshot {
  std::vector<SnapshotProject> projects;          // by id
  std::vector<SnapshotEnvironment> environments;  // by id
  std::vector<SnapshotKek> keks;                  // by id
  std::vector<SnapshotSecret> secrets;            // by id
  std::vector<SnapshotVersion> versions;          // by (secret_id, version)
  std::vector<SnapshotPolicy> policies;           // by version
  std::vector<SnapshotUsage> usage;
  std::vector<SnapshotBucket> buckets;
  std::vector<SnapshotCheckpoint> checkpoints;    // by seq

  bool operator==(const StoreSnapshot&) const = default;
};

class Store : public KekUsageLedger, public KekMaterialSource {
 public:
  ~Store() override = default;

  // Creates the project, its first KEK record and its environments at once.
  // kUsage "already exists" if the name is taken.
  // `kek_material` is what the sealer asked to keep with the KEK (empty for
  // PKCS#11; the TPM's sealed object for the TPM backend).
  virtual Result<ProjectRecord> CreateProject(const std::string& name, const std::vector<std::string>& envs,
                                              const KekRef& kek, const std::string& kek_label,
                                              const std::vector<uint8_t>& kek_material = {}) = 0;
  virtual Result<ProjectRecord> FindProject(const std::string& name) = 0;
  virtual Result<std::vector<ProjectRecord>> ListProjects() = 0;

  virtual Result<EnvironmentRecord> CreateEnvironment(const std::string& project, const std::string& env) = 0;
  virtual Result<EnvironmentRecord> FindEnvironment(const std::string& project, const std::string& env) = 0;
  virtual Result<std::vector<EnvironmentRecord>> ListEnvironments(const std::string& project) = 0;

  // The KEK new seals in this project use.
  virtual Result<KekRecord> CurrentKek(int64_t project_id) = 0;
  virtual Result<KekRecord> KekById(int64_t kek_record_id) = 0;
  // A hint from a process that serves GETs for a long time (custodyd): the
  // store may keep what ReadForUnseal returns in memory while it can learn
  // of every change to it, so that a GET costs no round trip to a database
  // server. The SQLite store (a local file, no round trip) ignores it; the
  // PostgreSQL store listens for change notifications (docs/STORE.md).
  virtual void EnableReadCache() {}
  // FindEnvironment, GetVersion and KekById of that version in one read
  // transaction (a GET's whole lookup); the same errors as those three.
  virtual Result<UnsealInputs> ReadForUnseal(const std::string& project, const std::string& env,
                                             const std::string& name, std::optional<uint32_t> version) = 0;
  virtual Result<std::vector<KekRecord>> ListKeks() = 0;
  virtual Result<std::vector<KekRecord>> ProjectKeks(int64_t project_id) = 0;

  // KEK rotation. AddKek records a new KEK version for the project as its
  // only active one; the others become retiring. In one transaction.
  // With a fence, nothing is written (kUnavailable) unless the lock it names
  // is still held by its holder; the lock is renewed for the fence's ttl.
  virtual Result<KekRecord> AddKek(int64_t project_id, const KekRef& kek, const std::string& label, int64_t now,
                                   const std::vector<uint8_t>& material = {}, const LockFence* fence = nullptr) = 0;
  // Up to `limit` versions still sealed under `kek_record_id`, in
  // (secret_id, version) order after `after` (keyset paging: a version that
  // cannot be re-sealed is passed over, not returned again and again).
  virtual Result<std::vector<SealedItem>> SealedUnder(int64_t kek_record_id, std::pair<int64_t, uint32_t> after,
                                                      size_t limit) = 0;
  virtual Result<uint64_t> CountSealedUnder(int64_t kek_record_id) = 0;
  // Swaps re-sealed blobs in, in one transaction. A row counts only if it is
  // still sealed under `from` (a concurrent delete or trim is no error).
  // Returns the rows replaced.
  virtual Result<size_t> ReplaceSealed(int64_t from, int64_t to, const std::vector<Resealed>& items) = 0;
  // retiring -> destroying, only if no blob is sealed under it (checked in
  // the same transaction; kUnavailable otherwise). Other moves: no check.
  virtual Status SetKekState(int64_t kek_record_id, KekState state) = 0;

  // Version numbers: the next one for a secret (1 for a new secret).
  virtual Result<uint32_t> NextVersion(int64_t env_id, const std::string& name) = 0;
  // Adds a version, which becomes current; the version that was current is
  // marked superseded at `now` (its grace period starts). If another writer
  // took `version` first, or KEK rotation retired `kek_record_id` meanwhile,
  // kUnavailable with Error::version_taken(): the caller re-reads the current
  // KEK and re-seals with the next number. Any other failure is not that.
  // `put_key` (not empty: the request's Idempotency-Key) is kept with the
  // version, in the same transaction: if a put with that key already stored
  // a version of this secret, nothing is added and the answer is
  // version_taken too; the caller then finds it with VersionForPutKey.
  virtual Status AddVersion(int64_t env_id, const std::string& name, uint32_t version, int64_t kek_record_id,
                            const std::vector<uint8_t>& blob, int64_t now, const std::string& put_key) = 0;
  Status AddVersion(int64_t env_id, const std::string& name, uint32_t version, int64_t kek_record_id,
                    const std::vector<uint8_t>& blob, int64_t now) {
    return AddVersion(env_id, name, version, kek_record_id, blob, now, "");
  }
  // The version a put with Idempotency-Key `put_key` stored for this secret
  // within the last kPutKeySeconds, or nullopt. (A retry of a put whose
  // answer was lost, through this node or another, is answered with it
  // instead of storing the value twice.)
  static constexpr int64_t kPutKeySeconds = 24 * 3600;
  virtual Result<std::optional<uint32_t>> VersionForPutKey(int64_t env_id, const std::string& name,
                                                           const std::string& put_key, int64_t now) = 0;
  // The current version (the newest not revoked), or `version` if given,
  // whatever its state. kNotFound names what is missing, and says so when
  // every version is revoked.
  virtual Result<SecretVersionRecord> GetVersion(const EnvironmentRecord& env, const std::string& name,
                                                 std::optional<uint32_t> version) = 0;
  // Every stored version, oldest first, without blobs.
  virtual Result<std::vector<SecretVersionRecord>> ListVersions(const EnvironmentRecord& env,
                                                                const std::string& name) = 0;
  // Revokes one version at `now`. If it was current, the newest remaining
  // version becomes current (with a fresh start: no grace clock running).
  // Returns the current version afterwards (0: none). kUsage if it already
  // was revoked.
  virtual Result<uint32_t> RevokeVersion(const EnvironmentRecord& env, const std::string& name, uint32_t version,
                                         const std::string& reason, const std::string& by, int64_t now) = 0;
  // Deletes the named versions' rows and sealed blobs (retention). The
  // current version is never deleted, whatever the list says.
  virtual Result<size_t> TrimVersions(const EnvironmentRecord& env, const std::string& name,
                                      const std::vector<uint32_t>& versions) = 0;
  virtual Result<std::vector<SecretSummary>> ListSecrets(const std::optional<std::string>& project,
                                                         const std::optional<std::string>& env) = 0;
  // Deletes a secret with every version. kNotFound if there is none.
  virtual Status DeleteSecret(const EnvironmentRecord& env, const std::string& name) = 0;

  // The policy in force (the newest applied), or nullopt before the first.
  virtual Result<std::optional<PolicyRecord>> CurrentPolicy() = 0;
  // Only its version (0 before the first): what every custodyd node asks
  // twice a second to notice a policy applied through another node.
  virtual Result<uint32_t> CurrentPolicyVersion() = 0;
  // Stores `text` as the next policy version and puts it in force.
  virtual Result<PolicyRecord> SavePolicy(const std::string& text, const std::string& sha256,
                                          const std::string& applied_by) = 0;

  // In one transaction: checks every rule (rate buckets; for kUnseal also the
  // day and month unseal budgets), and either records the event and the new
  // bucket states, or records the refusal (kRateLimited/kSpendLimited) and
  // says which limit refused and when it refills. One project's keys never
  // touch another's (the rules carry their keys).
  virtual Result<Admission> Admit(const UsageKey& key, const std::vector<policy::LimitRule>& rules,
                                  UsageEvent event, double now) = 0;
  // Records an event that passes no limit (a policy refusal).
  virtual Status Record(const UsageKey& key, UsageEvent event, int64_t now) = 0;
  // Adds counts gathered in memory, all in one transaction.
  virtual Status AddUsage(const std::vector<UsageCount>& counts) = 0;
  // Totals per project, environment and principal (all of them, or one project's).
  virtual Result<std::vector<UsageRow>> Usage(const std::optional<std::string>& project, int64_t now) = 0;

  // The audit log's witness: each signed checkpoint (its seq and the hash it
  // covers) is also kept here, so cutting the log back past a checkpoint is
  // noticed by `audit verify` even if the checkpoint files go too. Kept per
  // node ([node] name): nodes sharing a store each have their own chain and
  // seqs. LastAuditCheckpoint falls back to rows of node '' (written before
  // witnesses had a node: the one host of that time) while `node` has none.
  virtual Status RecordAuditCheckpoint(const std::string& node, uint64_t seq, const std::string& covers_hash) = 0;
  virtual Result<std::optional<std::pair<uint64_t, std::string>>> LastAuditCheckpoint(const std::string& node) = 0;

  // The audit trail, when this store keeps it: PostgreSQL keeps one chain
  // per node beside the state every node shares, so that no acknowledged
  // record depends on one node's disk. nullptr when it does not (SQLite:
  // the file log on the host, as before). `timeout` bounds a batch: past
  // it, the batch fails (its requests are refused) rather than waiting.
  virtual Result<std::unique_ptr<AuditStorage>> OpenAuditStorage(const std::string& node,
                                                                 std::chrono::milliseconds timeout) {
    (void)node;
    (void)timeout;
    return std::unique_ptr<AuditStorage>();
  }

  // Every row of the deployment (StoreSnapshot), read in one consistent
  // snapshot (one read transaction).
  virtual Result<StoreSnapshot> Export() = 0;
  // Writes a snapshot into this store in one transaction, with its ids
  // (later inserts number after them). Refused (kUsage, nothing written) if
  // the store already holds a custody deployment (a project, a KEK or a
  // secret), checked inside that transaction.
  // `progress`, if given, is told (rows of versions written, of all).
  virtual Status Import(const StoreSnapshot& snapshot,
                        const std::function<void(size_t, size_t)>& progress = {}) = 0;

  // Access tokens (AccessTokenRecord), by the hex of their keyed hash.
  // Adding one also forgets tokens that expired or were revoked more than
  // a day before `now`.
  virtual Status AddAccessToken(const std::string& hash, const AccessTokenRecord& token, int64_t now) = 0;
  // kNotFound when no token has that hash (any more).
  virtual Result<AccessTokenRecord> FindAccessToken(const std::string& hash) = 0;
  // Moves a token's expiry (a renewal); kNotFound if it is gone or revoked.
  virtual Status SetAccessTokenExpiry(const std::string& hash, int64_t expires_at) = 0;
  // Revokes the token with `accessor`, or every token of `principal` (one
  // of the two is given): how many were revoked now.
  virtual Result<size_t> RevokeAccessTokens(const std::string& accessor, const std::string& principal,
                                            int64_t now) = 0;
  // Tokens not yet forgotten, newest first.
  virtual Result<std::vector<AccessTokenRecord>> ListAccessTokens() = 0;

  // Exclusive locks on a name, with an expiry, kept in the store so that
  // every process on every host that shares it sees them (one KEK rotation
  // per project). Expiry is measured by the store's own clock (this host's
  // for SQLite, the database server's for PostgreSQL), never the caller's:
  // two hosts whose clocks disagree cannot both hold a lock. Takes `name`
  // for `me` until the store's now + ttl (a ttl <= 0 takes it already
  // expired), unless another holder's lock has not expired and `gone` does
  // not say that holder has ended. Returns that other lock, or nothing once
  // the lock is ours.
  virtual Result<std::optional<HeldLock>> TakeLock(const std::string& name, const LockHolder& me, int64_t ttl,
                                                   const std::function<bool(const LockHolder&)>& gone) = 0;
  // Extends our lock to the store's now + ttl; kUnavailable if it is no
  // longer ours (it expired and another holder took it).
  virtual Status RenewLock(const std::string& name, const LockHolder& me, int64_t ttl) = 0;
  // Lets go of our lock (nothing if it is not ours).
  virtual Status ReleaseLock(const std::string& name, const LockHolder& me) = 0;
};


}  // namespace custody::core
