// LD_PRELOAD shim for the --out fallbacks (tools/custody/io.cc StagedFile):
// makes this host look like one where the unnamed way does not work.
//   CUSTODY_TEST_NO_TMPFILE=open  open(O_TMPFILE) fails with EOPNOTSUPP (a
//                                 filesystem without it): the random-name way.
//   CUSTODY_TEST_NO_TMPFILE=link  the unnamed file opens, but linkat cannot
//                                 name it (no /proc, and AT_EMPTY_PATH refused
//                                 without CAP_DAC_READ_SEARCH): the copy.
// Each refusal appends a line to CUSTODY_TEST_NO_TMPFILE_LOG, so a test can
// tell that the fallback really ran.
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

bool Mode(const char* want) {
  const char* m = std::getenv("CUSTODY_TEST_NO_TMPFILE");
  return m != nullptr && std::strcmp(m, want) == 0;
}

void Note(const char* what) {
  const char* log = std::getenv("CUSTODY_TEST_NO_TMPFILE_LOG");
  if (log == nullptr) return;
  if (FILE* f = std::fopen(log, "a")) {
    std::fprintf(f, "%s\n", what);
    std::fclose(f);
  }
}

using OpenFn = int (*)(const char*, int, ...);

// open and open64 alike: refuse O_TMPFILE in "open" mode, else pass on to
// `real` (looked up once by its caller). The mode argument exists only with
// O_CREAT or O_TMPFILE.
int Open(OpenFn real, const char* path, int flags, va_list ap) {
  mode_t mode = 0;
  if ((flags & O_CREAT) != 0 || (flags & O_TMPFILE) == O_TMPFILE) mode = static_cast<mode_t>(va_arg(ap, int));
  if ((flags & O_TMPFILE) == O_TMPFILE && Mode("open")) {
    Note("open O_TMPFILE refused");
    errno = EOPNOTSUPP;
    return -1;
  }
  return real(path, flags, mode);
}

}  // namespace

extern "C" int open(const char* path, int flags, ...) {
  static auto real = reinterpret_cast<OpenFn>(::dlsym(RTLD_NEXT, "open"));
  va_list ap;
  va_start(ap, flags);
  const int fd = Open(real, path, flags, ap);
  va_end(ap);
  return fd;
}

extern "C" int open64(const char* path, int flags, ...) {
  static auto real = reinterpret_cast<OpenFn>(::dlsym(RTLD_NEXT, "open64"));
  va_list ap;
  va_start(ap, flags);
  const int fd = Open(real, path, flags, ap);
  va_end(ap);
  return fd;
}

extern "C" int linkat(int olddirfd, const char* oldpath, int newdirfd, const char* newpath, int flags) {
  if (Mode("link") && ((flags & AT_EMPTY_PATH) != 0 || std::strncmp(oldpath, "/proc/self/fd/", 14) == 0)) {
    Note((flags & AT_EMPTY_PATH) != 0 ? "linkat AT_EMPTY_PATH refused" : "linkat /proc/self/fd refused");
    errno = ENOENT;
    return -1;
  }
  using Fn = int (*)(int, const char*, int, const char*, int);
  static Fn real = reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, "linkat"));
  return real(olddirfd, oldpath, newdirfd, newpath, flags);
}
