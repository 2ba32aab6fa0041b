// Sealing and unsealing in a real SoftHSM2 token, with a real SQLite ledger.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <optional>
#include <set>
#include <thread>

#include "../support/sealer_fixture.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/pkcs11_sealer.h"
#include "custody/hsm/rv.h"
#include "custody/seal/sealer.h"
#include "custody/service/service.h"
#include "custody/store/store.h"

namespace custody::core {
namespace {

class SealerTest : public test::SealerFixture {
 protected:
  void TearDown() override {
    SealerFixture::TearDown();
    if (module_) {
      EXPECT_EQ(module_->open_sessions(), 0);
    }
  }

  // A KEK in the token and recorded in the store, as `project create` does.
  KekRef MakeKek(const std::string& project) {
    auto kek = sealer_->CreateKek(project, 1);
    EXPECT_TRUE(kek.ok()) << kek.error().message();
    EXPECT_TRUE(store_->CreateProject(project, {"prod"}, *kek, KekLabel::For(project, 1)).ok());
    return *kek;
  }
};

const SecretBuffer kValue = SecretBuffer::Copy(std::string_view("sk-live-51H8abcDEFghiJKLmnoPQRstuVWXyz0123456789"));

TEST_F(SealerTest, RoundTripAndBlobShape) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto blob = sealer_->Seal(kek, ctx, kValue);
  ASSERT_TRUE(blob.ok()) << blob.error().message();
  EXPECT_EQ(blob->size(), kHeaderSize + kValue.size() + kTagSize);
  auto view = ParseBlob(*blob);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->header.kek, kek);
  // The plaintext does not appear in the blob.
  std::string b(blob->begin(), blob->end());
  EXPECT_EQ(b.find("sk-live"), std::string::npos);

  auto back = sealer_->Unseal(kek, ctx, *blob);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_TRUE(back->Equals(kValue));
}

TEST_F(SealerTest, NoncesAreFreshForEverySeal) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  std::set<std::vector<uint8_t>> nonces;
  for (int i = 0; i < 100; ++i) {
    auto blob = sealer_->Seal(kek, ctx, kValue);
    ASSERT_TRUE(blob.ok());
    auto view = ParseBlob(*blob);
    nonces.insert(std::vector<uint8_t>(view->header.nonce.begin(), view->header.nonce.end()));
  }
  EXPECT_EQ(nonces.size(), 100u);
}

