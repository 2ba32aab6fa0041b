#include "custody/seal/deadline_sealer.h"

#include <optional>
#include <string>

namespace custody::core {

using Clock = std::chrono::steady_clock;

// One call: what it runs, and its outcome once it has one. Shared by the
// caller and the thread running it, so that a caller who gave up leaves
// nothing dangling: the inputs were copied in, and the result dies with the
// last owner (a SecretBuffer wipes itself).
struct DeadlineSealer::Call {
  std::function<void()> body;  // runs the backend call, fills the result below
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  uint64_t id = 0;
  Clock::time_point queued;  // when its caller began to wait: its deadline counts from here
};

namespace {

// A SealContext whose strings it owns: a call may outlive its caller.
struct OwnedContext {
  KekRef kek;
  std::string project, environment, name;
  uint32_t version = 0;
  OwnedContext(const KekRef& k, const SealContext& c)
      : kek(k), project(c.project), environment(c.environment), name(c.name), version(c.version) {}
  SealContext view() const { return {project, environment, name, version}; }
};

}  // namespace

DeadlineSealer::DeadlineSealer(Sealer& inner, Options options) : inner_(inner), options_(options) {
  if (options_.max_calls == 0) options_.max_calls = 1;
}

DeadlineSealer::~DeadlineSealer() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();  // a hung call is waited for: see Drain()
}

void DeadlineSealer::Worker() {
  std::unique_lock lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping
    std::shared_ptr<Call> call = std::move(queue_.front());
    queue_.pop_front();
    const uint64_t id = call->id;
    running_[id] = call->queued;
    lock.unlock();
    call->body();
    lock.lock();
    // Free for the next call from here on (it finds the queue before it
    // waits), so a caller whose call just returned never finds every
    // thread taken.
    running_.erase(id);
    idle_cv_.notify_all();
    lock.unlock();
    {
      std::lock_guard l(call->mu);
      call->done = true;
    }
    call->cv.notify_all();
    call.reset();  // an abandoned call's result is wiped here
    lock.lock();
  }
}

Status DeadlineSealer::Run(const std::shared_ptr<Call>& call, const char* what) {
  {
    std::lock_guard lock(mu_);
    if (stop_) return Error(Category::kUnavailable, "the token is being closed");
    call->id = ++next_id_;
    call->queued = Clock::now();
    // A thread for it: an idle one, or a new one within the bound. Every
    // thread past the bound is held by a call that has not returned.
    if (threads_.size() - running_.size() <= queue_.size()) {
      if (threads_.size() >= options_.max_calls) {
        return Error(Category::kUnavailable,
                     "the token is slow or hung: " + std::to_string(options_.max_calls) +
                         " calls to it are still waiting for an answer; try again later");
      }
      threads_.emplace_back([this] { Worker(); });
    }
    queue_.push_back(call);
  }
  work_cv_.notify_one();
  std::unique_lock l(call->mu);
  if (call->cv.wait_for(l, options_.timeout, [&] { return call->done; })) return Status::Ok();
  l.unlock();
  {
    std::lock_guard lock(mu_);
    ++timed_out_;
  }
  return Error(Category::kUnavailable, std::string("the token did not answer ") + what + " within " +
                                           std::to_string(options_.timeout.count()) +
                                           " ms ([token] call_timeout); it is slow or hung; try again later");
}

Status DeadlineSealer::Random(std::span<uint8_t> out) {
  struct R {
    SecretBuffer bytes;
    std::optional<Status> status;
  };
  auto r = std::make_shared<R>();
  r->bytes = SecretBuffer(out.size());
  auto call = std::make_shared<Call>();
  Sealer& inner = inner_;
  call->body = [r, &inner] { r->status = inner.Random(r->bytes.RevealMutable(SecretAccess{})); };
  CUSTODY_RETURN_IF_ERROR(Run(call, "a random-number request"));
  if (!r->status->ok()) return *r->status;
  auto b = r->bytes.Reveal(SecretAccess{});
  std::copy(b.begin(), b.end(), out.begin());
  return Status::Ok();
}

Result<std::vector<uint8_t>> DeadlineSealer::Seal(const KekRef& kek, const SealContext& ctx, const SecretBuffer& value) {
  struct S {
    OwnedContext at;
    SecretBuffer value;
    std::optional<Result<std::vector<uint8_t>>> out;
  };
  auto s = std::make_shared<S>(S{OwnedContext(kek, ctx), SecretBuffer::Copy(value.Reveal(SecretAccess{})), {}});
  auto call = std::make_shared<Call>();
  Sealer& inner = inner_;
  call->body = [s, &inner] { s->out.emplace(inner.Seal(s->at.kek, s->at.view(), s->value)); };
  CUSTODY_RETURN_IF_ERROR(Run(call, "a seal"));
  return std::move(*s->out);
}

Result<SecretBuffer> DeadlineSealer::Unseal(const KekRef& expected, const SealContext& ctx,
                                            std::span<const uint8_t> blob) {
  struct U {
    OwnedContext at;
    std::vector<uint8_t> blob;
    std::optional<Result<SecretBuffer>> out;
  };
  auto u = std::make_shared<U>(U{OwnedContext(expected, ctx), {blob.begin(), blob.end()}, {}});
  auto call = std::make_shared<Call>();
  Sealer& inner = inner_;
  call->body = [u, &inner] { u->out.emplace(inner.Unseal(u->at.kek, u->at.view(), u->blob)); };
  CUSTODY_RETURN_IF_ERROR(Run(call, "an unseal"));
  return std::move(*u->out);
}

bool DeadlineSealer::Recover(const Error& failure) {
  struct V {
    Error failure;
    bool out = false;
  };
  auto v = std::make_shared<V>(V{failure});
  auto call = std::make_shared<Call>();
  Sealer& inner = inner_;
  call->body = [v, &inner] { v->out = inner.Recover(v->failure); };
  // A recovery that does not finish in time goes on by itself; this
  // request is not tried again, the next one finds the session it made.
  if (!Run(call, "a recovery").ok()) return false;
  return v->out;
}

Sealer::Stalls DeadlineSealer::stalls() const {
  std::lock_guard lock(mu_);
  Stalls s;
  s.timed_out = timed_out_;
  const auto now = Clock::now();
  std::optional<Clock::time_point> oldest;
  for (const auto& [id, start] : running_) {
    if (now - start < options_.timeout) continue;
    ++s.hung;
    if (!oldest || start < *oldest) oldest = start;
  }
  if (oldest) {
    const auto ago = now - *oldest;
    s.hung_since = std::chrono::duration_cast<std::chrono::seconds>(
                       (std::chrono::system_clock::now() - ago).time_since_epoch())
                       .count();
  }
  return s;
}

bool DeadlineSealer::Drain(std::chrono::milliseconds limit) {
  std::unique_lock lock(mu_);
  return idle_cv_.wait_for(lock, limit, [&] { return running_.empty() && queue_.empty(); });
}

}  // namespace custody::core
