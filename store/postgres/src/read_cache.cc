// The read cache of a serving process and its listening connection (see
// ReadCache in pg_store_impl.h for what it promises).
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>

#include "pg_store_impl.h"

namespace custody::core::pg {

using Clock = std::chrono::steady_clock;

ReadCache::ReadCache(PgStore& store) : store_(store) {
  if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) wake_[0] = wake_[1] = -1;
  thread_ = std::thread([this] { Run(); });
}

ReadCache::~ReadCache() {
  {
    std::lock_guard lock(stop_mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (wake_[1] >= 0) {
    const char b = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_[1], &b, 1);
  }
  thread_.join();
  for (int fd : wake_) {
    if (fd >= 0) ::close(fd);
  }
}

std::optional<UnsealInputs> ReadCache::Find(const std::string& key) {
  std::lock_guard lock(mu_);
  if (!listening_) return std::nullopt;
  auto it = entries_.find(key);
  if (it == entries_.end()) return std::nullopt;
  return it->second;
}

ReadCache::Ticket ReadCache::Begin() {
  std::lock_guard lock(mu_);
  return {epoch_, listening_};
}

void ReadCache::Keep(const Ticket& t, const std::string& key, const UnsealInputs& in) {
  std::lock_guard lock(mu_);
  // A change seen since the read began: its result may predate the change.
  if (!t.usable || !listening_ || epoch_ != t.epoch) return;
  if (entries_.size() >= kMaxEntries) entries_.clear();
  entries_.insert_or_assign(key, in);
}

void ReadCache::Changed() {
  std::lock_guard lock(mu_);
  entries_.clear();
  ++epoch_;
}

void ReadCache::SetListening(bool on) {
  std::lock_guard lock(mu_);
  entries_.clear();
  ++epoch_;
  listening_ = on;
}

bool ReadCache::WaitStop(std::chrono::milliseconds d) {
  std::unique_lock lock(stop_mu_);
  return stop_cv_.wait_for(lock, d, [this] { return stop_; });
}

void ReadCache::Run() {
  auto backoff = std::chrono::milliseconds(100);
  for (;;) {
    {
      std::lock_guard lock(stop_mu_);
      if (stop_) return;
    }
    auto c = store_.OpenConnection();
    if (c) {
      // LISTEN before anything is cached: every change committed after it
      // is notified, and every read begun after it sees the ones before.
      Res r(PQexec((*c)->pg, "LISTEN custody_store_changed"));
      if (PQresultStatus(r.raw()) == PGRES_COMMAND_OK && PQsetnonblocking((*c)->pg, 1) == 0) {
        SetListening(true);
        backoff = std::chrono::milliseconds(100);
        const bool go_on = Listen(**c);
        SetListening(false);
        if (!go_on) return;
      }
    }
    // The store is unreachable: reads go to it (and fail there, or not)
    // until the listener is back.
    if (WaitStop(backoff)) return;
    backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::seconds(5));
  }
}

bool ReadCache::Listen(Conn& c) {
  PGconn* pg = c.pg;
  auto next_beat = Clock::now() + kHeartbeat;
  bool beat_sent = false;  // a heartbeat sent, its answer awaited by beat_due
  Clock::time_point beat_due{};
  for (;;) {
    pollfd fds[2] = {{PQsocket(pg), POLLIN, 0}, {wake_[0], POLLIN, 0}};
    const auto until = beat_sent ? std::min(beat_due, next_beat) : next_beat;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    int n = ::poll(fds, wake_[0] >= 0 ? 2 : 1, static_cast<int>(std::clamp<long long>(ms, 0, 1000)));
    {
      std::lock_guard lock(stop_mu_);
      if (stop_) return false;
    }
    if (n < 0 && errno != EINTR) return true;
    if (n > 0 && fds[0].revents != 0) {
      if (PQconsumeInput(pg) != 1) return true;
      bool changed = false;
      while (PGnotify* note = PQnotifies(pg)) {
        changed = true;
        PQfreemem(note);
      }
      if (changed) Changed();
      // The heartbeat's answer, when it is all in.
      while (beat_sent && PQisBusy(pg) == 0) {
        PGresult* res = PQgetResult(pg);
        if (res == nullptr) {
          beat_sent = false;
          break;
        }
        const bool good = PQresultStatus(res) == PGRES_TUPLES_OK;
        PQclear(res);
        if (!good) return true;
      }
    }
    if (PQstatus(pg) != CONNECTION_OK) return true;
    const auto now = Clock::now();
    if (beat_sent && now >= beat_due) return true;  // no answer in time: not listening any more
    if (!beat_sent && now >= next_beat) {
      // A connection that died without a word (a host gone, a cable cut)
      // delivers no notification either; the heartbeat finds it.
      if (PQsendQuery(pg, "SELECT 1") != 1) return true;
      if (PQflush(pg) < 0) return true;
      beat_sent = true;
      beat_due = now + kHeartbeatAnswer;
      next_beat = now + kHeartbeat;
    }
  }
}

void PgStore::EnableReadCache() {
  if (!cache_) cache_ = std::make_unique<ReadCache>(*this);
}

}  // namespace custody::core::pg
