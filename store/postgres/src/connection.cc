// The connection pool, statements, error mapping and COMMIT.
#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "custody/common/untrusted.h"
#include "pg_store_impl.h"

namespace custody::core::pg {

uint64_t PackSqlState(std::string_view state) {
  uint64_t v = 0;
  for (size_t i = 0; i < state.size() && i < 5; ++i) v = (v << 8) | static_cast<uint8_t>(state[i]);
  return v;
}

bool HasSqlState(const Error& e, std::string_view state) {
  return e.backend() == Backend::kStore && e.code() == PackSqlState(state);
}

int64_t Res::affected() const { return std::strtoll(PQcmdTuples(r_), nullptr, 10); }

int64_t Res::Int(int row, int col) const { return std::strtoll(PQgetvalue(r_, row, col), nullptr, 10); }

double Res::Double(int row, int col) const { return std::strtod(PQgetvalue(r_, row, col), nullptr); }

std::vector<uint8_t> Res::Bytes(int row, int col) const {
  const char* v = PQgetvalue(r_, row, col);
  const size_t n = static_cast<size_t>(PQgetlength(r_, row, col));
  std::vector<uint8_t> out;
  // bytea_output = hex (set on every connection): "\x" then two digits a byte.
  if (n < 2 || v[0] != '\\' || v[1] != 'x') return out;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  out.reserve((n - 2) / 2);
  for (size_t i = 2; i + 1 < n; i += 2) {
    int hi = nibble(v[i]), lo = nibble(v[i + 1]);
    if (hi < 0 || lo < 0) return {};
    out.push_back(static_cast<uint8_t>((hi << 4) | lo));
  }
  return out;
}

Params& Params::Add(double v) {
  // 17 significant digits: the double comes back bit for bit.
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return Push(buf, false);
}

Session::Session(PgStore& store, bool relaxed) : store_(store), relaxed_(relaxed) {
  auto& pool = relaxed_ ? store_.relaxed_free_ : store_.free_;
  {
    std::unique_lock lock(store_.pool_mu_);
    const auto deadline = std::chrono::steady_clock::now() + PgStore::kLeaseWait;
    while (pool.empty() && store_.open_ >= PgStore::kMaxConnections) {
      if (store_.pool_cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
        error_ = Error(Category::kUnavailable, "store " + store_.where_ + ": all " +
                                                   std::to_string(PgStore::kMaxConnections) +
                                                   " connections stayed busy for " +
                                                   std::to_string(PgStore::kLeaseWait.count()) + " s");
        return;
      }
    }
    if (!pool.empty()) {
      conn_ = std::move(pool.back());
      pool.pop_back();
    } else {
      ++store_.open_;  // a slot for the connection opened below
    }
  }
  // A pooled connection the server has since closed (a restart, an idle
  // timeout) shows as CONNECTION_BAD only after a call fails on it; those
  // are marked broken then and never come back here.
  if (!conn_) {
    auto c = store_.Open(relaxed_);
    if (!c) {
      error_ = std::move(c).error();
      std::lock_guard lock(store_.pool_mu_);
      --store_.open_;
      store_.pool_cv_.notify_one();
      return;
    }
    conn_ = std::move(*c);
  }
}

Session::~Session() {
  if (!conn_) return;
  // A connection left inside a transaction (a ROLLBACK that could not be
  // sent) or in any state but idle is not lent to anyone again.
  if (!conn_->broken && (PQstatus(conn_->pg) != CONNECTION_OK || PQtransactionStatus(conn_->pg) != PQTRANS_IDLE)) {
    conn_->broken = true;
  }
  std::lock_guard lock(store_.pool_mu_);
  if (conn_->broken) {
    conn_.reset();
    --store_.open_;
  } else {
    (relaxed_ ? store_.relaxed_free_ : store_.free_).push_back(std::move(conn_));
  }
  store_.pool_cv_.notify_one();
}

Error Session::Fail(const PGresult* r, std::string_view what) {
  const char* state = r != nullptr ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  const char* primary = r != nullptr ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : nullptr;
  std::string reason = primary != nullptr ? primary : PQerrorMessage(conn_->pg);
  while (!reason.empty() && (reason.back() == '\n' || reason.back() == ' ')) reason.pop_back();
  if (reason.empty()) reason = "no answer from the server";
  // The server's words may quote names; escaped, never raw.
  reason = EscapeUntrusted(reason, 300);
  const std::string_view st = state != nullptr ? std::string_view(state) : std::string_view();
  const std::string prefix = "store " + store_.where_ + ": " + std::string(what) + ": ";
  Category c = Category::kInternal;
  std::string msg = prefix + reason;
  const bool lost = PQstatus(conn_->pg) != CONNECTION_OK || st.empty() || st.starts_with("08") ||
                    st == "57P01" || st == "57P02" || st == "57P03";
  if (lost) {
    conn_->broken = true;
    c = Category::kUnavailable;
    msg = prefix + "the connection to PostgreSQL was lost (" + reason + ")";
  } else if (st == "25006") {
    c = Category::kUnavailable;
    msg = prefix + "the database is read-only (a standby, or default_transaction_read_only is on): " + reason;
  } else if (st.starts_with("53")) {
    // 53100 disk full, 53200 out of memory, 53300 too many connections.
    c = Category::kUnavailable;
  } else if (st == "57014" || st == "55P03" || st == "40001" || st == "40P01") {
    // statement or lock timeout; serialization failure or deadlock (retried
    // by InTx, and unavailable if that did not help).
    c = Category::kUnavailable;
  } else if (st.starts_with("22")) {
    c = Category::kUsage;  // a value PostgreSQL cannot store (not UTF-8, a NUL)
  }
  return Error(c, std::move(msg), Backend::kStore, PackSqlState(st));
}

Result<Res> Session::Run(const char* sql, const Params& params) {
  std::string& name = conn_->prepared[sql];
  if (name.empty()) {
    std::string fresh = "c" + std::to_string(conn_->prepared.size());
    Res p(PQprepare(conn_->pg, fresh.c_str(), sql, 0, nullptr));
    if (PQresultStatus(p.raw()) != PGRES_COMMAND_OK) {
      conn_->prepared.erase(sql);
      return Fail(p.raw(), "preparing a statement");
    }
    name = std::move(fresh);
  }
  const int n = params.size();
  std::vector<const char*> values(static_cast<size_t>(n));
  std::vector<int> lengths(static_cast<size_t>(n)), formats(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const size_t k = static_cast<size_t>(i);
    values[k] = params.null_[k] ? nullptr : params.values_[k].data();
    lengths[k] = static_cast<int>(params.values_[k].size());
    formats[k] = params.binary_[k] ? 1 : 0;
  }
  Res r(PQexecPrepared(conn_->pg, name.c_str(), n, values.data(), lengths.data(), formats.data(), 0));
  const auto status = PQresultStatus(r.raw());
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) return Fail(r.raw(), "running a statement");
  return r;
}

Status Session::Exec(const char* sql) {
  Res r(PQexec(conn_->pg, sql));
  const auto status = PQresultStatus(r.raw());
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) return Fail(r.raw(), "running a statement");
  return Status::Ok();
}

Status Session::Commit() {
  Res r(PQexec(conn_->pg, "COMMIT"));
  if (PQresultStatus(r.raw()) == PGRES_COMMAND_OK) return Status::Ok();
  Error e = Fail(r.raw(), "committing");
  if (conn_->broken) {
    // COMMIT went out and no answer came back: the transaction may have
    // committed or not. Saying "failed" could make a caller redo a write
    // that landed.
    commit_unknown_ = true;
    return Error(Category::kUnavailable,
                 "store " + store_.where_ + ": the connection was lost after COMMIT was sent; whether the write "
                 "landed is unknown",
                 Backend::kStore, e.code());
  }
  return e;
}

void Session::Rollback() {
  if (conn_->broken) return;
  Res r(PQexec(conn_->pg, "ROLLBACK"));
  if (PQresultStatus(r.raw()) != PGRES_COMMAND_OK) conn_->broken = true;
}

}  // namespace custody::core::pg
