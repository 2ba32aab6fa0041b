// A whole deployment out of and into a PostgreSQL store (`custody store
// copy`): every row but the named locks, with its ids, blobs as they are.
#include "pg_store_impl.h"

namespace custody::core::pg {
namespace {

// The tables a copy writes, locked against every writer (readers go on)
// for the copy's transaction: nobody creates a project between the look
// that finds the database empty and the commit.
constexpr const char* kLockAll =
    "LOCK TABLE projects, environments, keks, secrets, secret_versions, policies, usage, buckets, "
    "audit_checkpoints IN EXCLUSIVE MODE";

Params& AddOptionalText(Params& p, const std::optional<std::string>& v) { return v ? p.Add(*v) : p.AddNull(); }

}  // namespace

Result<StoreSnapshot> PgStore::Export() {
  // REPEATABLE READ: every table from the same snapshot, whatever other
  // nodes write meanwhile.
  return InTx<StoreSnapshot>(
      [&](Session& s) -> Result<StoreSnapshot> {
        StoreSnapshot snap;
        {
          CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT id, name, created_at FROM projects ORDER BY id"));
          for (int i = 0; i < r.rows(); ++i) snap.projects.push_back({r.Int(i, 0), r.Text(i, 1), r.Int(i, 2)});
        }
        {
          CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT id, project_id, name, created_at FROM environments ORDER BY id"));
          for (int i = 0; i < r.rows(); ++i) {
            snap.environments.push_back({r.Int(i, 0), r.Int(i, 1), r.Text(i, 2), r.Int(i, 3)});
          }
        }
        {
          CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT id, project_id, version, token_id, label, state, "
                                                "encryptions_reserved, created_at, material FROM keks ORDER BY id"));
          for (int i = 0; i < r.rows(); ++i) {
            SnapshotKek k;
            k.id = r.Int(i, 0);
            k.project_id = r.Int(i, 1);
            k.version = r.Int(i, 2);
            k.token_id = r.Bytes(i, 3);
            k.label = r.Text(i, 4);
            k.state = r.Text(i, 5);
            k.encryptions_reserved = r.Int(i, 6);
            k.created_at = r.Int(i, 7);
            if (!r.null(i, 8)) k.material = r.Bytes(i, 8);
            snap.keks.push_back(std::move(k));
          }
        }
        {
          CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT id, environment_id, name, created_at FROM secrets ORDER BY id"));
          for (int i = 0; i < r.rows(); ++i) {
            snap.secrets.push_back({r.Int(i, 0), r.Int(i, 1), r.Text(i, 2), r.Int(i, 3)});
          }
        }
        {
          CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT secret_id, version, kek_id, blob, created_at, superseded_at, "
                                                "revoked_at, revoked_reason, revoked_by FROM secret_versions "
                                                "ORDER BY secret_id, version"));
          for (int i = 0; i < r.rows(); ++i) {
            SnapshotVersion v;
            v.secret_id = r.Int(i, 0);
            v.version = r.Int(i, 1);
            v.kek_id = r.Int(i, 2);
            v.blob = r.Bytes(i, 3);
            v.created_at = r.Int(i, 4);
            if (!r.null(i, 5)) v.superseded_at = r.Int(i, 5);
            if (!r.null(i, 6)) v.revoked_at = r.Int(i, 6);
            if (!r.null(i, 7)) v.revoked_reason = r.Text(i, 7);
            if (!r.null(i, 8)) v.revoked_by = r.Text(i, 8);
            snap.versions.push_back(std::move(v));
          }
        }
        {
          CUSTODY_ASSIGN_OR_RETURN(
              Res r, s.Run("SELECT version, sha256, text, applied_at, applied_by FROM policies ORDER BY version"));
          for (int i = 0; i < r.rows(); ++i) {
            snap.policies.push_back({r.Int(i, 0), r.Text(i, 1), r.Text(i, 2), r.Int(i, 3), r.Text(i, 4)});
          }
        }
        {
          CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT project, environment, principal, day, unseals, seals, denied, "
                                                "rate_limited, spend_limited, last_use FROM usage "
                                                "ORDER BY project, environment, principal, day"));
          for (int i = 0; i < r.rows(); ++i) {
            snap.usage.push_back({r.Text(i, 0), r.Text(i, 1), r.Text(i, 2), r.Text(i, 3), r.Int(i, 4), r.Int(i, 5),
                                  r.Int(i, 6), r.Int(i, 7), r.Int(i, 8), r.Int(i, 9)});
          }
        }
        {
          CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT key, tokens, updated_at FROM buckets ORDER BY key"));
          for (int i = 0; i < r.rows(); ++i) snap.buckets.push_back({r.Text(i, 0), r.Double(i, 1), r.Double(i, 2)});
        }
        {
          CUSTODY_ASSIGN_OR_RETURN(
              Res r, s.Run("SELECT node, seq, covers_hash, created_at FROM audit_checkpoints ORDER BY node, seq"));
          for (int i = 0; i < r.rows(); ++i) {
            snap.checkpoints.push_back({r.Text(i, 0), r.Int(i, 1), r.Text(i, 2), r.Int(i, 3)});
          }
        }
        return snap;
      },
      /*relaxed=*/false, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
}

