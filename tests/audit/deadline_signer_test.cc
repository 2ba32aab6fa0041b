// DeadlineSigner: a checkpoint signature that does not come back within the
// deadline fails at the deadline (the batch goes on), the next one fails at
// once while the first is still out, and once it returns signing works
// again. The inner signer here blocks until the test lets it go.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>

#include "custody/audit/deadline_signer.h"

namespace custody::core {
namespace {

using namespace std::chrono_literals;

class GateSigner final : public AuditSigner {
 public:
  Result<std::vector<uint8_t>> Sign(std::string_view message) override {
    ++calls;
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return open_; });
    return std::vector<uint8_t>(message.begin(), message.end());
  }
  std::string key_id() const override { return "gate"; }
  Result<std::string> PublicKeyPem() const override { return std::string("pem"); }
  void Open(bool open) {
    {
      std::lock_guard lock(mu_);
      open_ = open;
    }
    cv_.notify_all();
  }
  std::atomic<int> calls{0};

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
};

TEST(DeadlineSigner, AHungSignatureFailsAtTheDeadlineAndDoesNotQueueAnother) {
  GateSigner inner;
  DeadlineSigner signer(inner, 200ms);
  // Whatever fails below, the gate opens before the signer joins its worker.
  struct Reopen {
    GateSigner& g;
    ~Reopen() { g.Open(true); }
  } reopen{inner};
  auto ok = signer.Sign("one");
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_EQ(std::string(ok->begin(), ok->end()), "one");

  inner.Open(false);  // the token stops answering
  const auto t0 = std::chrono::steady_clock::now();
  auto hung = signer.Sign("two");
  const auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(hung.ok());
  EXPECT_EQ(hung.error().category(), Category::kUnavailable);
  EXPECT_NE(hung.error().message().find("call_timeout (200 ms)"), std::string::npos) << hung.error().message();
  EXPECT_LT(waited, 3s) << "it waited for the hung call, not the deadline";
  EXPECT_EQ(signer.timeouts(), 1u);
  // While that call is out, another is refused at once and never reaches the token.
  auto again = signer.Sign("three");
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.error().message().find("has not returned the previous"), std::string::npos);
  EXPECT_EQ(inner.calls.load(), 2);
  EXPECT_FALSE(signer.Drain(50ms));

  inner.Open(true);  // it returns
  EXPECT_TRUE(signer.Drain(5s));
  auto back = signer.Sign("four");
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(std::string(back->begin(), back->end()), "four") << "never the stale answer of the hung call";
  EXPECT_EQ(signer.key_id(), "gate");
}

}  // namespace
}  // namespace custody::core
