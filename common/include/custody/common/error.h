// One error type for every layer of custody.
//
// An Error carries a Category (what kind of failure, which decides the exit
// code and, later, the HTTP status), a message a person can act on, and the
// backend's raw code (a CK_RV or a TSS2_RC) kept for logs and tests.
//
//   return Error(Category::kNotFound, "project 'payments' does not exist");
//   return hsm::RvError(rv, "C_Login");   // PKCS#11 failures, see hsm/rv.h
//
// Messages never contain secret values or PINs: callers pass names, never
// values, and the constructors do not format caller data beyond what is given.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace custody {

enum class Category : uint8_t {
  kUsage,        // the caller asked for something malformed
  kNotFound,     // a named thing does not exist
  kDenied,       // a credential or policy refused the operation
  kLimit,        // a rate or spend limit was reached
  kIntegrity,    // data failed authentication or is malformed
  kUnavailable,  // the token, store or server cannot be reached right now
  kConfig,       // the configuration is wrong
  kInternal,     // a bug or an unexpected backend answer
};

enum class Backend : uint8_t { kNone, kPkcs11, kTpm, kStore, kOs };

// sysexits.h values, one per category. This is the single table that the CLI
// (and later the server, for HTTP statuses) reads.
int ExitCode(Category c);
// The HTTP status custodyd answers with for each category.
int HttpStatus(Category c);
std::string_view CategoryName(Category c);

class Error {
 public:
  Error(Category category, std::string message)
      : category_(category), message_(std::move(message)) {}
  Error(Category category, std::string message, Backend backend, uint64_t code)
      : category_(category), message_(std::move(message)), backend_(backend), code_(code) {}

  // errno-based failure of an OS call on a named path.
  static Error Os(int err, std::string_view what, Category category = Category::kUnavailable);

  Category category() const { return category_; }
  const std::string& message() const { return message_; }
  Backend backend() const { return backend_; }
  uint64_t code() const { return code_; }
  int exit_code() const { return ExitCode(category_); }

  // Prefixes context ("sealing payments/prod/stripe: ...") keeping the rest.
  Error&& Wrap(std::string_view context) &&;

 private:
  Category category_;
  std::string message_;
  Backend backend_ = Backend::kNone;
  uint64_t code_ = 0;
};

}  // namespace custody
