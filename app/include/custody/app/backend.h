// The composition root: opens what custody.toml names (the token or the
// TPM, its sealer, the audit checkpoint signer) for the CLI and custodyd.
// The service layer never opens a backend itself; it is handed a Sealer.
//
//   CUSTODY_ASSIGN_OR_RETURN(auto backend, core::OpenBackend(config, pin, *store));
//   core::SecretService svc(*store, *backend.sealer);
#pragma once

#include <memory>

#include "custody/app/config.h"
#include "custody/audit/audit.h"
#include "custody/common/result.h"
#include "custody/common/secret.h"
#include "custody/hsm/session.h"
#include "custody/seal/sealer.h"
#include "custody/store/store.h"
#include "custody/tpm/tpm.h"

namespace custody::core {

// The store custody.toml names ([store] path: SQLite), opened; with
// `create`, made when missing. Callers see only the Store interface.
Result<std::unique_ptr<Store>> OpenStore(const Config& config, bool create);

// Where the audit trail lives: with a PostgreSQL store ([store] url), in
// the store, one chain per node ([node] name), so that no acknowledged
// record depends on one node's disk; otherwise the file log in [audit] dir.
bool AuditInStore(const Config& config);
// The trail's storage, for reading (verify, show, export) or writing. With
// the store, it has a connection pool of its own, so audit records never
// wait behind requests for a connection.
Result<std::unique_ptr<AuditStorage>> OpenAuditStorage(const Config& config);
// The writer on it (the file log's folder is made when missing).
Result<std::unique_ptr<AuditLog>> OpenAuditLog(const Config& config);

// The token named by the config, logged in, with a session pool.
struct Token {
  std::shared_ptr<hsm::Module> module;
  CK_SLOT_ID slot = 0;
  std::unique_ptr<hsm::SessionPool> pool;
};
Result<Token> OpenToken(const Config& config, const SecretBuffer& pin);

// The sealing backend the config names ([token] backend), opened, with its
// Sealer. Members are destroyed in reverse: the sealer before what it uses.
struct SealingBackend {
  Token token;                     // PKCS#11; token.pool is null for the TPM
  std::unique_ptr<tpm::Tpm> tpm;   // TPM; null for PKCS#11
  std::unique_ptr<Sealer> sealer;
  bool is_tpm() const { return tpm != nullptr; }
};
Result<SealingBackend> OpenBackend(const Config& config, const SecretBuffer& pin, Store& store);
// The audit checkpoint signer of that backend: a token key (PKCS#11) or a
// TPM key under the SRK. With `create`, made when missing; with `store`
// too, made under the store's lock "audit-signing-key", so that nodes
// starting at once on a shared token make one key, not one each.
Result<std::unique_ptr<AuditSigner>> OpenAuditSigner(SealingBackend& backend, const Config& config, const SecretBuffer& pin,
                                                     bool create, Store* store = nullptr);

}  // namespace custody::core
