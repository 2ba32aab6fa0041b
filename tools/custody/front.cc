// custody: the command a user runs. A lean front for the path production
// servers take at every start: `secret get` and `exec` through custodyd
// (CUSTODY_ADDR=unix:...). Those, and `custody --version`, it serves
// itself; it links only the client without its TLS part, and libcrypto
// statically (for the locked secret heap), so a process costs a fraction of
// one that loads the token, TPM and store libraries. Every other command,
// and any form of these it does not recognise exactly, goes to the full tool
// (custody-full) by exec with the same arguments, so there is one parser of
// record and the two can never answer differently.
//
// Why a separate binary and not lazy loading: a dynamically linked libcrypto
// alone costs about 1.6 ms of relocation at every start on the CI machine,
// more than the whole request to custodyd (bench/server_bench prints both).
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "custody/common/secret.h"
#include "custody/common/untrusted.h"
#include "custody/version.h"
#include "fetch.h"

namespace {

using custody::Category;
using custody::Status;

// A command line the front serves itself; anything else is for custody-full.
struct Lean {
  enum Kind { kGet, kExec } kind = kGet;
  std::string path;
  std::optional<uint32_t> version;
  std::optional<std::string> out;
  std::vector<std::string> envs, command;
};

// "N" with 1 to 10 digits and at most UINT32_MAX; anything else is left to
// the full parser, which owns the messages for bad numbers.
std::optional<uint32_t> Number(std::string_view s) {
  if (s.empty() || s.size() > 10) return std::nullopt;
  uint64_t n = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  if (n > UINT32_MAX) return std::nullopt;
  return static_cast<uint32_t>(n);
}

// Option `name` given as "--name VALUE" or "--name=VALUE" at args[i].
std::optional<std::string> Option(const std::vector<std::string_view>& args, size_t& i, std::string_view name) {
  std::string_view a = args[i];
  if (a == name) {
    if (i + 1 >= args.size()) return std::nullopt;
    return std::string(args[++i]);
  }
  if (a.size() > name.size() && a.substr(0, name.size()) == name && a[name.size()] == '=') {
    return std::string(a.substr(name.size() + 1));
  }
  return std::nullopt;
}

std::optional<Lean> Recognise(int argc, char** argv) {
  std::vector<std::string_view> args(argv + 1, argv + argc);
  size_t i = 0;
  while (i < args.size() && args[i] == "--json") ++i;  // neither command prints JSON
  if (i + 1 < args.size() && args[i] == "secret" && args[i + 1] == "get") {
    Lean l;
    l.kind = Lean::kGet;
    bool have_path = false;
    for (i += 2; i < args.size(); ++i) {
      if (auto v = Option(args, i, "--version")) {
        auto n = Number(*v);
        if (!n || l.version) return std::nullopt;
        l.version = n;
      } else if (auto o = Option(args, i, "--out")) {
        if (o->empty() || l.out) return std::nullopt;
        l.out = *o;
      } else if (!args[i].empty() && args[i][0] != '-' && !have_path) {
        l.path = std::string(args[i]);
        have_path = true;
      } else {
        return std::nullopt;
      }
    }
    if (!have_path) return std::nullopt;
    return l;
  }
  if (i < args.size() && args[i] == "exec") {
    Lean l;
    l.kind = Lean::kExec;
    for (++i; i < args.size(); ++i) {
      if (auto e = Option(args, i, "--env")) {
        l.envs.push_back(*e);
        continue;
      }
      // The documented form: the command after "--" (the full parser takes
      // a bare word after --env as another --env value).
      if (args[i] != "--") return std::nullopt;
      ++i;
      break;
    }
    for (; i < args.size(); ++i) l.command.emplace_back(args[i]);
    if (l.envs.empty() || l.command.empty()) return std::nullopt;
    return l;
  }
  return std::nullopt;
}

// custody-full: beside this binary (the build tree), in ../libexec/custody
// (an install under any prefix), else where `make install` put it.
std::string FullTool() {
  char self[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) {
    self[n] = '\0';
    std::string dir(self);
    dir.resize(dir.rfind('/') + 1);
    std::string beside = dir + "custody-full";
    if (::access(beside.c_str(), X_OK) == 0) return beside;
    // An install under another prefix than the build's (a package under
    // /usr of a build configured for /usr/local): bin/../libexec/custody.
    std::string relocated = dir + "../libexec/custody/custody-full";
    if (::access(relocated.c_str(), X_OK) == 0) return relocated;
  }
  return CUSTODY_FULL_TOOL;
}

}  // namespace

int main(int argc, char** argv) {
  custody::HardenProcess();
  ::umask(077);
  // `custody --version` alone, with or without custodyd: the same line
  // custody-full prints (both take it from custody/version.h), without the
  // cost of starting it. Any other line with --version goes to custody-full.
  if (argc == 2 && std::strcmp(argv[1], "--version") == 0) {
    std::printf("%s\n", custody::VersionLine("custody").c_str());
    return 0;
  }
  const char* addr = std::getenv("CUSTODY_ADDR");
  // An address that is not plain text goes to custody-full, which refuses it
  // (the two must answer alike).
  // Only Unix sockets here (a list of nodes too); any https:// node needs
  // custody-full's TLS.
  if (addr != nullptr && std::strncmp(addr, "unix:", 5) == 0 && std::strstr(addr, "https://") == nullptr &&
      custody::PrintableText(addr)) {
    if (auto lean = Recognise(argc, argv)) {
      auto fetch = custody::cli::RemoteFetcher(addr);
      Status s = lean->kind == Lean::kGet ? custody::cli::GetAndPrint(fetch, lean->path, lean->version, lean->out)
                                          : custody::cli::ExecWith(fetch, lean->envs, lean->command);
      if (s.ok()) return 0;
      std::fprintf(stderr, "custody: %s\n", s.error().message().c_str());
      return s.error().exit_code();
    }
  }
  std::string full = FullTool();
  ::execv(full.c_str(), argv);
  int e = errno;
  std::fprintf(stderr, "custody: cannot run %s: %s\n", full.c_str(), std::strerror(e));
  return custody::ExitCode(Category::kUnavailable);
}
