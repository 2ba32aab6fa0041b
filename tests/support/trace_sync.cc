// LD_PRELOAD shim for the durability test: appends one line per event to
// the file named by CUSTODY_TEST_TRACE, in the order the events happen:
//   S <bytes> <path>   an fdatasync/fsync of an audit segment returned; the
//                      segment then held <bytes> on disk
//   W <status> <path>  an HTTP answer starts to leave on a socket: its
//                      status code and the secret path in its body ("-"
//                      when it names none). Never a value.
// An S line before a W line means the sync had finished before the first
// byte of that answer was written. Lines are written with O_APPEND in one
// write each, so lines from several threads do not mix.
// With CUSTODY_TEST_SYNC_DELAY_US set, every audit segment sync takes that
// much longer (a slow disk), so writers that can share a sync do meet.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

void Append(const std::string& line) {
  const char* trace = std::getenv("CUSTODY_TEST_TRACE");
  if (trace == nullptr) return;
  int fd = ::open(trace, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return;
  ssize_t ignored = ::write(fd, line.data(), line.size());
  (void)ignored;
  ::close(fd);
}

std::string PathOf(int fd) {
  char link[64], target[4096];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = ::readlink(link, target, sizeof target - 1);
  if (n <= 0) return "";
  return std::string(target, static_cast<size_t>(n));
}

void AfterSync(int fd) {
  std::string path = PathOf(fd);
  const size_t slash = path.rfind('/');
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.rfind("audit-", 0) != 0 || base.size() < 6 || base.substr(base.size() - 6) != ".jsonl") return;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return;
  Append("S " + std::to_string(st.st_size) + " " + path + "\n");
}

bool IsSocket(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

// Looks at the first bytes of what is sent: an HTTP answer's status line,
// and "path":"..." in its body when the same write carries it.
void BeforeSend(int fd, const struct iovec* iov, int iovcnt) {
  if (!IsSocket(fd)) return;
  std::string head;
  for (int i = 0; i < iovcnt && head.size() < 8192; ++i) {
    head.append(static_cast<const char*>(iov[i].iov_base), std::min<size_t>(iov[i].iov_len, 8192));
  }
  if (head.rfind("HTTP/1.1 ", 0) != 0 || head.size() < 12) return;
  std::string path = "-";
  const std::string key = "\"path\":\"";
  if (size_t at = head.find(key); at != std::string::npos) {
    size_t end = head.find('"', at + key.size());
    if (end != std::string::npos) path = head.substr(at + key.size(), end - at - key.size());
  }
  Append("W " + head.substr(9, 3) + " " + path + "\n");
}

template <typename F>
F Real(const char* name) {
  return reinterpret_cast<F>(::dlsym(RTLD_NEXT, name));
}

// Sleeps for CUSTODY_TEST_SYNC_DELAY_US before an audit segment's sync.
void SlowDisk(int fd) {
  static const long delay_us = [] {
    const char* v = std::getenv("CUSTODY_TEST_SYNC_DELAY_US");
    return v == nullptr ? 0L : std::strtol(v, nullptr, 10);
  }();
  if (delay_us <= 0) return;
  const std::string path = PathOf(fd);
  if (path.find("/audit-") == std::string::npos) return;
  ::usleep(static_cast<useconds_t>(delay_us));
}

}  // namespace

extern "C" int fdatasync(int fd) {
  static auto real = Real<int (*)(int)>("fdatasync");
  SlowDisk(fd);
  int rc = real(fd);
  if (rc == 0) AfterSync(fd);
  return rc;
}

extern "C" int fsync(int fd) {
  static auto real = Real<int (*)(int)>("fsync");
  SlowDisk(fd);
  int rc = real(fd);
  if (rc == 0) AfterSync(fd);
  return rc;
}

extern "C" ssize_t sendmsg(int fd, const struct msghdr* msg, int flags) {
  static auto real = Real<ssize_t (*)(int, const struct msghdr*, int)>("sendmsg");
  BeforeSend(fd, msg->msg_iov, static_cast<int>(msg->msg_iovlen));
  return real(fd, msg, flags);
}

extern "C" ssize_t writev(int fd, const struct iovec* iov, int iovcnt) {
  static auto real = Real<ssize_t (*)(int, const struct iovec*, int)>("writev");
  BeforeSend(fd, iov, iovcnt);
  return real(fd, iov, iovcnt);
}

extern "C" ssize_t send(int fd, const void* buf, size_t len, int flags) {
  static auto real = Real<ssize_t (*)(int, const void*, size_t, int)>("send");
  struct iovec one {const_cast<void*>(buf), len};
  BeforeSend(fd, &one, 1);
  return real(fd, buf, len, flags);
}

extern "C" ssize_t write(int fd, const void* buf, size_t len) {
  static auto real = Real<ssize_t (*)(int, const void*, size_t)>("write");
  struct iovec one {const_cast<void*>(buf), len};
  BeforeSend(fd, &one, 1);
  return real(fd, buf, len);
}
