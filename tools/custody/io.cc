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

Status WriteAllTo(int fd, std::span<const uint8_t> bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Os(errno, "write");
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) return Error::Os(errno, "fsync");
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

// The unnamed way: the file has no name until it is whole; then it is linked
// under a random name and renamed over `path` (linkat cannot replace a file
// that exists). nullopt when this filesystem or kernel cannot make unnamed
// files: the caller falls back to a named one.
std::optional<Status> WriteThroughUnnamedFile(const std::string& dir, const std::string& path,
                                              std::span<const uint8_t> bytes) {
  int fd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0) {
    int e = errno;
    if (e == EOPNOTSUPP || e == EISDIR || e == EINVAL) return std::nullopt;
    return Error::Os(e, "cannot create a file in " + dir);
  }
  // Closing an unnamed file discards it: any failure below leaves nothing.
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  if (::fchmod(fd, 0600) != 0) return Error::Os(errno, "cannot write " + path);
  if (Status s = WriteAllTo(fd, bytes); !s.ok()) return std::move(s).error().Wrap("cannot write " + path);
  char proc[64];
  std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
  for (int i = 0; i < kNameTries; ++i) {
    auto tmp = RandomName(dir);
    if (!tmp) return std::move(tmp).error();
    int rc = ::linkat(AT_FDCWD, proc, AT_FDCWD, tmp->c_str(), AT_SYMLINK_FOLLOW);
    // Without /proc, the descriptor itself (needs CAP_DAC_READ_SEARCH on
    // older kernels).
    if (rc != 0 && errno == ENOENT) rc = ::linkat(fd, "", AT_FDCWD, tmp->c_str(), AT_EMPTY_PATH);
    if (rc != 0 && errno == EEXIST) continue;
    if (rc != 0) {
      int e = errno;
      // Neither way to name it works here (no /proc, no capability): the
      // named fallback can still do the job.
      if (e == ENOENT || e == EPERM || e == EOPNOTSUPP) return std::nullopt;
      return Error::Os(e, "cannot write " + path);
    }
    if (::rename(tmp->c_str(), path.c_str()) != 0) {
      int e = errno;
      ::unlink(tmp->c_str());
      return Error::Os(e, "cannot write " + path);
    }
    return Status::Ok();
  }
  return Error(Category::kUnavailable, "cannot write " + path + ": every temporary name tried in " + dir + " was taken");
}

// The named way, for filesystems without O_TMPFILE: a random name that must
// not exist (O_EXCL) and is never followed if it is a link (O_NOFOLLOW).
Status WriteThroughNamedFile(const std::string& dir, const std::string& path, std::span<const uint8_t> bytes) {
  for (int i = 0; i < kNameTries; ++i) {
    CUSTODY_ASSIGN_OR_RETURN(std::string tmp, RandomName(dir));
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 && errno == EEXIST) continue;
    if (fd < 0) return Error::Os(errno, "cannot create a file in " + dir);
    Status s = WriteAllTo(fd, bytes);
    if (s.ok() && ::fchmod(fd, 0600) != 0) s = Error::Os(errno, "fchmod");
    if (::close(fd) != 0 && s.ok()) s = Error::Os(errno, "close");
    if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) s = Error::Os(errno, "rename");
    if (!s.ok()) {
      ::unlink(tmp.c_str());
      return std::move(s).error().Wrap("cannot write " + path);
    }
    return Status::Ok();
  }
  return Error(Category::kUnavailable, "cannot write " + path + ": every temporary name tried in " + dir + " was taken");
}

}  // namespace

Status WritePrivateFile(const std::string& path, std::span<const uint8_t> bytes) {
  // Never a predictable name beside `path`: in a shared folder another user
  // could create it first (the write fails) or make it a link (the write
  // goes elsewhere).
  std::string dir = FolderOf(path);
  if (auto done = WriteThroughUnnamedFile(dir, path, bytes)) return *done;
  return WriteThroughNamedFile(dir, path, bytes);
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
