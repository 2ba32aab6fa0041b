// Test helper: appends N audit records to a log folder, as a separate
// process would. Used for the multi-process and kill -9 tests, and, with
// THREADS > 1, by that many threads at once (N each) for the group-commit
// test, which observes this process's syncs through an LD_PRELOAD shim.
//   audit_writer DIR N [TAG] [THREADS]
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "custody/audit/audit.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: audit_writer DIR N [TAG] [THREADS]\n");
    return 64;
  }
  custody::core::AuditOptions o;
  o.dir = argv[1];
  o.segment_bytes = 64 * 1024;  // small segments, so rotation happens under load too
  auto log = custody::core::AuditLog::Open(o);
  if (!log.ok()) {
    std::fprintf(stderr, "%s\n", log.error().message().c_str());
    return 69;
  }
  long n = std::strtol(argv[2], nullptr, 10);
  std::string tag = argc > 3 ? argv[3] : "w";
  long threads = argc > 4 ? std::strtol(argv[4], nullptr, 10) : 1;
  std::atomic<int> rc{0};
  auto write = [&](const std::string& who) {
    for (long i = 0; i < n && rc.load() == 0; ++i) {
      custody::core::AuditEvent e;
      e.action = "test.write";
      e.principal = "svc:" + tag;
      e.decision = custody::core::AuditDecision::kNone;
      e.result = custody::core::AuditResult::kOk;
      e.detail = who + " " + std::to_string(i);
      auto r = (*log)->Append(e);
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.error().message().c_str());
        rc.store(69);
      }
    }
  };
  if (threads <= 1) {
    write(tag);
  } else {
    std::vector<std::thread> pool;
    for (long t = 0; t < threads; ++t) pool.emplace_back(write, tag + "." + std::to_string(t));
    for (auto& t : pool) t.join();
  }
  return rc.load();
}
