// Audit log appends against the raw cost they are built on, in one run:
//   raw_fsync     write one ~500-byte line + fdatasync (as the log does), per record (no chain, no lock)
//   append/1      AuditLog::Append from one thread (hash chain, flock, tail read, fsync)
//   append/8      the same from 8 threads: group commit shares one fsync per batch
// The ratios ours/raw are printed. One thread can at best match the raw
// fsync rate; with concurrent callers group commit should exceed it.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "custody/audit/audit.h"
#include "ratio_reporter.h"

namespace {

using custody::core::AuditEvent;
using custody::core::AuditLog;

std::string g_dir;
std::unique_ptr<AuditLog> g_log;

AuditEvent SampleEvent() {
  AuditEvent e;
  e.action = "secret.get";
  e.principal = "svc:payments-web-prod";
  e.identified_by = "uid 2001 (payments-web)";
  e.project = "payments";
  e.environment = "prod";
  e.name = "stripe-api-key";
  e.version = 12;
  e.kek_id = "0099ec18c9de605f023d1a8e15c39ffe";
  e.decision = custody::core::AuditDecision::kAllow;
  e.rule = "projects.payments grant #4 (line 71): svc:payments-web-prod is reader in prod";
  e.result = custody::core::AuditResult::kOk;
  e.request_id = "649d4b948e09bd33";
  return e;
}

void BM_RawFsync(benchmark::State& state) {
  std::string path = g_dir + "/raw.jsonl";
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  std::string line(520, 'x');
  line.back() = '\n';
  for (auto _ : state) {
    if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()) || ::fdatasync(fd) != 0) {
      state.SkipWithError("write failed");
      break;
    }
  }
  ::close(fd);
  state.SetItemsProcessed(state.iterations());
}

void BM_Append(benchmark::State& state) {
  AuditEvent e = SampleEvent();
  for (auto _ : state) {
    auto r = g_log->Append(e);
    if (!r.ok()) {
      state.SkipWithError(r.error().message().c_str());
      break;
    }
  }
  state.SetItemsProcessed(state.iterations());
}

}  // namespace

BENCHMARK(BM_RawFsync)->MinTime(1.0)->UseRealTime();
BENCHMARK(BM_Append)->MinTime(1.0)->UseRealTime();
BENCHMARK(BM_Append)->Threads(8)->MinTime(1.0)->UseRealTime();

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  char tmpl[] = "/var/tmp/custody-audit-bench-XXXXXX";  // a real disk, not tmpfs
  if (::mkdtemp(tmpl) == nullptr) return 1;
  g_dir = tmpl;
  custody::core::AuditOptions o;
  o.dir = g_dir + "/audit";
  auto log = AuditLog::Open(o);
  if (!log.ok()) {
    std::fprintf(stderr, "%s\n", log.error().message().c_str());
    return 1;
  }
  g_log = std::move(*log);
  custody::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  double raw = reporter.rates["BM_RawFsync/min_time:1.000/real_time"];
  std::printf("\n");
  for (const char* name : {"BM_Append/min_time:1.000/real_time", "BM_Append/min_time:1.000/real_time/threads:8"}) {
    double ours = reporter.rates[name];
    if (raw > 0 && ours > 0) {
      std::printf("ratio %-46s / raw fsync per record = %.2f  (%.0f/s vs %.0f/s)\n", name, ours / raw, ours, raw);
    }
  }
  g_log.reset();
  std::filesystem::remove_all(g_dir);
  benchmark::Shutdown();
  return 0;
}
