// Rotation commands: secret rotate / revoke / versions, rotation status,
// kek rotate / list. Each takes the same flow as the other direct-mode
// commands (flow.h): policy first, audit record before any change.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "custody/app/backend.h"
#include "custody/client/client.h"
#include "custody/common/hex.h"
#include "custody/hsm/objects.h"
#include "custody/service/kek_rotation.h"
#include "custody/service/rotation.h"
#include "flow.h"
#include "io.h"
#include "progress.h"

extern char** environ;

namespace custody::cli {
namespace {

using nlohmann::json;
using policy::Action;

// Runs a provider command (`/bin/sh -c CMD`) and reads its stdout into
// locked memory. Its stderr is ours, so its own errors reach the user. It
// never sees the token PIN: CUSTODY_PIN is dropped from its environment and
// the PIN descriptor is closed. Killed (its whole process group) after
// `timeout_seconds`.
Result<SecretBuffer> RunProvider(const std::string& cmd, int timeout_seconds, std::optional<int> pin_fd) {
  if (timeout_seconds < 1 || timeout_seconds > 3600) {
    return Error(Category::kUsage, "--timeout must be from 1 to 3600 seconds");
  }
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return Error::Os(errno, "creating a pipe for the provider command");
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::string_view(*e).rfind("CUSTODY_PIN=", 0) == 0) continue;
    env_strings.emplace_back(*e);
  }
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);

  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return Error::Os(errno, "starting the provider command");
  }
  if (pid == 0) {
    ::setpgid(0, 0);
    ::dup2(fds[1], STDOUT_FILENO);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, STDIN_FILENO);
    if (pin_fd) ::close(*pin_fd);
    const char* argv[] = {"sh", "-c", cmd.c_str(), nullptr};
    ::execve("/bin/sh", const_cast<char* const*>(argv), envp.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  SecretBuffer buf(core::kMaxSecretSize + 1);
  auto dst = buf.RevealMutable(SecretAccess{});
  size_t got = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
  bool timed_out = false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) {
      timed_out = true;
      break;
    }
    if (got == dst.size()) break;  // too long: reported below
    ssize_t n = ::read(fds[0], dst.data() + got, dst.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fds[0]);
  if (timed_out || got > core::kMaxSecretSize) ::kill(-pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  buf.Truncate(std::min(got, core::kMaxSecretSize));
  if (timed_out) {
    return Error(Category::kUnavailable, "provider command did not finish within " + std::to_string(timeout_seconds) +
                                             " s and was killed; the current version stays");
  }
  if (got > core::kMaxSecretSize) {
    return Error(Category::kUsage, "provider command printed more than " + std::to_string(core::kMaxSecretSize) +
                                       " bytes; the current version stays");
  }
  if (WIFSIGNALED(status)) {
    return Error(Category::kUnavailable, "provider command was killed by signal " +
                                             std::to_string(WTERMSIG(status)) + "; the current version stays");
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return Error(Category::kUnavailable, "provider command exited with status " +
                                             std::to_string(WEXITSTATUS(status)) + "; the current version stays");
  }
  return buf;
}

}  // namespace

