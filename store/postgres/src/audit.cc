// The audit trail in PostgreSQL: one hash chain per node in audit_records,
// the lines byte for byte those of the file log, and each chain's head in
// audit_heads. A batch is one transaction on a connection of the writer's
// own: lock the head row, insert the lines, move the head, COMMIT; once the
// writer knows the head, one statement that moves it only from where it
// was and inserts with it (one round trip). A value
// is released only after that COMMIT (AuditLog's group commit calls back
// once Append returns), so no acknowledged record depends on one node.
//
// Every wait is bounded by the batch's deadline: the statements are sent
// and awaited with poll(), and a server that does not answer in time costs
// the connection (closed; the server rolls the transaction back when it
// notices) and fails the batch, whose requests are refused. If the deadline
// passes after COMMIT was sent, the records may have landed although their
// requests were refused: the trail then shows a request that got no value,
// never the reverse.
#include <poll.h>

#include <algorithm>

#include "custody/common/untrusted.h"
#include "pg_store_impl.h"

namespace custody::core::pg {
namespace {

using Clock = std::chrono::steady_clock;

// A PostgreSQL array literal of text elements: each quoted, with `"` and
// `\` escaped. The lines are ASCII JSON (written with ensure_ascii), so no
// NUL, which text cannot hold, ever appears.
std::string TextArray(const std::vector<AuditLine>& lines) {
  std::string out = "{";
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i > 0) out += ',';
    out += '"';
    for (char c : lines[i].text) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    out += '"';
  }
  out += '}';
  return out;
}

std::string IntArray(const std::vector<AuditLine>& lines) {
  std::string out = "{";
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i > 0) out += ',';
    out += std::to_string(lines[i].seq);
  }
  out += '}';
  return out;
}

// `chain`'s records with seq below `below`, in seq order, to `each` until
// it returns false: in pages, so a long trail is never one result in memory.
Status ReadRows(Session& s, const std::string& chain, int64_t below,
                const std::function<bool(int64_t seq, std::string line)>& each) {
  constexpr int64_t kPage = 5000;
  int64_t after = -1;
  for (;;) {
    CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT seq, line FROM audit_records WHERE node = $1 AND seq > $2 "
                                          "AND seq < $3 ORDER BY seq LIMIT $4",
                                          Params().Add(chain).Add(after).Add(below).Add(kPage)));
    for (int i = 0; i < r.rows(); ++i) {
      after = r.Int(i, 0);
      if (!each(after, r.Text(i, 1))) return Status::Ok();
    }
    if (r.rows() < kPage) return Status::Ok();
  }
}

class PgAuditStorage final : public AuditStorage {
 public:
  PgAuditStorage(PgStore& store, std::string node, std::chrono::milliseconds timeout)
      : store_(store), node_(std::move(node)), timeout_(timeout) {}

  Status Append(Clock::time_point deadline, const Build& build) override;
  Result<AuditHead> Head() override;
  Result<std::vector<std::string>> Chains() override;
  Status Read(const std::string& chain, const std::function<void(AuditChainLine&&)>& each, bool* torn) override;
  Result<std::optional<std::pair<uint64_t, std::string>>> Witness(const std::string& chain) override;
  std::string Describe() const override { return "audit trail in store " + store_.where(); }
  Status ScanPruneUnits(const std::string& chain, const std::function<bool(const AuditPruneUnit&)>& each) override;
  Result<uint64_t> Prune(const std::string& chain, uint64_t through_seq) override;

 private:
  // One statement on the writer's connection, awaited until `deadline`.
  Result<Res> Run(const std::string& sql, const std::vector<std::string>& params, Clock::time_point deadline);
  Error Failed(const std::string& what, const PGresult* r);

  PgStore& store_;
  std::string node_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<Conn> conn_;  // the writer's; AuditLog has one batch in flight at a time
  // The head as this writer last wrote it, while its connection stands:
  // lets a batch be one statement (see Append).
  std::optional<AuditHead> known_;
};

