// The PostgreSQL store's read cache (custodyd's, Store::EnableReadCache):
// a GET read again costs no statement, and yet no change made through any
// other process stays unseen: its notification empties the cache, a write
// through the process itself empties it before returning, and a lost
// listening connection stops the cache until it listens again.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "../support/pg_server.h"
#include "../support/testenv.h"
#include "custody/store/postgres_store.h"
#include "custody/store/store.h"

namespace custody::core {
namespace {

using namespace std::chrono_literals;

KekRef Kek(uint8_t seed) {
  KekRef k;
  k.id.fill(seed);
  k.version = 1;
  return k;
}

class PostgresReadCache : public ::testing::Test {
 protected:
  void SetUp() override {
    pg_ = test::PgServer::Shared();
    CUSTODY_REQUIRE_PG(pg_);
    url_ = pg_->NewDatabase();
    db_ = test::PgServer::DatabaseOf(url_);
    auto a = OpenPostgresStore(url_, true);
    ASSERT_TRUE(a.ok()) << a.error().message();
    served_ = std::move(*a);
    auto b = OpenPostgresStore(url_, false);
    ASSERT_TRUE(b.ok()) << b.error().message();
    other_ = std::move(*b);
    auto p = other_->CreateProject("payments", {"prod"}, Kek(1), "l");
    ASSERT_TRUE(p.ok()) << p.error().message();
    auto env = other_->FindEnvironment("payments", "prod");
    ASSERT_TRUE(env.ok());
    env_ = *env;
    auto kek = other_->CurrentKek(p->id);
    ASSERT_TRUE(kek.ok());
    kek_id_ = kek->id;
    ASSERT_TRUE(other_->AddVersion(env_.id, "stripe", 1, kek_id_, {1, 1}, 1000).ok());
    served_->EnableReadCache();
  }

  // The current version as the serving store reads it, or 0 if it fails.
  uint32_t Current() {
    auto in = served_->ReadForUnseal("payments", "prod", "stripe", std::nullopt);
    return in.ok() ? in->version.version : 0;
  }

  // Waits (bounded) until the serving store reads `want`.
  bool ReadsWithin(uint32_t want, std::chrono::seconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < until) {
      if (Current() == want) return true;
      std::this_thread::sleep_for(5ms);
    }
    return Current() == want;
  }

  // Waits until the cache's listening connection is up (it is a backend
  // that ran LISTEN or its heartbeat).
  bool ListenerUp(std::chrono::seconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < until) {
      if (pg_->Sql(db_, "SELECT count(*) FROM pg_stat_activity WHERE datname = '" + db_ +
                            "' AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')") != "0\n") {
        return true;
      }
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }

  test::PgServer* pg_ = nullptr;
  std::string url_, db_;
  std::unique_ptr<Store> served_, other_;
  EnvironmentRecord env_;
  int64_t kek_id_ = 0;
};

// Once read, a GET is answered without a statement: it is answered while
// another session holds every version row locked against reading.
TEST_F(PostgresReadCache, AReadAgainIsAnsweredWithoutTheDatabase) {
  ASSERT_TRUE(ListenerUp(10s));
  ASSERT_EQ(Current(), 1u);  // read once: kept
  std::thread locker([&] {
    pg_->TrySql(db_, "SET application_name = 'locker'; BEGIN; LOCK TABLE secret_versions IN ACCESS EXCLUSIVE MODE; "
                  "SELECT pg_sleep(60); COMMIT");
  });
  auto locked = [&] {
    return pg_->Sql(db_, "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = "
                         "'secret_versions' AND l.mode = 'AccessExclusiveLock' AND l.granted") == "1\n";
  };
  for (int i = 0; i < 500 && !locked(); ++i) std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(locked());
  auto in = served_->ReadForUnseal("payments", "prod", "stripe", std::nullopt);
  const bool still_locked = locked();
  pg_->Sql(db_, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'locker'");
  locker.join();
  ASSERT_TRUE(in.ok()) << in.error().message();
  EXPECT_EQ(in->version.version, 1u);
  EXPECT_EQ(in->version.blob, (std::vector<uint8_t>{1, 1}));
  EXPECT_TRUE(still_locked) << "the read waited for the lock: it went to the database";
}

// A change through another process (another node) is read once its
// notification arrives; a revoke too; and a write through the serving
// store itself is read at once.
TEST_F(PostgresReadCache, ChangesFromAnyProcessAreReadAndOwnWritesAtOnce) {
  ASSERT_TRUE(ListenerUp(10s));
  ASSERT_EQ(Current(), 1u);
  ASSERT_TRUE(other_->AddVersion(env_.id, "stripe", 2, kek_id_, {2}, 1001).ok());
  EXPECT_TRUE(ReadsWithin(2, 5s)) << "a put through another process was not seen";
  ASSERT_TRUE(other_->RevokeVersion(env_, "stripe", 2, "leaked", "user:t", 1002).ok());
  EXPECT_TRUE(ReadsWithin(1, 5s)) << "a revoke through another process was not seen";
  // Through the serving store: no wait at all.
  ASSERT_TRUE(served_->AddVersion(env_.id, "stripe", 3, kek_id_, {3}, 1003).ok());
  EXPECT_EQ(Current(), 3u);
  ASSERT_TRUE(served_->RevokeVersion(env_, "stripe", 3, "leaked", "user:t", 1004).ok());
  EXPECT_EQ(Current(), 1u);
  // A version read by number is dropped as well once it is revoked.
  auto v1 = served_->ReadForUnseal("payments", "prod", "stripe", 1u);
  ASSERT_TRUE(v1.ok());
  EXPECT_FALSE(v1->version.revoked_at.has_value());
  ASSERT_TRUE(other_->RevokeVersion(env_, "stripe", 1, "leaked", "user:t", 1005).ok());
  bool seen = false;
  for (int i = 0; i < 1000 && !seen; ++i) {
    auto again = served_->ReadForUnseal("payments", "prod", "stripe", 1u);
    seen = again.ok() && again->version.revoked_at.has_value();
    if (!seen) std::this_thread::sleep_for(5ms);
  }
  EXPECT_TRUE(seen) << "version 1 still read as not revoked";
  // A delete through another process: the secret is gone for the reader.
  ASSERT_TRUE(other_->DeleteSecret(env_, "stripe").ok());
  bool gone = false;
  for (int i = 0; i < 1000 && !gone; ++i) {
    auto again = served_->ReadForUnseal("payments", "prod", "stripe", 1u);
    gone = !again.ok() && again.error().category() == Category::kNotFound;
    if (!gone) std::this_thread::sleep_for(5ms);
  }
  EXPECT_TRUE(gone) << "a deleted secret was still read";
}

// The listening connection killed (as a database restart or a network
// fault would): the cache stops, the listener comes back by itself, and a
// change made after that is seen.
TEST_F(PostgresReadCache, ALostListenerIsReplacedAndChangesAfterItAreSeen) {
  ASSERT_TRUE(ListenerUp(10s));
  ASSERT_EQ(Current(), 1u);
  const std::string pids = pg_->Sql(
      db_, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '" + db_ +
               "' AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')");
  ASSERT_EQ(pids, "t\n") << "no listening connection was found to end";
  // Reads go on (from the database) while the listener is away.
  EXPECT_EQ(Current(), 1u);
  ASSERT_TRUE(ListenerUp(20s)) << "the listener did not come back";
  ASSERT_EQ(Current(), 1u);
  ASSERT_TRUE(other_->AddVersion(env_.id, "stripe", 2, kek_id_, {2}, 1001).ok());
  EXPECT_TRUE(ReadsWithin(2, 5s));
}

}  // namespace
}  // namespace custody::core