TEST_F(SealerTest, KekIsSensitiveNonExtractableAndRecognisable) {
  KekRef kek = MakeKek("payments");
  auto lease = pool_->Acquire();
  ASSERT_TRUE(lease.ok());
  auto objects = hsm::ListObjects(**lease);
  ASSERT_TRUE(objects.ok());
  ASSERT_EQ(objects->size(), 1u);
  const auto& o = (*objects)[0];
  EXPECT_EQ(o.label, "custody:kek:payments:v1");
  EXPECT_EQ(o.id, std::vector<uint8_t>(kek.id.begin(), kek.id.end()));
  EXPECT_EQ(o.object_class, static_cast<CK_OBJECT_CLASS>(CKO_SECRET_KEY));
  EXPECT_EQ(o.key_type, static_cast<CK_KEY_TYPE>(CKK_AES));
  EXPECT_EQ(o.value_len, 32u);
  EXPECT_TRUE(o.token);
  EXPECT_TRUE(o.is_private);
  EXPECT_TRUE(o.sensitive);
  EXPECT_FALSE(o.extractable);
  EXPECT_TRUE(o.never_extractable);
  EXPECT_TRUE(o.always_sensitive);
  EXPECT_TRUE(o.local);

  // And the token really refuses to hand out its value.
  auto handles = hsm::FindObjects(**lease, {}, 10);
  ASSERT_EQ(handles->size(), 1u);
  std::vector<uint8_t> value(32);
  CK_ATTRIBUTE a{CKA_VALUE, value.data(), 32};
  EXPECT_EQ((*lease)->fn()->C_GetAttributeValue((*lease)->handle(), (*handles)[0], &a, 1), CKR_ATTRIBUTE_SENSITIVE);

  // What docs/ARCHITECTURE.md promises ("private, non-modifiable,
  // encrypt/decrypt only"; docs/ROTATION.md: CKA_WRAP/CKA_UNWRAP false), as
  // the token reports it for the fresh KEK: each attribute read on its own,
  // so one the token does not know fails by name.
  const std::pair<CK_ATTRIBUTE_TYPE, const char*> kFalse[] = {
      {CKA_MODIFIABLE, "CKA_MODIFIABLE"}, {CKA_WRAP, "CKA_WRAP"}, {CKA_UNWRAP, "CKA_UNWRAP"},
      {CKA_DERIVE, "CKA_DERIVE"},         {CKA_SIGN, "CKA_SIGN"}, {CKA_VERIFY, "CKA_VERIFY"}};
  const std::pair<CK_ATTRIBUTE_TYPE, const char*> kTrue[] = {{CKA_ENCRYPT, "CKA_ENCRYPT"},
                                                             {CKA_DECRYPT, "CKA_DECRYPT"}};
  auto read_bool = [&](CK_ATTRIBUTE_TYPE type, const char* name) -> std::optional<bool> {
    CK_BBOOL v = 0x55;  // neither CK_TRUE nor CK_FALSE: a read that wrote nothing shows
    CK_ATTRIBUTE attr{type, &v, sizeof v};
    CK_RV rv = (*lease)->fn()->C_GetAttributeValue((*lease)->handle(), (*handles)[0], &attr, 1);
    EXPECT_EQ(rv, CKR_OK) << name << ": " << hsm::RvName(rv);
    EXPECT_EQ(attr.ulValueLen, sizeof v) << name;
    if (rv != CKR_OK || (v != CK_TRUE && v != CK_FALSE)) return std::nullopt;
    return v == CK_TRUE;
  };
  for (const auto& [type, name] : kFalse) EXPECT_EQ(read_bool(type, name), std::optional<bool>(false)) << name;
  for (const auto& [type, name] : kTrue) EXPECT_EQ(read_bool(type, name), std::optional<bool>(true)) << name;
  // And non-modifiable holds: the token refuses to relabel it.
  std::string relabel = "custody:kek:billing:v1";
  CK_ATTRIBUTE l{CKA_LABEL, relabel.data(), static_cast<CK_ULONG>(relabel.size())};
  EXPECT_NE((*lease)->fn()->C_SetAttributeValue((*lease)->handle(), (*handles)[0], &l, 1), CKR_OK);
  auto after = hsm::ListObjects(**lease);
  ASSERT_TRUE(after.ok());
  ASSERT_EQ(after->size(), 1u);
  EXPECT_EQ((*after)[0].label, "custody:kek:payments:v1");
}

TEST_F(SealerTest, ABlobMovedToAnyOtherContextFailsToUnseal) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 3};
  auto blob = sealer_->Seal(kek, ctx, kValue);
  ASSERT_TRUE(blob.ok());
  for (SealContext other : {SealContext{"payments", "prod", "github", 3}, SealContext{"payments", "staging", "stripe", 3},
                            SealContext{"billing", "prod", "stripe", 3}, SealContext{"payments", "prod", "stripe", 2}}) {
    auto r = sealer_->Unseal(kek, other, *blob);
    ASSERT_FALSE(r.ok()) << other.project << "/" << other.environment << "/" << other.name << " v" << other.version;
    EXPECT_EQ(r.error().category(), Category::kIntegrity);
    EXPECT_NE(r.error().message().find("failed authentication"), std::string::npos) << r.error().message();
  }
}

TEST_F(SealerTest, AnotherProjectsKekIsRefusedBeforeTheToken) {
  KekRef a = MakeKek("payments");
  KekRef b = MakeKek("billing");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto blob = sealer_->Seal(a, ctx, kValue);
  ASSERT_TRUE(blob.ok());
  auto r = sealer_->Unseal(b, ctx, *blob);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kIntegrity);
  EXPECT_NE(r.error().message().find("store records another"), std::string::npos);
}

