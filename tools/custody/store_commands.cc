// `custody store copy`: moves a deployment from one store to another
// (SQLite or PostgreSQL, either way), then proves the copy through the token.
#include <unistd.h>

#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "custody/app/backend.h"
#include "custody/app/config.h"
#include "flow.h"
#include "io.h"
#include "progress.h"

namespace custody::cli {
namespace {

using nlohmann::json;

struct Names {
  std::string project, environment, name;
};

}  // namespace

Status StoreCopy(const Globals& g, const StoreCopyArgs& a) {
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--from", a.from));
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--to", a.to));
  CUSTODY_ASSIGN_OR_RETURN(core::StoreSettings from, core::StoreFromArg(a.from));
  CUSTODY_ASSIGN_OR_RETURN(core::StoreSettings to, core::StoreFromArg(a.to));
  const std::string from_text = core::DescribeStore(from), to_text = core::DescribeStore(to);
  if (from == to) return Error(Category::kUsage, "--from and --to name the same store (" + from_text + ")");

  Opened o;
  o.globals = &g;
  CUSTODY_ASSIGN_OR_RETURN(o.config, core::LoadConfig(core::LocateConfig(g.config)));
  core::Config source_config = o.config, target_config = o.config;
  source_config.store = from;
  target_config.store = to;
  auto source = core::OpenStore(source_config, /*create=*/false);
  if (!source) return std::move(source).error().Wrap("--from");
  o.store = std::move(*source);
  CUSTODY_ASSIGN_OR_RETURN(o.audit, OpenAudit(o.config));
  o.ev.action = "store.copy";
  o.ev.request_id = core::NewRequestId();
  o.ev.identified_by = IdentifiedBy(LocalCaller());
  o.ev.decision = core::AuditDecision::kNone;
  o.ev.detail = "from " + from_text + " to " + to_text;

  return Finish(o, [&]() -> Status {
    // Who may copy a whole deployment: an admin of the source's policy (one
    // who may put a policy in force); before the first policy, whoever can
    // log in to the token (the PIN is needed below).
    CUSTODY_ASSIGN_OR_RETURN(auto current, o.store->CurrentPolicy());
    if (current) {
      std::string detail = o.ev.detail;
      CUSTODY_RETURN_IF_ERROR(Guard(o));
      o.ev.detail = detail;
      CUSTODY_RETURN_IF_ERROR(Ask(o, policy::Action::kApplyPolicy, {}));
    } else {
      o.ev.decision = core::AuditDecision::kAllow;
      o.ev.rule = "bootstrap: no policy in force in the source";
    }

    auto target_or = core::OpenStore(target_config, /*create=*/true);
    if (!target_or) return std::move(target_or).error().Wrap("--to");
    std::unique_ptr<core::Store> target = std::move(*target_or);
    // The token first: a wrong PIN stops the copy before anything is
    // written. Its KEK material (the TPM's) is read from the target, so the
    // proof below is the target's own.
    CUSTODY_ASSIGN_OR_RETURN(SecretBuffer pin, core::ResolvePin(o.config, g.pin_fd));
    CUSTODY_ASSIGN_OR_RETURN(core::SealingBackend backend, core::OpenBackend(o.config, pin, *target));

    CUSTODY_ASSIGN_OR_RETURN(core::StoreSnapshot snap, o.store->Export());
    const size_t total = snap.versions.size();
    {
      Progress progress(g, "copied", "versions");
      Status copied = target->Import(snap, [&](size_t done, size_t all) { progress.Update(done, all); });
      if (!copied.ok()) return std::move(copied).error().Wrap("copying " + from_text + " to " + to_text);
    }

    // The proof: every copied version, read back from the target and
    // unsealed through the token. The values are dropped at once (locked
    // memory, wiped); nothing is printed but counts.
    std::map<int64_t, std::pair<int64_t, std::string>> envs;  // id -> (project id, name)
    std::map<int64_t, std::string> projects;
    std::map<int64_t, Names> secrets;
    for (const auto& p : snap.projects) projects[p.id] = p.name;
    for (const auto& e : snap.environments) envs[e.id] = {e.project_id, e.name};
    for (const auto& s : snap.secrets) {
      const auto& e = envs[s.environment_id];
      secrets[s.id] = {projects[e.first], e.second, s.name};
    }
    Progress verified(g, "verified", "versions");
    size_t done = 0;
    for (const auto& v : snap.versions) {
      const Names& n = secrets[v.secret_id];
      const uint32_t version = static_cast<uint32_t>(v.version);
      const std::string which = n.project + "/" + n.environment + "/" + n.name + " v" + std::to_string(version);
      Status ok = [&]() -> Status {
        CUSTODY_ASSIGN_OR_RETURN(core::UnsealInputs in, target->ReadForUnseal(n.project, n.environment, n.name, version));
        if (in.kek.project_id != in.env.project_id) {
          return Error(Category::kIntegrity, "recorded under another project's KEK");
        }
        core::SealContext ctx{n.project, n.environment, n.name, version};
        CUSTODY_ASSIGN_OR_RETURN(SecretBuffer value, backend.sealer->Unseal(in.kek.ref, ctx, in.version.blob));
        (void)value;
        return Status::Ok();
      }();
      if (!ok.ok()) {
        return Error(Category::kIntegrity, "the copy is in place in " + to_text + " but " + which +
                                               " does not unseal (" + ok.error().message() +
                                               "): do not switch to it");
      }
      verified.Update(++done, total);
    }

    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    if (g.json) {
      PrintJson({{"from", from_text}, {"to", to_text}, {"projects", snap.projects.size()},
                 {"environments", snap.environments.size()}, {"keks", snap.keks.size()},
                 {"secrets", snap.secrets.size()}, {"versions", total}, {"verified", done},
                 {"policies", snap.policies.size()}, {"usage_rows", snap.usage.size()},
                 {"audit_checkpoints", snap.checkpoints.size()}});
      return Status::Ok();
    }
    std::printf("copied %zu project(s), %zu KEK record(s), %zu secret(s), %zu version(s) from %s to %s; "
                "every version unseals from the copy. Point [store] at it to switch.\n",
                snap.projects.size(), snap.keks.size(), snap.secrets.size(), total, from_text.c_str(),
                to_text.c_str());
    return Status::Ok();
  }());
}

}  // namespace custody::cli
