// The file log's storage: segment files audit-NNNNNN.jsonl in one folder,
// one chain across them. Processes take turns through an flock on the
// folder; a batch is one write and one fdatasync; a torn last line (a crash
// mid-write) is cut off when the next writer takes its turn, and AuditLog
// records that it did.
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <thread>

#include "audit_impl.h"
#include "custody/audit/audit.h"

namespace custody::core {
namespace {

std::string SegmentName(uint32_t index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "audit-%06u.jsonl", index);
  return buf;
}

struct FileHead : AuditHead {
  uint32_t segment = 0;  // 0: no segment yet
  uint64_t size = 0;     // of the segment, after any repair
};

Status Fsync(int fd, const std::string& what) {
  if (::fsync(fd) != 0) return Error::Os(errno, "audit log: fsync " + what);
  return Status::Ok();
}

// Reads the last complete record of the newest non-empty segment. With
// `repair`, a torn last line (a crash mid-write) is cut off the newest segment.
Result<FileHead> ReadHead(const std::string& dir, bool repair) {
  FileHead h;
  h.hash = kAuditGenesis;
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
    uint64_t want = std::min<uint64_t>(size, 2 * kAuditMaxLine + 2);
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

// A descriptor kept open across a fork is shared with the child: an flock
// belongs to the open file, so parent and child would both "hold" it and
// either's unlock would end the other's turn. A storage that finds the fork
// count moved drops what it inherited (close, never unlock: the parent's
// turn stays the parent's) and opens its own.
std::atomic<uint64_t> g_forks{0};

}  // namespace

uint64_t ForksSoFar() {
  static const bool registered = [] {
    ::pthread_atfork(nullptr, nullptr, [] { g_forks.fetch_add(1, std::memory_order_relaxed); });
    return true;
  }();
  (void)registered;
  return g_forks.load(std::memory_order_relaxed);
}

namespace {

// The folder's lock file, opened once and kept: each batch takes and drops
// the flock on it, with no file to open and free each time. Taking it
// checks that .lock is still the file this descriptor holds: a lock on a
// file that was deleted or replaced would exclude no other process.
class LockFile {
 public:
  LockFile() = default;
  LockFile(const LockFile&) = delete;
  LockFile& operator=(const LockFile&) = delete;
  ~LockFile() { Close(); }

  Status Take(const std::string& dir, std::chrono::steady_clock::time_point deadline,
              std::chrono::milliseconds timeout) {
    const std::string path = dir + "/.lock";
    if (fd_ >= 0 && forks_ != ForksSoFar()) {
      ::close(fd_);  // inherited: the parent's, lock and all
      fd_ = -1;
    }
    for (int attempt = 0;; ++attempt) {
      if (fd_ < 0) {
        forks_ = ForksSoFar();
        fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd_ < 0) return Error::Os(errno, "audit log: " + path);
        struct stat st {};
        if (::fstat(fd_, &st) != 0) {
          const int e = errno;
          Close();
          return Error::Os(e, "audit log: " + path);
        }
        dev_ = st.st_dev;
        ino_ = st.st_ino;
      }
      while (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK || std::chrono::steady_clock::now() > deadline) {
          return Error(Category::kUnavailable, "audit log: another process has held " + path + " for more than " +
                                                   std::to_string(timeout.count()) + " ms; refusing to wait longer");
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      struct stat now {};
      if (::stat(path.c_str(), &now) == 0 && now.st_dev == dev_ && now.st_ino == ino_) return Status::Ok();
      // Deleted or replaced under us: lock the file that is there now.
      Close();
      if (attempt > 0) return Error(Category::kUnavailable, "audit log: " + path + " keeps changing; refusing to write");
    }
  }
  // Ends this process's turn.
  void Release() {
    if (fd_ >= 0) (void)::flock(fd_, LOCK_UN);
  }

 private:
  void Close() {
    if (fd_ >= 0) ::close(fd_);  // drops the flock too
    fd_ = -1;
  }
  int fd_ = -1;
  uint64_t forks_ = 0;  // ForksSoFar() when fd_ was opened
  dev_t dev_ = 0;
  ino_t ino_ = 0;
};

// Releases the turn when a batch ends, however it ends.
class Turn {
 public:
  explicit Turn(LockFile& lock) : lock_(lock) {}
  Turn(const Turn&) = delete;
  Turn& operator=(const Turn&) = delete;
  ~Turn() { lock_.Release(); }

 private:
  LockFile& lock_;
};

class FileStorage final : public AuditStorage {
 public:
  explicit FileStorage(const AuditOptions& o) : dir_(o.dir), segment_bytes_(o.segment_bytes), timeout_(o.timeout) {}
  ~FileStorage() override { ForgetSegment(); }

