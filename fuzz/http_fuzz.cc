// Fuzzes custodyd's whole request handling, in process and for real: the
// Beast parser, routing, the edge checks on the target and the body, the
// policy, limits, the audit record and the answer. A real server runs on a
// real Unix socket over a real SoftHSM2 token, SQLite store and audit log
// (made once, in a temporary folder, by the custody CLI); each input is one
// connection. The fuzzer also chooses who the peer is (uid, and the bytes
// of its user name, which custodyd takes from NSS and must treat as
// untrusted), through the server's fuzzing hook for SO_PEERCRED.
//
// Input: byte 0 picks the peer; up to the first '\n' within the next 32
// bytes is its user name; the rest is sent as it is, but for "@TOKEN@",
// which becomes a live access token (the Vault-compatible API's).
// Fails (abort) when: an answer is not HTTP, the server does not answer
// within 10 s, or a GET of a known secret by a reader stops succeeding
// (the audit writer wedged, as a non-UTF-8 query once did).
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "custody/app/backend.h"
#include "custody/app/config.h"
#include "custody/audit/audit.h"
#include "custody/server/peer.h"
#include "custody/server/server.h"
#include "custody/service/access_tokens.h"
#include "custody/service/authz.h"
#include "custody/service/custodian.h"
#include "custody/service/service.h"
#include "custody/store/store.h"

namespace {

using namespace custody;

constexpr const char* kPolicy = R"(version = 1
admins = ["user:root"]
[principals."user:root"]
uid = 0
[principals."user:nobody"]
uid = 65534
[principals."user:named"]
unix_user = "fuzz-user"
[projects.payments]
[projects.payments.environments.prod]
[projects.payments.environments.dev]
production = false
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
[[projects.payments.grants]]
principal = "user:named"
role = "reader"
[projects.billing]
[projects.billing.environments.prod]
rate = "600/min"
[[projects.billing.grants]]
principal = "user:root"
role = "owner"
[[projects.billing.grants]]
principal = "user:nobody"
role = "reader"
[projects.canary]
[projects.canary.environments.prod]
[[projects.canary.grants]]
principal = "user:root"
role = "@CANARY_ROLE@"
)";

// The policy with root's role in canary: owner while the set-up puts its
// secret, then reader, so that no input (root's included: an owner may
// revoke) can take away the value the liveness check reads.
std::string Policy(const std::string& canary_role) {
  std::string p = kPolicy;
  p.replace(p.find("@CANARY_ROLE@"), 13, canary_role);
  return p;
}

[[noreturn]] void Die(const std::string& why) {
  std::fprintf(stderr, "http_fuzz: %s\n", why.c_str());
  std::abort();
}

void Write(const std::string& path, const std::string& data) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << data;
}

// Runs a program with `env` added; dies if it fails (set-up only).
void Run(const std::vector<std::string>& args, const std::string& in = "") {
  std::string in_path = std::filesystem::temp_directory_path() / ("http-fuzz-in-" + std::to_string(::getpid()));
  Write(in_path, in);
  pid_t pid = ::fork();
  if (pid == 0) {
    int fd = ::open(in_path.c_str(), O_RDONLY);
    ::dup2(fd, 0);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ::unlink(in_path.c_str());
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) Die("set-up step failed: " + args[0] + " " + args[1]);
}

struct World {
  std::string dir, socket;
  std::unique_ptr<core::Store> store;
  std::unique_ptr<core::AuditLog> audit;
  core::SealingBackend backend;
  std::unique_ptr<core::Custodian> custodian;
  std::optional<core::AccessTokens> tokens;
  std::string token;  // a live access token for user:nobody
  std::unique_ptr<server::Server> server;
  std::thread loop;
  std::mutex peer_mu;
  core::RequestContext next_peer;
};

World* world = nullptr;

