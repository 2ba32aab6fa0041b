#include "io.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <optional>
#include <utility>

#include "custody/common/hex.h"
#include "custody/common/inplace_json.h"
#include "custody/common/time.h"
#include "custody/common/untrusted.h"

namespace custody::cli {
namespace {

// The folder `path` goes in, for the temporary file beside it.
std::string FolderOf(const std::string& path) {
  std::string dir = std::filesystem::path(path).parent_path().string();
  return dir.empty() ? "." : dir;
}

Status WriteAll(int fd, std::span<const uint8_t> bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Os(errno, "write");
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

// A name in `dir` nobody can guess: 64 bits from getrandom. Hidden, and of
// a fixed length, so it fits whatever the final name's length.
Result<std::string> RandomName(const std::string& dir) {
  uint8_t r[8];
  size_t got = 0;
  while (got < sizeof r) {
    ssize_t n = ::getrandom(r + got, sizeof r - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Os(errno, "getrandom");
    got += static_cast<size_t>(n);
  }
  return dir + "/.custody-" + ToHex(r) + ".tmp";
}

// How many random names are tried before giving up: a collision of 64
// random bits means someone is in the way on purpose, not bad luck.
constexpr int kNameTries = 8;

}  // namespace

// The unnamed way: the file has no name until it is whole; then it is linked
// under a random name and renamed over `path` (linkat cannot replace a file
// that exists). The named way, for filesystems without O_TMPFILE: a random
// name that must not exist (O_EXCL) and is never followed if it is a link
// (O_NOFOLLOW). Never a predictable name beside `path`: in a shared folder
// another user could create it first (the write fails) or make it a link
// (the write goes elsewhere).
Result<StagedFile> StagedFile::Create(const std::string& path) {
  StagedFile f;
  f.path_ = path;
  f.dir_ = FolderOf(path);
  // Read-write: CopyIntoNamed() reads it back where it cannot be linked.
  f.fd_ = ::open(f.dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (f.fd_ >= 0) {
    if (::fchmod(f.fd_, 0600) != 0) return Error::Os(errno, "cannot write " + path);
    return f;
  }
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
    return Error::Os(errno, "cannot create a file in " + f.dir_);
  }
  CUSTODY_RETURN_IF_ERROR(f.OpenNamed());
  return f;
}

Status StagedFile::OpenNamed() {
  for (int i = 0; i < kNameTries; ++i) {
    CUSTODY_ASSIGN_OR_RETURN(std::string tmp, RandomName(dir_));
    int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 && errno == EEXIST) continue;
    if (fd < 0) return Error::Os(errno, "cannot create a file in " + dir_);
    fd_ = fd;
    named_ = std::move(tmp);
    if (::fchmod(fd_, 0600) != 0) return Error::Os(errno, "cannot write " + path_);
    return Status::Ok();
  }
  return Error(Category::kUnavailable,
               "cannot write " + path_ + ": every temporary name tried in " + dir_ + " was taken");
}

StagedFile::StagedFile(StagedFile&& o) noexcept
    : path_(std::move(o.path_)), dir_(std::move(o.dir_)), named_(std::move(o.named_)), fd_(o.fd_) {
  o.fd_ = -1;
  o.named_.clear();
}

StagedFile::~StagedFile() { Discard(); }

void StagedFile::Discard() {
  // An unnamed file vanishes with its descriptor; a named one is unlinked.
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!named_.empty()) ::unlink(named_.c_str());
  named_.clear();
}

Status StagedFile::Write(std::span<const uint8_t> bytes) {
  if (fd_ < 0) return Error(Category::kInternal, "write to " + path_ + " after it was closed");
  if (Status s = WriteAll(fd_, bytes); !s.ok()) return std::move(s).error().Wrap("cannot write " + path_);
  return Status::Ok();
}

Status StagedFile::Commit() {
  if (fd_ < 0) return Error(Category::kInternal, "commit of " + path_ + " after it was closed");
  Status s = ::fsync(fd_) == 0 ? Status::Ok() : Error::Os(errno, "cannot write " + path_);
  if (s.ok() && named_.empty()) s = LinkUnnamed();
  if (s.ok() && ::rename(named_.c_str(), path_.c_str()) != 0) s = Error::Os(errno, "cannot write " + path_);
  if (!s.ok()) {
    Discard();
    return s;
  }
  named_.clear();  // it is `path` now: nothing to unlink
  Discard();
  return Status::Ok();
}

// Gives the unnamed file a random name beside `path`, for the rename.
Status StagedFile::LinkUnnamed() {
  char proc[64];
  std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd_);
  for (int i = 0; i < kNameTries; ++i) {
    CUSTODY_ASSIGN_OR_RETURN(std::string tmp, RandomName(dir_));
    int rc = ::linkat(AT_FDCWD, proc, AT_FDCWD, tmp.c_str(), AT_SYMLINK_FOLLOW);
    // Without /proc, the descriptor itself (needs CAP_DAC_READ_SEARCH on
    // older kernels).
    if (rc != 0 && errno == ENOENT) rc = ::linkat(fd_, "", AT_FDCWD, tmp.c_str(), AT_EMPTY_PATH);
    if (rc == 0) {
      named_ = std::move(tmp);
      return Status::Ok();
    }
    if (errno == EEXIST) continue;
    int e = errno;
    // Neither way to name it works here (no /proc, no capability): copy it
    // into a named file, which the rename can then move.
    if (e == ENOENT || e == EPERM || e == EOPNOTSUPP) return CopyIntoNamed();
    return Error::Os(e, "cannot write " + path_);
  }
  return Error(Category::kUnavailable,
               "cannot write " + path_ + ": every temporary name tried in " + dir_ + " was taken");
}

