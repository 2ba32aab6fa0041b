// The store's conformance suite: every rule of the Store interface, run on
// each backend (a real SQLite file, a real PostgreSQL 15 server started by
// the test: tests/support/pg_server.h), then what only one backend has.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <thread>

#include "../support/pg_server.h"
#include "../support/testenv.h"
#include "custody/service/authz.h"
#include "custody/service/usage_buffer.h"
#include "custody/store/postgres_store.h"
#include "custody/store/sqlite_store.h"
#include "custody/store/store.h"

namespace custody::core {
namespace {

KekRef Kek(uint8_t seed) {
  KekRef k;
  k.id.fill(seed);
  k.version = 1;
  return k;
}

enum class Backend_ { kSqlite, kPostgres };

// A SQLSTATE as the PostgreSQL store packs it into Error::code().
uint64_t SqlState(std::string_view s) {
  uint64_t v = 0;
  for (char c : s) v = (v << 8) | static_cast<uint8_t>(c);
  return v;
}

class StoreTest : public ::testing::TestWithParam<Backend_> {
 protected:
  void SetUp() override {
    if (GetParam() == Backend_::kPostgres) {
      test::PgServer* pg = test::PgServer::Shared();
      CUSTODY_REQUIRE_PG(pg);
      url_ = pg->NewDatabase();
    }
    auto s = Open(/*create=*/true);
    ASSERT_TRUE(s.ok()) << s.error().message();
    store_ = std::move(*s);
  }
  // Another handle on the same store: another process, as far as the
  // store can tell (its own connections).
  Result<std::unique_ptr<Store>> Open(bool create) {
    return GetParam() == Backend_::kSqlite ? OpenSqliteStore(path_, create) : OpenPostgresStore(url_, create);
  }
  bool sqlite() const { return GetParam() == Backend_::kSqlite; }
  test::TempDir dir_;
  std::string path_ = dir_ / "custody.db";
  std::string url_;
  std::unique_ptr<Store> store_;
};

INSTANTIATE_TEST_SUITE_P(Backends, StoreTest, ::testing::Values(Backend_::kSqlite, Backend_::kPostgres),
                         [](const ::testing::TestParamInfo<Backend_>& i) {
                           return i.param == Backend_::kSqlite ? "SQLite" : "PostgreSQL";
                         });

// What only the SQLite store has (its file, its write lock).
class SqliteStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = OpenSqliteStore(path_, /*create=*/true);
    ASSERT_TRUE(s.ok()) << s.error().message();
    store_ = std::move(*s);
  }
  test::TempDir dir_;
  std::string path_ = dir_ / "custody.db";
  std::unique_ptr<Store> store_;
};

TEST_P(StoreTest, ProjectsEnvironmentsAndKeks) {
  auto p = store_->CreateProject("payments", {"dev", "prod"}, Kek(1), "custody:kek:payments:v1");
  ASSERT_TRUE(p.ok()) << p.error().message();
  auto envs = store_->ListEnvironments("payments");
  ASSERT_TRUE(envs.ok());
  ASSERT_EQ(envs->size(), 2u);
  EXPECT_EQ((*envs)[0].name, "dev");
  auto kek = store_->CurrentKek(p->id);
  ASSERT_TRUE(kek.ok());
  EXPECT_EQ(kek->ref, Kek(1));
  EXPECT_EQ(kek->label, "custody:kek:payments:v1");

  auto dup = store_->CreateProject("payments", {}, Kek(2), "x");
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().category(), Category::kUsage);
  auto dup_env = store_->CreateEnvironment("payments", "prod");
  ASSERT_FALSE(dup_env.ok());
  EXPECT_EQ(dup_env.error().category(), Category::kUsage);
  EXPECT_EQ(store_->CreateEnvironment("nope", "prod").error().category(), Category::kNotFound);
}

TEST_P(StoreTest, AFailedProjectCreationLeavesNothing) {
  // The same environment twice fails inside the transaction: no project, no KEK row.
  auto p = store_->CreateProject("payments", {"prod", "prod"}, Kek(1), "l");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(store_->FindProject("payments").error().category(), Category::kNotFound);
  auto keks = store_->ListKeks();
  ASSERT_TRUE(keks.ok());
  EXPECT_TRUE(keks->empty());
}

// A put's Idempotency-Key is kept with the version it stored, in the same
// transaction: a second put with the key (a retry, or its twin on another
// node) stores nothing and finds that version; the key is per secret, kept
// for a day, and goes with the secret.
TEST_P(StoreTest, APutKeyIsKeptWithItsVersionAndATwinStoresNothing) {
  auto p = store_->CreateProject("payments", {"prod"}, Kek(1), "l");
  ASSERT_TRUE(p.ok());
  auto env = *store_->FindEnvironment("payments", "prod");
  auto kek = *store_->CurrentKek(p->id);
  const std::string key = "0123456789abcdef0123";
  EXPECT_EQ(*store_->VersionForPutKey(env.id, "stripe", key, 1000), std::nullopt) << "a secret that does not exist";
  ASSERT_TRUE(store_->AddVersion(env.id, "stripe", 1, kek.id, {1}, 1000, key).ok());
  EXPECT_EQ(*store_->VersionForPutKey(env.id, "stripe", key, 1000), std::optional<uint32_t>(1));
  Status twin = store_->AddVersion(env.id, "stripe", 2, kek.id, {2}, 1001, key);
  ASSERT_FALSE(twin.ok());
  EXPECT_TRUE(twin.error().version_taken()) << twin.error().message();
  EXPECT_FALSE(store_->GetVersion(env, "stripe", 2).ok()) << "the twin stored a version";
  EXPECT_EQ(*store_->NextVersion(env.id, "stripe"), 2u);
  // Another key on the same secret, and the same key on another secret.
  ASSERT_TRUE(store_->AddVersion(env.id, "stripe", 2, kek.id, {2}, 1002, "another-key-000000").ok());
  ASSERT_TRUE(store_->AddVersion(env.id, "other", 1, kek.id, {3}, 1002, key).ok());
  EXPECT_EQ(*store_->VersionForPutKey(env.id, "other", key, 1002), std::optional<uint32_t>(1));
  // A day later the key is forgotten.
  EXPECT_EQ(*store_->VersionForPutKey(env.id, "stripe", key, 1000 + Store::kPutKeySeconds + 1), std::nullopt);
  // And it goes with its secret.
  ASSERT_TRUE(store_->DeleteSecret(env, "other").ok());
  EXPECT_EQ(*store_->VersionForPutKey(env.id, "other", key, 1002), std::nullopt);
}

