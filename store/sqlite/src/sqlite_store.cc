// SQLite implementation of core::Store. Nothing outside this file sees SQLite.
#include <sqlite3.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <mutex>
#include <string>
#include <unordered_map>

#include "custody/policy/limits.h"
#include "custody/store/sqlite_store.h"
#include "custody/store/store.h"

namespace custody::core {
namespace {

// 'CSTD': marks a SQLite file as a custody store, so a stray database is
// refused instead of being migrated.
constexpr int kApplicationId = 0x43535444;

// Schema migrations, applied in order; PRAGMA user_version counts how many
// have run. Append only: never edit a released step.
constexpr const char* kMigrations[] = {
    R"sql(
CREATE TABLE projects (
  id         INTEGER PRIMARY KEY,
  name       TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL
);
CREATE TABLE environments (
  id         INTEGER PRIMARY KEY,
  project_id INTEGER NOT NULL REFERENCES projects(id),
  name       TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  UNIQUE (project_id, name)
);
CREATE TABLE keks (
  id                   INTEGER PRIMARY KEY,
  project_id           INTEGER NOT NULL REFERENCES projects(id),
  version              INTEGER NOT NULL,
  token_id             BLOB NOT NULL UNIQUE,
  label                TEXT NOT NULL,
  state                TEXT NOT NULL DEFAULT 'active',
  encryptions_reserved INTEGER NOT NULL DEFAULT 0,
  created_at           INTEGER NOT NULL,
  UNIQUE (project_id, version)
);
CREATE TABLE secrets (
  id             INTEGER PRIMARY KEY,
  environment_id INTEGER NOT NULL REFERENCES environments(id),
  name           TEXT NOT NULL,
  created_at     INTEGER NOT NULL,
  UNIQUE (environment_id, name)
);
CREATE TABLE secret_versions (
  secret_id  INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
  version    INTEGER NOT NULL,
  kek_id     INTEGER NOT NULL REFERENCES keks(id),
  blob       BLOB NOT NULL,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (secret_id, version)
);
)sql",
    // 2: policies, usage accounting, rate-limit buckets.
    R"sql(
CREATE TABLE policies (
  version    INTEGER PRIMARY KEY,
  sha256     TEXT NOT NULL,
  text       TEXT NOT NULL,
  applied_at INTEGER NOT NULL,
  applied_by TEXT NOT NULL
);
CREATE TABLE usage (
  project       TEXT NOT NULL,
  environment   TEXT NOT NULL,
  principal     TEXT NOT NULL,
  day           TEXT NOT NULL,
  unseals       INTEGER NOT NULL DEFAULT 0,
  seals         INTEGER NOT NULL DEFAULT 0,
  denied        INTEGER NOT NULL DEFAULT 0,
  rate_limited  INTEGER NOT NULL DEFAULT 0,
  spend_limited INTEGER NOT NULL DEFAULT 0,
  last_use      INTEGER NOT NULL,
  PRIMARY KEY (project, environment, principal, day)
);
CREATE TABLE buckets (
  key        TEXT PRIMARY KEY,
  tokens     REAL NOT NULL,
  updated_at REAL NOT NULL
);
)sql",
    // 3: the audit log's checkpoint witness.
    R"sql(
CREATE TABLE audit_checkpoints (
  seq         INTEGER PRIMARY KEY,
  covers_hash TEXT NOT NULL,
  created_at  INTEGER NOT NULL
);
)sql",
    // 4: version states (rotation, revocation) and KEK rotation's lookups.
    // Versions stored before: each older one was superseded when the next
    // was stored.
    R"sql(
ALTER TABLE secret_versions ADD COLUMN superseded_at INTEGER;
ALTER TABLE secret_versions ADD COLUMN revoked_at INTEGER;
ALTER TABLE secret_versions ADD COLUMN revoked_reason TEXT;
ALTER TABLE secret_versions ADD COLUMN revoked_by TEXT;
CREATE INDEX secret_versions_by_kek ON secret_versions(kek_id, secret_id, version);
UPDATE secret_versions SET superseded_at = (
  SELECT min(n.created_at) FROM secret_versions n
  WHERE n.secret_id = secret_versions.secret_id AND n.version > secret_versions.version);
)sql",
    // 5: backend material kept with a KEK (the TPM backend's sealed object).
    R"sql(
ALTER TABLE keks ADD COLUMN material BLOB;
)sql",
    // 6: named locks with an expiry (one KEK rotation per project, across
    // every host that shares the store).
    R"sql(
CREATE TABLE locks (
  name           TEXT PRIMARY KEY,
  holder_host    TEXT NOT NULL,
  holder_pid     INTEGER NOT NULL,
  holder_started INTEGER NOT NULL,
  holder_instance TEXT NOT NULL,
  expires_at     INTEGER NOT NULL
);
)sql",
};

int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }

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
thread_local Conn* tls_conn = nullptr;

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

class SqliteStore final : public Store {
 public:
  SqliteStore(sqlite3* db, std::string path) : path_(std::move(path)) {
    auto c = std::make_unique<Conn>();
    c->db = db;
    free_.push_back(std::move(c));
  }
  ~SqliteStore() override = default;

  Status Init(bool create);

  Result<ProjectRecord> CreateProject(const std::string& name, const std::vector<std::string>& envs,
                                      const KekRef& kek, const std::string& kek_label,
                                      const std::vector<uint8_t>& kek_material) override;
  Result<std::vector<uint8_t>> KekMaterial(const KekRef& kek) override;
  Result<ProjectRecord> FindProject(const std::string& name) override;
  Result<std::vector<ProjectRecord>> ListProjects() override;
  Result<EnvironmentRecord> CreateEnvironment(const std::string& project, const std::string& env) override;
  Result<EnvironmentRecord> FindEnvironment(const std::string& project, const std::string& env) override;
  Result<std::vector<EnvironmentRecord>> ListEnvironments(const std::string& project) override;
  Result<KekRecord> CurrentKek(int64_t project_id) override;
  Result<KekRecord> KekById(int64_t id) override;
  Result<UnsealInputs> ReadForUnseal(const std::string& project, const std::string& env, const std::string& name,
                                     std::optional<uint32_t> version) override;
  // The same reads on the connection this thread already holds.
  Result<EnvironmentRecord> FindEnvironmentHeld(const std::string& project, const std::string& env);
  Result<KekRecord> KekByIdHeld(int64_t id);
  Result<SecretVersionRecord> GetVersionHeld(const EnvironmentRecord& env, const std::string& name,
                                             std::optional<uint32_t> version);
  Result<std::vector<KekRecord>> ListKeks() override;
  Result<std::vector<KekRecord>> ProjectKeks(int64_t project_id) override;
  Result<KekRecord> AddKek(int64_t project_id, const KekRef& kek, const std::string& label, int64_t now,
                           const std::vector<uint8_t>& material, const LockFence* fence) override;
  Result<std::vector<SealedItem>> SealedUnder(int64_t kek_record_id, std::pair<int64_t, uint32_t> after,
                                              size_t limit) override;
  Result<uint64_t> CountSealedUnder(int64_t kek_record_id) override;
  Result<size_t> ReplaceSealed(int64_t from, int64_t to, const std::vector<Resealed>& items) override;
  Status SetKekState(int64_t kek_record_id, KekState state) override;
  Result<uint32_t> NextVersion(int64_t env_id, const std::string& name) override;
  Status AddVersion(int64_t env_id, const std::string& name, uint32_t version, int64_t kek_record_id,
                    const std::vector<uint8_t>& blob, int64_t now) override;
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
  Status Reserve(const KekRef& kek, uint64_t n, uint64_t limit) override;
  Result<std::optional<PolicyRecord>> CurrentPolicy() override;
  Result<PolicyRecord> SavePolicy(const std::string& text, const std::string& sha256,
                                  const std::string& applied_by) override;
  Result<Admission> Admit(const UsageKey& key, const std::vector<policy::LimitRule>& rules, UsageEvent event,
                          double now) override;
  Status Record(const UsageKey& key, UsageEvent event, int64_t now) override;
  Status AddUsage(const std::vector<UsageCount>& counts) override;
  Result<std::vector<UsageRow>> Usage(const std::optional<std::string>& project, int64_t now) override;
  Status RecordAuditCheckpoint(uint64_t seq, const std::string& covers_hash) override;
  Result<std::optional<HeldLock>> TakeLock(const std::string& name, const LockHolder& me, int64_t now, int64_t ttl,
                                           const std::function<bool(const LockHolder&)>& gone) override;
  Status RenewLock(const std::string& name, const LockHolder& me, int64_t now, int64_t ttl) override;
  Status ReleaseLock(const std::string& name, const LockHolder& me) override;
  Result<std::optional<std::pair<uint64_t, std::string>>> LastAuditCheckpoint() override;

