#include "custody/audit/deadline_signer.h"

#include <pthread.h>

namespace custody::core {

DeadlineSigner::DeadlineSigner(AuditSigner& inner, std::chrono::milliseconds timeout)
    : inner_(inner), timeout_(timeout), worker_([this] { Worker(); }) {}

DeadlineSigner::~DeadlineSigner() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

void DeadlineSigner::Worker() {
  ::pthread_setname_np(::pthread_self(), "ckpt-signer");
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || job_.has_value(); });
    if (!job_) return;  // stopping, nothing left to sign
    std::string message = std::move(*job_);
    job_.reset();
    lock.unlock();
    auto r = inner_.Sign(message);
    lock.lock();
    result_ = std::move(r);
    ++answered_;
    busy_ = false;
    cv_.notify_all();
  }
}

Result<std::vector<uint8_t>> DeadlineSigner::Sign(std::string_view message) {
  std::unique_lock lock(mu_);
  if (busy_) {
    return Error(Category::kUnavailable,
                 "the token has not returned the previous checkpoint signature (slow or hung); not asking again yet");
  }
  busy_ = true;
  job_ = std::string(message);
  const uint64_t mine = ++asked_;
  result_.reset();
  cv_.notify_all();
  if (!cv_.wait_for(lock, timeout_, [&] { return answered_ >= mine; })) {
    ++timeouts_;
    return Error(Category::kUnavailable, "the token did not sign within call_timeout (" +
                                             std::to_string(timeout_.count()) + " ms); the call is left to finish");
  }
  auto r = std::move(*result_);
  result_.reset();
  return r;
}

bool DeadlineSigner::Drain(std::chrono::milliseconds limit) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, limit, [&] { return !busy_; });
}

uint64_t DeadlineSigner::timeouts() const {
  std::lock_guard lock(mu_);
  return timeouts_;
}

}  // namespace custody::core
