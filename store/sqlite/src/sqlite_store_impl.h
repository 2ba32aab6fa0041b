// The SQLite store's shared parts: the pooled connection and its statement
// cache, the transaction, and the SqliteStore class whose methods are
// defined one aggregate per file (schema.cc, projects.cc, keks.cc,
// secrets.cc, limits.cc, locks.cc, policy.cc; the pool and the transaction in
// connection.cc). Private to store/sqlite/: nothing outside this folder sees
// SQLite, so a second implementation (PostgreSQL) changes nothing above
// store/.
#pragma once

#include <sys/stat.h>

#include <sqlite3.h>

#include <cstdint>
#include <ctime>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "custody/store/store.h"

namespace custody::core::sqlite {

inline int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }

// A pooled connection and its prepared statements. Statements are prepared
// once per connection and reused (reset, bindings cleared): re-parsing SQL
// on every request was a large share of a busy server's CPU.
struct Conn {
  sqlite3* db = nullptr;
  struct Cached {
    sqlite3_stmt* stmt = nullptr;
    bool in_use = false;
  };
  std::unordered_map<std::string, Cached> cache;
  ~Conn() {
    for (auto& [sql, c] : cache) sqlite3_finalize(c.stmt);
    sqlite3_close_v2(db);
  }
};

// The connection the current thread has leased from its store.
inline constinit thread_local Conn* tls_conn = nullptr;

