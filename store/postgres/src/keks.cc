// KEK records: the current one, rotation (a new KEK, re-sealed blobs, the
// states a retired one goes through), backend material, and the ledger that
// counts each KEK's encryptions.
#include <algorithm>

#include "pg_store_impl.h"

namespace custody::core::pg {

namespace {
constexpr const char* kKekColumns =
    "id, project_id, version, token_id, label, encryptions_reserved, created_at, state";
}  // namespace

KekRecord ReadKek(const Res& r, int row, int first) {
  KekRecord k;
  k.id = r.Int(row, first + 0);
  k.project_id = r.Int(row, first + 1);
  k.ref.version = static_cast<uint32_t>(r.Int(row, first + 2));
  auto id = r.Bytes(row, first + 3);
  std::copy_n(id.begin(), std::min(id.size(), k.ref.id.size()), k.ref.id.begin());
  k.label = r.Text(row, first + 4);
  k.encryptions_reserved = static_cast<uint64_t>(r.Int(row, first + 5));
  k.created_at = r.Int(row, first + 6);
  k.state = ParseKekState(r.Text(row, first + 7));
  return k;
}

namespace {
std::string KekSql(const char* rest) { return std::string("SELECT ") + kKekColumns + " FROM keks " + rest; }
}  // namespace

Result<KekRecord> PgStore::CurrentKek(int64_t project_id) {
  Session s(*this);
  if (!s.ok()) return s.error();
  static const std::string sql = KekSql("WHERE project_id = $1 AND state = 'active' ORDER BY version DESC LIMIT 1");
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(sql.c_str(), Params().Add(project_id)));
  if (r.rows() == 0) return Error(Category::kIntegrity, "project has no active KEK in the store");
  return ReadKek(r, 0);
}

Result<KekRecord> PgStore::KekById(int64_t id) {
  Session s(*this);
  if (!s.ok()) return s.error();
  static const std::string sql = KekSql("WHERE id = $1");
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(sql.c_str(), Params().Add(id)));
  if (r.rows() == 0) return Error(Category::kIntegrity, "store names a KEK record that does not exist");
  return ReadKek(r, 0);
}

Result<std::vector<KekRecord>> PgStore::ProjectKeks(int64_t project_id) {
  Session s(*this);
  if (!s.ok()) return s.error();
  static const std::string sql = KekSql("WHERE project_id = $1 ORDER BY version");
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(sql.c_str(), Params().Add(project_id)));
  std::vector<KekRecord> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back(ReadKek(r, i));
  return out;
}

Result<std::vector<KekRecord>> PgStore::ListKeks() {
  Session s(*this);
  if (!s.ok()) return s.error();
  static const std::string sql = KekSql("ORDER BY project_id, version");
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(sql.c_str()));
  std::vector<KekRecord> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back(ReadKek(r, i));
  return out;
}

Result<std::vector<uint8_t>> PgStore::KekMaterial(const KekRef& kek) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT material FROM keks WHERE token_id = $1 AND version = $2",
                                        Params().AddBytes(kek.id).Add(static_cast<int64_t>(kek.version))));
  if (r.rows() == 0) return Error(Category::kNotFound, "the store has no KEK record for this blob's KEK");
  if (r.null(0, 0)) return std::vector<uint8_t>();
  return r.Bytes(0, 0);
}

Result<KekRecord> PgStore::AddKek(int64_t project_id, const KekRef& kek, const std::string& label, int64_t now,
                                  const std::vector<uint8_t>& material, const LockFence* fence) {
  return InTx<KekRecord>([&](Session& s) -> Result<KekRecord> {
    if (fence != nullptr) {
      // The renewal's row lock holds until this transaction ends: no other
      // process can take the lock between this check and the commit.
      CUSTODY_RETURN_IF_ERROR(RenewHere(s, fence->name, fence->holder, fence->ttl));
    }
    // Retiring the old KEKs and recording the new one commit together: a
    // project never has two active KEKs, nor none. The UPDATE waits for any
    // put holding a KEK row FOR SHARE (AddVersion) to land first.
    CUSTODY_RETURN_IF_ERROR(
        s.Run("UPDATE keks SET state = 'retiring' WHERE project_id = $1 AND state = 'active'", Params().Add(project_id)));
    Params p;
    p.Add(project_id).Add(static_cast<int64_t>(kek.version)).AddBytes(kek.id).Add(label).Add(now);
    if (material.empty()) {
      p.AddNull();
    } else {
      p.AddBytes(material);
    }
    auto r = s.Run("INSERT INTO keks(project_id, version, token_id, label, created_at, material) "
                   "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                   p);
    if (!r && HasSqlState(r.error(), "23505")) {
      return Error(Category::kUnavailable,
                   "KEK version " + std::to_string(kek.version) + " was recorded by a concurrent rotation");
    }
    if (!r) return std::move(r).error();
    KekRecord k;
    k.id = r->Int(0, 0);
    k.project_id = project_id;
    k.ref = kek;
    k.label = label;
    k.created_at = now;
    return k;
  });
}

Result<std::vector<SealedItem>> PgStore::SealedUnder(int64_t kek_record_id, std::pair<int64_t, uint32_t> after,
                                                     size_t limit) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run("SELECT v.secret_id, e.name, s.name, v.version, v.blob FROM secret_versions v "
                   "JOIN secrets s ON s.id = v.secret_id JOIN environments e ON e.id = s.environment_id "
                   "WHERE v.kek_id = $1 AND (v.secret_id, v.version) > ($2, $3) ORDER BY v.secret_id, v.version "
                   "LIMIT $4",
                   Params().Add(kek_record_id).Add(after.first).Add(static_cast<int64_t>(after.second))
                       .Add(static_cast<int64_t>(limit))));
  std::vector<SealedItem> out;
  for (int i = 0; i < r.rows(); ++i) {
    out.push_back({r.Int(i, 0), r.Text(i, 1), r.Text(i, 2), static_cast<uint32_t>(r.Int(i, 3)), r.Bytes(i, 4)});
  }
  return out;
}

