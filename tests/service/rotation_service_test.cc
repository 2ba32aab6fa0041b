// Versions, grace, revocation and KEK rotation through SecretService and
// KekRotator, on a real SoftHSM2 token and a real SQLite store, with an
// injected clock so the grace semantics are tested to the second.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <memory>

#include "../support/sealer_fixture.h"
#include "custody/hsm/objects.h"
#include "custody/service/kek_rotation.h"
#include "custody/service/service.h"
#include "custody/store/store.h"

namespace custody::core {
namespace {

class RotationServiceTest : public test::ServiceFixture {
 protected:
  size_t KekObjects(const std::string& label) {
    auto lease = pool_->Acquire();
    EXPECT_TRUE(lease.ok());
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    std::string l = label;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, l.data(), static_cast<CK_ULONG>(l.size())}};
    auto found = hsm::FindObjects(**lease, t, 16);
    return found.ok() ? found->size() : 999;
  }
  EnvironmentRecord Env(const std::string& env = "prod") { return *store_->FindEnvironment("payments", env); }
  KekRecord ActiveKek() { return *store_->CurrentKek(Env().project_id); }
};

TEST_F(RotationServiceTest, PreviousVersionIsReadableExactlyUntilItsGraceEnds) {
  Put("stripe", "one");
  now_ += 100;
  Put("stripe", "two");  // v1 superseded at kT0 + 100
  EXPECT_EQ(*Read("stripe"), "two");
  now_ = kT0 + 100 + kGrace - 1;
  EXPECT_EQ(*Read("stripe", 1), "one") << "last second of the grace period";
  now_ = kT0 + 100 + kGrace;
  auto r = Read("stripe", 1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kDenied);
  EXPECT_NE(r.error().message().find("is retired"), std::string::npos) << r.error().message();
  EXPECT_EQ(*Read("stripe"), "two") << "the current version is unaffected";
}

TEST_F(RotationServiceTest, EachReplacedVersionKeepsItsOwnGraceStart) {
  Put("k", "one");
  now_ += 1000;
  Put("k", "two");  // v1 grace from kT0+1000
  now_ += 1000;
  Put("k", "three");  // v2 grace from kT0+2000; v1 keeps kT0+1000
  now_ = kT0 + 1000 + kGrace;
  EXPECT_FALSE(Read("k", 1).ok());
  EXPECT_EQ(*Read("k", 2), "two");
}

TEST_F(RotationServiceTest, RevokingCurrentRestoresThePreviousWithAFreshStart) {
  Put("k", "one");
  now_ += 10;
  Put("k", "two");
  now_ += 10;
  auto cur = svc_->Revoke(Path("k"), 2, "exposed", "user:sec");
  ASSERT_TRUE(cur.ok()) << cur.error().message();
  EXPECT_EQ(*cur, 1u);
  EXPECT_EQ(*Read("k"), "one");
  // Much later, v1 is replaced again: its grace starts now, not at the time
  // v2 first replaced it.
  now_ += 5 * kGrace;
  Put("k", "three");
  now_ += kGrace - 1;
  EXPECT_EQ(*Read("k", 1), "one");
  auto revoked = Read("k", 2);
  ASSERT_FALSE(revoked.ok());
  EXPECT_NE(revoked.error().message().find("was revoked"), std::string::npos);
  EXPECT_NE(revoked.error().message().find("(exposed)"), std::string::npos);

  // Revoking every version leaves none, and get says so.
  ASSERT_TRUE(svc_->Revoke(Path("k"), 3, "x", "user:sec").ok());
  auto last = svc_->Revoke(Path("k"), 1, "x", "user:sec");
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, 0u);
  auto none = Read("k");
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().category(), Category::kNotFound);
  EXPECT_NE(none.error().message().find("every stored version is revoked"), std::string::npos);
  // A new version makes it whole again, numbered after the revoked ones.
  EXPECT_EQ(Put("k", "four"), 4u);
  EXPECT_EQ(*Read("k"), "four");
}

TEST_F(RotationServiceTest, RetentionDeletesTheSealedBlobs) {
  for (int i = 1; i <= 5; ++i) {
    Put("k", "v" + std::to_string(i));
    now_ += 10;
  }
  now_ += kGrace;  // every replaced version is now retired
  auto trimmed = svc_->ApplyRetention(Path("k"), 2, kGrace);
  ASSERT_TRUE(trimmed.ok()) << trimmed.error().message();
  EXPECT_EQ(*trimmed, (std::vector<uint32_t>{1, 2, 3}));
  auto versions = store_->ListVersions(Env(), "k");
  ASSERT_EQ(versions->size(), 2u);
  EXPECT_EQ((*versions)[0].version, 4u);
  auto gone = store_->GetVersion(Env(), "k", 1);
  EXPECT_EQ(gone.error().category(), Category::kNotFound);
}

