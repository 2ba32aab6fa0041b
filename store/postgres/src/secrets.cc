// Secrets and their sealed versions: storing, reading (a GET's whole lookup
// in one statement), listing, revoking, trimming and deleting.
#include <algorithm>
#include <chrono>
#include <thread>

#include "pg_store_impl.h"

namespace custody::core::pg {

namespace {
// The version columns, then (at 9) the current version of its secret.
constexpr const char* kVersionColumns =
    "v.version, v.kek_id, v.created_at, v.superseded_at, v.revoked_at, coalesce(v.revoked_reason, ''), "
    "coalesce(v.revoked_by, ''), (SELECT coalesce(max(c.version), 0) FROM secret_versions c "
    "WHERE c.secret_id = v.secret_id AND c.revoked_at IS NULL)";
SecretVersionRecord ReadVersion(const Res& r, int row) {
  SecretVersionRecord v;
  v.version = static_cast<uint32_t>(r.Int(row, 0));
  v.kek_record_id = r.Int(row, 1);
  v.created_at = r.Int(row, 2);
  if (!r.null(row, 3)) v.superseded_at = r.Int(row, 3);
  if (!r.null(row, 4)) v.revoked_at = r.Int(row, 4);
  v.revoked_reason = r.Text(row, 5);
  v.revoked_by = r.Text(row, 6);
  v.current_version = static_cast<uint32_t>(r.Int(row, 7));
  return v;
}
}  // namespace

Result<int64_t> PgStore::SecretIdIn(Session& s, const EnvironmentRecord& env, const std::string& name, bool lock) {
  // FOR UPDATE serialises the writers of one secret (a put, a revoke, a
  // trim): each sees what the one before it committed.
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(lock ? "SELECT id FROM secrets WHERE environment_id = $1 AND name = $2 FOR UPDATE"
                                             : "SELECT id FROM secrets WHERE environment_id = $1 AND name = $2",
                                        Params().Add(env.id).Add(name)));
  if (r.rows() == 0) {
    return Error(Category::kNotFound, "secret '" + env.project + "/" + env.name + "/" + name + "' does not exist");
  }
  return r.Int(0, 0);
}

Result<uint32_t> PgStore::NextVersion(int64_t env_id, const std::string& name) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT coalesce(max(v.version), 0) FROM secrets s "
                                        "JOIN secret_versions v ON v.secret_id = s.id "
                                        "WHERE s.environment_id = $1 AND s.name = $2",
                                        Params().Add(env_id).Add(name)));
  return static_cast<uint32_t>(r.Int(0, 0) + 1);
}

