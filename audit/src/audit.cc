#include "custody/audit/audit.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>
#include <thread>

#include "custody/common/base64.h"
#include "custody/common/hex.h"
#include "custody/common/time.h"
#include "custody/common/untrusted.h"
#include "audit_impl.h"

namespace custody::core {
namespace {
// A record that waited past [audit] timeout_ms (Submit, ExpireQueued).
Error TimedOutWaitingForTheDisk() {
  return Error(Category::kUnavailable, "audit log: timed out waiting for the disk; refusing");
}

using nlohmann::ordered_json;

constexpr std::string_view kHashKey = ",\"hash\":\"";
constexpr size_t kHashSuffix = 9 + 64 + 2;  // ,"hash":" + 64 hex + "}

// The line for a record: the JSON object without `hash`, then `hash` last.
std::string Seal(ordered_json& j, std::string* hash_out) {
  // Every string was made valid UTF-8 on its way in (EventJson); `replace`
  // is the backstop, so that dump can never throw on a record.
  std::string body = j.dump(-1, ' ', /*ensure_ascii=*/true, ordered_json::error_handler_t::replace);
  std::string hash = Sha256Hex(body);
  body.pop_back();  // the closing brace
  body += kHashKey;
  body += hash;
  body += "\"}";
  *hash_out = hash;
  return body;
}

// Fields may carry bytes a caller sent (a name in a refused path, a
// certificate's SAN): the edges check or escape them, and ValidUtf8 keeps
// whatever still is not UTF-8 visible as \xHH instead of failing the record.
// Text that is already UTF-8 is written unchanged.
ordered_json EventJson(const AuditEvent& e) {
  ordered_json j;
  j["request_id"] = ValidUtf8(e.request_id);
  j["principal"] = ValidUtf8(e.principal);
  j["identified_by"] = ValidUtf8(e.identified_by);
  j["action"] = ValidUtf8(e.action);
  j["project"] = ValidUtf8(e.project);
  j["environment"] = ValidUtf8(e.environment);
  j["name"] = ValidUtf8(e.name);
  j["version"] = e.version ? ordered_json(*e.version) : ordered_json(nullptr);
  j["kek_id"] = ValidUtf8(e.kek_id);
  j["decision"] = AuditDecisionName(e.decision);
  j["rule"] = ValidUtf8(e.rule);
  j["result"] = AuditResultName(e.result);
  j["error"] = ValidUtf8(e.error);
  j["detail"] = ValidUtf8(e.detail);
  return j;
}

Result<bool> VerifySignature(const std::string& pem, std::string_view message, std::span<const uint8_t> der) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  EVP_PKEY* key = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (key == nullptr) return Error(Category::kUsage, "the public key is not a PEM public key");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  int ok = EVP_DigestVerifyInit(ctx, nullptr, EVP_sha256(), nullptr, key) == 1 &&
           EVP_DigestVerify(ctx, der.data(), der.size(), reinterpret_cast<const unsigned char*>(message.data()),
                            message.size()) == 1;
  EVP_MD_CTX_free(ctx);
  EVP_PKEY_free(key);
  return ok != 0;
}

}  // namespace

namespace {
// Indexed by the enums; these words are what records hold.
constexpr const char* kDecisionWords[] = {"", "allow", "deny", "limit", "none"};
constexpr const char* kResultWords[] = {"", "ok", "refused", "error"};
}  // namespace

const char* AuditDecisionName(AuditDecision d) {
  const auto i = static_cast<size_t>(d);
  return i < std::size(kDecisionWords) ? kDecisionWords[i] : "";
}

const char* AuditResultName(AuditResult r) {
  const auto i = static_cast<size_t>(r);
  return i < std::size(kResultWords) ? kResultWords[i] : "";
}

std::optional<AuditDecision> ParseAuditDecision(std::string_view word) {
  for (size_t i = 0; i < std::size(kDecisionWords); ++i) {
    if (word == kDecisionWords[i]) return static_cast<AuditDecision>(i);
  }
  return std::nullopt;
}

std::optional<AuditResult> ParseAuditResult(std::string_view word) {
  for (size_t i = 0; i < std::size(kResultWords); ++i) {
    if (word == kResultWords[i]) return static_cast<AuditResult>(i);
  }
  return std::nullopt;
}

