// The connection pool, SQL execution, error mapping and the transaction.
#include <cassert>

#include "sqlite_store_impl.h"

namespace custody::core::sqlite {

thread_local const SqliteStore* SqliteStore::tls_writer = nullptr;

Error SqliteStore::Fail(int rc, std::string_view what) const {
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

Status SqliteStore::Exec(const char* sql, bool single) {
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

void SqliteStore::EndWrite() {
  if (tls_writer != this) return;  // not in a transaction of ours
  tls_writer = nullptr;
  write_mu_.unlock();
}

SqliteStore::Lease::Lease(SqliteStore& s, bool relaxed) : s_(s), prev_(tls_conn), relaxed_(relaxed) {
  // Checked once per outermost lease: a stat, far below a statement's cost.
  if (prev_ == nullptr) {
    if (auto gone = s_.CheckFile()) {
      error_ = std::move(gone);
      return;
    }
  }
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

Error SqliteStore::Lease::error() const {
  if (error_) return *error_;
  return Error(Category::kUnavailable, "store " + s_.path_ + ": cannot open another connection");
}

std::optional<Error> SqliteStore::CheckFile() const {
  if (!pinned_) return std::nullopt;
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0) {
    return Error(Category::kUnavailable,
                 "store " + path_ + " is gone (deleted or moved away while this process runs); refusing to read or "
                 "write a file no longer at its path: put it back, or restart on a restored copy",
                 Backend::kStore, 0);
  }
  if (st.st_dev != dev_ || st.st_ino != ino_) {
    return Error(Category::kUnavailable,
                 "store " + path_ + " was replaced by another file while this process runs; refusing to go on "
                 "with the old one: put the original back, or restart to use the new one",
                 Backend::kStore, 0);
  }
  return std::nullopt;
}

SqliteStore::Lease::~Lease() {
  tls_conn = prev_;
  if (!conn_) return;
  std::lock_guard lock(s_.pool_mu_);
  (relaxed_ ? s_.relaxed_free_ : s_.free_).push_back(std::move(conn_));
}

std::unique_ptr<Conn> SqliteStore::OpenConnection(bool relaxed) {
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

// A write is BEGIN IMMEDIATE: it takes SQLite's write lock up front, so two
// writers never deadlock upgrading a read lock, and whatever a write reads
// (a KEK's state, the current version, a lock's holder) cannot change
// before it commits.
//
// Writers of this process also take turns on write_mu_ first. Without it,
// threads contending for SQLite's write lock meet its busy handler, which
// sleeps 1, 2, 5, 10 ... ms between tries: under a busy server that sleep,
// not the work, set the latency. Other processes still wait through the
// busy timeout.
Result<Transaction> Transaction::Begin(SqliteStore& store, Mode mode) {
  if (mode == kRead) {
    CUSTODY_RETURN_IF_ERROR(store.Exec("BEGIN"));
    return Transaction(store, mode);
  }
  store.write_mu_.lock();
  SqliteStore::tls_writer = &store;
  Status s = store.Exec("BEGIN IMMEDIATE");
  if (!s.ok()) {
    store.EndWrite();
    return std::move(s).error();
  }
  return Transaction(store, mode);
}

Status Transaction::Commit() {
  assert(store_ != nullptr && "a transaction ends once");
  Status s = store_->Exec("COMMIT");
  // A COMMIT that failed (SQLITE_BUSY, a full disk) leaves the transaction
  // open; the connection must not go back to the pool inside it.
  End(s.ok() ? nullptr : "ROLLBACK");
  return s;
}

Transaction::~Transaction() {
  if (store_ != nullptr) End("ROLLBACK");
}

void Transaction::End(const char* sql) {
  assert(tls_conn == conn_ && "a transaction ends on the connection it began on, before its Lease");
  if (sql != nullptr) (void)store_->Exec(sql);
  if (mode_ == kWrite) store_->EndWrite();
  store_ = nullptr;
}

}  // namespace custody::core::sqlite