Status PgStore::Import(const StoreSnapshot& snap, const std::function<void(size_t, size_t)>& progress) {
  auto done = InTx<bool>([&](Session& s) -> Result<bool> {
    CUSTODY_RETURN_IF_ERROR(s.Exec(kLockAll));
    CUSTODY_ASSIGN_OR_RETURN(Res n, s.Run("SELECT (SELECT count(*) FROM projects) + (SELECT count(*) FROM keks) + "
                                          "(SELECT count(*) FROM secrets) + (SELECT count(*) FROM policies) + "
                                          "(SELECT count(*) FROM audit_checkpoints) + (SELECT count(*) FROM usage) + "
                                          "(SELECT count(*) FROM buckets)"));
    if (n.Int(0, 0) > 0) {
      return Error(Category::kUsage,
                   "target store " + where_ + " already holds a custody deployment; refusing to copy into it");
    }
    // The ids are the source's (references between rows hold), so the
    // identity columns are overridden, and their sequences moved past them
    // at the end.
    for (const auto& p : snap.projects) {
      CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO projects(id, name, created_at) OVERRIDING SYSTEM VALUE "
                                    "VALUES ($1, $2, $3)",
                                    Params().Add(p.id).Add(p.name).Add(p.created_at)));
    }
    for (const auto& e : snap.environments) {
      CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO environments(id, project_id, name, created_at) "
                                    "OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4)",
                                    Params().Add(e.id).Add(e.project_id).Add(e.name).Add(e.created_at)));
    }
    for (const auto& k : snap.keks) {
      Params p;
      p.Add(k.id).Add(k.project_id).Add(k.version).AddBytes(k.token_id).Add(k.label).Add(k.state)
          .Add(k.encryptions_reserved).Add(k.created_at);
      if (k.material) {
        p.AddBytes(*k.material);
      } else {
        p.AddNull();
      }
      CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO keks(id, project_id, version, token_id, label, state, "
                                    "encryptions_reserved, created_at, material) OVERRIDING SYSTEM VALUE "
                                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                                    p));
    }
    for (const auto& x : snap.secrets) {
      CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO secrets(id, environment_id, name, created_at) "
                                    "OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4)",
                                    Params().Add(x.id).Add(x.environment_id).Add(x.name).Add(x.created_at)));
    }
    size_t copied = 0;
    for (const auto& v : snap.versions) {
      Params p;
      p.Add(v.secret_id).Add(v.version).Add(v.kek_id).AddBytes(v.blob).Add(v.created_at)
          .AddOptional(v.superseded_at).AddOptional(v.revoked_at);
      AddOptionalText(p, v.revoked_reason);
      AddOptionalText(p, v.revoked_by);
      CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO secret_versions(secret_id, version, kek_id, blob, created_at, "
                                    "superseded_at, revoked_at, revoked_reason, revoked_by) "
                                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                                    p));
      if (progress) progress(++copied, snap.versions.size());
    }
    for (const auto& p : snap.policies) {
      CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO policies(version, sha256, text, applied_at, applied_by) "
                                    "VALUES ($1, $2, $3, $4, $5)",
                                    Params().Add(p.version).Add(p.sha256).Add(p.text).Add(p.applied_at)
                                        .Add(p.applied_by)));
    }
    for (const auto& u : snap.usage) {
      CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO usage(project, environment, principal, day, unseals, seals, "
                                    "denied, rate_limited, spend_limited, last_use) "
                                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                                    Params().Add(u.project).Add(u.environment).Add(u.principal).Add(u.day)
                                        .Add(u.unseals).Add(u.seals).Add(u.denied).Add(u.rate_limited)
                                        .Add(u.spend_limited).Add(u.last_use)));
    }
    for (const auto& b : snap.buckets) {
      CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO buckets(key, tokens, updated_at) VALUES ($1, $2, $3)",
                                    Params().Add(b.key).Add(b.tokens).Add(b.updated_at)));
    }
    for (const auto& c : snap.checkpoints) {
      CUSTODY_RETURN_IF_ERROR(
          s.Run("INSERT INTO audit_checkpoints(node, seq, covers_hash, created_at) VALUES ($1, $2, $3, $4)",
                Params().Add(c.node).Add(c.seq).Add(c.covers_hash).Add(c.created_at)));
    }
    for (const char* table : {"projects", "environments", "keks", "secrets"}) {
      // The next id after the largest copied (1 on an empty table).
      std::string sql = std::string("SELECT setval(pg_get_serial_sequence('") + table +
                        "', 'id'), coalesce(max(id), 0) + 1, false) FROM " + table;
      CUSTODY_RETURN_IF_ERROR(s.Exec(sql.c_str()));
    }
    return true;
  });
  if (!done) return std::move(done).error();
  return Status::Ok();
}

}  // namespace custody::core::pg