TEST_F(SealerTest, EveryFlippedBitAndEveryTruncationIsRefused) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto blob = sealer_->Seal(kek, ctx, SecretBuffer::Copy(std::string_view("short-value")));
  ASSERT_TRUE(blob.ok());
  for (size_t i = 0; i < blob->size(); ++i) {
    auto bad = *blob;
    bad[i] ^= 0x01;
    auto r = sealer_->Unseal(kek, ctx, bad);
    ASSERT_FALSE(r.ok()) << "flipped byte " << i;
    EXPECT_EQ(r.error().category(), Category::kIntegrity) << i << ": " << r.error().message();
  }
  for (size_t n = 0; n < blob->size(); ++n) {
    std::vector<uint8_t> cut(blob->begin(), blob->begin() + static_cast<ptrdiff_t>(n));
    auto r = sealer_->Unseal(kek, ctx, cut);
    ASSERT_FALSE(r.ok()) << "truncated to " << n;
    EXPECT_EQ(r.error().category(), Category::kIntegrity) << n << ": " << r.error().message();
  }
}

TEST_F(SealerTest, EmptyAndOversizedValuesAreRefused) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto empty = sealer_->Seal(kek, ctx, SecretBuffer());
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.error().category(), Category::kIntegrity);
  auto big = sealer_->Seal(kek, ctx, SecretBuffer(kMaxSecretSize + 1));
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.error().category(), Category::kUsage);
  auto max = sealer_->Seal(kek, ctx, SecretBuffer(kMaxSecretSize));
  EXPECT_TRUE(max.ok()) << max.error().message();
}

TEST_F(SealerTest, UsageBudgetIsDurableAndEnforced) {
  KekRef kek = MakeKek("payments");
  Pkcs11Sealer limited(*pool_, *store_, /*max_encryptions=*/5);
  SealContext ctx{"payments", "prod", "stripe", 1};
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(limited.Seal(kek, ctx, kValue).ok()) << i;
  auto over = limited.Seal(kek, ctx, kValue);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.error().category(), Category::kLimit);
  // The count lives in the store: a new Sealer (a new process) cannot reset it.
  Pkcs11Sealer fresh(*pool_, *store_, 5);
  EXPECT_EQ(fresh.Seal(kek, ctx, kValue).error().category(), Category::kLimit);
  EXPECT_EQ((*store_->ListKeks())[0].encryptions_reserved, 5u);
}

TEST_F(SealerTest, DeletedKekIsReportedAsMissing) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto blob = sealer_->Seal(kek, ctx, kValue);
  ASSERT_TRUE(blob.ok());
  ASSERT_TRUE(sealer_->DestroyKek(kek).ok());
  auto r = sealer_->Unseal(kek, ctx, *blob);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kNotFound);
  EXPECT_NE(r.error().message().find("is not in the token"), std::string::npos);
}

TEST_F(SealerTest, ANewSealerFindsTheKekByItsId) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto blob = sealer_->Seal(kek, ctx, kValue);
  ASSERT_TRUE(blob.ok());
  // As a new process would: no cached handle, the key is found by CKA_ID.
  Pkcs11Sealer other(*pool_, *store_);
  auto r = other.Unseal(kek, ctx, *blob);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_TRUE(r->Equals(kValue));
}

