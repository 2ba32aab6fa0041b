// The audit trail in PostgreSQL, below the CLI: several writers of one
// node's chain (processes on one host, or a node restarted while the old one
// still finishes) take turns through the head row and never fork the chain;
// nodes write their chains side by side; a batch the database cannot take
// in time fails within its deadline, leaves nothing behind, and the next
// one goes on from the real head.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "../support/pg_server.h"
#include "../support/testenv.h"
#include "custody/audit/audit.h"
#include "custody/store/postgres_store.h"
#include "custody/store/store.h"

namespace custody::core {
namespace {

using namespace std::chrono_literals;

AuditEvent Event(const std::string& action, int n) {
  AuditEvent e;
  e.action = action;
  e.principal = "user:t";
  e.project = "payments";
  e.detail = std::to_string(n);
  e.decision = AuditDecision::kAllow;
  e.result = AuditResult::kOk;
  return e;
}

std::unique_ptr<AuditLog> OpenLog(Store& store, const std::string& node, std::chrono::milliseconds timeout = 5000ms) {
  auto storage = store.OpenAuditStorage(node, timeout);
  EXPECT_TRUE(storage.ok()) << (storage.ok() ? "" : storage.error().message());
  if (!storage.ok()) return nullptr;
  AuditOptions o;
  o.node = node;
  o.timeout = timeout;
  auto log = AuditLog::Open(o, std::move(*storage));
  EXPECT_TRUE(log.ok()) << (log.ok() ? "" : log.error().message());
  return log.ok() ? std::move(*log) : nullptr;
}

// Every chain of the store, verified (no key: the chain and the head rows).
std::map<std::string, AuditVerifyReport> VerifyAll(Store& store) {
  std::map<std::string, AuditVerifyReport> out;
  auto storage = store.OpenAuditStorage("reader", 1000ms);
  EXPECT_TRUE(storage.ok());
  if (!storage.ok()) return out;
  auto chains = (*storage)->Chains();
  EXPECT_TRUE(chains.ok());
  if (!chains.ok()) return out;
  for (const auto& chain : *chains) {
    std::vector<AuditChainLine> lines;
    EXPECT_TRUE((*storage)->Read(chain, [&](AuditChainLine&& l) { lines.push_back(std::move(l)); }).ok());
    auto witness = (*storage)->Witness(chain);
    EXPECT_TRUE(witness.ok());
    auto rep = VerifyAuditChain(lines, false, {}, chain, witness.ok() ? *witness : std::nullopt);
    EXPECT_TRUE(rep.ok());
    if (rep.ok()) out[chain] = *rep;
  }
  return out;
}

TEST(PostgresAuditTrail, WritersOfOneChainTakeTurnsAndNodesKeepTheirOwn) {
  test::PgServer* pg = test::PgServer::Shared();
  CUSTODY_REQUIRE_PG(pg);
  const std::string url = pg->NewDatabase();
  auto store = OpenPostgresStore(url, true);
  ASSERT_TRUE(store.ok()) << store.error().message();
  // Two writers of node-a (as two processes on its host would be) and one
  // of node-b, each with four threads; half of the records asynchronous.
  auto a1 = OpenLog(**store, "node-a"), a2 = OpenLog(**store, "node-a"), b = OpenLog(**store, "node-b");
  ASSERT_TRUE(a1 && a2 && b);
  constexpr int kThreads = 4, kEach = 40;
  std::atomic<int> acked{0}, failed{0};
  std::vector<std::thread> threads;
  for (AuditLog* log : {a1.get(), a2.get(), b.get()}) {
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, log, t] {
        for (int i = 0; i < kEach; ++i) {
          if ((i + t) % 2 == 0) {
            (log->Append(Event("secret.get", i)).ok() ? acked : failed)++;
          } else {
            std::atomic<bool> done{false};
            log->AppendAsync(Event("secret.put", i), [&](Result<uint64_t> r) {
              (r.ok() ? acked : failed)++;
              done = true;
              done.notify_one();
            });
            done.wait(false);
          }
        }
      });
    }
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(acked.load(), 3 * kThreads * kEach);
  // Acknowledged means committed: another session sees the record at once.
  const std::string db = test::PgServer::DatabaseOf(url);
  for (int i = 0; i < 5; ++i) {
    auto seq = b->Append(Event("secret.get", 1000 + i));
    ASSERT_TRUE(seq.ok()) << seq.error().message();
    EXPECT_EQ(pg->Sql(db, "SELECT count(*) FROM audit_records WHERE node = 'node-b' AND seq = " + std::to_string(*seq) +
                              " AND line LIKE '%\"detail\":\"" + std::to_string(1000 + i) + "\"%'"),
              "1\n");
  }
  a1.reset();
  a2.reset();
  b.reset();
  // Read from another connection, as `custody audit verify` on another host.
  auto other = OpenPostgresStore(url, false);
  ASSERT_TRUE(other.ok());
  auto reports = VerifyAll(**other);
  ASSERT_EQ(reports.size(), 2u);
  EXPECT_TRUE(reports["node-a"].intact) << reports["node-a"].problem;
  EXPECT_EQ(reports["node-a"].records, static_cast<uint64_t>(2 * kThreads * kEach)) << "no record lost or forked";
  EXPECT_TRUE(reports["node-b"].intact) << reports["node-b"].problem;
  EXPECT_EQ(reports["node-b"].records, static_cast<uint64_t>(kThreads * kEach + 5));
}

