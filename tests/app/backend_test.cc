// The same flows on both sealing backends (parameterised): a SoftHSM2
// token, and a TPM (swtpm, one per test). Put, get, rotate with grace,
// revoke, retention, KEK rotation and tamper detection must behave the same
// whichever backend holds the keys.
#include <gtest/gtest.h>

#include "../support/sealer_fixture.h"
#include "custody/app/backend.h"
#include "custody/hsm/pkcs11_sealer.h"
#include "custody/service/kek_rotation.h"
#include "custody/service/service.h"
#include "custody/store/sqlite_store.h"
#include "custody/store/store.h"
#include "custody/tpm/tpm_sealer.h"

namespace custody::core {
namespace {

using test::SoftHsmToken;
using test::Swtpm;

class BackendTest : public test::ServiceFixture, public ::testing::WithParamInterface<std::string> {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(OpenStore());
    if (GetParam() == "tpm") {
      swtpm_ = std::make_unique<Swtpm>();
      CUSTODY_REQUIRE_SWTPM(*swtpm_);
      auto t = tpm::Tpm::Open({.tcti = swtpm_->tcti()});
      ASSERT_TRUE(t.ok()) << t.error().message();
      tpm_ = std::move(*t);
      sealer_ = std::make_unique<TpmSealer>(*tpm_, *store_, *store_, token_.pin(), TpmSealer::Options{});
    } else {
      ASSERT_NO_FATAL_FAILURE(OpenPool());
      sealer_ = std::make_unique<Pkcs11Sealer>(*pool_, *store_);
    }
    StartService();
  }
  void TearDown() override {
    ServiceFixture::TearDown();
    tpm_.reset();
  }

  std::unique_ptr<Swtpm> swtpm_;
  std::unique_ptr<tpm::Tpm> tpm_;
};

TEST_P(BackendTest, PutGetRotateWithGraceRevokeAndRetention) {
  EXPECT_EQ(Put("stripe", "one"), 1u);
  now_ += 100;
  EXPECT_EQ(Put("stripe", "two"), 2u);
  EXPECT_EQ(*Read("stripe"), "two");
  EXPECT_EQ(*Read("stripe", 1), "one");
  now_ += kGrace;
  EXPECT_EQ(Read("stripe", 1).error().category(), Category::kDenied);
  ASSERT_TRUE(svc_->Revoke(Path("stripe"), 2, "exposed", "user:sec").ok());
  EXPECT_EQ(*Read("stripe"), "one") << "the newest remaining version is current again";
  ASSERT_TRUE(svc_->Revoke(Path("stripe"), 1, "exposed", "user:sec").ok());
  EXPECT_EQ(Read("stripe").error().category(), Category::kNotFound);
  EXPECT_EQ(Put("stripe", "three"), 3u);
  now_ += kGrace;
  auto trimmed = svc_->ApplyRetention(Path("stripe"), 1, kGrace);
  ASSERT_TRUE(trimmed.ok());
  EXPECT_EQ(*trimmed, (std::vector<uint32_t>{1, 2}));
  EXPECT_EQ(*Read("stripe"), "three");
}

TEST_P(BackendTest, ABlobMovedToAnotherContextOrAlteredIsRefused) {
  Put("a", "value-a");
  Put("b", "value-b");
  // Swap the two blobs in the store, as someone with write access to it could.
  Sql("UPDATE secret_versions SET blob = (SELECT blob FROM secret_versions v JOIN secrets s ON s.id = v.secret_id "
      "WHERE s.name = 'b') WHERE secret_id = (SELECT id FROM secrets WHERE name = 'a')");
  auto moved = Read("a");
  ASSERT_FALSE(moved.ok());
  EXPECT_EQ(moved.error().category(), Category::kIntegrity) << moved.error().message();
  // Flip the last byte (the tag's), whatever it was.
  FlipLastBlobByte("b");
  auto altered = Read("b");
  ASSERT_FALSE(altered.ok()) << "an altered tag must not unseal";
  EXPECT_EQ(altered.error().category(), Category::kIntegrity);
}

TEST_P(BackendTest, KekRotationReSealsEverythingAndForgetsTheOldKek) {
  Put("a", "value-a");
  Put("a", "value-a2");
  Put("b", "value-b", "dev");
  KekRotator rot(*store_, *sealer_, [this] { return now_; });
  auto r = rot.Run("payments", {});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->resealed, 3u);
  EXPECT_EQ(r->kek.ref.version, 2u);
  EXPECT_EQ(*Read("a"), "value-a2");
  EXPECT_EQ(*Read("a", 1), "value-a");
  EXPECT_EQ(*Read("b", std::nullopt, "dev"), "value-b");
  auto keks = store_->ProjectKeks(r->kek.project_id);
  ASSERT_EQ(keks->size(), 2u);
  EXPECT_EQ((*keks)[0].state, KekState::kDestroyed);
  // Whatever the backend, the old KEK is unusable afterwards: gone from the
  // token, or its sealed object gone from the store.
  auto old = sealer_->Seal((*keks)[0].ref, {"payments", "prod", "x", 1}, SecretBuffer::Copy("v"));
  EXPECT_FALSE(old.ok());
  // And a second rotation works from there.
  auto again = rot.Run("payments", {});
  ASSERT_TRUE(again.ok()) << again.error().message();
  EXPECT_EQ(*Read("a"), "value-a2");
}