TEST_F(SealerTest, ConcurrentSealAndUnsealFromManyThreads) {
  KekRef kek = MakeKek("payments");
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        std::string name = "k" + std::to_string(t);
        SealContext ctx{"payments", "prod", name, static_cast<uint32_t>(i)};
        auto v = SecretBuffer::Copy(std::string_view(name + "-" + std::to_string(i)));
        auto blob = sealer_->Seal(kek, ctx, v);
        if (!blob.ok()) { ++failures; continue; }
        auto back = sealer_->Unseal(kek, ctx, *blob);
        if (!back.ok() || !back->Equals(v)) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(SealerTest, APoolRecoversAfterEverySessionOfTheApplicationWasClosed) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto blob = sealer_->Seal(kek, ctx, kValue);
  ASSERT_TRUE(blob.ok());
  // What a token reset (or a careless library in the process) does: every
  // session of this application is gone, and with them the login.
  ASSERT_EQ(module_->fn()->C_CloseAllSessions(pool_->slot()), CKR_OK);
  auto broken = sealer_->Unseal(kek, ctx, *blob);
  ASSERT_FALSE(broken.ok());
  EXPECT_EQ(broken.error().category(), Category::kUnavailable) << broken.error().message();
  EXPECT_TRUE(hsm::IsSessionFatal(broken.error().code())) << broken.error().message();
  ASSERT_TRUE(pool_->Recover().ok());
  EXPECT_EQ(pool_->recoveries(), 1u);
  auto back = sealer_->Unseal(kek, ctx, *blob);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_TRUE(back->Equals(kValue));
}

// A session that lost its login (C_Logout, or every session closed and a
// new one opened before the pool logged in again) sees no private object:
// its search for the KEK finds nothing. That is a session fault to recover
// from (a 503 at worst), not a deleted key (a 404 that tells the client
// its secret's key is gone). Seen under load when sessions were closed
// from outside (server_faults_test).
TEST_F(SealerTest, AKekSearchOnASessionThatLostItsLoginIsASessionFaultNotAMissingKey) {
  KekRef kek = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto blob = sealer_->Seal(kek, ctx, kValue);
  ASSERT_TRUE(blob.ok());
  {
    auto lease = pool_->Acquire();
    ASSERT_TRUE(lease.ok());
    ASSERT_EQ((*lease)->fn()->C_Logout((*lease)->handle()), CKR_OK);
  }
  Pkcs11Sealer fresh(*pool_, *store_);  // no cached handle: it must search
  auto lost = fresh.Unseal(kek, ctx, *blob);
  ASSERT_FALSE(lost.ok());
  EXPECT_EQ(lost.error().category(), Category::kUnavailable) << lost.error().message();
  EXPECT_EQ(lost.error().code(), static_cast<uint64_t>(CKR_USER_NOT_LOGGED_IN)) << lost.error().message();
  EXPECT_EQ(lost.error().message().find("is not in the token"), std::string::npos) << lost.error().message();
  EXPECT_NE(lost.error().message().find("login was lost"), std::string::npos) << lost.error().message();
  ASSERT_TRUE(fresh.Recover(lost.error()));
  auto back = fresh.Unseal(kek, ctx, *blob);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_TRUE(back->Equals(kValue));
}

TEST_F(SealerTest, ServiceCreateProjectRollsBackTheKekWhenTheStoreRefuses) {
  SecretService svc(*store_, *sealer_);
  ASSERT_TRUE(svc.CreateProject("payments", {"prod"}).ok());
  auto dup = svc.CreateProject("payments", {"dev"});
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().category(), Category::kUsage);
  auto lease = pool_->Acquire();
  auto objects = hsm::ListObjects(**lease);
  EXPECT_EQ(objects->size(), 1u) << "a refused project must not leave a KEK in the token";
}

// The sealer, counting the KEKs it was asked to make and to destroy: so a
// test can tell a refusal that came before the KEK from one that came after.
class CountingSealer : public Sealer {
 public:
  explicit CountingSealer(Sealer& real) : real_(real) {}
  Result<KekRef> CreateKek(std::string_view project, uint32_t version, std::vector<uint8_t>* material) override {
    auto r = real_.CreateKek(project, version, material);
    if (r.ok()) ++created;
    return r;
  }
  Status DestroyKek(const KekRef& kek) override {
    ++destroy_calls;
    return real_.DestroyKek(kek);
  }
  Result<size_t> DestroyUnrecorded(const std::string& label, const std::vector<KekId>& keep) override {
    return real_.DestroyUnrecorded(label, keep);
  }
  std::string ResealMode() override { return real_.ResealMode(); }
  Status Random(std::span<uint8_t> out) override { return real_.Random(out); }
  Result<std::vector<uint8_t>> Seal(const KekRef& kek, const SealContext& ctx, const SecretBuffer& value) override {
    return real_.Seal(kek, ctx, value);
  }
  Result<SecretBuffer> Unseal(const KekRef& expected, const SealContext& ctx, std::span<const uint8_t> blob) override {
    return real_.Unseal(expected, ctx, blob);
  }
  int created = 0, destroy_calls = 0;

