// A checkpoint signature under [token] call_timeout. A checkpoint is signed
// inside an audit batch (it covers the record just before it), so a token
// whose C_Sign hangs would hold that batch, and with it every request
// waiting for its record. Through this wrapper the signature gets the same
// deadline as a request's token call: past it the checkpoint fails (the
// records of the batch are still written), custodyd logs it and tries again
// at the next tick. The call itself is left to finish on this object's
// worker thread; while it is out, further checkpoints fail at once instead
// of queueing behind it.
//
//   core::DeadlineSigner signer(**token_signer, std::chrono::milliseconds(5000));
//   audit->Checkpoint(signer, &covers);
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "custody/audit/audit.h"

namespace custody::core {

class DeadlineSigner final : public AuditSigner {
 public:
  // `inner` must outlive this object, whose destructor waits for a call
  // still out (see Drain).
  DeadlineSigner(AuditSigner& inner, std::chrono::milliseconds timeout);
  ~DeadlineSigner() override;
  DeadlineSigner(const DeadlineSigner&) = delete;
  DeadlineSigner& operator=(const DeadlineSigner&) = delete;

  Result<std::vector<uint8_t>> Sign(std::string_view message) override;
  std::string key_id() const override { return inner_.key_id(); }
  Result<std::string> PublicKeyPem() const override { return inner_.PublicKeyPem(); }

  // Waits up to `limit` for a call still out; false if it has not returned.
  bool Drain(std::chrono::milliseconds limit);
  uint64_t timeouts() const;

 private:
  void Worker();

  AuditSigner& inner_;
  const std::chrono::milliseconds timeout_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool busy_ = false;                   // a call is with the inner signer
  std::optional<std::string> job_;      // the message to sign next
  uint64_t asked_ = 0, answered_ = 0;   // calls handed over / returned
  std::optional<Result<std::vector<uint8_t>>> result_;
  uint64_t timeouts_ = 0;
  std::thread worker_;
};

}  // namespace custody::core
