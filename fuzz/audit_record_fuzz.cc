// Fuzzes the audit record serializer: an event whose every text field holds
// whatever bytes the fuzzer chooses must be written (never thrown on, never
// wedging the log), read back by the parser with a valid hash chain, and
// keep every field that was valid UTF-8 exactly as it was.
//
// Input: up to 12 fields separated by 0x00, in AuditEvent's order.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "custody/audit/audit.h"
#include "custody/common/inplace_json.h"

namespace {

using custody::core::AuditDecision;
using custody::core::AuditResult;
using custody::core::AuditEvent;
using custody::core::AuditLog;

std::string dir;
std::unique_ptr<AuditLog> log_;
uint64_t written = 0;

void Reopen() {
  log_.reset();
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  std::filesystem::create_directories(dir);
  custody::core::AuditOptions o;
  o.dir = dir;
  auto l = AuditLog::Open(o);
  if (!l.ok()) std::abort();
  log_ = std::move(*l);
  written = 0;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // In memory when the machine has /dev/shm: each record is fsynced.
  std::string base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : std::filesystem::temp_directory_path().string();
  dir = base + "/custody-audit-fuzz-" + std::to_string(::getpid());
  Reopen();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> f;
  std::string_view in(reinterpret_cast<const char*>(data), size);
  size_t start = 0;
  for (size_t i = 0; i <= in.size() && f.size() < 12; ++i) {
    if (i == in.size() || in[i] == '\0') {
      f.emplace_back(in.substr(start, i - start));
      start = i + 1;
    }
  }
  f.resize(12);
  AuditEvent e;
  std::string* fields[] = {&e.action, &e.principal, &e.identified_by, &e.project, &e.environment,
                           &e.name,   &e.kek_id,    &e.rule,          &e.error,   &e.detail};
  for (size_t i = 0; i < 10; ++i) *fields[i] = f[i];
  // Decision and result are enums: the last two fields' first bytes pick
  // them, so every value the writer can be given is reached.
  e.decision = static_cast<AuditDecision>((f[10].empty() ? 0 : static_cast<uint8_t>(f[10][0])) % 5);
  e.result = static_cast<AuditResult>((f[11].empty() ? 0 : static_cast<uint8_t>(f[11][0])) % 4);
  if (written >= 200) Reopen();  // the check below reads the segment: keep it short
  auto seq = log_->Append(e);
  if (!seq.ok()) std::abort();  // no record may be refused for its content
  ++written;
  // Read back the last line and compare.
  const std::string path = dir + "/audit-000001.jsonl";
  std::ifstream file(path, std::ios::binary);
  std::string line, last;
  while (std::getline(file, line)) last = line;
  auto r = custody::core::ParseAuditRecord(last);
  if (!r.ok() || r->seq != *seq) std::abort();
  const std::string* back[] = {&r->event.action, &r->event.principal, &r->event.identified_by,
                               &r->event.project, &r->event.environment, &r->event.name,
                               &r->event.kek_id, &r->event.rule, &r->event.error, &r->event.detail};
  if (r->event.decision != e.decision || r->event.result != e.result) std::abort();
  for (size_t i = 0; i < 10; ++i) {
    if (!custody::WellFormedUtf8(*back[i])) std::abort();
    if (custody::WellFormedUtf8(f[i]) && *back[i] != f[i]) std::abort();
  }
  return 0;
}
