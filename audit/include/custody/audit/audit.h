// The audit log: one JSON line per operation, hash-chained, with checkpoints
// signed by an ECDSA P-256 key that never leaves the token.
//
//   auto log = core::AuditLog::Open({.dir = "/var/lib/custody/audit"});
//   CUSTODY_ASSIGN_OR_RETURN(uint64_t seq, (*log)->Append(event));   // durable on return
//   if ((*log)->CheckpointDue()) (void)(*log)->Checkpoint(signer);
//
// Line format (docs/AUDIT.md has every field):
//   {"seq":7,"time":"...","type":"event",...,"prev":"<64 hex>","hash":"<64 hex>"}
// `hash` is SHA-256 of the line's bytes up to (not including) `,"hash":...`
// with a closing `}` appended; `prev` is the previous record's hash. The
// chain runs across segment files (audit-000001.jsonl, ...).
//
// Durability and concurrency: Append returns only after the record is on
// disk (fsync). Threads of one process share one write and one fsync per
// batch (group commit); processes take turns through an flock on the log
// folder. Every wait has a deadline: a stuck disk gives an error, never a hang.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "custody/audit/options.h"
#include "custody/common/result.h"

namespace custody::core {

// What happened. Never a secret value, a PIN, or a fingerprint of a value:
// a value is named by its version and the KEK it is sealed under.
// What the policy said; written as "allow", "deny", "limit", "none" (no
// policy question was asked), or "" before anything was decided.
enum class AuditDecision : uint8_t { kUnset, kAllow, kDeny, kLimit, kNone };
// How the operation ended: "ok", "refused", "error", or "".
enum class AuditResult : uint8_t { kUnset, kOk, kRefused, kError };
const char* AuditDecisionName(AuditDecision d);
const char* AuditResultName(AuditResult r);
// The word back; nullopt for a word that is none of them.
std::optional<AuditDecision> ParseAuditDecision(std::string_view word);
std::optional<AuditResult> ParseAuditResult(std::string_view word);

struct AuditEvent {
  std::string action;         // "secret.get", "secret.put", "policy.apply", "token.login", ...
  std::string principal;      // "user:alice"; empty when the caller matched no principal
  std::string identified_by;  // "uid 1000 (alice)", "tls san ..."
  std::string project, environment, name;
  std::optional<uint32_t> version;
  std::string kek_id;    // hex CKA_ID of the KEK, when a value was sealed or unsealed
  AuditDecision decision = AuditDecision::kUnset;
  std::string rule;  // the grant or limit that decided
  AuditResult result = AuditResult::kUnset;
  std::string error;     // what failed, when result is not ok
  std::string request_id;
  std::string detail;    // free text that is not secret (policy sha256, counts)
};

// An id for one command or request, shared by its audit records: 16 hex
// digits, a random prefix per process and a counter (unique, not secret).
std::string NewRequestId();

// Signs checkpoint messages; the token implementation is TokenAuditSigner.
class AuditSigner {
 public:
  virtual ~AuditSigner() = default;
  // ECDSA P-256 over SHA-256(message); DER-encoded signature.
  virtual Result<std::vector<uint8_t>> Sign(std::string_view message) = 0;
  virtual std::string key_id() const = 0;  // hex key id
  // The public key as PEM, for `custody audit pubkey` and openssl.
  virtual Result<std::string> PublicKeyPem() const = 0;
};

// A line as read back.
struct AuditRecord {
  uint64_t seq = 0;
  std::string type;  // "event", "checkpoint", "repair"
  std::string node;  // the node that wrote it ([node] name); empty in older logs
  std::string time;
  int64_t unix_time = 0;
  std::string prev, hash;
  AuditEvent event;  // for type event
  // For checkpoints:
  uint64_t covers_seq = 0;
  std::string covers_hash, key_id, message, signature_b64;
  uint64_t ckpt_seq = 0;  // seq of the last checkpoint before this record (0: none)
  int64_t ckpt_time = 0;
};

// Parses one line (without its newline) and checks its own hash. Errors are
// kIntegrity and say what is wrong.
Result<AuditRecord> ParseAuditRecord(std::string_view line);

// The head of a chain: its newest record as the storage holds it.
struct AuditHead {
  uint64_t seq = 0;       // 0: no record yet
  std::string hash;       // of record `seq`; 64 zeros before the first
  uint64_t ckpt_seq = 0;  // the newest checkpoint at or before `seq`
  int64_t ckpt_time = 0;
  uint64_t torn_bytes = 0;  // a record torn by a crash, cut off when the turn was taken (files only)
};

// One record as its storage keeps it: the line, and for a checkpoint its
// message and DER signature (the file log also writes them as .msg/.sig).
struct AuditLine {
  uint64_t seq = 0;
  std::string text;  // without a newline
  bool checkpoint = false;
  std::string message, signature;
  // The head once this record is written: its hash, and the newest
  // checkpoint as of it.
  std::string hash;
  uint64_t ckpt_seq = 0;
  int64_t ckpt_time = 0;
};

// A record as read back for verification: its text and where it was found
// ("audit-000001.jsonl:17", "node node-a row 17"), for the report.
struct AuditChainLine {
  std::string where;
  std::string text;
};

// Retention (`custody audit prune`). A chain's oldest records may be
// removed, in whole units (the file log: segment files), only after a
// record of action kAuditPruneAction in the same chain, written first, says
// where the chain now starts: AuditPruneStatement in its detail, the first
// kept seq, the prev hash that record carries, and the audit key's
// signature over AuditPruneMessage of the two. VerifyAuditChain accepts a
// chain whose first record is past seq 1 only when such a statement names a
// record the chain still has, that record's prev hash, and its signature
// verifies with the audit key: record hashes alone are keyless, and anyone
// able to append a line could otherwise claim any start. Otherwise the
// missing records are reported as deleted, as before.
inline constexpr const char* kAuditPruneAction = "audit.prune";
// What the audit key signs: "custody-audit-prune-v1 start=42 prev=<hex>\n".
std::string AuditPruneMessage(uint64_t first_kept_seq, std::string_view prev_hash);
// "the log now starts at seq 42 after hash <hex>; signature <base64 DER>".
std::string AuditPruneStatement(uint64_t first_kept_seq, std::string_view prev_hash,
                                std::span<const uint8_t> signature_der);
struct AuditPruneClaim {
  uint64_t first_kept_seq = 0;
  std::string prev_hash;      // 64 lowercase hex digits
  std::string signature_b64;  // as written; decoded and checked by the verifier
};
// The statement found in `detail`; nullopt when there is none, well formed.
std::optional<AuditPruneClaim> FindAuditPruneStatement(std::string_view detail);

// A unit a chain's oldest records can be removed in (a segment file).
struct AuditPruneUnit {
  std::string name;  // "audit-000001.jsonl"; "record 17" in the store (a row is a unit)
  uint64_t first_seq = 0, last_seq = 0;
  int64_t newest_unix_time = 0;  // of its records (seconds)
  std::string last_hash;         // of record last_seq
  uint64_t bytes = 0;
};

// Where the records of a chain live. AuditLog does the chaining, hashing,
// checkpoint signing and group commit; a storage only gives one writer at a
// time the head and keeps what it writes durably. The file log
// (FileAuditStorage) keeps one chain in segment files; the PostgreSQL store
// keeps one chain per node in a table, so that no acknowledged record
// depends on one node's disk (store/postgres/).
class AuditStorage {
 public:
  virtual ~AuditStorage() = default;
  // Takes this writer's exclusive turn on the chain, waiting no later than
  // `deadline`; calls `build` with the head, and makes the lines it returns
  // durable before returning Ok (all of them or none). `build` may return no
  // lines. Errors are kUnavailable (kIntegrity for a damaged head) and mean
  // that nothing `build` returned may be taken as written.
  using Build = std::function<std::vector<AuditLine>(const AuditHead&)>;
  virtual Status Append(std::chrono::steady_clock::time_point deadline, const Build& build) = 0;
  // The head without writing (for CheckpointDue after opening).
  virtual Result<AuditHead> Head() = 0;
  // The chains this storage holds: one ("") for files, one per node name
  // for the database.
  virtual Result<std::vector<std::string>> Chains() = 0;
  // Every record of `chain` in storage order (files: segments and lines;
  // database: the row's seq), to `each`. `torn` is set when the chain ends
  // in a partial record (a crash mid-write, files only).
  virtual Status Read(const std::string& chain, const std::function<void(AuditChainLine&&)>& each,
                      bool* torn = nullptr) = 0;
  // A witness this storage keeps besides the records, of how far `chain`
  // reached (the file log's checkpoints/ folder, the database's head row):
  // the seq, and what says so ("checkpoints/ records a checkpoint"), for
  // the report of a truncation. nullopt: none.
  virtual Result<std::optional<std::pair<uint64_t, std::string>>> Witness(const std::string& chain) = 0;
  // For messages: "audit log /var/lib/custody/audit", "audit trail in store ...".
  virtual std::string Describe() const = 0;
  // Retention: the units `chain`'s oldest records could be removed in, to
  // `each`, oldest first, until it returns false; never the unit the head
  // is in. The default (a storage that cannot prune) is kUnavailable.
  virtual Status ScanPruneUnits(const std::string& chain, const std::function<bool(const AuditPruneUnit&)>& each);
  // Removes, oldest first and in the writers' turn, every unit whose records
  // are all at or before `through_seq`; never the head's unit. Returns how
  // many records went. The caller has already made durable the
  // kAuditPruneAction record that says where the chain starts once they
  // are gone.
  virtual Result<uint64_t> Prune(const std::string& chain, uint64_t through_seq);
};

// The file log's storage: segment files in `options.dir`, an flock on the
// folder between processes, fdatasync per batch.
std::unique_ptr<AuditStorage> FileAuditStorage(const AuditOptions& options);

class AuditLog {
 public:
  // `storage` null: the file log in options.dir.
  static Result<std::unique_ptr<AuditLog>> Open(AuditOptions options, std::unique_ptr<AuditStorage> storage = nullptr);
  ~AuditLog();

