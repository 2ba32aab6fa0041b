// Usage counts and rate and spend limits.
#include <algorithm>
#include <tuple>

#include "custody/policy/limits.h"
#include "pg_store_impl.h"

namespace custody::core::pg {

// Usage counts and limit buckets are bookkeeping, not custody data: they are
// written on relaxed connections (synchronous_commit off, see url.cc), so a
// charge per request does not wait for a WAL flush. The audit log is the
// durable record of each operation.
namespace {
const char* const kRecordSql[] = {
    // Indexed by UsageEvent.
    "INSERT INTO usage(project, environment, principal, day, unseals, last_use) VALUES ($1, $2, $3, $4, 1, $5) "
    "ON CONFLICT (project, environment, principal, day) DO UPDATE SET unseals = usage.unseals + 1, "
    "last_use = greatest(usage.last_use, excluded.last_use)",
    "INSERT INTO usage(project, environment, principal, day, seals, last_use) VALUES ($1, $2, $3, $4, 1, $5) "
    "ON CONFLICT (project, environment, principal, day) DO UPDATE SET seals = usage.seals + 1, "
    "last_use = greatest(usage.last_use, excluded.last_use)",
    "INSERT INTO usage(project, environment, principal, day, denied, last_use) VALUES ($1, $2, $3, $4, 1, $5) "
    "ON CONFLICT (project, environment, principal, day) DO UPDATE SET denied = usage.denied + 1, "
    "last_use = greatest(usage.last_use, excluded.last_use)",
    "INSERT INTO usage(project, environment, principal, day, rate_limited, last_use) VALUES ($1, $2, $3, $4, 1, $5) "
    "ON CONFLICT (project, environment, principal, day) DO UPDATE SET rate_limited = usage.rate_limited + 1, "
    "last_use = greatest(usage.last_use, excluded.last_use)",
    "INSERT INTO usage(project, environment, principal, day, spend_limited, last_use) VALUES ($1, $2, $3, $4, 1, $5) "
    "ON CONFLICT (project, environment, principal, day) DO UPDATE SET spend_limited = usage.spend_limited + 1, "
    "last_use = greatest(usage.last_use, excluded.last_use)",
};
}  // namespace

Status PgStore::RecordOn(Session& s, const UsageKey& key, UsageEvent event, int64_t now) {
  CUSTODY_RETURN_IF_ERROR(s.Run(kRecordSql[static_cast<int>(event)],
                                Params().Add(key.project).Add(key.environment).Add(key.principal)
                                    .Add(policy::DayKey(now)).Add(now)));
  return Status::Ok();
}

Status PgStore::Record(const UsageKey& key, UsageEvent event, int64_t now) {
  Session s(*this, /*relaxed=*/true);
  if (!s.ok()) return s.error();
  return RecordOn(s, key, event, now);  // one statement: its own transaction
}

Status PgStore::AddUsage(const std::vector<UsageCount>& counts) {
  if (counts.empty()) return Status::Ok();
  // In key order: two nodes flushing overlapping keys lock their rows in the
  // same order and cannot deadlock.
  std::vector<const UsageCount*> sorted;
  for (const auto& c : counts) sorted.push_back(&c);
  std::sort(sorted.begin(), sorted.end(), [](const UsageCount* a, const UsageCount* b) {
    return std::tie(a->key.project, a->key.environment, a->key.principal, a->day) <
           std::tie(b->key.project, b->key.environment, b->key.principal, b->day);
  });
  auto r = InTx<bool>(
      [&](Session& s) -> Result<bool> {
        for (const UsageCount* c : sorted) {
          Params p;
          p.Add(c->key.project).Add(c->key.environment).Add(c->key.principal).Add(c->day);
          for (uint64_t n : c->by_event) p.Add(static_cast<int64_t>(n));
          p.Add(c->last_use);
          CUSTODY_RETURN_IF_ERROR(
              s.Run("INSERT INTO usage(project, environment, principal, day, unseals, seals, denied, rate_limited, "
                    "spend_limited, last_use) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                    "ON CONFLICT (project, environment, principal, day) DO UPDATE SET "
                    "unseals = usage.unseals + excluded.unseals, seals = usage.seals + excluded.seals, "
                    "denied = usage.denied + excluded.denied, rate_limited = usage.rate_limited + excluded.rate_limited, "
                    "spend_limited = usage.spend_limited + excluded.spend_limited, "
                    "last_use = greatest(usage.last_use, excluded.last_use)",
                    p));
        }
        return true;
      },
      /*relaxed=*/true);
  if (!r) return std::move(r).error();
  return Status::Ok();
}

Result<Admission> PgStore::Admit(const UsageKey& key, const std::vector<policy::LimitRule>& rules, UsageEvent event,
                                 double now) {
  const int64_t now_s = static_cast<int64_t>(now);
  return InTx<Admission>(
      [&](Session& s) -> Result<Admission> {
        // One project's admissions take turns, on every node: its buckets
        // and its day and month budgets are read and charged under one
        // transaction-scoped lock, so two requests on two hosts cannot both
        // spend the last token. Other projects are not held up.
        CUSTODY_RETURN_IF_ERROR(s.Run("SELECT pg_advisory_xact_lock(1129534533, hashtext($1))", Params().Add(key.project)));
        auto refuse = [&](UsageEvent why, std::string limit, double retry) -> Result<Admission> {
          // The refusal is recorded and committed: it is usage too.
          CUSTODY_RETURN_IF_ERROR(RecordOn(s, key, why, now_s));
          return Admission{false, std::move(limit), static_cast<int64_t>(retry + 0.999)};
        };
        std::vector<std::pair<std::string, policy::Bucket>> updates;
        for (const auto& r : rules) {
          if (r.kind == policy::LimitRule::kRate) {
            CUSTODY_ASSIGN_OR_RETURN(Res b, s.Run("SELECT tokens, updated_at FROM buckets WHERE key = $1",
                                                  Params().Add(r.key)));
            policy::Bucket bucket;
            if (b.rows() == 1) {
              bucket.tokens = b.Double(0, 0);
              bucket.updated_at = b.Double(0, 1);
            }
            auto t = policy::TakeToken(bucket, r.rate, now);
            if (!t.allowed) return refuse(UsageEvent::kRateLimited, r.label, t.retry_after_seconds);
            updates.emplace_back(r.key, t.next);
          } else if (event == UsageEvent::kUnseal) {
            const bool daily = r.kind == policy::LimitRule::kUnsealsPerDay;
            const std::string window = daily ? policy::DayKey(now_s) : policy::MonthKey(now_s) + "-%";
            Params p;
            p.Add(r.project).Add(window);
            const char* sql;
            if (r.environment.empty()) {
              sql = daily ? "SELECT coalesce(sum(unseals), 0) FROM usage WHERE project = $1 AND day = $2"
                          : "SELECT coalesce(sum(unseals), 0) FROM usage WHERE project = $1 AND day LIKE $2";
            } else {
              p.Add(r.environment);
              sql = daily ? "SELECT coalesce(sum(unseals), 0) FROM usage WHERE project = $1 AND day = $2 "
                            "AND environment = $3"
                          : "SELECT coalesce(sum(unseals), 0) FROM usage WHERE project = $1 AND day LIKE $2 "
                            "AND environment = $3";
            }
            CUSTODY_ASSIGN_OR_RETURN(Res c, s.Run(sql, p));
            if (static_cast<uint64_t>(c.Int(0, 0)) >= r.limit) {
              const int64_t end = daily ? policy::EndOfDay(now_s) : policy::EndOfMonth(now_s);
              return refuse(UsageEvent::kSpendLimited, r.label, static_cast<double>(end - now_s));
            }
          }
        }
        for (const auto& [k, b] : updates) {
          CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO buckets(key, tokens, updated_at) VALUES ($1, $2, $3) "
                                        "ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, "
                                        "updated_at = excluded.updated_at",
                                        Params().Add(k).Add(b.tokens).Add(b.updated_at)));
        }
        CUSTODY_RETURN_IF_ERROR(RecordOn(s, key, event, now_s));
        return Admission{};
      },
      /*relaxed=*/true);
}