 private:
  Status RecordLocked(const UsageKey& key, UsageEvent event, int64_t now);
  // Maps a SQLite result code to the error a user can act on.
  Error Fail(int rc, std::string_view what) const {
    std::string msg = "store " + path_ + ": " + std::string(what) + ": " + sqlite3_errstr(rc);
    int primary = rc & 0xff;
    Category c = Category::kInternal;
    if (primary == SQLITE_NOTADB || primary == SQLITE_CORRUPT) {
      c = Category::kIntegrity;
      msg = "store " + path_ + " is corrupt or not a custody store (" + sqlite3_errstr(rc) + ")";
    } else if (primary == SQLITE_READONLY || primary == SQLITE_CANTOPEN || primary == SQLITE_PERM ||
               primary == SQLITE_IOERR || primary == SQLITE_FULL || primary == SQLITE_BUSY ||
               primary == SQLITE_LOCKED || primary == SQLITE_AUTH) {
      c = Category::kUnavailable;
    }
    return Error(c, std::move(msg), Backend::kStore, static_cast<uint64_t>(rc));
  }
  // The lock renewal on this thread's connection (inside its transaction,
  // if one is open): RenewLock, and AddKek's fence.
  Status RenewHere(const std::string& name, const LockHolder& me, int64_t until);
  // Runs SQL: one statement through the statement cache, several (the
  // migrations) through sqlite3_exec.
  Status Exec(const char* sql, bool single = true) {
    if (single) {
      Stmt st(db(), sql);
      int rc = st.prepared() ? st.Step() : st.prepare_rc();
      if (rc != SQLITE_DONE && rc != SQLITE_ROW && rc != SQLITE_OK) return Fail(rc, "executing statement");
      return Status::Ok();
    }
    char* err = nullptr;
    int rc = sqlite3_exec(db(), sql, nullptr, nullptr, &err);
    sqlite3_free(err);
    if (rc != SQLITE_OK) return Fail(rc, "executing statement");
    return Status::Ok();
  }
  // BEGIN IMMEDIATE takes the write lock up front, so two writers never
  // deadlock upgrading a read lock.
  //
  // Writers of this process also take turns on write_mu_ first. Without it,
  // threads contending for SQLite's write lock meet its busy handler, which
  // sleeps 1, 2, 5, 10 ... ms between tries: under a busy server that sleep,
  // not the work, set the latency. Other processes still wait through the
  // busy timeout.
  Status Begin() {
    write_mu_.lock();
    tls_writer = this;
    Status s = Exec("BEGIN IMMEDIATE");
    if (!s.ok()) EndWrite();
    return s;
  }
  void Rollback() {
    (void)Exec("ROLLBACK");
    EndWrite();
  }
  Status Commit() {
    Status s = Exec("COMMIT");
    if (!s.ok()) (void)Exec("ROLLBACK");
    EndWrite();
    return s;
  }
  void EndWrite() {
    if (tls_writer != this) return;  // not in a transaction of ours
    tls_writer = nullptr;
    write_mu_.unlock();
  }
  static thread_local const SqliteStore* tls_writer;
  std::mutex write_mu_;
  Result<int64_t> ProjectId(const std::string& name);
  Result<int64_t> SecretId(int64_t env_id, const std::string& name);

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
    explicit Lease(SqliteStore& s, bool relaxed = false) : s_(s), prev_(tls_conn), relaxed_(relaxed) {
      auto& pool = relaxed_ ? s_.relaxed_free_ : s_.free_;
      {
        std::lock_guard lock(s_.pool_mu_);
        if (!pool.empty()) {
          conn_ = std::move(pool.back());
          pool.pop_back();
        }
      }
      if (!conn_) conn_ = s_.OpenConnection(relaxed_);
      tls_conn = conn_.get();
    }
    ~Lease() {
      tls_conn = prev_;
      if (!conn_) return;
      std::lock_guard lock(s_.pool_mu_);
      (relaxed_ ? s_.relaxed_free_ : s_.free_).push_back(std::move(conn_));
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    bool ok() const { return conn_ != nullptr; }

   private:
    SqliteStore& s_;
    Conn* prev_;
    bool relaxed_;
    std::unique_ptr<Conn> conn_;
  };
  // The connection of the Lease this thread holds.
  static sqlite3* db() { return tls_conn->db; }
  std::unique_ptr<Conn> OpenConnection(bool relaxed) {
    auto c = std::make_unique<Conn>();
    if (sqlite3_open_v2(path_.c_str(), &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr) != SQLITE_OK) {
      return nullptr;
    }
    sqlite3_busy_timeout(c->db, 5000);
    sqlite3_extended_result_codes(c->db, 1);
    // secure_delete: see Init.
    const char* pragmas = relaxed ? "PRAGMA foreign_keys=ON; PRAGMA secure_delete=ON; PRAGMA synchronous=NORMAL"
                                  : "PRAGMA foreign_keys=ON; PRAGMA secure_delete=ON; PRAGMA synchronous=FULL";
    if (sqlite3_exec(c->db, pragmas, nullptr, nullptr, nullptr) != SQLITE_OK) return nullptr;
    return c;
  }

  std::mutex pool_mu_;
  std::vector<std::unique_ptr<Conn>> free_, relaxed_free_;
  std::string path_;
};

thread_local const SqliteStore* SqliteStore::tls_writer = nullptr;

Status SqliteStore::Init(bool create) {
  Lease lease(*this);
  sqlite3_busy_timeout(db(), 5000);
  sqlite3_extended_result_codes(db(), 1);
  {
    Stmt s(db(), "PRAGMA application_id");
    if (!s.prepared()) return Fail(s.prepare_rc(), "reading header");
    int rc = s.Step();
    if (rc != SQLITE_ROW) return Fail(rc, "reading header");
    int64_t app = s.Int(0);
    Stmt t(db(), "SELECT count(*) FROM sqlite_master");
    if (!t.prepared()) return Fail(t.prepare_rc(), "reading schema");
    if (t.Step() != SQLITE_ROW) return Fail(SQLITE_CORRUPT, "reading schema");
    if (app != kApplicationId && t.Int(0) > 0) {
      return Error(Category::kIntegrity, "store " + path_ + " is a SQLite database but not a custody store; refusing to touch it");
    }
    if (app != kApplicationId && !create) {
      return Error(Category::kNotFound, "store " + path_ + " is empty; run 'custody init' first");
    }
  }
  // WAL lets readers proceed during a write; synchronous=FULL makes every
  // commit durable before the call returns.
  CUSTODY_RETURN_IF_ERROR(Exec("PRAGMA journal_mode=WAL"));
  CUSTODY_RETURN_IF_ERROR(Exec("PRAGMA synchronous=FULL"));
  CUSTODY_RETURN_IF_ERROR(Exec("PRAGMA foreign_keys=ON"));
  // Deleted and overwritten values are zeroed in their pages, not left in
  // free space: a destroyed KEK's TPM material could otherwise be loaded
  // again from a copy of the file. Per connection, like the two above.
  CUSTODY_RETURN_IF_ERROR(Exec("PRAGMA secure_delete=ON"));

  Stmt v(db(), "PRAGMA user_version");
  if (!v.prepared() || v.Step() != SQLITE_ROW) return Fail(SQLITE_CORRUPT, "reading schema version");
  int64_t have = v.Int(0);
  const int64_t want = static_cast<int64_t>(std::size(kMigrations));
  if (have > want) {
    return Error(Category::kConfig, "store " + path_ + " has schema version " + std::to_string(have) +
                                        ", newer than this custody understands (" + std::to_string(want) +
                                        "); upgrade custody");
  }
  for (int64_t i = have; i < want; ++i) {
    CUSTODY_RETURN_IF_ERROR(Begin());
    Status s = Exec(kMigrations[i], /*single=*/false);
    if (s.ok()) s = Exec(("PRAGMA user_version=" + std::to_string(i + 1)).c_str());
    if (s.ok()) s = Exec(("PRAGMA application_id=" + std::to_string(kApplicationId)).c_str());
    if (!s.ok()) {
      Rollback();
      return s;
    }
    CUSTODY_RETURN_IF_ERROR(Commit());
  }
  return Status::Ok();
}