  Status Append(std::chrono::steady_clock::time_point deadline, const Build& build) override;
  Result<AuditHead> Head() override {
    CUSTODY_ASSIGN_OR_RETURN(FileHead h, ReadHead(dir_, /*repair=*/false));
    return static_cast<AuditHead>(h);
  }
  Result<std::vector<std::string>> Chains() override { return std::vector<std::string>{""}; }
  Status Read(const std::string& chain, const std::function<void(AuditChainLine&&)>& each, bool* torn) override;
  Result<std::optional<std::pair<uint64_t, std::string>>> Witness(const std::string& chain) override;
  std::string Describe() const override { return "audit log " + dir_; }
  Status ScanPruneUnits(const std::string& chain, const std::function<bool(const AuditPruneUnit&)>& each) override;
  Result<uint64_t> Prune(const std::string& chain, uint64_t through_seq) override;

 private:
  void ForgetSegment() {
    cache_.valid = false;
    if (cache_.fd >= 0) ::close(cache_.fd);
    cache_.fd = -1;
  }

  std::string dir_;
  uint64_t segment_bytes_;
  std::chrono::milliseconds timeout_;
  // Only the batch's leader calls Append (AuditLog writes one batch at a
  // time), so these need no lock of their own.
  LockFile lock_;
  // The head as this process left it after its last batch, and the newest
  // segment still open for appending: both reused when that segment still
  // has the same inode and size and no newer one exists (no other process
  // wrote since), which saves re-reading the tail and re-opening the file
  // on every batch.
  struct CachedHead {
    bool valid = false;
    FileHead head;
    uint64_t dev = 0, ino = 0;
    int fd = -1;  // the segment, O_APPEND; -1 when none is open
    uint64_t forks = 0;  // ForksSoFar() when fd was opened
  } cache_;
};

Status FileStorage::Append(std::chrono::steady_clock::time_point deadline, const Build& build) {
  if (cache_.fd >= 0 && cache_.forks != ForksSoFar()) {
    // Inherited from the parent: its own to write with, not ours.
    ::close(cache_.fd);
    cache_.fd = -1;
    cache_.valid = false;
  }
  CUSTODY_RETURN_IF_ERROR(lock_.Take(dir_, deadline, timeout_));
  Turn turn(lock_);
  FileHead h;
  bool cached = false;
  if (cache_.valid) {
    // Still ours if the segment is unchanged and no newer one exists.
    struct stat cs {}, ns {};
    std::string cur = dir_ + "/" + SegmentName(cache_.head.segment);
    std::string next = dir_ + "/" + SegmentName(cache_.head.segment + 1);
    if (::stat(cur.c_str(), &cs) == 0 && static_cast<uint64_t>(cs.st_size) == cache_.head.size &&
        cs.st_ino == cache_.ino && cs.st_dev == cache_.dev && ::stat(next.c_str(), &ns) != 0) {
      h = cache_.head;
      cached = true;
    }
  }
  if (!cached) {
    ForgetSegment();
    CUSTODY_ASSIGN_OR_RETURN(h, ReadHead(dir_, /*repair=*/true));
  }
  cache_.valid = false;

  uint32_t segment = h.segment == 0 ? 1 : h.segment;
  // An empty newest segment is fresh too: a batch that made it and then
  // failed to write left its directory entry unsynced.
  bool fresh = h.segment == 0 || h.size == 0 || h.size >= segment_bytes_;
  if (h.segment != 0 && h.size >= segment_bytes_) segment = h.segment + 1;
  std::string path = dir_ + "/" + SegmentName(segment);

  std::vector<AuditLine> lines = build(h);
  if (lines.empty() && h.torn_bytes == 0) {
    cache_.valid = cached;  // nothing written: what was cached still holds
    return Status::Ok();
  }
  int fd = -1;
  off_t original = 0;
  if (cached && segment == h.segment && cache_.fd >= 0) {
    // The open segment is the one stat just checked (same inode, same size).
    fd = cache_.fd;
    original = static_cast<off_t>(h.size);
  } else {
    ForgetSegment();
    fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return Error::Os(errno, "audit log: cannot open " + path);
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      return Error::Os(e, "audit log: cannot open " + path);
    }
    original = st.st_size;
    cache_.fd = fd;
    cache_.forks = ForksSoFar();
    cache_.dev = static_cast<uint64_t>(st.st_dev);
    cache_.ino = static_cast<uint64_t>(st.st_ino);
  }
  // From here the descriptor is cache_.fd; a failure closes it
  // (ForgetSegment), and the next batch opens the segment afresh.
  std::string buffer;
  for (const auto& l : lines) {
    buffer += l.text;
    buffer += '\n';
  }
  size_t off = 0;
  while (off < buffer.size()) {
    ssize_t n = ::write(fd, buffer.data() + off, buffer.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      // Leave no partial record behind: cut back to where we started.
      (void)::ftruncate(fd, original);
      ForgetSegment();
      return Error::Os(e, "audit log: cannot write " + path);
    }
    off += static_cast<size_t>(n);
  }
  // fdatasync: the appended bytes and the new file size (what reading them
  // back needs) are durable on return; only timestamps may lag.
  if (::fdatasync(fd) != 0) {
    int e = errno;
    (void)::ftruncate(fd, original);
    ForgetSegment();
    return Error::Os(e, "audit log: cannot sync " + path);
  }
  if (fresh) {
    // A new segment's directory entry must be durable too.
    int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }
  // Each checkpoint also as two plain files, so the stock openssl command can
  // check it:  openssl dgst -sha256 -verify audit.pem -signature N.sig N.msg
  for (const auto& l : lines) {
    if (!l.checkpoint) continue;
    char base[64];
    std::snprintf(base, sizeof base, "/checkpoints/%012" PRIu64, l.seq);
    for (const auto& [suffix, data] :
         {std::pair<std::string, std::string_view>{".msg", l.message}, {".sig", std::string_view(l.signature)}}) {
      std::string p = dir_ + base + suffix;
      int cfd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (cfd < 0) continue;
      (void)!::write(cfd, data.data(), data.size());
      ::fsync(cfd);
      ::close(cfd);
    }
  }
  if (!lines.empty()) {
    // The size this batch left: the lock kept every other writer out, and
    // the next batch checks it against the file before trusting it.
    cache_.head.segment = segment;
    cache_.head.size = static_cast<uint64_t>(original) + buffer.size();
    cache_.head.seq = lines.back().seq;
    cache_.head.hash = lines.back().hash;
    cache_.head.ckpt_seq = lines.back().ckpt_seq;
    cache_.head.ckpt_time = lines.back().ckpt_time;
    cache_.head.torn_bytes = 0;
    cache_.valid = true;
  }
  return Status::Ok();
}

Status FileStorage::Read(const std::string& /*chain*/, const std::function<void(AuditChainLine&&)>& each, bool* torn) {
  std::vector<std::string> files;
  for (const auto& s : AuditSegments(dir_)) files.push_back(dir_ + "/" + s);
  return ReadAuditFiles(files, each, torn, /*listed=*/true);
}

Result<std::optional<std::pair<uint64_t, std::string>>> FileStorage::Witness(const std::string& /*chain*/) {
  std::optional<std::pair<uint64_t, std::string>> out;
  DIR* d = ::opendir((dir_ + "/checkpoints").c_str());
  if (d == nullptr) return out;
  uint64_t highest = 0;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.size() == 16 && n.substr(12) == ".msg" &&
        std::all_of(n.begin(), n.begin() + 12, [](char c) { return c >= '0' && c <= '9'; })) {
      highest = std::max<uint64_t>(highest, std::stoull(n.substr(0, 12)));
    }
  }
  ::closedir(d);
  if (highest > 0) out.emplace(highest, "checkpoints/ records a checkpoint");
  return out;
}

