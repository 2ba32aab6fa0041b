// DeadlineSealer over a fake backend whose calls block until the test lets
// them go (the real token's hang is tests/server's HungTokenServerTest):
// the caller is let go at the deadline with kUnavailable, the call goes on
// and its late result is dropped, calls past the bound are refused at
// once, stalls() and Drain() say what is still out.
#include "custody/seal/deadline_sealer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace custody::core {
namespace {

using namespace std::chrono_literals;

// Unseal answers the blob's bytes as the value; it blocks while `held`.
class GateSealer final : public Sealer {
 public:
  Result<KekRef> CreateKek(std::string_view, uint32_t, std::vector<uint8_t>*) override { return KekRef{}; }
  Status DestroyKek(const KekRef&) override { return Status::Ok(); }
  Result<size_t> DestroyUnrecorded(const std::string&, const std::vector<KekId>&) override { return size_t{0}; }
  std::string ResealMode() override { return "fake"; }
  Status Random(std::span<uint8_t> out) override {
    Wait();
    for (auto& b : out) b = 7;
    return Status::Ok();
  }
  Result<std::vector<uint8_t>> Seal(const KekRef&, const SealContext& ctx, const SecretBuffer& value) override {
    Wait();
    std::vector<uint8_t> out(ctx.name.begin(), ctx.name.end());
    auto v = value.Reveal(SecretAccess{});
    out.insert(out.end(), v.begin(), v.end());
    return out;
  }
  Result<SecretBuffer> Unseal(const KekRef&, const SealContext&, std::span<const uint8_t> blob) override {
    Wait();
    return SecretBuffer::Copy(blob);
  }

  void Hold() {
    std::lock_guard l(mu_);
    held_ = true;
  }
  void Release() {
    {
      std::lock_guard l(mu_);
      held_ = false;
    }
    cv_.notify_all();
  }
  std::atomic<int> returned{0};

 private:
  void Wait() {
    std::unique_lock l(mu_);
    cv_.wait(l, [&] { return !held_; });
    ++returned;
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool held_ = false;
};

const std::vector<uint8_t> kBlob = {'s', 'e', 'c', 'r', 'e', 't'};

TEST(DeadlineSealer, CallsThatAnswerInTimeAreUnchanged) {
  GateSealer inner;
  DeadlineSealer s(inner, {1000ms, 4});
  auto v = s.Unseal({}, {"p", "e", "n", 1}, kBlob);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->RevealString(SecretAccess{}), "secret");
  auto b = s.Seal({}, {"p", "e", "n", 1}, SecretBuffer::Copy(std::string_view("xy")));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(std::string(b->begin(), b->end()), "nxy");
  std::array<uint8_t, 4> r{};
  ASSERT_TRUE(s.Random(r).ok());
  EXPECT_EQ(r, (std::array<uint8_t, 4>{7, 7, 7, 7}));
  EXPECT_EQ(s.stalls().timed_out, 0u);
  EXPECT_TRUE(s.Drain(1000ms));
}

TEST(DeadlineSealer, AHungCallLetsItsCallerGoAtTheDeadlineAndOthersGoOn) {
  GateSealer inner;
  DeadlineSealer s(inner, {200ms, 4});
  inner.Hold();
  auto hung = s.Unseal({}, {"p", "e", "n", 1}, kBlob);
  ASSERT_FALSE(hung.ok());
  EXPECT_EQ(hung.error().category(), Category::kUnavailable);
  EXPECT_NE(hung.error().message().find("did not answer an unseal within 200 ms"), std::string::npos)
      << hung.error().message();
  EXPECT_EQ(inner.returned.load(), 0) << "the call is still out";
  auto st = s.stalls();
  EXPECT_EQ(st.timed_out, 1u);
  EXPECT_EQ(st.hung, 1u);
  EXPECT_GT(st.hung_since, 0);
  EXPECT_FALSE(s.Drain(50ms));
  // The backend answers again: the late result is dropped, nothing is out.
  inner.Release();
  EXPECT_TRUE(s.Drain(5000ms));
  EXPECT_EQ(inner.returned.load(), 1);
  st = s.stalls();
  EXPECT_EQ(st.hung, 0u);
  EXPECT_EQ(st.hung_since, 0);
  EXPECT_EQ(st.timed_out, 1u);
  auto v = s.Unseal({}, {"p", "e", "n", 1}, kBlob);
  ASSERT_TRUE(v.ok()) << v.error().message();
}

TEST(DeadlineSealer, PastItsBoundOfCallsOutItRefusesAtOnce) {
  GateSealer inner;
  DeadlineSealer s(inner, {100ms, 2});
  inner.Hold();
  EXPECT_FALSE(s.Unseal({}, {"p", "e", "n", 1}, kBlob).ok());
  EXPECT_FALSE(s.Unseal({}, {"p", "e", "n", 1}, kBlob).ok());
  // Both threads are held: the third is refused without waiting for the
  // deadline, and says why.
  auto third = s.Unseal({}, {"p", "e", "n", 1}, kBlob);
  ASSERT_FALSE(third.ok());
  EXPECT_NE(third.error().message().find("2 calls to it are still waiting"), std::string::npos)
      << third.error().message();
  EXPECT_EQ(s.stalls().timed_out, 2u) << "the third did not wait for a deadline";
  inner.Release();
  EXPECT_TRUE(s.Drain(5000ms));
  EXPECT_TRUE(s.Unseal({}, {"p", "e", "n", 1}, kBlob).ok());
}

TEST(DeadlineSealer, ManyCallersAtOnceEachGetTheirOwnAnswer) {
  GateSealer inner;
  DeadlineSealer s(inner, {5000ms, 8});
  std::vector<std::thread> t;
  std::atomic<int> right{0};
  for (int i = 0; i < 8; ++i) {
    t.emplace_back([&, i] {
      for (int j = 0; j < 200; ++j) {
        const std::vector<uint8_t> blob = {static_cast<uint8_t>(i), static_cast<uint8_t>(j)};
        auto v = s.Unseal({}, {"p", "e", "n", 1}, blob);
        if (v.ok() && v->Reveal(SecretAccess{})[0] == i && v->Reveal(SecretAccess{})[1] == j) ++right;
      }
    });
  }
  for (auto& th : t) th.join();
  EXPECT_EQ(right.load(), 8 * 200);
}

}  // namespace
}  // namespace custody::core