  // Appends one record; returns its seq once it is durable. kUnavailable
  // when the log cannot be written (disk full, permissions, lock timeout):
  // the caller must then refuse the operation it was about to perform.
  Result<uint64_t> Append(const AuditEvent& event);

  // Append without holding the caller's thread (custodyd: a request waits
  // for its batch's fsync without occupying a server thread, so one fsync
  // serves every request in flight). `done` gets the seq once the record is
  // durable, or the error; on error the caller must refuse, as with Append.
  // It runs on the log's writer thread (or on a thread inside Append that
  // wrote the batch): it must be short and must not call into this log.
  // Destroying the log writes what is queued and runs every `done` first.
  //
  // `lead_if_idle`: when no batch is being written and nothing is queued,
  // write this record on the calling thread instead (`done` then runs here,
  // before AppendAsync returns). For a caller with nothing else to do while
  // it waits: it saves the two thread hand-offs to the writer and back,
  // which on an idle machine cost more than the fsync. A caller that has
  // other work must not pass it; nor one that cannot afford to be held by
  // a disk that stops answering (the record's fsync is then waited for on
  // this thread).
  using Done = std::function<void(Result<uint64_t>)>;
  class Announcement;
  void AppendAsync(const AuditEvent& event, Done done, bool lead_if_idle = false, Announcement* announced = nullptr);