namespace {

// Request ids: a random 32-bit prefix per process and a counter that starts
// at a random value, 16 hex digits as before. An id names a request in the
// records; it is no secret and grants nothing, so one draw from the RNG per
// process is enough (it was one per request, a system call each time). A
// new prefix is drawn in a forked child at its first id (ForksSoFar says
// it is one), and when the counter comes
// back to where it started, so that no id repeats within a process.
struct RequestIds {
  enum : int { kStale, kDrawing, kReady };
  std::atomic<int> state{kStale};
  std::atomic<uint64_t> next{0};
  std::atomic<uint32_t> start{0};
  std::atomic<uint64_t> forks{0};  // ForksSoFar() at the draw
  void Draw() {
    uint8_t b[8] = {};
    uint64_t v = 0;
    if (RAND_bytes(b, sizeof b) == 1) {
      std::memcpy(&v, b, sizeof v);
    } else {
      // No RNG: the clock and the process id still tell processes apart.
      v = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
          (static_cast<uint64_t>(::getpid()) << 32);
    }
    next.store(v, std::memory_order_relaxed);
    start.store(static_cast<uint32_t>(v), std::memory_order_relaxed);
  }
  uint64_t Next() {
    if (const uint64_t f = ForksSoFar(); f != forks.load(std::memory_order_relaxed)) {
      // A forked child (the count moves only in the child): its own prefix.
      forks.store(f, std::memory_order_relaxed);
      state.store(kStale, std::memory_order_release);
    }
    for (int s = state.load(std::memory_order_acquire); s != kReady; s = state.load(std::memory_order_acquire)) {
      // One thread draws; the others wait the moment it takes (no mutex: a
      // fork could leave one locked in the child).
      if (s == kStale && state.compare_exchange_strong(s, kDrawing, std::memory_order_acquire)) {
        Draw();
        state.store(kReady, std::memory_order_release);
        break;
      }
      std::this_thread::yield();
    }
    // The high half stays the prefix; the low half counts.
    uint64_t v = next.load(std::memory_order_relaxed);
    uint64_t id = 0;
    do {
      id = (v & 0xffffffff00000000ULL) | ((v + 1) & 0xffffffffULL);
    } while (!next.compare_exchange_weak(v, id, std::memory_order_relaxed));
    if (static_cast<uint32_t>(id) == start.load(std::memory_order_relaxed)) {
      // 2^32 ids from this prefix: the next would repeat the first.
      int ready = kReady;
      state.compare_exchange_strong(ready, kStale, std::memory_order_release);
    }
    return id;
  }
  static RequestIds& Instance() {
    static RequestIds ids;
    return ids;
  }
};

}  // namespace

std::string NewRequestId() {
  const uint64_t id = RequestIds::Instance().Next();
  uint8_t b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(id >> (56 - 8 * i));
  return ToHex(b);
}

Result<AuditRecord> ParseAuditRecord(std::string_view line) {
  auto bad = [](const std::string& why) { return Error(Category::kIntegrity, why); };
  if (line.size() > kAuditMaxLine) return bad("line longer than " + std::to_string(kAuditMaxLine) + " bytes");
  if (line.size() < kHashSuffix + 2 || line.front() != '{' || line.substr(line.size() - 2) != "\"}" ||
      line.substr(line.size() - kHashSuffix, kHashKey.size()) != kHashKey) {
    return bad("not an audit record (no trailing hash field)");
  }
  std::string hash(line.substr(line.size() - 66, 64));
  if (!IsLowerHex(hash, 64)) return bad("its hash field is not 64 hex digits");
  std::string body(line.substr(0, line.size() - kHashSuffix));
  body += '}';
  if (Sha256Hex(body) != hash) return bad("modified: its content does not match its hash");
  ordered_json j = ordered_json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return bad("not valid JSON");
  AuditRecord r;
  r.hash = hash;
  auto str = [&](const char* k, std::string& out) -> bool {
    auto it = j.find(k);
    if (it == j.end() || !it->is_string()) return false;
    out = it->get<std::string>();
    return true;
  };
  auto num = [&](const char* k, uint64_t& out) -> bool {
    auto it = j.find(k);
    if (it == j.end() || !it->is_number_unsigned()) return false;
    out = it->get<uint64_t>();
    return true;
  };
  uint64_t ckpt_time = 0, unix_time = 0;
  if (!num("seq", r.seq) || r.seq == 0 || !str("time", r.time) || !str("type", r.type) || !str("prev", r.prev) ||
      !num("ckpt_seq", r.ckpt_seq) || !num("ckpt_time", ckpt_time) || !num("unix_time", unix_time)) {
    return bad("missing or mistyped field (seq, time, unix_time, type, prev, ckpt_seq, ckpt_time)");
  }
  r.ckpt_time = static_cast<int64_t>(ckpt_time);
  r.unix_time = static_cast<int64_t>(unix_time);
  if (!IsLowerHex(r.prev, 64)) return bad("its prev field is not 64 hex digits");
  if (j.contains("node") && !str("node", r.node)) return bad("mistyped field node");
  if (r.type == "event" || r.type == "repair") {
    AuditEvent& e = r.event;
    bool ok = str("request_id", e.request_id) && str("principal", e.principal) &&
              str("identified_by", e.identified_by) && str("action", e.action) && str("project", e.project) &&
              str("environment", e.environment) && str("name", e.name) && str("kek_id", e.kek_id) &&
              str("rule", e.rule) && str("error", e.error) && str("detail", e.detail);
    std::string decision, result;
    ok = ok && str("decision", decision) && str("result", result);
    if (!ok) return bad("missing or mistyped event field");
    auto d = ParseAuditDecision(decision);
    auto o = ParseAuditResult(result);
    if (!d || !o) return bad("its decision or result is not one custody writes");
    e.decision = *d;
    e.result = *o;
    auto v = j.find("version");
    if (v == j.end()) return bad("missing field version");
    if (v->is_number_unsigned() && v->get<uint64_t>() <= UINT32_MAX) {
      e.version = static_cast<uint32_t>(v->get<uint64_t>());
    } else if (!v->is_null()) {
      return bad("mistyped field version");
    }
  } else if (r.type == "checkpoint") {
    if (!num("covers_seq", r.covers_seq) || !str("covers_hash", r.covers_hash) || !str("key_id", r.key_id) ||
        !str("message", r.message) || !str("signature", r.signature_b64)) {
      return bad("missing or mistyped checkpoint field");
    }
  } else {
    return bad("unknown record type '" + r.type + "'");
  }
  return r;
}

