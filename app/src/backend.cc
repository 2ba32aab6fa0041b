#include "custody/app/backend.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <optional>
#include <thread>

#include "custody/hsm/pkcs11_sealer.h"
#include "custody/hsm/token_signer.h"
#include "custody/hsm/uri.h"
#include "custody/store/postgres_store.h"
#include "custody/store/sqlite_store.h"
#include "custody/store/store_lock.h"
#include "custody/tpm/tpm_sealer.h"
#include "custody/tpm/tpm_signer.h"

namespace custody::core {
namespace {

// An advisory flock on a file in the state folder, taken with a deadline so
// a stuck peer can delay us but never hang us; without it we proceed.
class StateLock {
 public:
  explicit StateLock(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0) return;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK || std::chrono::steady_clock::now() > deadline) {
        ::close(fd_);
        fd_ = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  ~StateLock() {
    if (fd_ >= 0) ::close(fd_);  // closing releases the flock
  }
  StateLock(const StateLock&) = delete;
  StateLock& operator=(const StateLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace

Result<std::unique_ptr<Store>> OpenStore(const Config& config, bool create) {
  if (!config.store.url.empty()) return OpenPostgresStore(config.store.url, create);
  return OpenSqliteStore(config.store.path, create);
}

namespace {

// The store's audit storage together with the store it uses, which it
// keeps open for as long as it lives.
class StoreAuditStorage final : public AuditStorage {
 public:
  StoreAuditStorage(std::unique_ptr<Store> store, std::unique_ptr<AuditStorage> inner)
      : store_(std::move(store)), inner_(std::move(inner)) {}
  ~StoreAuditStorage() override { inner_.reset(); }  // before the store it points into

  Status Append(std::chrono::steady_clock::time_point deadline, const Build& build) override {
    return inner_->Append(deadline, build);
  }
  Result<AuditHead> Head() override { return inner_->Head(); }
  Result<std::vector<std::string>> Chains() override { return inner_->Chains(); }
  Status Read(const std::string& chain, const std::function<void(AuditChainLine&&)>& each, bool* torn) override {
    return inner_->Read(chain, each, torn);
  }
  Result<std::optional<std::pair<uint64_t, std::string>>> Witness(const std::string& chain) override {
    return inner_->Witness(chain);
  }
  std::string Describe() const override { return inner_->Describe(); }
  Status ScanPruneUnits(const std::string& chain, const std::function<bool(const AuditPruneUnit&)>& each) override {
    return inner_->ScanPruneUnits(chain, each);
  }
  Result<uint64_t> Prune(const std::string& chain, uint64_t through_seq) override {
    return inner_->Prune(chain, through_seq);
  }

 private:
  std::unique_ptr<Store> store_;
  std::unique_ptr<AuditStorage> inner_;
};

}  // namespace

bool AuditInStore(const Config& config) { return !config.store.url.empty(); }

Result<std::unique_ptr<AuditStorage>> OpenAuditStorage(const Config& config) {
  if (!AuditInStore(config)) return FileAuditStorage(config.audit);
  // Each node's chain is named by the node: without a name, records of
  // nodes would share one chain and their seqs would collide.
  if (config.node.name.empty()) return Error(Category::kConfig, "the audit trail in the store needs a node name ([node] name)");
  CUSTODY_ASSIGN_OR_RETURN(auto store, OpenStore(config, /*create=*/false));
  CUSTODY_ASSIGN_OR_RETURN(auto inner, store->OpenAuditStorage(config.node.name, config.audit.timeout));
  if (!inner) return Error(Category::kInternal, "the store does not keep an audit trail");
  return std::unique_ptr<AuditStorage>(std::make_unique<StoreAuditStorage>(std::move(store), std::move(inner)));
}

Result<std::unique_ptr<AuditLog>> OpenAuditLog(const Config& config) {
  if (!AuditInStore(config)) return AuditLog::Open(config.audit);
  CUSTODY_ASSIGN_OR_RETURN(auto storage, OpenAuditStorage(config));
  return AuditLog::Open(config.audit, std::move(storage));
}

Result<Token> OpenToken(const Config& config, const SecretBuffer& pin) {
  ApplyTokenEnvironment(config);
  CUSTODY_ASSIGN_OR_RETURN(auto uri, hsm::TokenUri::Parse(config.token.pkcs11.uri));
  // custody processes sharing a state folder open the token one at a time
  // (the lock is held for the C_Initialize and C_Login only, not for the
  // work after), which keeps them from tripping over each other below.
  StateLock lock(config.state_dir + "/token.lock");
  // SoftHSM2's file store can read a token while another process is
  // rewriting it (SoftHSMv2 issue 757, "Token integrity check failed"): the
  // token then looks absent, or looks as if it had no user PIN, until the
  // module is initialised again. Those answers are retried a few times with
  // a fresh C_Initialize. A wrong PIN is never retried: each try counts
  // towards the token's lockout.
  constexpr int kAttempts = 6;
  for (int attempt = 1;; ++attempt) {
    Token t;
    CUSTODY_ASSIGN_OR_RETURN(t.module, hsm::Module::Load(config.token.pkcs11.module));
    Status s = Status::Ok();
    if (auto slot = hsm::FindSlot(*t.module, uri); slot.ok()) {
      t.slot = *slot;
      hsm::SessionPool::Options pool_options;
      // After a re-initialisation the token is looked up again by its URI:
      // a restarted HSM may give it another slot id.
      pool_options.find_slot = [module = t.module.get(), text = config.token.pkcs11.uri]() -> Result<CK_SLOT_ID> {
        CUSTODY_ASSIGN_OR_RETURN(auto again, hsm::TokenUri::Parse(text));
        return hsm::FindSlot(*module, again);
      };
      auto pool = hsm::SessionPool::Open(t.module, t.slot, pin, pool_options);
      if (pool.ok()) {
        t.pool = std::move(*pool);
        return t;
      }
      s = std::move(pool).error();
    } else {
      s = std::move(slot).error();
    }
    const Error& e = s.error();
    // A code is a CK_RV only when the error comes from PKCS#11.
    bool transient = e.backend() == Backend::kPkcs11 &&
                     ((e.category() == Category::kUnavailable && e.code() == CKR_TOKEN_NOT_PRESENT) ||
                      e.code() == CKR_USER_PIN_NOT_INITIALIZED || e.code() == CKR_GENERAL_ERROR);
    // Re-initialising is only possible when nobody else in this process holds the module.
    if (!transient || attempt == kAttempts || t.module.use_count() != 1 || !t.module->owns_initialization()) {
      return s.error();
    }
    t.module.reset();  // the last reference: C_Finalize, so the next Load re-reads the store
    std::this_thread::sleep_for(std::chrono::milliseconds(20 * attempt));
  }
}

Result<SealingBackend> OpenBackend(const Config& config, const SecretBuffer& pin, Store& store) {
  SealingBackend b;
  if (config.token.backend == "tpm") {
    if (pin.empty()) return Error(Category::kConfig, "the TPM backend needs a PIN (its objects' auth values come from it)");
    CUSTODY_ASSIGN_OR_RETURN(b.tpm, tpm::Tpm::Open({.tcti = config.token.tpm.tcti,
                                                    .persist_srk = config.token.tpm.persist_srk,
                                                    .expected_srk_name = config.token.tpm.srk_name}));
    b.sealer = std::make_unique<TpmSealer>(*b.tpm, store, store, pin,
                                           TpmSealer::Options{.pcrs = config.token.tpm.pcrs,
                                                              .kek_cache_seconds = config.token.tpm.kek_cache_seconds});
    return b;
  }
  CUSTODY_ASSIGN_OR_RETURN(b.token, OpenToken(config, pin));
  b.sealer = std::make_unique<Pkcs11Sealer>(*b.token.pool, store);
  return b;
}

Result<std::unique_ptr<AuditSigner>> OpenAuditSigner(SealingBackend& backend, const Config& config, const SecretBuffer& pin,
                                                     bool create, Store* store) {
  if (backend.is_tpm()) {
    CUSTODY_ASSIGN_OR_RETURN(auto s, TpmAuditSigner::Open(*backend.tpm, config.state_dir, pin, create));
    return std::unique_ptr<AuditSigner>(std::move(s));
  }
  if (!backend.token.pool) return Error(Category::kInternal, "no token is open");
  auto found = TokenAuditSigner::Open(*backend.token.pool, /*create=*/false);
  if (found || !create || found.error().category() != Category::kNotFound) {
    if (!found) return std::move(found).error();
    return std::unique_ptr<AuditSigner>(std::move(*found));
  }
  std::optional<StoreLock> held;
  if (store != nullptr) {
    // Another node may be making it now: wait for its lock (a few seconds
    // at most), then look again before making one.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(15);
    for (;;) {
      auto lock = StoreLock::Take(*store, "audit-signing-key", 30, "making the audit signing key");
      if (lock) {
        held.emplace(std::move(*lock));
        break;
      }
      if (lock.error().category() != Category::kUnavailable || std::chrono::steady_clock::now() > give_up) {
        return std::move(lock).error();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  CUSTODY_ASSIGN_OR_RETURN(auto s, TokenAuditSigner::Open(*backend.token.pool, /*create=*/true));
  return std::unique_ptr<AuditSigner>(std::move(s));
}

}  // namespace custody::core