// Access tokens (the Vault-compatible API): found by hash, renewed only
// while not revoked, revoked by accessor or by principal, forgotten a day
// after they end.
TEST_P(StoreTest, AccessTokensAreFoundByHashRevokedAndForgotten) {
  const int64_t now = 1'000'000;
  AccessTokenRecord a{"00112233aabbccdd", "svc:web", "user:root", now, 60, now + 60, now + 600, std::nullopt};
  AccessTokenRecord b{"ffeeddccbbaa9988", "svc:web", "login dns:web", now, 60, now + 60, now + 600, std::nullopt};
  AccessTokenRecord c{"0123456789abcdef", "svc:api", "user:root", now, 60, now + 60, now + 600, std::nullopt};
  ASSERT_TRUE(store_->AddAccessToken(std::string(64, 'a'), a, now).ok());
  ASSERT_TRUE(store_->AddAccessToken(std::string(64, 'b'), b, now).ok());
  ASSERT_TRUE(store_->AddAccessToken(std::string(64, 'c'), c, now).ok());
  auto found = store_->FindAccessToken(std::string(64, 'a'));
  ASSERT_TRUE(found.ok()) << found.error().message();
  EXPECT_EQ(found->accessor, a.accessor);
  EXPECT_EQ(found->principal, "svc:web");
  EXPECT_EQ(found->max_expires_at, now + 600);
  EXPECT_FALSE(found->revoked_at);
  EXPECT_EQ(store_->FindAccessToken(std::string(64, 'd')).error().category(), Category::kNotFound);
  // A second token with the same accessor is refused (accessors are unique).
  EXPECT_FALSE(store_->AddAccessToken(std::string(64, 'e'), a, now).ok());

  ASSERT_TRUE(store_->SetAccessTokenExpiry(std::string(64, 'a'), now + 120).ok());
  EXPECT_EQ(store_->FindAccessToken(std::string(64, 'a'))->expires_at, now + 120);
  // By principal: both of svc:web's, not svc:api's.
  EXPECT_EQ(*store_->RevokeAccessTokens("", "svc:web", now + 5), 2u);
  EXPECT_EQ(store_->FindAccessToken(std::string(64, 'b'))->revoked_at, std::optional<int64_t>(now + 5));
  EXPECT_FALSE(store_->FindAccessToken(std::string(64, 'c'))->revoked_at);
  EXPECT_EQ(store_->SetAccessTokenExpiry(std::string(64, 'a'), now + 999).error().category(), Category::kNotFound)
      << "a revoked token was renewed";
  EXPECT_EQ(*store_->RevokeAccessTokens("", "svc:web", now + 6), 0u) << "revoked twice";
  EXPECT_EQ(*store_->RevokeAccessTokens(c.accessor, "", now + 7), 1u);
  EXPECT_FALSE(store_->RevokeAccessTokens("", "", now).ok());
  EXPECT_EQ(store_->ListAccessTokens()->size(), 3u);
  // A day after they ended, adding another forgets them.
  AccessTokenRecord d{"9999999999999999", "svc:web", "user:root", now + 90000, 60, now + 90060, now + 90600,
                      std::nullopt};
  ASSERT_TRUE(store_->AddAccessToken(std::string(64, 'f'), d, now + 90000).ok());
  auto left = store_->ListAccessTokens();
  ASSERT_EQ(left->size(), 1u);
  EXPECT_EQ(left->front().accessor, d.accessor);
}

TEST_P(StoreTest, VersionsAreSequentialAndATakenVersionIsReported) {
  auto p = store_->CreateProject("payments", {"prod"}, Kek(1), "l");
  ASSERT_TRUE(p.ok());
  auto env = *store_->FindEnvironment("payments", "prod");
  auto kek = *store_->CurrentKek(p->id);
  EXPECT_EQ(*store_->NextVersion(env.id, "stripe"), 1u);
  ASSERT_TRUE(store_->AddVersion(env.id, "stripe", 1, kek.id, {1, 2, 3}, 1000).ok());
  EXPECT_EQ(*store_->NextVersion(env.id, "stripe"), 2u);
  Status taken = store_->AddVersion(env.id, "stripe", 1, kek.id, {9}, 1000);
  ASSERT_FALSE(taken.ok());
  EXPECT_TRUE(taken.error().version_taken()) << taken.error().message();
  EXPECT_EQ(taken.error().code(), sqlite() ? static_cast<uint64_t>(SQLITE_CONSTRAINT_PRIMARYKEY) : SqlState("23505"))
      << "the backend's own code";
  ASSERT_TRUE(store_->AddVersion(env.id, "stripe", 2, kek.id, {4, 5}, 1001).ok());

  auto latest = store_->GetVersion(env, "stripe", std::nullopt);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->version, 2u);
  EXPECT_EQ(latest->blob, (std::vector<uint8_t>{4, 5}));
  EXPECT_EQ(store_->GetVersion(env, "stripe", 1)->blob, (std::vector<uint8_t>{1, 2, 3}));
  auto missing = store_->GetVersion(env, "stripe", 7);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().message(), "secret 'payments/prod/stripe' has no version 7");

  auto list = store_->ListSecrets(std::nullopt, std::nullopt);
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].latest_version, 2u);
  EXPECT_EQ((*list)[0].version_count, 2u);

  ASSERT_TRUE(store_->DeleteSecret(env, "stripe").ok());
  EXPECT_EQ(store_->GetVersion(env, "stripe", std::nullopt).error().category(), Category::kNotFound);
  EXPECT_EQ(store_->DeleteSecret(env, "stripe").error().category(), Category::kNotFound);
}

