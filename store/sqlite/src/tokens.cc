// Access tokens of the Vault-compatible API, by keyed hash (never the token).
#include "sqlite_store_impl.h"

namespace custody::core::sqlite {
namespace {

constexpr const char* kColumns =
    "accessor, principal, issued_by, issued_at, ttl, expires_at, max_expires_at, revoked_at";
// Kept a day past their end, so `token list` can still say why one stopped.
constexpr int64_t kForgetAfter = 86400;

AccessTokenRecord Read(Stmt& q) {
  AccessTokenRecord r{q.Text(0), q.Text(1), q.Text(2), q.Int(3), q.Int(4), q.Int(5), q.Int(6), std::nullopt};
  if (sqlite3_column_type(q.raw(), 7) != SQLITE_NULL) r.revoked_at = q.Int(7);
  return r;
}

}  // namespace

Status SqliteStore::AddAccessToken(const std::string& hash, const AccessTokenRecord& t, int64_t now) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  Stmt old(db(), "DELETE FROM access_tokens WHERE expires_at < ? OR revoked_at < ?");
  old.Bind(1, now - kForgetAfter).Bind(2, now - kForgetAfter);
  if (int rc = old.Step(); rc != SQLITE_DONE) return Fail(rc, "forgetting old access tokens");
  Stmt s(db(), "INSERT INTO access_tokens(token_hash, accessor, principal, issued_by, issued_at, ttl, expires_at, "
               "max_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)");
  s.Bind(1, hash).Bind(2, t.accessor).Bind(3, t.principal).Bind(4, t.issued_by).Bind(5, t.issued_at).Bind(6, t.ttl);
  s.Bind(7, t.expires_at).Bind(8, t.max_expires_at);
  if (int rc = s.Step(); rc != SQLITE_DONE) return Fail(rc, "storing an access token");
  return tx.Commit();
}

Result<AccessTokenRecord> SqliteStore::FindAccessToken(const std::string& hash) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt q(db(), (std::string("SELECT ") + kColumns + " FROM access_tokens WHERE token_hash = ?").c_str());
  q.Bind(1, hash);
  int rc = q.Step();
  if (rc == SQLITE_DONE) return Error(Category::kNotFound, "no such access token");
  if (rc != SQLITE_ROW) return Fail(rc, "reading an access token");
  return Read(q);
}

Status SqliteStore::SetAccessTokenExpiry(const std::string& hash, int64_t expires_at) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(), "UPDATE access_tokens SET expires_at = ? WHERE token_hash = ? AND revoked_at IS NULL");
  s.Bind(1, expires_at).Bind(2, hash);
  if (int rc = s.Step(); rc != SQLITE_DONE) return Fail(rc, "renewing an access token");
  if (sqlite3_changes(db()) == 0) return Error(Category::kNotFound, "no such access token");
  return Status::Ok();
}

Result<size_t> SqliteStore::RevokeAccessTokens(const std::string& accessor, const std::string& principal,
                                               int64_t now) {
  if (accessor.empty() == principal.empty()) {
    return Error(Category::kUsage, "revoke tokens by accessor or by principal (one of the two)");
  }
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(), accessor.empty()
                   ? "UPDATE access_tokens SET revoked_at = ? WHERE principal = ? AND revoked_at IS NULL"
                   : "UPDATE access_tokens SET revoked_at = ? WHERE accessor = ? AND revoked_at IS NULL");
  s.Bind(1, now).Bind(2, accessor.empty() ? principal : accessor);
  if (int rc = s.Step(); rc != SQLITE_DONE) return Fail(rc, "revoking access tokens");
  return static_cast<size_t>(sqlite3_changes(db()));
}

Result<std::vector<AccessTokenRecord>> SqliteStore::ListAccessTokens() {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt q(db(), (std::string("SELECT ") + kColumns + " FROM access_tokens ORDER BY issued_at DESC, accessor").c_str());
  std::vector<AccessTokenRecord> out;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) out.push_back(Read(q));
  if (rc != SQLITE_DONE) return Fail(rc, "listing access tokens");
  return out;
}

}  // namespace custody::core::sqlite