TEST_F(RotationServiceTest, AStoreNeverTrimsTheCurrentVersion) {
  Put("k", "only");
  auto n = store_->TrimVersions(Env(), "k", {1});
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
  EXPECT_EQ(*Read("k"), "only");
}

TEST_F(RotationServiceTest, KekRotationReSealsAndDestroysTheOldKey) {
  Put("a", "value-a");
  Put("a", "value-a2");
  auto dev = svc_->Put(Path("b", "dev"), SecretBuffer::Copy("value-b"));
  ASSERT_TRUE(dev.ok());
  KekRecord old = ActiveKek();
  KekRotator rot(*store_, *sealer_, [this] { return now_; });
  std::vector<std::pair<uint64_t, uint64_t>> progress;
  KekRotator::Hooks hooks;
  hooks.batch = 2;
  hooks.progress = [&](uint64_t d, uint64_t t) { progress.emplace_back(d, t); };
  auto r = rot.Run("payments", hooks);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->resealed, 3u);
  EXPECT_EQ(r->kek.ref.version, 2u);
  ASSERT_EQ(r->destroyed.size(), 1u);
  EXPECT_EQ(progress, (std::vector<std::pair<uint64_t, uint64_t>>{{2, 3}, {3, 3}}));
  EXPECT_EQ(KekObjects(KekLabel::For("payments", 1)), 0u);
  EXPECT_EQ(KekObjects(KekLabel::For("payments", 2)), 1u);
  EXPECT_EQ(*store_->CountSealedUnder(old.id), 0u);
  EXPECT_EQ((*store_->KekById(old.id)).state, KekState::kDestroyed);
  EXPECT_EQ(*Read("a"), "value-a2");
  EXPECT_EQ(*Read("a", 1), "value-a");
  EXPECT_EQ(*Read("b", std::nullopt, "dev"), "value-b");
}

// A reader that looked up a version and its KEK just before a KEK rotation
// finished (blobs moved, old KEK destroyed) still gets the value: the
// unseal reads the version again under its new KEK, in direct mode and in
// custodyd alike, instead of failing once.
TEST_F(RotationServiceTest, AReadRacingTheEndOfAKekRotationStillGetsTheValue) {
  Put("a", "value-a");
  auto env = Env();
  auto rec = store_->GetVersion(env, "a", std::nullopt);
  ASSERT_TRUE(rec.ok());
  auto kek = store_->KekById(rec->kek_record_id);
  ASSERT_TRUE(kek.ok());
  KekRotator rot(*store_, *sealer_, [this] { return now_; });
  ASSERT_TRUE(rot.Run("payments", {}).ok());
  ASSERT_EQ((*store_->KekById(kek->id)).state, KekState::kDestroyed);
  auto u = svc_->Unseal(Path("a"), env, *rec, *kek);
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(u->value.RevealString(SecretAccess{}), "value-a");
  // A blob that is simply gone (no newer record) stays an error that says so.
  SecretVersionRecord ghost = *rec;
  ghost.version = 99;
  auto missing = svc_->Unseal(Path("a"), env, ghost, *kek);
  EXPECT_FALSE(missing.ok());
}

TEST_F(RotationServiceTest, APutThatSealedUnderARetiredKekSealsAgain) {
  Put("a", "one");
  KekRecord old = ActiveKek();
  // Sealed under the old KEK, then a rotation records a new one: the store
  // refuses the stale seal so it can never land after the old KEK's check.
  SealContext ctx{"payments", "prod", "a", 2};
  auto blob = sealer_->Seal(old.ref, ctx, SecretBuffer::Copy("two"));
  ASSERT_TRUE(blob.ok());
  auto ref = sealer_->CreateKek("payments", 2);
  ASSERT_TRUE(ref.ok());
  ASSERT_TRUE(store_->AddKek(old.project_id, *ref, KekLabel::For("payments", 2), now_).ok());
  Status stale = store_->AddVersion(Env().id, "a", 2, old.id, *blob, now_);
  ASSERT_FALSE(stale.ok());
  EXPECT_TRUE(stale.error().version_taken()) << stale.error().message();
  // SecretService retries with the active KEK.
  EXPECT_EQ(Put("a", "two"), 2u);
  EXPECT_EQ((*store_->GetVersion(Env(), "a", 2)).kek_record_id, ActiveKek().id);
  EXPECT_EQ(*Read("a"), "two");
}

