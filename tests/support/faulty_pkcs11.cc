// A PKCS#11 module for fault-injection tests: it loads the real SoftHSM2
// module and forwards every call to it, except that a test can make the
// "device" fail, the way a real HSM does when it is reset or unplugged.
//
// Control: the file named by $CUSTODY_FAULT_CONTROL, read on each call that
// needs a working device (session, login, crypto, object and RNG calls).
// One command a file:
//   (missing or empty)  pass everything through
//   "down"              every such call answers CKR_DEVICE_ERROR
//   "reset N"           a device reset, once per new N: from then on every
//                       such call answers CKR_DEVICE_ERROR until the module is
//                       re-initialised (C_Finalize + C_Initialize), as a
//                       token that lost its state would
//   "uninit N"          as "reset N", but the calls answer
//                       CKR_CRYPTOKI_NOT_INITIALIZED (a network HSM's client
//                       library that lost its server and wants C_Initialize)
//   "renumber N"        an HSM restart, once per new N: as "reset N", and
//                       after the re-initialisation every slot has another
//                       id (1000 more each time); the old ids answer
//                       CKR_SLOT_ID_INVALID
//   "closeall N"        once per new N, the token's sessions are closed
//                       from outside (the real C_CloseAllSessions on every
//                       slot, as another application of the same process, or
//                       a proxy that restarted, would); the calls then fail
//                       as the token itself answers
//   "slow MS"           every such call works, MS milliseconds late (a busy
//                       or remote HSM): keeps a request in flight; the
//                       file PATH.slow appears when the first one starts
//   "fail RV [FUNC...] [+N]"
//                       the named functions (all of those below when none
//                       is named) answer RV, one of CKR_DEVICE_ERROR,
//                       CKR_SESSION_HANDLE_INVALID, CKR_USER_NOT_LOGGED_IN,
//                       CKR_OBJECT_HANDLE_INVALID; with +N the first N such
//                       calls of this process still work
//   "hang MS N [FUNC...]"
//                       the next N calls of the named functions (C_Decrypt
//                       when none is named) of this process wait MS
//                       milliseconds before they reach the token, as a
//                       network HSM that stops answering; later calls pass.
//                       PATH.hung gets a line as each hang begins. Written
//                       again with other text, the count starts over.
// Slot and token information keep working, so a slot can still be found.
// "down", "reset" and "slow" act on the first eleven functions below (the
// session, login, crypto, search and RNG calls); "fail" also reaches key
// generation, destroy, attribute reads, the rest of an object search, and
// wrap and unwrap (which custody does not call today).
//
// $CUSTODY_FAULT_NO_MECHS (hex mechanism numbers, comma-separated, e.g.
// "0x1087" for CKM_AES_GCM): a token without them. They are left out of
// C_GetMechanismList, and C_GetMechanismInfo, C_EncryptInit and
// C_DecryptInit answer CKR_MECHANISM_INVALID for them.
//
// Observation, for tests that check what reached the token:
//   $CUSTODY_FAULT_CALLS  a file that gets one line per call of a function
//                         below: "NAME RV" (RV by name, or in hex), and for
//                         a C_GenerateRandom that worked also the length and
//                         the bytes it returned: "C_GenerateRandom CKR_OK N
//                         HEX" (test tokens only: the bytes are secrets)
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
#include <sstream>
#include <string>
#include <thread>

#include "custody/hsm/pkcs11.h"

namespace {

constexpr const char* kRealModule = "/usr/lib/softhsm/libsofthsm2.so";

CK_FUNCTION_LIST* g_real = nullptr;
CK_FUNCTION_LIST g_list;
std::mutex g_mu;
std::string g_last_reset;     // the N of the last "reset N", "uninit N" or "renumber N" seen
std::string g_last_closeall;  // the N of the last "closeall N" done
// What the legacy calls answer after a reset, until re-initialised (CKR_OK: working).
std::atomic<CK_RV> g_broken{CKR_OK};
bool g_renumber_pending = false;          // under g_mu: shift the slot ids at the next C_Initialize
std::atomic<CK_SLOT_ID> g_slot_offset{0};  // added to every real slot id shown to the application

// True when the device should fail this call ("down", "reset", "slow").
bool Failing(const std::string& word, const std::string& arg) {
  if (word == "down") return true;
  if (word == "slow") {
    // PATH.slow appears once a call is being slowed: a test knows its
    // request has reached the token.
    std::ofstream(std::string(std::getenv("CUSTODY_FAULT_CONTROL")) + ".slow") << "1";
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(arg.c_str())));
  }
  if (word == "reset" || word == "uninit" || word == "renumber") {
    std::lock_guard lock(g_mu);
    if (arg != g_last_reset) {
      g_last_reset = arg;
      g_broken.store(word == "uninit" ? CKR_CRYPTOKI_NOT_INITIALIZED : CKR_DEVICE_ERROR);
      g_renumber_pending = word == "renumber";
    }
  }
  if (word == "closeall") {
    std::lock_guard lock(g_mu);
    if (arg != g_last_closeall) {
      g_last_closeall = arg;
      CK_SLOT_ID slots[16];
      CK_ULONG n = 16;
      if (g_real->C_GetSlotList(CK_TRUE, slots, &n) == CKR_OK) {
        for (CK_ULONG i = 0; i < n; ++i) g_real->C_CloseAllSessions(slots[i]);
      }
    }
    return false;
  }
  return g_broken.load() != CKR_OK;
}

