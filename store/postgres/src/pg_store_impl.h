// The PostgreSQL store's shared parts: the connection pool, statements and
// their parameters, error mapping, the transaction with its bounded retry,
// and the PgStore class whose methods are defined one aggregate per file
// (schema.cc, projects.cc, keks.cc, secrets.cc, policy.cc, limits.cc,
// locks.cc). Private to store/postgres/: nothing outside this folder sees
// libpq.
//
// Concurrency is PostgreSQL's own: READ COMMITTED transactions with row
// locks (SELECT ... FOR UPDATE / FOR SHARE) where a read must hold until the
// write it decides lands, unique constraints where two writers could take
// the same number, and transaction-scoped advisory locks where a decision
// spans rows that may not exist yet (a project's limits). Deadlocks and
// serialization failures are retried a bounded number of times.
#pragma once

#include <libpq-fe.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "custody/store/store.h"

namespace custody::core::pg {

// A SQLSTATE ("23505") packed into Error::code(), and back.
uint64_t PackSqlState(std::string_view state);
bool HasSqlState(const Error& e, std::string_view state);

// One statement's result; owns the PGresult.
class Res {
 public:
  explicit Res(PGresult* r) : r_(r) {}
  Res(Res&& o) noexcept : r_(std::exchange(o.r_, nullptr)) {}
  Res& operator=(Res&&) = delete;
  Res(const Res&) = delete;
  ~Res() { PQclear(r_); }

  PGresult* raw() const { return r_; }
  int rows() const { return PQntuples(r_); }
  // Rows an INSERT, UPDATE or DELETE touched.
  int64_t affected() const;
  bool null(int row, int col) const { return PQgetisnull(r_, row, col) != 0; }
  int64_t Int(int row, int col) const;
  double Double(int row, int col) const;
  std::string Text(int row, int col) const {
    return std::string(PQgetvalue(r_, row, col), static_cast<size_t>(PQgetlength(r_, row, col)));
  }
  // A bytea column (text results carry it as \x and hex).
  std::vector<uint8_t> Bytes(int row, int col) const;

 private:
  PGresult* r_;
};

// A statement's parameters: numbers and names as text, blobs as binary (so
// a sealed blob is never escaped or re-encoded on its way in).
class Params {
 public:
  Params& Add(int64_t v) { return Push(std::to_string(v), false); }
  Params& Add(const std::string& v) { return Push(v, false); }
  Params& Add(double v);
  Params& AddBytes(std::span<const uint8_t> v) { return Push(std::string(v.begin(), v.end()), true); }
  Params& AddNull() {
    values_.emplace_back();
    null_.push_back(true);
    binary_.push_back(false);
    return *this;
  }
  template <typename T>
  Params& AddOptional(const std::optional<T>& v) {
    return v ? Add(*v) : AddNull();
  }
  int size() const { return static_cast<int>(values_.size()); }

 private:
  friend class Session;
  Params& Push(std::string v, bool binary) {
    values_.push_back(std::move(v));
    null_.push_back(false);
    binary_.push_back(binary);
    return *this;
  }
  std::deque<std::string> values_;  // stable addresses while the arrays are built
  std::vector<bool> null_, binary_;
};

// A pooled connection and the statements prepared on it.
struct Conn {
  PGconn* pg = nullptr;
  std::unordered_map<std::string, std::string> prepared;  // SQL text -> statement name
  bool broken = false;  // lost or in an unknown state: closed, never pooled again
  ~Conn() {
    if (pg != nullptr) PQfinish(pg);
  }
};

class PgStore;

// A KEK record from the columns "id, project_id, version, token_id, label,
// encryptions_reserved, created_at, state" starting at column `first`.
KekRecord ReadKek(const Res& r, int row, int first = 0);

// A connection leased from the store's pool for one call, and the calls on
// it. Goes back to the pool when it ends, unless it broke.
class Session {
 public:
  // `relaxed`: a connection whose commits do not wait for the WAL flush
  // (usage counts and limit buckets; see limits.cc).
  explicit Session(PgStore& store, bool relaxed = false);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Whether a connection was had; if not, error() says why.
  bool ok() const { return conn_ != nullptr; }
  const Error& error() const { return *error_; }

