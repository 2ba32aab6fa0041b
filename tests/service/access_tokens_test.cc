// AccessTokens on a real SQLite store: what is kept (a keyed hash, never the
// token), what a token can do once expired, revoked or checked with another
// key, and how far a renewal goes.
#include "custody/service/access_tokens.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <thread>

#include "../support/testenv.h"
#include "custody/common/time.h"
#include "custody/store/sqlite_store.h"

namespace custody::core {
namespace {

class AccessTokensTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = OpenSqliteStore(dir_ / "custody.db", /*create=*/true);
    ASSERT_TRUE(s.ok()) << s.error().message();
    store_ = std::move(*s);
    auto key = AccessTokens::LoadKey(dir_ / "access-token.key", /*create=*/true);
    ASSERT_TRUE(key.ok()) << key.error().message();
    tokens_.emplace(*store_, std::move(*key));
  }
  // Another node: its own store handle and AccessTokens, the same file and key.
  std::pair<std::unique_ptr<Store>, std::unique_ptr<AccessTokens>> OtherNode() {
    auto store = OpenSqliteStore(dir_ / "custody.db", /*create=*/false);
    EXPECT_TRUE(store.ok());
    auto key = AccessTokens::LoadKey(dir_ / "access-token.key", /*create=*/false);
    EXPECT_TRUE(key.ok());
    auto tokens = std::make_unique<AccessTokens>(**store, std::move(*key));
    return {std::move(*store), std::move(tokens)};
  }
  std::string Text(const AccessTokens::Issued& i) { return std::string(i.token.RevealString(SecretAccess{})); }
  test::TempDir dir_;
  std::unique_ptr<Store> store_;
  std::optional<AccessTokens> tokens_;
};

TEST_F(AccessTokensTest, TheStoreKeepsAKeyedHashAndNeverTheToken) {
  const int64_t now = SystemNow();
  auto issued = tokens_->Issue("svc:web", 60, 600, "user:root", now);
  ASSERT_TRUE(issued.ok()) << issued.error().message();
  const std::string token = Text(*issued);
  EXPECT_TRUE(AccessTokens::LooksLikeToken(token)) << token;
  EXPECT_EQ(token.size(), 36u);
  // Two tokens differ; the store file holds neither token, nor its random part.
  auto second = tokens_->Issue("svc:web", 60, 600, "user:root", now);
  EXPECT_NE(Text(*second), token);
  store_.reset();  // the WAL checkpointed into the file
  const std::string db = test::ReadFile(dir_ / "custody.db");
  EXPECT_EQ(db.find(token.substr(4)), std::string::npos) << "the token is in the store";
  EXPECT_NE(db.find(issued->record.accessor), std::string::npos);
  // The key file: 32 bytes, 0600.
  struct stat st {};
  ASSERT_EQ(::stat((dir_ / "access-token.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(st.st_size, 32);
}

TEST_F(AccessTokensTest, ACheckNamesThePrincipalUntilTheTokenExpiresOrIsRevoked) {
  const int64_t now = SystemNow();
  auto issued = tokens_->Issue("svc:web", 60, 600, "user:root", now);
  ASSERT_TRUE(issued.ok());
  auto ok = tokens_->Check(Text(*issued), now);
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_EQ(ok->principal, "svc:web");
  auto late = tokens_->Check(Text(*issued), now + 60);
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().category(), Category::kDenied);
  EXPECT_NE(late.error().message().find("has expired"), std::string::npos) << late.error().message();
  EXPECT_EQ(late.error().message().find(Text(*issued)), std::string::npos) << "the message quotes the token";
  // Unknown and malformed tokens are refused without naming them.
  std::string other = Text(*issued);
  other.back() = other.back() == 'A' ? 'B' : 'A';
  auto unknown = tokens_->Check(other, now);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.error().message().find("unknown"), std::string::npos);
  EXPECT_EQ(unknown.error().message().find(other.substr(4)), std::string::npos) << "the message quotes the token";
  EXPECT_FALSE(tokens_->Check("hvs.not-ours", now).ok());
  // Revoked on this node: refused at once (its cache is dropped).
  ASSERT_EQ(*tokens_->Revoke(issued->record.accessor, "", now), 1u);
  auto revoked = tokens_->Check(Text(*issued), now);
  ASSERT_FALSE(revoked.ok());
  EXPECT_NE(revoked.error().message().find("was revoked"), std::string::npos) << revoked.error().message();
}

// Another node (its own AccessTokens on the same store, the same key) sees a
// revocation made elsewhere once its one-second cache has passed.
TEST_F(AccessTokensTest, ARevocationOnAnotherNodeReachesThisOneWithinASecond) {
  const int64_t now = SystemNow();
  auto issued = tokens_->Issue("svc:web", 60, 600, "user:root", now);
  ASSERT_TRUE(tokens_->Check(Text(*issued), now).ok());  // cached here
  auto [other_store, other] = OtherNode();
  ASSERT_EQ(*other->Revoke("", "svc:web", now), 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  EXPECT_FALSE(tokens_->Check(Text(*issued), now).ok());
}

// A renewal asks the store, not the cache: a token revoked on another node
// a moment ago (still cached here as good) is not renewed.
TEST_F(AccessTokensTest, ARenewalOfATokenRevokedElsewhereIsRefused) {
  const int64_t now = SystemNow();
  auto issued = tokens_->Issue("svc:web", 60, 600, "user:root", now);
  ASSERT_TRUE(tokens_->Check(Text(*issued), now).ok());  // cached here
  auto [other_store, other] = OtherNode();
  ASSERT_EQ(*other->Revoke(issued->record.accessor, "", now), 1u);
  auto r = tokens_->Renew(Text(*issued), 0, now + 1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kDenied);
  EXPECT_NE(r.error().message().find("was revoked"), std::string::npos) << r.error().message();
  EXPECT_FALSE(tokens_->Check(Text(*issued), now + 1).ok()) << "the refused renewal left the token cached as good";
}

TEST_F(AccessTokensTest, AnotherKeyKnowsNoToken) {
  const int64_t now = SystemNow();
  auto issued = tokens_->Issue("svc:web", 60, 600, "user:root", now);
  test::TempDir other_dir;
  AccessTokens other(*store_, *AccessTokens::LoadKey(other_dir / "k", /*create=*/true));
  auto r = other.Check(Text(*issued), now);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("unknown"), std::string::npos);
}

TEST_F(AccessTokensTest, ARenewalExtendsByTheTtlButNeverPastTheMax) {
  const int64_t now = SystemNow();
  auto issued = tokens_->Issue("svc:web", 100, 150, "user:root", now);
  auto r = tokens_->Renew(Text(*issued), 0, now + 30);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->expires_at, now + 130);
  r = tokens_->Renew(Text(*issued), 10, now + 45);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->expires_at, now + 55) << "an increment shorter than the ttl";
  r = tokens_->Renew(Text(*issued), 0, now + 54);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->expires_at, now + 150) << "past the max";
  auto last = tokens_->Check(Text(*issued), now + 149);
  ASSERT_TRUE(last.ok()) << last.error().message();
  EXPECT_EQ(last->expires_at, now + 150);
  EXPECT_FALSE(tokens_->Check(Text(*issued), now + 150).ok());
}