// What a legacy call answers while the device is broken (CKR_OK: forward).
CK_RV Broken(bool legacy) { return legacy ? g_broken.load() : CKR_OK; }

struct NamedRv {
  const char* name;
  CK_RV rv;
};
constexpr NamedRv kRvs[] = {{"CKR_OK", CKR_OK},
                            {"CKR_DEVICE_ERROR", CKR_DEVICE_ERROR},
                            {"CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID},
                            {"CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN},
                            {"CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID}};

std::string RvText(CK_RV rv) {
  for (const auto& n : kRvs) {
    if (n.rv == rv) return n.name;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%08lx", static_cast<unsigned long>(rv));
  return buf;
}

std::atomic<long> g_fail_passed{0};  // "+N": matching calls let through so far

std::string g_hang_text;  // the "hang" command its count belongs to
long g_hangs = 0;         // hangs begun under it

// "hang MS N [FUNC...]": whether this call of `fn` is one of the N to hang,
// and if so the hang itself.
void MaybeHang(const char* fn, const std::string& text, const std::string& path) {
  std::istringstream in(text);
  std::string word;
  long ms = 0, n = 0;
  in >> word >> ms >> n;
  bool named = false, match = false;
  for (std::string t; in >> t;) {
    named = true;
    match = match || t == fn;
  }
  if (named ? !match : std::string(fn) != "C_Decrypt") return;
  {
    std::lock_guard lock(g_mu);
    if (text != g_hang_text) {
      g_hang_text = text;
      g_hangs = 0;
    }
    if (g_hangs >= n) return;
    ++g_hangs;
  }
  std::ofstream(path + ".hung", std::ios::app) << fn << "\n";
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

// What this call of `fn` answers instead of reaching the token (CKR_OK:
// nothing, forward it). `legacy`: one of the eleven "down"/"reset" reach.
CK_RV Fault(const char* fn, bool legacy) {
  const char* path = std::getenv("CUSTODY_FAULT_CONTROL");
  if (path == nullptr) return Broken(legacy);
  std::ifstream f(path);
  std::string word, arg;
  if (f) f >> word >> arg;
  if (word == "hang") {
    std::ifstream again(path);
    std::string text;
    std::getline(again, text);
    MaybeHang(fn, text, path);
    return Broken(legacy);
  }
  if (word == "fail") {
    CK_RV rv = CKR_GENERAL_ERROR;  // an unknown name: a broken test, loudly
    for (const auto& n : kRvs) {
      if (arg == n.name) rv = n.rv;
    }
    bool named = false, match = false;
    long pass = 0;
    for (std::string t; f >> t;) {
      if (t[0] == '+') {
        pass = std::atol(t.c_str() + 1);
      } else {
        named = true;
        match = match || t == fn;
      }
    }
    if (named && !match) return Broken(legacy);
    if (g_fail_passed.fetch_add(1) < pass) return CKR_OK;
    return rv;
  }
  if (!legacy) return CKR_OK;
  return Failing(word, arg) ? (g_broken.load() != CKR_OK ? g_broken.load() : CKR_DEVICE_ERROR) : CKR_OK;
}

void Append(const std::string& line) {
  const char* path = std::getenv("CUSTODY_FAULT_CALLS");
  if (path == nullptr) return;
  std::ofstream out(path, std::ios::app);
  out << line << "\n";
}

CK_RV Logged(const char* fn, CK_RV rv) {
  Append(std::string(fn) + " " + RvText(rv));
  return rv;
}

CK_RV Initialize(CK_VOID_PTR args) {
  CK_RV rv = g_real->C_Initialize(args);
  if (rv == CKR_OK) {
    g_broken.store(CKR_OK);  // a re-initialised device works again
    std::lock_guard lock(g_mu);
    if (g_renumber_pending) g_slot_offset += 1000;  // ... behind slots with new ids
    g_renumber_pending = false;
  }
  return rv;
}

// Slot ids as the application sees them ("renumber"): the real id plus the
// offset; an id from before the last renumbering is unknown.
bool RealSlot(CK_SLOT_ID shown, CK_SLOT_ID* real) {
  const CK_SLOT_ID off = g_slot_offset.load();
  if (shown < off) return false;
  *real = shown - off;
  return true;
}

CK_RV Shifted_C_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR n) {
  CK_RV rv = g_real->C_GetSlotList(present, list, n);
  if (rv == CKR_OK && list != nullptr) {
    for (CK_ULONG i = 0; i < *n; ++i) list[i] += g_slot_offset.load();
  }
  return rv;
}
CK_RV Shifted_C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info) {
  CK_SLOT_ID real = 0;
  return RealSlot(slot, &real) ? g_real->C_GetSlotInfo(real, info) : CKR_SLOT_ID_INVALID;
}
CK_RV Shifted_C_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) {
  CK_SLOT_ID real = 0;
  return RealSlot(slot, &real) ? g_real->C_GetTokenInfo(real, info) : CKR_SLOT_ID_INVALID;
}
// Whether $CUSTODY_FAULT_NO_MECHS hides this mechanism.
bool Hidden(CK_MECHANISM_TYPE type) {
  const char* list = std::getenv("CUSTODY_FAULT_NO_MECHS");
  if (list == nullptr) return false;
  std::istringstream in(list);
  for (std::string t; std::getline(in, t, ',');) {
    if (!t.empty() && std::strtoul(t.c_str(), nullptr, 0) == type) return true;
  }
  return false;
}

CK_RV Shifted_C_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR n) {
  CK_SLOT_ID real = 0;
  if (!RealSlot(slot, &real)) return CKR_SLOT_ID_INVALID;
  // Asked for the count: the real one is an upper bound, which PKCS#11 allows.
  CK_RV rv = g_real->C_GetMechanismList(real, list, n);
  if (rv != CKR_OK || list == nullptr) return rv;
  CK_ULONG kept = 0;
  for (CK_ULONG i = 0; i < *n; ++i) {
    if (!Hidden(list[i])) list[kept++] = list[i];
  }
  *n = kept;
  return CKR_OK;
}
CK_RV Shifted_C_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info) {
  CK_SLOT_ID real = 0;
  if (!RealSlot(slot, &real)) return CKR_SLOT_ID_INVALID;
  if (Hidden(type)) return CKR_MECHANISM_INVALID;
  return g_real->C_GetMechanismInfo(real, type, info);
}
CK_RV Shifted_C_CloseAllSessions(CK_SLOT_ID slot) {
  CK_SLOT_ID real = 0;
  return RealSlot(slot, &real) ? g_real->C_CloseAllSessions(real) : CKR_SLOT_ID_INVALID;
}

// Wraps a forwarding function: answers what Fault() says, and logs it.
#define CUSTODY_FAULTY(legacy, name, params, args)       \
  CK_RV Faulty_##name params {                           \
    if (CK_RV f = Fault(#name, legacy); f != CKR_OK) {   \
      return Logged(#name, f);                           \
    }                                                    \
    return Logged(#name, g_real->name args);             \
  }

CK_RV Faulty_C_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                           CK_SESSION_HANDLE_PTR h) {
  if (CK_RV f = Fault("C_OpenSession", true); f != CKR_OK) return Logged("C_OpenSession", f);
  CK_SLOT_ID real = 0;
  if (!RealSlot(slot, &real)) return Logged("C_OpenSession", CKR_SLOT_ID_INVALID);
  return Logged("C_OpenSession", g_real->C_OpenSession(real, flags, app, notify, h));
}
CK_RV Faulty_C_GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR info) {
  if (CK_RV f = Fault("C_GetSessionInfo", true); f != CKR_OK) return Logged("C_GetSessionInfo", f);
  CK_RV rv = g_real->C_GetSessionInfo(h, info);
  if (rv == CKR_OK) info->slotID += g_slot_offset.load();
  return Logged("C_GetSessionInfo", rv);
}
CUSTODY_FAULTY(true, C_Login, (CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR_PTR pin, CK_ULONG n), (h, u, pin, n))
CK_RV Faulty_C_EncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
  if (CK_RV f = Fault("C_EncryptInit", true); f != CKR_OK) return Logged("C_EncryptInit", f);
  if (m != nullptr && Hidden(m->mechanism)) return Logged("C_EncryptInit", CKR_MECHANISM_INVALID);
  return Logged("C_EncryptInit", g_real->C_EncryptInit(h, m, k));
}
CUSTODY_FAULTY(true, C_Encrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR len),
               (h, in, n, out, len))