Status SecretRotate(const Globals& g, const RotateArgs& a) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(a.path));
  // A file that cannot be read is named in the error, which the record keeps.
  if (a.from_file) CUSTODY_RETURN_IF_ERROR(CheckArgText("--from-file", *a.from_file));
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--format", a.format));  // quoted back when it is wrong
  std::optional<core::ValueFormat> format = core::ParseValueFormat(a.format);
  if (!format) return Error(Category::kUsage, "--format must be hex, base64 or base64url (got '" + a.format + "')");
  if (!a.generate && (!a.prefix.empty() || a.format != "base64url")) {
    return Error(Category::kUsage, "--format and --prefix go with --generate");
  }
  std::string source = a.generate ? "generated in the token (" + std::to_string(*a.generate) + " bytes, " + a.format + ")"
                       : a.exec   ? "from the provider command"
                       : a.from_file ? "from a file"
                                     : "from stdin";

  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "secret.rotate", path));
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    policy::Target target{path.project, path.environment, path.name};
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kRotate, target));
    CUSTODY_ASSIGN_OR_RETURN(auto env, o.store->FindEnvironment(path.project, path.environment));
    // Rotation replaces a secret that exists; a first version is a put.
    {
      auto versions = o.store->ListVersions(env, path.name);
      if (!versions) {
        Error e = std::move(versions).error();
        if (e.category() == Category::kNotFound) {
          return Error(Category::kNotFound, "secret '" + path.str() + "' does not exist; store its first version with 'custody secret put'");
        }
        return e;
      }
    }
    // The new value. Until it is sealed and stored, the current version
    // stays current: a failing provider changes nothing.
    Result<SecretBuffer> value = Error(Category::kInternal, "unset");
    if (a.exec) {
      value = RunProvider(*a.exec, a.timeout_seconds, g.pin_fd);
      if (value && !a.keep_newline) DropTrailingNewline(*value);
      if (value && value->empty()) value = Error(Category::kIntegrity, "provider command printed nothing; the current version stays");
    } else if (!a.generate) {
      value = ReadValue(a.from_file, a.keep_newline);
      if (!value) return std::move(value).error();
    }
    if (!a.generate) {
      if (!value) return std::move(value).error();
      if (value->empty()) return Error(Category::kUsage, "refusing to store an empty value for " + path.str());
    }
    CUSTODY_RETURN_IF_ERROR(Charge(o, target, core::UsageEvent::kSeal));
    CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
    if (a.generate) {
      value = core::GenerateValue(*o.sealer, *a.generate, *format, a.prefix);
      if (!value) return std::move(value).error();
    }
    auto settings = o.authz->engine().RotationFor(path.project, path.environment);
    CUSTODY_ASSIGN_OR_RETURN(core::KekRecord kek, o.store->CurrentKek(env.project_id));
    o.ev.kek_id = ToHex(kek.ref.id);
    o.ev.detail += "; new value " + source;
    core::SecretService svc(*o.store, *o.sealer);
    auto version = AuditedPut(o, path, *value);
    if (!version) return std::move(version).error();
    // Retention: never a current version or one in its grace period.
    auto trimmed = svc.ApplyRetention(path, settings.keep_versions, settings.grace);
    auto versions = o.store->ListVersions(env, path.name);
    std::optional<int64_t> prev_until;
    uint32_t prev_version = 0;
    if (versions) {
      for (const auto& r : *versions) {
        if (auto until = core::GraceEnds(r, settings.grace, svc.Now())) {
          prev_until = until;
          prev_version = r.version;
        }
      }
    }
    if (g.json) {
      json j{{"path", path.str()}, {"version", *version}, {"source", source}};
      if (prev_until) j["previous"] = {{"version", prev_version}, {"readable_until", FormatTime(*prev_until)}};
      if (trimmed) j["trimmed"] = *trimmed;
      PrintJson(j);
    } else {
      std::printf("rotated %s: version %u is current (value %s)\n", path.str().c_str(), *version, source.c_str());
      if (prev_until) {
        std::printf("version %u stays readable until %s (grace %s)\n", prev_version, FormatTime(*prev_until).c_str(),
                    policy::FormatDuration(settings.grace).c_str());
      }
      if (trimmed && !trimmed->empty()) {
        std::string list;
        for (uint32_t v : *trimmed) list += (list.empty() ? "v" : ", v") + std::to_string(v);
        std::printf("trimmed %s (keep_versions = %u)\n", list.c_str(), settings.keep_versions);
      }
    }
    if (!trimmed) std::fprintf(stderr, "custody: warning: retention was not applied: %s\n", trimmed.error().message().c_str());
    return Status::Ok();
  }());
}