// A GET's lookup in one read: the environment, the version and its KEK, or
// the error that names what is missing; the connection is left usable.
TEST_P(StoreTest, ReadForUnsealReturnsTheVersionAndItsKekOrNamesWhatIsMissing) {
  auto p = store_->CreateProject("payments", {"prod"}, Kek(1), "l");
  ASSERT_TRUE(p.ok());
  auto env = *store_->FindEnvironment("payments", "prod");
  auto kek = *store_->CurrentKek(p->id);
  ASSERT_TRUE(store_->AddVersion(env.id, "stripe", 1, kek.id, {1}, 1000).ok());
  ASSERT_TRUE(store_->AddVersion(env.id, "stripe", 2, kek.id, {2}, 1001).ok());
  auto in = store_->ReadForUnseal("payments", "prod", "stripe", std::nullopt);
  ASSERT_TRUE(in.ok()) << in.error().message();
  EXPECT_EQ(in->env.id, env.id);
  EXPECT_EQ(in->version.version, 2u);
  EXPECT_EQ(in->version.blob, (std::vector<uint8_t>{2}));
  EXPECT_EQ(in->kek.id, kek.id);
  EXPECT_EQ(in->kek.ref.id, Kek(1).id);
  EXPECT_EQ(store_->ReadForUnseal("payments", "prod", "stripe", 1)->version.blob, (std::vector<uint8_t>{1}));
  auto message = [&](const std::string& project, const std::string& e, const std::string& name,
                     std::optional<uint32_t> v) {
    auto r = store_->ReadForUnseal(project, e, name, v);
    EXPECT_FALSE(r.ok());
    EXPECT_EQ(r.ok() ? Category::kInternal : r.error().category(), Category::kNotFound);
    return r.ok() ? std::string() : r.error().message();
  };
  EXPECT_EQ(message("payments", "prod", "stripe", 7), "secret 'payments/prod/stripe' has no version 7");
  EXPECT_EQ(message("payments", "prod", "none", std::nullopt), "secret 'payments/prod/none' does not exist");
  EXPECT_EQ(message("payments", "dev", "stripe", std::nullopt), "environment 'dev' does not exist in project 'payments'");
  EXPECT_NE(message("nope", "prod", "stripe", std::nullopt).find("nope"), std::string::npos);
  // After refusals, writes on the pooled connections still work.
  ASSERT_TRUE(store_->AddVersion(env.id, "stripe", 3, kek.id, {3}, 1002).ok());
  EXPECT_EQ(store_->ReadForUnseal("payments", "prod", "stripe", std::nullopt)->version.version, 3u);
}

// A destroyed KEK's backend material (for the TPM, its sealed object: the
// SRK can load it again for as long as the bytes exist) must leave the
// files, not only the table: SQLite keeps a deleted value in a free page of
// the database, and the page's older image in the write-ahead log.
TEST_F(SqliteStoreTest, ADestroyedKeksMaterialLeavesTheDatabaseAndItsLog) {
  std::vector<uint8_t> old_material(300), new_material(300);
  for (size_t i = 0; i < old_material.size(); ++i) {
    old_material[i] = static_cast<uint8_t>(0xA5 ^ (i * 7));
    new_material[i] = static_cast<uint8_t>(0x3C ^ (i * 11));
  }
  auto p = store_->CreateProject("payments", {"prod"}, Kek(1), "custody:kek:payments:v1", old_material);
  ASSERT_TRUE(p.ok()) << p.error().message();
  auto first = store_->CurrentKek(p->id);
  ASSERT_TRUE(first.ok());
  KekRef second = Kek(2);
  second.version = 2;
  ASSERT_TRUE(store_->AddKek(p->id, second, "custody:kek:payments:v2", 1, new_material).ok());
  const std::string needle(old_material.begin(), old_material.end());
  auto on_disk = [&] {
    std::string all;
    for (const char* suffix : {"", "-wal"}) {
      if (std::filesystem::exists(path_ + suffix)) all += test::ReadFile(path_ + suffix);
    }
    return all;
  };
  ASSERT_NE(on_disk().find(needle), std::string::npos) << "the check must be able to see the material";
  ASSERT_TRUE(store_->SetKekState(first->id, KekState::kDestroying).ok());
  ASSERT_TRUE(store_->SetKekState(first->id, KekState::kDestroyed).ok());
  EXPECT_EQ(on_disk().find(needle), std::string::npos) << "the destroyed KEK's material is still in the files";
  EXPECT_NE(on_disk().find(std::string(new_material.begin(), new_material.end())), std::string::npos);
  // And it stays gone once the store is closed (which checkpoints the log).
  store_.reset();
  EXPECT_EQ(on_disk().find(needle), std::string::npos);
}

