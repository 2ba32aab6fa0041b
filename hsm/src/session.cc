#include "custody/hsm/session.h"

#include <cassert>
#include <cstdio>

#include "custody/hsm/rv.h"

namespace custody::hsm {

Result<Session> Session::Open(std::shared_ptr<Module> module, CK_SLOT_ID slot, bool read_write) {
  CK_FLAGS flags = CKF_SERIAL_SESSION | (read_write ? CKF_RW_SESSION : 0);
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CK_RV rv = module->fn()->C_OpenSession(slot, flags, nullptr, nullptr, &h);
  if (rv != CKR_OK) return RvError(rv, "C_OpenSession");
  module->open_sessions_.fetch_add(1);
  return Session(std::move(module), slot, h);
}

Session::~Session() { Close(); }

void Session::Close() noexcept {
  if (handle_ == CK_INVALID_HANDLE) return;
  // After a module re-initialisation this number may belong to a new
  // session of someone else: never close it. C_Finalize closed ours.
  if (generation_ == module_->generation()) {
    // A failure here (token gone) leaves nothing for us to release.
    (void)module_->fn()->C_CloseSession(handle_);
    module_->open_sessions_.fetch_sub(1);
  }
  handle_ = CK_INVALID_HANDLE;
}

Session::Session(Session&& o) noexcept
    : module_(std::move(o.module_)), slot_(o.slot_), handle_(o.handle_), generation_(o.generation_) {
  o.handle_ = CK_INVALID_HANDLE;
}

Session& Session::operator=(Session&& o) noexcept {
  if (this != &o) {
    Close();
    module_ = std::move(o.module_);
    slot_ = o.slot_;
    handle_ = o.handle_;
    generation_ = o.generation_;
    o.handle_ = CK_INVALID_HANDLE;
  }
  return *this;
}

Status Session::Login(const SecretBuffer& pin) {
  auto bytes = pin.Reveal(SecretAccess{});
  CK_RV rv = fn()->C_Login(handle_, CKU_USER, const_cast<CK_UTF8CHAR*>(bytes.data()),
                           static_cast<CK_ULONG>(bytes.size()));
  if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) return Status::Ok();
  return RvError(rv, "C_Login");
}

void Session::Logout() noexcept {
  if (handle_ != CK_INVALID_HANDLE) (void)fn()->C_Logout(handle_);
}

Result<std::unique_ptr<SessionPool>> SessionPool::Open(std::shared_ptr<Module> module,
                                                       CK_SLOT_ID slot, const SecretBuffer& pin,
                                                       Options options) {
  CUSTODY_ASSIGN_OR_RETURN(Session anchor, Session::Open(module, slot, /*read_write=*/true));
  CUSTODY_RETURN_IF_ERROR(anchor.Login(pin));
  return std::unique_ptr<SessionPool>(
      new SessionPool(std::move(module), slot, std::move(anchor), options, SecretBuffer::Copy(pin.Reveal(SecretAccess{}))));
}

SessionPool::~SessionPool() {
  assert(outstanding_ == 0 && "SessionPool destroyed with sessions still leased");
  idle_.clear();  // closes them
  anchor_.Logout();
}

Status SessionPool::Relogin() {
  std::vector<Session> stale;
  {
    std::lock_guard lock(mu_);
    stale.swap(idle_);
  }
  stale.clear();  // closing a dead session fails quietly
  CUSTODY_ASSIGN_OR_RETURN(Session anchor, Session::Open(module_, slot_.load(), /*read_write=*/true));
  CUSTODY_RETURN_IF_ERROR(anchor.Login(pin_));
  std::lock_guard lock(mu_);
  anchor_ = std::move(anchor);
  ++recoveries_;
  return Status::Ok();
}

