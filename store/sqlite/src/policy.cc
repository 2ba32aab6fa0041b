// The policy in force and its history, and the audit log's checkpoint
// witness.
#include "sqlite_store_impl.h"

namespace custody::core::sqlite {

Result<std::optional<PolicyRecord>> SqliteStore::CurrentPolicy() {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(), "SELECT version, sha256, text, applied_at, applied_by FROM policies ORDER BY version DESC LIMIT 1");
  int rc = s.Step();
  if (rc == SQLITE_DONE) return std::optional<PolicyRecord>();
  if (rc != SQLITE_ROW) return Fail(rc, "reading the policy");
  return std::optional<PolicyRecord>(
      PolicyRecord{static_cast<uint32_t>(s.Int(0)), s.Text(1), s.Text(2), s.Int(3), s.Text(4)});
}

Result<uint32_t> SqliteStore::CurrentPolicyVersion() {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(), "SELECT coalesce(max(version), 0) FROM policies");
  int rc = s.Step();
  if (rc != SQLITE_ROW) return Fail(rc, "reading the policy version");
  return static_cast<uint32_t>(s.Int(0));
}

Result<PolicyRecord> SqliteStore::SavePolicy(const std::string& text, const std::string& sha256,
                                             const std::string& applied_by) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // Numbered and stored under one write lock: two saves never race for a
  // number.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  Stmt v(db(), "SELECT coalesce(max(version), 0) + 1 FROM policies");
  int rc = v.Step();
  if (rc != SQLITE_ROW) return Fail(rc, "numbering the policy");
  PolicyRecord p{static_cast<uint32_t>(v.Int(0)), sha256, text, Now(), applied_by};
  Stmt s(db(), "INSERT INTO policies(version, sha256, text, applied_at, applied_by) VALUES (?, ?, ?, ?, ?)");
  s.Bind(1, static_cast<int64_t>(p.version)).Bind(2, sha256).Bind(3, text).Bind(4, p.applied_at).Bind(5, applied_by);
  rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "storing the policy");
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
  return p;
}

Status SqliteStore::RecordAuditCheckpoint(const std::string& node, uint64_t seq, const std::string& covers_hash) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(), "INSERT OR REPLACE INTO audit_checkpoints(node, seq, covers_hash, created_at) VALUES (?, ?, ?, ?)");
  s.Bind(1, node).Bind(2, static_cast<int64_t>(seq)).Bind(3, covers_hash).Bind(4, Now());
  int rc = s.Step();
  if (rc != SQLITE_DONE) return Fail(rc, "recording an audit checkpoint");
  return Status::Ok();
}

Result<std::optional<std::pair<uint64_t, std::string>>> SqliteStore::LastAuditCheckpoint(const std::string& node) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // This node's rows; only when it has none, those of node '' (older rows).
  Stmt s(db(), "SELECT seq, covers_hash FROM audit_checkpoints WHERE node = ?1 OR "
               "(node = '' AND NOT EXISTS (SELECT 1 FROM audit_checkpoints WHERE node = ?1)) "
               "ORDER BY seq DESC LIMIT 1");
  s.Bind(1, node);
  int rc = s.Step();
  using R = std::optional<std::pair<uint64_t, std::string>>;
  if (rc == SQLITE_DONE) return R();
  if (rc != SQLITE_ROW) return Fail(rc, "reading audit checkpoints");
  return R(std::make_pair(static_cast<uint64_t>(s.Int(0)), s.Text(1)));
}

}  // namespace custody::core::sqlite