TEST_P(StoreTest, KekReservationsStopAtTheLimit) {
  ASSERT_TRUE(store_->CreateProject("payments", {}, Kek(1), "custody:kek:payments:v1").ok());
  EXPECT_TRUE(store_->Reserve(Kek(1), 6, 10).ok());
  EXPECT_TRUE(store_->Reserve(Kek(1), 4, 10).ok());
  Status over = store_->Reserve(Kek(1), 1, 10);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.error().category(), Category::kLimit);
  EXPECT_NE(over.error().message().find("rotate"), std::string::npos);
  EXPECT_EQ((*store_->ListKeks())[0].encryptions_reserved, 10u);
}

TEST_P(StoreTest, ReopenKeepsDataAndSchemaVersion) {
  ASSERT_TRUE(store_->CreateProject("payments", {"prod"}, Kek(1), "l").ok());
  store_.reset();
  auto again = Open(/*create=*/false);
  ASSERT_TRUE(again.ok()) << again.error().message();
  EXPECT_TRUE((*again)->FindProject("payments").ok());
}

// Store locks: one holder at a time until the lock expires or its holder is
// known to have ended; a holder whose lock was taken over cannot renew it.
// A KEK rotation records its new KEK only while it still holds its lock,
// checked in the recording's own transaction: a run taken over after a
// stall cannot record a KEK the new holder is about to destroy.
TEST_P(StoreTest, AFencedKekIsRecordedOnlyWhileItsLockIsHeld) {
  auto p = store_->CreateProject("payments", {"prod"}, Kek(1), "custody:kek:payments:v1");
  ASSERT_TRUE(p.ok());
  const LockHolder a{"host-a", 100, 7, "boot-a/pidns:1"}, b{"host-b", 200, 9, "boot-b/pidns:1"};
  auto never = [](const LockHolder&) { return false; };
  ASSERT_FALSE(store_->TakeLock("kek-rotate/payments", a, 60, never)->has_value());
  // a stalls past its lock (renewed to a lease already over); b takes it over.
  ASSERT_TRUE(store_->RenewLock("kek-rotate/payments", a, -1).ok());
  ASSERT_FALSE(store_->TakeLock("kek-rotate/payments", b, 60, never)->has_value());
  KekRef v2 = Kek(2);
  v2.version = 2;
  const LockFence stale{"kek-rotate/payments", a, 60}, held{"kek-rotate/payments", b, 60};
  auto refused = store_->AddKek(p->id, v2, "custody:kek:payments:v2", 1101, {}, &stale);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().category(), Category::kUnavailable);
  EXPECT_NE(refused.error().message().find("no longer ours"), std::string::npos) << refused.error().message();
  EXPECT_EQ(store_->CurrentKek(p->id)->ref, Kek(1)) << "nothing was recorded";
  // b's lease shortened to nothing: the fence must renew it, or a would
  // take the lock below.
  ASSERT_TRUE(store_->RenewLock("kek-rotate/payments", b, 0).ok());
  auto recorded = store_->AddKek(p->id, v2, "custody:kek:payments:v2", 1102, {}, &held);
  ASSERT_TRUE(recorded.ok()) << recorded.error().message();
  EXPECT_EQ(store_->CurrentKek(p->id)->ref, v2);
  EXPECT_TRUE(store_->TakeLock("kek-rotate/payments", a, 60, never)->has_value()) << "the fence renewed b's lock";
}

// Expiry is the store's clock (the database server's for PostgreSQL): a
// lock taken for 60 s is held until then; one renewed to a ttl <= 0 is over.
TEST_P(StoreTest, ALockHasOneHolderUntilItExpiresOrItsHolderEnds) {
  const LockHolder a{"host-a", 100, 7, "boot-a/pidns:1"}, b{"host-b", 200, 9, "boot-b/pidns:1"};
  auto never = [](const LockHolder&) { return false; };
  const int64_t before = static_cast<int64_t>(std::time(nullptr));
  ASSERT_FALSE(store_->TakeLock("kek-rotate/p", a, 60, never)->has_value());
  const int64_t after = static_cast<int64_t>(std::time(nullptr));
  auto other = store_->TakeLock("kek-rotate/p", b, 60, never);
  ASSERT_TRUE(other.ok()) << other.error().message();
  ASSERT_TRUE(other->has_value());
  EXPECT_EQ((*other)->holder, a);
  // The server runs on this host in the test: its clock is ours, give or take.
  EXPECT_GE((*other)->expires_at, before + 60 - 2);
  EXPECT_LE((*other)->expires_at, after + 60 + 2);
  EXPECT_FALSE(store_->TakeLock("kek-rotate/q", b, 60, never)->has_value()) << "names are separate";
  ASSERT_TRUE(store_->RenewLock("kek-rotate/p", a, 600).ok());
  auto renewed = store_->TakeLock("kek-rotate/p", b, 60, never);
  ASSERT_TRUE(renewed.ok() && renewed->has_value());
  EXPECT_GE((*renewed)->expires_at, before + 600 - 2) << "renewed to 600 s";
  // Expired: b takes it, and a has lost it.
  ASSERT_TRUE(store_->RenewLock("kek-rotate/p", a, -1).ok());
  EXPECT_FALSE(store_->TakeLock("kek-rotate/p", b, 60, never)->has_value());
  auto lost = store_->RenewLock("kek-rotate/p", a, 60);
  ASSERT_FALSE(lost.ok());
  EXPECT_EQ(lost.error().category(), Category::kUnavailable);
  // Releasing what is not ours does nothing; `gone` lets a taker past a live lock.
  ASSERT_TRUE(store_->ReleaseLock("kek-rotate/p", a).ok());
  EXPECT_TRUE(store_->TakeLock("kek-rotate/p", a, 60, never)->has_value());
  EXPECT_FALSE(store_->TakeLock("kek-rotate/p", a, 60, [&](const LockHolder& h) { return h == b; })->has_value());
  ASSERT_TRUE(store_->ReleaseLock("kek-rotate/p", a).ok());
  EXPECT_FALSE(store_->TakeLock("kek-rotate/p", b, 60, never)->has_value());
}

