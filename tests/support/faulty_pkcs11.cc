// A PKCS#11 module for fault-injection tests: it loads the real SoftHSM2
// module and forwards every call to it, except that a test can make the
// "device" fail, the way a real HSM does when it is reset or unplugged.
//
// Control: the file named by $CUSTODY_FAULT_CONTROL, read on each call that
// needs a working device (session, login, crypto, object and RNG calls).
//   (missing or empty)  pass everything through
//   "down"              every such call answers CKR_DEVICE_ERROR
//   "reset N"           a device reset, once per new N: from then on every
//                       such call answers CKR_DEVICE_ERROR until the module is
//                       re-initialised (C_Finalize + C_Initialize), as a
//                       token that lost its state would
//   "slow MS"           every such call works, MS milliseconds late (a busy
//                       or remote HSM): keeps a request in flight; the
//                       file PATH.slow appears when the first one starts
// Slot and token information keep working, so a slot can still be found.
//
// Test-only: this is never installed or used outside tests/.
#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>

#include "custody/hsm/pkcs11.h"

namespace {

constexpr const char* kRealModule = "/usr/lib/softhsm/libsofthsm2.so";

CK_FUNCTION_LIST* g_real = nullptr;
CK_FUNCTION_LIST g_list;
std::mutex g_mu;
std::string g_last_reset;     // the N of the last "reset N" seen
std::atomic<bool> g_broken{false};  // reset seen, not yet re-initialised

// True when the device should fail this call.
bool Failing() {
  const char* path = std::getenv("CUSTODY_FAULT_CONTROL");
  if (path == nullptr) return g_broken.load();
  std::ifstream f(path);
  std::string word, arg;
  if (f) f >> word >> arg;
  if (word == "down") return true;
  if (word == "slow") {
    // PATH.slow appears once a call is being slowed: a test knows its
    // request has reached the token.
    std::ofstream(std::string(path) + ".slow") << "1";
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(arg.c_str())));
  }
  if (word == "reset") {
    std::lock_guard lock(g_mu);
    if (arg != g_last_reset) {
      g_last_reset = arg;
      g_broken.store(true);
    }
  }
  return g_broken.load();
}

CK_RV Initialize(CK_VOID_PTR args) {
  CK_RV rv = g_real->C_Initialize(args);
  if (rv == CKR_OK) g_broken.store(false);  // a re-initialised device works again
  return rv;
}

// Wraps a forwarding function: fails with CKR_DEVICE_ERROR while Failing().
#define CUSTODY_FAULTY(name, params, args)        \
  CK_RV Faulty_##name params {                    \
    if (Failing()) return CKR_DEVICE_ERROR;       \
    return g_real->name args;                     \
  }

CUSTODY_FAULTY(C_OpenSession,
               (CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify, CK_SESSION_HANDLE_PTR h),
               (slot, flags, app, notify, h))
CUSTODY_FAULTY(C_GetSessionInfo, (CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR info), (h, info))
CUSTODY_FAULTY(C_Login, (CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR_PTR pin, CK_ULONG n), (h, u, pin, n))
CUSTODY_FAULTY(C_EncryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
CUSTODY_FAULTY(C_Encrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR len),
               (h, in, n, out, len))
CUSTODY_FAULTY(C_DecryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
CUSTODY_FAULTY(C_Decrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR len),
               (h, in, n, out, len))
CUSTODY_FAULTY(C_FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, t, n))
CUSTODY_FAULTY(C_GenerateRandom, (CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG n), (h, out, n))
CUSTODY_FAULTY(C_SignInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
CUSTODY_FAULTY(C_Sign, (CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR len),
               (h, in, n, out, len))

#undef CUSTODY_FAULTY

}  // namespace

extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
  if (out == nullptr) return CKR_ARGUMENTS_BAD;
  std::lock_guard lock(g_mu);
  if (g_real == nullptr) {
    const char* path = std::getenv("CUSTODY_FAULT_REAL_MODULE");
    void* dl = ::dlopen(path != nullptr ? path : kRealModule, RTLD_NOW | RTLD_LOCAL);
    if (dl == nullptr) return CKR_GENERAL_ERROR;
    auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(dl, "C_GetFunctionList"));
    if (get == nullptr || get(&g_real) != CKR_OK) return CKR_GENERAL_ERROR;
    // Everything forwards as it is, then the calls a broken device fails are
    // replaced.
    std::memcpy(&g_list, g_real, sizeof g_list);
    g_list.C_Initialize = Initialize;
    g_list.C_OpenSession = Faulty_C_OpenSession;
    g_list.C_GetSessionInfo = Faulty_C_GetSessionInfo;
    g_list.C_Login = Faulty_C_Login;
    g_list.C_EncryptInit = Faulty_C_EncryptInit;
    g_list.C_Encrypt = Faulty_C_Encrypt;
    g_list.C_DecryptInit = Faulty_C_DecryptInit;
    g_list.C_Decrypt = Faulty_C_Decrypt;
    g_list.C_FindObjectsInit = Faulty_C_FindObjectsInit;
    g_list.C_GenerateRandom = Faulty_C_GenerateRandom;
    g_list.C_SignInit = Faulty_C_SignInit;
    g_list.C_Sign = Faulty_C_Sign;
  }
  *out = &g_list;
  return CKR_OK;
}
