#include "custody/hsm/module.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <cerrno>
#include <map>
#include <mutex>

#include "custody/hsm/rv.h"

namespace custody::hsm {
namespace {

std::mutex g_registry_mu;
std::map<std::string, std::weak_ptr<Module>>& Registry() {
  static auto* r = new std::map<std::string, std::weak_ptr<Module>>();
  return *r;
}

}  // namespace

Result<std::shared_ptr<Module>> Module::Load(const std::string& path) {
  std::lock_guard lock(g_registry_mu);
  if (auto it = Registry().find(path); it != Registry().end()) {
    if (auto existing = it->second.lock()) return existing;
  }

  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return Error(Category::kConfig, "PKCS#11 module " + path +
                                        " not found; set [token] module in the config to the "
                                        "module's path (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)",
                 Backend::kOs, static_cast<uint64_t>(errno));
  }
  // RTLD_LOCAL: the module's symbols must not satisfy other libraries' lookups.
  void* dl = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (dl == nullptr) {
    const char* why = ::dlerror();
    return Error(Category::kConfig,
                 "cannot load PKCS#11 module " + path + ": " + (why ? why : "dlopen failed"));
  }
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(dl, "C_GetFunctionList"));
  if (get_list == nullptr) {
    ::dlclose(dl);
    return Error(Category::kConfig, path + " is not a PKCS#11 module (no C_GetFunctionList)");
  }
  CK_FUNCTION_LIST* fn = nullptr;
  CK_RV rv = get_list(&fn);
  if (rv != CKR_OK || fn == nullptr) {
    ::dlclose(dl);
    return RvError(rv, "C_GetFunctionList").Wrap(path);
  }

  // Custody is multi-threaded: let the module use OS locking.
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  rv = fn->C_Initialize(&args);
  bool owns = true;
  if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    owns = false;  // someone else in this process initialised it; they finalise
  } else if (rv != CKR_OK) {
    ::dlclose(dl);
    return RvError(rv, "C_Initialize").Wrap(path);
  }
  std::shared_ptr<Module> m(new Module(path, dl, fn, owns));
  Registry()[path] = m;
  return m;
}

Status Module::Reinitialize() {
  if (!owns_init_) {
    return Error(Category::kUnavailable, "PKCS#11 module " + path_ +
                                             " was initialised by another library in this process; it cannot be "
                                             "re-initialised here (restart the process)");
  }
  // The generation moves first: from here on no Session of the old one may
  // call C_CloseSession with its number.
  generation_.fetch_add(1);
  (void)fn_->C_Finalize(nullptr);
  open_sessions_.store(0);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  CK_RV rv = fn_->C_Initialize(&args);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) return RvError(rv, "C_Initialize").Wrap(path_);
  return Status::Ok();
}

Module::~Module() {
  if (owns_init_) fn_->C_Finalize(nullptr);
  // The module stays mapped: some modules (and OpenSSL engines built on them)
  // register atexit handlers that would run after an unmap and crash.
  (void)dl_;
}

}  // namespace custody::hsm