 private:
  Sealer& real_;
};

// The duplicate above is refused before any KEK is made. Here the refusal
// comes after: another writer creates the project between the service's
// existence check and its insert (a trigger stands in for it, inserting the
// name just before the service's own row, which then breaks UNIQUE as it
// would after a concurrent create). The KEK made for the losing create must
// be destroyed again: no object with its label stays on the token.
TEST_F(SealerTest, ServiceCreateProjectDestroysTheKekWhenTheInsertLosesARace) {
  CountingSealer counting(*sealer_);
  SecretService svc(*store_, counting);
  ASSERT_TRUE(svc.CreateProject("payments", {"prod"}).ok());
  test::ExecSql(db_path(),
                "CREATE TRIGGER created_concurrently BEFORE INSERT ON projects WHEN NEW.name = 'billing' "
                "BEGIN INSERT INTO projects(name, created_at) VALUES (NEW.name, 0); END");
  auto lost = svc.CreateProject("billing", {"prod"});
  ASSERT_FALSE(lost.ok());
  EXPECT_EQ(lost.error().category(), Category::kUsage) << lost.error().message();
  EXPECT_NE(lost.error().message().find("project 'billing' already exists"), std::string::npos)
      << lost.error().message();
  EXPECT_EQ(counting.created, 2) << "the refusal must come after billing's KEK was made, or this tests nothing";
  EXPECT_EQ(counting.destroy_calls, 1);

  auto lease = pool_->Acquire();
  ASSERT_TRUE(lease.ok());
  auto objects = hsm::ListObjects(**lease);
  ASSERT_TRUE(objects.ok()) << objects.error().message();
  int billing = 0, payments = 0;
  for (const auto& o : *objects) {
    if (o.label == KekLabel::For("billing", 1)) ++billing;
    if (o.label == KekLabel::For("payments", 1)) ++payments;
  }
  EXPECT_EQ(billing, 0) << "the KEK of a create that lost the race stayed on the token";
  EXPECT_EQ(payments, 1);
  EXPECT_EQ(objects->size(), 1u);
  auto found = store_->FindProject("billing");
  ASSERT_FALSE(found.ok()) << "the trigger's row went with the failed statement";
  EXPECT_EQ(found.error().category(), Category::kNotFound);
}

TEST_F(SealerTest, ServicePutGetVersions) {
  SecretService svc(*store_, *sealer_);
  ASSERT_TRUE(svc.CreateProject("payments", {"prod", "dev"}).ok());
  auto path = *SecretPath::Parse("payments/prod/stripe");
  EXPECT_EQ(*svc.Put(path, SecretBuffer::Copy(std::string_view("one"))), 1u);
  EXPECT_EQ(*svc.Put(path, SecretBuffer::Copy(std::string_view("two"))), 2u);
  auto latest = svc.Get(path, std::nullopt);
  ASSERT_TRUE(latest.ok()) << latest.error().message();
  EXPECT_EQ(latest->version, 2u);
  EXPECT_EQ(latest->value.RevealString(SecretAccess{}), "two");
  EXPECT_EQ(svc.Get(path, 1)->value.RevealString(SecretAccess{}), "one");
  EXPECT_EQ(svc.Get(*SecretPath::Parse("payments/dev/stripe"), std::nullopt).error().category(), Category::kNotFound);
}

}  // namespace
}  // namespace custody::core