Result<int64_t> SqliteStore::ProjectId(const std::string& name) {
  Stmt s(db(), "SELECT id FROM projects WHERE name = ?");
  s.Bind(1, name);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return s.Int(0);
  if (rc == SQLITE_DONE) return Error(Category::kNotFound, "project '" + name + "' does not exist");
  return Fail(rc, "finding project");
}

Result<ProjectRecord> SqliteStore::CreateProject(const std::string& name, const std::vector<std::string>& envs,
                                                 const KekRef& kek, const std::string& kek_label,
                                                 const std::vector<uint8_t>& kek_material) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  auto fail = [&](Error e) { Rollback(); return e; };
  int64_t now = Now();
  {
    Stmt s(db(), "INSERT INTO projects(name, created_at) VALUES (?, ?)");
    s.Bind(1, name).Bind(2, now);
    int rc = s.Step();
    if ((rc & 0xff) == SQLITE_CONSTRAINT) return fail(Error(Category::kUsage, "project '" + name + "' already exists"));
    if (rc != SQLITE_DONE) return fail(Fail(rc, "creating project"));
  }
  int64_t pid = sqlite3_last_insert_rowid(db());
  {
    Stmt s(db(), "INSERT INTO keks(project_id, version, token_id, label, created_at, material) VALUES (?, ?, ?, ?, ?, ?)");
    s.Bind(1, pid).Bind(2, kek.version).Bind(3, kek.id).Bind(4, kek_label).Bind(5, now);
    if (!kek_material.empty()) s.Bind(6, kek_material);
    int rc = s.Step();
    if (rc != SQLITE_DONE) return fail(Fail(rc, "recording KEK"));
  }
  for (const auto& e : envs) {
    Stmt s(db(), "INSERT INTO environments(project_id, name, created_at) VALUES (?, ?, ?)");
    s.Bind(1, pid).Bind(2, e).Bind(3, now);
    int rc = s.Step();
    if ((rc & 0xff) == SQLITE_CONSTRAINT) {
      return fail(Error(Category::kUsage, "environment '" + e + "' is listed twice"));
    }
    if (rc != SQLITE_DONE) return fail(Fail(rc, "creating environment"));
  }
  CUSTODY_RETURN_IF_ERROR(Commit());
  return ProjectRecord{pid, name, now};
}

Result<ProjectRecord> SqliteStore::FindProject(const std::string& name) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(), "SELECT id, created_at FROM projects WHERE name = ?");
  s.Bind(1, name);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return ProjectRecord{s.Int(0), name, s.Int(1)};
  if (rc == SQLITE_DONE) return Error(Category::kNotFound, "project '" + name + "' does not exist");
  return Fail(rc, "finding project");
}

Result<std::vector<ProjectRecord>> SqliteStore::ListProjects() {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(), "SELECT id, name, created_at FROM projects ORDER BY name");
  std::vector<ProjectRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back({s.Int(0), s.Text(1), s.Int(2)});
  if (rc != SQLITE_DONE) return Fail(rc, "listing projects");
  return out;
}

Result<EnvironmentRecord> SqliteStore::CreateEnvironment(const std::string& project, const std::string& env) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  auto pid = ProjectId(project);
  if (!pid) {
    Rollback();
    return std::move(pid).error();
  }
  Stmt s(db(), "INSERT INTO environments(project_id, name, created_at) VALUES (?, ?, ?)");
  s.Bind(1, *pid).Bind(2, env).Bind(3, Now());
  int rc = s.Step();
  if (rc != SQLITE_DONE) {
    Rollback();
    if ((rc & 0xff) == SQLITE_CONSTRAINT) {
      return Error(Category::kUsage, "environment '" + project + "/" + env + "' already exists");
    }
    return Fail(rc, "creating environment");
  }
  int64_t id = sqlite3_last_insert_rowid(db());
  CUSTODY_RETURN_IF_ERROR(Commit());
  return EnvironmentRecord{id, *pid, project, env};
}

Result<EnvironmentRecord> SqliteStore::FindEnvironment(const std::string& project, const std::string& env) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  return FindEnvironmentHeld(project, env);
}

Result<EnvironmentRecord> SqliteStore::FindEnvironmentHeld(const std::string& project, const std::string& env) {
  // One statement on the hot path (every GET); the project is looked up on
  // its own only to say which of the two names does not exist.
  Stmt s(db(), "SELECT e.id, p.id FROM environments e JOIN projects p ON p.id = e.project_id "
               "WHERE p.name = ? AND e.name = ?");
  s.Bind(1, project).Bind(2, env);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return EnvironmentRecord{s.Int(0), s.Int(1), project, env};
  if (rc == SQLITE_DONE) {
    CUSTODY_RETURN_IF_ERROR(ProjectId(project));
    return Error(Category::kNotFound, "environment '" + env + "' does not exist in project '" + project + "'");
  }
  return Fail(rc, "finding environment");
}

Result<std::vector<EnvironmentRecord>> SqliteStore::ListEnvironments(const std::string& project) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_ASSIGN_OR_RETURN(int64_t pid, ProjectId(project));
  Stmt s(db(), "SELECT id, name FROM environments WHERE project_id = ? ORDER BY name");
  s.Bind(1, pid);
  std::vector<EnvironmentRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back({s.Int(0), pid, project, s.Text(1)});
  if (rc != SQLITE_DONE) return Fail(rc, "listing environments");
  return out;
}

namespace {
constexpr const char* kKekColumns = "id, project_id, version, token_id, label, encryptions_reserved, created_at, state";
constexpr const char* kKekStateNames[] = {"active", "retiring", "destroying", "destroyed"};
KekState ParseKekState(const std::string& s) {
  for (size_t i = 0; i < std::size(kKekStateNames); ++i) {
    if (s == kKekStateNames[i]) return static_cast<KekState>(i);
  }
  return KekState::kDestroyed;  // unknown: never used for sealing
}
KekRecord ReadKek(const Stmt& s) {
  KekRecord k;
  k.id = s.Int(0);
  k.project_id = s.Int(1);
  k.ref.version = static_cast<uint32_t>(s.Int(2));
  auto id = s.Blob(3);
  std::copy_n(id.begin(), std::min(id.size(), k.ref.id.size()), k.ref.id.begin());
  k.label = s.Text(4);
  k.encryptions_reserved = static_cast<uint64_t>(s.Int(5));
  k.created_at = s.Int(6);
  k.state = ParseKekState(s.Text(7));
  return k;
}
}  // namespace