Result<std::unique_ptr<AuditLog>> AuditLog::Open(AuditOptions options, std::unique_ptr<AuditStorage> storage) {
  if (!storage) {
    if (::mkdir(options.dir.c_str(), 0700) != 0 && errno != EEXIST) {
      return Error::Os(errno, "audit log: cannot create " + options.dir);
    }
    std::string ck = options.dir + "/checkpoints";
    if (::mkdir(ck.c_str(), 0700) != 0 && errno != EEXIST) return Error::Os(errno, "audit log: cannot create " + ck);
    storage = FileAuditStorage(options);
  }
  std::unique_ptr<AuditLog> log(new AuditLog(std::move(options), std::move(storage)));
  CUSTODY_ASSIGN_OR_RETURN(AuditHead h, log->storage_->Head());
  log->last_seq_ = h.seq;
  log->last_ckpt_seq_ = h.ckpt_seq;
  log->last_ckpt_time_ = h.ckpt_time;
  return log;
}

AuditLog::~AuditLog() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  writer_cv_.notify_all();
  if (writer_.joinable()) writer_.join();
}

bool AuditLog::CheckpointDue() const {
  std::lock_guard lock(head_mu_);
  if (last_seq_ == 0 || last_seq_ == last_ckpt_seq_) return false;
  if (last_seq_ - last_ckpt_seq_ >= options_.checkpoint_every) return true;
  int64_t now = static_cast<int64_t>(std::time(nullptr));
  return last_ckpt_time_ == 0 || now - last_ckpt_time_ >= options_.checkpoint_seconds;
}

Result<uint64_t> AuditLog::Append(const AuditEvent& event) { return Submit(Item{event, nullptr, nullptr, {}}, nullptr); }

AuditLog::Announcement AuditLog::Announce() {
  announced_.fetch_add(1);
  return Announcement(this);
}

AuditLog::Announcement::~Announcement() {
  if (log_ == nullptr) return;
  std::unique_lock lk(log_->mu_);
  log_->EndAnnouncement(lk, /*given_up=*/true);
}

void AuditLog::EndAnnouncement(std::unique_lock<std::mutex>& lk, bool given_up) {
  (void)lk;
  const bool last = announced_.fetch_sub(1) == 1;
  if (!gathering_) return;
  // A record that will not come: the hold waits for one fewer. (It may
  // have been announced after the hold began and so not be counted in the
  // target: the batch is then written one record early, which is safe.)
  if (given_up && gather_target_ > 0) --gather_target_;
  // The writer is woken only when its hold can end: a wake-up per record
  // would cost it a context switch per record.
  if (last || queue_.size() >= gather_target_) writer_cv_.notify_one();
}

void AuditLog::AppendAsync(const AuditEvent& event, Done done, bool lead_if_idle, Announcement* announced) {
  std::unique_lock lk(mu_);
  const bool idle = !leader_ && queue_.empty() && !stop_;
  if (queue_.empty()) first_queued_ = std::chrono::steady_clock::now();
  queue_.emplace_back(next_ticket_++, Item{event, nullptr, std::move(done), std::chrono::steady_clock::now()});
  if (announced != nullptr && announced->log_ == this) {
    announced->log_ = nullptr;
    EndAnnouncement(lk, /*given_up=*/false);
  }
  if (lead_if_idle && idle) {
    Lead(lk);  // runs `done` here; never throws
    return;
  }
  if (!writer_.joinable()) {
    writer_ = std::thread([this] {
      ::pthread_setname_np(::pthread_self(), "audit-writer");  // for top -H and perf
      WriterLoop();
    });
  }
  const bool wake = !gathering_ || queue_.size() >= gather_target_;
  lk.unlock();
  if (wake) writer_cv_.notify_one();
}

