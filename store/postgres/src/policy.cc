// The policy in force and its history, and the audit log's checkpoint
// witness.
#include <ctime>

#include "pg_store_impl.h"

namespace custody::core::pg {

Result<std::optional<PolicyRecord>> PgStore::CurrentPolicy() {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run("SELECT version, sha256, text, applied_at, applied_by FROM policies ORDER BY version DESC LIMIT 1"));
  if (r.rows() == 0) return std::optional<PolicyRecord>();
  return std::optional<PolicyRecord>(
      PolicyRecord{static_cast<uint32_t>(r.Int(0, 0)), r.Text(0, 1), r.Text(0, 2), r.Int(0, 3), r.Text(0, 4)});
}

Result<uint32_t> PgStore::CurrentPolicyVersion() {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT coalesce(max(version), 0) FROM policies"));
  return static_cast<uint32_t>(r.Int(0, 0));
}

Result<PolicyRecord> PgStore::SavePolicy(const std::string& text, const std::string& sha256,
                                         const std::string& applied_by) {
  return InTx<PolicyRecord>([&](Session& s) -> Result<PolicyRecord> {
    // Numbered under a table lock that only other saves take (readers go
    // on): two saves on two hosts never race for a number.
    CUSTODY_RETURN_IF_ERROR(s.Exec("LOCK TABLE policies IN SHARE ROW EXCLUSIVE MODE"));
    CUSTODY_ASSIGN_OR_RETURN(Res v, s.Run("SELECT coalesce(max(version), 0) + 1 FROM policies"));
    PolicyRecord p{static_cast<uint32_t>(v.Int(0, 0)), sha256, text, static_cast<int64_t>(std::time(nullptr)),
                   applied_by};
    CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO policies(version, sha256, text, applied_at, applied_by) "
                                  "VALUES ($1, $2, $3, $4, $5)",
                                  Params().Add(static_cast<int64_t>(p.version)).Add(sha256).Add(text)
                                      .Add(p.applied_at).Add(applied_by)));
    return p;
  });
}

Status PgStore::RecordAuditCheckpoint(const std::string& node, uint64_t seq, const std::string& covers_hash) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO audit_checkpoints(node, seq, covers_hash, created_at) "
                                "VALUES ($4, $1, $2, $3) "
                                "ON CONFLICT (node, seq) DO UPDATE SET covers_hash = excluded.covers_hash, "
                                "created_at = excluded.created_at",
                                Params().Add(static_cast<int64_t>(seq)).Add(covers_hash)
                                    .Add(static_cast<int64_t>(std::time(nullptr))).Add(node)));
  return Status::Ok();
}

Result<std::optional<std::pair<uint64_t, std::string>>> PgStore::LastAuditCheckpoint(const std::string& node) {
  Session s(*this);
  if (!s.ok()) return s.error();
  using R = std::optional<std::pair<uint64_t, std::string>>;
  // This node's rows; only when it has none, those of node '' (older rows).
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run("SELECT seq, covers_hash FROM audit_checkpoints WHERE node = $1 OR "
                   "(node = '' AND NOT EXISTS (SELECT 1 FROM audit_checkpoints WHERE node = $1)) "
                   "ORDER BY seq DESC LIMIT 1",
                   Params().Add(node)));
  if (r.rows() == 0) return R();
  return R(std::make_pair(static_cast<uint64_t>(r.Int(0, 0)), r.Text(0, 1)));
}

}  // namespace custody::core::pg