// Whether a segment holds a complete record (a line ending in a newline):
// a complete record is at most kAuditMaxLine bytes, so its newline is
// within the first kAuditMaxLine + 1 bytes. A segment holding only a torn
// line (a crash mid-write) does not: ReadHead then reads the head from the
// segment before it.
bool HoldsARecord(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return true;  // when in doubt, it stays
  std::string head(kAuditMaxLine + 1, '\0');
  ssize_t n = ::pread(fd, head.data(), head.size(), 0);
  ::close(fd);
  if (n < 0) return true;
  return head.find('\n') < static_cast<size_t>(n);
}

// The segments before the newest one that holds a record: the head is
// read from that one (ReadHead goes back past an empty or torn-only newest
// segment), so it and everything after it always stay.
std::vector<std::string> SegmentsBeforeTheHead(const std::string& dir) {
  std::vector<std::string> segs = AuditSegments(dir);
  while (!segs.empty()) {
    const bool holds_record = HoldsARecord(dir + "/" + segs.back());
    segs.pop_back();
    if (holds_record) break;
  }
  return segs;
}

// One segment's records: first and last seq, newest time. An empty segment
// (a batch that made it and failed) has none: first_seq stays 0.
Result<AuditPruneUnit> ReadUnit(const std::string& dir, const std::string& name) {
  AuditPruneUnit u;
  u.name = name;
  bool damaged = false;
  Status read = ReadAuditFiles(
      {dir + "/" + name},
      [&](AuditChainLine&& l) {
        u.bytes += l.text.size() + 1;
        auto r = ParseAuditRecord(l.text);
        if (!r) {
          damaged = true;
          return;
        }
        if (u.first_seq == 0) u.first_seq = r->seq;
        u.last_seq = r->seq;
        u.last_hash = r->hash;
        u.newest_unix_time = std::max(u.newest_unix_time, r->unix_time);
      },
      nullptr);
  if (!read.ok()) return read.error();
  if (damaged || u.last_seq < u.first_seq) {
    return Error(Category::kIntegrity, "audit log: " + name + " holds a record that cannot be read; run 'custody audit verify'");
  }
  return u;
}

