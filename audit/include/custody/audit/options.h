// [audit] of custody.toml.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace custody::core {

// [audit] of custody.toml, and how the log is opened.
struct AuditOptions {
  std::string dir;                            // the config's default: state_dir/audit
  uint64_t segment_bytes = 16 * 1024 * 1024;  // start a new segment past this size
  uint64_t checkpoint_every = 1000;           // records between checkpoints, at most
  int64_t checkpoint_seconds = 300;           // seconds between checkpoints, at most
  // [audit] timeout_ms: the longest wait for the log's lock or a batch, and
  // for a record queued behind a batch that does not end (ExpireQueued).
  std::chrono::milliseconds timeout{10000};
  // Longest time the writer holds a batch back for announced records
  // (AuditLog::Announce); zero: never.
  std::chrono::microseconds gather{500};
  // [node] name of custody.toml: written into every record as "node", so
  // that the records of several nodes say which node made each. Empty: no
  // field (a log written before nodes had names reads the same).
  std::string node;

  bool operator==(const AuditOptions&) const = default;
};

}  // namespace custody::core