Error PgAuditStorage::Failed(const std::string& what, const PGresult* r) {
  std::string reason;
  if (r != nullptr && PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) != nullptr) {
    reason = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
  } else if (conn_ && conn_->pg != nullptr) {
    reason = PQerrorMessage(conn_->pg);
  }
  while (!reason.empty() && (reason.back() == '\n' || reason.back() == ' ')) reason.pop_back();
  if (reason.empty()) reason = "no answer from the server";
  // Whatever state the connection is in now is not worth knowing: the next
  // batch starts on a fresh one.
  conn_.reset();
  return Error(Category::kUnavailable,
               Describe() + ": " + what + " (" + EscapeUntrusted(reason, 300) + "); the records were not written",
               Backend::kStore, 0);
}

Result<Res> PgAuditStorage::Run(const std::string& sql, const std::vector<std::string>& params,
                                Clock::time_point deadline) {
  PGconn* c = conn_->pg;
  std::vector<const char*> values;
  for (const auto& p : params) values.push_back(p.c_str());
  if (PQsendQueryParams(c, sql.c_str(), static_cast<int>(values.size()), nullptr, values.data(), nullptr, nullptr,
                        0) != 1) {
    return Failed("sending a statement failed", nullptr);
  }
  auto wait = [&](short events) -> Status {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      return Failed("PostgreSQL did not answer within " + std::to_string(timeout_.count()) + " ms", nullptr);
    }
    pollfd p{PQsocket(c), events, 0};
    int n = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 1000)));
    if (n < 0 && errno != EINTR) return Failed("waiting for the server failed", nullptr);
    // Any event (data, a hang-up, an error): libpq reads what there is and
    // says whether the connection still stands.
    if (n > 0 && p.revents != 0 && PQconsumeInput(c) != 1) return Failed("the connection was lost", nullptr);
    return Status::Ok();
  };
  for (;;) {
    int f = PQflush(c);
    if (f == 0) break;
    if (f < 0) return Failed("the connection was lost", nullptr);
    CUSTODY_RETURN_IF_ERROR(wait(POLLIN | POLLOUT));
  }
  std::optional<Res> result;
  for (;;) {
    while (PQisBusy(c) == 0) {
      PGresult* r = PQgetResult(c);
      if (r == nullptr) {
        if (!result) return Failed("the server sent no result", nullptr);
        const auto st = PQresultStatus(result->raw());
        if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) return Failed("a statement failed", result->raw());
        return std::move(*result);
      }
      if (!result) {
        result.emplace(r);
      } else {
        PQclear(r);  // one statement, one result; keep the first
      }
    }
    CUSTODY_RETURN_IF_ERROR(wait(POLLIN));
  }
}

