// Secrets and their sealed versions: storing, reading (a GET's whole
// lookup in one snapshot), listing, revoking, trimming and deleting.
#include "sqlite_store_impl.h"

namespace custody::core::sqlite {

Result<int64_t> SqliteStore::SecretId(int64_t env_id, const std::string& name) {
  Stmt s(db(), "SELECT id FROM secrets WHERE environment_id = ? AND name = ?");
  s.Bind(1, env_id).Bind(2, name);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return s.Int(0);
  if (rc == SQLITE_DONE) return Error(Category::kNotFound, "secret '" + name + "' does not exist");
  return Fail(rc, "finding secret");
}

Result<int64_t> SqliteStore::SecretIdIn(const EnvironmentRecord& env, const std::string& name) {
  auto sid = SecretId(env.id, name);
  if (!sid && sid.error().category() == Category::kNotFound) {
    return Error(Category::kNotFound, "secret '" + env.project + "/" + env.name + "/" + name + "' does not exist");
  }
  return sid;
}

Result<uint32_t> SqliteStore::NextVersion(int64_t env_id, const std::string& name) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(),
         "SELECT coalesce(max(v.version), 0) FROM secrets s JOIN secret_versions v ON v.secret_id = s.id "
         "WHERE s.environment_id = ? AND s.name = ?");
  s.Bind(1, env_id).Bind(2, name);
  int rc = s.Step();
  if (rc != SQLITE_ROW) return Fail(rc, "reading versions");
  return static_cast<uint32_t>(s.Int(0) + 1);
}

Status SqliteStore::AddVersion(int64_t env_id, const std::string& name, uint32_t version, int64_t kek_record_id,
                               const std::vector<uint8_t>& blob, int64_t now, const std::string& put_key) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // A write transaction from the start (BEGIN IMMEDIATE): the KEK's state
  // read below holds until this version has landed.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  {
    // KEK rotation destroys a retired KEK once no blob needs it; a put that
    // sealed under it just before it retired must not land after that check.
    Stmt k(db(), "SELECT state FROM keks WHERE id = ?");
    k.Bind(1, kek_record_id);
    int rc = k.Step();
    if (rc != SQLITE_ROW) {
      return rc == SQLITE_DONE ? Error(Category::kIntegrity, "KEK record is missing") : Fail(rc, "reading KEK");
    }
    if (ParseKekState(k.Text(0)) != KekState::kActive) {
      return Error(Category::kUnavailable, "the project's KEK was rotated while sealing '" + name + "'")
          .WithVersionTaken();
    }
  }
  {
    Stmt s(db(), "INSERT INTO secrets(environment_id, name, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT(environment_id, name) DO NOTHING");
    s.Bind(1, env_id).Bind(2, name).Bind(3, now);
    int rc = s.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "creating secret");
  }
  CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretId(env_id, name));
  {
    Stmt s(db(), "INSERT INTO secret_versions(secret_id, version, kek_id, blob, created_at) VALUES (?, ?, ?, ?, ?)");
    s.Bind(1, sid).Bind(2, version).Bind(3, kek_record_id).Bind(4, blob).Bind(5, now);
    int rc = s.Step();
    // Only the (secret_id, version) key says another writer was first; any
    // other constraint (a trigger's RAISE, a foreign key) is no race.
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
      return Error(Category::kUnavailable,
                   "version " + std::to_string(version) + " of '" + name + "' was taken by a concurrent writer",
                   Backend::kStore, static_cast<uint64_t>(rc))
          .WithVersionTaken();
    }
    if (rc != SQLITE_DONE) return Fail(rc, "storing sealed version");
  }
  if (!put_key.empty()) {
    // Keys older than a day go first, so the table stays small.
    Stmt old(db(), "DELETE FROM put_keys WHERE secret_id = ? AND created_at < ?");
    old.Bind(1, sid).Bind(2, now - kPutKeySeconds);
    if (int rc = old.Step(); rc != SQLITE_DONE) return Fail(rc, "pruning idempotency keys");
    Stmt s(db(), "INSERT INTO put_keys(secret_id, key, version, created_at) VALUES (?, ?, ?, ?)");
    s.Bind(1, sid).Bind(2, put_key).Bind(3, static_cast<int64_t>(version)).Bind(4, now);
    int rc = s.Step();
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
      return Error(Category::kUnavailable, "a put with this Idempotency-Key already stored a version of '" + name + "'",
                   Backend::kStore, static_cast<uint64_t>(rc))
          .WithVersionTaken();
    }
    if (rc != SQLITE_DONE) return Fail(rc, "keeping the idempotency key");
  }
  {
    // The version that was current starts its grace period now. Older ones
    // keep the time their own grace began.
    Stmt s(db(), "UPDATE secret_versions SET superseded_at = ? "
                "WHERE secret_id = ? AND version < ? AND superseded_at IS NULL AND revoked_at IS NULL");
    s.Bind(1, now).Bind(2, sid).Bind(3, static_cast<int64_t>(version));
    int rc = s.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "superseding the previous version");
  }
  return tx.Commit();
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

