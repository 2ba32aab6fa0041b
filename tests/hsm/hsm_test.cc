// The PKCS#11 layer against a real SoftHSM2 token (one per test).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <thread>

#include "../support/testenv.h"
#include "custody/hsm/module.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/rv.h"
#include "custody/hsm/session.h"
#include "custody/hsm/uri.h"

namespace custody::hsm {
namespace {

using test::SoftHsmToken;

TEST(Rv, NamesAndCategories) {
  EXPECT_EQ(RvName(CKR_PIN_INCORRECT), "CKR_PIN_INCORRECT");
  EXPECT_EQ(RvName(0x12345), "CKR_0x00012345");
  EXPECT_EQ(RvCategory(CKR_PIN_INCORRECT), Category::kDenied);
  EXPECT_EQ(RvCategory(CKR_PIN_LOCKED), Category::kDenied);
  EXPECT_EQ(RvCategory(CKR_TOKEN_NOT_PRESENT), Category::kUnavailable);
  EXPECT_EQ(RvCategory(CKR_DEVICE_REMOVED), Category::kUnavailable);
  EXPECT_EQ(RvCategory(CKR_SESSION_HANDLE_INVALID), Category::kUnavailable);
  EXPECT_EQ(RvCategory(CKR_ENCRYPTED_DATA_INVALID), Category::kIntegrity);
  Error e = RvError(CKR_PIN_LOCKED, "C_Login");
  EXPECT_EQ(e.message().rfind("C_Login failed: CKR_PIN_LOCKED: ", 0), 0u) << e.message();
  EXPECT_NE(e.message().find("security officer"), std::string::npos);
  EXPECT_EQ(e.backend(), Backend::kPkcs11);
  EXPECT_EQ(e.code(), CKR_PIN_LOCKED);
  EXPECT_TRUE(IsSessionFatal(CKR_SESSION_HANDLE_INVALID));
  EXPECT_FALSE(IsSessionFatal(CKR_ENCRYPTED_DATA_INVALID));
}

TEST(TokenUri, RefusesPinsObjectsAndGarbage) {
  auto pin = TokenUri::Parse("pkcs11:token=custody?pin-value=1234");
  ASSERT_FALSE(pin.ok());
  EXPECT_EQ(pin.error().category(), Category::kConfig);
  EXPECT_EQ(pin.error().message().find("1234"), std::string::npos) << "a PIN must not be echoed";
  auto obj = TokenUri::Parse("pkcs11:token=custody;object=mykey");
  ASSERT_FALSE(obj.ok());
  EXPECT_NE(obj.error().message().find("names an object"), std::string::npos);
  auto bad = TokenUri::Parse("https://example.invalid/");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().category(), Category::kConfig);
}

// README: the PIN is never accepted in the token URI (pin-value and
// pin-source are refused). Both forms, with the message that names the fix,
// as a config error (exit 78), and the PIN or its source never echoed.
TEST(TokenUri, RefusesPinValueAndPinSourceNamingTheFix) {
  for (const char* uri : {"pkcs11:token=x?pin-source=file:/tmp/p", "pkcs11:token=x?pin-value=1234",
                                "pkcs11:token=x;serial=abc?pin-value=1234&module-name=softhsm2"}) {
    SCOPED_TRACE(uri);
    auto r = TokenUri::Parse(uri);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().category(), Category::kConfig);
    EXPECT_EQ(r.error().message(),
              "token URI carries a PIN (pin-value or pin-source); give the PIN through pin_file, CUSTODY_PIN or "
              "--pin-fd instead");
    EXPECT_EQ(r.error().message().find("/tmp/p"), std::string::npos);
    EXPECT_EQ(r.error().message().find("1234"), std::string::npos);
  }
  // The same token without them parses.
  EXPECT_TRUE(TokenUri::Parse("pkcs11:token=x").ok());
}

