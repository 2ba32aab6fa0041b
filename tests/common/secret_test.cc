#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../support/testenv.h"
#include "custody/common/secret.h"

namespace custody {
namespace {

TEST(SecretBuffer, CopyRevealAndEquals) {
  SecretBuffer a = SecretBuffer::Copy(std::string_view("sk-live-123"));
  SecretBuffer b = SecretBuffer::Copy(std::string_view("sk-live-123"));
  SecretBuffer c = SecretBuffer::Copy(std::string_view("sk-live-124"));
  EXPECT_EQ(a.RevealString(SecretAccess{}), "sk-live-123");
  EXPECT_TRUE(a.Equals(b));
  EXPECT_FALSE(a.Equals(c));
}

TEST(SecretBuffer, BytesAreInLockedMemory) {
  // Holds for root (CI) and for users whose RLIMIT_MEMLOCK allows the 2 MiB
  // secure heap or a per-buffer mlock.
  for (size_t n : {1u, 64u, 4096u, 65537u}) {
    SecretBuffer b(n);
    EXPECT_TRUE(b.locked()) << n;
  }
}

TEST(SecretBuffer, MoveLeavesSourceEmpty) {
  SecretBuffer a = SecretBuffer::Copy(std::string_view("value"));
  SecretBuffer b = std::move(a);
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move): checking the moved-from state
  EXPECT_EQ(b.RevealString(SecretAccess{}), "value");
}

TEST(SecretBuffer, TruncateWipesTheTail) {
  SecretBuffer a = SecretBuffer::Copy(std::string_view("abcdef"));
  const uint8_t* p = a.Reveal(SecretAccess{}).data();
  a.Truncate(2);
  EXPECT_EQ(a.RevealString(SecretAccess{}), "ab");
  // Bytes past the new end are still ours (same allocation) and must be zero.
  for (int i = 2; i < 6; ++i) EXPECT_EQ(p[i], 0) << i;
}

TEST(SecretBuffer, ReadFdRefusesMoreThanTheLimit) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  ASSERT_EQ(::write(fds[1], "0123456789", 10), 10);
  ::close(fds[1]);
  auto r = SecretBuffer::ReadFd(fds[0], 5);
  ::close(fds[0]);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kUsage);
}

TEST(SecretBuffer, ReadFileRefusesAGroupReadablePinFile) {
  test::TempDir dir;
  std::string path = dir / "pin";
  test::WriteFile(path, "1234");
  ::chmod(path.c_str(), 0640);
  auto r = SecretBuffer::ReadFile(path, 64, /*require_private=*/true);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kConfig);
  EXPECT_NE(r.error().message().find("chmod 600"), std::string::npos);
  ::chmod(path.c_str(), 0600);
  auto ok = SecretBuffer::ReadFile(path, 64, true);
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_EQ(ok->RevealString(SecretAccess{}), "1234");
}

TEST(HardenProcess, MakesTheProcessNonDumpable) {
  HardenProcess();
  EXPECT_EQ(::prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), 0);
}

}  // namespace
}  // namespace custody
