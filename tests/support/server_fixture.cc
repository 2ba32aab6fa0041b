#include "server_fixture.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "custody/app/config.h"
#include "custody/app/backend.h"
#include "custody/store/store.h"

namespace custody::test {

namespace {

// setpriv's arguments that run `command` as `uid` (its group too), with no
// supplementary groups.
std::vector<std::string> AsUid(int uid, const std::vector<std::string>& command) {
  std::vector<std::string> full{"--reuid=" + std::to_string(uid), "--regid=" + std::to_string(uid), "--clear-groups"};
  full.insert(full.end(), command.begin(), command.end());
  return full;
}

}  // namespace

int ConnectUnix(const std::string& socket) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", socket.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void SendAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n <= 0) break;
    off += static_cast<size_t>(n);
  }
}

std::string Raw(const std::string& socket, const std::string& request) {
  int fd = ConnectUnix(socket);
  if (fd < 0) return "connect failed";
  SendAll(fd, request);
  ::shutdown(fd, SHUT_WR);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

std::optional<int> WaitForExit(pid_t& pid, std::chrono::seconds within) {
  if (pid <= 0) return std::nullopt;
  const auto deadline = std::chrono::steady_clock::now() + within;
  for (;;) {
    int status = 0;
    // Only a reaped child counts: 0 (still running) and -1 (an error) leave
    // `status` meaningless.
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      pid = -1;
      return status;
    }
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

std::optional<int> StopWithin(pid_t& pid, int seconds) {
  ::kill(pid, SIGTERM);
  auto status = WaitForExit(pid, std::chrono::seconds(seconds));
  if (!status) return std::nullopt;
  return WIFEXITED(*status) ? WEXITSTATUS(*status) : 128 + WTERMSIG(*status);
}

std::optional<long> MetricValue(const std::string& metrics, const std::string& name) {
  // With the node's label alone, or (a server with no node name) none.
  std::string line = "\n" + name + "{node=\"" + kNode + "\"} ";
  size_t at = metrics.find(line);
  if (at == std::string::npos) at = metrics.find(line = "\n" + name + " ");
  if (at == std::string::npos) return std::nullopt;
  const char* start = metrics.c_str() + at + line.size();
  char* end = nullptr;
  long v = std::strtol(start, &end, 10);
  if (end == start || *end != '\n') return std::nullopt;
  return v;
}

void TamperWithStripe(const std::string& config_path) {
  auto config = core::LoadConfig(config_path);
  ASSERT_TRUE(config.ok()) << config.error().message();
  auto store = core::OpenStore(*config, false);
  ASSERT_TRUE(store.ok()) << store.error().message();
  auto env = (*store)->FindEnvironment("payments", "prod");
  ASSERT_TRUE(env.ok());
  auto rec = (*store)->GetVersion(*env, "stripe", std::nullopt);
  ASSERT_TRUE(rec.ok());
  auto items = (*store)->SealedUnder(rec->kek_record_id, {0, 0}, 100);
  ASSERT_TRUE(items.ok());
  std::vector<core::Resealed> flipped;
  for (auto& it : *items) {
    if (it.name != "stripe") continue;
    it.blob.back() ^= 0x01;
    flipped.push_back({it.secret_id, it.version, it.blob});
  }
  ASSERT_EQ(flipped.size(), 1u);
  auto replaced = (*store)->ReplaceSealed(rec->kek_record_id, rec->kek_record_id, flipped);
  ASSERT_TRUE(replaced.ok());
  ASSERT_EQ(*replaced, 1u);
}

void ServerTest::SetUp() {
  Init();
  if (HasFatalFailure() || IsSkipped()) return;
  auto r = Apply(kPolicy);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/stripe"}, kSecret).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "put", "billing/prod/invoice-key"}, "billing-value").exit_code, 0);
  // The socket's folder must be reachable by other users (nobody).
  ::chmod(run_.path().c_str(), 0755);
  socket_ = run_ / "custody.sock";
  std::string cfg = ReadFile(token_.config_path());
  WriteFile(token_.config_path(), cfg + "\n[node]\nname = \"" + kNode + "\"\n[server]\nsocket = \"" + socket_ +
                                      "\"\nthreads = 4\nmax_body_bytes = 4096\n" + ExtraServerConfig());
  BeforeStart();
  Start();
}

void ServerTest::TearDown() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  if (HasFailure()) std::fprintf(stderr, "custodyd log:\n%s\n", ReadFile(token_.dir() / "custodyd.log").c_str());
}

pid_t StartCustodyd(const CustodydStart& how) {
  std::vector<std::string> env_strings{"CUSTODY_CONFIG=" + how.config, "SOFTHSM2_CONF=" + how.softhsm_conf,
                                       std::string("PATH=") + (std::getenv("PATH") ? std::getenv("PATH") : "/usr/bin:/bin")};
  for (const auto& e : how.env) env_strings.push_back(e);
  for (const char* k : {"ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS"}) {
    if (const char* v = std::getenv(k)) env_strings.push_back(std::string(k) + "=" + v);
  }
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    // Otherwise a custodyd outlives a test process that dies (a crash, the
    // SIGKILL of ctest's timeout), holding its socket and token until
    // someone kills it. The signal follows the thread that forked: every
    // caller starts custodyd from the test's own thread, never from one of
    // the client threads a test joins.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // it died before the prctl
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    FILE* f = std::freopen(how.log.c_str(), how.append_log ? "a" : "w", stderr);
    (void)f;
    char* argv[] = {const_cast<char*>(CUSTODYD_BIN), nullptr};
    ::execve(CUSTODYD_BIN, argv, envp.data());
    ::_exit(127);
  }
  if (how.wait) WaitUntilServing(how);
  return pid;
}