class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) {
    if (tls_conn != nullptr && tls_conn->db == db) {
      auto& c = tls_conn->cache[sql];
      if (c.stmt != nullptr && !c.in_use) {
        s_ = c.stmt;
        c.in_use = true;
        cached_ = &c;
        rc_ = SQLITE_OK;
        return;
      }
      if (c.stmt == nullptr) {
        rc_ = sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &s_, nullptr);
        if (rc_ == SQLITE_OK) {
          c.stmt = s_;
          c.in_use = true;
          cached_ = &c;
        }
        return;
      }
    }
    rc_ = sqlite3_prepare_v2(db, sql, -1, &s_, nullptr);
  }
  ~Stmt() {
    if (cached_ != nullptr) {
      sqlite3_reset(s_);
      sqlite3_clear_bindings(s_);
      cached_->in_use = false;
    } else {
      sqlite3_finalize(s_);
    }
  }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  bool prepared() const { return rc_ == SQLITE_OK; }
  int prepare_rc() const { return rc_; }
  Stmt& Bind(int i, int64_t v) { sqlite3_bind_int64(s_, i, v); return *this; }
  Stmt& Bind(int i, const std::string& v) {
    sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Bind(int i, std::span<const uint8_t> v) {
    sqlite3_bind_blob(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  int Step() { return sqlite3_step(s_); }
  sqlite3_stmt* raw() { return s_; }
  int64_t Int(int c) const { return sqlite3_column_int64(s_, c); }
  std::string Text(int c) const {
    auto* p = sqlite3_column_text(s_, c);
    return p ? std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(sqlite3_column_bytes(s_, c))) : "";
  }
  std::vector<uint8_t> Blob(int c) const {
    auto* p = static_cast<const uint8_t*>(sqlite3_column_blob(s_, c));
    return p ? std::vector<uint8_t>(p, p + sqlite3_column_bytes(s_, c)) : std::vector<uint8_t>{};
  }

 private:
  sqlite3_stmt* s_ = nullptr;
  int rc_;
  Conn::Cached* cached_ = nullptr;
};

class SqliteStore;

// One transaction on the connection this thread leases (declare it after
// the Lease, so it ends before the connection goes back to the pool). It
// ends exactly once: Commit(), or ROLLBACK from the destructor on every
// other path, so no early return can leave a transaction open on a pooled
// connection or the store's write mutex held.
//
//   CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
//   ... return Fail(rc, "...");   // rolled back
//   return tx.Commit();
class Transaction {
 public:
  enum Mode {
    // BEGIN (deferred): a snapshot for reads that must agree with each
    // other; no write lock, and other readers and the writer go on.
    kRead,
    // BEGIN IMMEDIATE, after the store's write mutex: see Begin.
    kWrite,
  };
  static Result<Transaction> Begin(SqliteStore& store, Mode mode);

  Transaction(Transaction&& other) noexcept
      : store_(std::exchange(other.store_, nullptr)), conn_(other.conn_), mode_(other.mode_) {}
  Transaction& operator=(Transaction&&) = delete;
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction();

  // COMMIT; if that fails, ROLLBACK (the error is the COMMIT's). Either way
  // the transaction is over and a write one lets the write mutex go.
  Status Commit();

 private:
  Transaction(SqliteStore& store, Mode mode) : store_(&store), conn_(tls_conn), mode_(mode) {}
  // Runs `sql` (none after a COMMIT that worked), lets the write mutex go,
  // and marks the transaction over.
  void End(const char* sql);

  SqliteStore* store_;                // null once ended, or moved from
  [[maybe_unused]] Conn* conn_;       // the connection it began on (checked in debug builds)
  Mode mode_;
};

class SqliteStore final : public Store {
 public:
  SqliteStore(sqlite3* db, std::string path) : path_(std::move(path)) {
    auto c = std::make_unique<Conn>();
    c->db = db;
    free_.push_back(std::move(c));
  }
  ~SqliteStore() override = default;

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

 private:
  friend class Transaction;

  // The same reads on the connection this thread already holds (inside
  // ReadForUnseal's transaction).
  Result<EnvironmentRecord> FindEnvironmentHeld(const std::string& project, const std::string& env);
  Result<KekRecord> KekByIdHeld(int64_t id);
  Result<SecretVersionRecord> GetVersionHeld(const EnvironmentRecord& env, const std::string& name,
                                             std::optional<uint32_t> version);
  Result<int64_t> ProjectId(const std::string& name);
  Result<int64_t> SecretId(int64_t env_id, const std::string& name);
  // SecretId, with a kNotFound that names project/environment/secret.
  Result<int64_t> SecretIdIn(const EnvironmentRecord& env, const std::string& name);
  // A usage event inside the caller's transaction (Record, Admit).
  Status RecordLocked(const UsageKey& key, UsageEvent event, int64_t now);
  // The lock renewal on this thread's connection (inside its transaction,
  // if one is open): RenewLock, and AddKek's fence.
  Status RenewHere(const std::string& name, const LockHolder& me, int64_t until);

  // Maps a SQLite result code to the error a user can act on.
  Error Fail(int rc, std::string_view what) const;
  // Runs SQL: one statement through the statement cache, several (the
  // migrations) through sqlite3_exec.
  Status Exec(const char* sql, bool single = true);

  // Writers of this process take turns on write_mu_ before BEGIN IMMEDIATE
  // (Transaction::Begin says why). tls_writer is the store whose write_mu_
  // this thread holds, so the mutex is let go only by the thread that took
  // it, and only once.
  void EndWrite();
  static thread_local const SqliteStore* tls_writer;
  std::mutex write_mu_;

  // A connection per concurrent caller, from a small pool: SQLite
  // connections are not shared between threads, and one shared connection
  // behind a mutex would serialise every reader of a busy server. WAL lets
  // the readers run side by side; writers take turns through BEGIN
  // IMMEDIATE and the busy timeout.
  //
  // Usage counts and limit buckets are written on `relaxed` connections,
  // opened with synchronous=NORMAL and never used for anything else, so a
  // charge per request needs no PRAGMA round trips and custody data can
  // never be written at the relaxed level by mistake.
  class Lease {
   public:
    explicit Lease(SqliteStore& s, bool relaxed = false);
    ~Lease();
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    bool ok() const { return conn_ != nullptr; }
    // Why there is no connection (ok() false).
    Error error() const;

   private:
    std::optional<Error> error_;
    SqliteStore& s_;
    Conn* prev_;
    bool relaxed_;
    std::unique_ptr<Conn> conn_;
  };
  // The connection of the Lease this thread holds.
  static sqlite3* db() { return tls_conn->db; }
  std::unique_ptr<Conn> OpenConnection(bool relaxed);

  std::mutex pool_mu_;
  std::vector<std::unique_ptr<Conn>> free_, relaxed_free_;
  std::string path_;

 public:
  // The file this store opened, by device and inode (OpenSqliteStore).
  void PinFile(dev_t dev, ino_t ino) {
    dev_ = dev;
    ino_ = ino;
    pinned_ = true;
  }

 private:
  // Whether the file at path_ is still the one opened. A store deleted or
  // replaced under a running process would otherwise go on being read and
  // written through the open descriptors, and every write would be lost
  // with the unlinked inode: refused instead, until the file is back.
  std::optional<Error> CheckFile() const;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  bool pinned_ = false;
};

}  // namespace custody::core::sqlite
