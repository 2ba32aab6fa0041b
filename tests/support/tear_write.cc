// LD_PRELOAD shim for the crash test of the audit log: the N-th write(2) to
// an audit segment (N from CUSTODY_TEST_TEAR_AT) writes only the first half
// of its bytes, and then the process kills itself with SIGKILL, as a power
// cut or kill -9 landing in the middle of a record would leave the file.
#include <dlfcn.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

bool IsAuditSegment(int fd) {
  char link[64], target[4096];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = ::readlink(link, target, sizeof target - 1);
  if (n <= 0) return false;
  std::string path(target, static_cast<size_t>(n));
  const std::string base = path.substr(path.rfind('/') + 1);
  return base.rfind("audit-", 0) == 0 && base.size() > 6 && base.substr(base.size() - 6) == ".jsonl";
}

std::atomic<long> writes{0};

}  // namespace

extern "C" ssize_t write(int fd, const void* buf, size_t len) {
  static auto real = reinterpret_cast<ssize_t (*)(int, const void*, size_t)>(::dlsym(RTLD_NEXT, "write"));
  static const long tear_at = [] {
    const char* v = std::getenv("CUSTODY_TEST_TEAR_AT");
    return v == nullptr ? 0L : std::strtol(v, nullptr, 10);
  }();
  if (tear_at > 0 && len > 1 && IsAuditSegment(fd) && writes.fetch_add(1) + 1 == tear_at) {
    (void)real(fd, buf, len / 2);
    ::kill(::getpid(), SIGKILL);
  }
  return real(fd, buf, len);
}