void SetUp() {
  auto* w = new World;
  std::string tmpl = (std::filesystem::temp_directory_path() / "custody-http-fuzz-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) Die("mkdtemp");
  w->dir = tmpl;
  std::filesystem::create_directories(w->dir + "/tokens");
  const std::string conf = w->dir + "/softhsm2.conf";
  Write(conf, "directories.tokendir = " + w->dir + "/tokens\nobjectstore.backend = file\nlog.level = ERROR\n");
  ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  const std::string pin_file = w->dir + "/pin";
  Write(pin_file, "fuzz-pin-1234\n");
  ::chmod(pin_file.c_str(), 0600);
  // A test token's PIN in argv: softhsm2-util has no other way, and this
  // token holds nothing but fuzzing data.
  Run({"/usr/bin/softhsm2-util", "--init-token", "--free", "--label", "fuzz", "--so-pin", "fuzz-so-5678", "--pin",
       "fuzz-pin-1234"});
  const std::string config = w->dir + "/state/custody.toml";
  ::setenv("CUSTODY_CONFIG", config.c_str(), 1);
  Run({CUSTODY_FULL_BIN, "init", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token", "pkcs11:token=fuzz",
       "--pin-file", pin_file, "--state-dir", w->dir + "/state"});
  Write(w->dir + "/policy.toml", Policy("owner"));
  Run({CUSTODY_FULL_BIN, "policy", "apply", w->dir + "/policy.toml"});
  Run({CUSTODY_FULL_BIN, "secret", "put", "payments/prod/stripe"}, "sk-fuzz-0123456789");
  Run({CUSTODY_FULL_BIN, "secret", "put", "billing/prod/invoice"}, "billing-value");
  Run({CUSTODY_FULL_BIN, "secret", "put", "canary/prod/key"}, "canary-value");
  Write(w->dir + "/policy.toml", Policy("reader"));
  Run({CUSTODY_FULL_BIN, "policy", "apply", w->dir + "/policy.toml"});

  auto cfg = core::LoadConfig(config);
  if (!cfg) Die(cfg.error().message());
  auto store = core::OpenStore(*cfg, false);
  if (!store) Die(store.error().message());
  w->store = std::move(*store);
  auto audit = core::AuditLog::Open(cfg->audit);
  if (!audit) Die(audit.error().message());
  w->audit = std::move(*audit);
  auto authz = core::Authorizer::Load(*w->store);
  if (!authz) Die(authz.error().message());
  auto pin = core::ResolvePin(*cfg, std::nullopt);
  if (!pin) Die(pin.error().message());
  auto backend = core::OpenBackend(*cfg, *pin, *w->store);
  if (!backend) Die(backend.error().message());
  w->backend = std::move(*backend);
  w->custodian = std::make_unique<core::Custodian>(*w->store, *w->audit, *w->backend.sealer,
                                                   std::make_shared<const core::Authorizer>(std::move(*authz)));
  // Access tokens (the Vault-compatible API): "@TOKEN@" in an input is
  // replaced by a live token for user:nobody, so seeds reach past the check.
  auto key = core::LoadAccessTokenKey(*cfg);
  if (!key || !*key) Die("no access-token key");
  w->tokens.emplace(*w->store, std::move(**key));
  w->custodian->SetAccessTokens(&*w->tokens);
  auto issued = w->tokens->Issue("user:nobody", 86400, 86400, "fuzz set-up", std::time(nullptr));
  if (!issued) Die(issued.error().message());
  w->token = std::string(issued->token.RevealString(SecretAccess{}));
  server::ServerOptions o;
  w->socket = w->dir + "/custody.sock";
  o.socket_path = w->socket;
  o.max_body_bytes = 4096;
  o.idle_timeout_seconds = 5;
  o.refusal_summary_seconds = 1;
  o.unix_peer_for_fuzzing = [w](int) -> std::optional<core::RequestContext> {
    std::lock_guard lock(w->peer_mu);
    return w->next_peer;
  };
  w->server = std::make_unique<server::Server>(o, *w->custodian);
  if (auto s = w->server->Listen(); !s.ok()) Die(s.error().message());
  w->loop = std::thread([w] { (void)w->server->Run(2); });
  world = w;
}

// libFuzzer ends a campaign with exit(): static destructors (SoftHSM2's,
// OpenSSL's, the logger's) then run while the server's threads may still be
// inside them, which crashed a CI campaign after its last input. Stopping
// the server first, from an atexit handler registered after all of those,
// keeps the teardown ordered. The rest of the world is left to the kernel.
void TearDown() {
  if (world == nullptr) return;
  world->server->Stop(std::chrono::seconds(1));
  if (world->loop.joinable()) world->loop.join();
}

// One connection: sends `request`, half-closes, reads until the server
// closes. nullopt when the server did not answer in time.
// How the last Exchange's read ended: "end of stream", or the error, for
// the message when an answer is missing.
std::string last_end;

std::optional<std::string> Exchange(const std::string& request) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", world->socket.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) Die("cannot connect: the server is gone");
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  size_t off = 0;
  while (off < request.size()) {
    ssize_t n = ::send(fd, request.data() + off, request.size() - off, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may refuse and close before reading it all
    off += static_cast<size_t>(n);
  }
  ::shutdown(fd, SHUT_WR);
  std::string out;
  char buf[8192];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      ::close(fd);
      return std::nullopt;
    }
    last_end = n == 0 ? "end of stream" : std::string("recv: ") + std::strerror(errno);
    break;
  }
  ::close(fd);
  return out;
}