Result<KekRecord> SqliteStore::CurrentKek(int64_t project_id) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  std::string sql = std::string("SELECT ") + kKekColumns +
                    " FROM keks WHERE project_id = ? AND state = 'active' ORDER BY version DESC LIMIT 1";
  Stmt s(db(), sql.c_str());
  s.Bind(1, project_id);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return ReadKek(s);
  if (rc == SQLITE_DONE) return Error(Category::kIntegrity, "project has no active KEK in the store");
  return Fail(rc, "finding KEK");
}

Result<KekRecord> SqliteStore::KekById(int64_t id) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  return KekByIdHeld(id);
}

Result<KekRecord> SqliteStore::KekByIdHeld(int64_t id) {
  std::string sql = std::string("SELECT ") + kKekColumns + " FROM keks WHERE id = ?";
  Stmt s(db(), sql.c_str());
  s.Bind(1, id);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return ReadKek(s);
  if (rc == SQLITE_DONE) return Error(Category::kIntegrity, "store names a KEK record that does not exist");
  return Fail(rc, "finding KEK");
}

Result<std::vector<KekRecord>> SqliteStore::ProjectKeks(int64_t project_id) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  std::string sql = std::string("SELECT ") + kKekColumns + " FROM keks WHERE project_id = ? ORDER BY version";
  Stmt s(db(), sql.c_str());
  s.Bind(1, project_id);
  std::vector<KekRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back(ReadKek(s));
  if (rc != SQLITE_DONE) return Fail(rc, "listing KEKs");
  return out;
}

Result<std::vector<uint8_t>> SqliteStore::KekMaterial(const KekRef& kek) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(), "SELECT material FROM keks WHERE token_id = ? AND version = ?");
  s.Bind(1, kek.id).Bind(2, static_cast<int64_t>(kek.version));
  int rc = s.Step();
  if (rc == SQLITE_ROW) return s.Blob(0);
  if (rc == SQLITE_DONE) return Error(Category::kNotFound, "the store has no KEK record for this blob's KEK");
  return Fail(rc, "reading KEK material");
}

Result<KekRecord> SqliteStore::AddKek(int64_t project_id, const KekRef& kek, const std::string& label, int64_t now,
                                      const std::vector<uint8_t>& material, const LockFence* fence) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  auto fail = [&](Error e) { Rollback(); return e; };
  if (fence != nullptr) {
    // Renewed in this transaction: under the write lock, so no other
    // process can take the lock between this check and the commit.
    Status held = RenewHere(fence->name, fence->holder, now + fence->ttl);
    if (!held.ok()) return fail(held.error());
  }
  {
    Stmt s(db(), "UPDATE keks SET state = 'retiring' WHERE project_id = ? AND state = 'active'");
    s.Bind(1, project_id);
    int rc = s.Step();
    if (rc != SQLITE_DONE) return fail(Fail(rc, "retiring KEK"));
  }
  {
    Stmt s(db(), "INSERT INTO keks(project_id, version, token_id, label, created_at, material) VALUES (?, ?, ?, ?, ?, ?)");
    s.Bind(1, project_id).Bind(2, kek.version).Bind(3, kek.id).Bind(4, label).Bind(5, now);
    if (!material.empty()) s.Bind(6, material);
    int rc = s.Step();
    if ((rc & 0xff) == SQLITE_CONSTRAINT) {
      return fail(Error(Category::kUnavailable, "KEK version " + std::to_string(kek.version) +
                                                    " was recorded by a concurrent rotation"));
    }
    if (rc != SQLITE_DONE) return fail(Fail(rc, "recording KEK"));
  }
  int64_t id = sqlite3_last_insert_rowid(db());
  CUSTODY_RETURN_IF_ERROR(Commit());
  KekRecord k;
  k.id = id;
  k.project_id = project_id;
  k.ref = kek;
  k.label = label;
  k.created_at = now;
  return k;
}

Result<std::vector<SealedItem>> SqliteStore::SealedUnder(int64_t kek_record_id, std::pair<int64_t, uint32_t> after,
                                                         size_t limit) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(),
         "SELECT v.secret_id, e.name, s.name, v.version, v.blob FROM secret_versions v "
         "JOIN secrets s ON s.id = v.secret_id JOIN environments e ON e.id = s.environment_id "
         "WHERE v.kek_id = ?1 AND (v.secret_id, v.version) > (?2, ?3) ORDER BY v.secret_id, v.version LIMIT ?4");
  s.Bind(1, kek_record_id).Bind(2, after.first).Bind(3, static_cast<int64_t>(after.second));
  s.Bind(4, static_cast<int64_t>(limit));
  std::vector<SealedItem> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    out.push_back({s.Int(0), s.Text(1), s.Text(2), static_cast<uint32_t>(s.Int(3)), s.Blob(4)});
  }
  if (rc != SQLITE_DONE) return Fail(rc, "reading sealed versions");
  return out;
}

Result<uint64_t> SqliteStore::CountSealedUnder(int64_t kek_record_id) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(), "SELECT count(*) FROM secret_versions WHERE kek_id = ?");
  s.Bind(1, kek_record_id);
  int rc = s.Step();
  if (rc != SQLITE_ROW) return Fail(rc, "counting sealed versions");
  return static_cast<uint64_t>(s.Int(0));
}

Result<size_t> SqliteStore::ReplaceSealed(int64_t from, int64_t to, const std::vector<Resealed>& items) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  size_t replaced = 0;
  for (const auto& it : items) {
    Stmt s(db(), "UPDATE secret_versions SET blob = ?, kek_id = ? WHERE secret_id = ? AND version = ? AND kek_id = ?");
    s.Bind(1, it.blob).Bind(2, to).Bind(3, it.secret_id).Bind(4, static_cast<int64_t>(it.version)).Bind(5, from);
    int rc = s.Step();
    if (rc != SQLITE_DONE) {
      Rollback();
      return Fail(rc, "storing re-sealed versions");
    }
    replaced += static_cast<size_t>(sqlite3_changes(db()));
  }
  CUSTODY_RETURN_IF_ERROR(Commit());
  return replaced;
}

Status SqliteStore::SetKekState(int64_t kek_record_id, KekState state) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  if (state == KekState::kDestroying) {
    // Under the write lock: no put can add a blob under a KEK that is not
    // active (AddVersion checks), so a zero here stays zero.
    Stmt c(db(), "SELECT count(*) FROM secret_versions WHERE kek_id = ?");
    c.Bind(1, kek_record_id);
    int rc = c.Step();
    if (rc != SQLITE_ROW) {
      Rollback();
      return Fail(rc, "counting sealed versions");
    }
    if (c.Int(0) > 0) {
      Rollback();
      return Error(Category::kUnavailable,
                   std::to_string(c.Int(0)) + " sealed versions still need this KEK; refusing to destroy it");
    }
  }
  // A destroyed KEK's backend material (the TPM's sealed object) goes too:
  // without it the old KEK can never be unsealed again.
  Stmt s(db(), state == KekState::kDestroyed ? "UPDATE keks SET state = ?, material = NULL WHERE id = ?"
                                              : "UPDATE keks SET state = ? WHERE id = ?");
  s.Bind(1, std::string(kKekStateNames[static_cast<size_t>(state)])).Bind(2, kek_record_id);
  int rc = s.Step();
  if (rc != SQLITE_DONE) {
    Rollback();
    return Fail(rc, "changing KEK state");
  }
  CUSTODY_RETURN_IF_ERROR(Commit());
  if (state == KekState::kDestroyed) {
    // The page's older image, material included, is still a frame in the
    // write-ahead log: copy the log into the database and cut it to zero.
    // Best effort: a reader in another process (custodyd) can hold the log
    // back, and then the next checkpoint that restarts the log overwrites
    // the frame. The state change itself is already durable. A truncating
    // checkpoint holds off new writers while it waits, so it waits briefly,
    // not the full busy timeout.
    sqlite3_busy_timeout(db(), 200);
    (void)sqlite3_wal_checkpoint_v2(db(), nullptr, SQLITE_CHECKPOINT_TRUNCATE, nullptr, nullptr);
    sqlite3_busy_timeout(db(), 5000);
  }
  return Status::Ok();
}