  // Fails every AppendAsync record that has waited in the queue longer
  // than `timeout` (kUnavailable, "timed out waiting for the disk"): what
  // is queued behind a batch whose fsync does not return (a disk that
  // stopped answering) is refused instead of waiting for ever, so its
  // request gets a 503 and its connection is freed. A record already in
  // the batch under way is not touched: it may yet become durable, and its
  // outcome is its own. Returns how many were failed. custodyd calls it
  // every second.
  size_t ExpireQueued();

  // A record on its way: a caller that will call AppendAsync soon (a GET
  // whose store read and unseal are under way) says so first. While any
  // record is announced, the writer thread holds a batch back for up to
  // options.gather, until every announced record has joined it, so that
  // requests in flight together share one fsync instead of each paying
  // one (group commit, as PostgreSQL's commit_delay). AppendAsync with it
  // ends the announcement; so does destroying it.
  class Announcement {
   public:
    Announcement(const Announcement&) = delete;
    Announcement& operator=(const Announcement&) = delete;
    ~Announcement();

   private:
    friend class AuditLog;
    explicit Announcement(AuditLog* log) : log_(log) {}
    AuditLog* log_ = nullptr;
  };
  Announcement Announce();

  // Whether checkpoint_every records or checkpoint_seconds have passed since
  // the last checkpoint (as of the last record this process saw).
  bool CheckpointDue() const;
  // Appends a checkpoint signing the hash of the record before it. Returns
  // its seq; `covers` receives (seq, hash) of the covered record.
  Result<uint64_t> Checkpoint(AuditSigner& signer, std::pair<uint64_t, std::string>* covers = nullptr);