void Become(core::RequestContext peer) {
  std::lock_guard lock(world->peer_mu);
  world->next_peer = std::move(peer);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  ::signal(SIGPIPE, SIG_IGN);
  SetUp();
  std::atexit(TearDown);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static uint64_t runs = 0;
  if (size == 0) return 0;
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const uint8_t who = data[0] % 4;
  std::string_view rest = in.substr(1);
  std::optional<std::string> user;
  if (size_t nl = rest.substr(0, 33).find('\n'); nl != std::string_view::npos) {
    user = std::string(rest.substr(0, nl));
    rest = rest.substr(nl + 1);
  }
  const uint32_t uid = who == 0 ? 0 : who == 1 ? 65534 : who == 2 ? 1000 : 4242;
  if (who == 3 && !user) user = "fuzz-user";
  Become(server::PeerFromAccount(uid, 1, user, {uid}));
  std::string request(rest);
  for (size_t at = request.find("@TOKEN@"); at != std::string::npos; at = request.find("@TOKEN@", at)) {
    request.replace(at, 7, world->token);
  }
  auto answer = Exchange(request);
  if (!answer) Die("no answer within 10 s");
  if (!answer->empty() && answer->rfind("HTTP/1.1 ", 0) != 0) Die("an answer that is not HTTP");

  // Root can still read the canary (where it is a reader: no input can
  // revoke or replace it): nothing the input did wedged the audit writer,
  // the store or the token.
  // A wedge fails every later GET; one answer lost on a loaded machine
  // (a CI run once saw the connection closed with no answer, cause not yet
  // found: see the issue notes) is said on stderr and asked once more.
  if (++runs % 64 == 0) {
    Become(server::PeerFromAccount(0, 1, std::string("root"), {0}));
    const std::string get = "GET /v1/secrets/canary/prod/key HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    auto check = Exchange(get);
    if (check && check->empty()) {
      // Said with how the read ended (a reset, or the server's close), for
      // the cause still to be found.
      std::fprintf(stderr, "http_fuzz: the canary GET was closed with no answer (%s); asking again\n",
                   last_end.c_str());
      check = Exchange(get);
    }
    if (!check || check->rfind("HTTP/1.1 200", 0) != 0) {
      Die("the canary GET failed after an input: " + (check ? check->substr(0, 200) : std::string("no answer")));
    }
  }
  return 0;
}
