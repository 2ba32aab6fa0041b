// A real PostgreSQL 15 server for the tests of one process: initdb into a
// temporary folder, postgres listening only on a Unix socket in that folder
// (no TCP port), run as an unprivileged user when the tests run as root
// (PostgreSQL refuses root), and stopped when the process ends; if the test
// process dies, the server gets SIGQUIT from the kernel (parent-death
// signal) and stops too. Each test takes a fresh database of its own.
//
//   auto* pg = custody::test::PgServer::Shared();
//   CUSTODY_REQUIRE_PG(pg);
//   std::string url = pg->NewDatabase();   // "host=/tmp/... port=5432 dbname=t1 user=custody"
//
// When PostgreSQL is not installed, Shared() is null and the test must skip
// (CUSTODY_REQUIRE_PG); in CI (test::InCi()) it fails instead.
#pragma once

#include <string>

namespace custody::test {

class PgServer {
 public:
  // The process's server, started on first use; null if it cannot start
  // (WhyNot() says why).
  static PgServer* Shared();
  static const std::string& WhyNot();
  // A server of the caller's own (the restart test stops and starts it).
  static PgServer* StartNew(std::string* why_not);
  ~PgServer();
  PgServer(const PgServer&) = delete;
  PgServer& operator=(const PgServer&) = delete;

  // A new empty database, as a libpq connection string custody accepts.
  std::string NewDatabase();
  // The connection string of database `db` on this server, and back.
  std::string Url(const std::string& db) const;
  static std::string DatabaseOf(const std::string& url);
  const std::string& dir() const { return dir_; }
  std::string log_path() const { return dir_ + "/server.log"; }
  std::string data_dir() const { return dir_ + "/data"; }
  // Runs SQL as the superuser (through psql); returns psql's stdout, and
  // fails the test on an error.
  std::string Sql(const std::string& db, const std::string& sql) const;
  // The same, but an error is the caller's to judge: psql's exit code.
  int TrySql(const std::string& db, const std::string& sql) const;

  // Stops the server: `immediate` as a crash would (SIGQUIT), else a fast
  // shutdown (SIGINT, which ends every session). Start() brings it back on
  // the same data and socket.
  void Stop(bool immediate = false);
  bool Start(std::string* why_not = nullptr);
  bool running() const { return pid_ > 0; }

 private:
  PgServer() = default;
  bool Init(std::string* why_not);
  std::string dir_;
  std::string bindir_;
  int pid_ = -1;
  int owner_pid_ = -1;  // a forked child never stops its parent's server
  int databases_ = 0;
};

}  // namespace custody::test

#define CUSTODY_REQUIRE_PG(pg)                                                                  \
  do {                                                                                          \
    if ((pg) == nullptr) {                                                                      \
      if (::custody::test::InCi()) FAIL() << "PostgreSQL is required in CI: " << ::custody::test::PgServer::WhyNot(); \
      GTEST_SKIP() << "PostgreSQL test skipped: " << ::custody::test::PgServer::WhyNot();       \
    }                                                                                           \
  } while (0)
