#include "flow.h"

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "custody/app/backend.h"
#include "custody/common/untrusted.h"
#include "custody/hsm/token_signer.h"
#include "custody/tpm/tpm_signer.h"

namespace custody::cli {

using nlohmann::json;

using policy::Action;

// Who is running this process, as the policy's identities see it.
policy::Caller LocalCaller() {
  policy::Caller c;
  c.uid = static_cast<uint32_t>(::getuid());
  c.gids.push_back(static_cast<uint32_t>(::getgid()));
  gid_t groups[256];
  int n = ::getgroups(256, groups);
  for (int i = 0; i < n; ++i) c.gids.push_back(static_cast<uint32_t>(groups[i]));
  struct passwd pw {};
  struct passwd* found = nullptr;
  char buf[4096];
  // A user name that is not plain text could name no principal (a policy is
  // UTF-8 text) and must not reach the audit record: left out.
  if (::getpwuid_r(::getuid(), &pw, buf, sizeof buf, &found) == 0 && found != nullptr &&
      PrintableText(found->pw_name)) {
    c.user = found->pw_name;
  }
  return c;
}

std::string IdentifiedBy(const policy::Caller& c) {
  std::string s = "uid " + std::to_string(c.uid.value_or(0));
  if (c.user) s += " (" + *c.user + ")";
  return s;
}

Result<std::unique_ptr<core::AuditLog>> OpenAudit(const core::Config& c) {
  auto log = core::OpenAuditLog(c);
  if (!log) return std::move(log).error().Wrap("refusing to work without an audit log");
  return log;
}

// Loads the policy in force and identifies the caller: every command that
// reads or changes projects or secrets goes through here first.
Status Guard(Opened& o) {
  auto authz = core::Authorizer::Load(*o.store);
  if (!authz) {
    o.ev.decision = core::AuditDecision::kDeny;
    o.ev.rule = "no policy in force";
    return std::move(authz).error();
  }
  auto who = authz->Identify(LocalCaller());
  if (!who) {
    o.ev.decision = core::AuditDecision::kDeny;
    o.ev.rule = "identity";
    return std::move(who).error();
  }
  o.who = *who;
  o.authz.emplace(std::move(*authz));
  o.ev.principal = o.authz->engine().PrincipalName(o.who);
  o.ev.detail = "policy v" + std::to_string(o.authz->version());
  return Status::Ok();
}

// Asks the policy and notes the decision and its rule for the audit record.
Status Ask(Opened& o, Action action, const policy::Target& target) {
  policy::Decision d;
  Status s = o.authz->Check(o.who, action, target, &d);
  o.ev.decision = d.allowed ? core::AuditDecision::kAllow : core::AuditDecision::kDeny;
  o.ev.rule = d.rule;
  return s;
}

// Charges the rate and spend limits; a refusal is noted as decision "limit".
Status Charge(Opened& o, const policy::Target& target, core::UsageEvent event) {
  Status s = o.authz->Admit(o.who, target, event);
  if (!s.ok()) {
    o.ev.decision = core::AuditDecision::kLimit;
    o.ev.rule = s.error().message();
  }
  return s;
}

// Opens the config, the store and the audit log, and starts the record.
Result<Opened> OpenStore(const Globals& g, const std::string& action) {
  Opened o;
  o.globals = &g;
  CUSTODY_ASSIGN_OR_RETURN(o.config, core::LoadConfig(core::LocateConfig(g.config)));
  CUSTODY_ASSIGN_OR_RETURN(o.store, core::OpenStore(o.config, /*create=*/false));
  CUSTODY_ASSIGN_OR_RETURN(o.audit, OpenAudit(o.config));
  o.ev.action = action;
  o.ev.request_id = core::NewRequestId();
  o.ev.identified_by = IdentifiedBy(LocalCaller());
  o.ev.decision = core::AuditDecision::kNone;
  return o;
}

Result<Opened> OpenStore(const Globals& g, const std::string& action, const core::SecretPath& path) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, action));
  o.ev.project = path.project;
  o.ev.environment = path.environment;
  o.ev.name = path.name;
  return o;
}

