// LD_PRELOAD shim: unlink(2) of a path that contains CUSTODY_TEST_FAIL_UNLINK
// fails with EIO, as on a disk that stops answering part way. For the tests of
// what `custody audit prune` records when removing a segment fails after
// its statement is already in the log.
#include <dlfcn.h>
#include <errno.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

extern "C" int unlink(const char* path) {
  using UnlinkFn = int (*)(const char*);
  static UnlinkFn real = reinterpret_cast<UnlinkFn>(dlsym(RTLD_NEXT, "unlink"));
  const char* match = std::getenv("CUSTODY_TEST_FAIL_UNLINK");
  if (match != nullptr && *match != '\0' && std::strstr(path, match) != nullptr) {
    errno = EIO;
    return -1;
  }
  return real(path);
}
