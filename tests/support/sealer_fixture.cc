#include "sealer_fixture.h"

#include "custody/app/backend.h"
#include "custody/hsm/pkcs11_sealer.h"
#include "custody/hsm/uri.h"
#include "custody/store/sqlite_store.h"

namespace custody::test {

void OpenSessionPool(const SoftHsmToken& token, std::shared_ptr<hsm::Module>& module,
                     std::unique_ptr<hsm::SessionPool>& pool) {
  if (!module) {
    auto m = hsm::Module::Load(SoftHsmToken::kModule);
    ASSERT_TRUE(m.ok()) << m.error().message();
    module = *m;
  }
  auto slot = hsm::FindSlot(*module, *hsm::TokenUri::Parse(token.uri()));
  ASSERT_TRUE(slot.ok()) << slot.error().message();
  auto opened = hsm::SessionPool::Open(module, *slot, token.pin());
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  pool = std::move(*opened);
}

void SealerFixture::SetUp() {
  ASSERT_NO_FATAL_FAILURE(OpenPool());
  ASSERT_NO_FATAL_FAILURE(OpenStore());
  sealer_ = std::make_unique<core::Pkcs11Sealer>(*pool_, *store_);
}

void SealerFixture::TearDown() {
  sealer_.reset();
  pool_.reset();
}

void SealerFixture::OpenStore() {
  auto store = core::OpenSqliteStore(db_path(), true);
  ASSERT_TRUE(store.ok()) << store.error().message();
  store_ = std::move(*store);
}

void ServiceFixture::SetUp() {
  ASSERT_NO_FATAL_FAILURE(SealerFixture::SetUp());
  StartService();
}

void ServiceFixture::StartService() {
  svc_ = std::make_unique<core::SecretService>(*store_, *sealer_, [this] { return now_; });
  ASSERT_TRUE(svc_->CreateProject("payments", {"prod", "dev"}).ok());
}

void ServiceFixture::TearDown() {
  svc_.reset();
  SealerFixture::TearDown();
}

uint32_t ServiceFixture::Put(const std::string& name, const std::string& value, const std::string& env) {
  auto v = svc_->Put(Path(name, env), SecretBuffer::Copy(value));
  EXPECT_TRUE(v.ok()) << v.error().message();
  return v.ok() ? *v : 0;
}

Result<std::string> ServiceFixture::Read(const std::string& name, std::optional<uint32_t> version,
                                         const std::string& env) {
  CUSTODY_ASSIGN_OR_RETURN(auto u, svc_->Get(Path(name, env), version, kGrace));
  return std::string(u.value.RevealString(SecretAccess{}));
}

void ServiceFixture::FlipLastBlobByte(const std::string& name) {
  Sql("UPDATE secret_versions SET blob = substr(blob, 1, length(blob) - 1) || "
      "CASE WHEN substr(blob, -1) = x'00' THEN x'01' ELSE x'00' END "
      "WHERE secret_id = (SELECT id FROM secrets WHERE name = '" +
      name + "')");
}

}  // namespace custody::test