Status PgStore::AddVersion(int64_t env_id, const std::string& name, uint32_t version, int64_t kek_record_id,
                           const std::vector<uint8_t>& blob, int64_t now, const std::string& put_key) {
  int backend_pid = 0;
  auto body = [&](Session& s) -> Result<bool> {
    backend_pid = s.backend_pid();
    // KEK rotation destroys a retired KEK once no blob needs it; a put that
    // sealed under it just before it retired must not land after that
    // check. FOR SHARE holds the KEK's state until this put commits: the
    // rotation's UPDATE to 'retiring' waits for it, and SetKekState's count
    // then sees this version.
    CUSTODY_ASSIGN_OR_RETURN(Res k, s.Run("SELECT state FROM keks WHERE id = $1 FOR SHARE", Params().Add(kek_record_id)));
    if (k.rows() == 0) return Error(Category::kIntegrity, "KEK record is missing");
    if (ParseKekState(k.Text(0, 0)) != KekState::kActive) {
      return Error(Category::kUnavailable, "the project's KEK was rotated while sealing '" + name + "'")
          .WithVersionTaken();
    }
    CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO secrets(environment_id, name, created_at) VALUES ($1, $2, $3) "
                                  "ON CONFLICT (environment_id, name) DO NOTHING",
                                  Params().Add(env_id).Add(name).Add(now)));
    EnvironmentRecord env{env_id, 0, "", ""};
    CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretIdIn(s, env, name, /*lock=*/true));
    auto ins = s.Run("INSERT INTO secret_versions(secret_id, version, kek_id, blob, created_at) "
                     "VALUES ($1, $2, $3, $4, $5)",
                     Params().Add(sid).Add(static_cast<int64_t>(version)).Add(kek_record_id).AddBytes(blob).Add(now));
    // Only the (secret_id, version) key says another writer was first.
    if (!ins && HasSqlState(ins.error(), "23505")) {
      return Error(Category::kUnavailable,
                   "version " + std::to_string(version) + " of '" + name + "' was taken by a concurrent writer",
                   Backend::kStore, ins.error().code())
          .WithVersionTaken();
    }
    if (!ins) return std::move(ins).error();
    if (!put_key.empty()) {
      // Keys older than a day go first, so the table stays small. Two puts
      // with one key on two nodes: the second waits on the first's key row
      // and then fails the primary key (it is a retry of the first).
      CUSTODY_RETURN_IF_ERROR(s.Run("DELETE FROM put_keys WHERE secret_id = $1 AND created_at < $2",
                                    Params().Add(sid).Add(now - kPutKeySeconds)));
      auto key = s.Run("INSERT INTO put_keys(secret_id, key, version, created_at) VALUES ($1, $2, $3, $4)",
                       Params().Add(sid).Add(put_key).Add(static_cast<int64_t>(version)).Add(now));
      if (!key && HasSqlState(key.error(), "23505")) {
        return Error(Category::kUnavailable, "a put with this Idempotency-Key already stored a version of '" + name + "'",
                     Backend::kStore, key.error().code())
            .WithVersionTaken();
      }
      if (!key) return std::move(key).error();
    }
    // The version that was current starts its grace period now.
    CUSTODY_RETURN_IF_ERROR(s.Run("UPDATE secret_versions SET superseded_at = $1 WHERE secret_id = $2 AND version < $3 "
                                  "AND superseded_at IS NULL AND revoked_at IS NULL",
                                  Params().Add(now).Add(sid).Add(static_cast<int64_t>(version))));
    return true;
  };
  bool lost_commit = false;
  auto r = InTx<bool>(body, false, "BEGIN", &lost_commit);
  if (r) return Status::Ok();
  if (!lost_commit) return std::move(r).error();
  // The answer to COMMIT was lost. The blob is unique (a fresh nonce), so
  // "this version holds exactly this blob" says whether it landed.
  auto landed = ResolveLostCommit(backend_pid, [&](Session& s) -> Result<bool> {
    CUSTODY_ASSIGN_OR_RETURN(Res q, s.Run("SELECT v.blob FROM secret_versions v JOIN secrets s ON s.id = v.secret_id "
                                          "WHERE s.environment_id = $1 AND s.name = $2 AND v.version = $3",
                                          Params().Add(env_id).Add(name).Add(static_cast<int64_t>(version))));
    return q.rows() == 1 && q.Bytes(0, 0) == blob;
  });
  if (!landed) return std::move(r).error();  // still unknown: say so, as the COMMIT did
  if (*landed) return Status::Ok();
  return Error(Category::kUnavailable, "store " + where_ + ": the connection was lost while storing version " +
                                           std::to_string(version) + " of '" + name +
                                           "'; it was not stored (checked after reconnecting)");
}

Result<std::optional<uint32_t>> PgStore::VersionForPutKey(int64_t env_id, const std::string& name,
                                                         const std::string& put_key, int64_t now) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT k.version FROM put_keys k JOIN secrets s ON s.id = k.secret_id "
                                        "WHERE s.environment_id = $1 AND s.name = $2 AND k.key = $3 AND k.created_at >= $4",
                                        Params().Add(env_id).Add(name).Add(put_key).Add(now - kPutKeySeconds)));
  if (r.rows() == 0) return std::optional<uint32_t>();
  return std::optional<uint32_t>(static_cast<uint32_t>(r.Int(0, 0)));
}

