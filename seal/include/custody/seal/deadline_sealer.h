// DeadlineSealer: a Sealer whose calls cannot hold their caller past a
// deadline. custodyd wraps its backend's sealer in one, so that a token or
// TPM that stops answering (a network HSM hanging for minutes) costs the
// requests that reached it a 503 after `timeout`, not their threads, and
// every other request goes on on other sessions.
//
//   auto sealer = std::make_shared<DeadlineSealer>(backend_sealer, DeadlineSealer::Options{});
//   auto value = sealer->Unseal(kek, ctx, blob);   // kUnavailable after the deadline
//
// Each Seal, Unseal, Random and Recover runs on a caller thread of its own
// (kept for the next call when it returns). A call past its deadline is
// left to finish there: it keeps what it holds (its PKCS#11 session is not
// lent to anyone until the call returns), and its result, when it comes, is
// wiped unseen. At most `max_calls` calls are in flight, hung ones included;
// past that a call is refused at once. KEK management (create, destroy,
// rotation's clean-up) passes straight through: it runs from the CLI, where
// a person is watching.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "custody/seal/sealer.h"

namespace custody::core {

class DeadlineSealer final : public Sealer {
 public:
  struct Options {
    std::chrono::milliseconds timeout{5000};  // [token] call_timeout
    size_t max_calls = 16;                    // in flight at once, hung ones included
  };
  // `inner` must stay alive until Drain() returned true, or this object is
  // destroyed (which waits for every call to return).
  DeadlineSealer(Sealer& inner, Options options);
  ~DeadlineSealer() override;
  DeadlineSealer(const DeadlineSealer&) = delete;
  DeadlineSealer& operator=(const DeadlineSealer&) = delete;

  Result<KekRef> CreateKek(std::string_view project, uint32_t version, std::vector<uint8_t>* material) override {
    return inner_.CreateKek(project, version, material);
  }
  Status DestroyKek(const KekRef& kek) override { return inner_.DestroyKek(kek); }
  Result<size_t> DestroyUnrecorded(const std::string& label, const std::vector<KekId>& keep) override {
    return inner_.DestroyUnrecorded(label, keep);
  }
  std::string ResealMode() override { return inner_.ResealMode(); }

  Status Random(std::span<uint8_t> out) override;
  Result<std::vector<uint8_t>> Seal(const KekRef& kek, const SealContext& ctx, const SecretBuffer& value) override;
  Result<SecretBuffer> Unseal(const KekRef& expected, const SealContext& ctx, std::span<const uint8_t> blob) override;
  bool Recover(const Error& failure) override;
  Recoveries recoveries() const override { return inner_.recoveries(); }
  Stalls stalls() const override;

  // Waits up to `limit` for every call in flight to return; false if one
  // has not (a hung call: the backend must then not be closed under it).
  bool Drain(std::chrono::milliseconds limit);

 private:
  struct Call;
  // Runs `fn` on a caller thread and waits for it until the deadline.
  Status Run(const std::shared_ptr<Call>& call, const char* what);
  void Worker();

  Sealer& inner_;
  Options options_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_, idle_cv_;
  std::deque<std::shared_ptr<Call>> queue_;
  std::vector<std::thread> threads_;
  bool stop_ = false;
  uint64_t next_id_ = 0;
  std::map<uint64_t, std::chrono::steady_clock::time_point> running_;  // id -> start
  uint64_t timed_out_ = 0;
};

}  // namespace custody::core