Status SecretRevoke(const Globals& g, const std::string& text, uint32_t version, const std::string& reason) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(text));
  // Free text for the store and the audit record: one line of UTF-8.
  if (reason.empty()) return Error(Category::kUsage, "--reason is empty: say why the version is revoked");
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--reason", reason, core::Custodian::kMaxRevokeReasonBytes));
  auto report = [&](uint32_t current) {
    if (g.json) {
      PrintJson({{"path", path.str()}, {"revoked", version}, {"current_version", current}});
    } else {
      std::printf("revoked version %u of %s\n", version, path.str().c_str());
      if (current == 0) {
        std::printf("%s has no current version now: 'secret get' fails until a new one is stored (custody secret rotate)\n",
                    path.str().c_str());
      } else {
        std::printf("current version: %u\n", current);
      }
    }
  };
  // With CUSTODY_ADDR, through custodyd (a responder need not reach the store).
  if (auto addr = ServerAddress()) {
    CUSTODY_ASSIGN_OR_RETURN(auto c, client::Client::Connect(*addr));
    auto current = c.Revoke(path.str(), version, reason);
    if (!current) return std::move(current).error().Wrap(path.str());
    report(*current);
    return Status::Ok();
  }
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "secret.revoke", path));
  // The flow custodyd runs for POST /v1/secrets/... {"revoke": N} and
  // Vault's destroy: the policy, the record before the store changes.
  return WithCustodian(g, o, [&](core::Custodian& c, const core::RequestContext& rc) -> Status {
    CUSTODY_ASSIGN_OR_RETURN(uint32_t current, c.Revoke(rc, path, version, reason));
    report(current);
    return Status::Ok();
  });
}

Status SecretVersions(const Globals& g, const std::string& text) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(text));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "secret.versions", path));
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kList, {path.project, path.environment, path.name}));
    CUSTODY_ASSIGN_OR_RETURN(auto env, o.store->FindEnvironment(path.project, path.environment));
    CUSTODY_ASSIGN_OR_RETURN(auto versions, o.store->ListVersions(env, path.name));
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    auto settings = o.authz->engine().RotationFor(path.project, path.environment);
    int64_t now = custody::SystemNow();
    if (g.json) {
      json out = json::array();
      for (const auto& r : versions) {
        json j{{"version", r.version}, {"state", core::VersionStateName(core::StateOf(r, settings.grace, now))},
               {"created_at", FormatTime(r.created_at)}};
        if (auto until = core::GraceEnds(r, settings.grace, now)) j["readable_until"] = FormatTime(*until);
        if (r.revoked_at) {
          j["revoked_at"] = FormatTime(*r.revoked_at);
          j["revoked_reason"] = r.revoked_reason;
          j["revoked_by"] = r.revoked_by;
        }
        out.push_back(j);
      }
      PrintJson(out);
      return Status::Ok();
    }
    std::vector<std::vector<std::string>> rows{{"VERSION", "STATE", "CREATED", "NOTE"}};
    for (auto it = versions.rbegin(); it != versions.rend(); ++it) {
      const auto& r = *it;
      auto st = core::StateOf(r, settings.grace, now);
      std::string note;
      if (auto until = core::GraceEnds(r, settings.grace, now)) note = "readable until " + FormatTime(*until);
      if (r.revoked_at) note = "revoked " + FormatTime(*r.revoked_at) + " by " + r.revoked_by + ": " + r.revoked_reason;
      rows.push_back({std::to_string(r.version), core::VersionStateName(st), FormatTime(r.created_at), note});
    }
    PrintTable(rows);
    return Status::Ok();
  }());
}