TEST(StoreOpen, RefusesAForeignDatabase) {
  test::TempDir dir;
  std::string path = dir / "other.db";
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE t(x)", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  auto s = OpenSqliteStore(path, /*create=*/true);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().category(), Category::kIntegrity);
  EXPECT_NE(s.error().message().find("not a custody store"), std::string::npos);
}

TEST(StoreOpen, GarbageFileIsIntegrityError) {
  test::TempDir dir;
  std::string path = dir / "garbage.db";
  test::WriteFile(path, std::string(4096, 'x'));
  auto s = OpenSqliteStore(path, /*create=*/false);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().category(), Category::kIntegrity) << s.error().message();
}

TEST(StoreOpen, MissingStoreIsNotFoundAndADirectoryIsUnavailable) {
  test::TempDir dir;
  EXPECT_EQ(OpenSqliteStore(dir / "none.db", false).error().category(), Category::kNotFound);
  auto s = OpenSqliteStore(dir.path(), false);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().category(), Category::kUnavailable) << s.error().message();
}

// Each thread has its own store handle (its own connections), as separate
// processes or nodes would.
TEST_P(StoreTest, ConcurrentWritersOnSeparateConnectionsNeverDuplicateAVersion) {
  ASSERT_TRUE(store_->CreateProject("p", {"e"}, Kek(1), "l").ok());
  const int64_t kek = store_->CurrentKek(store_->FindProject("p")->id)->id;
  constexpr int kThreads = 4, kEach = 25;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      auto s = Open(false);
      if (!s.ok()) { ++failures; return; }
      auto env = *(*s)->FindEnvironment("p", "e");
      for (int i = 0; i < kEach; ++i) {
        for (;;) {
          uint32_t v = *(*s)->NextVersion(env.id, "k");
          Status st = (*s)->AddVersion(env.id, "k", v, kek, {static_cast<uint8_t>(v)}, 1000);
          if (st.ok()) break;
          if (!st.error().version_taken()) { ++failures; return; }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  auto list = store_->ListSecrets(std::nullopt, std::nullopt);
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].version_count, static_cast<uint32_t>(kThreads * kEach));
  EXPECT_EQ((*list)[0].latest_version, static_cast<uint32_t>(kThreads * kEach));
}

}  // namespace
}  // namespace custody::core

namespace custody::core {
namespace {

// custodyd's write-behind usage counts: nothing reaches the store until a
// flush, then everything in one go, per key and per UTC day; the
// destructor writes what is left.
TEST_P(StoreTest, UsageBufferWritesCountsBehindPerKeyAndDay) {
  const int64_t now = 1'790'000'000;  // a fixed instant, mid-day UTC
  {
    UsageBuffer buf(*store_, std::chrono::hours(1));  // no flush by time in this test
    UsageKey a{"payments", "prod", "svc:api"}, b{"payments", "dev", "user:alice"};
    for (int i = 0; i < 5; ++i) buf.Add(a, UsageEvent::kUnseal, now + i);
    buf.Add(a, UsageEvent::kSeal, now);
    buf.Add(a, UsageEvent::kUnseal, now - 86'400);  // yesterday
    for (int i = 0; i < 3; ++i) buf.Add(b, UsageEvent::kUnseal, now);
    EXPECT_TRUE(store_->Usage(std::nullopt, now)->empty()) << "nothing written before a flush";
    ASSERT_TRUE(buf.Flush().ok());
    auto rows = store_->Usage(std::string("payments"), now);
    ASSERT_TRUE(rows.ok());
    ASSERT_EQ(rows->size(), 2u);
    for (const auto& r : *rows) {
      if (r.environment == "prod") {
        EXPECT_EQ(r.unseals, 6u);
        EXPECT_EQ(r.unseals_today, 5u);
        EXPECT_EQ(r.seals, 1u);
        EXPECT_EQ(r.last_use, now + 4);
      } else {
        EXPECT_EQ(r.unseals, 3u);
      }
    }
    buf.Add(b, UsageEvent::kUnseal, now + 10);
  }
  auto rows = store_->Usage(std::string("payments"), now + 10);
  for (const auto& r : *rows) {
    if (r.environment == "dev") {
      EXPECT_EQ(r.unseals, 4u) << "the destructor flushed the last count";
      EXPECT_EQ(r.last_use, now + 10);
    }
  }
}

// When the store cannot take the counts (here another connection holds the
// write lock past the busy timeout), nothing is lost: the flush fails, is
// counted for the metrics, and the next one writes everything.
TEST_F(SqliteStoreTest, UsageCountsThatCannotBeWrittenAreKeptForTheNextFlush) {
  const int64_t now = 1'790'000'000;
  UsageBuffer buf(*store_, std::chrono::hours(1));
  UsageKey a{"payments", "prod", "svc:api"};
  for (int i = 0; i < 3; ++i) buf.Add(a, UsageEvent::kUnseal, now);
  sqlite3* other = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &other), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(other, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), SQLITE_OK);
  Status blocked = buf.Flush();  // waits out the store's busy timeout
  EXPECT_FALSE(blocked.ok());
  EXPECT_EQ(buf.flush_failures(), 1u);
  buf.Add(a, UsageEvent::kUnseal, now);
  ASSERT_EQ(sqlite3_exec(other, "ROLLBACK", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(other);
  ASSERT_TRUE(buf.Flush().ok());
  auto rows = store_->Usage(std::string("payments"), now);
  ASSERT_TRUE(rows.ok());
  ASSERT_EQ(rows->size(), 1u);
  EXPECT_EQ((*rows)[0].unseals, 4u);
}

// Only requests that no limit applies to are written behind: under a
// limit, each request is charged in the store at once, so the limit holds
// across processes (a second Authorizer stands in for a CLI process).
TEST_P(StoreTest, UnderALimitEachRequestIsChargedAtOnceEvenWithABuffer) {
  const std::string text = R"(version = 1
admins = ["user:root"]
[principals."user:root"]
uid = 0
[projects.payments.environments.prod]
[projects.billing.environments.prod]
rate = "2/min"
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
[[projects.billing.grants]]
principal = "user:root"
role = "owner"
)";
  auto server = Authorizer::FromText(*store_, text, 1);
  auto cli = Authorizer::FromText(*store_, text, 1);
  ASSERT_TRUE(server.ok()) << server.error().message();
  ASSERT_TRUE(cli.ok());
  auto who = server->Identify(policy::Caller{.uid = 0});
  ASSERT_TRUE(who.ok());
  UsageBuffer buf(*store_, std::chrono::hours(1));
  EXPECT_TRUE(server->Admit(*who, {"billing", "prod", "k"}, UsageEvent::kUnseal, &buf).ok());
  EXPECT_TRUE(cli->Admit(*who, {"billing", "prod", "k"}, UsageEvent::kUnseal).ok());
  auto third = server->Admit(*who, {"billing", "prod", "k"}, UsageEvent::kUnseal, &buf);
  ASSERT_FALSE(third.ok()) << "the CLI's charge counted against the server's limit";
  EXPECT_EQ(third.error().category(), Category::kLimit);
  // Without a limit: counted in the buffer, written at the flush.
  int64_t now = static_cast<int64_t>(std::time(nullptr));
  EXPECT_TRUE(server->Admit(*who, {"payments", "prod", "k"}, UsageEvent::kUnseal, &buf).ok());
  auto unseals = [&](const std::string& project) {
    uint64_t n = 0;
    auto rows = store_->Usage(project, now);
    for (const auto& r : *rows) n += r.unseals;
    return n;
  };
  EXPECT_EQ(unseals("billing"), 2u);
  EXPECT_EQ(unseals("payments"), 0u);
  ASSERT_TRUE(buf.Flush().ok());
  EXPECT_EQ(unseals("payments"), 1u);
}

}  // namespace
}  // namespace custody::core