void WaitUntilServing(const CustodydStart& how) {
  // Ready when it accepts a connection: the socket file appears at bind(),
  // a moment before listen().
  for (int i = 0; i < 300; ++i) {
    struct stat st {};
    if (::stat(how.socket.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && Raw(how.socket, "") != "connect failed") return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ADD_FAILURE() << "custodyd (" << how.config << ") did not start: " << ReadFile(how.log);
}

void ServerTest::Start() {
  pid_ = StartCustodyd({.config = token_.config_path(), .softhsm_conf = token_.conf(), .socket = socket_,
                        .log = token_.dir() / "custodyd.log", .env = ExtraServerEnv()});
  if (HasFailure()) FAIL();
}

RunResult ServerTest::AsUser(std::optional<int> uid, const std::vector<std::string>& args) {
  return ClientAs(CUSTODY_BIN, uid, args);
}

RunResult ServerTest::ClientAs(const std::string& binary, std::optional<int> uid,
                               const std::vector<std::string>& args) {
  RunOptions o;
  o.env = {{"CUSTODY_ADDR", "unix:" + socket_}};
  if (!uid) return RunProgram(binary, args, o);
  std::vector<std::string> command{binary};
  command.insert(command.end(), args.begin(), args.end());
  return RunProgram("/usr/bin/setpriv", AsUid(*uid, command), o);
}

std::string ServerTest::CurlAs(int uid, const std::string& target) {
  auto r = RunProgram(
      "/usr/bin/setpriv",
      AsUid(uid, {"/usr/bin/curl", "-s", "-i", "--unix-socket", socket_, "http://custody" + target}), {});
  return r.out + r.err;
}

size_t ServerTest::AuditCount(const std::string& action) {
  auto r = Cli({"--json", "audit", "show", "--action", action});
  size_t n = 0;
  for (size_t at = r.out.find("\"seq\""); at != std::string::npos; at = r.out.find("\"seq\"", at + 1)) ++n;
  return n;
}

std::string ServerTest::RefusalSummaries(const std::string& reason, uint64_t n) {
  std::string text;
  for (int i = 0; i < 50; ++i) {
    text.clear();
    auto r = Cli({"--json", "audit", "show", "--action", "http.refused"});
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    if (j.is_array()) {
      for (const auto& rec : j) {
        text += rec.value("identified_by", "") + ": " + rec.value("detail", "") + "\n";
      }
    }
    if (RefusalCount(text, reason) >= n) return text;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return text;
}

uint64_t ServerTest::RefusalCount(const std::string& summaries, const std::string& reason) {
  // A detail reads "N refused in at most S s: REASON xK, REASON xK".
  uint64_t n = 0;
  const std::string key = reason + " x";
  for (size_t at = summaries.find(key); at != std::string::npos; at = summaries.find(key, at + 1)) {
    const char before = at >= 2 ? summaries[at - 2] : ':';
    if (at >= 2 && before != ':' && before != ',') continue;  // the end of a longer reason
    n += std::strtoull(summaries.c_str() + at + key.size(), nullptr, 10);
  }
  return n;
}

std::vector<uint64_t> ServerTest::CheckpointSeqs() {
  std::vector<uint64_t> seqs;
  for (const auto& r : TrailRecords(token_.config_path())) {
    if (r.type == "checkpoint") seqs.push_back(r.seq);
  }
  return seqs;
}

void TpmServerTest::Init() {
  CUSTODY_REQUIRE_SWTPM(swtpm_);
  auto r = InitTpm(swtpm_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

void TpmServerTest::BeforeStart() {
  std::string cfg = ReadFile(token_.config_path());
  size_t at = cfg.find("checkpoint_every = 1000");
  ASSERT_NE(at, std::string::npos) << cfg;
  cfg.replace(at, std::string("checkpoint_every = 1000").size(), "checkpoint_every = 5");
  WriteFile(token_.config_path(), cfg);
}

}  // namespace custody::test