Result<std::vector<KekRecord>> SqliteStore::ListKeks() {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  std::string sql = std::string("SELECT ") + kKekColumns + " FROM keks ORDER BY project_id, version";
  Stmt s(db(), sql.c_str());
  std::vector<KekRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back(ReadKek(s));
  if (rc != SQLITE_DONE) return Fail(rc, "listing KEKs");
  return out;
}

Result<int64_t> SqliteStore::SecretId(int64_t env_id, const std::string& name) {
  Stmt s(db(), "SELECT id FROM secrets WHERE environment_id = ? AND name = ?");
  s.Bind(1, env_id).Bind(2, name);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return s.Int(0);
  if (rc == SQLITE_DONE) return Error(Category::kNotFound, "secret '" + name + "' does not exist");
  return Fail(rc, "finding secret");
}

Result<uint32_t> SqliteStore::NextVersion(int64_t env_id, const std::string& name) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(),
         "SELECT coalesce(max(v.version), 0) FROM secrets s JOIN secret_versions v ON v.secret_id = s.id "
         "WHERE s.environment_id = ? AND s.name = ?");
  s.Bind(1, env_id).Bind(2, name);
  int rc = s.Step();
  if (rc != SQLITE_ROW) return Fail(rc, "reading versions");
  return static_cast<uint32_t>(s.Int(0) + 1);
}

Status SqliteStore::AddVersion(int64_t env_id, const std::string& name, uint32_t version,
                               int64_t kek_record_id, const std::vector<uint8_t>& blob, int64_t now) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  auto fail = [&](Error e) { Rollback(); return e; };
  {
    // KEK rotation destroys a retired KEK once no blob needs it; a put that
    // sealed under it just before it retired must not land after that check.
    Stmt k(db(), "SELECT state FROM keks WHERE id = ?");
    k.Bind(1, kek_record_id);
    int rc = k.Step();
    if (rc != SQLITE_ROW) return fail(rc == SQLITE_DONE ? Error(Category::kIntegrity, "KEK record is missing")
                                                        : Fail(rc, "reading KEK"));
    if (ParseKekState(k.Text(0)) != KekState::kActive) {
      return fail(Error(Category::kUnavailable, "the project's KEK was rotated while sealing '" + name + "'")
                      .WithVersionTaken());
    }
  }
  {
    Stmt s(db(), "INSERT INTO secrets(environment_id, name, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT(environment_id, name) DO NOTHING");
    s.Bind(1, env_id).Bind(2, name).Bind(3, now);
    int rc = s.Step();
    if (rc != SQLITE_DONE) return fail(Fail(rc, "creating secret"));
  }
  auto sid = SecretId(env_id, name);
  if (!sid) return fail(std::move(sid).error());
  {
    Stmt s(db(), "INSERT INTO secret_versions(secret_id, version, kek_id, blob, created_at) VALUES (?, ?, ?, ?, ?)");
    s.Bind(1, *sid).Bind(2, version).Bind(3, kek_record_id).Bind(4, blob).Bind(5, now);
    int rc = s.Step();
    // Only the (secret_id, version) key says another writer was first; any
    // other constraint (a trigger's RAISE, a foreign key) is no race.
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
      return fail(Error(Category::kUnavailable,
                        "version " + std::to_string(version) + " of '" + name + "' was taken by a concurrent writer",
                        Backend::kStore, static_cast<uint64_t>(rc))
                      .WithVersionTaken());
    }
    if (rc != SQLITE_DONE) return fail(Fail(rc, "storing sealed version"));
  }
  {
    // The version that was current starts its grace period now. Older ones
    // keep the time their own grace began.
    Stmt s(db(), "UPDATE secret_versions SET superseded_at = ? "
                "WHERE secret_id = ? AND version < ? AND superseded_at IS NULL AND revoked_at IS NULL");
    s.Bind(1, now).Bind(2, *sid).Bind(3, static_cast<int64_t>(version));
    int rc = s.Step();
    if (rc != SQLITE_DONE) return fail(Fail(rc, "superseding the previous version"));
  }
  return Commit();
}

namespace {
constexpr const char* kVersionColumns =
    "v.version, v.kek_id, v.created_at, v.superseded_at, v.revoked_at, coalesce(v.revoked_reason, ''), "
    "coalesce(v.revoked_by, ''), (SELECT coalesce(max(c.version), 0) FROM secret_versions c "
    "WHERE c.secret_id = v.secret_id AND c.revoked_at IS NULL)";
SecretVersionRecord ReadVersion(const Stmt& s) {
  SecretVersionRecord r;
  r.version = static_cast<uint32_t>(s.Int(0));
  r.kek_record_id = s.Int(1);
  r.created_at = s.Int(2);
  if (sqlite3_column_type(const_cast<Stmt&>(s).raw(), 3) != SQLITE_NULL) r.superseded_at = s.Int(3);
  if (sqlite3_column_type(const_cast<Stmt&>(s).raw(), 4) != SQLITE_NULL) r.revoked_at = s.Int(4);
  r.revoked_reason = s.Text(5);
  r.revoked_by = s.Text(6);
  r.current_version = static_cast<uint32_t>(s.Int(7));
  return r;
}
}  // namespace

Result<SecretVersionRecord> SqliteStore::GetVersion(const EnvironmentRecord& env, const std::string& name,
                                                    std::optional<uint32_t> version) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  return GetVersionHeld(env, name, version);
}

Result<UnsealInputs> SqliteStore::ReadForUnseal(const std::string& project, const std::string& env,
                                                const std::string& name, std::optional<uint32_t> version) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  // One read transaction: one snapshot (a KEK rotation cannot move the blob
  // between the version and its KEK) and one WAL read lock, not three.
  CUSTODY_RETURN_IF_ERROR(Exec("BEGIN"));
  auto read = [&]() -> Result<UnsealInputs> {
    UnsealInputs in;
    CUSTODY_ASSIGN_OR_RETURN(in.env, FindEnvironmentHeld(project, env));
    CUSTODY_ASSIGN_OR_RETURN(in.version, GetVersionHeld(in.env, name, version));
    CUSTODY_ASSIGN_OR_RETURN(in.kek, KekByIdHeld(in.version.kek_record_id));
    return in;
  };
  auto in = read();
  (void)Exec(in ? "COMMIT" : "ROLLBACK");
  return in;
}

Result<SecretVersionRecord> SqliteStore::GetVersionHeld(const EnvironmentRecord& env, const std::string& name,
                                                        std::optional<uint32_t> version) {
  std::string where = env.project + "/" + env.name + "/" + name;
  // One statement on the hot path (every GET); the secret is looked up on
  // its own only to say what is missing.
  static const std::string by_version =
      std::string("SELECT ") + kVersionColumns +
      ", v.blob FROM secret_versions v JOIN secrets s ON s.id = v.secret_id "
      "WHERE s.environment_id = ? AND s.name = ? AND v.version = ?";
  static const std::string current = std::string("SELECT ") + kVersionColumns +
                                     ", v.blob FROM secret_versions v JOIN secrets s ON s.id = v.secret_id "
                                     "WHERE s.environment_id = ? AND s.name = ? AND v.revoked_at IS NULL "
                                     "ORDER BY v.version DESC LIMIT 1";
  int rc = SQLITE_DONE;
  {
    Stmt s(db(), version ? by_version.c_str() : current.c_str());
    s.Bind(1, env.id).Bind(2, name);
    if (version) s.Bind(3, static_cast<int64_t>(*version));
    rc = s.Step();
    if (rc == SQLITE_ROW) {
      SecretVersionRecord r = ReadVersion(s);
      r.blob = s.Blob(8);
      return r;
    }
  }
  if (rc != SQLITE_DONE) return Fail(rc, "reading secret");
  auto sid = SecretId(env.id, name);
  if (!sid) {
    if (sid.error().category() == Category::kNotFound) {
      return Error(Category::kNotFound, "secret '" + where + "' does not exist");
    }
    return std::move(sid).error();
  }
  if (version) return Error(Category::kNotFound, "secret '" + where + "' has no version " + std::to_string(*version));
  return Error(Category::kNotFound, "secret '" + where +
                                        "' has no current version: every stored version is revoked; "
                                        "store a new one with 'custody secret rotate'");
}

