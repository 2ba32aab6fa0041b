// LD_PRELOAD shim for the stop-with-a-stuck-disk test: while the file named
// by CUSTODY_TEST_STALL_FSYNC exists, fdatasync and fsync do not return (as
// on a disk or a network file system that stops answering). At most 60 s,
// so a broken test cannot leave a process behind for ever.
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>

namespace {

void StallWhileFlagged() {
  const char* flag = std::getenv("CUSTODY_TEST_STALL_FSYNC");
  if (flag == nullptr) return;
  for (int i = 0; i < 6000 && ::access(flag, F_OK) == 0; ++i) ::usleep(10000);
}

}  // namespace

extern "C" int fdatasync(int fd) {
  StallWhileFlagged();
  static auto real = reinterpret_cast<int (*)(int)>(::dlsym(RTLD_NEXT, "fdatasync"));
  return real(fd);
}

extern "C" int fsync(int fd) {
  StallWhileFlagged();
  static auto real = reinterpret_cast<int (*)(int)>(::dlsym(RTLD_NEXT, "fsync"));
  return real(fd);
}
