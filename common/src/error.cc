#include "custody/common/error.h"

#include <cstring>
#include <string>

namespace custody {

int ExitCode(Category c) {
  // sysexits.h. Kept as literal numbers so this table reads as the docs do.
  switch (c) {
    case Category::kUsage: return 64;        // EX_USAGE
    case Category::kIntegrity: return 65;    // EX_DATAERR
    case Category::kNotFound: return 66;     // EX_NOINPUT
    case Category::kUnavailable: return 69;  // EX_UNAVAILABLE
    case Category::kInternal: return 70;     // EX_SOFTWARE
    case Category::kLimit: return 75;        // EX_TEMPFAIL
    case Category::kDenied: return 77;       // EX_NOPERM
    case Category::kConfig: return 78;       // EX_CONFIG
  }
  return 70;
}

int HttpStatus(Category c) {
  switch (c) {
    case Category::kUsage: return 400;
    case Category::kIntegrity: return 500;  // stored data failed its check: the server's problem, not the client's
    case Category::kNotFound: return 404;
    case Category::kUnavailable: return 503;
    case Category::kInternal: return 500;
    case Category::kLimit: return 429;
    case Category::kDenied: return 403;     // 401 when no principal matched: see Error::http_status
    case Category::kConfig: return 500;
  }
  return 500;
}

std::string_view CategoryName(Category c) {
  switch (c) {
    case Category::kUsage: return "usage";
    case Category::kNotFound: return "not found";
    case Category::kDenied: return "denied";
    case Category::kLimit: return "limit";
    case Category::kIntegrity: return "integrity";
    case Category::kUnavailable: return "unavailable";
    case Category::kConfig: return "config";
    case Category::kInternal: return "internal";
  }
  return "internal";
}

Error Error::Os(int err, std::string_view what, Category category) {
  std::string msg(what);
  msg += ": ";
  msg += std::strerror(err);
  return Error(category, std::move(msg), Backend::kOs, static_cast<uint64_t>(err));
}

int Error::http_status() const {
  if (category_ == Category::kDenied && needs_authentication()) return 401;
  if (precondition_failed()) return 412;
  return HttpStatus(category_);
}

Error Error::WithVersionTaken() && {
  detail_ = ErrorDetail::kVersionTaken;
  retry_after_ = 0;
  return std::move(*this);
}

Error Error::WithPreconditionFailed() && {
  detail_ = ErrorDetail::kPreconditionFailed;
  retry_after_ = 0;
  return std::move(*this);
}

Error Error::WithVersionGone(Gone gone) && {
  detail_ = ErrorDetail::kVersionGone;
  retry_after_ = 0;
  gone_ = gone;
  return std::move(*this);
}

Error Error::WithNeedsAuthentication() && {
  detail_ = ErrorDetail::kNeedsAuthentication;
  retry_after_ = 0;
  return std::move(*this);
}

Error Error::WithRetryAfter(uint64_t seconds) && {
  detail_ = ErrorDetail::kRetryAfter;
  retry_after_ = seconds == 0 ? 1 : seconds;
  return std::move(*this);
}

Error&& Error::Wrap(std::string_view context) && {
  std::string msg(context);
  msg += ": ";
  msg += message_;
  message_ = std::move(msg);
  return std::move(*this);
}

}  // namespace custody
