#include "testenv.h"

#include "pg_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string_view>
#include <thread>

namespace custody::test {

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "custody-test-XXXXXX").string();
  char* p = ::mkdtemp(tmpl.data());
  if (p == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = p;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> SoftHsmToken::ObjectFiles() const {
  std::vector<std::string> out;
  for (const auto& slot : std::filesystem::directory_iterator(dir_ / "tokens")) {
    for (const auto& e : std::filesystem::directory_iterator(slot.path())) {
      if (e.path().extension() == ".object" && e.path().filename() != "token.object") out.push_back(e.path().string());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

void ExecSql(const std::string& db, const std::string& sql) {
  sqlite3* handle = nullptr;
  int opened = sqlite3_open(db.c_str(), &handle);
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> closer(handle, &sqlite3_close);
  ASSERT_EQ(opened, SQLITE_OK) << db;
  char* err = nullptr;
  int rc = sqlite3_exec(handle, sql.c_str(), nullptr, nullptr, &err);
  std::string msg = err ? err : "";
  sqlite3_free(err);
  ASSERT_EQ(rc, SQLITE_OK) << msg;
}

SoftHsmToken::SoftHsmToken(const std::string& label) : label_(label) {
  std::filesystem::create_directories(dir_ / "tokens");
  conf_ = dir_ / "softhsm2.conf";
  WriteFile(conf_, "directories.tokendir = " + (dir_ / "tokens") +
                       "\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n");
  ::setenv("SOFTHSM2_CONF", conf_.c_str(), 1);
  AddToken(label);
  WriteFile(pin_file(), std::string(kPin) + "\n");
  ::chmod(pin_file().c_str(), 0600);
}

void SoftHsmToken::AddToken(const std::string& label) {
  RunOptions o;
  o.env["SOFTHSM2_CONF"] = conf_;
  auto r = RunProgram("/usr/bin/softhsm2-util",
                      {"--init-token", "--free", "--label", label, "--so-pin", kSoPin, "--pin", kPin}, o);
  if (r.exit_code != 0) throw std::runtime_error("softhsm2-util --init-token failed: " + r.err + r.out);
}

std::map<std::string, std::string> SoftHsmToken::CliEnv() const {
  return {{"CUSTODY_CONFIG", config_path()}, {"SOFTHSM2_CONF", conf_}};
}

bool TestOnPostgres() {
  const char* s = std::getenv("CUSTODY_TEST_STORE");
  return s != nullptr && std::string_view(s).starts_with("postgres");
}

std::vector<std::string> TestStoreArgs() {
  if (!TestOnPostgres()) return {};
  PgServer* pg = PgServer::Shared();
  if (pg == nullptr) {
    ADD_FAILURE() << "CUSTODY_TEST_STORE=postgres, but PostgreSQL cannot start: " << PgServer::WhyNot();
    return {};
  }
  return {"--store", pg->NewDatabase()};
}

void SoftHsmToken::InitCli() const {
  RunOptions o;
  o.env = CliEnv();
  std::vector<std::string> args{"init", "--module", kModule, "--token", uri(), "--pin-file", pin_file(), "--state-dir",
                                dir_ / "state"};
  for (auto& a : TestStoreArgs()) args.push_back(std::move(a));
  auto r = RunCustody(args, o);
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

RunResult RunProgram(const std::string& path, const std::vector<std::string>& args, const RunOptions& options) {
  TempDir io;
  std::string in_path = io / "stdin", out_path = io / "stdout", err_path = io / "stderr";
  WriteFile(in_path, options.stdin_data);

  std::vector<std::string> env_strings;
  // A minimal environment: the test decides what the child sees.
  if (const char* p = std::getenv("PATH")) env_strings.push_back(std::string("PATH=") + p);
  // Sanitizer options pass through so ASan builds behave the same in children.
  // (Unless the test sets them itself: getenv would find the first.)
  for (const char* k : {"ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "TSAN_OPTIONS"}) {
    if (options.env.count(k) != 0) continue;
    if (const char* v = std::getenv(k)) env_strings.push_back(std::string(k) + "=" + v);
  }
  for (const auto& [k, v] : options.env) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_strings{path};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : argv_strings) argv.push_back(s.data());
  argv.push_back(nullptr);

  pid_t pid = ::fork();
  if (pid == 0) {
    int in = ::open(in_path.c_str(), O_RDONLY);
    int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int err = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(in, 0);
    ::dup2(out, 1);
    ::dup2(err, 2);
    // Close everything else except what the test passes on (--pin-fd).
    for (int fd = 3; fd < 1024; ++fd) {
      bool keep = false;
      for (int k : options.keep_fds) keep = keep || k == fd;
      if (!keep) ::close(fd);
    }
    ::execve(path.c_str(), argv.data(), envp.data());
    ::_exit(127);
  }
  int status = 0;
  RunResult r;
  const auto started = std::chrono::steady_clock::now();
  if (options.kill_after) {
    // Without kill_after_stderr the clock starts now; with it, once the
    // child has written that text to stderr.
    std::optional<std::chrono::steady_clock::time_point> deadline;
    if (options.kill_after_stderr.empty()) deadline = started + *options.kill_after;
    for (;;) {
      pid_t w = ::waitpid(pid, &status, WNOHANG);
      if (w == pid) break;
      if (!deadline && ReadFile(err_path).find(options.kill_after_stderr) != std::string::npos) {
        const auto seen = std::chrono::steady_clock::now();
        r.stderr_seen_after = std::chrono::duration_cast<std::chrono::microseconds>(seen - started);
        deadline = seen + *options.kill_after;
      }
      if (deadline && std::chrono::steady_clock::now() >= *deadline) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  } else {
    ::waitpid(pid, &status, 0);
  }
  r.elapsed = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = ReadFile(out_path);
  r.err = ReadFile(err_path);
  return r;
}

// Bound and released: the window in which another process can take it is small.
int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  ::close(fd);
  return port;
}

namespace {
// Whether swtpm answers on its control channel: CMD_GET_CAPABILITY (1)
// gets a reply. A connect alone would succeed through the listen backlog
// before swtpm runs, since the sockets are bound before it starts.
bool ControlAnswers(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = false;
  const uint8_t cmd[4] = {0, 0, 0, 1};
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::write(fd, cmd, sizeof cmd) == 4) {
    pollfd p{fd, POLLIN, 0};
    uint8_t reply[16];
    ok = ::poll(&p, 1, 100) == 1 && ::read(fd, reply, sizeof reply) >= 4;
  }
  ::close(fd);
  return ok;
}
}  // namespace

namespace {
// A socket listening on 127.0.0.1:port (0: the kernel picks), or -1.
int Listening(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 16) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

int PortOf(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) return 0;
  return ntohs(a.sin_port);
}
}  // namespace

bool InCi() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && *ci != '\0' && std::string_view(ci) != "false" && std::string_view(ci) != "0";
}

Swtpm::Swtpm(const SwtpmOptions& options) {
  const char* bin = "/usr/bin/swtpm";
  if (::access(bin, X_OK) != 0) {
    why_not_ = "swtpm is not installed (apt-get install swtpm swtpm-tools tpm2-tools, or run ci/install-deps.sh)";
    return;
  }
  if (options.ek_certificate) {
    // A local CA of this test's own (swtpm_localca creates its root and
    // issuer on first use), never the system's /var/lib/swtpm-localca.
    std::ofstream(ca_ / "localca.conf") << "statedir = " << ca_.path() << "\nsigningkey = " << (ca_ / "signkey.pem")
                                        << "\nissuercert = " << (ca_ / "issuercert.pem")
                                        << "\ncertserial = " << (ca_ / "certserial") << "\n";
    std::ofstream(ca_ / "localca.options") << "--platform-manufacturer custody-test\n--platform-version 2.1\n"
                                              "--platform-model swtpm\n";
    std::ofstream(ca_ / "setup.conf") << "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = "
                                      << (ca_ / "localca.conf") << "\ncreate_certs_tool_options = "
                                      << (ca_ / "localca.options") << "\nactive_pcr_banks = sha256\n";
    auto r = RunProgram("/usr/bin/swtpm_setup",
                        {"--tpm2", "--tpmstate", dir_.path(), "--create-ek-cert", "--config", ca_ / "setup.conf",
                         "--pcr-banks", "sha256", "--overwrite"},
                        {});
    std::ofstream(ca_ / "ek-ca.pem") << ReadFile(ca_ / "swtpm-localca-rootca-cert.pem")
                                     << ReadFile(ca_ / "issuercert.pem");
    if (r.exit_code != 0) {
      why_not_ = "swtpm_setup --create-ek-cert failed: " + r.out + r.err;
      return;
    }
  }
  // The swtpm TCTI finds the control channel at port + 1. The control
  // socket is bound and listening here and handed to swtpm as a descriptor
  // (--ctrl fd=), so it is ours for certain and the readiness probe below
  // can only reach our own swtpm. The command port swtpm binds itself
  // (--server fd= would take a connected socket, not a listening one): if
  // another test took it in the meantime, swtpm exits and we try again with
  // other ports, instead of skipping.
  for (int attempt = 0; attempt < 20 && pid_ < 0; ++attempt) {
    int probe = Listening(0);
    const int port = probe < 0 ? 0 : PortOf(probe);
    if (probe >= 0) ::close(probe);
    if (port <= 0 || port >= 65535) continue;
    Launch(port);
  }
  if (pid_ < 0) why_not_ = "swtpm did not start (20 tries)";
}

bool Swtpm::Launch(int port) {
  const char* bin = "/usr/bin/swtpm";
  int ctrl_fd = Listening(port + 1);
  if (ctrl_fd < 0) return false;
  port_ = port;
  std::string state = "dir=" + std::string(dir_.path());
  constexpr int kCtrlFd = 3;
  std::string server = "type=tcp,port=" + std::to_string(port_) + ",bindaddr=127.0.0.1";
  std::string control = "type=tcp,fd=" + std::to_string(kCtrlFd);
  pid_t pid = ::fork();
  if (pid == 0) {
    int null = ::open("/dev/null", O_RDWR);
    ::dup2(null, 0);
    ::dup2(null, 1);
    ::dup2(null, 2);
    // dup2 clears FD_CLOEXEC: swtpm keeps the listening control socket.
    int c = ::fcntl(ctrl_fd, F_DUPFD, 10);
    ::dup2(c, kCtrlFd);
    ::execl(bin, "swtpm", "socket", "--tpm2", "--tpmstate", state.c_str(), "--server", server.c_str(), "--ctrl",
            control.c_str(), "--flags", "not-need-init,startup-clear", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(ctrl_fd);
  if (pid < 0) return false;
  bool exited = false;
  for (int i = 0; i < 100 && !exited; ++i) {
    if (::waitpid(pid, nullptr, WNOHANG) == pid) {
      exited = true;  // its command port was taken: try other ports
    } else if (ControlAnswers(port_ + 1)) {
      // swtpm binds its command port before it serves the control
      // channel, and exits when it cannot: still running means bound.
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (::waitpid(pid, nullptr, WNOHANG) == pid) {
        exited = true;
      } else {
        pid_ = pid;
        return true;
      }
    }
  }
  if (!exited) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  return false;
}

void Swtpm::Kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

bool Swtpm::Restart() {
  Kill();
  // The ports may take a moment to be free again.
  for (int attempt = 0; attempt < 50; ++attempt) {
    if (Launch(port_)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

Swtpm::~Swtpm() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  for (int i = 0; i < 100; ++i) {
    if (::waitpid(pid_, nullptr, WNOHANG) == pid_) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
}

RunResult RunCustody(const std::vector<std::string>& args, const RunOptions& options) {
  return RunProgram(CUSTODY_BIN, args, options);
}

}  // namespace custody::test