void DropTrailingNewline(SecretBuffer& value) {
  auto s = value.RevealString(SecretAccess{});
  if (!s.empty() && s.back() == '\n') value.Truncate(s.size() - 1);
}

Result<SecretBuffer> ReadValue(const std::optional<std::string>& from_file, bool keep_newline) {
  Result<SecretBuffer> value = Error(Category::kInternal, "unset");
  if (from_file) {
    value = SecretBuffer::ReadFile(*from_file, core::kMaxSecretSize, /*require_private=*/false);
    if (!value) {
      Error e = std::move(value).error();
      return Error(e.category() == Category::kUnavailable ? Category::kUsage : e.category(),
                   "--from-file " + e.message());
    }
  } else {
    if (::isatty(STDIN_FILENO)) std::fprintf(stderr, "custody: reading the value from stdin; end with Ctrl-D\n");
    value = SecretBuffer::ReadFd(STDIN_FILENO, core::kMaxSecretSize);
    if (!value) return std::move(value).error().Wrap("reading the value from stdin");
  }
  if (!keep_newline) DropTrailingNewline(*value);
  return value;
}

Status OpenTokenFor(const Globals& g, Opened& o) {
  if (o.sealer != nullptr) return Status::Ok();
  CUSTODY_ASSIGN_OR_RETURN(o.pin, core::ResolvePin(o.config, g.pin_fd));
  CUSTODY_ASSIGN_OR_RETURN(o.backend, core::OpenBackend(o.config, o.pin, *o.store));
  o.sealer = o.backend.sealer.get();
  return Status::Ok();
}

Result<std::unique_ptr<core::AuditSigner>> OpenSigner(const Globals& g, Opened& o, bool create) {
  CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
  return core::OpenAuditSigner(o.backend, o.config, o.pin, create, o.store.get());
}

// Appends this command's record once. Fail closed: when it cannot be made
// durable the command fails, and a value is never released unrecorded.
Status Record(Opened& o, const Status& outcome) {
  if (o.recorded) return Status::Ok();
  o.recorded = true;
  if (outcome.ok()) {
    o.ev.result = core::AuditResult::kOk;
  } else {
    Category c = outcome.error().category();
    o.ev.result = (c == Category::kDenied || c == Category::kLimit) ? core::AuditResult::kRefused : core::AuditResult::kError;
    o.ev.error = outcome.error().message();
  }
  auto seq = o.audit->Append(o.ev);
  if (!seq && !o.best_effort) return std::move(seq).error().Wrap("refusing " + o.ev.action);
  return Status::Ok();
}

// Signs a checkpoint when one is due, with the token if it can be had.
// Never fails the command: the records are durable already, and the next
// command tries again.
void MaybeCheckpoint(Opened& o) {
  if (!o.audit->CheckpointDue()) return;
  auto signer = OpenSigner(*o.globals, o, /*create=*/true);
  if (!signer) return;
  std::pair<uint64_t, std::string> covers;
  auto seq = o.audit->Checkpoint(**signer, &covers);
  // The store witnesses a file log's checkpoints; a trail in the store
  // keeps them beside its records.
  if (seq && !core::AuditInStore(o.config)) (void)o.store->RecordAuditCheckpoint(o.config.node.name, *seq, covers.second);
}

// Ends a command: records its outcome (if the command did not already) and
// returns the first error, the command's own before the audit log's.
Status Finish(Opened& o, Status outcome) {
  Status r = Record(o, outcome);
  MaybeCheckpoint(o);
  if (!outcome.ok()) return outcome;
  return r;
}

void PrintJson(const json& j) { std::printf("%s\n", j.dump(2).c_str()); }

// CUSTODY_ADDR set: the server does the flow; this process never sees the PIN.
std::optional<std::string> ServerAddress() {
  const char* a = std::getenv("CUSTODY_ADDR");
  if (a == nullptr || *a == '\0') return std::nullopt;
  return std::string(a);
}

namespace {

// The backend, opened on first use: forwards every call to the sealer that
// OpenTokenFor opens (and keeps in `o`), so that the flow can be built
// before anyone knows whether the token will be needed.
class LazySealer final : public core::Sealer {
 public:
  LazySealer(const Globals& g, Opened& o) : g_(g), o_(o) {}

