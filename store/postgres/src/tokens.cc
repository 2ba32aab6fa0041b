// Access tokens of the Vault-compatible API, by keyed hash (never the token).
#include "pg_store_impl.h"

namespace custody::core::pg {
namespace {

constexpr const char* kColumns =
    "accessor, principal, issued_by, issued_at, ttl, expires_at, max_expires_at, revoked_at";
constexpr int64_t kForgetAfter = 86400;

AccessTokenRecord Read(const Res& r, int row) {
  AccessTokenRecord t{r.Text(row, 0), r.Text(row, 1), r.Text(row, 2), r.Int(row, 3),
                      r.Int(row, 4),  r.Int(row, 5),  r.Int(row, 6),  std::nullopt};
  if (!r.null(row, 7)) t.revoked_at = r.Int(row, 7);
  return t;
}

}  // namespace

Status PgStore::AddAccessToken(const std::string& hash, const AccessTokenRecord& t, int64_t now) {
  auto done = InTx<bool>([&](Session& s) -> Result<bool> {
    CUSTODY_RETURN_IF_ERROR(s.Run("DELETE FROM access_tokens WHERE expires_at < $1 OR revoked_at < $1",
                                  Params().Add(now - kForgetAfter)));
    CUSTODY_RETURN_IF_ERROR(
        s.Run("INSERT INTO access_tokens(token_hash, accessor, principal, issued_by, issued_at, ttl, expires_at, "
              "max_expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
              Params().Add(hash).Add(t.accessor).Add(t.principal).Add(t.issued_by).Add(t.issued_at).Add(t.ttl)
                  .Add(t.expires_at).Add(t.max_expires_at)));
    return true;
  });
  if (!done) return std::move(done).error();
  return Status::Ok();
}

Result<AccessTokenRecord> PgStore::FindAccessToken(const std::string& hash) {
  Session s(*this);
  if (!s.ok()) return s.error();
  static const std::string sql = std::string("SELECT ") + kColumns + " FROM access_tokens WHERE token_hash = $1";
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(sql.c_str(), Params().Add(hash)));
  if (r.rows() == 0) return Error(Category::kNotFound, "no such access token");
  return Read(r, 0);
}

Status PgStore::SetAccessTokenExpiry(const std::string& hash, int64_t expires_at) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run("UPDATE access_tokens SET expires_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL",
                   Params().Add(expires_at).Add(hash)));
  if (r.affected() == 0) return Error(Category::kNotFound, "no such access token");
  return Status::Ok();
}

Result<size_t> PgStore::RevokeAccessTokens(const std::string& accessor, const std::string& principal, int64_t now) {
  if (accessor.empty() == principal.empty()) {
    return Error(Category::kUsage, "revoke tokens by accessor or by principal (one of the two)");
  }
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run(accessor.empty()
                       ? "UPDATE access_tokens SET revoked_at = $1 WHERE principal = $2 AND revoked_at IS NULL"
                       : "UPDATE access_tokens SET revoked_at = $1 WHERE accessor = $2 AND revoked_at IS NULL",
                   Params().Add(now).Add(accessor.empty() ? principal : accessor)));
  return static_cast<size_t>(r.affected());
}

Result<std::vector<AccessTokenRecord>> PgStore::ListAccessTokens() {
  Session s(*this);
  if (!s.ok()) return s.error();
  static const std::string sql =
      std::string("SELECT ") + kColumns + " FROM access_tokens ORDER BY issued_at DESC, accessor";
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(sql.c_str()));
  std::vector<AccessTokenRecord> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back(Read(r, i));
  return out;
}

}  // namespace custody::core::pg
