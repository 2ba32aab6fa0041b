// Usage counts and rate and spend limits.
#include "custody/policy/limits.h"
#include "sqlite_store_impl.h"

namespace custody::core::sqlite {

// Usage counters and limit buckets are bookkeeping, not custody data: their
// commits skip the fsync (relaxed connections: WAL with synchronous=NORMAL
// stays consistent and loses at most the last moments of counts on power
// loss), so charging a limit does not put a disk flush on every request. The
// audit log is the durable record of each operation; secrets, KEKs and
// policies keep FULL.
Status SqliteStore::RecordLocked(const UsageKey& key, UsageEvent event, int64_t now) {
  const char* column = "unseals";
  switch (event) {
    case UsageEvent::kUnseal: column = "unseals"; break;
    case UsageEvent::kSeal: column = "seals"; break;
    case UsageEvent::kDenied: column = "denied"; break;
    case UsageEvent::kRateLimited: column = "rate_limited"; break;
    case UsageEvent::kSpendLimited: column = "spend_limited"; break;
  }
  std::string sql = std::string("INSERT INTO usage(project, environment, principal, day, ") + column +
                    ", last_use) VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(project, environment, principal, day) "
                    "DO UPDATE SET " + column + " = " + column + " + 1, last_use = excluded.last_use";
  Stmt s(db(), sql.c_str());
  s.Bind(1, key.project).Bind(2, key.environment).Bind(3, key.principal).Bind(4, policy::DayKey(now)).Bind(5, now);
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "recording usage");
  return Status::Ok();
}

Status SqliteStore::Record(const UsageKey& key, UsageEvent event, int64_t now) {
  Lease lease(*this, /*relaxed=*/true);
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  CUSTODY_RETURN_IF_ERROR(RecordLocked(key, event, now));
  return tx.Commit();
}

Status SqliteStore::AddUsage(const std::vector<UsageCount>& counts) {
  if (counts.empty()) return Status::Ok();
  Lease lease(*this, /*relaxed=*/true);
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  for (const auto& c : counts) {
    Stmt s(db(), "INSERT INTO usage(project, environment, principal, day, unseals, seals, denied, rate_limited, "
                 "spend_limited, last_use) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT(project, environment, principal, day) DO UPDATE SET "
                 "unseals = unseals + excluded.unseals, seals = seals + excluded.seals, "
                 "denied = denied + excluded.denied, rate_limited = rate_limited + excluded.rate_limited, "
                 "spend_limited = spend_limited + excluded.spend_limited, "
                 "last_use = max(last_use, excluded.last_use)");
    s.Bind(1, c.key.project).Bind(2, c.key.environment).Bind(3, c.key.principal).Bind(4, c.day);
    for (int i = 0; i < 5; ++i) s.Bind(5 + i, static_cast<int64_t>(c.by_event[i]));
    s.Bind(10, c.last_use);
    int rc = s.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "recording usage");
  }
  return tx.Commit();
}

Result<Admission> SqliteStore::Admit(const UsageKey& key, const std::vector<policy::LimitRule>& rules,
                                     UsageEvent event, double now) {
  Lease lease(*this, /*relaxed=*/true);
  if (!lease.ok()) return lease.error();
  const int64_t now_s = static_cast<int64_t>(now);
  // Every bucket and budget is read and charged under one write lock, by
  // every process: two requests cannot both spend the last token.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  auto refuse = [&](UsageEvent why, std::string limit, double retry) -> Result<Admission> {
    // The refusal is recorded and committed: it is usage too.
    CUSTODY_RETURN_IF_ERROR(RecordLocked(key, why, now_s));
    CUSTODY_RETURN_IF_ERROR(tx.Commit());
    return Admission{false, std::move(limit), static_cast<int64_t>(retry + 0.999)};
  };
  std::vector<std::pair<std::string, policy::Bucket>> updates;
  for (const auto& r : rules) {
    if (r.kind == policy::LimitRule::kRate) {
      Stmt b(db(), "SELECT tokens, updated_at FROM buckets WHERE key = ?");
      b.Bind(1, r.key);
      policy::Bucket bucket;
      int rc = b.Step();
      if (rc == SQLITE_ROW) {
        bucket.tokens = sqlite3_column_double(b.raw(), 0);
        bucket.updated_at = sqlite3_column_double(b.raw(), 1);
      } else if (rc != SQLITE_DONE) {
        return Fail(rc, "reading a rate limit");
      }
      auto t = policy::TakeToken(bucket, r.rate, now);
      if (!t.allowed) return refuse(UsageEvent::kRateLimited, r.label, t.retry_after_seconds);
      updates.emplace_back(r.key, t.next);
    } else if (event == UsageEvent::kUnseal) {
      bool daily = r.kind == policy::LimitRule::kUnsealsPerDay;
      std::string window = daily ? policy::DayKey(now_s) : policy::MonthKey(now_s) + "-%";
      std::string sql = std::string("SELECT coalesce(sum(unseals), 0) FROM usage WHERE project = ? ") +
                        (r.environment.empty() ? "" : "AND environment = ? ") +
                        (daily ? "AND day = ?" : "AND day LIKE ?");
      Stmt c(db(), sql.c_str());
      int i = 1;
      c.Bind(i++, r.project);
      if (!r.environment.empty()) c.Bind(i++, r.environment);
      c.Bind(i++, window);
      int rc = c.Step();
      if (rc != SQLITE_ROW) return Fail(rc, "reading usage");
      if (static_cast<uint64_t>(c.Int(0)) >= r.limit) {
        int64_t end = daily ? policy::EndOfDay(now_s) : policy::EndOfMonth(now_s);
        return refuse(UsageEvent::kSpendLimited, r.label, static_cast<double>(end - now_s));
      }
    }
  }
  for (const auto& [k, b] : updates) {
    Stmt u(db(), "INSERT INTO buckets(key, tokens, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at");
    u.Bind(1, k);
    sqlite3_bind_double(u.raw(), 2, b.tokens);
    sqlite3_bind_double(u.raw(), 3, b.updated_at);
    int rc = u.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "updating a rate limit");
  }
  CUSTODY_RETURN_IF_ERROR(RecordLocked(key, event, now_s));
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
  return Admission{};
}

Result<std::vector<UsageRow>> SqliteStore::Usage(const std::optional<std::string>& project, int64_t now) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(),
         "SELECT project, environment, principal, sum(unseals), sum(seals), sum(denied), sum(rate_limited), "
         "sum(spend_limited), sum(CASE WHEN day = ?2 THEN unseals ELSE 0 END), max(last_use) FROM usage "
         "WHERE (?1 IS NULL OR project = ?1) GROUP BY project, environment, principal "
         "ORDER BY project, environment, principal");
  if (project) s.Bind(1, *project);
  s.Bind(2, policy::DayKey(now));
  std::vector<UsageRow> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    UsageRow r;
    r.project = s.Text(0);
    r.environment = s.Text(1);
    r.principal = s.Text(2);
    r.unseals = static_cast<uint64_t>(s.Int(3));
    r.seals = static_cast<uint64_t>(s.Int(4));
    r.denied = static_cast<uint64_t>(s.Int(5));
    r.rate_limited = static_cast<uint64_t>(s.Int(6));
    r.spend_limited = static_cast<uint64_t>(s.Int(7));
    r.unseals_today = static_cast<uint64_t>(s.Int(8));
    r.last_use = s.Int(9);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return Fail(rc, "reading usage");
  return out;
}

}  // namespace custody::core::sqlite