  // One statement, prepared once per connection and then only executed: a
  // single round trip.
  Result<Res> Run(const char* sql, const Params& params = {});
  // SQL without parameters through the simple protocol (BEGIN, COMMIT,
  // several statements at once); one round trip.
  Status Exec(const char* sql);
  // COMMIT. If the connection is lost with COMMIT sent, the outcome is
  // unknown: kUnavailable saying so (CommitOutcomeUnknown() is then true).
  Status Commit();
  void Rollback();
  bool CommitOutcomeUnknown() const { return commit_unknown_; }
  // The server process of this connection (to wait for it after a lost COMMIT).
  int backend_pid() const { return PQbackendPID(conn_->pg); }

  Error Fail(const PGresult* r, std::string_view what);

 private:
  PgStore& store_;
  bool relaxed_;
  std::unique_ptr<Conn> conn_;
  std::optional<Error> error_;
  bool commit_unknown_ = false;
};

// What ReadForUnseal returned, kept in this process while a connection of
// its own listens on channel custody_store_changed (schema migration 5):
// any committed change to projects, environments, secrets, versions or KEKs,
// by any process on any host, empties it. Reads use it only while that
// connection is known to stand (a heartbeat every kHeartbeat, answered
// within kHeartbeatAnswer); when it is lost the cache is emptied and unused
// until the connection listens again.
//
// A read that was in flight when a change arrived is not kept (the epoch
// moved since Begin()), so a result from before a change cannot outlive the
// change's notification. What stays: between a change's COMMIT and its
// notification reaching this process (normally well under a millisecond) a
// GET may still be answered from before the change. Writes through this
// process empty the cache before they return (PgStore::InTx).
class ReadCache {
 public:
  explicit ReadCache(PgStore& store);
  ~ReadCache();
  ReadCache(const ReadCache&) = delete;
  ReadCache& operator=(const ReadCache&) = delete;

  struct Ticket {
    uint64_t epoch = 0;
    bool usable = false;
  };
  std::optional<UnsealInputs> Find(const std::string& key);
  // Taken before the statement whose result Keep() may store.
  Ticket Begin();
  void Keep(const Ticket& t, const std::string& key, const UnsealInputs& in);
  // Something changed (a notification, or a write through this process).
  void Changed();

  static constexpr size_t kMaxEntries = 4096;
  static constexpr std::chrono::seconds kHeartbeat{2};
  static constexpr std::chrono::seconds kHeartbeatAnswer{3};

 private:
  void Run();
  // Serves one listening connection until it fails or Stop; false on stop.
  bool Listen(Conn& c);
  void SetListening(bool on);
  bool WaitStop(std::chrono::milliseconds d);

  PgStore& store_;
  std::mutex mu_;
  std::unordered_map<std::string, UnsealInputs> entries_;
  bool listening_ = false;
  uint64_t epoch_ = 0;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  int wake_[2] = {-1, -1};  // a pipe: Stop() wakes the listener's poll()
  std::thread thread_;
};

class PgStore final : public Store {
 public:
  PgStore(std::string url, std::string where) : url_(std::move(url)), where_(std::move(where)) {}
  ~PgStore() override = default;

  // schema.cc
  Status Init(bool create);

  // projects.cc
  Result<ProjectRecord> CreateProject(const std::string& name, const std::vector<std::string>& envs,
                                      const KekRef& kek, const std::string& kek_label,
                                      const std::vector<uint8_t>& kek_material) override;
  Result<ProjectRecord> FindProject(const std::string& name) override;
  Result<std::vector<ProjectRecord>> ListProjects() override;
  Result<EnvironmentRecord> CreateEnvironment(const std::string& project, const std::string& env) override;
  Result<EnvironmentRecord> FindEnvironment(const std::string& project, const std::string& env) override;
  Result<std::vector<EnvironmentRecord>> ListEnvironments(const std::string& project) override;