Result<std::vector<SecretVersionRecord>> SqliteStore::ListVersions(const EnvironmentRecord& env,
                                                                   const std::string& name) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  auto sid = SecretId(env.id, name);
  if (!sid) {
    if (sid.error().category() == Category::kNotFound) {
      return Error(Category::kNotFound, "secret '" + env.project + "/" + env.name + "/" + name + "' does not exist");
    }
    return std::move(sid).error();
  }
  static const std::string sql =
      std::string("SELECT ") + kVersionColumns + " FROM secret_versions v WHERE v.secret_id = ? ORDER BY v.version";
  Stmt s(db(), sql.c_str());
  s.Bind(1, *sid);
  std::vector<SecretVersionRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back(ReadVersion(s));
  if (rc != SQLITE_DONE) return Fail(rc, "listing versions");
  return out;
}

Result<uint32_t> SqliteStore::RevokeVersion(const EnvironmentRecord& env, const std::string& name, uint32_t version,
                                            const std::string& reason, const std::string& by, int64_t now) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  std::string where = env.project + "/" + env.name + "/" + name;
  CUSTODY_RETURN_IF_ERROR(Begin());
  auto fail = [&](Error e) { Rollback(); return e; };
  auto sid = SecretId(env.id, name);
  if (!sid) {
    if (sid.error().category() == Category::kNotFound) {
      return fail(Error(Category::kNotFound, "secret '" + where + "' does not exist"));
    }
    return fail(std::move(sid).error());
  }
  auto current = [&]() -> Result<int64_t> {
    Stmt c(db(), "SELECT coalesce(max(version), 0) FROM secret_versions WHERE secret_id = ? AND revoked_at IS NULL");
    c.Bind(1, *sid);
    int rc = c.Step();
    if (rc != SQLITE_ROW) return Fail(rc, "reading versions");
    return c.Int(0);
  };
  auto before_r = current();
  if (!before_r) return fail(std::move(before_r).error());
  const int64_t before = *before_r;
  {
    Stmt q(db(), "SELECT revoked_at FROM secret_versions WHERE secret_id = ? AND version = ?");
    q.Bind(1, *sid).Bind(2, static_cast<int64_t>(version));
    int rc = q.Step();
    if (rc == SQLITE_DONE) {
      return fail(Error(Category::kNotFound, "secret '" + where + "' has no version " + std::to_string(version)));
    }
    if (rc != SQLITE_ROW) return fail(Fail(rc, "reading version"));
    if (sqlite3_column_type(q.raw(), 0) != SQLITE_NULL) {
      return fail(Error(Category::kUsage, "version " + std::to_string(version) + " of '" + where +
                                              "' is already revoked"));
    }
  }
  {
    Stmt u(db(), "UPDATE secret_versions SET revoked_at = ?, revoked_reason = ?, revoked_by = ? "
                "WHERE secret_id = ? AND version = ?");
    u.Bind(1, now).Bind(2, reason).Bind(3, by).Bind(4, *sid).Bind(5, static_cast<int64_t>(version));
    int rc = u.Step();
    if (rc != SQLITE_DONE) return fail(Fail(rc, "revoking version"));
  }
  auto after = current();
  if (!after) return fail(std::move(after).error());
  if (before == version && *after != 0) {
    // The newest remaining version is current again: it was replaced by the
    // revoked one, and its grace clock must not keep running.
    Stmt u(db(), "UPDATE secret_versions SET superseded_at = NULL WHERE secret_id = ? AND version = ?");
    u.Bind(1, *sid).Bind(2, *after);
    int rc = u.Step();
    if (rc != SQLITE_DONE) return fail(Fail(rc, "restoring the current version"));
  }
  CUSTODY_RETURN_IF_ERROR(Commit());
  return static_cast<uint32_t>(*after);
}

Result<size_t> SqliteStore::TrimVersions(const EnvironmentRecord& env, const std::string& name,
                                         const std::vector<uint32_t>& versions) {
  if (versions.empty()) return size_t{0};
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  auto sid = SecretId(env.id, name);
  if (!sid) {
    Rollback();
    return std::move(sid).error();
  }
  size_t n = 0;
  for (uint32_t v : versions) {
    Stmt d(db(), "DELETE FROM secret_versions WHERE secret_id = ?1 AND version = ?2 AND version <> ("
                "SELECT coalesce(max(version), 0) FROM secret_versions WHERE secret_id = ?1 AND revoked_at IS NULL)");
    d.Bind(1, *sid).Bind(2, static_cast<int64_t>(v));
    int rc = d.Step();
    if (rc != SQLITE_DONE) {
      Rollback();
      return Fail(rc, "trimming versions");
    }
    n += static_cast<size_t>(sqlite3_changes(db()));
  }
  CUSTODY_RETURN_IF_ERROR(Commit());
  return n;
}

Result<std::vector<SecretSummary>> SqliteStore::ListSecrets(const std::optional<std::string>& project,
                                                            const std::optional<std::string>& env) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  if (project) CUSTODY_RETURN_IF_ERROR(ProjectId(*project));
  Stmt s(db(),
         "SELECT p.name, e.name, s.name, max(v.version), count(v.version), max(v.created_at), "
         "coalesce(max(CASE WHEN v.revoked_at IS NULL THEN v.version END), 0), count(v.revoked_at), "
         "coalesce((SELECT c.created_at FROM secret_versions c WHERE c.secret_id = s.id AND c.revoked_at IS NULL "
         "ORDER BY c.version DESC LIMIT 1), 0) "
         "FROM secrets s JOIN environments e ON e.id = s.environment_id "
         "JOIN projects p ON p.id = e.project_id JOIN secret_versions v ON v.secret_id = s.id "
         "WHERE (?1 IS NULL OR p.name = ?1) AND (?2 IS NULL OR e.name = ?2) "
         "GROUP BY s.id ORDER BY p.name, e.name, s.name");
  if (project) s.Bind(1, *project);
  if (env) s.Bind(2, *env);
  std::vector<SecretSummary> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    SecretSummary sum{s.Text(0), s.Text(1), s.Text(2), static_cast<uint32_t>(s.Int(3)),
                      static_cast<uint32_t>(s.Int(4)), s.Int(5)};
    sum.current_version = static_cast<uint32_t>(s.Int(6));
    sum.revoked_count = static_cast<uint32_t>(s.Int(7));
    sum.current_since = s.Int(8);
    out.push_back(std::move(sum));
  }
  if (rc != SQLITE_DONE) return Fail(rc, "listing secrets");
  return out;
}

Status SqliteStore::DeleteSecret(const EnvironmentRecord& env, const std::string& name) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  auto sid = SecretId(env.id, name);
  if (!sid) {
    Rollback();
    if (sid.error().category() == Category::kNotFound) {
      return Error(Category::kNotFound, "secret '" + env.project + "/" + env.name + "/" + name + "' does not exist");
    }
    return std::move(sid).error();
  }
  Stmt s(db(), "DELETE FROM secrets WHERE id = ?");  // versions go by ON DELETE CASCADE
  s.Bind(1, *sid);
  int rc = s.Step();
  if (rc != SQLITE_DONE) {
    Rollback();
    return Fail(rc, "deleting secret");
  }
  return Commit();
}

