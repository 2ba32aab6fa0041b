// A named lock in the store, held by this process: taken, renewed while the
// work goes on, released at the end (or left to expire if the process is
// killed). It replaces a per-host flock for work that must run once across
// every host sharing the store, such as a project's KEK rotation.
//
//   CUSTODY_ASSIGN_OR_RETURN(auto lock, StoreLock::Take(store, "kek-rotate/payments", 60, "KEK rotation"));
//   ... CUSTODY_RETURN_IF_ERROR(lock.Renew()); ...   // at least once per ttl
#pragma once

#include <string>

#include "custody/store/store.h"

namespace custody::core {

// This process: host name, pid, start time, boot id and pid namespace.
LockHolder ThisProcess();
// Whether a holder is known to have ended: a process on this host, in this
// boot and pid namespace, whose pid is gone or now belongs to a process that
// started at another time. Any other holder (another host, or a container
// with its own pids) is never known to have ended; its lock expires.
bool HolderEnded(const LockHolder& holder);

class StoreLock {
 public:
  // kUnavailable naming the holder and when its lock expires if another
  // live process holds it; `what` names the work for that message.
  // The expiry is the store's clock (see Store::TakeLock), not this host's.
  static Result<StoreLock> Take(Store& store, std::string name, int64_t ttl, const std::string& what);
  StoreLock(StoreLock&& o) noexcept;
  StoreLock& operator=(StoreLock&&) = delete;
  StoreLock(const StoreLock&) = delete;
  ~StoreLock();

  // Extends the lock; kUnavailable once it is lost (expired and taken by
  // another process): the work must then stop.
  Status Renew();
  // For a write that must happen only while this lock is held.
  LockFence Fence() const { return {name_, me_, ttl_}; }

 private:
  StoreLock(Store& store, std::string name, int64_t ttl)
      : store_(&store), name_(std::move(name)), ttl_(ttl), me_(ThisProcess()) {}
  Store* store_;
  std::string name_;
  int64_t ttl_;
  LockHolder me_;
};

}  // namespace custody::core
