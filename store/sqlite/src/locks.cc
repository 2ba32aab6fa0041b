// Named locks with an expiry, shared by every process that opens the store.
#include "sqlite_store_impl.h"

namespace custody::core::sqlite {

// The clock is this host's: a SQLite store is one file on one host.
Result<std::optional<HeldLock>> SqliteStore::TakeLock(const std::string& name, const LockHolder& me, int64_t ttl,
                                                      const std::function<bool(const LockHolder&)>& gone) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // Read and claim under one write lock, so two takers cannot both win
  // (`gone` is asked with it held, so it must be quick). Finding another
  // holder ends the transaction with nothing written.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  const int64_t now = Now();
  {
    Stmt q(db(), "SELECT holder_host, holder_pid, holder_started, holder_instance, expires_at FROM locks WHERE name = ?");
    q.Bind(1, name);
    int rc = q.Step();
    if (rc == SQLITE_ROW) {
      HeldLock other{name, LockHolder{q.Text(0), q.Int(1), q.Int(2), q.Text(3)}, q.Int(4)};
      if (!(other.holder == me) && other.expires_at > now && !(gone && gone(other.holder))) {
        return std::optional<HeldLock>(std::move(other));
      }
    } else if (rc != SQLITE_DONE) {
      return Fail(rc, "reading lock " + name);
    }
  }
  Stmt w(db(),
         "INSERT OR REPLACE INTO locks(name, holder_host, holder_pid, holder_started, holder_instance, expires_at) "
         "VALUES (?, ?, ?, ?, ?, ?)");
  w.Bind(1, name).Bind(2, me.host).Bind(3, me.pid).Bind(4, me.started).Bind(5, me.instance).Bind(6, now + ttl);
  int rc = w.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "taking lock " + name);
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
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

Status SqliteStore::RenewLock(const std::string& name, const LockHolder& me, int64_t ttl) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  return RenewHere(name, me, Now() + ttl);
}

Status SqliteStore::ReleaseLock(const std::string& name, const LockHolder& me) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(),
         "DELETE FROM locks WHERE name = ? AND holder_host = ? AND holder_pid = ? AND holder_started = ? AND "
         "holder_instance = ?");
  s.Bind(1, name).Bind(2, me.host).Bind(3, me.pid).Bind(4, me.started).Bind(5, me.instance);
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "releasing lock " + name);
  return Status::Ok();
}

}  // namespace custody::core::sqlite