Status SqliteStore::Reserve(const KekRef& kek, uint64_t n, uint64_t limit) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(),
         "UPDATE keks SET encryptions_reserved = encryptions_reserved + ?1 "
         "WHERE token_id = ?2 AND encryptions_reserved + ?1 <= ?3");
  s.Bind(1, static_cast<int64_t>(n)).Bind(2, kek.id).Bind(3, static_cast<int64_t>(limit));
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "reserving KEK uses");
  if (sqlite3_changes(db()) == 1) return Status::Ok();
  Stmt e(db(), "SELECT label FROM keks WHERE token_id = ?");
  e.Bind(1, kek.id);
  if (e.Step() != SQLITE_ROW) return Error(Category::kIntegrity, "KEK is not recorded in the store");
  return Error(Category::kLimit, "KEK " + e.Text(0) + " has reached its limit of " + std::to_string(limit) +
                                     " encryptions; rotate the project's KEK");
}

Result<std::optional<PolicyRecord>> SqliteStore::CurrentPolicy() {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(), "SELECT version, sha256, text, applied_at, applied_by FROM policies ORDER BY version DESC LIMIT 1");
  int rc = s.Step();
  if (rc == SQLITE_DONE) return std::optional<PolicyRecord>();
  if (rc != SQLITE_ROW) return Fail(rc, "reading the policy");
  return std::optional<PolicyRecord>(
      PolicyRecord{static_cast<uint32_t>(s.Int(0)), s.Text(1), s.Text(2), s.Int(3), s.Text(4)});
}

Result<PolicyRecord> SqliteStore::SavePolicy(const std::string& text, const std::string& sha256,
                                             const std::string& applied_by) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  Stmt v(db(), "SELECT coalesce(max(version), 0) + 1 FROM policies");
  int rc = v.Step();
  if (rc != SQLITE_ROW) {
    Rollback();
    return Fail(rc, "numbering the policy");
  }
  PolicyRecord p{static_cast<uint32_t>(v.Int(0)), sha256, text, Now(), applied_by};
  Stmt s(db(), "INSERT INTO policies(version, sha256, text, applied_at, applied_by) VALUES (?, ?, ?, ?, ?)");
  s.Bind(1, static_cast<int64_t>(p.version)).Bind(2, sha256).Bind(3, text).Bind(4, p.applied_at).Bind(5, applied_by);
  rc = s.Step();
  if (rc != SQLITE_DONE) {
    Rollback();
    return Fail(rc, "storing the policy");
  }
  CUSTODY_RETURN_IF_ERROR(Commit());
  return p;
}

// Usage counters and limit buckets are bookkeeping, not custody data: their
// commits skip the fsync (relaxed connections: WAL with synchronous=NORMAL
// stays consistent and loses at most the last moments of counts on power
// loss), so charging a limit does not put a disk flush on every request. The
// audit log is the durable record of each operation; secrets, KEKs and
// policies keep FULL.
Status SqliteStore::RecordLocked(const UsageKey& key, UsageEvent event, int64_t now) {
  const char* column = "unseals";
  switch (event) {
    case UsageEvent::kUnseal: column = "unseals"; break;
    case UsageEvent::kSeal: column = "seals"; break;
    case UsageEvent::kDenied: column = "denied"; break;
    case UsageEvent::kRateLimited: column = "rate_limited"; break;
    case UsageEvent::kSpendLimited: column = "spend_limited"; break;
  }
  std::string sql = std::string("INSERT INTO usage(project, environment, principal, day, ") + column +
                    ", last_use) VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(project, environment, principal, day) "
                    "DO UPDATE SET " + column + " = " + column + " + 1, last_use = excluded.last_use";
  Stmt s(db(), sql.c_str());
  s.Bind(1, key.project).Bind(2, key.environment).Bind(3, key.principal).Bind(4, policy::DayKey(now)).Bind(5, now);
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "recording usage");
  return Status::Ok();
}

Status SqliteStore::Record(const UsageKey& key, UsageEvent event, int64_t now) {
  Lease lease(*this, /*relaxed=*/true);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  Status s = RecordLocked(key, event, now);
  if (!s.ok()) {
    Rollback();
    return s;
  }
  return Commit();
}

Status SqliteStore::AddUsage(const std::vector<UsageCount>& counts) {
  if (counts.empty()) return Status::Ok();
  Lease lease(*this, /*relaxed=*/true);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  CUSTODY_RETURN_IF_ERROR(Begin());
  for (const auto& c : counts) {
    Stmt s(db(), "INSERT INTO usage(project, environment, principal, day, unseals, seals, denied, rate_limited, "
                 "spend_limited, last_use) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT(project, environment, principal, day) DO UPDATE SET "
                 "unseals = unseals + excluded.unseals, seals = seals + excluded.seals, "
                 "denied = denied + excluded.denied, rate_limited = rate_limited + excluded.rate_limited, "
                 "spend_limited = spend_limited + excluded.spend_limited, "
                 "last_use = max(last_use, excluded.last_use)");
    s.Bind(1, c.key.project).Bind(2, c.key.environment).Bind(3, c.key.principal).Bind(4, c.day);
    for (int i = 0; i < 5; ++i) s.Bind(5 + i, static_cast<int64_t>(c.by_event[i]));
    s.Bind(10, c.last_use);
    int rc = s.Step();
    if (rc != SQLITE_DONE) {
      Rollback();
      return Fail(rc, "recording usage");
    }
  }
  return Commit();
}

Result<Admission> SqliteStore::Admit(const UsageKey& key, const std::vector<policy::LimitRule>& rules,
                                     UsageEvent event, double now) {
  Lease lease(*this, /*relaxed=*/true);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  const int64_t now_s = static_cast<int64_t>(now);
  CUSTODY_RETURN_IF_ERROR(Begin());
  auto fail = [&](Error e) { Rollback(); return e; };
  auto refuse = [&](UsageEvent why, std::string limit, double retry) -> Result<Admission> {
    // The refusal is recorded and committed: it is usage too.
    Status s = RecordLocked(key, why, now_s);
    if (!s.ok()) return fail(std::move(s).error());
    CUSTODY_RETURN_IF_ERROR(Commit());
    return Admission{false, std::move(limit), static_cast<int64_t>(retry + 0.999)};
  };
  std::vector<std::pair<std::string, policy::Bucket>> updates;
  for (const auto& r : rules) {
    if (r.kind == policy::LimitRule::kRate) {
      Stmt b(db(), "SELECT tokens, updated_at FROM buckets WHERE key = ?");
      b.Bind(1, r.key);
      policy::Bucket bucket;
      int rc = b.Step();
      if (rc == SQLITE_ROW) {
        bucket.tokens = sqlite3_column_double(b.raw(), 0);
        bucket.updated_at = sqlite3_column_double(b.raw(), 1);
      } else if (rc != SQLITE_DONE) {
        return fail(Fail(rc, "reading a rate limit"));
      }
      auto t = policy::TakeToken(bucket, r.rate, now);
      if (!t.allowed) return refuse(UsageEvent::kRateLimited, r.label, t.retry_after_seconds);
      updates.emplace_back(r.key, t.next);
    } else if (event == UsageEvent::kUnseal) {
      bool daily = r.kind == policy::LimitRule::kUnsealsPerDay;
      std::string window = daily ? policy::DayKey(now_s) : policy::MonthKey(now_s) + "-%";
      std::string sql = std::string("SELECT coalesce(sum(unseals), 0) FROM usage WHERE project = ? ") +
                        (r.environment.empty() ? "" : "AND environment = ? ") +
                        (daily ? "AND day = ?" : "AND day LIKE ?");
      Stmt c(db(), sql.c_str());
      int i = 1;
      c.Bind(i++, r.project);
      if (!r.environment.empty()) c.Bind(i++, r.environment);
      c.Bind(i++, window);
      int rc = c.Step();
      if (rc != SQLITE_ROW) return fail(Fail(rc, "reading usage"));
      if (static_cast<uint64_t>(c.Int(0)) >= r.limit) {
        int64_t end = daily ? policy::EndOfDay(now_s) : policy::EndOfMonth(now_s);
        return refuse(UsageEvent::kSpendLimited, r.label, static_cast<double>(end - now_s));
      }
    }
  }
  for (const auto& [k, b] : updates) {
    Stmt u(db(), "INSERT INTO buckets(key, tokens, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at");
    u.Bind(1, k);
    sqlite3_bind_double(u.raw(), 2, b.tokens);
    sqlite3_bind_double(u.raw(), 3, b.updated_at);
    int rc = u.Step();
    if (rc != SQLITE_DONE) return fail(Fail(rc, "updating a rate limit"));
  }
  Status s = RecordLocked(key, event, now_s);
  if (!s.ok()) return fail(std::move(s).error());
  CUSTODY_RETURN_IF_ERROR(Commit());
  return Admission{};
}

