// PKCS#11 sessions: a move-only RAII Session and a thread-safe SessionPool.
//
//   auto pool = hsm::SessionPool::Open(module, slot, pin);
//   auto lease = (*pool)->Acquire();          // returns to the pool on scope exit
//   lease->fn()->C_Decrypt(lease->handle(), ...);
//
// PKCS#11 login state belongs to the application, not to one session: all
// sessions of the process share it and lose it when the last one closes. The
// pool therefore keeps one "anchor" session that logs in at Open and logs out
// and closes in the pool's destructor, and lends out other sessions freely.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "custody/common/result.h"
#include "custody/common/secret.h"
#include "custody/hsm/module.h"

namespace custody::hsm {

class Session {
 public:
  static Result<Session> Open(std::shared_ptr<Module> module, CK_SLOT_ID slot, bool read_write);
  ~Session();
  Session(Session&& other) noexcept;
  Session& operator=(Session&& other) noexcept;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  CK_SESSION_HANDLE handle() const { return handle_; }
  CK_FUNCTION_LIST* fn() const { return module_->fn(); }
  CK_SLOT_ID slot() const { return slot_; }
  uint64_t generation() const { return generation_; }

  // Logs the user in. CKR_USER_ALREADY_LOGGED_IN counts as success: another
  // session of this application (or libp11 sharing the module) did it.
  Status Login(const SecretBuffer& pin);
  void Logout() noexcept;

 private:
  Session(std::shared_ptr<Module> m, CK_SLOT_ID slot, CK_SESSION_HANDLE h)
      : module_(std::move(m)), slot_(slot), handle_(h), generation_(module_->generation()) {}
  void Close() noexcept;

  std::shared_ptr<Module> module_;
  CK_SLOT_ID slot_ = 0;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
  uint64_t generation_ = 0;  // the module generation the handle belongs to
};

class SessionPool {
 public:
  struct Options {
    size_t max_idle = 8;  // sessions kept open between uses
    // Recover() may re-initialise the module when a new session and login
    // fail. Off when another library (libp11, for a TLS key in the token)
    // holds sessions on the same module that it cannot re-open itself.
    bool allow_reinitialize = true;
    // Finds the token's slot again after a re-initialisation: an HSM or
    // proxy that restarted may number its slots differently (the token is
    // found by its URI, never by a remembered id). Unset: the slot is kept.
    std::function<Result<CK_SLOT_ID>()> find_slot = {};
  };

  // A borrowed session; goes back to the pool when destroyed, unless
  // Discard() was called after a session-fatal error.
  class Lease {
   public:
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&&) = delete;
    Lease(const Lease&) = delete;
    ~Lease();
    Session* operator->() { return &session_; }
    Session& operator*() { return session_; }
    void Discard() { discard_ = true; }

   private:
    friend class SessionPool;
    Lease(SessionPool* pool, std::shared_lock<std::shared_timed_mutex> gate, Session s)
        : pool_(pool), gate_(std::move(gate)), session_(std::move(s)) {}
    SessionPool* pool_;
    // Held while the session is lent: a module re-initialisation waits for
    // every lease to come back before it calls C_Finalize.
    std::shared_lock<std::shared_timed_mutex> gate_;
    Session session_;
    bool discard_ = false;
  };

  static Result<std::unique_ptr<SessionPool>> Open(std::shared_ptr<Module> module, CK_SLOT_ID slot,
                                                   const SecretBuffer& pin, Options options);
  static Result<std::unique_ptr<SessionPool>> Open(std::shared_ptr<Module> module, CK_SLOT_ID slot,
                                                   const SecretBuffer& pin) {
    return Open(std::move(module), slot, pin, Options{});
  }
  // Leases must all be returned before the pool is destroyed.
  ~SessionPool();

  Result<Lease> Acquire();

  // After session or device errors (the token was reset, or something in
  // the process called C_CloseAllSessions): drops every idle session,
  // opens a new anchor session and logs in again with the PIN kept from
  // Open (in locked memory). Leases out at the time stay valid objects;
  // their sessions fail and are discarded when returned. If that fails too,
  // and re-initialising is allowed and this process owns the module's
  // initialisation, it waits (up to `wait`) for every lease to come back,
  // re-initialises the module (C_Finalize, C_Initialize) and logs in again.
  // The caller must not hold a lease.
  Status Recover(std::chrono::milliseconds wait = std::chrono::milliseconds(5000));
  // How many times Recover() has succeeded, and how many of those needed a
  // module re-initialisation (for health and metrics).
  uint64_t recoveries() const;
  uint64_t reinitializations() const;
  void set_allow_reinitialize(bool allow);

  Module& module() const { return *module_; }
  CK_SLOT_ID slot() const { return slot_.load(); }
  size_t idle() const;

 private:
  SessionPool(std::shared_ptr<Module> m, CK_SLOT_ID slot, Session anchor, Options o, SecretBuffer pin)
      : module_(std::move(m)), slot_(slot), anchor_(std::move(anchor)), options_(o), pin_(std::move(pin)) {}
  void Return(Session s, bool discard);

  Status Relogin();

  // False after a Recover() that failed: the login is gone (a module
  // re-initialisation logs everyone out), so the next Acquire() recovers
  // first instead of lending a session that cannot see private objects.
  std::atomic<bool> healthy_{true};
  std::mutex recover_mu_;  // one recovery at a time

  std::shared_ptr<Module> module_;
  // Changes only in Recover(), with the gate held exclusively (no lease out).
  std::atomic<CK_SLOT_ID> slot_;
  // Set when find_slot failed after a re-initialisation: slot_ is stale.
  std::atomic<bool> slot_unknown_{false};
  std::shared_timed_mutex gate_;
  Session anchor_;
  Options options_;
  mutable std::mutex mu_;
  std::vector<Session> idle_;
  size_t outstanding_ = 0;
  SecretBuffer pin_;  // for Recover(); wiped with the pool
  uint64_t recoveries_ = 0;
  uint64_t reinitializations_ = 0;
};

}  // namespace custody::hsm