namespace custody::core {
namespace {

// What only the PostgreSQL store has: its URL, its schema among other
// tables, and a server that may not answer.
TEST(PostgresUrl, APasswordInTheUrlIsRefusedNamingTheFix) {
  for (const std::string url : {"postgresql://custody:hunter2@db.internal/custody",
                                "host=db.internal dbname=custody password=hunter2",
                                "postgresql://db.internal/custody?sslpassword=hunter2"}) {
    Status s = CheckPostgresUrl(url);
    ASSERT_FALSE(s.ok()) << url;
    EXPECT_EQ(s.error().category(), Category::kConfig);
    EXPECT_EQ(s.error().message().find("hunter2"), std::string::npos) << "never repeated: " << s.error().message();
    EXPECT_NE(s.error().message().find("passfile"), std::string::npos) << s.error().message();
    EXPECT_NE(s.error().message().find("sslcert"), std::string::npos) << s.error().message();
  }
  EXPECT_TRUE(CheckPostgresUrl("postgresql://custody@db.internal/custody?sslmode=verify-full").ok());
  EXPECT_TRUE(CheckPostgresUrl("host=/run/postgresql dbname=custody passfile=/etc/custody/pgpass").ok());
  EXPECT_EQ(CheckPostgresUrl("postgresql://[::1").error().category(), Category::kConfig);
  EXPECT_EQ(DescribePostgresUrl("postgresql://custody@db.internal:5433/custody?sslmode=verify-full"),
            "postgresql host db.internal port 5433 database custody");
}

TEST(PostgresOpen, AnUnreachableServerIsUnavailableNamingTheHost) {
  test::TempDir dir;  // a socket folder where nothing listens
  auto s = OpenPostgresStore("host=" + dir.path() + " port=5432 dbname=custody user=custody", true);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().category(), Category::kUnavailable);
  EXPECT_NE(s.error().message().find("cannot connect to the store (postgresql host " + dir.path()), std::string::npos)
      << s.error().message();
  EXPECT_NE(s.error().message().find("No such file or directory"), std::string::npos) << "libpq's reason: "
                                                                                        << s.error().message();
}

TEST(PostgresOpen, ADatabaseWithOtherTablesIsRefusedAndLeftAlone) {
  test::PgServer* pg = test::PgServer::Shared();
  CUSTODY_REQUIRE_PG(pg);
  const std::string url = pg->NewDatabase();
  const std::string db = test::PgServer::DatabaseOf(url);
  pg->Sql(db, "CREATE TABLE invoices (id int)");
  auto s = OpenPostgresStore(url, /*create=*/true);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().category(), Category::kIntegrity);
  EXPECT_NE(s.error().message().find("not a custody store"), std::string::npos) << s.error().message();
  EXPECT_EQ(pg->Sql(db, "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'"), "invoices\n")
      << "nothing was created";
}