  const std::string& dir() const { return options_.dir; }
  AuditStorage& storage() { return *storage_; }

  // AppendAsync callbacks that threw (they are caught so that the others
  // still run; custodyd reports the count).
  uint64_t failed_callbacks() const { return failed_callbacks_.load(); }

  // How long the batch being written now has been at it (zero when no
  // write is under way). A disk that stopped answering shows here, not as
  // an error: its fdatasync simply never returns, and every request that
  // needs a record waits. custodyd reports it in /v1/health and /metrics.
  std::chrono::milliseconds write_in_progress_for() const;
  // Batches whose writing threw (out of memory, say): their requests were
  // refused, the log went on.
  uint64_t failed_batches() const { return failed_batches_.load(); }
  // Batches written and the records in them (their ratio is how many
  // records share one fsync: custodyd's /metrics).
  uint64_t batches_written() const { return batches_written_.load(); }
  uint64_t records_written() const { return records_written_.load(); }

 private:
  struct Item {
    AuditEvent event;
    AuditSigner* signer = nullptr;  // set for a checkpoint
    Done done;                      // set for AppendAsync
    std::chrono::steady_clock::time_point queued_at{};  // set for AppendAsync
  };
  struct Outcome {
    Status status;
    uint64_t seq = 0;
    std::pair<uint64_t, std::string> covers;
  };
  AuditLog(AuditOptions o, std::unique_ptr<AuditStorage> s) : options_(std::move(o)), storage_(std::move(s)) {}
  Result<uint64_t> Submit(Item item, std::pair<uint64_t, std::string>* covers);
  // With mu_ held through `lk` and no leader: writes everything queued as one
  // batch (mu_ released meanwhile), files the outcomes for waiting callers
  // and runs the callbacks of async items (mu_ released).
  void Lead(std::unique_lock<std::mutex>& lk);
  void WriterLoop();
  // Writes a batch under the cross-process lock; fills one outcome per item.
  std::vector<Outcome> WriteBatch(std::vector<Item>& items);

