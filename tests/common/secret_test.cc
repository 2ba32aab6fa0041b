#include <gtest/gtest.h>
#include <linux/capability.h>
#include <openssl/crypto.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

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

// What the kernel says about the mapping that holds `addr`
// (/proc/self/smaps): whether it is VM_LOCKED ("lo" in VmFlags), and how
// much of it is resident and locked.
struct KernelView {
  bool mapped = false;
  bool vm_locked = false;
  long locked_kb = 0;
};

KernelView KernelViewOf(const void* addr) {
  const auto a = reinterpret_cast<uintptr_t>(addr);
  std::ifstream smaps("/proc/self/smaps");
  KernelView v;
  bool in = false;
  std::string line;
  while (std::getline(smaps, line)) {
    unsigned long lo = 0, hi = 0;
    // A mapping's first line: "start-end perms offset dev inode [name]";
    // the lines after it are "Field: value".
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > line.find(' ')) {
      if (in) break;
      in = lo <= a && a < hi;
      v.mapped = v.mapped || in;
      continue;
    }
    if (!in) continue;
    if (line.rfind("Locked:", 0) == 0) v.locked_kb = std::stol(line.substr(7));
    if (line.rfind("VmFlags:", 0) == 0) v.vm_locked = (line + " ").find(" lo ") != std::string::npos;
  }
  return v;
}

// VmLck from /proc/self/status: memory this process has locked, in kB.
long VmLckKb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

// The kernel, not the buffer's own flag: the first and the last byte are each
// in a VM_LOCKED mapping that has locked resident pages, and VmLck covers at
// least the pages the bytes span. Returns what is wrong, or "" if nothing.
std::string WhyNotLockedByTheKernel(const SecretBuffer& b) {
  const uint8_t* first = b.Reveal(SecretAccess{}).data();
  const uint8_t* last = first + b.size() - 1;
  std::ostringstream why;
  std::vector<const uint8_t*> ends{first};
  if (last != first) ends.push_back(last);
  for (const uint8_t* p : ends) {
    KernelView v = KernelViewOf(p);
    const void* at = p;
    if (!v.mapped) why << "byte at " << at << " is in no mapping of /proc/self/smaps; ";
    if (!v.vm_locked) why << "the mapping holding " << at << " is not VM_LOCKED (no 'lo' in VmFlags); ";
    if (v.locked_kb == 0) why << "the mapping holding " << at << " has Locked: 0 kB; ";
  }
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto pages = static_cast<long>(reinterpret_cast<uintptr_t>(last) / page -
                                       reinterpret_cast<uintptr_t>(first) / page + 1);
  const long vm_lck = VmLckKb();
  if (vm_lck < pages * static_cast<long>(page / 1024)) {
    why << "VmLck is " << vm_lck << " kB, less than the buffer's " << pages << " page(s); ";
  }
  return why.str();
}

TEST(SecretBuffer, BytesAreInLockedMemory) {
  // Holds for root (CI) and for users whose RLIMIT_MEMLOCK allows the 2 MiB
  // secure heap or a per-buffer mlock. All alive at once: each must be
  // locked while the others are too.
  std::vector<SecretBuffer> alive;
  for (size_t n : {1u, 64u, 4096u, 65537u}) {
    alive.emplace_back(n);
    EXPECT_TRUE(alive.back().locked()) << n;
  }
  for (const auto& b : alive) EXPECT_EQ(WhyNotLockedByTheKernel(b), "") << b.size() << " bytes";
}

// With too small an RLIMIT_MEMLOCK for the 2 MiB secure heap (and no
// CAP_IPC_LOCK to ignore it), OpenSSL still sets the heap up but cannot lock
// it. A buffer must then not claim to be locked unless the kernel says it is;
// the small ones fit the limit and must really be locked. Runs in a process
// of its own (a death test, re-executed), where nothing has made the secure
// heap yet.
// In a process of its own: drops CAP_IPC_LOCK (so the limit applies to
// root too), lowers RLIMIT_MEMLOCK to 64 KiB, makes buffers, and exits 0 when
// each is locked and the kernel agrees, 1 (saying what is wrong) if not.
[[noreturn]] void CheckBuffersUnderASmallMemlockLimit() {
  __user_cap_header_struct head{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct caps[2]{};
  if (::syscall(SYS_capget, &head, caps) != 0) {
    std::fprintf(stderr, "capget failed\n");
    std::_Exit(2);
  }
  caps[0].effective &= ~(1u << CAP_IPC_LOCK);
  rlimit small{64 * 1024, 64 * 1024};
  if (::syscall(SYS_capset, &head, caps) != 0 || ::setrlimit(RLIMIT_MEMLOCK, &small) != 0) {
    std::fprintf(stderr, "could not drop CAP_IPC_LOCK or lower RLIMIT_MEMLOCK\n");
    std::_Exit(2);
  }
  if (CRYPTO_secure_malloc_initialized()) {
    std::fprintf(stderr, "the secure heap was made before the test\n");
    std::_Exit(2);
  }
  std::string wrong;
  std::vector<SecretBuffer> alive;
  for (size_t n : {1u, 64u, 4096u}) {
    alive.emplace_back(n);
    const bool says = alive.back().locked();
    if (!says) wrong += std::to_string(n) + " bytes: locked() says no; ";
    std::string why = WhyNotLockedByTheKernel(alive.back());
    if (!why.empty()) wrong += std::to_string(n) + " bytes, locked() says " + (says ? "yes" : "no") + " but " + why;
  }
  std::fprintf(stderr, "%s\n", wrong.empty() ? "all locked" : wrong.c_str());
  std::_Exit(wrong.empty() ? 0 : 1);
}

// With too small an RLIMIT_MEMLOCK for the 2 MiB secure heap (and no
// CAP_IPC_LOCK to ignore it), OpenSSL still sets the heap up but cannot lock
// it. A buffer must then not claim to be locked unless the kernel says it is;
// these small ones fit the limit and must really be locked. A death test in
// the threadsafe style: the check runs in a freshly executed process, where
// nothing has made the secure heap yet.
TEST(SecretBuffer, UnderASmallMemlockLimitLockedMeansTheKernelLockedIt) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(CheckBuffersUnderASmallMemlockLimit(), ::testing::ExitedWithCode(0), "all locked");
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