TEST_P(BackendTest, GeneratedValuesComeFromTheBackendsRng) {
  auto a = GenerateValue(*sealer_, 32, ValueFormat::kHex, "sk-");
  auto b = GenerateValue(*sealer_, 32, ValueFormat::kHex, "sk-");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->size(), 67u);
  EXPECT_FALSE(a->Equals(*b));
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendTest, ::testing::Values("pkcs11", "tpm"),
                         [](const auto& p) { return p.param; });

// TPM only: a KEK bound to a PCR stops opening when the PCR changes, and the
// error says why; a KEK sealed with another PIN does not open.
TEST(TpmBackend, APcrBoundKekFailsAfterAnExtendAndSaysWhy) {
  SoftHsmToken token;  // only for its temporary folder and PIN
  Swtpm swtpm;
  CUSTODY_REQUIRE_SWTPM(swtpm);
  auto store = OpenSqliteStore(token.dir() / "custody.db", true);
  ASSERT_TRUE(store.ok());
  auto tpm = tpm::Tpm::Open({.tcti = swtpm.tcti()});
  ASSERT_TRUE(tpm.ok());
  TpmSealer sealer(**tpm, **store, **store, token.pin(), {.pcrs = {16}});
  SecretService svc(**store, sealer);
  ASSERT_TRUE(svc.CreateProject("payments", {"prod"}).ok());
  SecretPath p{"payments", "prod", "k"};
  ASSERT_TRUE(svc.Put(p, SecretBuffer::Copy("bound")).ok());
  ASSERT_TRUE(svc.Get(p, std::nullopt).ok());
  ASSERT_TRUE((*tpm)->ExtendPcr(16, std::vector<uint8_t>{42}).ok());
  auto after = svc.Get(p, std::nullopt);
  ASSERT_FALSE(after.ok());
  EXPECT_EQ(after.error().category(), Category::kDenied);
  EXPECT_NE(after.error().message().find("sealed to another boot state"), std::string::npos)
      << after.error().message();

  TpmSealer other_pin(**tpm, **store, **store, SecretBuffer::Copy(std::string_view("another-pin")), {});
  SecretService svc2(**store, other_pin);
  ASSERT_TRUE(svc2.CreateProject("billing", {"prod"}).ok());
  SecretPath q{"billing", "prod", "k"};
  ASSERT_TRUE(svc2.Put(q, SecretBuffer::Copy("v")).ok());
  TpmSealer right_tpm_wrong_pin(**tpm, **store, **store, token.pin(), {});
  SecretService svc3(**store, right_tpm_wrong_pin);
  auto denied = svc3.Get(q, std::nullopt);
  ASSERT_FALSE(denied.ok());
  EXPECT_EQ(denied.error().category(), Category::kDenied);
  EXPECT_NE(denied.error().message().find("wrong auth value"), std::string::npos) << denied.error().message();
}

// TPM only: after the TPM refuses the PIN once, the sealer stops asking it:
// each further try would count towards the TPM-wide dictionary-attack
// lockout, for every user of the TPM. The TPM's own failure counter, read
// afterwards with tpm2_getcap, shows one try however often the caller asked.
TEST(TpmBackend, AWrongPinIsTriedOnceThenTheTpmIsNotAskedAgain) {
  SoftHsmToken token;  // only for its temporary folder and PIN
  Swtpm swtpm;
  CUSTODY_REQUIRE_SWTPM(swtpm);
  auto store = OpenSqliteStore(token.dir() / "custody.db", true);
  ASSERT_TRUE(store.ok());
  {
    auto tpm = tpm::Tpm::Open({.tcti = swtpm.tcti()});
    ASSERT_TRUE(tpm.ok()) << tpm.error().message();
    TpmSealer right(**tpm, **store, **store, token.pin(), {});
    SecretService svc(**store, right);
    ASSERT_TRUE(svc.CreateProject("payments", {"prod"}).ok());
    ASSERT_TRUE(svc.Put({"payments", "prod", "k"}, SecretBuffer::Copy("v")).ok());

    TpmSealer wrong(**tpm, **store, **store, SecretBuffer::Copy(std::string_view("not-the-pin")), {});
    SecretService svc2(**store, wrong);
    auto first = svc2.Get({"payments", "prod", "k"}, std::nullopt);
    ASSERT_FALSE(first.ok());
    EXPECT_NE(first.error().message().find("wrong auth value"), std::string::npos) << first.error().message();
    for (int i = 0; i < 3; ++i) {
      auto again = svc2.Get({"payments", "prod", "k"}, std::nullopt);
      ASSERT_FALSE(again.ok());
      EXPECT_EQ(again.error().category(), Category::kDenied);
      EXPECT_NE(again.error().message().find("refused this PIN earlier"), std::string::npos)
          << again.error().message();
    }
  }  // the TPM connection is closed: swtpm serves one client at a time
  test::RunResult cap = test::RunProgram("/usr/bin/tpm2_getcap", {"-T", swtpm.tcti(), "properties-variable"}, {});
  ASSERT_EQ(cap.exit_code, 0) << cap.err;
  const std::string key = "TPM2_PT_LOCKOUT_COUNTER: ";
  const size_t at = cap.out.find(key);
  ASSERT_NE(at, std::string::npos) << cap.out;
  EXPECT_EQ(std::stoul(cap.out.substr(at + key.size()), nullptr, 0), 1u)
      << "the TPM saw more than one try with the wrong PIN:\n" << cap.out;
}

}  // namespace
}  // namespace custody::core
