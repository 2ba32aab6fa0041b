// Test helper: appends N audit records to a log folder, as a separate
// process would. Used for the multi-process and kill -9 tests.
//   audit_writer DIR N [TAG]
#include <cstdio>
#include <cstdlib>
#include <string>

#include "custody/audit/audit.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: audit_writer DIR N [TAG]\n");
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
  for (long i = 0; i < n; ++i) {
    custody::core::AuditEvent e;
    e.action = "test.write";
    e.principal = "svc:" + tag;
    e.decision = custody::core::AuditDecision::kNone;
    e.result = custody::core::AuditResult::kOk;
    e.detail = tag + " " + std::to_string(i);
    auto r = (*log)->Append(e);
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.error().message().c_str());
      return 69;
    }
  }
  return 0;
}
