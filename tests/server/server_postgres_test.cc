// custodyd on the PostgreSQL store, with a PostgreSQL server of the test's
// own (so the test can restart it, make it read-only and read its log):
// values never reach the database or its log in plain text; a database
// restart under load gives 503 with Retry-After and no hung request, and
// serving resumes by itself; a read-only database refuses puts with a clear
// line while the audit log records the refusal.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "../support/pg_server.h"
#include "../support/server_fixture.h"
#include "custody/client/client.h"

namespace custody::test {
namespace {

using nlohmann::json;

class PostgresServerTest : public ServerTest {
 protected:
  void SetUp() override {
    std::string why;
    pg_.reset(PgServer::StartNew(&why));
    if (!pg_) {
      if (InCi()) FAIL() << "PostgreSQL is required in CI: " << why;
      GTEST_SKIP() << "PostgreSQL test skipped: " << why;
    }
    url_ = pg_->NewDatabase();
    db_ = url_.substr(url_.find("dbname=") + 7);
    db_ = db_.substr(0, db_.find(' '));
    BeforeInit();
    ServerTest::SetUp();
  }
  void Init() override {
    auto r = RunCustody({"init", "--module", SoftHsmToken::kModule, "--token", token_.uri(), "--pin-file",
                         token_.pin_file(), "--state-dir", token_.dir() / "state", "--store", url_},
                        {.env = token_.CliEnv()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  virtual void BeforeInit() {}

  // Audit records of `action` by result ("ok", "error", ...).
  std::map<std::string, size_t> AuditResults(const std::string& action) {
    auto r = Cli({"--json", "audit", "show", "--action", action});
    std::map<std::string, size_t> out;
    json all = json::parse(r.out, nullptr, false);
    if (!all.is_array()) {
      ADD_FAILURE() << "audit show: " << r.out << r.err;
      return out;
    }
    for (const auto& rec : all) ++out[rec.value("result", "?")];
    return out;
  }

  std::unique_ptr<PgServer> pg_;
  std::string url_, db_;
};

// Every file under `dir` (the database's data folder), concatenated.
std::string AllFiles(const std::string& dir) {
  std::string all;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    std::ifstream in(e.path(), std::ios::binary);
    all.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return all;
}

class PlaintextPostgresServerTest : public PostgresServerTest {
 protected:
  // Every statement and its parameters in the server log, from the start.
  void BeforeInit() override {
    pg_->Sql("postgres", "ALTER SYSTEM SET log_statement = 'all'");
    pg_->Sql("postgres", "ALTER SYSTEM SET log_min_duration_statement = 0");
    pg_->Sql("postgres", "SELECT pg_reload_conf()");
  }
};

TEST_F(PlaintextPostgresServerTest, ValuesNeverReachTheDatabaseOrItsLogInPlainText) {
  // One value stored in direct mode (the set-up), one through custodyd, and
  // both read back through custodyd.
  const std::string second = "sk-live-SECOND-VALUE-9f8e7d6c5b4a3210";
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c.ok());
  auto put = c->Put("payments/dev/db", SecretBuffer::Copy(std::string_view(second)));
  ASSERT_TRUE(put.ok()) << put.error().message();
  auto a = c->Get("payments/prod/stripe");
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->value.RevealString(SecretAccess{}), kSecret);
  auto b = c->Get("payments/dev/db");
  ASSERT_TRUE(b.ok()) << b.error().message();
  EXPECT_EQ(b->value.RevealString(SecretAccess{}), second);
  pg_->Sql(db_, "CHECKPOINT");  // the rows in the table files, not only the WAL

  const std::string log = ReadFile(pg_->log_path());
  // The log did record the statements and their parameters: the check below
  // can see what reaches the server.
  EXPECT_NE(log.find("INSERT INTO secret_versions"), std::string::npos) << "log_statement = 'all' took effect";
  EXPECT_NE(log.find("parameters: $1 = "), std::string::npos);
  const std::string data = AllFiles(pg_->data_dir());
  EXPECT_NE(data.find("stripe"), std::string::npos) << "the secret's row is in the data folder";
  for (const std::string& value : {std::string(kSecret), second}) {
    EXPECT_EQ(log.find(value), std::string::npos) << "a value is in PostgreSQL's log";
    EXPECT_EQ(data.find(value), std::string::npos) << "a value is in PostgreSQL's data folder";
  }
}

// PostgreSQL crashes and restarts while four clients keep asking: each
// request either gets its value, with one audit record, or a 503 with
// Retry-After; none hangs; once the database is back, custodyd serves again
// by itself, and a put acknowledged before the crash is there.
TEST_F(PostgresServerTest, ADatabaseRestartUnderLoadGives503AndServingResumes) {
  const auto ok_before = AuditResults("secret.get")["ok"];
  std::atomic<bool> stop{false};
  std::atomic<int> served{0}, unavailable{0}, without_retry_after{0}, other{0}, served_after_restart{0};
  std::atomic<bool> restarted{false};
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&] {
      auto c = client::Client::Connect("unix:" + socket_);
      if (!c.ok()) {
        ++other;
        return;
      }
      while (!stop.load()) {
        auto f = c->Get("payments/prod/stripe");
        if (f.ok() && f->value.RevealString(SecretAccess{}) == kSecret) {
          ++served;
          if (restarted.load()) ++served_after_restart;
        } else if (!f.ok() && f.error().category() == Category::kUnavailable) {
          ++unavailable;
          if (!f.error().retry_after()) ++without_retry_after;
        } else {
          ++other;
          ADD_FAILURE() << (f.ok() ? std::string("a wrong value") : f.error().message());
        }
      }
    });
  }
  auto wait_for = [&](const std::function<bool()>& done) {
    for (int i = 0; i < 300 && !done(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  };
  wait_for([&] { return served.load() >= 20; });
  // A put acknowledged just before the database goes down must be there
  // after it comes back.
  const std::string acked = "acknowledged-before-the-crash";
  auto writer = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(writer.ok());
  auto put = writer->Put("payments/dev/db", SecretBuffer::Copy(std::string_view(acked)));
  ASSERT_TRUE(put.ok()) << put.error().message();
  pg_->Stop(/*immediate=*/true);  // as a crash: SIGQUIT, crash recovery at the next start
  wait_for([&] { return unavailable.load() >= 8; });
  std::string why;
  ASSERT_TRUE(pg_->Start(&why)) << why;
  restarted = true;
  wait_for([&] { return served_after_restart.load() >= 20; });
  stop = true;
  for (auto& t : clients) t.join();  // a hung request would hang here (CTest's timeout)

  EXPECT_GE(unavailable.load(), 8) << "the outage was seen";
  EXPECT_EQ(without_retry_after.load(), 0) << "every 503 said when to ask again";
  EXPECT_GE(served_after_restart.load(), 20) << "serving resumed without a restart of custodyd";
  EXPECT_EQ(other.load(), 0);
  auto back = writer->Get("payments/dev/db");
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->value.RevealString(SecretAccess{}), acked) << "the acknowledged put survived the crash";
  EXPECT_EQ(back->version, *put);
  // Exactly one audit record for each value given out.
  // (+1: the read-back of the acknowledged put just above.)
  EXPECT_EQ(AuditResults("secret.get")["ok"], ok_before + static_cast<size_t>(served.load()) + 1);
  auto verify = Cli({"audit", "verify"});
  EXPECT_EQ(verify.exit_code, 0) << verify.out << verify.err;
}

// The database down at start: the CLI and custodyd each say so in one line
// naming the server and libpq's reason, exit 69, and write nothing (the
// audit trail is as it was once the database is back).
TEST_F(PostgresServerTest, AnUnreachableDatabaseAtStartIs69AndWritesNothing) {
  ASSERT_EQ(StopWithin(pid_, 30), std::optional<int>(0)) << "custodyd stops cleanly first";
  const size_t before = TrailRecords(token_.config_path()).size();
  pg_->Stop();
  const std::string names = "cannot connect to the store (postgresql host " + pg_->dir() + " port 5432 database " + db_ + ")";
  auto list = Cli({"secret", "list"});
  EXPECT_EQ(list.exit_code, 69) << list.err;
  EXPECT_NE(list.err.find(names), std::string::npos) << list.err;
  EXPECT_NE(list.err.find("No such file or directory"), std::string::npos) << "libpq's reason: " << list.err;
  EXPECT_EQ(std::count(list.err.begin(), list.err.end(), '\n'), 1) << "one line: " << list.err;
  auto get = Cli({"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(get.exit_code, 69) << get.err;
  EXPECT_EQ(get.out, "") << "no value";
  auto daemon = RunProgram(CUSTODYD_BIN, {}, {.env = token_.CliEnv()});
  EXPECT_EQ(daemon.exit_code, 69) << daemon.err;
  EXPECT_NE(daemon.err.find(names), std::string::npos) << daemon.err;
  std::string why;
  ASSERT_TRUE(pg_->Start(&why)) << why;
  EXPECT_EQ(TrailRecords(token_.config_path()).size(), before) << "nothing was written to the audit trail";
}

class ReadOnlyPostgresServerTest : public PostgresServerTest {
 protected:
  // After the set-up's puts, before custodyd starts: every new session is
  // read-only, as on a standby or a database set read-only by its operator.
  void BeforeStart() override {
    pg_->Sql("postgres", "ALTER DATABASE " + db_ + " SET default_transaction_read_only = on");
  }
};

// A read-only database (a standby, or one its operator set read-only) can
// take neither a write nor an audit record: custodyd refuses every request
// with 503 naming why (no value leaves without its record), health says the
// audit trail is failing, and the CLI refuses alike in one line.
TEST_F(ReadOnlyPostgresServerTest, EveryRequestIs503WithTheReasonAndNoValueLeaves) {
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c.ok());
  auto put = c->Put("payments/dev/db", SecretBuffer::Copy(std::string_view("value-x")));
  ASSERT_FALSE(put.ok());
  EXPECT_EQ(put.error().category(), Category::kUnavailable) << "503";
  EXPECT_NE(put.error().message().find("read-only"), std::string::npos) << put.error().message();
  auto f = c->Get("payments/prod/stripe");
  ASSERT_FALSE(f.ok()) << "a value was handed out with no audit record";
  EXPECT_EQ(f.error().category(), Category::kUnavailable) << f.error().message();
  EXPECT_NE(f.error().message().find("read-only"), std::string::npos) << f.error().message();
  std::string health;
  for (int i = 0; i < 50 && health.find("failing:") == std::string::npos; ++i) {
    health = Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  }
  EXPECT_NE(health.find("503"), std::string::npos) << health;
  EXPECT_NE(health.find("\"audit\":\"failing: audit trail in store"), std::string::npos) << health;
  // And in direct mode the same refusal.
  auto direct = Cli({"secret", "put", "payments/dev/db"}, "value-x\n");
  EXPECT_EQ(direct.exit_code, 69) << direct.err;
  EXPECT_NE(direct.err.find("read-only"), std::string::npos) << direct.err;
  EXPECT_EQ(std::count(direct.err.begin(), direct.err.end(), '\n'), 1) << "one line: " << direct.err;
  // Writable again: the same node serves without a restart.
  pg_->Sql("postgres", "ALTER DATABASE " + db_ + " SET default_transaction_read_only = off");
  pg_->Sql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '" + db_ + "'");
  Result<client::Fetched> again = Error(Category::kUnavailable, "not tried");
  for (int i = 0; i < 50 && !again.ok(); ++i) {
    auto c2 = client::Client::Connect("unix:" + socket_);
    if (c2.ok()) again = c2->Get("payments/prod/stripe");
    if (!again.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(again.ok()) << again.error().message();
  EXPECT_EQ(again->value.RevealString(SecretAccess{}), kSecret);
}

}  // namespace
}  // namespace custody::test
