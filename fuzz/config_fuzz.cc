// Fuzzes the config loader (core::LoadConfig), which custody and custodyd run
// on every start and custodyd again on every SIGHUP. It takes a path, so each
// input is written to one temporary file that the process reuses. Whatever
// the bytes: the file loads, or is refused with a config error that names
// the file; nothing crashes or throws. A config that loads must also survive
// what `custody init` does with one: WriteConfig, then LoadConfig again,
// gives back every field WriteConfig writes.
//
// The files live in a folder made under $TMPDIR (ci/fuzz.sh points TMPDIR at
// its work folder, so nothing is left behind even after a crash). Put it on
// a tmpfs: on a disk, WriteConfig's fsync takes most of the time.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "custody/app/config.h"
#include "custody/store/postgres_store.h"

namespace {

using namespace custody;
using namespace custody::core;

void Require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "config_fuzz: %s\n", what);
  std::abort();
}

struct Files {
  std::string dir, input, written;
  int fd = -1;

  Files() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/config_fuzz.XXXXXX";
    Require(::mkdtemp(pattern.data()) != nullptr, "cannot make a temporary folder");
    dir = pattern;
    input = dir + "/custody.toml";
    written = dir + "/written.toml";
    fd = ::open(input.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    Require(fd >= 0, "cannot create the input file");
  }
  ~Files() {
    ::close(fd);
    ::unlink(input.c_str());
    ::unlink(written.c_str());
    ::unlink((written + ".tmp").c_str());
    ::rmdir(dir.c_str());
  }

  void Write(const uint8_t* data, size_t size) const {
    Require(::ftruncate(fd, 0) == 0, "cannot truncate the input file");
    size_t off = 0;
    while (off < size) {
      ssize_t n = ::pwrite(fd, data + off, size - off, static_cast<off_t>(off));
      Require(n > 0, "cannot write the input file");
      off += static_cast<size_t>(n);
    }
  }
};

// Every refusal is a config error located in the file it read.
void CheckRefusal(const Error& e, const std::string& path) {
  Require(e.category() == Category::kConfig, "a refusal is not a config error");
  Require(e.message().rfind(path, 0) == 0, "a refusal does not name the config file");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Files files;
  files.Write(data, size);

  auto c = LoadConfig(files.input);
  if (!c.ok()) {
    CheckRefusal(c.error(), files.input);
    return 0;
  }
  Require(!c->state_dir.empty() && c->store.path.empty() != c->store.url.empty(),
          "an accepted config has no state_dir, or not exactly one of store.path and store.url");
  // A PostgreSQL URL is only ever accepted without a password in it.
  Require(c->store.url.empty() || CheckPostgresUrl(c->store.url).ok(), "an accepted store.url fails its own check");
  Require(c->token.backend == "pkcs11" || c->token.backend == "tpm", "an accepted config has an unknown backend");

  Require(WriteConfig(*c, files.written).ok(), "WriteConfig failed on an accepted config");
  auto back = LoadConfig(files.written);
  Require(back.ok(), "what WriteConfig wrote does not load");
  Require(back->state_dir == c->state_dir && back->token.backend == c->token.backend && back->token.pkcs11.module == c->token.pkcs11.module &&
              back->token.pkcs11.uri == c->token.pkcs11.uri && back->token.tpm.tcti == c->token.tpm.tcti && back->token.tpm.pcrs == c->token.tpm.pcrs &&
              back->token.tpm.persist_srk == c->token.tpm.persist_srk && back->token.tpm.srk_name == c->token.tpm.srk_name &&
              back->token.tpm.kek_cache_seconds == c->token.tpm.kek_cache_seconds && back->token.pin_file == c->token.pin_file &&
              back->token.environment == c->token.environment && back->store == c->store &&
              back->audit.dir == c->audit.dir && back->audit.checkpoint_every == c->audit.checkpoint_every &&
              back->audit.checkpoint_seconds == c->audit.checkpoint_seconds && back->audit.gather == c->audit.gather,
          "a config written by WriteConfig loads back different");
  return 0;
}