Status PgAuditStorage::Append(Clock::time_point deadline, const Build& build) {
  if (!conn_) {
    known_.reset();  // a lost connection may have lost a COMMIT's answer
    CUSTODY_ASSIGN_OR_RETURN(conn_, store_.OpenConnection());
    // Non-blocking sends: a full socket buffer returns to our poll()
    // instead of holding the writer.
    if (PQsetnonblocking(conn_->pg, 1) != 0) return Failed("setting up the connection failed", nullptr);
  }
  if (known_) {
    // The usual batch: one statement, one round trip. The head this writer
    // wrote last is moved only if it is still what the row holds (seq and
    // hash), and the lines go in only with that move, in the same implicit
    // transaction. A writer on another host that moved the head in between
    // (two processes given one node name) makes it touch nothing; the batch
    // is then built again on the locked path below.
    std::vector<AuditLine> lines = build(*known_);
    if (lines.empty()) return Status::Ok();
    const AuditLine& last = lines.back();
    CUSTODY_ASSIGN_OR_RETURN(
        Res r, Run("WITH up AS (UPDATE audit_heads SET seq = $4, hash = $5, ckpt_seq = $6, ckpt_time = $7 "
                   "WHERE node = $1 AND seq = $8 AND hash = $9 RETURNING node), "
                   "ins AS (INSERT INTO audit_records(node, seq, line) SELECT up.node, s, l FROM up, "
                   "unnest($2::bigint[], $3::text[]) AS t(s, l) RETURNING 1) "
                   "SELECT count(*) FROM ins",
                   {node_, IntArray(lines), TextArray(lines), std::to_string(last.seq), last.hash,
                    std::to_string(last.ckpt_seq), std::to_string(last.ckpt_time), std::to_string(known_->seq),
                    known_->hash},
                   deadline));
    if (r.Int(0, 0) == static_cast<int64_t>(lines.size())) {
      known_ = AuditHead{last.seq, last.hash, last.ckpt_seq, last.ckpt_time};
      return Status::Ok();
    }
    known_.reset();
  }
  CUSTODY_RETURN_IF_ERROR(Run("BEGIN", {}, deadline));
  // The head row, made on a node's first record and locked until COMMIT:
  // one writer of this node's chain at a time, on any host.
  CUSTODY_ASSIGN_OR_RETURN(Res h, Run("INSERT INTO audit_heads(node) VALUES ($1) ON CONFLICT (node) DO UPDATE "
                                      "SET node = excluded.node RETURNING seq, hash, ckpt_seq, ckpt_time",
                                      {node_}, deadline));
  AuditHead head;
  head.seq = static_cast<uint64_t>(h.Int(0, 0));
  head.hash = h.Text(0, 1);
  head.ckpt_seq = static_cast<uint64_t>(h.Int(0, 2));
  head.ckpt_time = h.Int(0, 3);
  std::vector<AuditLine> lines = build(head);
  if (lines.empty()) {
    CUSTODY_RETURN_IF_ERROR(Run("ROLLBACK", {}, deadline));
    known_ = head;
    return Status::Ok();
  }
  const AuditLine& last = lines.back();
  CUSTODY_RETURN_IF_ERROR(
      Run("WITH ins AS (INSERT INTO audit_records(node, seq, line) SELECT $1, s, l FROM unnest($2::bigint[], "
          "$3::text[]) AS t(s, l)) UPDATE audit_heads SET seq = $4, hash = $5, ckpt_seq = $6, ckpt_time = $7 "
          "WHERE node = $1",
          {node_, IntArray(lines), TextArray(lines), std::to_string(last.seq), last.hash, std::to_string(last.ckpt_seq),
           std::to_string(last.ckpt_time)},
          deadline));
  CUSTODY_RETURN_IF_ERROR(Run("COMMIT", {}, deadline));
  known_ = AuditHead{last.seq, last.hash, last.ckpt_seq, last.ckpt_time};
  return Status::Ok();
}

Result<AuditHead> PgAuditStorage::Head() {
  Session s(store_);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT seq, hash, ckpt_seq, ckpt_time FROM audit_heads WHERE node = $1",
                                        Params().Add(node_)));
  AuditHead head;
  head.hash = std::string(64, '0');
  if (r.rows() == 1) {
    head.seq = static_cast<uint64_t>(r.Int(0, 0));
    head.hash = r.Text(0, 1);
    head.ckpt_seq = static_cast<uint64_t>(r.Int(0, 2));
    head.ckpt_time = r.Int(0, 3);
  }
  return head;
}

Result<std::vector<std::string>> PgAuditStorage::Chains() {
  Session s(store_);
  if (!s.ok()) return s.error();
  // A chain whose head row was deleted still has records, and is listed.
  CUSTODY_ASSIGN_OR_RETURN(
      Res r, s.Run("SELECT node FROM audit_heads UNION SELECT DISTINCT node FROM audit_records ORDER BY 1"));
  std::vector<std::string> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back(r.Text(i, 0));
  return out;
}