size_t AuditLog::ExpireQueued() {
  std::vector<Done> expired;
  {
    std::lock_guard lk(mu_);
    const auto cutoff = std::chrono::steady_clock::now() - options_.timeout;
    for (auto it = queue_.begin(); it != queue_.end();) {
      // Synchronous appends (no `done`) keep their own deadline (Submit).
      if (it->second.done && it->second.queued_at <= cutoff) {
        expired.push_back(std::move(it->second.done));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
  }
  // Outside the lock, as Lead runs callbacks: a callback may append again.
  for (auto& done : expired) {
    done(TimedOutWaitingForTheDisk());
  }
  return expired.size();
}

std::chrono::milliseconds AuditLog::write_in_progress_for() const {
  const int64_t since = writing_since_ns_.load();
  if (since == 0) return std::chrono::milliseconds(0);
  const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  return std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::duration(std::max<int64_t>(0, now - since)));
}

void AuditLog::WriterLoop() {
  std::unique_lock lk(mu_);
  for (;;) {
    writer_cv_.wait(lk, [&] { return (stop_ && !leader_) || (!leader_ && !queue_.empty()); });
    if (queue_.empty()) return;  // stopping, and everything queued is written
    // Group commit: requests whose records were announced (a GET between
    // its policy check and its record) will queue theirs in a moment.
    // Writing now would cost them an fsync each, and the fsync's CPU (84
    // us on a virtual disk, measured in bench/server_bench) is what a
    // saturated node runs out of. So hold this batch until the records
    // announced now have come or been given up, or the oldest record has
    // waited group_commit_us. Records announced while holding are not
    // waited for: under steady load the hold would never end early. A
    // request alone in flight announces nothing to wait for, so a lone GET
    // is never held.
    const int64_t coming = announced_.load();
    if (options_.gather.count() > 0 && coming > 0 && !stop_) {
      gathering_ = true;
      gather_target_ = queue_.size() + static_cast<size_t>(coming);
      writer_cv_.wait_until(lk, first_queued_ + options_.gather, [&] {
        return stop_ || leader_ || announced_.load() == 0 || queue_.size() >= gather_target_;
      });
      gathering_ = false;
      if (leader_ || queue_.empty()) continue;
    }
    Lead(lk);  // never throws: a failed batch fails its own requests
  }
}

void AuditLog::Lead(std::unique_lock<std::mutex>& lk) {
  // Write everything queued so far in one batch with one fsync; the others
  // wait for us (group commit). Nothing here may leave `leader_` set or a
  // waiter without its outcome: every other writer, every GET and Stop()
  // waits on them (a throw here once wedged the whole log).
  leader_ = true;
  std::vector<std::pair<uint64_t, Item>> batch;
  batch.swap(queue_);
  lk.unlock();
  std::vector<Item> items;
  std::vector<Outcome> outcomes;
  writing_since_ns_.store(std::max<int64_t>(1, std::chrono::steady_clock::now().time_since_epoch().count()));
  try {
    items.reserve(batch.size());
    for (auto& [t, i] : batch) items.push_back(std::move(i));
    outcomes = WriteBatch(items);
  } catch (...) {
    // Whatever was thrown (std::bad_alloc, or anything a storage or signer
    // lets out): this batch fails, the log goes on.
    outcomes.clear();
  }
  writing_since_ns_.store(0);
  if (outcomes.size() == batch.size()) {
    const auto written = static_cast<uint64_t>(
        std::count_if(outcomes.begin(), outcomes.end(), [](const Outcome& o) { return o.status.ok(); }));
    if (written > 0) {
      batches_written_.fetch_add(1);
      records_written_.fetch_add(written);
    }
  }
  if (outcomes.size() != batch.size()) {
    failed_batches_.fetch_add(1);
    // WriteBatch threw (out of memory): nothing of the batch is known to be
    // durable, so every request in it is refused.
    outcomes.assign(batch.size(), Outcome{});
    for (auto& o : outcomes) o.status = Error(Category::kUnavailable, "audit log: the batch could not be written; refusing");
  }
  if (items.size() < batch.size()) {
    for (size_t i = items.size(); i < batch.size(); ++i) items.push_back(std::move(batch[i].second));
  }
  lk.lock();
  std::vector<std::pair<Done, Outcome>> callbacks;
  for (size_t i = 0; i < batch.size(); ++i) {
    if (items[i].done) {
      callbacks.emplace_back(std::move(items[i].done), std::move(outcomes[i]));
    } else {
      done_[batch[i].first] = std::move(outcomes[i]);
    }
  }
  leader_ = false;
  cv_.notify_all();
  // Only when there is something for the writer: waking it for nothing
  // (after a batch a request thread led) is a context switch per request.
  if (!queue_.empty() || stop_) writer_cv_.notify_one();
  if (callbacks.empty()) return;
  lk.unlock();
  for (auto& [done, o] : callbacks) {
    // A callback that throws must not cost the others their answers.
    try {
      if (o.status.ok()) {
        done(o.seq);
      } else {
        done(std::move(o.status).error());
      }
    } catch (...) {
      failed_callbacks_.fetch_add(1);
    }
  }
  lk.lock();
}

Result<uint64_t> AuditLog::Checkpoint(AuditSigner& signer, std::pair<uint64_t, std::string>* covers) {
  return Submit(Item{AuditEvent{}, &signer, nullptr, {}}, covers);
}

Result<uint64_t> AuditLog::Submit(Item item, std::pair<uint64_t, std::string>* covers) {
  std::unique_lock lk(mu_);
  const uint64_t ticket = next_ticket_++;
  if (queue_.empty()) first_queued_ = std::chrono::steady_clock::now();
  queue_.emplace_back(ticket, std::move(item));
  const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
  for (;;) {
    if (auto it = done_.find(ticket); it != done_.end()) {
      Outcome o = std::move(it->second);
      done_.erase(it);
      if (!o.status.ok()) return std::move(o.status).error();
      if (covers) *covers = o.covers;
      return o.seq;
    }
    if (!leader_) {
      Lead(lk);
      continue;
    }
    if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && done_.find(ticket) == done_.end()) {
      auto q = std::find_if(queue_.begin(), queue_.end(), [&](const auto& p) { return p.first == ticket; });
      if (q != queue_.end()) {
        queue_.erase(q);
        return TimedOutWaitingForTheDisk();
      }
      // Already in a batch being written: its outcome is on its way.
    }
  }
}

