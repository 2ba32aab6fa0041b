#include "fetch.h"

#include <openssl/crypto.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "io.h"

namespace custody::cli {
namespace {

Status WriteAll(int fd, std::span<const uint8_t> bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Os(errno, "writing to stdout");
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

Fetcher RemoteFetcher(const std::string& address) {
  return [address](const core::SecretPath& path, std::optional<uint32_t> version) -> Result<client::Fetched> {
    CUSTODY_ASSIGN_OR_RETURN(auto c, client::Client::Connect(address));
    auto f = c.Get(path.str(), version);
    if (!f) return std::move(f).error().Wrap(path.str());
    return f;
  };
}

Status GetAndPrint(const Fetcher& fetch, const std::string& path_text, std::optional<uint32_t> version,
                   const std::optional<std::string>& out) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(path_text));
  CUSTODY_ASSIGN_OR_RETURN(client::Fetched f, fetch(path, version));
  auto bytes = f.value.Reveal(SecretAccess{});
  if (out) {
    CUSTODY_RETURN_IF_ERROR(WritePrivateFile(*out, bytes));
    std::fprintf(stderr, "custody: wrote %s version %u to %s\n", path.str().c_str(), f.version, out->c_str());
    return Status::Ok();
  }
  // The value goes to stdout as raw bytes, never through a JSON string copy.
  return WriteAll(STDOUT_FILENO, bytes);
}

Status ExecWith(const Fetcher& fetch, const std::vector<std::string>& envs, const std::vector<std::string>& command) {
  if (command.empty()) return Error(Category::kUsage, "exec needs a command after --");
  std::vector<std::pair<std::string, core::SecretPath>> wanted;
  for (const auto& e : envs) {
    CUSTODY_RETURN_IF_ERROR(CheckArgText("--env", e));  // before it is quoted back below
    size_t eq = e.find('=');
    if (eq == std::string::npos || eq == 0) {
      return Error(Category::kUsage, "--env '" + e + "' must be NAME=PROJECT/ENV/SECRET (and '--' goes before the command)");
    }
    std::string name = e.substr(0, eq);
    // POSIX names: letters, digits and '_', not starting with a digit (a
    // shell could not read the variable otherwise).
    if (name[0] >= '0' && name[0] <= '9') {
      return Error(Category::kUsage, "--env name '" + name + "' is not a valid variable name");
    }
    for (char c : name) {
      if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) {
        return Error(Category::kUsage, "--env name '" + name + "' is not a valid variable name");
      }
    }
    CUSTODY_ASSIGN_OR_RETURN(auto path, core::SecretPath::Parse(e.substr(eq + 1)));
    wanted.emplace_back(name, path);
  }
  // Every value is fetched (and recorded) before anything is set: all or nothing.
  std::vector<std::pair<std::string, client::Fetched>> got;
  for (auto& [name, path] : wanted) {
    CUSTODY_ASSIGN_OR_RETURN(client::Fetched f, fetch(path, std::nullopt));
    if (f.value.RevealString(SecretAccess{}).find('\0') != std::string_view::npos) {
      return Error(Category::kIntegrity, path.str() + " holds a NUL byte and cannot go into an environment variable");
    }
    got.emplace_back(name, std::move(f));
  }
  for (auto& [name, f] : got) {
    std::string v(f.value.RevealString(SecretAccess{}));
    ::setenv(name.c_str(), v.c_str(), 1);
    OPENSSL_cleanse(v.data(), v.size());
  }
  got.clear();  // wiped
  std::vector<char*> argv;
  for (const auto& c : command) argv.push_back(const_cast<char*>(c.c_str()));
  argv.push_back(nullptr);
  // The values live on only in the new program's environment. The process
  // was made non-dumpable; exec resets that for the new program, as it should.
  ::execvp(argv[0], argv.data());
  return Error::Os(errno, "cannot run " + command[0], errno == ENOENT ? Category::kNotFound : Category::kUnavailable);
}

}  // namespace custody::cli