Result<uint64_t> PgStore::CountSealedUnder(int64_t kek_record_id) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT count(*) FROM secret_versions WHERE kek_id = $1",
                                        Params().Add(kek_record_id)));
  return static_cast<uint64_t>(r.Int(0, 0));
}

Result<size_t> PgStore::ReplaceSealed(int64_t from, int64_t to, const std::vector<Resealed>& items) {
  // A batch lands whole. `kek_id = from` skips a row that changed since it
  // was read (deleted, trimmed, or re-sealed by another run).
  return InTx<size_t>([&](Session& s) -> Result<size_t> {
    size_t replaced = 0;
    for (const auto& it : items) {
      CUSTODY_ASSIGN_OR_RETURN(
          Res r, s.Run("UPDATE secret_versions SET blob = $1, kek_id = $2 "
                       "WHERE secret_id = $3 AND version = $4 AND kek_id = $5",
                       Params().AddBytes(it.blob).Add(to).Add(it.secret_id).Add(static_cast<int64_t>(it.version))
                           .Add(from)));
      replaced += static_cast<size_t>(r.affected());
    }
    return replaced;
  });
}

Status PgStore::SetKekState(int64_t kek_record_id, KekState state) {
  auto r = InTx<bool>([&](Session& s) -> Result<bool> {
    // The KEK row locked first: a put that read it as active (FOR SHARE)
    // has landed before this count, and no later put passes its state check
    // (AddVersion), so a zero here stays zero.
    CUSTODY_ASSIGN_OR_RETURN(Res k, s.Run("SELECT state FROM keks WHERE id = $1 FOR UPDATE", Params().Add(kek_record_id)));
    if (k.rows() == 0) return Error(Category::kNotFound, "no KEK record " + std::to_string(kek_record_id));
    if (state == KekState::kDestroying) {
      CUSTODY_ASSIGN_OR_RETURN(Res c, s.Run("SELECT count(*) FROM secret_versions WHERE kek_id = $1",
                                            Params().Add(kek_record_id)));
      if (c.Int(0, 0) > 0) {
        return Error(Category::kUnavailable,
                     std::to_string(c.Int(0, 0)) + " sealed versions still need this KEK; refusing to destroy it");
      }
    }
    // A destroyed KEK's backend material (the TPM's sealed object) goes too.
    // (PostgreSQL keeps the old row version until VACUUM: docs/STORE.md.)
    const char* sql = state == KekState::kDestroyed ? "UPDATE keks SET state = $1, material = NULL WHERE id = $2"
                                                    : "UPDATE keks SET state = $1 WHERE id = $2";
    CUSTODY_RETURN_IF_ERROR(s.Run(sql, Params().Add(std::string(KekStateName(state))).Add(kek_record_id)));
    return true;
  });
  if (!r) return std::move(r).error();
  return Status::Ok();
}

Status PgStore::Reserve(const KekRef& kek, uint64_t n, uint64_t limit) {
  Session s(*this);
  if (!s.ok()) return s.error();
  // One statement: the check and the charge are atomic on the row.
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run("UPDATE keks SET encryptions_reserved = encryptions_reserved + $1 "
                   "WHERE token_id = $2 AND encryptions_reserved + $1 <= $3",
                   Params().Add(static_cast<int64_t>(n)).AddBytes(kek.id).Add(static_cast<int64_t>(limit))));
  if (r.affected() == 1) return Status::Ok();
  CUSTODY_ASSIGN_OR_RETURN(Res e, s.Run("SELECT label FROM keks WHERE token_id = $1", Params().AddBytes(kek.id)));
  if (e.rows() == 0) return Error(Category::kIntegrity, "KEK is not recorded in the store");
  return Error(Category::kLimit, "KEK " + e.Text(0, 0) + " has reached its limit of " + std::to_string(limit) +
                                     " encryptions; rotate the project's KEK");
}

}  // namespace custody::core::pg
