#include "custody/store/store_lock.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>
#include <fstream>
#include <sstream>

#include "custody/common/time.h"

namespace custody::core {
namespace {

// Field 22 of /proc/PID/stat: the start time in clock ticks since boot
// (the comm field before it may hold spaces, so count from its ')').
int64_t StartTime(int64_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return -1;
  size_t close = line.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22; ++i) {
    if (!(rest >> field)) return -1;
  }
  return std::strtoll(field.c_str(), nullptr, 10);
}

// The kernel's boot id and this process's pid namespace: two holders with
// the same host name are only comparable by pid when both match (a
// container sharing the host's name has its own pids).
std::string Instance() {
  std::string boot;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot;
  struct stat st {};
  std::string ns = ::stat("/proc/self/ns/pid", &st) == 0 ? std::to_string(st.st_ino) : "unknown";
  return (boot.empty() ? "unknown" : boot) + "/pidns:" + ns;
}

std::string HostName() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

}  // namespace

LockHolder ThisProcess() {
  const int64_t pid = ::getpid();
  return LockHolder{HostName(), pid, StartTime(pid), Instance()};
}

bool HolderEnded(const LockHolder& holder) {
  // Another machine, boot or pid namespace: its pid says nothing here; the
  // lock must expire instead.
  if (holder.host != HostName() || holder.instance != Instance() || holder.pid <= 0) return false;
  if (::kill(static_cast<pid_t>(holder.pid), 0) != 0 && errno == ESRCH) return true;
  // The pid is in use; by the holder only if it started when the holder did.
  const int64_t started = StartTime(holder.pid);
  return started >= 0 && started != holder.started;
}

Result<StoreLock> StoreLock::Take(Store& store, std::string name, int64_t ttl, const std::string& what) {
  StoreLock lock(store, std::move(name), ttl);
  CUSTODY_ASSIGN_OR_RETURN(auto other, store.TakeLock(lock.name_, lock.me_, ttl, HolderEnded));
  if (other) {
    const std::string when = FormatUtc(other->expires_at);
    lock.store_ = nullptr;  // nothing of ours to release
    return Error(Category::kUnavailable, "another " + what + " is running (pid " + std::to_string(other->holder.pid) +
                                             " on " + other->holder.host + ", lock '" + other->name +
                                             "' held until " + when + "); wait for it to finish");
  }
  return lock;
}

StoreLock::StoreLock(StoreLock&& o) noexcept
    : store_(o.store_), name_(std::move(o.name_)), ttl_(o.ttl_), me_(std::move(o.me_)) {
  o.store_ = nullptr;
}

StoreLock::~StoreLock() {
  if (store_ != nullptr) (void)store_->ReleaseLock(name_, me_);
}

Status StoreLock::Renew() { return store_->RenewLock(name_, me_, ttl_); }

}  // namespace custody::core