CK_RV Faulty_C_DecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
  if (CK_RV f = Fault("C_DecryptInit", true); f != CKR_OK) return Logged("C_DecryptInit", f);
  if (m != nullptr && Hidden(m->mechanism)) return Logged("C_DecryptInit", CKR_MECHANISM_INVALID);
  return Logged("C_DecryptInit", g_real->C_DecryptInit(h, m, k));
}
CUSTODY_FAULTY(true, C_Decrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR len),
               (h, in, n, out, len))
CUSTODY_FAULTY(true, C_FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, t, n))
CUSTODY_FAULTY(true, C_SignInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
CUSTODY_FAULTY(true, C_Sign, (CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR len),
               (h, in, n, out, len))
CUSTODY_FAULTY(false, C_GenerateKey,
               (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k),
               (h, m, t, n, k))
CUSTODY_FAULTY(false, C_GenerateKeyPair,
               (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR pt, CK_ULONG pn, CK_ATTRIBUTE_PTR vt,
                CK_ULONG vn, CK_OBJECT_HANDLE_PTR pub, CK_OBJECT_HANDLE_PTR priv),
               (h, m, pt, pn, vt, vn, pub, priv))
CUSTODY_FAULTY(false, C_DestroyObject, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o), (h, o))
CUSTODY_FAULTY(false, C_GetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n),
               (h, o, t, n))
