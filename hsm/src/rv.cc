#include "custody/hsm/rv.h"

#include <cstdio>
#include <string>

namespace custody::hsm {
namespace {

struct RvInfo {
  CK_RV rv;
  const char* name;
  Category category;
  const char* advice;  // what the user can do; empty when nothing useful
};

// One table: name, category and advice for the values a user can meet.
// Anything not listed is reported by number as an internal error.
constexpr RvInfo kRvTable[] = {
    {CKR_CANCEL, "CKR_CANCEL", Category::kUnavailable, "the operation was cancelled"},
    {CKR_HOST_MEMORY, "CKR_HOST_MEMORY", Category::kUnavailable, "the host is out of memory"},
    {CKR_SLOT_ID_INVALID, "CKR_SLOT_ID_INVALID", Category::kUnavailable,
     "the slot is gone; check the token URI and that the token is present"},
    {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR", Category::kUnavailable,
     "the token reported a general error; check the module's logs"},
    {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED", Category::kUnavailable,
     "the token could not complete the call"},
    {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD", Category::kInternal, "this is a bug in custody"},
    {CKR_ATTRIBUTE_READ_ONLY, "CKR_ATTRIBUTE_READ_ONLY", Category::kInternal, ""},
    {CKR_ATTRIBUTE_SENSITIVE, "CKR_ATTRIBUTE_SENSITIVE", Category::kDenied,
     "the token refuses to reveal a sensitive attribute"},
    {CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID", Category::kInternal, ""},
    {CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID", Category::kInternal, ""},
    {CKR_DATA_INVALID, "CKR_DATA_INVALID", Category::kIntegrity, "the data is not valid for this mechanism"},
    {CKR_DATA_LEN_RANGE, "CKR_DATA_LEN_RANGE", Category::kIntegrity, "the data has a length the mechanism refuses"},
    {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR", Category::kUnavailable,
     "the token has a hardware or driver problem; check its connection"},
    {CKR_DEVICE_MEMORY, "CKR_DEVICE_MEMORY", Category::kUnavailable,
     "the token is out of memory; delete unused objects"},
    {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED", Category::kUnavailable,
     "the token was removed; reconnect it"},
    {CKR_ENCRYPTED_DATA_INVALID, "CKR_ENCRYPTED_DATA_INVALID", Category::kIntegrity,
     "the sealed data failed authentication: it was altered or belongs to another context"},
    {CKR_ENCRYPTED_DATA_LEN_RANGE, "CKR_ENCRYPTED_DATA_LEN_RANGE", Category::kIntegrity,
     "the sealed data has an impossible length: it was truncated or altered"},
    {CKR_FUNCTION_CANCELED, "CKR_FUNCTION_CANCELED", Category::kUnavailable, ""},
    {CKR_FUNCTION_NOT_SUPPORTED, "CKR_FUNCTION_NOT_SUPPORTED", Category::kUnavailable,
     "this token does not support the function custody needs"},
    {CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID", Category::kUnavailable,
     "the key handle is stale; the token may have been reset"},
    {CKR_KEY_SIZE_RANGE, "CKR_KEY_SIZE_RANGE", Category::kUnavailable, "the token refuses this key size"},
    {CKR_KEY_TYPE_INCONSISTENT, "CKR_KEY_TYPE_INCONSISTENT", Category::kIntegrity,
     "the key is not of the type the sealed data needs"},
    {CKR_KEY_FUNCTION_NOT_PERMITTED, "CKR_KEY_FUNCTION_NOT_PERMITTED", Category::kDenied,
     "the key's attributes forbid this use"},
    {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID", Category::kUnavailable,
     "the token does not support the mechanism (custody needs CKM_AES_GCM and CKM_AES_KEY_GEN)"},
    {CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID", Category::kUnavailable,
     "the token refuses the mechanism parameters"},
    {CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID", Category::kUnavailable,
     "the object handle is stale; the token may have been reset"},
    {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE", Category::kInternal, "this is a bug in custody"},
    {CKR_OPERATION_NOT_INITIALIZED, "CKR_OPERATION_NOT_INITIALIZED", Category::kInternal, "this is a bug in custody"},
    {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT", Category::kDenied,
     "the PIN is wrong; check pin_file, CUSTODY_PIN or --pin-fd (each wrong try brings the token closer to locking)"},
    {CKR_PIN_INVALID, "CKR_PIN_INVALID", Category::kDenied, "the PIN has characters the token refuses"},
    {CKR_PIN_LEN_RANGE, "CKR_PIN_LEN_RANGE", Category::kDenied, "the PIN is too short or too long for this token"},
    {CKR_PIN_EXPIRED, "CKR_PIN_EXPIRED", Category::kDenied, "the PIN has expired; set a new one with the token's tools"},
    {CKR_PIN_LOCKED, "CKR_PIN_LOCKED", Category::kDenied,
     "the user PIN is locked after too many wrong tries; the security officer must unlock it"},
    {CKR_SESSION_CLOSED, "CKR_SESSION_CLOSED", Category::kUnavailable, "the session was closed; retry"},
    {CKR_SESSION_COUNT, "CKR_SESSION_COUNT", Category::kUnavailable,
     "the token has no free sessions; lower the pool size or stop other clients"},
    {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID", Category::kUnavailable,
     "the session is stale; the token may have been reset, retry"},
    {CKR_SESSION_PARALLEL_NOT_SUPPORTED, "CKR_SESSION_PARALLEL_NOT_SUPPORTED", Category::kInternal, ""},
    {CKR_SESSION_READ_ONLY, "CKR_SESSION_READ_ONLY", Category::kInternal, ""},
    {CKR_SESSION_EXISTS, "CKR_SESSION_EXISTS", Category::kInternal, ""},
    {CKR_SESSION_READ_ONLY_EXISTS, "CKR_SESSION_READ_ONLY_EXISTS", Category::kInternal, ""},
    {CKR_SESSION_READ_WRITE_SO_EXISTS, "CKR_SESSION_READ_WRITE_SO_EXISTS", Category::kUnavailable,
     "a security officer is logged in to this token; log them out first"},
    {CKR_TEMPLATE_INCOMPLETE, "CKR_TEMPLATE_INCOMPLETE", Category::kInternal, "this is a bug in custody"},
    {CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT", Category::kInternal, "this is a bug in custody"},
    {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT", Category::kUnavailable,
     "no token is in the slot; insert it or check the token URI"},
    {CKR_TOKEN_NOT_RECOGNIZED, "CKR_TOKEN_NOT_RECOGNIZED", Category::kUnavailable, "the module does not recognise the token"},
    {CKR_TOKEN_WRITE_PROTECTED, "CKR_TOKEN_WRITE_PROTECTED", Category::kUnavailable, "the token is write-protected"},
    {CKR_USER_ALREADY_LOGGED_IN, "CKR_USER_ALREADY_LOGGED_IN", Category::kInternal, ""},
    // custody always logs in before it uses a session: a session that is no
    // longer logged in lost its login under us (a token reset, another
    // application's C_Logout), which is the token's state, not the caller's
    // permission. Unavailable (503 / 69), recovered and retried like a
    // stale session.
    {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN", Category::kUnavailable,
     "the token session lost its login (a token reset, or another application logged out)"},
    {CKR_USER_PIN_NOT_INITIALIZED, "CKR_USER_PIN_NOT_INITIALIZED", Category::kConfig,
     "the token has no user PIN yet; initialise it with the token's tools"},
    {CKR_USER_TYPE_INVALID, "CKR_USER_TYPE_INVALID", Category::kInternal, ""},
    {CKR_USER_ANOTHER_ALREADY_LOGGED_IN, "CKR_USER_ANOTHER_ALREADY_LOGGED_IN", Category::kUnavailable,
     "another user is logged in to this token"},
    {CKR_USER_TOO_MANY_TYPES, "CKR_USER_TOO_MANY_TYPES", Category::kUnavailable, ""},
    {CKR_WRAPPED_KEY_INVALID, "CKR_WRAPPED_KEY_INVALID", Category::kIntegrity, "the wrapped key failed authentication"},
    {CKR_RANDOM_NO_RNG, "CKR_RANDOM_NO_RNG", Category::kUnavailable, "the token has no random number generator"},
    {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL", Category::kInternal, "this is a bug in custody"},
    {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED", Category::kInternal,
     "the module was finalised while in use (another library in this process may have called C_Finalize)"},
    {CKR_CRYPTOKI_ALREADY_INITIALIZED, "CKR_CRYPTOKI_ALREADY_INITIALIZED", Category::kInternal, ""},
    {CKR_FUNCTION_REJECTED, "CKR_FUNCTION_REJECTED", Category::kDenied, "the token rejected the call"},
};

const RvInfo* Find(CK_RV rv) {
  for (const auto& e : kRvTable) {
    if (e.rv == rv) return &e;
  }
  return nullptr;
}

}  // namespace

std::string RvName(CK_RV rv) {
  if (rv == CKR_OK) return "CKR_OK";
  if (const RvInfo* e = Find(rv)) return e->name;
  char buf[32];
  std::snprintf(buf, sizeof buf, "CKR_0x%08lX", static_cast<unsigned long>(rv));
  return buf;
}

Category RvCategory(CK_RV rv) {
  if (const RvInfo* e = Find(rv)) return e->category;
  return Category::kInternal;
}

Error RvError(CK_RV rv, std::string_view call) {
  std::string msg(call);
  msg += " failed: ";
  msg += RvName(rv);
  const RvInfo* e = Find(rv);
  if (e != nullptr && e->advice[0] != '\0') {
    msg += ": ";
    msg += e->advice;
  }
  return Error(RvCategory(rv), std::move(msg), Backend::kPkcs11, rv);
}

bool IsSessionFatal(CK_RV rv) {
  switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      return true;
    default:
      return false;
  }
}

}  // namespace custody::hsm