// Processes starting at once (custodyd and an admin's CLI) agree on one key:
// the first whole key linked into place wins, and nobody reads half a key.
TEST_F(AccessTokensTest, EverybodyMakingTheKeyAtOnceGetsTheSameOne) {
  const std::string path = dir_ / "raced.key";
  std::vector<std::optional<std::string>> got(8);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); ++i) {
    threads.emplace_back([&, i] {
      auto k = AccessTokens::LoadKey(path, /*create=*/true);
      if (k) got[i] = std::string(k->RevealString(SecretAccess{}));
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& k : got) {
    ASSERT_TRUE(k.has_value());
    EXPECT_EQ(*k, *got[0]);
    EXPECT_EQ(k->size(), 32u);
  }
  EXPECT_EQ(test::ReadFile(path), *got[0]);
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) {
    EXPECT_NE(e.path().filename().string().rfind("raced.key.", 0), 0u) << "a temporary key file was left: " << e.path();
  }
}

TEST_F(AccessTokensTest, AKeyFileOthersCanReadOrOfTheWrongSizeIsRefused) {
  const std::string path = dir_ / "loose.key";
  test::WriteFile(path, std::string(32, 'k'));
  ::chmod(path.c_str(), 0644);
  auto loose = AccessTokens::LoadKey(path, /*create=*/false);
  ASSERT_FALSE(loose.ok());
  EXPECT_NE(loose.error().message().find(path), std::string::npos) << loose.error().message();
  ::chmod(path.c_str(), 0600);
  test::WriteFile(path, std::string(31, 'k'));
  ::chmod(path.c_str(), 0600);
  auto short_key = AccessTokens::LoadKey(path, /*create=*/false);
  ASSERT_FALSE(short_key.ok());
  EXPECT_NE(short_key.error().message().find("not 32 bytes"), std::string::npos) << short_key.error().message();
  EXPECT_EQ(AccessTokens::LoadKey(dir_ / "missing.key", false).error().category(), Category::kNotFound);
}

}  // namespace
}  // namespace custody::core