Status RotationStatus(const Globals& g, const std::string& project, bool fail_on_overdue) {
  std::optional<std::string> scope;
  if (!project.empty()) {
    CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(project));
    scope = project;
  }
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "rotation.status"));
  o.ev.project = project;
  size_t overdue = 0;
  Status s = Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_ASSIGN_OR_RETURN(auto all, o.store->ListSecrets(scope, std::nullopt));
    std::vector<core::SecretSummary> visible;
    for (auto& s2 : all) {
      if (o.authz->Allows(o.who, Action::kList, {s2.project, s2.environment, s2.name})) visible.push_back(std::move(s2));
    }
    if (o.ev.decision == core::AuditDecision::kNone) {
      o.ev.decision = core::AuditDecision::kAllow;
      o.ev.rule = "names filtered by list grants";
    }
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    int64_t now = custody::SystemNow();
    auto items = core::RotationStatus(visible, o.authz->engine(), now);
    for (const auto& it : items) overdue += it.urgency == core::Urgency::kOverdue ? 1 : 0;
    if (g.json) {
      json out = json::array();
      for (const auto& it : items) {
        json j{{"project", it.project}, {"environment", it.environment}, {"name", it.name},
               {"state", core::UrgencyName(it.urgency)}, {"versions", it.versions}, {"revoked", it.revoked}};
        if (it.current_version != 0) {
          j["current_version"] = it.current_version;
          j["current_since"] = FormatTime(it.current_since);
          j["age_seconds"] = it.age_seconds;
        }
        if (it.max_age) j["max_age_seconds"] = *it.max_age;
        if (it.due_at) j["due_at"] = FormatTime(*it.due_at);
        out.push_back(j);
      }
      PrintJson(out);
    } else {
      std::vector<std::vector<std::string>> rows{{"SECRET", "STATE", "CURRENT", "AGE", "MAX AGE", "DUE"}};
      for (const auto& it : items) {
        std::string due = "-";
        if (it.due_at) {
          due = FormatTime(*it.due_at);
          due += *it.due_at <= now ? " (" + core::HumanDuration(now - *it.due_at) + " ago)"
                                   : " (in " + core::HumanDuration(*it.due_at - now) + ")";
        }
        rows.push_back({it.project + "/" + it.environment + "/" + it.name, core::UrgencyName(it.urgency),
                        it.current_version ? "v" + std::to_string(it.current_version) : "none",
                        it.current_version ? core::HumanDuration(it.age_seconds) : "-",
                        it.max_age ? policy::FormatDuration(*it.max_age) : "-", due});
      }
      PrintTable(rows);
    }
    return Status::Ok();
  }());
  if (!s.ok()) return s;
  if (fail_on_overdue && overdue > 0) {
    std::fprintf(stderr, "custody: %zu secret(s) overdue for rotation\n", overdue);
    g.check_failed_exit = kExitOverdue;
  }
  return Status::Ok();
}

Status KekList(const Globals& g, const std::string& project) {
  CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(project));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "kek.list"));
  o.ev.project = project;
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    // Owners (who rotate) and auditors (who check) may see the KEK history.
    if (!o.authz->Allows(o.who, Action::kReadAudit, {project, "", ""})) {
      CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kRotate, {project, "", ""}));
    } else {
      CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kReadAudit, {project, "", ""}));
    }
    CUSTODY_ASSIGN_OR_RETURN(auto p, o.store->FindProject(project));
    CUSTODY_ASSIGN_OR_RETURN(auto keks, o.store->ProjectKeks(p.id));
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    std::vector<std::pair<core::KekRecord, uint64_t>> rows;
    for (auto& k : keks) {
      CUSTODY_ASSIGN_OR_RETURN(uint64_t n, o.store->CountSealedUnder(k.id));
      rows.emplace_back(std::move(k), n);
    }
    if (g.json) {
      json out = json::array();
      for (const auto& [k, n] : rows) {
        out.push_back({{"version", k.ref.version}, {"id", ToHex(k.ref.id)}, {"label", k.label},
                       {"state", core::KekStateName(k.state)}, {"sealed_versions", n},
                       {"created_at", FormatTime(k.created_at)}});
      }
      PrintJson(out);
      return Status::Ok();
    }
    std::vector<std::vector<std::string>> table{{"VERSION", "STATE", "SEALED", "LABEL", "ID", "CREATED"}};
    for (const auto& [k, n] : rows) {
      table.push_back({"v" + std::to_string(k.ref.version), core::KekStateName(k.state), std::to_string(n), k.label,
                       ToHex(k.ref.id), FormatTime(k.created_at)});
    }
    PrintTable(table);
    return Status::Ok();
  }());
}