std::vector<AuditLog::Outcome> AuditLog::WriteBatch(std::vector<Item>& items) {
  std::vector<Outcome> out(items.size());
  AuditHead end;  // the head after the batch, once written
  // Runs with the storage's turn held: builds every line from the head it
  // gives. It may run again (never twice for one success), so it starts
  // from a clean slate each time.
  auto build = [&](const AuditHead& start) {
    std::vector<AuditLine> lines;
    for (auto& o : out) o = Outcome{};
    AuditHead h = start;
    if (h.hash.empty()) h.hash = kAuditGenesis;
    auto now = std::chrono::system_clock::now();
    int64_t unix_now = 0;
    std::string time = FormatUtcMillis(now, &unix_now);
    // Builds the record's line first and moves the head only once it
    // exists: a record that cannot be built fails alone, and the chain goes
    // on from the record before it.
    auto emit = [&](const ordered_json& j, const std::string& type) -> AuditLine& {
      const uint64_t seq = h.seq + 1;
      const bool checkpoint = type == "checkpoint";
      ordered_json rec;
      rec["seq"] = seq;
      rec["time"] = time;
      rec["unix_time"] = static_cast<uint64_t>(unix_now);
      rec["type"] = type;
      if (!options_.node.empty()) rec["node"] = options_.node;
      for (auto& [k, v] : j.items()) rec[k] = v;
      rec["ckpt_seq"] = checkpoint ? seq : h.ckpt_seq;
      rec["ckpt_time"] = static_cast<uint64_t>(checkpoint ? unix_now : h.ckpt_time);
      rec["prev"] = h.hash;
      std::string hash;
      std::string line = Seal(rec, &hash);
      h.seq = seq;
      h.hash = hash;
      if (checkpoint) {
        h.ckpt_seq = seq;
        h.ckpt_time = unix_now;
      }
      AuditLine& l = lines.emplace_back();
      l.seq = seq;
      l.text = std::move(line);
      l.checkpoint = checkpoint;
      l.hash = h.hash;
      l.ckpt_seq = h.ckpt_seq;
      l.ckpt_time = h.ckpt_time;
      return l;
    };
    if (h.torn_bytes > 0) {
      AuditEvent repair;
      repair.action = "audit.repair";
      repair.decision = core::AuditDecision::kNone;
      repair.result = core::AuditResult::kOk;
      repair.detail = "removed " + std::to_string(h.torn_bytes) + " bytes of a record torn by a crash";
      emit(EventJson(repair), "repair");
    }
    for (size_t i = 0; i < items.size(); ++i) {
      if (items[i].signer == nullptr) {
        try {
          out[i].seq = emit(EventJson(items[i].event), "event").seq;
        } catch (const std::exception&) {
          // Not expected (every string is made UTF-8 first), but one record
          // must never cost the others theirs: this request alone is
          // refused. what() is not kept: it may quote the bytes.
          out[i].status = Error(Category::kUnavailable, "audit log: the record could not be serialized; refusing");
        }
        continue;
      }
      // A checkpoint signs the hash of the record just before it.
      uint64_t covers_seq = h.seq;
      std::string covers_hash = h.hash;
      if (covers_seq == 0) {
        out[i].status = Error(Category::kUsage, "audit log: nothing to checkpoint yet");
        continue;
      }
      std::string message = "custody-audit-checkpoint-v1 seq=" + std::to_string(covers_seq) + " hash=" + covers_hash +
                             " time=" + time + " key=" + items[i].signer->key_id() + "\n";
      auto sig = items[i].signer->Sign(message);
      if (!sig) {
        out[i].status = std::move(sig).error().Wrap("audit checkpoint");
        continue;
      }
      ordered_json j;
      j["covers_seq"] = covers_seq;
      j["covers_hash"] = covers_hash;
      j["key_id"] = items[i].signer->key_id();
      j["message"] = message;
      j["signature"] = Base64Encode(*sig);
      AuditLine& l = emit(j, "checkpoint");
      l.message = message;
      l.signature.assign(sig->begin(), sig->end());
      out[i].seq = l.seq;
      out[i].covers = {covers_seq, covers_hash};
    }
    end = h;
    return lines;
  };
  Status s = storage_->Append(std::chrono::steady_clock::now() + options_.timeout, build);
  if (!s.ok()) {
    for (auto& o : out) o.status = s.error();
    return out;
  }
  std::lock_guard lock2(head_mu_);
  last_seq_ = end.seq;
  last_ckpt_seq_ = end.ckpt_seq;
  last_ckpt_time_ = end.ckpt_time;
  return out;
}