TEST(Module, MissingModuleIsAConfigError) {
  auto m = Module::Load("/nonexistent/libpkcs11.so");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().category(), Category::kConfig);
  EXPECT_NE(m.error().message().find("/nonexistent/libpkcs11.so"), std::string::npos);
}

TEST(Module, NotAModuleIsAConfigError) {
  auto m = Module::Load("/lib/x86_64-linux-gnu/libc.so.6");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().category(), Category::kConfig);
}

TEST(Module, SamePathSharesOneInitialisation) {
  SoftHsmToken token;
  auto a = Module::Load(SoftHsmToken::kModule);
  ASSERT_TRUE(a.ok()) << a.error().message();
  auto b = Module::Load(SoftHsmToken::kModule);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->get(), b->get());
  EXPECT_TRUE((*a)->owns_initialization());
}

TEST(Module, AnotherOwnersInitialisationIsRespected) {
  // Simulates libp11 having initialised the module first: we must see
  // CKR_CRYPTOKI_ALREADY_INITIALIZED, not own it, and not finalise it.
  SoftHsmToken token;
  void* dl = ::dlopen(SoftHsmToken::kModule, RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(dl, nullptr);
  auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(dl, "C_GetFunctionList"));
  CK_FUNCTION_LIST* fn = nullptr;
  ASSERT_EQ(get(&fn), CKR_OK);
  ASSERT_EQ(fn->C_Initialize(nullptr), CKR_OK);
  {
    auto m = Module::Load(SoftHsmToken::kModule);
    ASSERT_TRUE(m.ok()) << m.error().message();
    EXPECT_FALSE((*m)->owns_initialization());
  }
  // Still initialised after our Module is gone: the owner finalises.
  CK_INFO info{};
  EXPECT_EQ(fn->C_GetInfo(&info), CKR_OK);
  EXPECT_EQ(fn->C_Finalize(nullptr), CKR_OK);
}

TEST(FindSlot, SelectsByLabelAndReportsWhatExists) {
  SoftHsmToken token("alpha");
  token.AddToken("beta");
  auto m = Module::Load(SoftHsmToken::kModule);
  ASSERT_TRUE(m.ok());
  auto beta = FindSlot(**m, *TokenUri::Parse("pkcs11:token=beta"));
  ASSERT_TRUE(beta.ok()) << beta.error().message();
  CK_TOKEN_INFO ti{};
  ASSERT_EQ((*m)->fn()->C_GetTokenInfo(*beta, &ti), CKR_OK);
  EXPECT_EQ(TrimPadded(ti.label, sizeof ti.label), "beta");

  auto none = FindSlot(**m, *TokenUri::Parse("pkcs11:token=gamma"));
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().category(), Category::kUnavailable);
  EXPECT_NE(none.error().message().find("'alpha'"), std::string::npos) << none.error().message();
  EXPECT_NE(none.error().message().find("'beta'"), std::string::npos);

  auto both = FindSlot(**m, *TokenUri::Parse("pkcs11:model=SoftHSM%20v2"));
  ASSERT_FALSE(both.ok());
  EXPECT_EQ(both.error().category(), Category::kConfig);
  EXPECT_NE(both.error().message().find("matches 2 tokens"), std::string::npos);

  // serial= disambiguates.
  std::string serial = TrimPadded(ti.serialNumber, sizeof ti.serialNumber);
  auto by_serial = FindSlot(**m, *TokenUri::Parse("pkcs11:model=SoftHSM%20v2;serial=" + serial));
  ASSERT_TRUE(by_serial.ok());
  EXPECT_EQ(*by_serial, *beta);
}

class PoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Module::Load(SoftHsmToken::kModule);
    ASSERT_TRUE(m.ok()) << m.error().message();
    module_ = *m;
    auto slot = FindSlot(*module_, *TokenUri::Parse(token_.uri()));
    ASSERT_TRUE(slot.ok());
    slot_ = *slot;
  }
  SoftHsmToken token_;
  std::shared_ptr<Module> module_;
  CK_SLOT_ID slot_ = 0;
};

