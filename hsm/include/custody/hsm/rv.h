// CK_RV to custody::Error: every failed PKCS#11 call becomes an error that
// names the call, the rv's symbolic name, and what the user can do.
//
//   CK_RV rv = fn->C_Login(h, CKU_USER, pin, len);
//   if (rv != CKR_OK) return hsm::RvError(rv, "C_Login");
#pragma once

#include <string_view>

#include "custody/common/error.h"
#include "custody/hsm/pkcs11.h"

namespace custody::hsm {

// "CKR_PIN_INCORRECT", or "CKR_0x000000A0" for an unknown value.
std::string RvName(CK_RV rv);

// Which category a CK_RV falls in (decides the exit code).
Category RvCategory(CK_RV rv);

// Error for a failed call: "<call> failed: <CKR_NAME>: <advice>".
Error RvError(CK_RV rv, std::string_view call);

// Session or device trouble that re-opening sessions may cure (used by the
// pool to discard a session instead of returning it).
bool IsSessionFatal(CK_RV rv);

}  // namespace custody::hsm