Result<std::optional<uint32_t>> SqliteStore::VersionForPutKey(int64_t env_id, const std::string& name,
                                                             const std::string& put_key, int64_t now) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(), "SELECT k.version FROM put_keys k JOIN secrets s ON s.id = k.secret_id "
               "WHERE s.environment_id = ? AND s.name = ? AND k.key = ? AND k.created_at >= ?");
  s.Bind(1, env_id).Bind(2, name).Bind(3, put_key).Bind(4, now - kPutKeySeconds);
  int rc = s.Step();
  if (rc == SQLITE_DONE) return std::optional<uint32_t>();
  if (rc != SQLITE_ROW) return Fail(rc, "reading an idempotency key");
  return std::optional<uint32_t>(static_cast<uint32_t>(s.Int(0)));
}

Result<SecretVersionRecord> SqliteStore::GetVersion(const EnvironmentRecord& env, const std::string& name,
                                                    std::optional<uint32_t> version) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  return GetVersionHeld(env, name, version);
}

Result<UnsealInputs> SqliteStore::ReadForUnseal(const std::string& project, const std::string& env,
                                                const std::string& name, std::optional<uint32_t> version) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // One read transaction: one snapshot (a KEK rotation cannot move the blob
  // between the version and its KEK, and the KEK record is the one that
  // blob names) and one WAL read lock, not three.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kRead));
  UnsealInputs in;
  CUSTODY_ASSIGN_OR_RETURN(in.env, FindEnvironmentHeld(project, env));
  CUSTODY_ASSIGN_OR_RETURN(in.version, GetVersionHeld(in.env, name, version));
  CUSTODY_ASSIGN_OR_RETURN(in.kek, KekByIdHeld(in.version.kek_record_id));
  // What was read is one consistent snapshot whether or not ending it
  // succeeds; nothing was written, so there is nothing to lose.
  (void)tx.Commit();
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
  CUSTODY_RETURN_IF_ERROR(SecretIdIn(env, name));
  if (version) return Error(Category::kNotFound, "secret '" + where + "' has no version " + std::to_string(*version));
  return Error(Category::kNotFound, "secret '" + where +
                                        "' has no current version: every stored version is revoked; "
                                        "store a new one with 'custody secret rotate'");
}

Result<std::vector<SecretVersionRecord>> SqliteStore::ListVersions(const EnvironmentRecord& env,
                                                                   const std::string& name) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretIdIn(env, name));
  static const std::string sql =
      std::string("SELECT ") + kVersionColumns + " FROM secret_versions v WHERE v.secret_id = ? ORDER BY v.version";
  Stmt s(db(), sql.c_str());
  s.Bind(1, sid);
  std::vector<SecretVersionRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back(ReadVersion(s));
  if (rc != SQLITE_DONE) return Fail(rc, "listing versions");
  return out;
}