// A batch that cannot take the head row (another session holds it, as a
// stalled writer or an operator's open transaction would) fails at its
// deadline, not at the server's lock_timeout, and writes nothing; once the
// row is free, records go on from the real head.
TEST(PostgresAuditTrail, ABatchTheDatabaseCannotTakeFailsAtItsDeadlineAndLeavesNothing) {
  test::PgServer* pg = test::PgServer::Shared();
  CUSTODY_REQUIRE_PG(pg);
  const std::string url = pg->NewDatabase();
  const std::string db = test::PgServer::DatabaseOf(url);
  auto store = OpenPostgresStore(url, true);
  ASSERT_TRUE(store.ok()) << store.error().message();
  auto log = OpenLog(**store, "node-a", 700ms);
  ASSERT_TRUE(log);
  ASSERT_TRUE(log->Append(Event("secret.get", 1)).ok());
  std::atomic<bool> holder_done{false};
  std::thread holder([&] {
    pg->Sql(db, "BEGIN; SELECT seq FROM audit_heads WHERE node = 'node-a' FOR UPDATE; SELECT pg_sleep(4); COMMIT;");
    holder_done = true;
  });
  // Until the holder has the row, a record may still get through.
  Result<uint64_t> r = uint64_t{0};
  for (int i = 0; i < 100 && r.ok(); ++i) {
    r = log->Append(Event("secret.get", 2));
    if (r.ok()) std::this_thread::sleep_for(20ms);
  }
  ASSERT_FALSE(r.ok()) << "the head row was never held";
  EXPECT_FALSE(holder_done.load()) << "the batch waited for the holder instead of its deadline";
  EXPECT_EQ(r.error().category(), Category::kUnavailable);
  EXPECT_NE(r.error().message().find("PostgreSQL did not answer within 700 ms"), std::string::npos)
      << r.error().message();
  EXPECT_NE(r.error().message().find("the records were not written"), std::string::npos) << r.error().message();
  holder.join();
  Result<uint64_t> after = log->Append(Event("secret.get", 3));
  for (int i = 0; i < 50 && !after.ok(); ++i) {  // the old connection's rollback may still hold the row
    std::this_thread::sleep_for(100ms);
    after = log->Append(Event("secret.get", 3));
  }
  ASSERT_TRUE(after.ok()) << after.error().message();
  log.reset();
  auto reports = VerifyAll(**store);
  EXPECT_TRUE(reports["node-a"].intact) << reports["node-a"].problem;
  EXPECT_EQ(reports["node-a"].last_seq, *after);
}

// The database restarted: the batch in flight fails (its requests are
// refused), and the writer reconnects for the next one by itself.
TEST(PostgresAuditTrail, AWriterReconnectsAfterTheDatabaseRestarts) {
  std::string why;
  std::unique_ptr<test::PgServer> pg(test::PgServer::StartNew(&why));
  if (!pg) {
    if (test::InCi()) FAIL() << "PostgreSQL is required in CI: " << why;
    GTEST_SKIP() << why;
  }
  const std::string url = pg->NewDatabase();
  auto store = OpenPostgresStore(url, true);
  ASSERT_TRUE(store.ok()) << store.error().message();
  auto log = OpenLog(**store, "node-a", 2000ms);
  ASSERT_TRUE(log);
  ASSERT_TRUE(log->Append(Event("secret.get", 1)).ok());
  pg->Stop();
  auto down = log->Append(Event("secret.get", 2));
  ASSERT_FALSE(down.ok());
  EXPECT_EQ(down.error().category(), Category::kUnavailable) << down.error().message();
  ASSERT_TRUE(pg->Start(&why)) << why;
  auto up = log->Append(Event("secret.get", 3));
  ASSERT_TRUE(up.ok()) << up.error().message();
  EXPECT_EQ(*up, 2u) << "the failed batch took no seq";
  log.reset();
  auto fresh = OpenPostgresStore(url, false);  // the pool's connections died with the server
  ASSERT_TRUE(fresh.ok()) << fresh.error().message();
  auto reports = VerifyAll(**fresh);
  EXPECT_TRUE(reports["node-a"].intact) << reports["node-a"].problem;
}

}  // namespace
}  // namespace custody::core