TEST_F(RotationServiceTest, APlainStoreErrorInAddVersionEndsThePutAfterOneAttempt) {
  Put("a", "one");
  // Through a second connection to the same file: a trigger whose body names
  // a table that does not exist, so the version insert fails with a plain
  // SQLITE_ERROR (1), not with the key collision of a concurrent writer.
  // (A trigger's RAISE would be SQLITE_CONSTRAINT_TRIGGER, another case.)
  sqlite3* raw = nullptr;
  int opened = sqlite3_open(db_path().c_str(), &raw);
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> other(raw, &sqlite3_close);
  ASSERT_EQ(opened, SQLITE_OK);
  sqlite3* db = other.get();
  ASSERT_EQ(sqlite3_exec(db,
                         "CREATE TRIGGER broken BEFORE INSERT ON secret_versions "
                         "BEGIN SELECT * FROM no_such_table; END",
                         nullptr, nullptr, nullptr),
            SQLITE_OK)
      << sqlite3_errmsg(db);
  // Each attempt seals once and then calls before_commit (in Custodian, the
  // audit record): counting the calls counts seals and audit records.
  int attempts = 0;
  auto v = svc_->Put(Path("a"), SecretBuffer::Copy("two"), [&](uint32_t version) {
    ++attempts;
    EXPECT_EQ(version, 2u);
    return Status::Ok();
  });
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(attempts, 1) << "an SQL error is no concurrent writer: " << v.error().message();
  EXPECT_EQ(v.error().category(), Category::kInternal) << v.error().message();
  EXPECT_EQ(v.error().exit_code(), 70) << "EX_SOFTWARE, not 69 (or 75) from a retry storm";
  EXPECT_EQ(v.error().backend(), Backend::kStore);
  EXPECT_EQ(v.error().code(), static_cast<uint64_t>(SQLITE_ERROR)) << "the backend's own code, unchanged";
  // Nothing of the failed put was kept: once repaired, the next put is v2.
  ASSERT_EQ(sqlite3_exec(db, "DROP TRIGGER broken", nullptr, nullptr, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
  EXPECT_EQ(Put("a", "two"), 2u);
  EXPECT_EQ(*Read("a"), "two");
}

TEST_F(RotationServiceTest, ResumesAfterACrashAtEachStep) {
  Put("a", "value-a");
  Put("b", "value-b");
  KekRecord v1 = ActiveKek();
  KekRotator rot(*store_, *sealer_, [this] { return now_; });

  // Killed after C_GenerateKey, before the store recorded the new KEK: an
  // unrecorded token object with the next label.
  ASSERT_TRUE(sealer_->CreateKek("payments", 2).ok());
  auto plan = rot.Plan("payments");
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->resume);
  auto r = rot.Run("payments", {});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->unrecorded_removed, 1u);
  EXPECT_EQ(KekObjects(KekLabel::For("payments", 2)), 1u) << "only the recorded one";
  EXPECT_EQ(*Read("a"), "value-a");

  // Killed after the new KEK was recorded, before any blob moved.
  KekRecord v2 = ActiveKek();
  auto v3 = sealer_->CreateKek("payments", 3);
  ASSERT_TRUE(store_->AddKek(v2.project_id, *v3, KekLabel::For("payments", 3), now_).ok());
  // ... and half-way: one blob re-sealed.
  auto items = store_->SealedUnder(v2.id, {0, 0}, 1);
  ASSERT_EQ(items->size(), 1u);
  const auto& it = (*items)[0];
  SealContext ctx{"payments", it.environment, it.name, it.version};
  auto value = sealer_->Unseal(v2.ref, ctx, it.blob);
  auto blob = sealer_->Seal(*v3, ctx, *value);
  KekRecord v3rec = ActiveKek();
  ASSERT_EQ(*store_->ReplaceSealed(v2.id, v3rec.id, {{it.secret_id, it.version, *blob}}), 1u);
  EXPECT_EQ(*Read("a"), "value-a") << "mid-rotation, every secret still reads";
  EXPECT_EQ(*Read("b"), "value-b");
  plan = rot.Plan("payments");
  ASSERT_TRUE(plan->resume);
  EXPECT_EQ(plan->to_reseal, 1u);
  r = rot.Run("payments", {});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_TRUE(r->resumed);
  EXPECT_EQ(r->kek.ref.version, 3u);
  EXPECT_EQ(r->resealed, 1u);

  // Killed after "destroying" was recorded and the object destroyed, before
  // "destroyed": the re-run finishes without complaint.
  auto v4 = sealer_->CreateKek("payments", 4);
  ASSERT_TRUE(store_->AddKek(v3rec.project_id, *v4, KekLabel::For("payments", 4), now_).ok());
  r = rot.Run("payments", {});  // moves the blobs and destroys v3
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*Read("a"), "value-a");
  EXPECT_EQ(*Read("b"), "value-b");
  EXPECT_EQ(KekObjects(KekLabel::For("payments", 1)) + KekObjects(KekLabel::For("payments", 2)) +
                KekObjects(KekLabel::For("payments", 3)),
            0u);
  EXPECT_EQ((*store_->KekById(v1.id)).state, KekState::kDestroyed);
}

