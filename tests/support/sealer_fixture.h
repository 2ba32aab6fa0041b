// Test support for the core below the CLI: a SoftHSM2 token opened in this
// process as custody opens it (the module loaded, the token's slot found by
// its URI, a logged-in session pool), a SQLite store beside it, and a
// Pkcs11Sealer over both; and on top of that, a SecretService on a clock
// the test moves.
//
//   class MyTest : public custody::test::SealerFixture {};
//   TEST_F(MyTest, X) { auto kek = sealer_->CreateKek("payments", 1); ... }
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "custody/app/backend.h"
#include "custody/hsm/module.h"
#include "custody/hsm/pkcs11_sealer.h"
#include "custody/hsm/session.h"
#include "custody/seal/sealer.h"
#include "custody/service/service.h"
#include "custody/store/store.h"
#include "testenv.h"

namespace custody::test {

// Opens `token` as custody does: loads the PKCS#11 module unless `module`
// already holds it, finds the token's slot by its URI, and logs a new
// session pool in. Fails the test where a step fails.
void OpenSessionPool(const SoftHsmToken& token, std::shared_ptr<hsm::Module>& module,
                     std::unique_ptr<hsm::SessionPool>& pool);

class SealerFixture : public ::testing::Test {
 protected:
  // The pool, the store (created at db_path()), and a Pkcs11Sealer on both.
  void SetUp() override;
  // The sealer and the pool go first: both hold on to the token's sessions.
  void TearDown() override;

  // The module is loaded once; a new pool is opened each time (after a
  // re-initialisation, say).
  void OpenPool() { OpenSessionPool(token_, module_, pool_); }
  void OpenStore();
  std::string db_path() const { return token_.dir() / "custody.db"; }

  SoftHsmToken token_;
  std::shared_ptr<hsm::Module> module_;
  std::unique_ptr<hsm::SessionPool> pool_;
  std::unique_ptr<core::Store> store_;
  std::unique_ptr<core::Sealer> sealer_;
};

// A SecretService over the fixture's store and sealer, with a clock the test
// sets (now_, from kT0), and project payments (prod, dev) created.
class ServiceFixture : public SealerFixture {
 protected:
  static constexpr int64_t kT0 = 1'800'000'000;
  static constexpr uint64_t kGrace = 3600;

  // SealerFixture's set-up, then StartService().
  void SetUp() override;
  // Starts the service on whichever sealer_ the test has made.
  void StartService();
  void TearDown() override;

  static core::SecretPath Path(const std::string& name, const std::string& env = "prod") {
    return {"payments", env, name};
  }
  // The version the put made (0 when it failed, which fails the test).
  uint32_t Put(const std::string& name, const std::string& value, const std::string& env = "prod");
  // A get with a grace of kGrace, the value as text.
  Result<std::string> Read(const std::string& name, std::optional<uint32_t> version = std::nullopt,
                           const std::string& env = "prod");
  void Sql(const std::string& sql) { ExecSql(db_path(), sql); }
  // Flips the last byte (the GCM tag's) of every stored version of secret
  // `name`, whatever that byte was.
  void FlipLastBlobByte(const std::string& name);

  int64_t now_ = kT0;
  std::unique_ptr<core::SecretService> svc_;
};

}  // namespace custody::test