Result<std::vector<UsageRow>> PgStore::Usage(const std::optional<std::string>& project, int64_t now) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run("SELECT project, environment, principal, sum(unseals), sum(seals), sum(denied), sum(rate_limited), "
                   "sum(spend_limited), sum(CASE WHEN day = $2 THEN unseals ELSE 0 END), max(last_use) FROM usage "
                   "WHERE ($1::text IS NULL OR project = $1) GROUP BY project, environment, principal "
                   "ORDER BY project COLLATE \"C\", environment COLLATE \"C\", principal COLLATE \"C\"",
                   Params().AddOptional(project).Add(policy::DayKey(now))));
  std::vector<UsageRow> out;
  for (int i = 0; i < r.rows(); ++i) {
    UsageRow u;
    u.project = r.Text(i, 0);
    u.environment = r.Text(i, 1);
    u.principal = r.Text(i, 2);
    u.unseals = static_cast<uint64_t>(r.Int(i, 3));
    u.seals = static_cast<uint64_t>(r.Int(i, 4));
    u.denied = static_cast<uint64_t>(r.Int(i, 5));
    u.rate_limited = static_cast<uint64_t>(r.Int(i, 6));
    u.spend_limited = static_cast<uint64_t>(r.Int(i, 7));
    u.unseals_today = static_cast<uint64_t>(r.Int(i, 8));
    u.last_use = r.Int(i, 9);
    out.push_back(std::move(u));
  }
  return out;
}

}  // namespace custody::core::pg
