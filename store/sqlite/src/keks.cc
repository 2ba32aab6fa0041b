// KEK records: the current one, rotation (a new KEK, re-sealed blobs, the
// states a retired one goes through), backend material, and the ledger that
// counts each KEK's encryptions.
#include <algorithm>

#include "sqlite_store_impl.h"

namespace custody::core::sqlite {

namespace {
constexpr const char* kKekColumns = "id, project_id, version, token_id, label, encryptions_reserved, created_at, state";
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
  if (!lease.ok()) return lease.error();
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
  if (!lease.ok()) return lease.error();
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
  if (!lease.ok()) return lease.error();
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
  if (!lease.ok()) return lease.error();
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
  if (!lease.ok()) return lease.error();
  // Retiring the old KEKs and recording the new one commit together: a
  // project never has two active KEKs, nor none.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  if (fence != nullptr) {
    // Renewed in this transaction: under the write lock, so no other
    // process can take the lock between this check and the commit.
    CUSTODY_RETURN_IF_ERROR(RenewHere(fence->name, fence->holder, Now() + fence->ttl));
  }
  {
    Stmt s(db(), "UPDATE keks SET state = 'retiring' WHERE project_id = ? AND state = 'active'");
    s.Bind(1, project_id);
    int rc = s.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "retiring KEK");
  }
  {
    Stmt s(db(), "INSERT INTO keks(project_id, version, token_id, label, created_at, material) VALUES (?, ?, ?, ?, ?, ?)");
    s.Bind(1, project_id).Bind(2, kek.version).Bind(3, kek.id).Bind(4, label).Bind(5, now);
    if (!material.empty()) s.Bind(6, material);
    int rc = s.Step();
    if ((rc & 0xff) == SQLITE_CONSTRAINT) {
      return Error(Category::kUnavailable,
                   "KEK version " + std::to_string(kek.version) + " was recorded by a concurrent rotation");
    }
    if (rc != SQLITE_DONE) return Fail(rc, "recording KEK");
  }
  int64_t id = sqlite3_last_insert_rowid(db());
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
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
  if (!lease.ok()) return lease.error();
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
  if (!lease.ok()) return lease.error();
  Stmt s(db(), "SELECT count(*) FROM secret_versions WHERE kek_id = ?");
  s.Bind(1, kek_record_id);
  int rc = s.Step();
  if (rc != SQLITE_ROW) return Fail(rc, "counting sealed versions");
  return static_cast<uint64_t>(s.Int(0));
}

Result<size_t> SqliteStore::ReplaceSealed(int64_t from, int64_t to, const std::vector<Resealed>& items) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // A batch lands whole. `kek_id = from` skips a row that changed since it
  // was read (deleted, trimmed, or re-sealed by another run).
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  size_t replaced = 0;
  for (const auto& it : items) {
    Stmt s(db(), "UPDATE secret_versions SET blob = ?, kek_id = ? WHERE secret_id = ? AND version = ? AND kek_id = ?");
    s.Bind(1, it.blob).Bind(2, to).Bind(3, it.secret_id).Bind(4, static_cast<int64_t>(it.version)).Bind(5, from);
    int rc = s.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "storing re-sealed versions");
    replaced += static_cast<size_t>(sqlite3_changes(db()));
  }
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
  return replaced;
}

Status SqliteStore::SetKekState(int64_t kek_record_id, KekState state) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  if (state == KekState::kDestroying) {
    // Under the write lock: no put can add a blob under a KEK that is not
    // active (AddVersion checks), so a zero here stays zero.
    Stmt c(db(), "SELECT count(*) FROM secret_versions WHERE kek_id = ?");
    c.Bind(1, kek_record_id);
    int rc = c.Step();
    if (rc != SQLITE_ROW) return Fail(rc, "counting sealed versions");
    if (c.Int(0) > 0) {
      return Error(Category::kUnavailable,
                   std::to_string(c.Int(0)) + " sealed versions still need this KEK; refusing to destroy it");
    }
  }
  // A destroyed KEK's backend material (the TPM's sealed object) goes too:
  // without it the old KEK can never be unsealed again.
  Stmt s(db(), state == KekState::kDestroyed ? "UPDATE keks SET state = ?, material = NULL WHERE id = ?"
                                              : "UPDATE keks SET state = ? WHERE id = ?");
  s.Bind(1, std::string(KekStateName(state))).Bind(2, kek_record_id);
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "changing KEK state");
  // As on PostgreSQL: an id that names no KEK record is said, not ignored.
  if (sqlite3_changes(db()) == 0) return Error(Category::kNotFound, "no KEK record " + std::to_string(kek_record_id));
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
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
  if (!lease.ok()) return lease.error();
  std::string sql = std::string("SELECT ") + kKekColumns + " FROM keks ORDER BY project_id, version";
  Stmt s(db(), sql.c_str());
  std::vector<KekRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back(ReadKek(s));
  if (rc != SQLITE_DONE) return Fail(rc, "listing KEKs");
  return out;
}

Status SqliteStore::Reserve(const KekRef& kek, uint64_t n, uint64_t limit) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
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

}  // namespace custody::core::sqlite