Result<bool> PgStore::ResolveLostCommit(int backend_pid, const std::function<Result<bool>(Session&)>& landed) {
  // Until the server process that received COMMIT has ended, the commit may
  // still be under way; once it is gone, what the database holds is final.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < deadline) {
    Session s(*this);
    if (s.ok()) {
      auto alive = s.Run("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", Params().Add(int64_t{backend_pid}));
      if (alive && alive->Int(0, 0) == 0) return landed(s);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return Error(Category::kUnavailable, "store " + where_ + ": whether the write landed is unknown");
}

Result<SecretVersionRecord> PgStore::GetVersion(const EnvironmentRecord& env, const std::string& name,
                                                std::optional<uint32_t> version) {
  Session s(*this);
  if (!s.ok()) return s.error();
  return GetVersionOn(s, env, name, version);
}

Result<SecretVersionRecord> PgStore::GetVersionOn(Session& s, const EnvironmentRecord& env, const std::string& name,
                                                  std::optional<uint32_t> version) {
  static const std::string by_version = std::string("SELECT ") + kVersionColumns +
                                        ", v.blob FROM secret_versions v JOIN secrets s ON s.id = v.secret_id "
                                        "WHERE s.environment_id = $1 AND s.name = $2 AND v.version = $3";
  static const std::string current = std::string("SELECT ") + kVersionColumns +
                                     ", v.blob FROM secret_versions v JOIN secrets s ON s.id = v.secret_id "
                                     "WHERE s.environment_id = $1 AND s.name = $2 AND v.revoked_at IS NULL "
                                     "ORDER BY v.version DESC LIMIT 1";
  Params p;
  p.Add(env.id).Add(name);
  if (version) p.Add(static_cast<int64_t>(*version));
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(version ? by_version.c_str() : current.c_str(), p));
  if (r.rows() == 1) {
    SecretVersionRecord v = ReadVersion(r, 0);
    v.blob = r.Bytes(0, 8);
    return v;
  }
  const std::string where = env.project + "/" + env.name + "/" + name;
  CUSTODY_RETURN_IF_ERROR(SecretIdIn(s, env, name, false));
  if (version) return Error(Category::kNotFound, "secret '" + where + "' has no version " + std::to_string(*version));
  return Error(Category::kNotFound, "secret '" + where +
                                        "' has no current version: every stored version is revoked; "
                                        "store a new one with 'custody secret rotate'");
}