Result<std::vector<UsageRow>> SqliteStore::Usage(const std::optional<std::string>& project, int64_t now) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(),
         "SELECT project, environment, principal, sum(unseals), sum(seals), sum(denied), sum(rate_limited), "
         "sum(spend_limited), sum(CASE WHEN day = ?2 THEN unseals ELSE 0 END), max(last_use) FROM usage "
         "WHERE (?1 IS NULL OR project = ?1) GROUP BY project, environment, principal "
         "ORDER BY project, environment, principal");
  if (project) s.Bind(1, *project);
  s.Bind(2, policy::DayKey(now));
  std::vector<UsageRow> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    UsageRow r;
    r.project = s.Text(0);
    r.environment = s.Text(1);
    r.principal = s.Text(2);
    r.unseals = static_cast<uint64_t>(s.Int(3));
    r.seals = static_cast<uint64_t>(s.Int(4));
    r.denied = static_cast<uint64_t>(s.Int(5));
    r.rate_limited = static_cast<uint64_t>(s.Int(6));
    r.spend_limited = static_cast<uint64_t>(s.Int(7));
    r.unseals_today = static_cast<uint64_t>(s.Int(8));
    r.last_use = s.Int(9);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return Fail(rc, "reading usage");
  return out;
}

Status SqliteStore::RecordAuditCheckpoint(uint64_t seq, const std::string& covers_hash) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(), "INSERT OR REPLACE INTO audit_checkpoints(seq, covers_hash, created_at) VALUES (?, ?, ?)");
  s.Bind(1, static_cast<int64_t>(seq)).Bind(2, covers_hash).Bind(3, Now());
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "recording an audit checkpoint");
  return Status::Ok();
}

Result<std::optional<std::pair<uint64_t, std::string>>> SqliteStore::LastAuditCheckpoint() {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(), "SELECT seq, covers_hash FROM audit_checkpoints ORDER BY seq DESC LIMIT 1");
  int rc = s.Step();
  using R = std::optional<std::pair<uint64_t, std::string>>;
  if (rc == SQLITE_DONE) return R();
  if (rc != SQLITE_ROW) return Fail(rc, "reading audit checkpoints");
  return R(std::make_pair(static_cast<uint64_t>(s.Int(0)), s.Text(1)));
}

Result<std::optional<HeldLock>> SqliteStore::TakeLock(const std::string& name, const LockHolder& me, int64_t now,
                                                      int64_t ttl,
                                                      const std::function<bool(const LockHolder&)>& gone) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  // Read and claim under one write lock, so two takers cannot both win.
  CUSTODY_RETURN_IF_ERROR(Begin());
  {
    Stmt q(db(), "SELECT holder_host, holder_pid, holder_started, holder_instance, expires_at FROM locks WHERE name = ?");
    q.Bind(1, name);
    int rc = q.Step();
    if (rc == SQLITE_ROW) {
      HeldLock other{name, LockHolder{q.Text(0), q.Int(1), q.Int(2), q.Text(3)}, q.Int(4)};
      if (!(other.holder == me) && other.expires_at > now && !(gone && gone(other.holder))) {
        Rollback();
        return std::optional<HeldLock>(std::move(other));
      }
    } else if (rc != SQLITE_DONE) {
      Rollback();
      return Fail(rc, "reading lock " + name);
    }
  }
  Stmt w(db(),
         "INSERT OR REPLACE INTO locks(name, holder_host, holder_pid, holder_started, holder_instance, expires_at) "
         "VALUES (?, ?, ?, ?, ?, ?)");
  w.Bind(1, name).Bind(2, me.host).Bind(3, me.pid).Bind(4, me.started).Bind(5, me.instance).Bind(6, now + ttl);
  int rc = w.Step();
  if (rc != SQLITE_DONE) {
    Rollback();
    return Fail(rc, "taking lock " + name);
  }
  CUSTODY_RETURN_IF_ERROR(Commit());
  return std::optional<HeldLock>();
}

Status SqliteStore::RenewHere(const std::string& name, const LockHolder& me, int64_t until) {
  Stmt s(db(),
         "UPDATE locks SET expires_at = ? WHERE name = ? AND holder_host = ? AND holder_pid = ? AND holder_started = ? "
         "AND holder_instance = ?");
  s.Bind(1, until).Bind(2, name).Bind(3, me.host).Bind(4, me.pid).Bind(5, me.started).Bind(6, me.instance);
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "renewing lock " + name);
  if (sqlite3_changes(db()) == 0) {
    return Error(Category::kUnavailable, "lock " + name + " is no longer ours: it expired and another process took it");
  }
  return Status::Ok();
}

Status SqliteStore::RenewLock(const std::string& name, const LockHolder& me, int64_t now, int64_t ttl) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  return RenewHere(name, me, now + ttl);
}

Status SqliteStore::ReleaseLock(const std::string& name, const LockHolder& me) {
  Lease lease(*this);
  if (!lease.ok()) return Error(Category::kUnavailable, "store " + path_ + ": cannot open another connection");
  Stmt s(db(),
         "DELETE FROM locks WHERE name = ? AND holder_host = ? AND holder_pid = ? AND holder_started = ? AND "
         "holder_instance = ?");
  s.Bind(1, name).Bind(2, me.host).Bind(3, me.pid).Bind(4, me.started).Bind(5, me.instance);
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "releasing lock " + name);
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<Store>> OpenSqliteStore(const std::string& path, bool create) {
  struct stat st {};
  bool exists = ::stat(path.c_str(), &st) == 0;
  if (!exists && !create) {
    return Error(Category::kNotFound, "store " + path + " does not exist; run 'custody init' first");
  }
  sqlite3* db = nullptr;
  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (create ? SQLITE_OPEN_CREATE : 0);
  int rc = sqlite3_open_v2(path.c_str(), &db, flags, nullptr);
  if (rc != SQLITE_OK) {
    sqlite3_close_v2(db);
    return Error(Category::kUnavailable, "cannot open store " + path + ": " + sqlite3_errstr(rc),
                 Backend::kStore, static_cast<uint64_t>(rc));
  }
  // The store holds only sealed blobs, but names and metadata are still
  // nobody else's business: owner-only, like the config.
  if (!exists) ::chmod(path.c_str(), 0600);
  auto store = std::make_unique<SqliteStore>(db, path);
  CUSTODY_RETURN_IF_ERROR(store->Init(create));
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace custody::core
