// The schema: opening a file, telling a custody store from any other
// SQLite file, and migrating it to the current version.
#include <sys/stat.h>

#include "custody/store/sqlite_store.h"
#include "sqlite_store_impl.h"

namespace custody::core {
namespace sqlite {
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
    // 7: the checkpoint witness per node: several custodyd nodes share one
    // store, each with its own audit chain and its own seqs. Rows from
    // before keep node '' (the one host that wrote them).
    R"sql(
CREATE TABLE audit_checkpoints_by_node (
  node        TEXT NOT NULL,
  seq         INTEGER NOT NULL,
  covers_hash TEXT NOT NULL,
  created_at  INTEGER NOT NULL,
  PRIMARY KEY (node, seq)
);
INSERT INTO audit_checkpoints_by_node(node, seq, covers_hash, created_at)
  SELECT '', seq, covers_hash, created_at FROM audit_checkpoints;
DROP TABLE audit_checkpoints;
ALTER TABLE audit_checkpoints_by_node RENAME TO audit_checkpoints;
)sql",
    // 8: idempotency keys of puts (Idempotency-Key): the version each stored.
    R"sql(
CREATE TABLE put_keys (
  secret_id  INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
  key        TEXT NOT NULL,
  version    INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (secret_id, key)
);
)sql",
    // 9: access tokens for the Vault-compatible API, by keyed hash only.
    R"sql(
CREATE TABLE access_tokens (
  token_hash     TEXT PRIMARY KEY,
  accessor       TEXT NOT NULL UNIQUE,
  principal      TEXT NOT NULL,
  issued_by      TEXT NOT NULL,
  issued_at      INTEGER NOT NULL,
  ttl            INTEGER NOT NULL,
  expires_at     INTEGER NOT NULL,
  max_expires_at INTEGER NOT NULL,
  revoked_at     INTEGER
);
CREATE INDEX access_tokens_by_principal ON access_tokens(principal);
)sql",
};

}  // namespace

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

  int64_t have = 0;
  {
    // Finalized before any step runs: a statement still open would make a
    // step's DROP TABLE fail with "database table is locked".
    Stmt v(db(), "PRAGMA user_version");
    if (!v.prepared() || v.Step() != SQLITE_ROW) return Fail(SQLITE_CORRUPT, "reading schema version");
    have = v.Int(0);
  }
  const int64_t want = static_cast<int64_t>(std::size(kMigrations));
  if (have > want) {
    return Error(Category::kConfig, "store " + path_ + " has schema version " + std::to_string(have) +
                                        ", newer than this custody understands (" + std::to_string(want) +
                                        "); upgrade custody");
  }
  for (int64_t i = have; i < want; ++i) {
    // A step and the version that counts it commit together: a step that
    // fails leaves the schema at the previous version, to be run again.
    CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
    CUSTODY_RETURN_IF_ERROR(Exec(kMigrations[i], /*single=*/false));
    CUSTODY_RETURN_IF_ERROR(Exec(("PRAGMA user_version=" + std::to_string(i + 1)).c_str()));
    CUSTODY_RETURN_IF_ERROR(Exec(("PRAGMA application_id=" + std::to_string(kApplicationId)).c_str()));
    CUSTODY_RETURN_IF_ERROR(tx.Commit());
  }
  return Status::Ok();
}

}  // namespace sqlite

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
  auto store = std::make_unique<sqlite::SqliteStore>(db, path);
  CUSTODY_RETURN_IF_ERROR(store->Init(create));
  if (struct stat now {}; ::stat(path.c_str(), &now) == 0) store->PinFile(now.st_dev, now.st_ino);
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace custody::core