  AuditOptions options_;
  std::unique_ptr<AuditStorage> storage_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<uint64_t, Item>> queue_;
  std::map<uint64_t, Outcome> done_;
  uint64_t next_ticket_ = 1;
  bool leader_ = false;
  // The writer thread for AppendAsync, started with the first one.
  std::condition_variable writer_cv_;
  std::thread writer_;
  bool stop_ = false;
  // Records announced and not yet queued (Announce); the writer holding a
  // batch back for them (mu_).
  std::atomic<int64_t> announced_{0};
  bool gathering_ = false;
  size_t gather_target_ = 0;  // the queue's size at which the writer stops holding
  std::chrono::steady_clock::time_point first_queued_;  // of the oldest record queued
  // With mu_ held: one announced record was queued, or given up.
  void EndAnnouncement(std::unique_lock<std::mutex>& lk, bool given_up);
  std::atomic<uint64_t> failed_callbacks_{0};
  std::atomic<uint64_t> failed_batches_{0};
  std::atomic<uint64_t> batches_written_{0};
  std::atomic<uint64_t> records_written_{0};
  // steady_clock nanoseconds at which the current batch began; 0: none.
  std::atomic<int64_t> writing_since_ns_{0};
  // What this process last saw of the head (for CheckpointDue).
  mutable std::mutex head_mu_;
  uint64_t last_seq_ = 0, last_ckpt_seq_ = 0;
  int64_t last_ckpt_time_ = 0;
};

struct AuditVerifyOptions {
  std::vector<std::string> files;  // in order; empty: every segment in dir
  std::string dir;
  std::string public_key_pem;      // checkpoint key; empty: checkpoints are not checked (reported)
  // Independent witnesses of checkpoints written (for truncation): the
  // highest checkpoint recorded elsewhere (the store: its seq and the hash it
  // covers), and the checkpoints/ folder of .msg/.sig files.
  std::optional<std::pair<uint64_t, std::string>> witness;
  // Called now and then with the records checked so far and the total (for
  // a progress display on a large log); optional.
  std::function<void(uint64_t done, uint64_t total)> progress = {};
};

struct AuditVerifyReport {
  bool intact = false;
  uint64_t records = 0, checkpoints = 0, last_seq = 0, last_checkpoint_seq = 0;
  uint64_t unsigned_tail = 0;  // records after the last checkpoint (not yet covered by a signature)
  bool torn_tail = false;      // a partial last line, as a crash leaves it
  uint64_t first_seq = 0;      // of the first record: 1, or past it when the oldest were pruned
  uint64_t pruned_by = 0;      // the kAuditPruneAction record that says the chain starts there (0: none)
  std::string problem;         // first problem: "record seq 17 (audit-000001.jsonl:17): modified: ..."
};

Result<AuditVerifyReport> VerifyAuditLog(const AuditVerifyOptions& options);

// Verifies one chain as a storage gives it (lines in storage order): the
// hash chain, every checkpoint (signatures with options.public_key_pem when
// set), options.witness (the store's record of the newest checkpoint) and
// `storage_witness` (AuditStorage::Witness). `node`, when not empty, is the
// chain's node: a record naming another node is reported as moved.
// Errors only for a key that is not a PEM public key.
Result<AuditVerifyReport> VerifyAuditChain(const std::vector<AuditChainLine>& lines, bool torn_tail,
                                           const AuditVerifyOptions& options, const std::string& node,
                                           const std::optional<std::pair<uint64_t, std::string>>& storage_witness);

// Reads every record of the segments in `dir`, in order (for `audit show`).
Result<std::vector<AuditRecord>> ReadAuditLog(const std::string& dir);

// The segment files of a log folder, in chain order.
std::vector<std::string> AuditSegments(const std::string& dir);

// PEM (SubjectPublicKeyInfo) of an uncompressed P-256 point.
Result<std::string> P256PublicKeyPem(std::span<const uint8_t> point);

// An ECDSA P-256 signature as r||s (32 bytes each, as PKCS#11 and the TPM
// give it) in the DER form X.509 tools (openssl dgst -verify) read.
Result<std::vector<uint8_t>> P256SignatureDer(std::span<const uint8_t> rs);

}  // namespace custody::core