Result<UnsealInputs> PgStore::ReadForUnseal(const std::string& project, const std::string& env,
                                            const std::string& name, std::optional<uint32_t> version) {
  // In custodyd, what was read before and has not changed since (ReadCache).
  std::string key;
  ReadCache::Ticket ticket;
  if (cache_) {
    key.reserve(project.size() + env.size() + name.size() + 16);
    key.append(project).push_back('\0');
    key.append(env).push_back('\0');
    key.append(name).push_back('\0');
    if (version) key += std::to_string(*version);
    if (auto hit = cache_->Find(key)) return std::move(*hit);
    ticket = cache_->Begin();
  }
  Session s(*this);
  if (!s.ok()) return s.error();
  // A GET's whole lookup is one statement: one round trip, and one snapshot
  // (a KEK rotation cannot move the blob between the version and its KEK).
  // Only when nothing matches do the lookups below run, to name what is
  // missing.
  static const std::string head = std::string("SELECT ") + kVersionColumns +
                                  ", v.blob, e.id, p.id, k.id, k.project_id, k.version, k.token_id, k.label, "
                                  "k.encryptions_reserved, k.created_at, k.state "
                                  "FROM projects p JOIN environments e ON e.project_id = p.id "
                                  "JOIN secrets s ON s.environment_id = e.id "
                                  "JOIN secret_versions v ON v.secret_id = s.id JOIN keks k ON k.id = v.kek_id "
                                  "WHERE p.name = $1 AND e.name = $2 AND s.name = $3 ";
  static const std::string by_version = head + "AND v.version = $4";
  static const std::string current = head + "AND v.revoked_at IS NULL ORDER BY v.version DESC LIMIT 1";
  Params p;
  p.Add(project).Add(env).Add(name);
  if (version) p.Add(static_cast<int64_t>(*version));
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(version ? by_version.c_str() : current.c_str(), p));
  if (r.rows() == 1) {
    UnsealInputs in;
    in.version = ReadVersion(r, 0);
    in.version.blob = r.Bytes(0, 8);
    in.env = EnvironmentRecord{r.Int(0, 9), r.Int(0, 10), project, env};
    in.kek = ReadKek(r, 0, /*first=*/11);
    if (cache_) cache_->Keep(ticket, key, in);
    return in;
  }
  CUSTODY_ASSIGN_OR_RETURN(EnvironmentRecord e, FindEnvironmentOn(s, project, env));
  CUSTODY_ASSIGN_OR_RETURN(SecretVersionRecord v, GetVersionOn(s, e, name, version));
  // Found on a second look: it was stored between the two statements.
  return Error(Category::kUnavailable, "secret '" + project + "/" + env + "/" + name + "' version " +
                                           std::to_string(v.version) + " changed while it was read; try again");
}

Result<std::vector<SecretVersionRecord>> PgStore::ListVersions(const EnvironmentRecord& env, const std::string& name) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretIdIn(s, env, name, false));
  static const std::string sql =
      std::string("SELECT ") + kVersionColumns + " FROM secret_versions v WHERE v.secret_id = $1 ORDER BY v.version";
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run(sql.c_str(), Params().Add(sid)));
  std::vector<SecretVersionRecord> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back(ReadVersion(r, i));
  return out;
}

Result<uint32_t> PgStore::RevokeVersion(const EnvironmentRecord& env, const std::string& name, uint32_t version,
                                        const std::string& reason, const std::string& by, int64_t now) {
  const std::string where = env.project + "/" + env.name + "/" + name;
  return InTx<uint32_t>([&](Session& s) -> Result<uint32_t> {
    // The secret's row lock: a concurrent put or revoke cannot slip in
    // between and have the wrong version's grace clock stopped.
    CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretIdIn(s, env, name, /*lock=*/true));
    auto current = [&]() -> Result<int64_t> {
      CUSTODY_ASSIGN_OR_RETURN(Res c, s.Run("SELECT coalesce(max(version), 0) FROM secret_versions "
                                            "WHERE secret_id = $1 AND revoked_at IS NULL",
                                            Params().Add(sid)));
      return c.Int(0, 0);
    };
    CUSTODY_ASSIGN_OR_RETURN(const int64_t before, current());
    CUSTODY_ASSIGN_OR_RETURN(Res q, s.Run("SELECT revoked_at FROM secret_versions WHERE secret_id = $1 AND version = $2",
                                          Params().Add(sid).Add(static_cast<int64_t>(version))));
    if (q.rows() == 0) return Error(Category::kNotFound, "secret '" + where + "' has no version " + std::to_string(version));
    if (!q.null(0, 0)) {
      return Error(Category::kUsage, "version " + std::to_string(version) + " of '" + where + "' is already revoked");
    }
    CUSTODY_RETURN_IF_ERROR(s.Run("UPDATE secret_versions SET revoked_at = $1, revoked_reason = $2, revoked_by = $3 "
                                  "WHERE secret_id = $4 AND version = $5",
                                  Params().Add(now).Add(reason).Add(by).Add(sid).Add(static_cast<int64_t>(version))));
    CUSTODY_ASSIGN_OR_RETURN(const int64_t after, current());
    if (after != 0 && after != before) {
      // A version that becomes current again: its grace clock stops.
      CUSTODY_RETURN_IF_ERROR(s.Run("UPDATE secret_versions SET superseded_at = NULL WHERE secret_id = $1 AND version = $2",
                                    Params().Add(sid).Add(after)));
    }
    return static_cast<uint32_t>(after);
  });
}