// A run killed in step 3, after the store recorded "destroying" for the old
// KEK and before its token object was destroyed: every blob is already under
// the new KEK, the old key is still in the token. The next run resumes from
// "destroying" (no new KEK, nothing to re-seal), destroys the object and
// records "destroyed"; every value still reads.
TEST_F(RotationServiceTest, ResumesFromTheDestroyingState) {
  Put("a", "value-a");
  Put("a", "value-a2");
  Put("b", "value-b");
  KekRecord v1 = ActiveKek();
  // The killed run's steps 1 and 2: v2 made and recorded, every blob moved.
  auto v2ref = sealer_->CreateKek("payments", 2);
  ASSERT_TRUE(v2ref.ok()) << v2ref.error().message();
  auto v2 = store_->AddKek(v1.project_id, *v2ref, KekLabel::For("payments", 2), now_);
  ASSERT_TRUE(v2.ok()) << v2.error().message();
  auto items = store_->SealedUnder(v1.id, {0, 0}, 100);
  ASSERT_TRUE(items.ok());
  ASSERT_EQ(items->size(), 3u);
  std::vector<Resealed> moved;
  for (const auto& it : *items) {
    SealContext ctx{"payments", it.environment, it.name, it.version};
    auto value = sealer_->Unseal(v1.ref, ctx, it.blob);
    ASSERT_TRUE(value.ok()) << value.error().message();
    auto blob = sealer_->Seal(v2->ref, ctx, *value);
    ASSERT_TRUE(blob.ok()) << blob.error().message();
    moved.push_back({it.secret_id, it.version, *blob});
  }
  ASSERT_EQ(*store_->ReplaceSealed(v1.id, v2->id, moved), 3u);
  // Step 3 begun: "destroying" recorded, then the kill, the object still there.
  ASSERT_TRUE(store_->SetKekState(v1.id, KekState::kDestroying).ok());
  ASSERT_EQ((*store_->KekById(v1.id)).state, KekState::kDestroying);
  ASSERT_EQ(KekObjects(KekLabel::For("payments", 1)), 1u);

  KekRotator rot(*store_, *sealer_, [this] { return now_; });
  auto plan = rot.Plan("payments");
  ASSERT_TRUE(plan.ok()) << plan.error().message();
  EXPECT_TRUE(plan->resume) << "a destroying KEK is an interrupted run";
  EXPECT_EQ(plan->to_reseal, 0u);
  auto r = rot.Run("payments", {});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_TRUE(r->resumed);
  EXPECT_EQ(r->kek.ref.version, 2u) << "no new KEK for a resumed run";
  EXPECT_EQ(r->resealed, 0u);
  ASSERT_EQ(r->destroyed.size(), 1u);
  EXPECT_EQ(r->destroyed[0].id, v1.id);
  EXPECT_EQ(KekObjects(KekLabel::For("payments", 1)), 0u) << "the old key is gone from the token";
  EXPECT_EQ(KekObjects(KekLabel::For("payments", 2)), 1u);
  EXPECT_EQ(KekObjects(KekLabel::For("payments", 3)), 0u);
  EXPECT_EQ((*store_->KekById(v1.id)).state, KekState::kDestroyed);
  EXPECT_EQ(ActiveKek().id, v2->id);
  EXPECT_EQ(*Read("a"), "value-a2");
  EXPECT_EQ(*Read("a", 1), "value-a");
  EXPECT_EQ(*Read("b"), "value-b");
  // Nothing is left to resume: the next run is a fresh rotation to v3.
  auto after = rot.Plan("payments");
  ASSERT_TRUE(after.ok());
  EXPECT_FALSE(after->resume);
}

TEST_F(RotationServiceTest, ATamperedBlobKeepsItsOldKek) {
  Put("a", "value-a");
  Put("b", "value-b");
  KekRecord v1 = ActiveKek();
  ASSERT_NO_FATAL_FAILURE(FlipLastBlobByte("a"));
  KekRotator rot(*store_, *sealer_, [this] { return now_; });
  auto r = rot.Run("payments", {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kIntegrity);
  EXPECT_NE(r.error().message().find("payments/prod/a v1"), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("the old KEK is kept"), std::string::npos);
  EXPECT_EQ((*store_->KekById(v1.id)).state, KekState::kRetiring);
  EXPECT_EQ(KekObjects(KekLabel::For("payments", 1)), 1u);
  EXPECT_EQ(*Read("b"), "value-b") << "the others moved to the new KEK";
  EXPECT_EQ(*store_->CountSealedUnder(v1.id), 1u);
}

}  // namespace
}  // namespace custody::core
