// LD_PRELOAD shim for the stop-with-a-stuck-disk test: while the file named
// by CUSTODY_TEST_STALL_FSYNC exists, fdatasync and fsync do not return (as
// on a disk or a network file system that stops answering). At most 60 s,
// so a broken test cannot leave a process behind for ever. With
// CUSTODY_TEST_STALL_ONLY set, only the syncs of files whose path holds it
// stall (say "/audit-": the audit segments, not the store).
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace {

void StallWhileFlagged(int fd) {
  const char* flag = std::getenv("CUSTODY_TEST_STALL_FSYNC");
  if (flag == nullptr) return;
  if (const char* only = std::getenv("CUSTODY_TEST_STALL_ONLY"); only != nullptr) {
    char path[4096];
    const std::string link = "/proc/self/fd/" + std::to_string(fd);
    const ssize_t n = ::readlink(link.c_str(), path, sizeof path - 1);
    if (n <= 0) return;
    path[n] = '\0';
    if (std::strstr(path, only) == nullptr) return;
  }
  for (int i = 0; i < 6000 && ::access(flag, F_OK) == 0; ++i) ::usleep(10000);
}

}  // namespace

extern "C" int fdatasync(int fd) {
  StallWhileFlagged(fd);
  static auto real = reinterpret_cast<int (*)(int)>(::dlsym(RTLD_NEXT, "fdatasync"));
  return real(fd);
}

extern "C" int fsync(int fd) {
  StallWhileFlagged(fd);
  static auto real = reinterpret_cast<int (*)(int)>(::dlsym(RTLD_NEXT, "fsync"));
  return real(fd);
}
