// One error type for every layer of custody.
//
// An Error carries a Category (what kind of failure, which decides the exit
// code and the HTTP status), a message a person can act on, the backend's
// raw code (a CK_RV, a TSS2_RC, a SQLite result code or an errno) kept for
// logs and tests, and at most one typed detail a caller acts on (a version
// taken by another writer, the seconds until a limit refills, no principal
// matched). The raw code means only what its backend says: no layer
// above the backend reads a meaning of its own into it.
//
//   return Error(Category::kNotFound, "project 'payments' does not exist");
//   return hsm::RvError(rv, "C_Login");   // PKCS#11 failures, see hsm/rv.h
//   return Error(Category::kLimit, "limit reached: ...").WithRetryAfter(30);
//
// Messages never contain secret values or PINs: callers pass names, never
// values, and the constructors do not format caller data beyond what is given.
#pragma once

#include <cstdint>
#include <optional>
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

// What a caller may act on beyond the category. Set by the layer that knows
// it (the store, the authorizer, the transport), never derived from code().
enum class ErrorDetail : uint8_t {
  kNone,
  kVersionTaken,         // another writer took the version, or the KEK was retired: seal again
  kRetryAfter,           // a limit refills after retry_after() seconds (HTTP Retry-After)
  kNeedsAuthentication,  // no principal matched the caller (HTTP 401, not 403)
  kVersionGone,          // the version asked for was revoked or retired (gone())
  kPreconditionFailed,   // a write's expected current version was not the current one (HTTP 412)
};

// sysexits.h values, one per category: the table the CLI reads.
int ExitCode(Category c);
// The HTTP status custodyd answers with for each category (Error::http_status
// refines kDenied to 401 when no principal matched).
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
  // The backend's own code (0 without a backend); see the file comment.
  uint64_t code() const { return code_; }
  int exit_code() const { return ExitCode(category_); }
  int http_status() const;

  ErrorDetail detail() const { return detail_; }
  bool version_taken() const { return detail_ == ErrorDetail::kVersionTaken; }
  bool needs_authentication() const { return detail_ == ErrorDetail::kNeedsAuthentication; }
  bool precondition_failed() const { return detail_ == ErrorDetail::kPreconditionFailed; }
  // For kVersionGone: which version, when it was made and when it went
  // (unix seconds), so an answer can describe it as Vault does a destroyed one.
  struct Gone {
    uint32_t version = 0;
    int64_t created_at = 0, gone_at = 0;
  };
  std::optional<Gone> gone() const {
    if (detail_ != ErrorDetail::kVersionGone) return std::nullopt;
    return gone_;
  }
  std::optional<uint64_t> retry_after() const {
    if (detail_ != ErrorDetail::kRetryAfter) return std::nullopt;
    return retry_after_;
  }

  // The same error with one detail (replacing any other). By value, so a
  // detail is only ever set on an error being built or passed on.
  Error WithVersionTaken() &&;
  Error WithNeedsAuthentication() &&;
  Error WithVersionGone(Gone gone) &&;
  Error WithPreconditionFailed() &&;
  // At least one second: a Retry-After of 0 would invite a busy loop.
  Error WithRetryAfter(uint64_t seconds) &&;

  // Prefixes context ("sealing payments/prod/stripe: ...") keeping the rest.
  Error&& Wrap(std::string_view context) &&;

 private:
  Category category_;
  std::string message_;
  Backend backend_ = Backend::kNone;
  uint64_t code_ = 0;
  ErrorDetail detail_ = ErrorDetail::kNone;
  uint64_t retry_after_ = 0;  // only with kRetryAfter
  Gone gone_;                 // only with kVersionGone
};

}  // namespace custody
