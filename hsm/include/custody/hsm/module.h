// A loaded PKCS#11 module: dlopen + C_GetFunctionList + C_Initialize.
//
//   auto module = hsm::Module::Load("/usr/lib/softhsm/libsofthsm2.so");
//   CK_FUNCTION_LIST* fn = (*module)->fn();
//
// Sessions hold a shared_ptr to their Module, so the module is finalised only
// after the last session closes.
//
// C_Initialize ownership is explicit. PKCS#11 allows one C_Initialize per
// process, and libp11 (custodyd's TLS key in the token, through OpenSSL:
// tools/custodyd/token_key.h) may share the module. Load() returns the same
// Module for the same path while it is alive; if C_Initialize answers
// CKR_CRYPTOKI_ALREADY_INITIALIZED, another library owns the initialisation
// and this Module never calls C_Finalize.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "custody/common/result.h"
#include "custody/hsm/pkcs11.h"

namespace custody::hsm {

class Module {
 public:
  static Result<std::shared_ptr<Module>> Load(const std::string& path);
  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  CK_FUNCTION_LIST* fn() const { return fn_; }
  const std::string& path() const { return path_; }
  // True when this Module called C_Initialize and will call C_Finalize.
  bool owns_initialization() const { return owns_init_; }

  // Sessions opened through Session and not yet closed: leak checks in tests.
  int open_sessions() const { return open_sessions_.load(); }

  // C_Finalize then C_Initialize: what a token that stays broken after a
  // reset needs. Only for a Module that owns the initialisation. Every
  // session and object handle from before is dead afterwards, and the module
  // may hand out the same numbers again; generation() tells them apart, so a
  // stale Session never closes a new session that reuses its number, and
  // handle caches know to search again. The caller must make sure no other
  // thread is inside the module (SessionPool::Recover does).
  Status Reinitialize();
  uint64_t generation() const { return generation_.load(); }

 private:
  friend class Session;
  Module(std::string path, void* dl, CK_FUNCTION_LIST* fn, bool owns_init)
      : path_(std::move(path)), dl_(dl), fn_(fn), owns_init_(owns_init) {}

  std::string path_;
  void* dl_;
  CK_FUNCTION_LIST* fn_;
  bool owns_init_;
  std::atomic<int> open_sessions_{0};
  std::atomic<uint64_t> generation_{0};
};

}  // namespace custody::hsm
