// Named locks with an expiry, shared by every node that uses the database.
// Expiry is the database server's clock (now()), never a host's: two hosts
// whose clocks disagree cannot both hold a lock. The model is OpenBao's
// PostgreSQL HA lock: one upsert that takes the row only from an expired
// holder or from ourselves.
#include "pg_store_impl.h"

namespace custody::core::pg {
namespace {

constexpr const char* kDbNow = "extract(epoch from now())::bigint";

Params& Holder(Params& p, const LockHolder& h) { return p.Add(h.host).Add(h.pid).Add(h.started).Add(h.instance); }

}  // namespace

Result<std::optional<HeldLock>> PgStore::TakeLock(const std::string& name, const LockHolder& me, int64_t ttl,
                                                  const std::function<bool(const LockHolder&)>& gone) {
  Session s(*this);
  if (!s.ok()) return s.error();
  static const std::string take =
      std::string("INSERT INTO locks(name, holder_host, holder_pid, holder_started, holder_instance, expires_at) "
                  "VALUES ($1, $2, $3, $4, $5, ") + kDbNow + " + $6) ON CONFLICT (name) DO UPDATE SET "
                  "holder_host = excluded.holder_host, holder_pid = excluded.holder_pid, "
                  "holder_started = excluded.holder_started, holder_instance = excluded.holder_instance, "
                  "expires_at = excluded.expires_at WHERE locks.expires_at <= " + kDbNow +
                  " OR (locks.holder_host = excluded.holder_host AND locks.holder_pid = excluded.holder_pid AND "
                  "locks.holder_started = excluded.holder_started AND locks.holder_instance = excluded.holder_instance) "
                  "RETURNING expires_at";
  // A holder that `gone` says has ended is replaced only if it still holds
  // the same lease (compare and swap): a renewal in between wins.
  static const std::string take_over =
      std::string("UPDATE locks SET holder_host = $6, holder_pid = $7, holder_started = $8, holder_instance = $9, "
                  "expires_at = ") + kDbNow + " + $10 WHERE name = $1 AND holder_host = $2 AND holder_pid = $3 AND "
                  "holder_started = $4 AND holder_instance = $5 AND expires_at = $11";
  for (int attempt = 0; attempt < 3; ++attempt) {
    Params p;
    p.Add(name);
    Holder(p, me).Add(ttl);
    CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(take.c_str(), p));
    if (r.rows() == 1) return std::optional<HeldLock>();
    CUSTODY_ASSIGN_OR_RETURN(Res q, s.Run("SELECT holder_host, holder_pid, holder_started, holder_instance, expires_at "
                                          "FROM locks WHERE name = $1",
                                          Params().Add(name)));
    if (q.rows() == 0) continue;  // released meanwhile: try again
    HeldLock other{name, LockHolder{q.Text(0, 0), q.Int(0, 1), q.Int(0, 2), q.Text(0, 3)}, q.Int(0, 4)};
    if (!(gone && gone(other.holder))) return std::optional<HeldLock>(std::move(other));
    Params t;
    t.Add(name);
    Holder(t, other.holder);
    Holder(t, me).Add(ttl).Add(other.expires_at);
    CUSTODY_ASSIGN_OR_RETURN(Res w, s.Run(take_over.c_str(), t));
    if (w.affected() == 1) return std::optional<HeldLock>();
  }
  return Error(Category::kUnavailable, "lock " + name + " changed hands repeatedly while being taken; try again");
}

Status PgStore::RenewHere(Session& s, const std::string& name, const LockHolder& me, int64_t ttl) {
  static const std::string sql = std::string("UPDATE locks SET expires_at = ") + kDbNow +
                                 " + $1 WHERE name = $2 AND holder_host = $3 AND holder_pid = $4 AND "
                                 "holder_started = $5 AND holder_instance = $6";
  Params p;
  p.Add(ttl).Add(name);
  Holder(p, me);
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(sql.c_str(), p));
  if (r.affected() == 0) {
    return Error(Category::kUnavailable, "lock " + name + " is no longer ours: it expired and another process took it");
  }
  return Status::Ok();
}

Status PgStore::RenewLock(const std::string& name, const LockHolder& me, int64_t ttl) {
  Session s(*this);
  if (!s.ok()) return s.error();
  return RenewHere(s, name, me, ttl);
}

Status PgStore::ReleaseLock(const std::string& name, const LockHolder& me) {
  Session s(*this);
  if (!s.ok()) return s.error();
  Params p;
  p.Add(name);
  Holder(p, me);
  CUSTODY_RETURN_IF_ERROR(s.Run("DELETE FROM locks WHERE name = $1 AND holder_host = $2 AND holder_pid = $3 AND "
                                "holder_started = $4 AND holder_instance = $5",
                                p));
  return Status::Ok();
}

}  // namespace custody::core::pg