Status PgAuditStorage::Read(const std::string& chain, const std::function<void(AuditChainLine&&)>& each, bool* torn) {
  if (torn != nullptr) *torn = false;  // a transaction leaves no partial record
  Session s(store_);
  if (!s.ok()) return s.error();
  // All pages from one snapshot, so a prune deleting old rows in batches
  // meanwhile cannot make the chain look cut in the middle.
  CUSTODY_RETURN_IF_ERROR(s.Exec("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"));
  const std::string who = "node " + EscapeUntrusted(chain, 64) + " row ";
  Status read = ReadRows(s, chain, INT64_MAX, [&](int64_t seq, std::string line) {
    each({who + std::to_string(seq), std::move(line)});
    return true;
  });
  s.Rollback();  // nothing was written: ending it either way is the same
  return read;
}

Result<std::optional<std::pair<uint64_t, std::string>>> PgAuditStorage::Witness(const std::string& chain) {
  Session s(store_);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT seq FROM audit_heads WHERE node = $1", Params().Add(chain)));
  std::optional<std::pair<uint64_t, std::string>> out;
  if (r.rows() == 1) {
    out.emplace(static_cast<uint64_t>(r.Int(0, 0)), "the head row of node " + EscapeUntrusted(chain, 64) + " points");
  }
  return out;
}

// A row is a unit: nothing forces a coarser cut.
Status PgAuditStorage::ScanPruneUnits(const std::string& chain,
                                      const std::function<bool(const AuditPruneUnit&)>& each) {
  Session s(store_);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res h, s.Run("SELECT seq FROM audit_heads WHERE node = $1", Params().Add(chain)));
  if (h.rows() != 1) return Status::Ok();
  Status damaged = Status::Ok();
  CUSTODY_RETURN_IF_ERROR(ReadRows(s, chain, h.Int(0, 0), [&](int64_t seq, std::string line) {
    auto rec = ParseAuditRecord(line);
    if (!rec) {
      damaged = Error(Category::kIntegrity, Describe() + ": node " + EscapeUntrusted(chain, 64) + " row " +
                                                std::to_string(seq) + ": " + rec.error().message());
      return false;
    }
    AuditPruneUnit u;
    u.name = "record " + std::to_string(rec->seq);
    u.first_seq = u.last_seq = rec->seq;
    u.last_hash = rec->hash;
    u.newest_unix_time = rec->unix_time;
    u.bytes = line.size();
    return each(u);
  }));
  return damaged;
}

Result<uint64_t> PgAuditStorage::Prune(const std::string& chain, uint64_t through_seq) {
  Session s(store_);
  if (!s.ok()) return s.error();
  // Rows below the head are never written again and the head only grows,
  // so the head read once bounds the delete (its record always stays) and
  // no writer's lock is needed: the deletes run in batches of their own,
  // each short, beside a node that keeps appending.
  CUSTODY_ASSIGN_OR_RETURN(Res h, s.Run("SELECT seq FROM audit_heads WHERE node = $1", Params().Add(chain)));
  if (h.rows() != 1) return uint64_t{0};
  const int64_t last =
      std::min<int64_t>(static_cast<int64_t>(std::min<uint64_t>(through_seq, INT64_MAX)), h.Int(0, 0) - 1);
  constexpr int64_t kBatch = 10000;
  uint64_t removed = 0;
  for (;;) {
    CUSTODY_ASSIGN_OR_RETURN(
        Res d, s.Run("WITH gone AS (DELETE FROM audit_records WHERE node = $1 AND seq IN (SELECT seq FROM "
                     "audit_records WHERE node = $1 AND seq <= $2 ORDER BY seq LIMIT $3) RETURNING 1) "
                     "SELECT count(*) FROM gone",
                     Params().Add(chain).Add(last).Add(kBatch)));
    const int64_t n = d.Int(0, 0);
    removed += static_cast<uint64_t>(n);
    if (n < kBatch) return removed;
  }
}

}  // namespace

Result<std::unique_ptr<AuditStorage>> PgStore::OpenAuditStorage(const std::string& node,
                                                                std::chrono::milliseconds timeout) {
  return std::unique_ptr<AuditStorage>(std::make_unique<PgAuditStorage>(*this, node, timeout));
}

}  // namespace custody::core::pg
