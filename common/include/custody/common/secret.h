// SecretBuffer: the only type that holds plaintext secret values and PINs.
//
// Move-only; the bytes live in OpenSSL's secure heap (mlock()ed, excluded from
// core dumps, guard pages around it), or, if that cannot be had, in malloc'd
// memory that is mlock()ed; either way they are wiped before release. Reading the bytes
// needs an explicit SecretAccess token, so every reader is greppable:
//
//   SecretBuffer value = SecretBuffer::ReadAll(stdin_fd).value();
//   write(fd, value.Reveal(SecretAccess{}).data(), value.size());
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "custody/common/result.h"

namespace custody {

// Tag type: grep "SecretAccess" to audit every place that reads a secret.
struct SecretAccess {
  explicit SecretAccess() = default;
};

class SecretBuffer {
 public:
  SecretBuffer() = default;
  explicit SecretBuffer(size_t size);  // zero-filled
  ~SecretBuffer();
  SecretBuffer(SecretBuffer&& other) noexcept;
  SecretBuffer& operator=(SecretBuffer&& other) noexcept;
  SecretBuffer(const SecretBuffer&) = delete;
  SecretBuffer& operator=(const SecretBuffer&) = delete;

  static SecretBuffer Copy(std::span<const uint8_t> bytes);
  static SecretBuffer Copy(std::string_view bytes);

  // Reads a descriptor to EOF, at most max_size bytes; more is a usage error
  // (the caller names the source in the wrap).
  static Result<SecretBuffer> ReadFd(int fd, size_t max_size);
  // Reads a file, refusing one that is group- or world-readable when
  // require_private is set (PIN files).
  static Result<SecretBuffer> ReadFile(const std::string& path, size_t max_size,
                                       bool require_private);

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  // True when the bytes are in locked memory (secure heap or mlock).
  bool locked() const { return secure_ || locked_; }

  std::span<const uint8_t> Reveal(SecretAccess) const { return {data_, size_}; }
  std::span<uint8_t> RevealMutable(SecretAccess) { return {data_, size_}; }
  std::string_view RevealString(SecretAccess) const {
    return {reinterpret_cast<const char*>(data_), size_};
  }

  // Shrinks the visible size (the tail is wiped), e.g. after a decrypt that
  // returned fewer bytes than the buffer holds, or to strip a trailing newline.
  void Truncate(size_t new_size);

  // Constant-time comparison.
  bool Equals(const SecretBuffer& other) const;

 private:
  void Release() noexcept;

  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;
  bool locked_ = false;  // malloc'd and mlock()ed by us
  bool secure_ = false;  // from OpenSSL's secure heap (locked, not dumped)
};

// Makes the process non-dumpable (no core dumps, no ptrace by other users)
// and sets RLIMIT_CORE to 0. Tools that handle secrets call it first thing.
void HardenProcess();

}  // namespace custody