  // keks.cc
  Result<KekRecord> CurrentKek(int64_t project_id) override;
  Result<KekRecord> KekById(int64_t id) override;
  Result<std::vector<KekRecord>> ListKeks() override;
  Result<std::vector<KekRecord>> ProjectKeks(int64_t project_id) override;
  Result<std::vector<uint8_t>> KekMaterial(const KekRef& kek) override;
  Result<KekRecord> AddKek(int64_t project_id, const KekRef& kek, const std::string& label, int64_t now,
                           const std::vector<uint8_t>& material, const LockFence* fence) override;
  Result<std::vector<SealedItem>> SealedUnder(int64_t kek_record_id, std::pair<int64_t, uint32_t> after,
                                              size_t limit) override;
  Result<uint64_t> CountSealedUnder(int64_t kek_record_id) override;
  Result<size_t> ReplaceSealed(int64_t from, int64_t to, const std::vector<Resealed>& items) override;
  Status SetKekState(int64_t kek_record_id, KekState state) override;
  Status Reserve(const KekRef& kek, uint64_t n, uint64_t limit) override;

  // secrets.cc
  Result<UnsealInputs> ReadForUnseal(const std::string& project, const std::string& env, const std::string& name,
                                     std::optional<uint32_t> version) override;
  Result<uint32_t> NextVersion(int64_t env_id, const std::string& name) override;
  using Store::AddVersion;
  Status AddVersion(int64_t env_id, const std::string& name, uint32_t version, int64_t kek_record_id,
                    const std::vector<uint8_t>& blob, int64_t now, const std::string& put_key) override;
  Result<std::optional<uint32_t>> VersionForPutKey(int64_t env_id, const std::string& name, const std::string& put_key,
                                                   int64_t now) override;
  Result<SecretVersionRecord> GetVersion(const EnvironmentRecord& env, const std::string& name,
                                         std::optional<uint32_t> version) override;
  Result<std::vector<SecretVersionRecord>> ListVersions(const EnvironmentRecord& env, const std::string& name) override;
  Result<uint32_t> RevokeVersion(const EnvironmentRecord& env, const std::string& name, uint32_t version,
                                 const std::string& reason, const std::string& by, int64_t now) override;
  Result<size_t> TrimVersions(const EnvironmentRecord& env, const std::string& name,
                              const std::vector<uint32_t>& versions) override;
  Result<std::vector<SecretSummary>> ListSecrets(const std::optional<std::string>& project,
                                                 const std::optional<std::string>& env) override;
  Status DeleteSecret(const EnvironmentRecord& env, const std::string& name) override;

  // policy.cc
  Result<std::optional<PolicyRecord>> CurrentPolicy() override;
  Result<uint32_t> CurrentPolicyVersion() override;
  Result<PolicyRecord> SavePolicy(const std::string& text, const std::string& sha256,
                                  const std::string& applied_by) override;
  Status RecordAuditCheckpoint(const std::string& node, uint64_t seq, const std::string& covers_hash) override;
  Result<std::optional<std::pair<uint64_t, std::string>>> LastAuditCheckpoint(const std::string& node) override;

  // audit.cc
  Result<std::unique_ptr<AuditStorage>> OpenAuditStorage(const std::string& node,
                                                         std::chrono::milliseconds timeout) override;

  // limits.cc
  Result<Admission> Admit(const UsageKey& key, const std::vector<policy::LimitRule>& rules, UsageEvent event,
                          double now) override;
  Status Record(const UsageKey& key, UsageEvent event, int64_t now) override;
  Status AddUsage(const std::vector<UsageCount>& counts) override;
  Result<std::vector<UsageRow>> Usage(const std::optional<std::string>& project, int64_t now) override;

  // copy.cc
  Result<StoreSnapshot> Export() override;
  Status Import(const StoreSnapshot& snapshot, const std::function<void(size_t, size_t)>& progress) override;

  // locks.cc
  Result<std::optional<HeldLock>> TakeLock(const std::string& name, const LockHolder& me, int64_t ttl,
                                           const std::function<bool(const LockHolder&)>& gone) override;
  Status RenewLock(const std::string& name, const LockHolder& me, int64_t ttl) override;
  Status ReleaseLock(const std::string& name, const LockHolder& me) override;
  Status AddAccessToken(const std::string& hash, const AccessTokenRecord& token, int64_t now) override;
  Result<AccessTokenRecord> FindAccessToken(const std::string& hash) override;
  Status SetAccessTokenExpiry(const std::string& hash, int64_t expires_at) override;
  Result<size_t> RevokeAccessTokens(const std::string& accessor, const std::string& principal, int64_t now) override;
  Result<std::vector<AccessTokenRecord>> ListAccessTokens() override;