TEST_F(PoolTest, WrongPinIsDeniedWithAdvice) {
  auto pool = SessionPool::Open(module_, slot_, SecretBuffer::Copy(std::string_view("wrong-pin")));
  ASSERT_FALSE(pool.ok());
  EXPECT_EQ(pool.error().category(), Category::kDenied);
  EXPECT_EQ(pool.error().code(), CKR_PIN_INCORRECT);
  EXPECT_NE(pool.error().message().find("C_Login failed: CKR_PIN_INCORRECT"), std::string::npos);
  EXPECT_EQ(pool.error().message().find("wrong-pin"), std::string::npos);
  EXPECT_EQ(module_->open_sessions(), 0) << "the failed login's session must be closed";
}

TEST_F(PoolTest, SessionsAreReusedAndAllClosedWithThePool) {
  std::vector<CK_SESSION_HANDLE> seen;
  {
    auto pool = SessionPool::Open(module_, slot_, token_.pin());
    ASSERT_TRUE(pool.ok()) << pool.error().message();
    {
      auto a = (*pool)->Acquire();
      auto b = (*pool)->Acquire();
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_NE((*a)->handle(), (*b)->handle());
      seen = {(*a)->handle(), (*b)->handle()};
      EXPECT_EQ(module_->open_sessions(), 3);  // anchor + two leases
    }
    EXPECT_EQ((*pool)->idle(), 2u);
    auto c = (*pool)->Acquire();
    ASSERT_TRUE(c.ok());
    EXPECT_TRUE((*c)->handle() == seen[0] || (*c)->handle() == seen[1]) << "an idle session is reused";
    seen.push_back((*c)->handle());
  }
  EXPECT_EQ(module_->open_sessions(), 0);
  // The token agrees: every handle we had is gone.
  CK_SESSION_INFO info{};
  for (CK_SESSION_HANDLE h : seen) EXPECT_EQ(module_->fn()->C_GetSessionInfo(h, &info), CKR_SESSION_HANDLE_INVALID);
}

TEST_F(PoolTest, DiscardedSessionIsClosedNotReturned) {
  auto pool = SessionPool::Open(module_, slot_, token_.pin());
  ASSERT_TRUE(pool.ok());
  CK_SESSION_HANDLE h;
  {
    auto a = (*pool)->Acquire();
    ASSERT_TRUE(a.ok());
    h = (*a)->handle();
    a->Discard();
  }
  EXPECT_EQ((*pool)->idle(), 0u);
  CK_SESSION_INFO info{};
  EXPECT_EQ(module_->fn()->C_GetSessionInfo(h, &info), CKR_SESSION_HANDLE_INVALID);
}

TEST_F(PoolTest, IdleSessionsAreCapped) {
  SessionPool::Options o;
  o.max_idle = 2;
  auto pool = SessionPool::Open(module_, slot_, token_.pin(), o);
  ASSERT_TRUE(pool.ok());
  {
    std::vector<SessionPool::Lease> leases;
    for (int i = 0; i < 5; ++i) leases.push_back(std::move(*(*pool)->Acquire()));
    EXPECT_EQ(module_->open_sessions(), 6);
  }
  EXPECT_EQ((*pool)->idle(), 2u);
  EXPECT_EQ(module_->open_sessions(), 3);
}