  using Sealer::CreateKek;
  Result<core::KekRef> CreateKek(std::string_view project, uint32_t version, std::vector<uint8_t>* material) override {
    CUSTODY_RETURN_IF_ERROR(Open());
    return o_.sealer->CreateKek(project, version, material);
  }
  Status DestroyKek(const core::KekRef& kek) override {
    CUSTODY_RETURN_IF_ERROR(Open());
    return o_.sealer->DestroyKek(kek);
  }
  Result<size_t> DestroyUnrecorded(const std::string& label, const std::vector<core::KekId>& keep) override {
    CUSTODY_RETURN_IF_ERROR(Open());
    return o_.sealer->DestroyUnrecorded(label, keep);
  }
  std::string ResealMode() override {
    Status s = Open();
    return s.ok() ? o_.sealer->ResealMode() : "unknown (" + s.error().message() + ")";
  }
  Status Random(std::span<uint8_t> out) override {
    CUSTODY_RETURN_IF_ERROR(Open());
    return o_.sealer->Random(out);
  }
  Result<std::vector<uint8_t>> Seal(const core::KekRef& kek, const core::SealContext& ctx,
                                    const SecretBuffer& value) override {
    CUSTODY_RETURN_IF_ERROR(Open());
    return o_.sealer->Seal(kek, ctx, value);
  }
  Result<SecretBuffer> Unseal(const core::KekRef& expected, const core::SealContext& ctx,
                              std::span<const uint8_t> blob) override {
    CUSTODY_RETURN_IF_ERROR(Open());
    return o_.sealer->Unseal(expected, ctx, blob);
  }
  bool Recover(const Error& failure) override { return o_.sealer != nullptr && o_.sealer->Recover(failure); }
  Recoveries recoveries() const override { return o_.sealer != nullptr ? o_.sealer->recoveries() : Recoveries{}; }

 private:
  Status Open() { return OpenTokenFor(g_, o_); }
  const Globals& g_;
  Opened& o_;
};

}  // namespace

Status WithCustodian(const Globals& g, Opened& o,
                     const std::function<Status(core::Custodian&, const core::RequestContext&)>& fn) {
  auto authz = core::Authorizer::Load(*o.store);
  if (!authz) {
    o.ev.decision = core::AuditDecision::kDeny;
    o.ev.rule = "no policy in force";
    return Finish(o, std::move(authz).error());
  }
  LazySealer sealer(g, o);
  Status outcome;
  {
    core::Custodian custodian(*o.store, *o.audit, sealer, std::make_shared<const core::Authorizer>(std::move(*authz)));
    const policy::Caller caller = LocalCaller();
    outcome = fn(custodian, core::RequestContext{caller, IdentifiedBy(caller), o.ev.request_id, "cli"});
  }  // usage counts the flow kept to write behind are written here
  o.recorded = true;  // the flow wrote this request's record (or failed closed)
  MaybeCheckpoint(o);
  return outcome;
}

Result<uint32_t> AuditedPut(Opened& o, const core::SecretPath& path, const SecretBuffer& value) {
  core::SecretService svc(*o.store, *o.sealer);
  auto version = svc.Put(path, value, [&](uint32_t v) -> Status {
    if (o.recorded) {
      // A concurrent writer took the version we logged: log the new one.
      core::AuditEvent again = o.ev;
      again.detail += "; v" + std::to_string(o.ev.version.value_or(0)) +
                      " was taken by a concurrent writer, sealed again as v" + std::to_string(v);
      again.version = v;
      CUSTODY_RETURN_IF_ERROR(o.audit->Append(again));
      o.ev.version = v;
      return Status::Ok();
    }
    o.ev.version = v;
    return Record(o, Status::Ok());
  });
  if (!version && o.recorded) {
    // Logged as done, then failed: say so under the same request id.
    core::AuditEvent failed = o.ev;
    failed.result = core::AuditResult::kError;
    failed.error = version.error().message();
    (void)o.audit->Append(failed);
  }
  return version;
}

}  // namespace custody::cli