CUSTODY_FAULTY(false, C_FindObjects, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o, CK_ULONG max, CK_ULONG_PTR n),
               (h, o, max, n))
CUSTODY_FAULTY(false, C_WrapKey,
               (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE wk, CK_OBJECT_HANDLE k, CK_BYTE_PTR out,
                CK_ULONG_PTR len),
               (h, m, wk, k, out, len))
CUSTODY_FAULTY(false, C_UnwrapKey,
               (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE uk, CK_BYTE_PTR in, CK_ULONG n,
                CK_ATTRIBUTE_PTR t, CK_ULONG tn, CK_OBJECT_HANDLE_PTR k),
               (h, m, uk, in, n, t, tn, k))

// The RNG, logged with what it returned (see CUSTODY_FAULT_CALLS).
CK_RV Faulty_C_GenerateRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG n) {
  if (CK_RV f = Fault("C_GenerateRandom", true); f != CKR_OK) return Logged("C_GenerateRandom", f);
  CK_RV rv = g_real->C_GenerateRandom(h, out, n);
  if (rv != CKR_OK) return Logged("C_GenerateRandom", rv);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string line = "C_GenerateRandom CKR_OK " + std::to_string(n) + " ";
  for (CK_ULONG i = 0; i < n; ++i) {
    line += kHex[out[i] >> 4];
    line += kHex[out[i] & 0xf];
  }
  Append(line);
  return rv;
}

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
    g_list.C_GetSlotList = Shifted_C_GetSlotList;
    g_list.C_GetSlotInfo = Shifted_C_GetSlotInfo;
    g_list.C_GetTokenInfo = Shifted_C_GetTokenInfo;
    g_list.C_GetMechanismList = Shifted_C_GetMechanismList;
    g_list.C_GetMechanismInfo = Shifted_C_GetMechanismInfo;
    g_list.C_CloseAllSessions = Shifted_C_CloseAllSessions;
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
    g_list.C_GenerateKey = Faulty_C_GenerateKey;
    g_list.C_GenerateKeyPair = Faulty_C_GenerateKeyPair;
    g_list.C_DestroyObject = Faulty_C_DestroyObject;
    g_list.C_GetAttributeValue = Faulty_C_GetAttributeValue;
    g_list.C_FindObjects = Faulty_C_FindObjects;
    g_list.C_WrapKey = Faulty_C_WrapKey;
    g_list.C_UnwrapKey = Faulty_C_UnwrapKey;
  }
  *out = &g_list;
  return CKR_OK;
}