TEST_F(PoolTest, ConcurrentLeasesFromManyThreads) {
  auto pool = SessionPool::Open(module_, slot_, token_.pin());
  ASSERT_TRUE(pool.ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        auto l = (*pool)->Acquire();
        uint8_t buf[16];
        if (!l.ok() || !GenerateRandom(**l, buf).ok()) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LE((*pool)->idle(), 4u);
}

TEST_F(PoolTest, FindObjectsEndsItsSearchSoTheSessionStaysUsable) {
  auto pool = SessionPool::Open(module_, slot_, token_.pin());
  ASSERT_TRUE(pool.ok());
  auto l = (*pool)->Acquire();
  ASSERT_TRUE(l.ok());
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}};
  for (int i = 0; i < 3; ++i) {
    auto found = FindObjects(**l, t, 10);
    ASSERT_TRUE(found.ok()) << found.error().message();  // CKR_OPERATION_ACTIVE if Final were skipped
    EXPECT_TRUE(found->empty());
  }
}

}  // namespace
}  // namespace custody::hsm

namespace custody::hsm {
namespace {

class ReinitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Module::Load(SoftHsmToken::kModule);
    ASSERT_TRUE(m.ok()) << m.error().message();
    module_ = *m;
    ASSERT_TRUE(module_->owns_initialization());
    auto slot = FindSlot(*module_, *TokenUri::Parse(token_.uri()));
    ASSERT_TRUE(slot.ok());
    slot_ = *slot;
  }
  SoftHsmToken token_;
  std::shared_ptr<Module> module_;
  CK_SLOT_ID slot_ = 0;
};

TEST_F(ReinitTest, AStaleSessionNeverClosesTheNewSessionThatReusesItsNumber) {
  auto old = Session::Open(module_, slot_, true);
  ASSERT_TRUE(old.ok());
  CK_SESSION_HANDLE old_handle = old->handle();
  uint64_t gen = module_->generation();
  ASSERT_TRUE(module_->Reinitialize().ok());
  EXPECT_EQ(module_->generation(), gen + 1);
  auto fresh = Session::Open(module_, slot_, true);
  ASSERT_TRUE(fresh.ok());
  // SoftHSM numbers sessions from 1 again after C_Initialize, so the stale
  // object holds the new session's number; closing it must not touch it.
  EXPECT_EQ(fresh->handle(), old_handle) << "the case this guards against";
  { Session gone = std::move(*old); }
  CK_SESSION_INFO info{};
  EXPECT_EQ(module_->fn()->C_GetSessionInfo(fresh->handle(), &info), CKR_OK);
  EXPECT_EQ(module_->open_sessions(), 1);
}

TEST_F(ReinitTest, RecoverReinitialisesWhenANewLoginIsNotEnough) {
  auto pool = SessionPool::Open(module_, slot_, token_.pin());
  ASSERT_TRUE(pool.ok());
  // Finalised behind the pool's back: every call now answers
  // CKR_CRYPTOKI_NOT_INITIALIZED, which only a C_Initialize cures.
  module_->fn()->C_Finalize(nullptr);
  {
    auto lease = (*pool)->Acquire();
    EXPECT_FALSE(lease.ok());
  }
  ASSERT_TRUE((*pool)->Recover().ok());
  EXPECT_EQ((*pool)->reinitializations(), 1u);
  auto lease = (*pool)->Acquire();
  ASSERT_TRUE(lease.ok()) << lease.error().message();
  CK_SESSION_INFO info{};
  ASSERT_EQ((*lease)->fn()->C_GetSessionInfo((*lease)->handle(), &info), CKR_OK);
  EXPECT_EQ(info.state, CKS_RW_USER_FUNCTIONS) << "logged in again";
}

TEST_F(ReinitTest, ReinitialisingIsRefusedWhenNotAllowed) {
  auto pool = SessionPool::Open(module_, slot_, token_.pin());
  ASSERT_TRUE(pool.ok());
  (*pool)->set_allow_reinitialize(false);
  module_->fn()->C_Finalize(nullptr);
  EXPECT_FALSE((*pool)->Recover().ok());
  EXPECT_EQ((*pool)->reinitializations(), 0u);
  // Put it back for the pool's own clean-up.
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  module_->fn()->C_Initialize(&args);
}

}  // namespace
}  // namespace custody::hsm