Result<uint32_t> SqliteStore::RevokeVersion(const EnvironmentRecord& env, const std::string& name, uint32_t version,
                                            const std::string& reason, const std::string& by, int64_t now) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  std::string where = env.project + "/" + env.name + "/" + name;
  // The current version before and after, and the revocation, under one
  // write lock: a concurrent put or revoke cannot slip in between and have
  // the wrong version's grace clock stopped.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretIdIn(env, name));
  auto current = [&]() -> Result<int64_t> {
    Stmt c(db(), "SELECT coalesce(max(version), 0) FROM secret_versions WHERE secret_id = ? AND revoked_at IS NULL");
    c.Bind(1, sid);
    int rc = c.Step();
    if (rc != SQLITE_ROW) return Fail(rc, "reading versions");
    return c.Int(0);
  };
  CUSTODY_ASSIGN_OR_RETURN(const int64_t before, current());
  {
    Stmt q(db(), "SELECT revoked_at FROM secret_versions WHERE secret_id = ? AND version = ?");
    q.Bind(1, sid).Bind(2, static_cast<int64_t>(version));
    int rc = q.Step();
    if (rc == SQLITE_DONE) {
      return Error(Category::kNotFound, "secret '" + where + "' has no version " + std::to_string(version));
    }
    if (rc != SQLITE_ROW) return Fail(rc, "reading version");
    if (sqlite3_column_type(q.raw(), 0) != SQLITE_NULL) {
      return Error(Category::kUsage, "version " + std::to_string(version) + " of '" + where + "' is already revoked");
    }
  }
  {
    Stmt u(db(), "UPDATE secret_versions SET revoked_at = ?, revoked_reason = ?, revoked_by = ? "
                "WHERE secret_id = ? AND version = ?");
    u.Bind(1, now).Bind(2, reason).Bind(3, by).Bind(4, sid).Bind(5, static_cast<int64_t>(version));
    int rc = u.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "revoking version");
  }
  CUSTODY_ASSIGN_OR_RETURN(const int64_t after, current());
  if (before == version && after != 0) {
    // The newest remaining version is current again: it was replaced by the
    // revoked one, and its grace clock must not keep running.
    Stmt u(db(), "UPDATE secret_versions SET superseded_at = NULL WHERE secret_id = ? AND version = ?");
    u.Bind(1, sid).Bind(2, after);
    int rc = u.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "restoring the current version");
  }
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
  return static_cast<uint32_t>(after);
}

Result<size_t> SqliteStore::TrimVersions(const EnvironmentRecord& env, const std::string& name,
                                         const std::vector<uint32_t>& versions) {
  if (versions.empty()) return size_t{0};
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // Each DELETE works out the current version itself, under the write lock:
  // whatever the caller's list says, the version current at this moment
  // stays.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretId(env.id, name));
  size_t n = 0;
  for (uint32_t v : versions) {
    Stmt d(db(), "DELETE FROM secret_versions WHERE secret_id = ?1 AND version = ?2 AND version <> ("
                "SELECT coalesce(max(version), 0) FROM secret_versions WHERE secret_id = ?1 AND revoked_at IS NULL)");
    d.Bind(1, sid).Bind(2, static_cast<int64_t>(v));
    int rc = d.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "trimming versions");
    n += static_cast<size_t>(sqlite3_changes(db()));
  }
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
  return n;
}

Result<std::vector<SecretSummary>> SqliteStore::ListSecrets(const std::optional<std::string>& project,
                                                            const std::optional<std::string>& env) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
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
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretIdIn(env, name));
  Stmt s(db(), "DELETE FROM secrets WHERE id = ?");  // versions go by ON DELETE CASCADE
  s.Bind(1, sid);
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "deleting secret");
  return tx.Commit();
}

}  // namespace custody::core::sqlite