Status StagedFile::CopyIntoNamed() {
  int unnamed = fd_;
  fd_ = -1;
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{unnamed};
  CUSTODY_RETURN_IF_ERROR(OpenNamed());
  std::vector<uint8_t> buf(64 * 1024);
  for (off_t at = 0;;) {
    ssize_t n = ::pread(unnamed, buf.data(), buf.size(), at);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Os(errno, "cannot write " + path_);
    if (n == 0) break;
    CUSTODY_RETURN_IF_ERROR(Write(std::span<const uint8_t>(buf.data(), static_cast<size_t>(n))));
    at += n;
  }
  if (::fsync(fd_) != 0) return Error::Os(errno, "cannot write " + path_);
  return Status::Ok();
}

Status WritePrivateFile(const std::string& path, std::span<const uint8_t> bytes) {
  CUSTODY_ASSIGN_OR_RETURN(StagedFile f, StagedFile::Create(path));
  CUSTODY_RETURN_IF_ERROR(f.Write(bytes));
  return f.Commit();
}

Status MakePrivateDir(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return Error(Category::kConfig, "cannot create folder " + path + ": " + ec.message());
  ::chmod(path.c_str(), 0700);
  return Status::Ok();
}

void PrintTable(const std::vector<std::vector<std::string>>& rows) {
  if (rows.empty()) return;
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (size_t i = 0; i < r.size() && i < width.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

std::string FormatTime(int64_t t) { return FormatUtc(t); }

namespace {

Status CheckText(Category category, std::string_view what, std::string_view value, size_t max_bytes) {
  std::string name(what);
  if (!WellFormedUtf8(value)) return Error(category, name + " is not valid UTF-8 text");
  if (!PrintableText(value)) {
    return Error(category, name + " holds a control character (a newline, tab, NUL or other): give one line of text");
  }
  if (value.size() > max_bytes) {
    return Error(category, name + " is longer than " + std::to_string(max_bytes) + " bytes");
  }
  return Status::Ok();
}

}  // namespace

Status CheckArgText(std::string_view what, std::string_view value, size_t max_bytes) {
  return CheckText(Category::kUsage, what, value, max_bytes);
}

Status CheckEnvText(std::string_view name, std::string_view value) {
  return CheckText(Category::kConfig, "environment variable " + std::string(name), value, kMaxArgBytes);
}

}  // namespace custody::cli
