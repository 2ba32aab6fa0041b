// A whole deployment out of and into a SQLite store (`custody store copy`):
// every row but the named locks, with its ids, blobs as they are.
#include "sqlite_store_impl.h"

namespace custody::core::sqlite {
namespace {

bool IsNull(Stmt& s, int c) { return sqlite3_column_type(s.raw(), c) == SQLITE_NULL; }
double Real(Stmt& s, int c) { return sqlite3_column_double(s.raw(), c); }

void BindOptional(Stmt& s, int i, const std::optional<int64_t>& v) {
  if (v) {
    s.Bind(i, *v);
  } else {
    sqlite3_bind_null(s.raw(), i);
  }
}
void BindOptional(Stmt& s, int i, const std::optional<std::string>& v) {
  if (v) {
    s.Bind(i, *v);
  } else {
    sqlite3_bind_null(s.raw(), i);
  }
}
// A blob that may be empty: sqlite3_bind_blob would store an empty one as NULL.
void BindBytes(Stmt& s, int i, const std::vector<uint8_t>& v) {
  if (v.empty()) {
    sqlite3_bind_zeroblob(s.raw(), i, 0);
  } else {
    s.Bind(i, std::span<const uint8_t>(v));
  }
}

}  // namespace

Result<StoreSnapshot> SqliteStore::Export() {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // One read transaction: every table from the same snapshot, whatever a
  // running server writes meanwhile.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kRead));
  StoreSnapshot snap;
  int rc;
  {
    Stmt s(db(), "SELECT id, name, created_at FROM projects ORDER BY id");
    while ((rc = s.Step()) == SQLITE_ROW) snap.projects.push_back({s.Int(0), s.Text(1), s.Int(2)});
    if (rc != SQLITE_DONE) return Fail(rc, "reading projects");
  }
  {
    Stmt s(db(), "SELECT id, project_id, name, created_at FROM environments ORDER BY id");
    while ((rc = s.Step()) == SQLITE_ROW) snap.environments.push_back({s.Int(0), s.Int(1), s.Text(2), s.Int(3)});
    if (rc != SQLITE_DONE) return Fail(rc, "reading environments");
  }
  {
    Stmt s(db(), "SELECT id, project_id, version, token_id, label, state, encryptions_reserved, created_at, material "
                 "FROM keks ORDER BY id");
    while ((rc = s.Step()) == SQLITE_ROW) {
      SnapshotKek k;
      k.id = s.Int(0);
      k.project_id = s.Int(1);
      k.version = s.Int(2);
      k.token_id = s.Blob(3);
      k.label = s.Text(4);
      k.state = s.Text(5);
      k.encryptions_reserved = s.Int(6);
      k.created_at = s.Int(7);
      if (!IsNull(s, 8)) k.material = s.Blob(8);
      snap.keks.push_back(std::move(k));
    }
    if (rc != SQLITE_DONE) return Fail(rc, "reading KEK records");
  }
  {
    Stmt s(db(), "SELECT id, environment_id, name, created_at FROM secrets ORDER BY id");
    while ((rc = s.Step()) == SQLITE_ROW) snap.secrets.push_back({s.Int(0), s.Int(1), s.Text(2), s.Int(3)});
    if (rc != SQLITE_DONE) return Fail(rc, "reading secrets");
  }
  {
    Stmt s(db(), "SELECT secret_id, version, kek_id, blob, created_at, superseded_at, revoked_at, revoked_reason, "
                 "revoked_by FROM secret_versions ORDER BY secret_id, version");
    while ((rc = s.Step()) == SQLITE_ROW) {
      SnapshotVersion v;
      v.secret_id = s.Int(0);
      v.version = s.Int(1);
      v.kek_id = s.Int(2);
      v.blob = s.Blob(3);
      v.created_at = s.Int(4);
      if (!IsNull(s, 5)) v.superseded_at = s.Int(5);
      if (!IsNull(s, 6)) v.revoked_at = s.Int(6);
      if (!IsNull(s, 7)) v.revoked_reason = s.Text(7);
      if (!IsNull(s, 8)) v.revoked_by = s.Text(8);
      snap.versions.push_back(std::move(v));
    }
    if (rc != SQLITE_DONE) return Fail(rc, "reading secret versions");
  }
  {
    Stmt s(db(), "SELECT version, sha256, text, applied_at, applied_by FROM policies ORDER BY version");
    while ((rc = s.Step()) == SQLITE_ROW) {
      snap.policies.push_back({s.Int(0), s.Text(1), s.Text(2), s.Int(3), s.Text(4)});
    }
    if (rc != SQLITE_DONE) return Fail(rc, "reading policies");
  }
  {
    Stmt s(db(), "SELECT project, environment, principal, day, unseals, seals, denied, rate_limited, spend_limited, "
                 "last_use FROM usage ORDER BY project, environment, principal, day");
    while ((rc = s.Step()) == SQLITE_ROW) {
      snap.usage.push_back({s.Text(0), s.Text(1), s.Text(2), s.Text(3), s.Int(4), s.Int(5), s.Int(6), s.Int(7),
                            s.Int(8), s.Int(9)});
    }
    if (rc != SQLITE_DONE) return Fail(rc, "reading usage");
  }
  {
    Stmt s(db(), "SELECT key, tokens, updated_at FROM buckets ORDER BY key");
    while ((rc = s.Step()) == SQLITE_ROW) snap.buckets.push_back({s.Text(0), Real(s, 1), Real(s, 2)});
    if (rc != SQLITE_DONE) return Fail(rc, "reading rate buckets");
  }
  {
    Stmt s(db(), "SELECT node, seq, covers_hash, created_at FROM audit_checkpoints ORDER BY node, seq");
    while ((rc = s.Step()) == SQLITE_ROW) snap.checkpoints.push_back({s.Text(0), s.Int(1), s.Text(2), s.Int(3)});
    if (rc != SQLITE_DONE) return Fail(rc, "reading audit checkpoints");
  }
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
  return snap;
}

Status SqliteStore::Import(const StoreSnapshot& snap, const std::function<void(size_t, size_t)>& progress) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  int rc;
  {
    // Inside the write transaction: nobody can create a project between
    // this look and the copy.
    Stmt s(db(), "SELECT (SELECT count(*) FROM projects) + (SELECT count(*) FROM keks) + "
                 "(SELECT count(*) FROM secrets) + (SELECT count(*) FROM policies) + "
                 "(SELECT count(*) FROM audit_checkpoints) + (SELECT count(*) FROM usage) + "
                 "(SELECT count(*) FROM buckets)");
    rc = s.Step();
    if (rc != SQLITE_ROW) return Fail(rc, "looking into the target");
    if (s.Int(0) > 0) {
      return Error(Category::kUsage, "target store " + path_ +
                                         " already holds a custody deployment; refusing to copy into it");
    }
  }
  for (const auto& p : snap.projects) {
    Stmt s(db(), "INSERT INTO projects(id, name, created_at) VALUES (?, ?, ?)");
    s.Bind(1, p.id).Bind(2, p.name).Bind(3, p.created_at);
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying project " + p.name);
  }
  for (const auto& e : snap.environments) {
    Stmt s(db(), "INSERT INTO environments(id, project_id, name, created_at) VALUES (?, ?, ?, ?)");
    s.Bind(1, e.id).Bind(2, e.project_id).Bind(3, e.name).Bind(4, e.created_at);
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying environment " + e.name);
  }
  for (const auto& k : snap.keks) {
    Stmt s(db(), "INSERT INTO keks(id, project_id, version, token_id, label, state, encryptions_reserved, "
                 "created_at, material) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)");
    s.Bind(1, k.id).Bind(2, k.project_id).Bind(3, k.version);
    BindBytes(s, 4, k.token_id);
    s.Bind(5, k.label).Bind(6, k.state).Bind(7, k.encryptions_reserved).Bind(8, k.created_at);
    if (k.material) {
      BindBytes(s, 9, *k.material);
    } else {
      sqlite3_bind_null(s.raw(), 9);
    }
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying KEK record " + std::to_string(k.id));
  }
  for (const auto& x : snap.secrets) {
    Stmt s(db(), "INSERT INTO secrets(id, environment_id, name, created_at) VALUES (?, ?, ?, ?)");
    s.Bind(1, x.id).Bind(2, x.environment_id).Bind(3, x.name).Bind(4, x.created_at);
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying secret " + x.name);
  }
  size_t done = 0;
  for (const auto& v : snap.versions) {
    Stmt s(db(), "INSERT INTO secret_versions(secret_id, version, kek_id, blob, created_at, superseded_at, "
                 "revoked_at, revoked_reason, revoked_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)");
    s.Bind(1, v.secret_id).Bind(2, v.version).Bind(3, v.kek_id);
    BindBytes(s, 4, v.blob);
    s.Bind(5, v.created_at);
    BindOptional(s, 6, v.superseded_at);
    BindOptional(s, 7, v.revoked_at);
    BindOptional(s, 8, v.revoked_reason);
    BindOptional(s, 9, v.revoked_by);
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying secret versions");
    if (progress) progress(++done, snap.versions.size());
  }
  for (const auto& p : snap.policies) {
    Stmt s(db(), "INSERT INTO policies(version, sha256, text, applied_at, applied_by) VALUES (?, ?, ?, ?, ?)");
    s.Bind(1, p.version).Bind(2, p.sha256).Bind(3, p.text).Bind(4, p.applied_at).Bind(5, p.applied_by);
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying policy versions");
  }
  for (const auto& u : snap.usage) {
    Stmt s(db(), "INSERT INTO usage(project, environment, principal, day, unseals, seals, denied, rate_limited, "
                 "spend_limited, last_use) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    s.Bind(1, u.project).Bind(2, u.environment).Bind(3, u.principal).Bind(4, u.day).Bind(5, u.unseals)
        .Bind(6, u.seals).Bind(7, u.denied).Bind(8, u.rate_limited).Bind(9, u.spend_limited).Bind(10, u.last_use);
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying usage counts");
  }
  for (const auto& b : snap.buckets) {
    Stmt s(db(), "INSERT INTO buckets(key, tokens, updated_at) VALUES (?, ?, ?)");
    s.Bind(1, b.key);
    sqlite3_bind_double(s.raw(), 2, b.tokens);
    sqlite3_bind_double(s.raw(), 3, b.updated_at);
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying rate buckets");
  }
  for (const auto& c : snap.checkpoints) {
    Stmt s(db(), "INSERT INTO audit_checkpoints(node, seq, covers_hash, created_at) VALUES (?, ?, ?, ?)");
    s.Bind(1, c.node).Bind(2, c.seq).Bind(3, c.covers_hash).Bind(4, c.created_at);
    if ((rc = s.Step()) != SQLITE_DONE) return Fail(rc, "copying audit checkpoints");
  }
  return tx.Commit();
}

}  // namespace custody::core::sqlite
