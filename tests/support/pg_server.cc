#include "pg_server.h"

#include <fcntl.h>
#include <grp.h>
#include <libpq-fe.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "testenv.h"

namespace custody::test {
namespace {

// nobody: PostgreSQL will not run as root, and the tests usually do (CI).
constexpr uid_t kUnprivileged = 65534;

std::string FindBindir() {
  if (const char* d = std::getenv("CUSTODY_PG_BINDIR")) return d;
  std::string best;
  int best_major = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/usr/lib/postgresql", ec)) {
    const int major = std::atoi(e.path().filename().c_str());
    if (major > best_major && std::filesystem::exists(e.path() / "bin/initdb")) {
      best_major = major;
      best = (e.path() / "bin").string();
    }
  }
  return best;
}

// In a forked child: become the unprivileged user if root.
void DropPrivileges() {
  if (::geteuid() != 0) return;
  if (::setgroups(0, nullptr) != 0 || ::setgid(kUnprivileged) != 0 || ::setuid(kUnprivileged) != 0) ::_exit(126);
}

// Runs argv[0] as the unprivileged user with output to `log`; its exit code.
int RunAs(const std::vector<std::string>& args, const std::string& log) {
  pid_t pid = ::fork();
  if (pid == 0) {
    DropPrivileges();
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::unique_ptr<PgServer>& SharedSlot() {
  static std::unique_ptr<PgServer> shared;
  return shared;
}
std::string& SharedWhyNot() {
  static std::string why;
  return why;
}

}  // namespace

PgServer* PgServer::Shared() {
  static bool tried = false;
  if (!tried) {
    tried = true;
    // CUSTODY_TEST_PG_DIR, or CUSTODY_TEST_STORE=postgres:DIR (the CTest
    // `postgres` variants).
    std::string shared_dir;
    if (const char* d = std::getenv("CUSTODY_TEST_PG_DIR"); d != nullptr) shared_dir = d;
    if (const char* st = std::getenv("CUSTODY_TEST_STORE"); st != nullptr && shared_dir.empty() &&
                                                            std::string_view(st).starts_with("postgres:")) {
      shared_dir = std::string(st).substr(9);
    }
    if (!shared_dir.empty()) {
      const char* dir = shared_dir.c_str();
      // The run's shared server (tests/support/pg_test_server.sh): used,
      // never stopped, from here.
      std::unique_ptr<PgServer> s(new PgServer());
      s->dir_ = dir;
      s->bindir_ = FindBindir();
      if (PQping(s->Url("postgres").c_str()) == PQPING_OK) {
        SharedSlot() = std::move(s);
      } else {
        SharedWhyNot() = std::string("CUSTODY_TEST_PG_DIR=") + dir + " names no running server";
      }
    } else {
      SharedSlot().reset(StartNew(&SharedWhyNot()));
    }
  }
  return SharedSlot().get();
}

const std::string& PgServer::WhyNot() { return SharedWhyNot(); }

PgServer* PgServer::StartNew(std::string* why_not) {
  std::unique_ptr<PgServer> s(new PgServer());
  if (!s->Init(why_not) || !s->Start(why_not)) return nullptr;
  return s.release();
}

bool PgServer::Init(std::string* why_not) {
  owner_pid_ = ::getpid();
  bindir_ = FindBindir();
  if (bindir_.empty()) {
    *why_not = "no PostgreSQL server under /usr/lib/postgresql (install postgresql: ci/install-deps.sh)";
    return false;
  }
  char tmpl[] = "/tmp/custody-pg-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) {
    *why_not = "mkdtemp failed";
    return false;
  }
  dir_ = tmpl;
  if (::geteuid() == 0 && ::chown(dir_.c_str(), kUnprivileged, kUnprivileged) != 0) {
    *why_not = "cannot hand " + dir_ + " to uid 65534";
    return false;
  }
  // --no-sync: a test cluster need not survive a power cut at creation.
  int rc = RunAs({bindir_ + "/initdb", "-D", data_dir(), "--no-locale", "-E", "UTF8", "-U", "custody", "--auth=trust",
                  "--no-sync"},
                 dir_ + "/initdb.log");
  if (rc != 0) {
    *why_not = "initdb failed (exit " + std::to_string(rc) + "): " + ReadFile(dir_ + "/initdb.log");
    return false;
  }
  return true;
}

bool PgServer::Start(std::string* why_not) {
  std::string ignored;
  if (why_not == nullptr) why_not = &ignored;
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    DropPrivileges();
    // The server goes when the test process goes, however it ends.
    ::prctl(PR_SET_PDEATHSIG, SIGQUIT);
    if (::getppid() != parent) ::_exit(0);
    int fd = ::open(log_path().c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::string postgres = bindir_ + "/postgres";
    std::string data = data_dir();
    const char* argv[] = {postgres.c_str(), "-D", data.c_str(), "-k", dir_.c_str(), "-c", "listen_addresses=",
                          "-c", "port=5432", "-c", "max_connections=200", "-c", "shared_buffers=16MB",
                          // As tests/support/pg_test_server.sh: the tests
                          // crash processes, never the machine, and commits
                          // still write their WAL to the kernel.
                          "-c", "fsync=off", "-c", "full_page_writes=off", nullptr};
    ::execv(argv[0], const_cast<char* const*>(argv));
    ::_exit(127);
  }
  pid_ = pid;
  const std::string ping = Url("postgres");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (PQping(ping.c_str()) == PQPING_OK) return true;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      *why_not = "postgres exited at start: " + ReadFile(log_path());
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  *why_not = "postgres did not accept connections within 30 s: " + ReadFile(log_path());
  Stop(true);
  return false;
}

void PgServer::Stop(bool immediate) {
  if (pid_ <= 0 || ::getpid() != owner_pid_) return;
  ::kill(pid_, immediate ? SIGQUIT : SIGINT);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

PgServer::~PgServer() {
  if (owner_pid_ < 0 || ::getpid() != owner_pid_) return;
  Stop(false);
  std::error_code ec;
  if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
}

std::string PgServer::Url(const std::string& db) const {
  return "host=" + dir_ + " port=5432 dbname=" + db + " user=custody";
}

std::string PgServer::NewDatabase() {
  // The pid keeps apart the databases of processes sharing one server.
  const std::string name = "t" + std::to_string(::getpid()) + "_" + std::to_string(++databases_);
  Sql("postgres", "CREATE DATABASE " + name);
  return Url(name);
}

std::string PgServer::DatabaseOf(const std::string& url) {
  const size_t at = url.find("dbname=");
  if (at == std::string::npos) return "";
  const size_t end = url.find(' ', at);
  return url.substr(at + 7, end == std::string::npos ? std::string::npos : end - at - 7);
}

std::string PgServer::Sql(const std::string& db, const std::string& sql) const {
  auto r = RunProgram(bindir_ + "/psql", {"-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", Url(db), "-c", sql}, {});
  EXPECT_EQ(r.exit_code, 0) << "psql: " << sql << ": " << r.err;
  return r.out;
}

int PgServer::TrySql(const std::string& db, const std::string& sql) const {
  return RunProgram(bindir_ + "/psql", {"-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", Url(db), "-c", sql}, {})
      .exit_code;
}

}  // namespace custody::test
