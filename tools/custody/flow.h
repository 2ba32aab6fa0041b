// The flow every direct-mode CLI command shares: open the config, store and
// audit log; identify the caller and ask the policy; charge the limits; open
// the token only when needed; record the outcome once, fail closed.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>

#include "commands.h"
#include "custody/app/backend.h"
#include "custody/app/config.h"
#include "custody/audit/audit.h"
#include "custody/common/names.h"
#include "custody/seal/sealer.h"
#include "custody/service/authz.h"
#include "custody/service/custodian.h"
#include "custody/service/service.h"
#include "custody/store/store.h"

namespace custody::cli {

// What a command needs, opened in order and closed in reverse: the sealer
// goes before the session pool, the pool before the module.
struct Opened {
  core::Config config;
  std::unique_ptr<core::Store> store;
  // The sealing backend (PKCS#11 token or TPM), opened only when needed;
  // `sealer` points into it. The PIN stays (locked) for the TPM's audit key.
  core::SealingBackend backend;
  core::Sealer* sealer = nullptr;
  SecretBuffer pin;
  std::optional<core::Authorizer> authz;
  policy::PrincipalId who;
  const Globals* globals = nullptr;
  // The audit record this command writes: filled in as the command learns
  // who asks and what was decided, appended once (Record), before any value
  // is released.
  std::unique_ptr<core::AuditLog> audit;
  core::AuditEvent ev;
  bool recorded = false;
  bool best_effort = false;  // audit tools: a damaged log must not stop them
};

// Who is running this process, as the policy's identities see it.
policy::Caller LocalCaller();
std::string IdentifiedBy(const policy::Caller& c);
Result<std::unique_ptr<core::AuditLog>> OpenAudit(const core::Config& c);
// Loads the policy in force and identifies the caller: every command that
// reads or changes projects or secrets goes through here first.
Status Guard(Opened& o);
// Asks the policy and notes the decision and its rule for the audit record.
Status Ask(Opened& o, policy::Action action, const policy::Target& target);
// Charges the rate and spend limits; a refusal is noted as decision "limit".
Status Charge(Opened& o, const policy::Target& target, core::UsageEvent event);
// Opens the config, the store and the audit log, and starts the record.
Result<Opened> OpenStore(const Globals& g, const std::string& action);
// The same, with the record naming one secret.
Result<Opened> OpenStore(const Globals& g, const std::string& action, const core::SecretPath& path);
// A value from --from-file or stdin, into locked memory; one trailing
// newline dropped unless `keep_newline`. A file that cannot be read is a
// usage error naming --from-file.
Result<SecretBuffer> ReadValue(const std::optional<std::string>& from_file, bool keep_newline);
void DropTrailingNewline(SecretBuffer& value);
Status OpenTokenFor(const Globals& g, Opened& o);
// The backend's audit checkpoint signer (opens the backend if needed).
Result<std::unique_ptr<core::AuditSigner>> OpenSigner(const Globals& g, Opened& o, bool create);
// Appends this command's record once. Fail closed: when it cannot be made
// durable the command fails, and a value is never released unrecorded.
Status Record(Opened& o, const Status& outcome);
// Signs a checkpoint when one is due (never fails the command).
void MaybeCheckpoint(Opened& o);
// Ends a command: records its outcome (if the command did not already) and
// returns the first error, the command's own before the audit log's.
Status Finish(Opened& o, Status outcome);
// The one request flow (core::Custodian, the same that custodyd runs for
// every request) for this process: the caller is the local user, the record
// says "via cli", and the token is opened only when the flow first needs it
// (a request the policy refuses never asks for the PIN). `fn` runs the
// request; the flow writes its record. Then a checkpoint is signed if due.
Status WithCustodian(const Globals& g, Opened& o,
                     const std::function<Status(core::Custodian&, const core::RequestContext&)>& fn);
// Seals `value` as the next version of `path`, with this command's audit
// record made durable after sealing and before the store commits (a version
// never exists unrecorded). A concurrent writer that takes the version gets
// a second record under the same request id; a failure after the record is
// recorded too.
Result<uint32_t> AuditedPut(Opened& o, const core::SecretPath& path, const SecretBuffer& value);
void PrintJson(const nlohmann::json& j);
// CUSTODY_ADDR set: the server does the flow; this process never sees the PIN.
std::optional<std::string> ServerAddress();

}  // namespace custody::cli