TEST(PostgresOpen, AnEmptyDatabaseIsNotFoundUnlessCreatingAndANewerSchemaIsRefused) {
  test::PgServer* pg = test::PgServer::Shared();
  CUSTODY_REQUIRE_PG(pg);
  const std::string url = pg->NewDatabase();
  const std::string db = test::PgServer::DatabaseOf(url);
  auto missing = OpenPostgresStore(url, /*create=*/false);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().category(), Category::kNotFound);
  EXPECT_NE(missing.error().message().find("custody init --store"), std::string::npos) << missing.error().message();
  ASSERT_TRUE(OpenPostgresStore(url, true).ok());
  EXPECT_TRUE(OpenPostgresStore(url, false).ok()) << "found again";
  pg->Sql(db, "UPDATE custody_schema SET version = 99");
  auto newer = OpenPostgresStore(url, false);
  ASSERT_FALSE(newer.ok());
  EXPECT_EQ(newer.error().category(), Category::kConfig);
  EXPECT_NE(newer.error().message().find("schema version 99, newer than this custody understands"), std::string::npos)
      << newer.error().message();
  EXPECT_EQ(pg->Sql(db, "SELECT version FROM custody_schema"), "99\n") << "left as it was";
}

// Two nodes starting on a new database at once: one migrates, the other
// finds the work done; neither fails.
TEST(PostgresOpen, NodesStartingAtOnceMigrateOnce) {
  test::PgServer* pg = test::PgServer::Shared();
  CUSTODY_REQUIRE_PG(pg);
  const std::string url = pg->NewDatabase();
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      auto s = OpenPostgresStore(url, true);
      if (!s.ok()) {
        ++failures;
        ADD_FAILURE() << s.error().message();
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

// The answer to a put's COMMIT is lost: the server process ends while the
// commit runs (a deferred trigger holds the commit until the test
// terminates that process). The store does not guess: it waits until that
// process is gone, then looks for the exact blob it sent. Not there, so the
// put is reported as not stored, and storing it again makes one version.
TEST(PostgresFaults, APutWhoseCommitAnswerIsLostIsCheckedNotGuessed) {
  test::PgServer* pg = test::PgServer::Shared();
  CUSTODY_REQUIRE_PG(pg);
  const std::string url = pg->NewDatabase();
  const std::string db = test::PgServer::DatabaseOf(url);
  auto store = OpenPostgresStore(url, true);
  ASSERT_TRUE(store.ok()) << store.error().message();
  auto p = (*store)->CreateProject("payments", {"prod"}, Kek(1), "l");
  ASSERT_TRUE(p.ok());
  auto env = *(*store)->FindEnvironment("payments", "prod");
  const int64_t kek = (*store)->CurrentKek(p->id)->id;
  pg->Sql(db, "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(30); "
              "RETURN NULL; END $$; CREATE CONSTRAINT TRIGGER stall AFTER INSERT ON secret_versions "
              "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stall()");
  std::atomic<bool> killed{false};
  std::thread killer([&] {
    for (int i = 0; i < 200 && !killed; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      killed = pg->Sql(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND query = 'COMMIT' AND state = 'active'")
                   .find('t') != std::string::npos;
    }
  });
  Status lost = (*store)->AddVersion(env.id, "stripe", 1, kek, {1, 2, 3}, 1000);
  killer.join();
  ASSERT_TRUE(killed.load()) << "the COMMIT was never seen running";
  ASSERT_FALSE(lost.ok());
  EXPECT_EQ(lost.error().category(), Category::kUnavailable);
  EXPECT_NE(lost.error().message().find("it was not stored (checked after reconnecting)"), std::string::npos)
      << lost.error().message();
  pg->Sql(db, "DROP TRIGGER stall ON secret_versions");
  ASSERT_TRUE((*store)->AddVersion(env.id, "stripe", 1, kek, {1, 2, 3}, 1000).ok()) << "the same put again";
  auto versions = (*store)->ListVersions(env, "stripe");
  ASSERT_TRUE(versions.ok());
  EXPECT_EQ(versions->size(), 1u);
}

// Export and Import (`custody store copy`): every row of one backend lands
// in the other with its ids and bytes, the copy keeps working, and a store
// that holds a deployment is refused and left as it was.
// Both backends answer alike for a KEK record that does not exist: 66.
TEST_P(StoreTest, ChangingTheStateOfAnUnknownKekIsNotFound) {
  auto r = store_->SetKekState(987654, KekState::kRetiring);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kNotFound) << r.error().message();
  EXPECT_NE(r.error().message().find("no KEK record 987654"), std::string::npos) << r.error().message();
}

// Nodes that share a store each keep their own checkpoint witness: one
// node's checkpoint at a seq never replaces another's, and each reads back
// its own. Rows written before witnesses had a node (node '') stand for a
// node only while it has none of its own.
TEST_P(StoreTest, AuditWitnessesAreKeptPerNode) {
  ASSERT_TRUE(store_->RecordAuditCheckpoint("", 40, "old-host").ok());
  auto before = store_->LastAuditCheckpoint("node-a");
  ASSERT_TRUE(before.ok()) << before.error().message();
  ASSERT_TRUE(before->has_value());
  EXPECT_EQ((*before)->first, 40u);
  ASSERT_TRUE(store_->RecordAuditCheckpoint("node-a", 7, "a7").ok());
  ASSERT_TRUE(store_->RecordAuditCheckpoint("node-b", 7, "b7").ok());
  ASSERT_TRUE(store_->RecordAuditCheckpoint("node-b", 12, "b12").ok());
  auto a = store_->LastAuditCheckpoint("node-a");
  auto b = store_->LastAuditCheckpoint("node-b");
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(a->has_value() && b->has_value());
  EXPECT_EQ(**a, std::make_pair(uint64_t{7}, std::string("a7")));
  EXPECT_EQ(**b, std::make_pair(uint64_t{12}, std::string("b12")));
  // A node with no row of its own falls back to the old rows.
  auto c = store_->LastAuditCheckpoint("node-c");
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ(**c, std::make_pair(uint64_t{40}, std::string("old-host")));
}

TEST_P(StoreTest, ExportImportCarriesEveryRowToTheOtherBackend) {
  auto p = store_->CreateProject("payments", {"dev", "prod"}, Kek(1), "custody:kek:payments:v1",
                                 std::vector<uint8_t>{1, 2, 3});
  ASSERT_TRUE(p.ok()) << p.error().message();
  ASSERT_TRUE(store_->CreateProject("billing", {"prod"}, Kek(2), "custody:kek:billing:v1").ok());
  auto prod = store_->FindEnvironment("payments", "prod");
  ASSERT_TRUE(prod.ok());
  auto k1 = store_->CurrentKek(p->id);
  ASSERT_TRUE(k1.ok());
  ASSERT_TRUE(store_->AddVersion(prod->id, "stripe", 1, k1->id, {0xde, 0xad, 0x00, 0xbe}, 1000).ok());
  KekRef v2 = Kek(3);
  v2.version = 2;
  auto k2 = store_->AddKek(p->id, v2, "custody:kek:payments:v2", 1001);
  ASSERT_TRUE(k2.ok());
  ASSERT_TRUE(store_->AddVersion(prod->id, "stripe", 2, k2->id, {0x00, 0x01}, 1002).ok());
  ASSERT_TRUE(store_->RevokeVersion(*prod, "stripe", 1, "leaked", "user:root", 1003).ok());
  ASSERT_TRUE(store_->SavePolicy("version = 1\n", "ab", "bootstrap (uid 0)").ok());
  ASSERT_TRUE(store_->SavePolicy("version = 1 # 2\n", "cd", "user:root").ok());
  policy::LimitRule rate{policy::LimitRule::kRate, "rate:payments/prod", "payments rate", {5, 60, "5/min"}, 0, "", ""};
  ASSERT_TRUE(store_->Admit({"payments", "prod", "user:root"}, {rate}, UsageEvent::kUnseal, 1004.25).ok());
  ASSERT_TRUE(store_->Record({"payments", "prod", "user:ci"}, UsageEvent::kDenied, 1005).ok());
  ASSERT_TRUE(store_->RecordAuditCheckpoint("node-a", 7, "hash7").ok());
  ASSERT_TRUE(store_->RecordAuditCheckpoint("node-b", 7, "hash7b").ok());

  auto snap = store_->Export();
  ASSERT_TRUE(snap.ok()) << snap.error().message();
  EXPECT_EQ(snap->projects.size(), 2u);
  EXPECT_EQ(snap->environments.size(), 3u);
  EXPECT_EQ(snap->keks.size(), 3u);
  EXPECT_EQ(snap->versions.size(), 2u);
  EXPECT_EQ(snap->policies.size(), 2u);
  EXPECT_EQ(snap->usage.size(), 2u);
  EXPECT_EQ(snap->buckets.size(), 1u);
  EXPECT_EQ(snap->checkpoints.size(), 2u);

  // The other backend.
  test::PgServer* pg = test::PgServer::Shared();
  CUSTODY_REQUIRE_PG(pg);
  auto target = sqlite() ? OpenPostgresStore(pg->NewDatabase(), /*create=*/true)
                         : OpenSqliteStore(dir_ / "target.db", /*create=*/true);
  ASSERT_TRUE(target.ok()) << target.error().message();
  size_t progressed = 0;
  Status imported = (*target)->Import(*snap, [&](size_t done, size_t all) {
    EXPECT_EQ(all, 2u);
    progressed = done;
  });
  ASSERT_TRUE(imported.ok()) << imported.error().message();
  EXPECT_EQ(progressed, 2u);
  auto back = (*target)->Export();
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_TRUE(*back == *snap) << "every row, column for column";

  // A second import is refused, and changes nothing.
  Status again = (*target)->Import(*snap);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().category(), Category::kUsage);
  EXPECT_NE(again.error().message().find("already holds a custody deployment"), std::string::npos);
  auto unchanged = (*target)->Export();
  ASSERT_TRUE(unchanged.ok());
  EXPECT_TRUE(*unchanged == *snap);

  // The copy works: what the interface reads, and new rows after the copied ids.
  auto env = (*target)->FindEnvironment("payments", "prod");
  ASSERT_TRUE(env.ok());
  auto cur = (*target)->GetVersion(*env, "stripe", std::nullopt);
  ASSERT_TRUE(cur.ok());
  EXPECT_EQ(cur->version, 2u);
  EXPECT_EQ(cur->blob, (std::vector<uint8_t>{0x00, 0x01}));
  auto material = (*target)->KekMaterial(Kek(1));
  ASSERT_TRUE(material.ok()) << material.error().message();
  EXPECT_EQ(*material, (std::vector<uint8_t>{1, 2, 3}));
  auto fresh = (*target)->CreateProject("fresh", {"prod"}, Kek(4), "custody:kek:fresh:v1");
  ASSERT_TRUE(fresh.ok()) << fresh.error().message();
  EXPECT_GT(fresh->id, p->id);
  auto fenv = (*target)->FindEnvironment("fresh", "prod");
  ASSERT_TRUE(fenv.ok());
  auto fk = (*target)->CurrentKek(fresh->id);
  ASSERT_TRUE(fk.ok());
  EXPECT_TRUE((*target)->AddVersion(fenv->id, "one", 1, fk->id, {9}, 1006).ok());
}

}  // namespace
}  // namespace custody::core