  void EnableReadCache() override;

  const std::string& where() const { return where_; }
  // A connection of its own, outside the pool (the audit writer's).
  Result<std::unique_ptr<Conn>> OpenConnection() { return Open(false); }

  // Runs `body` in one transaction on one leased connection: BEGIN
  // (`begin` may add SET LOCAL statements), the body, COMMIT; ROLLBACK on
  // any error. A deadlock or serialization failure (which PostgreSQL
  // resolves by aborting one of the transactions) runs the whole
  // transaction again, at most kTries times with a short growing pause.
  // `lost_commit`, if given, is set when the answer to COMMIT was lost.
  template <typename T>
  Result<T> InTx(const std::function<Result<T>(Session&)>& body, bool relaxed = false,
                 const char* begin = "BEGIN", bool* lost_commit = nullptr);

 private:
  friend class Session;
  // The lock renewal inside a transaction: RenewLock, and AddKek's fence.
  Status RenewHere(Session& s, const std::string& name, const LockHolder& me, int64_t ttl);
  Result<int64_t> ProjectId(Session& s, const std::string& name);
  Result<int64_t> SecretIdIn(Session& s, const EnvironmentRecord& env, const std::string& name, bool lock);
  Result<EnvironmentRecord> FindEnvironmentOn(Session& s, const std::string& project, const std::string& env);
  Result<SecretVersionRecord> GetVersionOn(Session& s, const EnvironmentRecord& env, const std::string& name,
                                           std::optional<uint32_t> version);
  Status RecordOn(Session& s, const UsageKey& key, UsageEvent event, int64_t now);
  // After a COMMIT whose answer was lost: waits (bounded) until the server
  // process that ran it is gone, then asks `landed` on a new connection.
  // true/false once known; kUnavailable "outcome unknown" otherwise.
  Result<bool> ResolveLostCommit(int backend_pid, const std::function<Result<bool>(Session&)>& landed);

  // The pool. Connections are opened on demand up to kMaxConnections (a
  // bound, so that N nodes cannot exhaust the server's max_connections);
  // a caller past it waits up to kLeaseWait for one to come back.
  static constexpr size_t kMaxConnections = 32;
  static constexpr std::chrono::seconds kLeaseWait{10};
  Result<std::unique_ptr<Conn>> Open(bool relaxed);
  std::mutex pool_mu_;
  std::condition_variable pool_cv_;
  std::vector<std::unique_ptr<Conn>> free_, relaxed_free_;
  size_t open_ = 0;

  std::string url_;    // as configured (no password: refused at load)
  std::string where_;  // host and database, for messages
  // Last: stopped (its thread joined) before anything it uses goes.
  std::unique_ptr<ReadCache> cache_;
};

template <typename T>
Result<T> PgStore::InTx(const std::function<Result<T>(Session&)>& body, bool relaxed, const char* begin,
                        bool* lost_commit) {
  constexpr int kTries = 5;
  for (int attempt = 1;; ++attempt) {
    Session s(*this, relaxed);
    if (!s.ok()) return s.error();
    CUSTODY_RETURN_IF_ERROR(s.Exec(begin));
    Result<T> r = body(s);
    std::optional<Error> err;
    if (r.ok()) {
      Status c = s.Commit();
      // Whatever it wrote is not read from this process's cache again (a
      // lost COMMIT may have landed too).
      if (!relaxed && cache_ && (c.ok() || s.CommitOutcomeUnknown())) cache_->Changed();
      if (c.ok()) return r;
      err = std::move(c).error();
      if (s.CommitOutcomeUnknown()) {
        if (lost_commit != nullptr) *lost_commit = true;
        return std::move(*err);
      }
    } else {
      err = std::move(r).error();
      s.Rollback();
    }
    const bool retry = HasSqlState(*err, "40001") || HasSqlState(*err, "40P01");
    if (!retry || attempt == kTries) return std::move(*err);
    std::this_thread::sleep_for(std::chrono::milliseconds(5 * attempt * attempt));
  }
}

}  // namespace custody::core::pg