Result<std::vector<AuditRecord>> ReadAuditLog(const std::string& dir) {
  std::vector<AuditRecord> out;
  std::vector<std::string> files;
  for (const auto& seg : AuditSegments(dir)) files.push_back(dir + "/" + seg);
  CUSTODY_RETURN_IF_ERROR(ReadAuditFiles(
      files,
      [&](AuditChainLine&& l) {
        auto r = ParseAuditRecord(l.text);
        if (r) out.push_back(std::move(*r));
      },
      nullptr, /*listed=*/true));
  return out;
}

namespace {
constexpr std::string_view kPruneStarts = "the log now starts at seq ";
constexpr std::string_view kPruneAfter = " after hash ";
constexpr std::string_view kPruneSignature = "; signature ";
}  // namespace

std::string AuditPruneMessage(uint64_t first_kept_seq, std::string_view prev_hash) {
  return "custody-audit-prune-v1 start=" + std::to_string(first_kept_seq) + " prev=" + std::string(prev_hash) + "\n";
}

std::string AuditPruneStatement(uint64_t first_kept_seq, std::string_view prev_hash,
                                std::span<const uint8_t> signature_der) {
  return std::string(kPruneStarts) + std::to_string(first_kept_seq) + std::string(kPruneAfter) +
         std::string(prev_hash) + std::string(kPruneSignature) + Base64Encode(signature_der);
}

