#include "custody/common/secret.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

namespace custody {

namespace {

// Secret bytes come from OpenSSL's secure heap: one mlock()ed arena, excluded
// from core dumps (MADV_DONTDUMP) and fenced by guard pages, so taking a
// buffer costs a lock, not an mlock/munlock pair of syscalls on every
// unseal (those also serialise threads on the address-space lock). 2 MiB
// holds about 30 values of the maximum size at once.
constexpr size_t kSecureHeapSize = 2 * 1024 * 1024;

bool SecureHeapReady() {
  static const bool ready = [] {
    if (CRYPTO_secure_malloc_initialized()) return true;
    // 1: the arena is mlock()ed. 2: it was made but not locked (a small
    // RLIMIT_MEMLOCK without CAP_IPC_LOCK; a failed guard page or
    // MADV_DONTDUMP), so its bytes are not what locked() promises; 0: none.
    // Unless locked, buffers fall back to malloc + mlock each (see the
    // constructor).
    return CRYPTO_secure_malloc_init(kSecureHeapSize, 32) == 1;
  }();
  return ready;
}

}  // namespace

SecretBuffer::SecretBuffer(size_t size) {
  if (size == 0) return;
  if (SecureHeapReady()) {
    data_ = static_cast<uint8_t*>(OPENSSL_secure_zalloc(size));
    // OPENSSL_secure_zalloc falls back to the ordinary heap when the arena
    // is full; only memory it says is secure counts as locked.
    if (data_ != nullptr && CRYPTO_secure_allocated(data_)) {
      size_ = capacity_ = size;
      secure_ = true;
      return;
    }
    if (data_ != nullptr) OPENSSL_secure_clear_free(data_, size);
  }
  data_ = static_cast<uint8_t*>(std::calloc(size, 1));
  if (data_ == nullptr) throw std::bad_alloc();
  size_ = capacity_ = size;
  // mlock may fail under RLIMIT_MEMLOCK; the buffer is still wiped on release,
  // so failure to lock lowers protection against swap but is not fatal.
  // The system call itself: sanitizer runtimes replace mlock() with one that
  // locks nothing and returns 0, which would make locked() a lie there.
  locked_ = ::syscall(SYS_mlock, data_, capacity_) == 0;
}

SecretBuffer::~SecretBuffer() { Release(); }

SecretBuffer::SecretBuffer(SecretBuffer&& other) noexcept
    : data_(other.data_), size_(other.size_), capacity_(other.capacity_), locked_(other.locked_),
      secure_(other.secure_) {
  other.data_ = nullptr;
  other.size_ = other.capacity_ = 0;
  other.locked_ = other.secure_ = false;
}

SecretBuffer& SecretBuffer::operator=(SecretBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    data_ = other.data_;
    size_ = other.size_;
    capacity_ = other.capacity_;
    locked_ = other.locked_;
    secure_ = other.secure_;
    other.data_ = nullptr;
    other.size_ = other.capacity_ = 0;
    other.locked_ = other.secure_ = false;
  }
  return *this;
}

void SecretBuffer::Release() noexcept {
  if (data_ == nullptr) return;
  if (secure_) {
    OPENSSL_secure_clear_free(data_, capacity_);  // wipes, then returns to the arena
  } else {
    OPENSSL_cleanse(data_, capacity_);
    if (locked_) ::syscall(SYS_munlock, data_, capacity_);
    std::free(data_);
  }
  data_ = nullptr;
  size_ = capacity_ = 0;
  locked_ = secure_ = false;
}

SecretBuffer SecretBuffer::Copy(std::span<const uint8_t> bytes) {
  SecretBuffer b(bytes.size());
  if (!bytes.empty()) std::memcpy(b.data_, bytes.data(), bytes.size());
  return b;
}

SecretBuffer SecretBuffer::Copy(std::string_view bytes) {
  return Copy(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
}

void SecretBuffer::Truncate(size_t new_size) {
  if (new_size >= size_) return;
  OPENSSL_cleanse(data_ + new_size, size_ - new_size);
  size_ = new_size;
}

bool SecretBuffer::Equals(const SecretBuffer& other) const {
  if (size_ != other.size_) return false;
  if (size_ == 0) return true;
  return CRYPTO_memcmp(data_, other.data_, size_) == 0;
}

Result<SecretBuffer> SecretBuffer::ReadFd(int fd, size_t max_size) {
  // Read into a locked buffer one byte larger than allowed, so "too large"
  // is detected without ever holding the excess in unlocked memory.
  SecretBuffer buf(max_size + 1);
  size_t got = 0;
  while (got < buf.capacity_) {
    ssize_t n = ::read(fd, buf.data_ + got, buf.capacity_ - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error::Os(errno, "read", Category::kUsage);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got > max_size) {
    return Error(Category::kUsage, "input is larger than " + std::to_string(max_size) + " bytes");
  }
  buf.Truncate(got);
  return buf;
}

Result<SecretBuffer> SecretBuffer::ReadFile(const std::string& path, size_t max_size,
                                            bool require_private) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    return Error::Os(errno, path, errno == ENOENT ? Category::kNotFound : Category::kUnavailable);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return Error::Os(e, path);
  }
  if (require_private && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    ::close(fd);
    return Error(Category::kConfig,
                 path + " is readable by group or others; run: chmod 600 " + path);
  }
  auto r = ReadFd(fd, max_size);
  ::close(fd);
  if (!r) return std::move(r).error().Wrap(path);
  return r;
}

void HardenProcess() {
  // No core dumps with secrets in them, and no ptrace attach by same-uid
  // processes that are not our ancestors (PR_SET_DUMPABLE=0 implies both).
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  struct rlimit rl {0, 0};
  ::setrlimit(RLIMIT_CORE, &rl);
}

}  // namespace custody
