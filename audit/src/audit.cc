#include "custody/audit/audit.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>
#include <thread>

#include "custody/common/base64.h"
#include "custody/common/hex.h"
#include "custody/common/time.h"
#include "custody/common/untrusted.h"

namespace custody::core {
namespace {

using nlohmann::ordered_json;

constexpr std::string_view kHashKey = ",\"hash\":\"";
constexpr size_t kHashSuffix = 9 + 64 + 2;  // ,"hash":" + 64 hex + "}
constexpr size_t kMaxLine = 64 * 1024;
const std::string kGenesis(64, '0');

std::string SegmentName(uint32_t index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "audit-%06u.jsonl", index);
  return buf;
}

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

struct Head {
  uint32_t segment = 0;  // 0: no segment yet
  uint64_t size = 0;     // of the segment, after any repair
  uint64_t seq = 0;
  std::string hash = kGenesis;
  uint64_t ckpt_seq = 0;
  int64_t ckpt_time = 0;
  uint64_t torn_bytes = 0;
};

Status Fsync(int fd, const std::string& what) {
  if (::fsync(fd) != 0) return Error::Os(errno, "audit log: fsync " + what);
  return Status::Ok();
}

// Reads the last complete record of the newest non-empty segment. With
// `repair`, a torn last line (a crash mid-write) is cut off the newest segment.
Result<Head> ReadHead(const std::string& dir, bool repair) {
  Head h;
  auto segs = AuditSegments(dir);
  for (size_t k = segs.size(); k-- > 0;) {
    std::string path = dir + "/" + segs[k];
    int fd = ::open(path.c_str(), (repair ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) return Error::Os(errno, "audit log: open " + path);
    struct stat st {};
    ::fstat(fd, &st);
    uint64_t size = static_cast<uint64_t>(st.st_size);
    if (h.segment == 0) {
      h.segment = static_cast<uint32_t>(std::stoul(segs[k].substr(6, 6)));
      h.size = size;
    }
    if (size == 0) {
      ::close(fd);
      continue;
    }
    uint64_t want = std::min<uint64_t>(size, 2 * kMaxLine + 2);
    std::string tail(want, '\0');
    ssize_t n = ::pread(fd, tail.data(), want, static_cast<off_t>(size - want));
    if (n != static_cast<ssize_t>(want)) {
      ::close(fd);
      return Error(Category::kUnavailable, "audit log: cannot read the end of " + path);
    }
    size_t last_nl = tail.rfind('\n');
    uint64_t torn = last_nl == std::string::npos ? want : want - last_nl - 1;
    if (torn > 0 && k + 1 == segs.size() && repair) {
      if (::ftruncate(fd, static_cast<off_t>(size - torn)) != 0) {
        int e = errno;
        ::close(fd);
        return Error::Os(e, "audit log: repairing " + path);
      }
      Status s = Fsync(fd, path);
      if (!s.ok()) {
        ::close(fd);
        return s.error();
      }
      h.torn_bytes = torn;
      if (h.segment == static_cast<uint32_t>(std::stoul(segs[k].substr(6, 6)))) h.size = size - torn;
    }
    ::close(fd);
    if (last_nl == std::string::npos) {
      if (size > want) return Error(Category::kIntegrity, "audit log: " + path + " ends with a line longer than any record");
      continue;  // only a torn first line: look at the previous segment
    }
    size_t start = tail.rfind('\n', last_nl == 0 ? std::string::npos : last_nl - 1);
    start = start == std::string::npos ? 0 : start + 1;
    if (start == 0 && size > want) return Error(Category::kIntegrity, "audit log: " + path + " has an over-long line");
    auto rec = ParseAuditRecord(std::string_view(tail).substr(start, last_nl - start));
    if (!rec) {
      return Error(Category::kIntegrity, "audit log: the last record of " + path + " is damaged (" +
                                             rec.error().message() + "); run 'custody audit verify' before writing more");
    }
    h.seq = rec->seq;
    h.hash = rec->hash;
    h.ckpt_seq = rec->ckpt_seq;
    h.ckpt_time = rec->ckpt_time;
    return h;
  }
  return h;
}

class DirLock {
 public:
  static Result<DirLock> Take(const std::string& dir, std::chrono::milliseconds timeout) {
    std::string path = dir + "/.lock";
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return Error::Os(errno, "audit log: " + path);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK || std::chrono::steady_clock::now() > deadline) {
        ::close(fd);
        return Error(Category::kUnavailable, "audit log: another process has held " + path + " for more than " +
                                                 std::to_string(timeout.count()) + " ms; refusing to wait longer");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return DirLock(fd);
  }
  DirLock(DirLock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  ~DirLock() {
    if (fd_ >= 0) ::close(fd_);
  }

 private:
  explicit DirLock(int fd) : fd_(fd) {}
  int fd_;
};

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

std::string NewRequestId() {
  uint8_t b[8];
  if (RAND_bytes(b, sizeof b) != 1) return "unknown";
  return ToHex(b);
}

std::vector<std::string> AuditSegments(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.size() == 18 && n.rfind("audit-", 0) == 0 && n.substr(12) == ".jsonl" &&
        std::all_of(n.begin() + 6, n.begin() + 12, [](char c) { return c >= '0' && c <= '9'; })) {
      out.push_back(n);
    }
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

Result<AuditRecord> ParseAuditRecord(std::string_view line) {
  auto bad = [](const std::string& why) { return Error(Category::kIntegrity, why); };
  if (line.size() > kMaxLine) return bad("line longer than " + std::to_string(kMaxLine) + " bytes");
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

Result<std::unique_ptr<AuditLog>> AuditLog::Open(AuditOptions options) {
  if (::mkdir(options.dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Error::Os(errno, "audit log: cannot create " + options.dir);
  }
  std::string ck = options.dir + "/checkpoints";
  if (::mkdir(ck.c_str(), 0700) != 0 && errno != EEXIST) return Error::Os(errno, "audit log: cannot create " + ck);
  std::unique_ptr<AuditLog> log(new AuditLog(std::move(options)));
  CUSTODY_ASSIGN_OR_RETURN(Head h, ReadHead(log->options_.dir, /*repair=*/false));
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

Result<uint64_t> AuditLog::Append(const AuditEvent& event) { return Submit(Item{event, nullptr, nullptr}, nullptr); }

void AuditLog::AppendAsync(const AuditEvent& event, Done done) {
  std::unique_lock lk(mu_);
  queue_.emplace_back(next_ticket_++, Item{event, nullptr, std::move(done)});
  if (!writer_.joinable()) {
    writer_ = std::thread([this] {
      ::pthread_setname_np(::pthread_self(), "audit-writer");  // for top -H and perf
      WriterLoop();
    });
  }
  lk.unlock();
  writer_cv_.notify_one();
}

void AuditLog::WriterLoop() {
  std::unique_lock lk(mu_);
  for (;;) {
    writer_cv_.wait(lk, [&] { return (stop_ && !leader_) || (!leader_ && !queue_.empty()); });
    if (queue_.empty()) return;  // stopping, and everything queued is written
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
  try {
    items.reserve(batch.size());
    for (auto& [t, i] : batch) items.push_back(std::move(i));
    outcomes = WriteBatch(items);
  } catch (const std::exception&) {
    outcomes.clear();
  }
  if (outcomes.size() != batch.size()) {
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
  writer_cv_.notify_one();
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
    } catch (const std::exception&) {
      failed_callbacks_.fetch_add(1);
    }
  }
  lk.lock();
}

Result<uint64_t> AuditLog::Checkpoint(AuditSigner& signer, std::pair<uint64_t, std::string>* covers) {
  return Submit(Item{AuditEvent{}, &signer, nullptr}, covers);
}

Result<uint64_t> AuditLog::Submit(Item item, std::pair<uint64_t, std::string>* covers) {
  std::unique_lock lk(mu_);
  const uint64_t ticket = next_ticket_++;
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
        return Error(Category::kUnavailable, "audit log: timed out waiting for the disk; refusing");
      }
      // Already in a batch being written: its outcome is on its way.
    }
  }
}

std::vector<AuditLog::Outcome> AuditLog::WriteBatch(std::vector<Item>& items) {
  std::vector<Outcome> out(items.size());
  auto fail_all = [&](const Error& e) {
    for (auto& o : out) o.status = e;
    return out;
  };
  auto lock = DirLock::Take(options_.dir, options_.timeout);
  if (!lock) return fail_all(lock.error());
  Head h;
  bool cached = false;
  if (cache_.valid) {
    // Still ours if the segment is unchanged and no newer one exists.
    struct stat cs {}, ns {};
    std::string cur = options_.dir + "/" + SegmentName(cache_.segment);
    std::string next = options_.dir + "/" + SegmentName(cache_.segment + 1);
    if (::stat(cur.c_str(), &cs) == 0 && static_cast<uint64_t>(cs.st_size) == cache_.size &&
        cs.st_ino == cache_.ino && cs.st_dev == cache_.dev && ::stat(next.c_str(), &ns) != 0) {
      h.segment = cache_.segment;
      h.size = cache_.size;
      h.seq = cache_.seq;
      h.hash = cache_.hash;
      h.ckpt_seq = cache_.ckpt_seq;
      h.ckpt_time = cache_.ckpt_time;
      cached = true;
    }
  }
  if (!cached) {
    auto head_r = ReadHead(options_.dir, /*repair=*/true);
    if (!head_r) return fail_all(head_r.error());
    h = *head_r;
  }
  cache_.valid = false;

  uint32_t segment = h.segment == 0 ? 1 : h.segment;
  bool fresh = h.segment == 0 || h.size >= options_.segment_bytes;
  if (h.segment != 0 && h.size >= options_.segment_bytes) segment = h.segment + 1;
  std::string path = options_.dir + "/" + SegmentName(segment);
  int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return fail_all(Error::Os(errno, "audit log: cannot open " + path));
  struct stat st {};
  ::fstat(fd, &st);
  const off_t original = st.st_size;

  std::string buffer;
  std::vector<std::pair<size_t, std::string>> checkpoint_files;  // item index, message
  std::vector<std::string> signatures(items.size());
  auto now = std::chrono::system_clock::now();
  int64_t unix_now = 0;
  std::string time = FormatUtcMillis(now, &unix_now);

  // Builds the record's line first and moves the head only once it exists:
  // a record that cannot be built fails alone, and the chain goes on from
  // the record before it.
  auto emit = [&](const ordered_json& j, const std::string& type) {
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
    buffer += line;
    buffer += '\n';
    h.seq = seq;
    h.hash = hash;
    if (checkpoint) {
      h.ckpt_seq = seq;
      h.ckpt_time = unix_now;
    }
    return seq;
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
        out[i].seq = emit(EventJson(items[i].event), "event");
      } catch (const std::exception&) {
        // Not expected (every string is made UTF-8 first), but one record
        // must never cost the others theirs: this request alone is refused.
        // what() is not kept: it may quote the bytes.
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
    signatures[i].assign(sig->begin(), sig->end());
    out[i].seq = emit(j, "checkpoint");
    out[i].covers = {covers_seq, covers_hash};
    checkpoint_files.emplace_back(i, message);
  }

  size_t off = 0;
  while (off < buffer.size()) {
    ssize_t n = ::write(fd, buffer.data() + off, buffer.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      // Leave no partial record behind: cut back to where we started.
      (void)::ftruncate(fd, original);
      ::close(fd);
      return fail_all(Error::Os(e, "audit log: cannot write " + path));
    }
    off += static_cast<size_t>(n);
  }
  // fdatasync: the appended bytes and the new file size (what reading them
  // back needs) are durable on return; only timestamps may lag.
  if (::fdatasync(fd) != 0) {
    int e = errno;
    (void)::ftruncate(fd, original);
    ::close(fd);
    return fail_all(Error::Os(e, "audit log: cannot sync " + path));
  }
  ::close(fd);
  if (fresh) {
    // A new segment's directory entry must be durable too.
    int dfd = ::open(options_.dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }
  // Each checkpoint also as two plain files, so the stock openssl command can
  // check it:  openssl dgst -sha256 -verify audit.pem -signature N.sig N.msg
  for (auto& [i, message] : checkpoint_files) {
    char base[64];
    std::snprintf(base, sizeof base, "/checkpoints/%012" PRIu64, out[i].seq);
    for (const auto& [suffix, data] : {std::pair<std::string, std::string_view>{".msg", message},
                                       {".sig", std::string_view(signatures[i])}}) {
      std::string p = options_.dir + base + suffix;
      int cfd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (cfd < 0) continue;
      (void)!::write(cfd, data.data(), data.size());
      ::fsync(cfd);
      ::close(cfd);
    }
  }
  {
    struct stat fs {};
    if (::stat(path.c_str(), &fs) == 0) {
      cache_ = CachedHead{true, segment, static_cast<uint64_t>(fs.st_size), static_cast<uint64_t>(fs.st_dev),
                          static_cast<uint64_t>(fs.st_ino), h.seq, h.ckpt_seq, h.ckpt_time, h.hash};
    }
  }
  std::lock_guard lock2(head_mu_);
  last_seq_ = h.seq;
  last_ckpt_seq_ = h.ckpt_seq;
  last_ckpt_time_ = h.ckpt_time;
  return out;
}

Result<std::vector<AuditRecord>> ReadAuditLog(const std::string& dir) {
  std::vector<AuditRecord> out;
  for (const auto& seg : AuditSegments(dir)) {
    std::string path = dir + "/" + seg;
    FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) return Error::Os(errno, "audit log: " + path);
    std::string data;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.append(buf, n);
    std::fclose(f);
    size_t pos = 0;
    while (pos < data.size()) {
      size_t nl = data.find('\n', pos);
      if (nl == std::string::npos) break;  // a torn tail
      auto r = ParseAuditRecord(std::string_view(data).substr(pos, nl - pos));
      if (r) out.push_back(std::move(*r));
      pos = nl + 1;
    }
  }
  return out;
}

Result<AuditVerifyReport> VerifyAuditLog(const AuditVerifyOptions& o) {
  struct Line {
    std::string file;
    size_t lineno;
    std::string text;
  };
  std::vector<std::string> files = o.files;
  if (files.empty()) {
    for (const auto& s : AuditSegments(o.dir)) files.push_back(o.dir + "/" + s);
  }
  if (files.empty()) return Error(Category::kNotFound, "audit log: no segments in " + o.dir);
  AuditVerifyReport rep;
  std::vector<Line> lines;
  for (size_t fi = 0; fi < files.size(); ++fi) {
    FILE* f = std::fopen(files[fi].c_str(), "rb");
    if (f == nullptr) return Error::Os(errno, "audit log: " + files[fi], Category::kNotFound);
    std::string data;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.append(buf, n);
    std::fclose(f);
    size_t pos = 0, lineno = 0;
    std::string base = files[fi].substr(files[fi].rfind('/') + 1);
    while (pos < data.size()) {
      size_t nl = data.find('\n', pos);
      ++lineno;
      if (nl == std::string::npos) {
        if (fi + 1 == files.size()) {
          rep.torn_tail = true;  // a crash mid-write; the writer cuts it on its next append
          break;
        }
        rep.problem = base + ":" + std::to_string(lineno) + ": a segment that is not the last ends mid-record";
        return rep;
      }
      lines.push_back({base, lineno, data.substr(pos, nl - pos)});
      pos = nl + 1;
    }
  }
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
    std::string s = lines[i].file + ":" + std::to_string(lines[i].lineno);
    return recs[i] ? "record seq " + std::to_string(recs[i]->seq) + " (" + s + ")" : "record at " + s;
  };
  std::string prev_hash = kGenesis;
  uint64_t expected = 1;
  bool have_key = !o.public_key_pem.empty();
  std::map<uint64_t, std::string> hash_of;  // seq -> hash, as verified
  std::map<uint64_t, std::string> covers_of;  // checkpoint seq -> the hash it signed
  for (size_t i = 0; i < lines.size(); ++i) {
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
  rep.unsigned_tail = rep.last_seq - rep.last_checkpoint_seq;
  // Truncation: witnesses kept outside the segments know of later checkpoints.
  auto truncated = [&](uint64_t seq, const std::string& witness) {
    rep.problem = "truncated: the log ends at seq " + std::to_string(rep.last_seq) + " but " + witness +
                  " records a checkpoint at seq " + std::to_string(seq);
  };
  if (o.witness) {
    auto [seq, hash] = *o.witness;
    if (seq > rep.last_seq) {
      truncated(seq, "the store");
      return rep;
    }
    if (!covers_of.count(seq) || covers_of[seq] != hash) {
      rep.problem = "record seq " + std::to_string(seq) + ": modified: the store recorded a checkpoint here that the log does not have";
      return rep;
    }
  }
  if (!o.dir.empty()) {
    DIR* d = ::opendir((o.dir + "/checkpoints").c_str());
    if (d != nullptr) {
      uint64_t highest = 0;
      while (dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n.size() == 16 && n.substr(12) == ".msg") highest = std::max<uint64_t>(highest, std::stoull(n.substr(0, 12)));
      }
      ::closedir(d);
      if (highest > rep.last_seq) {
        truncated(highest, "checkpoints/");
        return rep;
      }
    }
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