std::optional<AuditPruneClaim> FindAuditPruneStatement(std::string_view detail) {
  const size_t at = detail.find(kPruneStarts);
  if (at == std::string_view::npos) return std::nullopt;
  std::string_view rest = detail.substr(at + kPruneStarts.size());
  if (rest.empty() || rest[0] == '0') return std::nullopt;  // one way to write each number
  AuditPruneClaim c;
  size_t digits = 0;
  while (digits < rest.size() && digits < 19 && rest[digits] >= '0' && rest[digits] <= '9') {
    c.first_kept_seq = c.first_kept_seq * 10 + static_cast<uint64_t>(rest[digits] - '0');
    ++digits;
  }
  if (digits == 0) return std::nullopt;
  rest = rest.substr(digits);
  if (rest.substr(0, kPruneAfter.size()) != kPruneAfter) return std::nullopt;
  rest = rest.substr(kPruneAfter.size());
  if (rest.size() < 64 ||
      !std::all_of(rest.begin(), rest.begin() + 64, [](char ch) { return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'); })) {
    return std::nullopt;
  }
  c.prev_hash = std::string(rest.substr(0, 64));
  rest = rest.substr(64);
  if (rest.substr(0, kPruneSignature.size()) != kPruneSignature) return std::nullopt;
  rest = rest.substr(kPruneSignature.size());
  size_t n = 0;
  while (n < rest.size() && n < 256 &&
         ((rest[n] >= 'A' && rest[n] <= 'Z') || (rest[n] >= 'a' && rest[n] <= 'z') || (rest[n] >= '0' && rest[n] <= '9') ||
          rest[n] == '+' || rest[n] == '/' || rest[n] == '=')) {
    ++n;
  }
  if (n == 0) return std::nullopt;
  c.signature_b64 = std::string(rest.substr(0, n));
  return c;
}

Status AuditStorage::ScanPruneUnits(const std::string& /*chain*/,
                                    const std::function<bool(const AuditPruneUnit&)>& /*each*/) {
  return Error(Category::kUnavailable, Describe() + " cannot be pruned");
}

Result<uint64_t> AuditStorage::Prune(const std::string& /*chain*/, uint64_t /*through_seq*/) {
  return Error(Category::kUnavailable, Describe() + " cannot be pruned");
}

Result<AuditVerifyReport> VerifyAuditLog(const AuditVerifyOptions& o) {
  std::vector<std::string> files = o.files;
  const bool listed = files.empty();  // named by the caller: each must be there
  if (listed) {
    for (const auto& s : AuditSegments(o.dir)) files.push_back(o.dir + "/" + s);
  }
  if (files.empty()) return Error(Category::kNotFound, "audit log: no segments in " + o.dir);
  std::vector<AuditChainLine> lines;
  bool torn = false;
  Status read = ReadAuditFiles(files, [&](AuditChainLine&& l) { lines.push_back(std::move(l)); }, &torn, listed);
  if (!read.ok()) {
    if (read.error().category() != Category::kIntegrity) return read.error();
    AuditVerifyReport rep;
    rep.problem = read.error().message();
    return rep;
  }
  std::optional<std::pair<uint64_t, std::string>> folder;
  if (!o.dir.empty()) {
    AuditOptions fo;
    fo.dir = o.dir;
    CUSTODY_ASSIGN_OR_RETURN(folder, FileAuditStorage(fo)->Witness(""));
  }
  return VerifyAuditChain(lines, torn, o, "", folder);
}

Result<AuditVerifyReport> VerifyAuditChain(const std::vector<AuditChainLine>& lines, bool torn_tail,
                                           const AuditVerifyOptions& o, const std::string& node,
                                           const std::optional<std::pair<uint64_t, std::string>>& storage_witness) {
  AuditVerifyReport rep;
  rep.torn_tail = torn_tail;
  // First pass: every seq that appears, for telling deletions from reorders.
  std::map<uint64_t, size_t> first_at;
  std::vector<std::optional<AuditRecord>> recs(lines.size());
  for (size_t i = 0; i < lines.size(); ++i) {
    auto r = ParseAuditRecord(lines[i].text);
    if (r) {
      first_at.emplace(r->seq, i);
      recs[i] = std::move(*r);
    }
  }
  auto where = [&](size_t i) {
    std::string s = lines[i].where;
    return recs[i] ? "record seq " + std::to_string(recs[i]->seq) + " (" + s + ")" : "record at " + s;
  };
  std::string prev_hash = kAuditGenesis;
  uint64_t expected = 1;
  // A chain that starts past seq 1: its oldest records were pruned, if and
  // only if a prune record in it says so, naming a record the chain has
  // (at or after the first: a prune cut short leaves some of the units it
  // meant to remove) and that record's prev hash, under the audit key's
  // signature. Record hashes have no key, so without the signature anyone
  // able to append a line could claim any start. Anything else is a
  // deletion, reported below.
  if (!recs.empty() && recs[0] && recs[0]->seq > 1) {
    const uint64_t first = recs[0]->seq;
    std::string refused;  // the first claim that names this start but is not signed by the key
    // Newest first (the prune that made this start wrote the newest claim),
    // and at most kMaxClaimChecks signature checks: records appended with
    // junk signatures cannot make verify slow.
    constexpr int kMaxClaimChecks = 16;
    int checks = 0;
    for (auto it = recs.rbegin(); it != recs.rend() && checks < kMaxClaimChecks; ++it) {
      const auto& r = *it;
      if (!r || r->type != "event" || r->event.action != kAuditPruneAction || r->event.result != AuditResult::kOk) {
        continue;
      }
      auto claim = FindAuditPruneStatement(r->event.detail);
      if (!claim || claim->first_kept_seq < first) continue;
      auto named = first_at.find(claim->first_kept_seq);
      if (named == first_at.end() || recs[named->second]->prev != claim->prev_hash) continue;
      const std::string whose = "the audit.prune record at seq " + std::to_string(r->seq);
      if (o.public_key_pem.empty()) {
        if (refused.empty()) refused = whose + " says the log starts at seq " + std::to_string(first) +
                                       ", but without the audit key its signature cannot be checked";
        continue;
      }
      ++checks;
      auto sig = Base64Decode(claim->signature_b64);
      bool good = false;
      if (sig) {
        CUSTODY_ASSIGN_OR_RETURN(good, VerifySignature(o.public_key_pem, AuditPruneMessage(claim->first_kept_seq,
                                                                                           claim->prev_hash),
                                                       *sig));
      }
      if (!good) {
        if (refused.empty()) refused = whose + " says the log starts at seq " + std::to_string(first) +
                                       ", but its signature does not verify with the given key: records before it "
                                       "were removed and the record forged, or the key is another token's";
        continue;
      }
      expected = first;
      prev_hash = recs[0]->prev;
      rep.pruned_by = r->seq;
      break;
    }
    if (rep.pruned_by == 0 && !refused.empty()) {
      rep.first_seq = first;
      rep.problem = where(0) + ": deleted: seq 1 to " + std::to_string(first - 1) + " missing before it; " + refused;
      return rep;
    }
  }
  rep.first_seq = expected;
  bool have_key = !o.public_key_pem.empty();
  std::map<uint64_t, std::string> hash_of;  // seq -> hash, as verified
  std::map<uint64_t, std::string> covers_of;  // checkpoint seq -> the hash it signed
  for (size_t i = 0; i < lines.size(); ++i) {
    if (o.progress && (i % 4096 == 0)) o.progress(i, lines.size());
    if (!recs[i]) {
      rep.problem = where(i) + ": " + ParseAuditRecord(lines[i].text).error().message();
      return rep;
    }
    const AuditRecord& r = *recs[i];
    if (r.seq != expected) {
      if (r.seq < expected) {
        bool dup = hash_of.count(r.seq) > 0;
        rep.problem = where(i) + (dup && hash_of[r.seq] == r.hash
                                      ? ": inserted: a second copy of seq " + std::to_string(r.seq)
                                  : dup ? ": inserted: seq " + std::to_string(r.seq) + " appears twice"
                                        : ": reordered: seq " + std::to_string(r.seq) + " comes after seq " +
                                              std::to_string(expected - 1));
      } else {
        auto later = first_at.find(expected);
        rep.problem = later != first_at.end() && later->second > i
                          ? where(i) + ": reordered: seq " + std::to_string(r.seq) + " comes before seq " +
                                std::to_string(expected)
                          : where(i) + ": deleted: seq " + std::to_string(expected) +
                                (r.seq - 1 > expected ? " to " + std::to_string(r.seq - 1) : "") +
                                " missing before it";
      }
      return rep;
    }
    if (!node.empty() && r.node != node) {
      // The hash chain would catch it too; this says what happened.
      rep.problem = where(i) + ": moved: the record names node '" + EscapeUntrusted(r.node, 64) +
                    "', not this chain's '" + node + "'";
      return rep;
    }
    if (r.prev != prev_hash) {
      rep.problem = where(i) + ": modified: its prev hash does not match seq " + std::to_string(r.seq - 1) +
                    " (a record before it was altered, or this one was put in its place)";
      return rep;
    }
    if (r.type == "checkpoint") {
      if (r.covers_seq + 1 != r.seq || r.covers_hash != prev_hash) {
        rep.problem = where(i) + ": modified: this checkpoint signed seq " + std::to_string(r.covers_seq) +
                      " with hash " + r.covers_hash.substr(0, 16) + "..., but the chain has " +
                      prev_hash.substr(0, 16) + "...: records after the previous checkpoint (seq " +
                      std::to_string(rep.last_checkpoint_seq) + ") were altered and re-hashed";
        return rep;
      }
      std::string expect_msg = "custody-audit-checkpoint-v1 seq=" + std::to_string(r.covers_seq) +
                               " hash=" + r.covers_hash + " time=" + r.time + " key=" + r.key_id + "\n";
      if (r.message != expect_msg) {
        rep.problem = where(i) + ": modified: the checkpoint message does not match its fields";
        return rep;
      }
      if (have_key) {
        auto sig = Base64Decode(r.signature_b64);
        if (!sig) {
          rep.problem = where(i) + ": modified: the checkpoint signature is not base64";
          return rep;
        }
        CUSTODY_ASSIGN_OR_RETURN(bool good, VerifySignature(o.public_key_pem, r.message, *sig));
        if (!good) {
          rep.problem = where(i) + ": the checkpoint signature does not verify with the given key: the records "
                                   "up to seq " + std::to_string(r.covers_seq) +
                        " were rewritten, or the key is another token's";
          return rep;
        }
      }
      ++rep.checkpoints;
      rep.last_checkpoint_seq = r.seq;
      covers_of[r.seq] = r.covers_hash;
    }
    hash_of[r.seq] = r.hash;
    prev_hash = r.hash;
    rep.last_seq = r.seq;
    ++expected;
    ++rep.records;
  }
  if (o.progress) o.progress(lines.size(), lines.size());
  rep.unsigned_tail = rep.last_seq - rep.last_checkpoint_seq;
  // Truncation: witnesses kept outside the records know of later checkpoints.
  auto truncated = [&](uint64_t seq, const std::string& witness) {
    rep.problem = "truncated: the log ends at seq " + std::to_string(rep.last_seq) + " but " + witness + " at seq " +
                  std::to_string(seq);
  };
  if (o.witness) {
    auto [seq, hash] = *o.witness;
    if (seq > rep.last_seq) {
      truncated(seq, "the store records a checkpoint");
      return rep;
    }
    if (!covers_of.count(seq) || covers_of[seq] != hash) {
      rep.problem = "record seq " + std::to_string(seq) + ": modified: the store recorded a checkpoint here that the log does not have";
      return rep;
    }
  }
  if (storage_witness && storage_witness->first > rep.last_seq) {
    truncated(storage_witness->first, storage_witness->second);
    return rep;
  }
  rep.intact = true;
  return rep;
}

Result<std::vector<uint8_t>> P256SignatureDer(std::span<const uint8_t> rs) {
  if (rs.size() != 64) return Error(Category::kIntegrity, "an ECDSA P-256 signature must be 64 bytes (r||s)");
  ECDSA_SIG* sig = ECDSA_SIG_new();
  if (sig == nullptr ||
      ECDSA_SIG_set0(sig, BN_bin2bn(rs.data(), 32, nullptr), BN_bin2bn(rs.data() + 32, 32, nullptr)) != 1) {
    ECDSA_SIG_free(sig);
    return Error(Category::kInternal, "cannot build an ECDSA signature");
  }
  int n = i2d_ECDSA_SIG(sig, nullptr);
  std::vector<uint8_t> der(static_cast<size_t>(std::max(n, 0)));
  unsigned char* p = der.data();
  if (n <= 0 || i2d_ECDSA_SIG(sig, &p) != n) {
    ECDSA_SIG_free(sig);
    return Error(Category::kInternal, "cannot encode an ECDSA signature");
  }
  ECDSA_SIG_free(sig);
  return der;
}

Result<std::string> P256PublicKeyPem(std::span<const uint8_t> point) {
  OSSL_PARAM_BLD* bld = OSSL_PARAM_BLD_new();
  OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0);
  OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size());
  OSSL_PARAM* params = OSSL_PARAM_BLD_to_param(bld);
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr);
  EVP_PKEY* key = nullptr;
  bool ok = ctx && EVP_PKEY_fromdata_init(ctx) == 1 && EVP_PKEY_fromdata(ctx, &key, EVP_PKEY_PUBLIC_KEY, params) == 1;
  EVP_PKEY_CTX_free(ctx);
  OSSL_PARAM_free(params);
  OSSL_PARAM_BLD_free(bld);
  if (!ok) return Error(Category::kIntegrity, "the token's audit key is not a valid P-256 public key");
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_PUBKEY(bio, key);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(len));
  BIO_free(bio);
  EVP_PKEY_free(key);
  return pem;
}

}  // namespace custody::core