Status FileStorage::ScanPruneUnits(const std::string& /*chain*/,
                                   const std::function<bool(const AuditPruneUnit&)>& each) {
  for (const auto& name : SegmentsBeforeTheHead(dir_)) {
    CUSTODY_ASSIGN_OR_RETURN(AuditPruneUnit u, ReadUnit(dir_, name));
    if (u.first_seq == 0) continue;  // empty: nothing to prune, nothing to stop at
    if (!each(u)) break;
  }
  return Status::Ok();
}

Result<uint64_t> FileStorage::Prune(const std::string& /*chain*/, uint64_t through_seq) {
  // Segments before the head's are never written again, so they are read
  // (the slow part) outside the writers' turn; the turn is taken only to
  // find the head's segment once more and remove the files, so a running
  // custodyd waits for a few unlinks, not for the reading.
  std::vector<AuditPruneUnit> doomed;
  for (const auto& name : SegmentsBeforeTheHead(dir_)) {
    CUSTODY_ASSIGN_OR_RETURN(AuditPruneUnit u, ReadUnit(dir_, name));
    if (u.first_seq == 0) continue;
    if (u.last_seq > through_seq) break;
    doomed.push_back(std::move(u));
  }
  if (doomed.empty()) return uint64_t{0};
  CUSTODY_RETURN_IF_ERROR(lock_.Take(dir_, std::chrono::steady_clock::now() + timeout_, timeout_));
  Turn turn(lock_);
  const std::vector<std::string> below = SegmentsBeforeTheHead(dir_);
  uint64_t removed = 0;
  // The removals made durable, also when a later one fails.
  auto sync_folder = [&]() -> Status {
    if (removed == 0) return Status::Ok();
    int d = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d < 0) return Error::Os(errno, "audit log: " + dir_);
    Status s = Fsync(d, dir_);
    ::close(d);
    return s;
  };
  for (const auto& u : doomed) {
    if (std::find(below.begin(), below.end(), u.name) == below.end()) break;
    const std::string path = dir_ + "/" + u.name;
    if (::unlink(path.c_str()) != 0) {
      if (errno == ENOENT) continue;  // another prune took it
      Error e = Error::Os(errno, "audit log: removing " + path);
      (void)sync_folder();
      return e;
    }
    removed += u.last_seq - u.first_seq + 1;
  }
  CUSTODY_RETURN_IF_ERROR(sync_folder());
  return removed;
}

}  // namespace

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

Status ReadAuditFiles(const std::vector<std::string>& files, const std::function<void(AuditChainLine&&)>& each,
                      bool* torn, bool listed) {
  if (torn != nullptr) *torn = false;
  bool opened_any = false;
  for (size_t fi = 0; fi < files.size(); ++fi) {
    FILE* f = std::fopen(files[fi].c_str(), "rb");
    if (f == nullptr && errno == ENOENT && listed && !opened_any && fi + 1 < files.size()) continue;
    if (f == nullptr) return Error::Os(errno, "audit log: " + files[fi], Category::kNotFound);
    opened_any = true;
    std::string data;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.append(buf, n);
    std::fclose(f);
    size_t pos = 0, lineno = 0;
    const std::string base = files[fi].substr(files[fi].rfind('/') + 1);
    while (pos < data.size()) {
      size_t nl = data.find('\n', pos);
      ++lineno;
      if (nl == std::string::npos) {
        if (fi + 1 == files.size()) {
          if (torn != nullptr) *torn = true;  // a crash mid-write; the writer cuts it on its next append
          break;
        }
        return Error(Category::kIntegrity,
                     base + ":" + std::to_string(lineno) + ": a segment that is not the last ends mid-record");
      }
      each({base + ":" + std::to_string(lineno), data.substr(pos, nl - pos)});
      pos = nl + 1;
    }
  }
  return Status::Ok();
}

std::unique_ptr<AuditStorage> FileAuditStorage(const AuditOptions& options) {
  return std::make_unique<FileStorage>(options);
}

}  // namespace custody::core