Status SessionPool::Recover(std::chrono::milliseconds wait) {
  std::lock_guard one(recover_mu_);
  healthy_.store(false);
  std::function<Result<CK_SLOT_ID>()> find_slot;
  {
    std::lock_guard lock(mu_);
    find_slot = options_.find_slot;
  }
  if (slot_unknown_.load()) {
    // The last re-initialisation did not find the token again: its old id
    // may name another token now, and logging in there with our PIN would
    // count towards its lockout. Find it first, or fail.
    CUSTODY_ASSIGN_OR_RETURN(CK_SLOT_ID found, find_slot());
    slot_.store(found);
    slot_unknown_.store(false);
  }
  Status soft = Relogin();
  if (soft.ok()) {
    healthy_.store(true);
    return soft;
  }
  bool allowed;
  {
    std::lock_guard lock(mu_);
    allowed = options_.allow_reinitialize;
  }
  if (!allowed || !module_->owns_initialization()) return soft;
  // Exclusive: no lease is out, so no thread is inside the module while it
  // is finalised. A lease held too long (or by the caller) makes this give
  // up rather than deadlock.
  std::unique_lock gate(gate_, std::defer_lock);
  if (!gate.try_lock_for(wait)) {
    return Error(soft.error()).Wrap("cannot re-initialise the module while sessions are in use");
  }
  CUSTODY_RETURN_IF_ERROR(module_->Reinitialize());
  {
    std::lock_guard lock(mu_);
    ++reinitializations_;
  }
  if (find_slot) {
    auto slot = find_slot();
    if (!slot) {
      slot_unknown_.store(true);
      return std::move(slot).error();
    }
    slot_.store(*slot);
  }
  // Still exclusive: the idle sessions of the old generation are dropped
  // and the new anchor logs in before any other thread may lend a session.
  CUSTODY_RETURN_IF_ERROR(Relogin());
  healthy_.store(true);
  return Status::Ok();
}

uint64_t SessionPool::reinitializations() const {
  std::lock_guard lock(mu_);
  return reinitializations_;
}

void SessionPool::set_allow_reinitialize(bool allow) {
  std::lock_guard lock(mu_);
  options_.allow_reinitialize = allow;
}

uint64_t SessionPool::recoveries() const {
  std::lock_guard lock(mu_);
  return recoveries_;
}

size_t SessionPool::idle() const {
  std::lock_guard lock(mu_);
  return idle_.size();
}

Result<SessionPool::Lease> SessionPool::Acquire() {
  if (!healthy_.load()) {
    // The last recovery failed: try again before lending a session.
    std::unique_lock one(recover_mu_, std::try_to_lock);
    if (one.owns_lock()) {
      one.unlock();
      CUSTODY_RETURN_IF_ERROR(Recover());
    } else {
      std::lock_guard wait_for_it(recover_mu_);  // another thread is recovering
      if (!healthy_.load()) return Error(Category::kUnavailable, "the token is not available (recovery failed)");
    }
  }
  std::shared_lock gate(gate_);
  {
    std::lock_guard lock(mu_);
    while (!idle_.empty()) {
      Session s = std::move(idle_.back());
      idle_.pop_back();
      // A session from before a module re-initialisation is dead (and its
      // number may be someone else's now): never lend it.
      if (s.generation() != module_->generation()) continue;
      ++outstanding_;
      return Lease(this, std::move(gate), std::move(s));
    }
  }
  // Opened outside the lock: a slow token must not serialise every caller.
  CUSTODY_ASSIGN_OR_RETURN(Session s, Session::Open(module_, slot_.load(), /*read_write=*/true));
  std::lock_guard lock(mu_);
  ++outstanding_;
  return Lease(this, std::move(gate), std::move(s));
}

void SessionPool::Return(Session s, bool discard) {
  std::unique_lock lock(mu_);
  --outstanding_;
  if (!discard && idle_.size() < options_.max_idle) {
    idle_.push_back(std::move(s));
    return;
  }
  lock.unlock();
  // `s` closes here, outside the lock.
}

SessionPool::Lease::Lease(Lease&& o) noexcept
    : pool_(o.pool_), gate_(std::move(o.gate_)), session_(std::move(o.session_)), discard_(o.discard_) {
  o.pool_ = nullptr;
}

SessionPool::Lease::~Lease() {
  if (pool_ != nullptr) pool_->Return(std::move(session_), discard_);
}

}  // namespace custody::hsm