namespace custody::core {
namespace {

// SoftHSM2 creates a key's file empty, then writes its attributes into it in
// place (ObjectFile::store), so a process killed inside C_GenerateKey leaves
// the file cut at any byte. This is what a KEK rotation killed there leaves
// behind. At every cut, the token must stay listable (the cut object shown
// as unreadable, never failing the listing), the recorded KEK must still
// unseal, and step 1 of the next rotation must either remove the object (it
// bears the new KEK's label) or pass it by (its label never got written),
// never stop on it.
TEST_F(SealerTest, EveryCutOfAHalfWrittenKekLeavesTheTokenUsableAndTheRotationFree) {
  KekRef live = MakeKek("payments");
  SealContext ctx{"payments", "prod", "stripe", 1};
  auto blob = sealer_->Seal(live, ctx, kValue);
  ASSERT_TRUE(blob.ok());
  auto before = token_.ObjectFiles();
  ASSERT_TRUE(sealer_->CreateKek("payments", 2).ok());  // never recorded: the killed run's
  auto after = token_.ObjectFiles();
  std::vector<std::string> fresh;
  std::set_difference(after.begin(), after.end(), before.begin(), before.end(), std::back_inserter(fresh));
  ASSERT_EQ(fresh.size(), 1u);
  const std::string file = fresh[0];
  const std::string whole = test::ReadFile(file);
  const std::string lock_file = file.substr(0, file.size() - std::string(".object").size()) + ".lock";
  ASSERT_TRUE(std::filesystem::exists(lock_file));
  const std::string next_label = KekLabel::For("payments", 2);
  int removed = 0, unreadable_seen = 0;
  for (size_t cut = 0; cut < whole.size(); ++cut) {
    SCOPED_TRACE("object file cut at byte " + std::to_string(cut) + " of " + std::to_string(whole.size()));
    sealer_.reset();
    pool_.reset();
    test::WriteFile(file, whole.substr(0, cut));
    test::WriteFile(lock_file, "");  // SoftHSM makes it beside the object; a step 1 that removed both takes it too
    // SoftHSM reads its files again only at C_Initialize.
    ASSERT_TRUE(module_->Reinitialize().ok());
    ASSERT_NO_FATAL_FAILURE(OpenPool());
    sealer_ = std::make_unique<Pkcs11Sealer>(*pool_, *store_);
    {
      auto lease = pool_->Acquire();
      ASSERT_TRUE(lease.ok());
      auto objects = hsm::ListObjects(**lease);
      ASSERT_TRUE(objects.ok()) << objects.error().message();
      int live_listed = 0;
      for (const auto& o : *objects) {
        if (!o.readable()) {
          ++unreadable_seen;
          EXPECT_TRUE(o.label.empty()) << "an unreadable object claims no label";
        }
        if (o.readable() && o.label == KekLabel::For("payments", 1)) ++live_listed;
      }
      EXPECT_EQ(live_listed, 1);
    }
    auto r = sealer_->DestroyUnrecorded(next_label, {live.id});
    ASSERT_TRUE(r.ok()) << r.error().message();
    removed += static_cast<int>(*r);
    {
      auto lease = pool_->Acquire();
      auto objects = hsm::ListObjects(**lease);
      ASSERT_TRUE(objects.ok()) << objects.error().message();
      for (const auto& o : *objects) EXPECT_NE(o.label, next_label) << "step 1 left an object with the new label";
    }
    auto back = sealer_->Unseal(live, ctx, *blob);
    ASSERT_TRUE(back.ok()) << back.error().message();
    EXPECT_TRUE(back->Equals(kValue));
  }
  // Both kinds of leftover occur across the cuts: some carry the label and
  // are removed, some are too short to be told apart and are only shown.
  EXPECT_GT(removed, 0);
  EXPECT_GT(unreadable_seen, 0);
  std::cout << whole.size() << " cuts: " << removed << " removed by step 1, " << unreadable_seen
            << " listed as unreadable\n";
}

}  // namespace
}  // namespace custody::core
