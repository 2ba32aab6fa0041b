#include "custody/service/custodian.h"

#include "custody/common/hex.h"
#include "custody/common/time.h"
#include "custody/common/untrusted.h"

namespace custody::core {
namespace {

// A failure of the token or TPM itself (not of one blob, one PIN or one
// PCR policy): what makes health say degraded.
template <typename T>
bool TokenFault(const Result<T>& r) {
  if (r.ok()) return false;
  Backend b = r.error().backend();
  return (b == Backend::kPkcs11 || b == Backend::kTpm) && r.error().category() == Category::kUnavailable;
}

}  // namespace

// The state of one request: its audit record, filled as the flow goes.
struct Custodian::Flow {
  Custodian& c;
  std::shared_ptr<const Authorizer> authz;
  AuditEvent ev;
  bool recorded = false;
  policy::PrincipalId who;

  Flow(Custodian& owner, const RequestContext& rc, std::string action) : c(owner), authz(owner.policy()) {
    ev.action = std::move(action);
    ev.identified_by = rc.identified_by;
    ev.request_id = rc.request_id;
    ev.decision = core::AuditDecision::kNone;
    ev.detail = "policy v" + std::to_string(authz->version()) + " via " + rc.via;
  }

  Status Identify(const RequestContext& rc) {
    auto who_r = authz->Identify(rc.caller);
    if (!who_r) {
      ev.decision = core::AuditDecision::kDeny;
      ev.rule = "identity";
      Error e = std::move(who_r).error();
      return Error(e.category(), e.message()).WithNeedsAuthentication();
    }
    who = *who_r;
    ev.principal = authz->engine().PrincipalName(who);
    return Status::Ok();
  }
  Status Ask(policy::Action action, const policy::Target& t) {
    policy::Decision d;
    Status s = authz->Check(who, action, t, &d);
    ev.decision = d.allowed ? core::AuditDecision::kAllow : core::AuditDecision::kDeny;
    ev.rule = d.rule;
    return s;
  }
  Status Charge(const policy::Target& t, UsageEvent e) {
    Status s = authz->Admit(who, t, e, &c.usage_);
    if (!s.ok()) {
      ev.decision = core::AuditDecision::kLimit;
      ev.rule = s.error().message();
    }
    return s;
  }
  // Fills the record's outcome; false when it was already recorded.
  bool Prepare(const Status& outcome) {
    if (recorded) return false;
    recorded = true;
    if (outcome.ok()) {
      ev.result = core::AuditResult::kOk;
    } else {
      Category cat = outcome.error().category();
      ev.result = (cat == Category::kDenied || cat == Category::kLimit) ? core::AuditResult::kRefused : core::AuditResult::kError;
      ev.error = outcome.error().message();
      if (outcome.error().backend() == Backend::kPkcs11) c.stats_.token_errors.fetch_add(1);
    }
    return true;
  }
  // What the append's result means for the request: fail closed.
  static Status Appended(Custodian& owner, const std::string& action, Result<uint64_t> seq) {
    if (!seq) {
      owner.stats_.audit_failures.fetch_add(1);
      owner.stats_.NoteAudit(seq.error().message());
      return std::move(seq).error().Wrap("refusing " + action);
    }
    if (!owner.stats_.audit_healthy.load(std::memory_order_relaxed)) owner.stats_.NoteAudit(std::nullopt);
    return Status::Ok();
  }
  // Appends the record once; fail closed.
  Status Record(const Status& outcome) {
    if (!Prepare(outcome)) return Status::Ok();
    return Appended(c, ev.action, c.audit_.Append(ev));
  }
  template <typename T>
  Result<T> Finish(Result<T> r) {
    Status rec = Record(r.ok() ? Status::Ok() : Status(r.error()));
    if (!r.ok()) return r;
    if (!rec.ok()) return rec.error();
    return r;
  }
};

template <typename T>
bool Custodian::RecoverFrom(const Result<T>& r) {
  if (r.ok() || !sealer_.Recover(r.error())) return false;
  stats_.token_errors.fetch_add(1);
  const Sealer::Recoveries n = sealer_.recoveries();
  stats_.token_recoveries.store(n.recovered);
  stats_.token_reinitializations.store(n.reinitialized);
  return true;
}

void Custodian::SwapPolicy(std::shared_ptr<const Authorizer> authz) {
  std::lock_guard lock(mu_);
  authz_ = std::move(authz);
}

std::shared_ptr<const Authorizer> Custodian::policy() const {
  std::lock_guard lock(mu_);
  return authz_;
}

Result<uint32_t> Custodian::RefreshPolicy(bool retry) {
  auto newest = store_.CurrentPolicyVersion();
  if (newest.ok() || newest.error().category() != Category::kUnavailable) {
    stats_.NoteStore(std::nullopt);
  } else {
    stats_.NoteStore(newest.error().message());
  }
  if (!newest) return std::move(newest).error();
  const uint32_t in_force = policy()->version();
  {
    std::lock_guard lock(mu_);
    // Already tried and refused: not parsed again every half second.
    if (*newest == in_force || (!retry && *newest == newest_in_store_ && !policy_problem_.empty())) {
      newest_in_store_ = *newest;
      return in_force;
    }
  }
  auto next = Authorizer::Load(store_);
  std::lock_guard lock(mu_);
  newest_in_store_ = *newest;
  if (!next) {
    policy_problem_ = "policy v" + std::to_string(*newest) + " in the store cannot be loaded (" +
                      next.error().message() + "); v" + std::to_string(in_force) + " stays in force";
    return Error(next.error().category(), policy_problem_);
  }
  policy_problem_.clear();
  authz_ = std::make_shared<const Authorizer>(std::move(*next));
  return authz_->version();
}

Custodian::PolicyState Custodian::policy_state() const {
  std::lock_guard lock(mu_);
  return {authz_->version(), newest_in_store_, policy_problem_};
}

Result<Unsealed> Custodian::GetUnrecorded(Flow& f, const RequestContext& rc, const SecretPath& path,
                                          std::optional<uint32_t> version) {
  f.ev.project = path.project;
  f.ev.environment = path.environment;
  f.ev.name = path.name;
  f.ev.version = version;
  CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
  policy::Target t{path.project, path.environment, path.name};
  CUSTODY_RETURN_IF_ERROR(f.Ask(policy::Action::kGet, t));
  CUSTODY_ASSIGN_OR_RETURN(UnsealInputs in, store_.ReadForUnseal(path.project, path.environment, path.name, version));
  const EnvironmentRecord& env = in.env;
  const SecretVersionRecord& rec = in.version;
  const KekRecord& kek = in.kek;
  f.ev.version = rec.version;
  uint64_t grace = f.authz->engine().RotationFor(path.project, path.environment).grace;
  CUSTODY_RETURN_IF_ERROR(CheckReadable(path, rec, grace, SystemNow()));
  f.ev.kek_id = ToHex(kek.ref.id);
  CUSTODY_RETURN_IF_ERROR(f.Charge(t, UsageEvent::kUnseal));
  SecretService svc(store_, sealer_);
  auto u = svc.Unseal(path, env, rec, kek);
  // A lost session or device: the sealer recovers it, and the unseal is
  // tried once more.
  if (RecoverFrom(u)) u = svc.Unseal(path, env, rec, kek);
  stats_.token_healthy.store(!TokenFault(u));
  if (u) u->created_at = rec.created_at;
  return u;
}

Result<Unsealed> Custodian::Get(const RequestContext& rc, const SecretPath& path, std::optional<uint32_t> version) {
  Flow f(*this, rc, "secret.get");
  // Durable before the value leaves: fail closed.
  return f.Finish(GetUnrecorded(f, rc, path, version));
}

void Custodian::GetAsync(const RequestContext& rc, const SecretPath& path, std::optional<uint32_t> version,
                         GetDone done, bool lead_if_idle) {
  core::AuditLog::Announcement coming = audit_.Announce();
  auto f = std::make_shared<Flow>(*this, rc, "secret.get");
  auto r = std::make_shared<Result<Unsealed>>(GetUnrecorded(*f, rc, path, version));
  f->Prepare(r->ok() ? Status::Ok() : Status(r->error()));
  // The flow (and its policy snapshot) and the value stay alive until the
  // record is written; the value is handed over only if it was.
  audit_.AppendAsync(f->ev, [f, r, done = std::move(done)](Result<uint64_t> seq) {
    Status rec = Flow::Appended(f->c, f->ev.action, std::move(seq));
    if (!r->ok()) return done(std::move(*r));
    if (!rec.ok()) return done(rec.error());
    done(std::move(*r));
  }, lead_if_idle, &coming);
}

Result<uint32_t> Custodian::Put(const RequestContext& rc, const SecretPath& path, const SecretBuffer& value,
                                const std::string& put_key, bool* replayed,
                                std::optional<uint32_t> expect_current) {
  Flow f(*this, rc, "secret.put");
  f.ev.project = path.project;
  f.ev.environment = path.environment;
  f.ev.name = path.name;
  auto run = [&]() -> Result<uint32_t> {
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    policy::Target t{path.project, path.environment, path.name};
    CUSTODY_RETURN_IF_ERROR(f.Ask(policy::Action::kPut, t));
    if (value.empty()) return Error(Category::kUsage, "refusing to store an empty value for " + path.str());
    CUSTODY_ASSIGN_OR_RETURN(auto env, store_.FindEnvironment(path.project, path.environment));
    auto replay = [&](uint32_t n) -> Result<uint32_t> {
      if (replayed != nullptr) *replayed = true;
      AuditEvent again = f.ev;
      again.version = n;
      again.detail = "a retry: v" + std::to_string(n) +
                     " was stored by an earlier put with this Idempotency-Key; nothing stored now";
      if (f.recorded) {
        // This request's record named the version it meant to store.
        CUSTODY_RETURN_IF_ERROR(audit_.Append(again));
        return n;
      }
      f.ev = again;
      CUSTODY_RETURN_IF_ERROR(f.Record(Status::Ok()));
      return n;
    };
    if (!put_key.empty()) {
      // Before the limits: a retry is not a second put.
      CUSTODY_ASSIGN_OR_RETURN(std::optional<uint32_t> earlier,
                               store_.VersionForPutKey(env.id, path.name, put_key, static_cast<int64_t>(std::time(nullptr))));
      if (earlier) return replay(*earlier);
    }
    if (expect_current) {
      // A writer that read a version since replaced is refused before the
      // limits are charged; the check that decides a race is SecretService's.
      CUSTODY_ASSIGN_OR_RETURN(uint32_t next, store_.NextVersion(env.id, path.name));
      CUSTODY_RETURN_IF_ERROR(SecretService::CheckExpected(path, next, *expect_current));
    }
    CUSTODY_RETURN_IF_ERROR(f.Charge(t, UsageEvent::kSeal));
    CUSTODY_ASSIGN_OR_RETURN(KekRecord kek, store_.CurrentKek(env.project_id));
    f.ev.kek_id = ToHex(kek.ref.id);
    SecretService svc(store_, sealer_);
    bool raced = false;
    auto put = [&]() {
      return svc.Put(path, value, [&](uint32_t n) -> Status {
      if (f.recorded) {
        AuditEvent again = f.ev;
        again.detail = "v" + std::to_string(f.ev.version.value_or(0)) +
                       " was taken by a concurrent writer; sealed again as v" + std::to_string(n);
        again.version = n;
        f.ev.version = n;
        CUSTODY_RETURN_IF_ERROR(audit_.Append(again));
        return Status::Ok();
      }
      f.ev.version = n;
      return f.Record(Status::Ok());
      }, put_key, &raced, expect_current);
    };
    auto v = put();
    // Sealing failed on a lost session before anything was recorded or
    // stored: recovered and tried once more, as a GET does.
    if (!f.recorded && RecoverFrom(v)) v = put();
    stats_.token_healthy.store(!TokenFault(v));
    // A twin of this put (same key) stored first, on this node or another.
    if (v && raced) return replay(*v);
    if (!v && f.recorded) {
      AuditEvent failed = f.ev;
      failed.result = core::AuditResult::kError;
      failed.error = v.error().message();
      (void)audit_.Append(failed);
    }
    return v;
  };
  return f.Finish(run());
}

Result<uint32_t> Custodian::Revoke(const RequestContext& rc, const SecretPath& path, uint32_t version,
                                   const std::string& reason, bool already_ok,
                                   const std::vector<uint32_t>& must_exist) {
  Flow f(*this, rc, "secret.revoke");
  f.ev.project = path.project;
  f.ev.environment = path.environment;
  f.ev.name = path.name;
  f.ev.version = version;
  auto run = [&]() -> Result<uint32_t> {
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    CUSTODY_RETURN_IF_ERROR(f.Ask(policy::Action::kRotate, {path.project, path.environment, path.name}));
    // Free text for the store and the record: one line of printable UTF-8,
    // checked here whoever sent it (the fronts check it too, to say which
    // field is wrong).
    if (reason.empty()) return Error(Category::kUsage, "the reason is empty: say why the version is revoked");
    if (reason.size() > kMaxRevokeReasonBytes || !PrintableText(reason)) {
      return Error(Category::kUsage, "the reason must be printable UTF-8 text of at most " +
                                         std::to_string(kMaxRevokeReasonBytes) + " bytes");
    }
    if (version == 0) return Error(Category::kUsage, "version must be a positive number");
    CUSTODY_ASSIGN_OR_RETURN(auto env, store_.FindEnvironment(path.project, path.environment));
    // After the policy's answer: who may not rotate learns nothing of the versions.
    for (uint32_t v : must_exist) {
      auto there = store_.GetVersion(env, path.name, v);
      if (there) continue;
      if (there.error().category() != Category::kNotFound) return std::move(there).error();
      return Error(Category::kUsage, "version " + std::to_string(v) + " of " + path.str() +
                                         " does not exist; nothing was revoked");
    }
    CUSTODY_ASSIGN_OR_RETURN(auto rec, store_.GetVersion(env, path.name, version));
    if (rec.revoked_at) {
      if (!already_ok) {
        return Error(Category::kUsage, "version " + std::to_string(version) + " of " + path.str() +
                                           " was already revoked at " + FormatUtc(*rec.revoked_at));
      }
      f.ev.detail += "; already revoked at " + FormatUtc(*rec.revoked_at) + "; nothing changed";
      auto current = store_.GetVersion(env, path.name, std::nullopt);
      if (current) return current->version;
      if (current.error().category() == Category::kNotFound) return 0u;  // every version revoked
      return std::move(current).error();
    }
    f.ev.detail += "; reason: " + reason;
    // Recorded before the store changes: a revocation never goes unrecorded.
    CUSTODY_RETURN_IF_ERROR(f.Record(Status::Ok()));
    auto current = store_.RevokeVersion(env, path.name, version, reason, f.ev.principal, SystemNow());
    if (!current) {
      AuditEvent failed = f.ev;
      failed.result = AuditResult::kError;
      failed.error = current.error().message();
      (void)audit_.Append(failed);
    }
    return current;
  };
  return f.Finish(run());
}

Result<std::vector<UsageRow>> Custodian::Usage(const RequestContext& rc, const std::optional<std::string>& project) {
  Flow f(*this, rc, "usage.read");
  // A project name from a request goes into the record only once it is a
  // valid name (a transport should have refused it already).
  const Status valid_project = project ? ValidateProjectName(*project) : Status::Ok();
  if (valid_project.ok()) f.ev.project = project.value_or("");
  auto run = [&]() -> Result<std::vector<UsageRow>> {
    CUSTODY_RETURN_IF_ERROR(valid_project);
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    if (project) CUSTODY_RETURN_IF_ERROR(f.Ask(policy::Action::kReadUsage, {*project, "", ""}));
    bool admin = f.authz->Allows(f.who, policy::Action::kCreateProject, {});
    // Our own counts first, so this answer includes every request before it.
    (void)usage_.Flush();
    CUSTODY_ASSIGN_OR_RETURN(auto rows, store_.Usage(project, static_cast<int64_t>(std::time(nullptr))));
    std::vector<UsageRow> out;
    for (auto& r : rows) {
      if (admin || f.authz->Allows(f.who, policy::Action::kReadUsage, {r.project, "", ""})) out.push_back(std::move(r));
    }
    if (f.ev.decision == core::AuditDecision::kNone) {
      f.ev.decision = core::AuditDecision::kAllow;
      f.ev.rule = "rows filtered by read-usage grants";
    }
    return out;
  };
  return f.Finish(run());
}

Result<std::vector<SecretSummary>> Custodian::List(const RequestContext& rc, const std::string& project,
                                                   const std::string& env) {
  Flow f(*this, rc, "secret.list");
  f.ev.project = project;
  f.ev.environment = env;
  auto run = [&]() -> Result<std::vector<SecretSummary>> {
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    // One environment: the caller must be allowed to list it. The whole
    // project (env empty): only what the caller may list is shown.
    if (!env.empty()) {
      CUSTODY_RETURN_IF_ERROR(f.Ask(policy::Action::kList, {project, env, ""}));
    } else {
      f.ev.decision = AuditDecision::kAllow;
      f.ev.rule = "rows filtered by list grants";
    }
    CUSTODY_ASSIGN_OR_RETURN(auto rows, store_.ListSecrets(project, env.empty() ? std::nullopt
                                                                                : std::optional<std::string>(env)));
    std::vector<SecretSummary> out;
    for (auto& r : rows) {
      if (f.authz->Allows(f.who, policy::Action::kList, {r.project, r.environment, r.name})) out.push_back(std::move(r));
    }
    f.ev.detail += "; " + std::to_string(out.size()) + " name(s)";
    return out;
  };
  return f.Finish(run());
}

Result<std::vector<SecretVersionRecord>> Custodian::Versions(const RequestContext& rc, const SecretPath& path) {
  Flow f(*this, rc, "secret.metadata");
  f.ev.project = path.project;
  f.ev.environment = path.environment;
  f.ev.name = path.name;
  auto run = [&]() -> Result<std::vector<SecretVersionRecord>> {
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    CUSTODY_RETURN_IF_ERROR(f.Ask(policy::Action::kList, {path.project, path.environment, path.name}));
    CUSTODY_ASSIGN_OR_RETURN(EnvironmentRecord env, store_.FindEnvironment(path.project, path.environment));
    CUSTODY_ASSIGN_OR_RETURN(auto versions, store_.ListVersions(env, path.name));
    if (versions.empty()) return Error(Category::kNotFound, "no secret " + path.str());
    return versions;
  };
  return f.Finish(run());
}

namespace {
Error NoTokens() {
  return Error(Category::kConfig, "this node issues no access tokens ([server] token_key_file is not set)");
}
// "token 0123abcd... for svc:web", appended to the transport's identity.
std::string TokenShown(const AccessTokenRecord& t) { return "token " + t.accessor; }
}  // namespace

Result<AccessTokenRecord> Custodian::Authenticate(RequestContext& rc, std::string_view token, const std::string& action,
                                                  const std::string& project, const std::string& env) {
  // A node without the key refuses tokens as it would an unknown one.
  auto r = tokens_ != nullptr ? tokens_->Check(token, SystemNow())
                              : Result<AccessTokenRecord>(Error(
                                    Category::kDenied, "this node takes no access tokens ([server] token_key_file is not set)"));
  if (!r) {
    // Only a refusal writes a record here; a good token's request writes
    // its own, naming the principal and the token.
    Flow f(*this, rc, action);
    f.ev.project = project;
    f.ev.environment = env;
    if (r.error().category() == Category::kDenied) {
      f.ev.decision = AuditDecision::kDeny;
      f.ev.rule = "access token";
    }
    return f.Finish(std::move(r));
  }
  rc.caller.token_principal = r->principal;
  rc.identified_by = TokenShown(*r) + " via " + rc.identified_by;
  return r;
}

Result<AccessTokens::Issued> Custodian::Login(const RequestContext& rc, int64_t ttl, int64_t max_ttl) {
  Flow f(*this, rc, "token.login");
  auto run = [&]() -> Result<AccessTokens::Issued> {
    if (tokens_ == nullptr) return NoTokens();
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    f.ev.decision = AuditDecision::kAllow;
    f.ev.rule = "certificate identifies the principal";
    CUSTODY_ASSIGN_OR_RETURN(auto issued, tokens_->Issue(f.ev.principal, ttl, max_ttl, "login " + rc.identified_by,
                                                         SystemNow()));
    f.ev.detail += "; issued " + TokenShown(issued.record);
    return issued;
  };
  return f.Finish(run());
}

Result<AccessTokens::Issued> Custodian::IssueToken(const RequestContext& rc, const std::string& principal, int64_t ttl,
                                                   int64_t max_ttl) {
  Flow f(*this, rc, "token.issue");
  auto run = [&]() -> Result<AccessTokens::Issued> {
    if (tokens_ == nullptr) return NoTokens();
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    if (!f.authz->Allows(f.who, policy::Action::kCreateProject, {})) {
      f.ev.decision = AuditDecision::kDeny;
      f.ev.rule = "policy admins only";
      return Error(Category::kDenied, f.ev.principal + " may not issue tokens: policy admins only");
    }
    if (!f.authz->engine().FindPrincipal(principal)) {
      return Error(Category::kNotFound, "no principal " + principal + " in the policy in force");
    }
    f.ev.decision = AuditDecision::kAllow;
    f.ev.rule = "policy admin";
    CUSTODY_ASSIGN_OR_RETURN(auto issued, tokens_->Issue(principal, ttl, max_ttl, f.ev.principal, SystemNow()));
    f.ev.detail += "; issued " + TokenShown(issued.record) + " for " + principal;
    return issued;
  };
  return f.Finish(run());
}

Result<AccessTokenRecord> Custodian::LookupSelf(const RequestContext& rc, const AccessTokenRecord& token) {
  Flow f(*this, rc, "token.lookup");
  auto run = [&]() -> Result<AccessTokenRecord> {
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    f.ev.decision = AuditDecision::kAllow;
    f.ev.rule = "own token";
    return token;
  };
  return f.Finish(run());
}

Result<AccessTokenRecord> Custodian::RenewSelf(const RequestContext& rc, std::string_view token, int64_t increment) {
  Flow f(*this, rc, "token.renew");
  auto run = [&]() -> Result<AccessTokenRecord> {
    if (tokens_ == nullptr) return NoTokens();
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    f.ev.decision = AuditDecision::kAllow;
    f.ev.rule = "own token";
    CUSTODY_ASSIGN_OR_RETURN(auto r, tokens_->Renew(token, increment, SystemNow()));
    f.ev.detail += "; expires " + std::to_string(r.expires_at);
    return r;
  };
  return f.Finish(run());
}

Result<size_t> Custodian::RevokeTokens(const RequestContext& rc, const std::string& accessor,
                                       const std::string& principal) {
  Flow f(*this, rc, "token.revoke");
  auto run = [&]() -> Result<size_t> {
    if (tokens_ == nullptr) return NoTokens();
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    if (!f.authz->Allows(f.who, policy::Action::kCreateProject, {})) {
      f.ev.decision = AuditDecision::kDeny;
      f.ev.rule = "policy admins only";
      return Error(Category::kDenied, f.ev.principal + " may not revoke tokens: policy admins only");
    }
    f.ev.decision = AuditDecision::kAllow;
    f.ev.rule = "policy admin";
    CUSTODY_ASSIGN_OR_RETURN(size_t n, tokens_->Revoke(accessor, principal, SystemNow()));
    f.ev.detail += "; revoked " + std::to_string(n) + " token(s) " +
                   (accessor.empty() ? "of " + principal : "with accessor " + accessor);
    return n;
  };
  return f.Finish(run());
}

Result<std::vector<AccessTokenRecord>> Custodian::ListTokens(const RequestContext& rc) {
  Flow f(*this, rc, "token.list");
  auto run = [&]() -> Result<std::vector<AccessTokenRecord>> {
    CUSTODY_RETURN_IF_ERROR(f.Identify(rc));
    if (!f.authz->Allows(f.who, policy::Action::kCreateProject, {})) {
      f.ev.decision = AuditDecision::kDeny;
      f.ev.rule = "policy admins only";
      return Error(Category::kDenied, f.ev.principal + " may not list tokens: policy admins only");
    }
    f.ev.decision = AuditDecision::kAllow;
    f.ev.rule = "policy admin";
    return store_.ListAccessTokens();
  };
  return f.Finish(run());
}

Result<std::vector<RotationItem>> Custodian::RotationSchedule() {
  auto authz = policy();
  CUSTODY_ASSIGN_OR_RETURN(auto secrets, store_.ListSecrets(std::nullopt, std::nullopt));
  return RotationStatus(secrets, authz->engine(), SystemNow());
}

}  // namespace custody::core