Result<size_t> PgStore::TrimVersions(const EnvironmentRecord& env, const std::string& name,
                                     const std::vector<uint32_t>& versions) {
  if (versions.empty()) return size_t{0};
  return InTx<size_t>([&](Session& s) -> Result<size_t> {
    // Under the secret's row lock, each DELETE works out the current
    // version itself: whatever the caller's list says, it stays.
    CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretIdIn(s, env, name, /*lock=*/true));
    size_t n = 0;
    for (uint32_t v : versions) {
      CUSTODY_ASSIGN_OR_RETURN(
          Res r, s.Run("DELETE FROM secret_versions WHERE secret_id = $1 AND version = $2 AND version <> ("
                       "SELECT coalesce(max(version), 0) FROM secret_versions WHERE secret_id = $1 AND revoked_at IS NULL)",
                       Params().Add(sid).Add(static_cast<int64_t>(v))));
      n += static_cast<size_t>(r.affected());
    }
    return n;
  });
}

Result<std::vector<SecretSummary>> PgStore::ListSecrets(const std::optional<std::string>& project,
                                                        const std::optional<std::string>& env) {
  Session s(*this);
  if (!s.ok()) return s.error();
  if (project) CUSTODY_RETURN_IF_ERROR(ProjectId(s, *project));
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run("SELECT p.name, e.name, s.name, max(v.version), count(v.version), max(v.created_at), "
                   "coalesce(max(CASE WHEN v.revoked_at IS NULL THEN v.version END), 0), count(v.revoked_at), "
                   "coalesce((SELECT c.created_at FROM secret_versions c WHERE c.secret_id = s.id "
                   "AND c.revoked_at IS NULL ORDER BY c.version DESC LIMIT 1), 0) "
                   "FROM secrets s JOIN environments e ON e.id = s.environment_id "
                   "JOIN projects p ON p.id = e.project_id JOIN secret_versions v ON v.secret_id = s.id "
                   "WHERE ($1::text IS NULL OR p.name = $1) AND ($2::text IS NULL OR e.name = $2) "
                   "GROUP BY s.id, p.name, e.name, s.name "
                   "ORDER BY p.name COLLATE \"C\", e.name COLLATE \"C\", s.name COLLATE \"C\"",
                   Params().AddOptional(project).AddOptional(env)));
  std::vector<SecretSummary> out;
  for (int i = 0; i < r.rows(); ++i) {
    SecretSummary sum{r.Text(i, 0), r.Text(i, 1), r.Text(i, 2), static_cast<uint32_t>(r.Int(i, 3)),
                      static_cast<uint32_t>(r.Int(i, 4)), r.Int(i, 5)};
    sum.current_version = static_cast<uint32_t>(r.Int(i, 6));
    sum.revoked_count = static_cast<uint32_t>(r.Int(i, 7));
    sum.current_since = r.Int(i, 8);
    out.push_back(std::move(sum));
  }
  return out;
}

Status PgStore::DeleteSecret(const EnvironmentRecord& env, const std::string& name) {
  auto r = InTx<bool>([&](Session& s) -> Result<bool> {
    CUSTODY_ASSIGN_OR_RETURN(int64_t sid, SecretIdIn(s, env, name, /*lock=*/true));
    // The versions go by ON DELETE CASCADE.
    CUSTODY_RETURN_IF_ERROR(s.Run("DELETE FROM secrets WHERE id = $1", Params().Add(sid)));
    return true;
  });
  if (!r) return std::move(r).error();
  return Status::Ok();
}

}  // namespace custody::core::pg