Status KekRotate(const Globals& g, const KekRotateArgs& a) {
  CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(a.project));
  if (a.batch < 1 || a.batch > 10000) return Error(Category::kUsage, "--batch must be from 1 to 10000");
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, a.dry_run ? "kek.rotate.plan" : "kek.rotate"));
  o.ev.project = a.project;
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kRotate, {a.project, "", ""}));
    CUSTODY_RETURN_IF_ERROR(o.store->FindProject(a.project));
    CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
    core::KekRotator rot(*o.store, *o.sealer);
    if (a.dry_run) {
      CUSTODY_ASSIGN_OR_RETURN(auto plan, rot.Plan(a.project));
      CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
      if (g.json) {
        PrintJson({{"project", a.project}, {"resume", plan.resume}, {"active_version", plan.active->ref.version},
                   {"new_version", plan.resume ? plan.active->ref.version : plan.next_version},
                   {"to_reseal", plan.to_reseal}, {"in_token", plan.in_token}, {"mode", plan.mode}});
        return Status::Ok();
      }
      if (plan.resume) {
        std::printf("an interrupted rotation of %s to KEK v%u would be finished: %llu version(s) still to re-seal\n",
                    a.project.c_str(), plan.active->ref.version, static_cast<unsigned long long>(plan.to_reseal));
      } else {
        std::printf("would create KEK v%u for %s in the token, re-seal %llu version(s) under it, and destroy KEK v%u\n",
                    plan.next_version, a.project.c_str(), static_cast<unsigned long long>(plan.to_reseal),
                    plan.active->ref.version);
      }
      std::printf("%s\n", plan.mode.c_str());
      std::printf("dry run: nothing was changed\n");
      return Status::Ok();
    }
    Progress progress(g, "re-sealed", "versions");
    core::KekRotator::Hooks hooks;
    hooks.batch = a.batch;
    hooks.progress = [&](uint64_t done, uint64_t total) { progress.Update(done, total); };
    hooks.started = [&](const core::KekRotationPlan& plan, const core::KekRecord& target) -> Status {
      o.ev.kek_id = ToHex(target.ref.id);
      o.ev.detail += (plan.resume ? "; resuming rotation to KEK v" : "; rotating to KEK v") +
                     std::to_string(target.ref.version) + ", " + std::to_string(plan.to_reseal) + " version(s) to re-seal";
      std::fprintf(stderr, "custody: %s KEK v%u of %s; %llu version(s) to re-seal\ncustody: %s\n",
                   plan.resume ? "resuming the interrupted rotation to" : "created", target.ref.version,
                   a.project.c_str(), static_cast<unsigned long long>(plan.to_reseal), plan.mode.c_str());
      // Fail closed: recorded before any blob changes.
      return Record(o, Status::Ok());
    };
    auto result = rot.Run(a.project, hooks);
    core::AuditEvent end = o.ev;
    end.action = "kek.rotate.done";
    if (!result) {
      if (o.recorded) {
        end.result = core::AuditResult::kError;
        end.error = result.error().message();
        (void)o.audit->Append(end);
      }
      return std::move(result).error().Wrap("KEK rotation of " + a.project + " stopped; run it again to finish");
    }
    std::string destroyed;
    for (const auto& k : result->destroyed) destroyed += (destroyed.empty() ? "v" : ", v") + std::to_string(k.ref.version);
    end.detail = "re-sealed " + std::to_string(result->resealed) + " version(s) under KEK v" +
                 std::to_string(result->kek.ref.version) + (destroyed.empty() ? "" : "; destroyed KEK " + destroyed);
    CUSTODY_RETURN_IF_ERROR(o.audit->Append(end));
    if (g.json) {
      PrintJson({{"project", a.project}, {"kek_version", result->kek.ref.version}, {"resumed", result->resumed},
                 {"resealed", result->resealed}, {"destroyed", destroyed}, {"in_token", false}, {"mode", result->mode},
                 {"unrecorded_removed", result->unrecorded_removed}});
    } else {
      if (result->unrecorded_removed > 0) {
        std::printf("removed %zu unrecorded KEK object(s) left by an interrupted run\n", result->unrecorded_removed);
      }
      std::printf("%s KEK rotation of %s: KEK v%u is active; re-sealed %llu version(s)%s\n",
                  result->resumed ? "finished the" : "done:", a.project.c_str(), result->kek.ref.version,
                  static_cast<unsigned long long>(result->resealed),
                  destroyed.empty() ? "" : ("; destroyed KEK " + destroyed).c_str());
    }
    return Status::Ok();
  }());
}

}  // namespace custody::cli
