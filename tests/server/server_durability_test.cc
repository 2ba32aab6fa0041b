// The audit record of a GET is durable before any byte of its value leaves:
// observed, not assumed. An LD_PRELOAD shim (tests/support/trace_sync.cc)
// logs, in order, every completed fdatasync of an audit segment with the
// size it made durable, and the start of every HTTP answer custodyd writes
// to a socket. Reading the segment afterwards gives each GET record's end
// offset; every answer that carries a value must come after a sync that
// covers its record.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "../support/server_fixture.h"

namespace custody::test {
namespace {

class DurabilityServerTest : public ServerTest {
 protected:
  std::vector<std::string> ExtraServerEnv() override {
    std::string asan = std::getenv("ASAN_OPTIONS") ? std::getenv("ASAN_OPTIONS") : "";
    return {std::string("LD_PRELOAD=") + TRACE_SYNC, "CUSTODY_TEST_TRACE=" + Trace(),
            "ASAN_OPTIONS=" + asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"};
  }
  std::string Trace() const { return run_ / "trace"; }

  struct Event {
    char kind;         // 'S' sync, 'W' answer
    uint64_t size = 0;  // S: bytes durable
    std::string status, path, file;
  };
  std::vector<Event> Events() {
    std::vector<Event> out;
    std::istringstream in(ReadFile(Trace()));
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream f(line);
      Event e;
      f >> e.kind;
      if (e.kind == 'S') {
        f >> e.size >> e.file;
      } else {
        f >> e.status >> e.path;
      }
      out.push_back(e);
    }
    return out;
  }

  // The one audit segment, and the end offset of each secret.get record
  // with result ok for `path`, in file order.
  std::pair<std::string, std::vector<uint64_t>> GetRecordEnds(const std::string& path) {
    std::string segment;
    for (const auto& e : std::filesystem::recursive_directory_iterator(token_.dir().path())) {
      const std::string name = e.path().filename().string();
      if (name.rfind("audit-", 0) == 0 && e.path().extension() == ".jsonl") {
        EXPECT_TRUE(segment.empty()) << "more than one audit segment";
        segment = std::filesystem::canonical(e.path()).string();
      }
    }
    std::vector<uint64_t> ends;
    std::ifstream in(segment, std::ios::binary);
    std::string line;
    uint64_t offset = 0;
    while (std::getline(in, line)) {
      offset += line.size() + 1;
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || j.value("type", "") != "event") continue;
      const std::string p = j.value("project", "") + "/" + j.value("environment", "") + "/" + j.value("name", "");
      if (j.value("action", "") == "secret.get" && j.value("result", "") == "ok" && p == path) ends.push_back(offset);
    }
    return {segment, ends};
  }
};

// One client after another: the k-th answer with a value is the k-th GET
// record, and the sync that covers that record must come before it.
TEST_F(DurabilityServerTest, EveryValueLeavesAfterTheSyncOfItsRecord) {
  constexpr int kGets = 6;
  std::filesystem::remove(Trace());
  for (int i = 0; i < kGets; ++i) {
    auto r = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ASSERT_EQ(r.out, kSecret);
  }
  auto [segment, ends] = GetRecordEnds("payments/prod/stripe");
  ASSERT_GE(ends.size(), static_cast<size_t>(kGets));
  // Only the records made after the trace began (set-up wrote others).
  ends.erase(ends.begin(), ends.end() - kGets);

  uint64_t synced = 0;  // bytes of the segment known durable so far
  size_t answered = 0;
  for (const auto& e : Events()) {
    if (e.kind == 'S' && e.file == segment) synced = std::max(synced, e.size);
    if (e.kind == 'W' && e.status == "200" && e.path == "payments/prod/stripe") {
      ASSERT_LT(answered, ends.size()) << "more answers than records";
      EXPECT_GE(synced, ends[answered]) << "answer " << answered << " left before its record (ending at byte "
                                        << ends[answered] << ") was synced; synced so far: " << synced;
      ++answered;
    }
  }
  EXPECT_EQ(answered, static_cast<size_t>(kGets)) << "the trace did not see every answer:\n" << ReadFile(Trace());
}

// Many clients at once: records are synced in batches, and still no answer
// leaves before as many GET records are durable as answers have left.
TEST_F(DurabilityServerTest, ConcurrentValuesLeaveOnlyAfterTheirBatchIsSynced) {
  constexpr int kClients = 8, kEach = 4;
  std::filesystem::remove(Trace());
  std::vector<std::thread> clients;
  std::atomic<int> failures{0};
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&] {
      for (int i = 0; i < kEach; ++i) {
        auto r = AsUser(std::nullopt, {"secret", "get", "payments/prod/stripe"});
        if (r.exit_code != 0 || r.out != kSecret) failures.fetch_add(1);
      }
    });
  }
  for (auto& t : clients) t.join();
  ASSERT_EQ(failures.load(), 0);
  auto [segment, ends] = GetRecordEnds("payments/prod/stripe");
  ASSERT_GE(ends.size(), static_cast<size_t>(kClients * kEach));
  ends.erase(ends.begin(), ends.end() - kClients * kEach);

  uint64_t synced = 0;
  size_t answered = 0;
  for (const auto& e : Events()) {
    if (e.kind == 'S' && e.file == segment) synced = std::max(synced, e.size);
    if (e.kind == 'W' && e.status == "200" && e.path == "payments/prod/stripe") {
      // The k-th answer's own record is one of the records made so far; at
      // the least the first k of them must be durable.
      ASSERT_LT(answered, ends.size());
      EXPECT_GE(synced, ends[answered]) << "answer " << answered << " left with fewer records durable";
      ++answered;
    }
  }
  EXPECT_EQ(answered, static_cast<size_t>(kClients * kEach));
}

}  // namespace
}  // namespace custody::test
