#include "commands.h"

#include <grp.h>
#include <openssl/crypto.h>
#include <pwd.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <set>
#include <nlohmann/json.hpp>

#include "custody/app/backend.h"
#include "custody/app/config.h"
#include "custody/audit/audit.h"
#include "custody/client/client.h"
#include "custody/common/hex.h"
#include "custody/common/names.h"
#include "custody/common/time.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/rv.h"
#include "custody/hsm/token_signer.h"
#include "custody/hsm/uri.h"
#include "custody/seal/sealer.h"
#include "custody/service/authz.h"
#include "custody/service/rotation.h"
#include "custody/service/service.h"
#include "custody/store/store.h"
#include "custody/tpm/tpm.h"
#include "custody/tpm/tpm_signer.h"
#include "fetch.h"
#include "flow.h"
#include "io.h"
#include "progress.h"

namespace custody::cli {
using nlohmann::json;
using policy::Action;

Status CheckGlobals(const Globals& g) {
  if (g.config) CUSTODY_RETURN_IF_ERROR(CheckArgText("--config", *g.config));
  for (const char* name : {"CUSTODY_CONFIG", "CUSTODY_ADDR"}) {
    if (const char* v = std::getenv(name)) CUSTODY_RETURN_IF_ERROR(CheckEnvText(name, v));
  }
  return Status::Ok();
}

Status Init(const Globals& g, const InitArgs& a) {
  // Every one of these goes into the init record and the config file.
  for (const auto& [what, value] : {std::pair<const char*, const std::string*>{"--backend", &a.backend},
                                    {"--module", &a.module},
                                    {"--token", &a.token},
                                    {"--tcti", &a.tcti},
                                    {"--state-dir", &a.state_dir}}) {
    CUSTODY_RETURN_IF_ERROR(CheckArgText(what, *value));
  }
  if (a.pin_file) CUSTODY_RETURN_IF_ERROR(CheckArgText("--pin-file", *a.pin_file));
  for (const auto& kv : a.module_env) CUSTODY_RETURN_IF_ERROR(CheckArgText("--module-env", kv));
  std::string config_path = core::LocateConfig(g.config);
  if (!a.force && std::filesystem::exists(config_path)) {
    return Error(Category::kUsage, "config " + config_path + " already exists; pass --force to replace it");
  }
  core::Config c;
  c.state_dir = std::filesystem::absolute(a.state_dir).lexically_normal().string();
  c.token.backend = a.backend;
  if (a.backend == "pkcs11") {
    if (a.module.empty() || a.token.empty()) {
      return Error(Category::kUsage, "the pkcs11 backend needs --module and --token");
    }
    c.token.pkcs11.module = a.module;
    c.token.pkcs11.uri = a.token;
  } else if (a.backend == "tpm") {
    if (a.tcti.empty()) return Error(Category::kUsage, "the tpm backend needs --tcti (e.g. device:/dev/tpmrm0)");
    if (!a.module.empty() || !a.token.empty()) return Error(Category::kUsage, "--module and --token are for the pkcs11 backend");
    c.token.tpm.tcti = a.tcti;
    for (int p : a.pcrs) {
      if (p < 0 || p > 23) return Error(Category::kUsage, "--pcrs: PCR numbers are 0 to 23 (got " + std::to_string(p) + ")");
      c.token.tpm.pcrs.push_back(static_cast<uint8_t>(p));
    }
    c.token.tpm.persist_srk = a.persist_srk;
  } else {
    return Error(Category::kUsage, "--backend must be pkcs11 or tpm (got '" + a.backend + "')");
  }
  if (a.pin_file) c.token.pin_file = std::filesystem::absolute(*a.pin_file).lexically_normal().string();
  // Made absolute, they carry the working folder's name too.
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--state-dir", c.state_dir));
  if (c.token.pin_file) CUSTODY_RETURN_IF_ERROR(CheckArgText("--pin-file", *c.token.pin_file));
  for (const auto& kv : a.module_env) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) {
      return Error(Category::kUsage, "--module-env '" + kv + "' must be NAME=VALUE");
    }
    c.token.environment.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  if (a.store) {
    CUSTODY_RETURN_IF_ERROR(CheckArgText("--store", *a.store));
    CUSTODY_ASSIGN_OR_RETURN(c.store, core::StoreFromArg(*a.store));
  } else {
    c.store.path = c.state_dir + "/custody.db";
  }
  CUSTODY_RETURN_IF_ERROR(core::CheckConfigCoherence(c));
  const std::string store_name = core::DescribeStore(c.store);

  // Prove the config works before writing anything: the module loads, the
  // URI selects one token, and the PIN logs in; or the TPM answers and a
  // test object seals and unseals under its SRK.
  CUSTODY_ASSIGN_OR_RETURN(SecretBuffer pin, core::ResolvePin(c, g.pin_fd));
  if (c.token.backend == "tpm") {
    CUSTODY_ASSIGN_OR_RETURN(auto tpm, tpm::Tpm::Open({.tcti = c.token.tpm.tcti, .persist_srk = c.token.tpm.persist_srk}));
    SecretBuffer probe(16);
    CUSTODY_RETURN_IF_ERROR(tpm->Random(probe.RevealMutable(SecretAccess{})));
    CUSTODY_ASSIGN_OR_RETURN(auto sealed, tpm->Seal(probe, pin, {.pcrs = c.token.tpm.pcrs}));
    CUSTODY_ASSIGN_OR_RETURN(auto back, tpm->Unseal(sealed, pin));
    if (!back.Equals(probe)) return Error(Category::kInternal, "the TPM unsealed something other than it sealed");
    // Pinned from here on: a later run on a TPM with another SRK is refused.
    CUSTODY_ASSIGN_OR_RETURN(tpm::Info info, tpm->GetInfo());
    c.token.tpm.srk_name = info.srk_name;
  } else {
    CUSTODY_ASSIGN_OR_RETURN(core::Token token, core::OpenToken(c, pin));
  }

  CUSTODY_RETURN_IF_ERROR(MakePrivateDir(c.state_dir));
  auto parent = std::filesystem::path(config_path).parent_path();
  if (!parent.empty()) CUSTODY_RETURN_IF_ERROR(MakePrivateDir(parent.string()));
  CUSTODY_ASSIGN_OR_RETURN(auto store, core::OpenStore(c, /*create=*/true));
  c.audit.dir = c.state_dir + "/audit";
  if (c.node.name.empty()) {
    CUSTODY_ASSIGN_OR_RETURN(c.node.name, core::HostNodeName("the host name"));
  }
  c.audit.node = c.node.name;
  CUSTODY_ASSIGN_OR_RETURN(auto audit, OpenAudit(c));
  core::AuditEvent ev;
  ev.action = "custody.init";
  ev.request_id = core::NewRequestId();
  ev.identified_by = IdentifiedBy(LocalCaller());
  ev.decision = core::AuditDecision::kNone;
  ev.result = core::AuditResult::kOk;
  ev.detail = (c.token.backend == "tpm" ? "tpm " + c.token.tpm.tcti : "token " + c.token.pkcs11.uri) + ", store " + store_name;
  CUSTODY_RETURN_IF_ERROR(audit->Append(ev));
  CUSTODY_RETURN_IF_ERROR(core::WriteConfig(c, config_path));
  if (g.json) {
    PrintJson({{"config", config_path}, {"store", store_name}, {"backend", c.token.backend},
               {"token", c.token.backend == "tpm" ? c.token.tpm.tcti : c.token.pkcs11.uri}});
  } else {
    std::printf("wrote %s\nstore %s\n", config_path.c_str(), store_name.c_str());
  }
  return Status::Ok();
}

Status ProjectCreate(const Globals& g, const std::string& name, const std::vector<std::string>& envs) {
  // Validate before touching the token, so a typo costs no PIN attempt.
  CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(name));
  for (const auto& e : envs) CUSTODY_RETURN_IF_ERROR(core::ValidateEnvName(e));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "project.create"));
  o.ev.project = name;
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kCreateProject, {name, "", ""}));
    CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
    // Recorded before the KEK is made: nothing happens unlogged.
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    core::SecretService svc(*o.store, *o.sealer);
    CUSTODY_ASSIGN_OR_RETURN(core::ProjectRecord p, svc.CreateProject(name, envs));
    if (o.authz->engine().FindProject(name) == nullptr) {
      std::fprintf(stderr, "custody: note: project %s is not in the policy in force, so nobody can use it yet\n",
                   name.c_str());
    }
    CUSTODY_ASSIGN_OR_RETURN(core::KekRecord kek, o.store->CurrentKek(p.id));
    if (g.json) {
      PrintJson({{"project", p.name}, {"environments", envs}, {"kek", kek.label},
                 {"kek_id", ToHex(kek.ref.id)}});
    } else {
      std::printf("created project %s with KEK %s (id %s)\n", p.name.c_str(), kek.label.c_str(),
                  ToHex(kek.ref.id).c_str());
      for (const auto& e : envs) std::printf("  environment %s\n", e.c_str());
    }
    return Status::Ok();
  }());
}

Status ProjectList(const Globals& g) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "project.list"));
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_ASSIGN_OR_RETURN(auto all, o.store->ListProjects());
    // Admins see every project; others the projects where they may list something.
    bool admin = o.authz->Allows(o.who, Action::kCreateProject, {});
    std::vector<core::ProjectRecord> projects;
    for (auto& p : all) {
      bool visible = admin;
      if (!visible) {
        CUSTODY_ASSIGN_OR_RETURN(auto envs, o.store->ListEnvironments(p.name));
        for (const auto& e : envs) visible = visible || o.authz->Allows(o.who, Action::kList, {p.name, e.name, ""});
      }
      if (visible) projects.push_back(std::move(p));
    }
    o.ev.decision = core::AuditDecision::kAllow;
    o.ev.rule = admin ? "admins" : "projects with a list grant";
    json out = json::array();
    std::vector<std::vector<std::string>> rows{{"PROJECT", "ENVIRONMENTS", "CREATED"}};
    for (const auto& p : projects) {
      CUSTODY_ASSIGN_OR_RETURN(auto envs, o.store->ListEnvironments(p.name));
      std::vector<std::string> names;
      std::string joined;
      for (const auto& e : envs) {
        names.push_back(e.name);
        joined += (joined.empty() ? "" : ",") + e.name;
      }
      out.push_back({{"project", p.name}, {"environments", names}, {"created_at", FormatTime(p.created_at)}});
      rows.push_back({p.name, joined.empty() ? "-" : joined, FormatTime(p.created_at)});
    }
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    if (g.json) {
      PrintJson(out);
    } else {
      PrintTable(rows);
    }
    return Status::Ok();
  }());
}

Status EnvCreate(const Globals& g, const std::string& project, const std::string& env) {
  CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(project));
  CUSTODY_RETURN_IF_ERROR(core::ValidateEnvName(env));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "env.create"));
  o.ev.project = project;
  o.ev.environment = env;
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kCreateEnv, {project, "", ""}));
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    CUSTODY_ASSIGN_OR_RETURN(auto e, o.store->CreateEnvironment(project, env));
    if (o.authz->engine().FindEnvironment(project, env) == nullptr) {
      std::fprintf(stderr, "custody: note: %s/%s is not in the policy in force, so nobody can use it yet\n",
                   project.c_str(), env.c_str());
    }
    if (g.json) {
      PrintJson({{"project", e.project}, {"environment", e.name}});
    } else {
      std::printf("created environment %s/%s\n", e.project.c_str(), e.name.c_str());
    }
    return Status::Ok();
  }());
}

Status SecretPut(const Globals& g, const PutArgs& a) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(a.path));
  CUSTODY_ASSIGN_OR_RETURN(SecretBuffer value, ReadValue(a.from_file, a.keep_newline));
  // An empty value is refused by the flow (a usage error, recorded) in both
  // modes, after the policy: the same answer through custodyd and here.
  if (auto addr = ServerAddress()) {
    CUSTODY_ASSIGN_OR_RETURN(auto c, client::Client::Connect(*addr));
    auto v = c.Put(path.str(), value, a.if_version);
    if (!v) return std::move(v).error().Wrap(path.str());
    if (g.json) {
      PrintJson({{"path", path.str()}, {"version", *v}});
    } else {
      std::printf("sealed %s version %u\n", path.str().c_str(), *v);
    }
    return Status::Ok();
  }

  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "secret.put", path));
  // The flow custodyd runs: policy, limits, the record made durable after
  // sealing and before the store commits the new version.
  return WithCustodian(g, o, [&](core::Custodian& c, const core::RequestContext& rc) -> Status {
    CUSTODY_ASSIGN_OR_RETURN(uint32_t version, c.Put(rc, path, value, "", nullptr, a.if_version));
    if (g.json) {
      PrintJson({{"path", path.str()}, {"version", version}});
    } else {
      std::printf("sealed %s version %u\n", path.str().c_str(), version);
    }
    return Status::Ok();
  });
}

namespace {

// In direct mode: the flow custodyd runs for a GET (policy, limits, one
// store snapshot, the record made durable, unseal, with session recovery),
// here; the value is returned only after its record is durable.
Result<core::Unsealed> DirectGet(const Globals& g, const core::SecretPath& path, std::optional<uint32_t> version) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "secret.get", path));
  std::optional<core::Unsealed> out;
  CUSTODY_RETURN_IF_ERROR(WithCustodian(g, o, [&](core::Custodian& c, const core::RequestContext& rc) -> Status {
    CUSTODY_ASSIGN_OR_RETURN(core::Unsealed u, c.Get(rc, path, version));
    out = std::move(u);
    return Status::Ok();
  }));
  return std::move(*out);
}

// Through custodyd when CUSTODY_ADDR is set, else the whole flow here.
Fetcher FetcherFor(const Globals& g) {
  if (auto addr = ServerAddress()) return RemoteFetcher(*addr);
  return [&g](const core::SecretPath& path, std::optional<uint32_t> version) -> Result<client::Fetched> {
    CUSTODY_ASSIGN_OR_RETURN(core::Unsealed u, DirectGet(g, path, version));
    return client::Fetched{std::move(u.value), u.version};
  };
}

}  // namespace

Status SecretGet(const Globals& g, const GetArgs& a) { return GetAndPrint(FetcherFor(g), a.path, a.version, a.out); }

Status Exec(const Globals& g, const std::vector<std::string>& envs, const std::vector<std::string>& command) {
  return ExecWith(FetcherFor(g), envs, command);
}

Status SecretList(const Globals& g, const std::string& scope_text) {
  CUSTODY_ASSIGN_OR_RETURN(core::Scope scope, core::Scope::Parse(scope_text));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "secret.list"));
  o.ev.project = scope.project.value_or("");
  o.ev.environment = scope.environment.value_or("");
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    if (scope.project && scope.environment) {
      CUSTODY_RETURN_IF_ERROR(o.store->FindEnvironment(*scope.project, *scope.environment));
      CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kList, {*scope.project, *scope.environment, ""}));
    }
    CUSTODY_ASSIGN_OR_RETURN(auto all, o.store->ListSecrets(scope.project, scope.environment));
    // Only the names the caller may list (grants can be narrowed to patterns).
    std::vector<core::SecretSummary> secrets;
    for (auto& s : all) {
      if (o.authz->Allows(o.who, Action::kList, {s.project, s.environment, s.name})) secrets.push_back(std::move(s));
    }
    if (o.ev.decision == core::AuditDecision::kNone) {
      o.ev.decision = core::AuditDecision::kAllow;
      o.ev.rule = "names filtered by list grants";
    }
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    if (g.json) {
      json out = json::array();
      for (const auto& s : secrets) {
        out.push_back({{"project", s.project}, {"environment", s.environment}, {"name", s.name},
                       {"latest_version", s.latest_version}, {"current_version", s.current_version},
                       {"versions", s.version_count}, {"revoked", s.revoked_count},
                       {"updated_at", FormatTime(s.updated_at)}});
      }
      PrintJson(out);
      return Status::Ok();
    }
    std::vector<std::vector<std::string>> rows{{"SECRET", "LATEST", "VERSIONS", "UPDATED", "CURRENT"}};
    for (const auto& s : secrets) {
      rows.push_back({s.project + "/" + s.environment + "/" + s.name, std::to_string(s.latest_version),
                      std::to_string(s.version_count), FormatTime(s.updated_at),
                      s.current_version ? "v" + std::to_string(s.current_version) : "none (all revoked)"});
    }
    PrintTable(rows);
    return Status::Ok();
  }());
}

Status SecretDelete(const Globals& g, const std::string& text) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(text));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "secret.delete", path));
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kDelete, {path.project, path.environment, path.name}));
    CUSTODY_ASSIGN_OR_RETURN(auto env, o.store->FindEnvironment(path.project, path.environment));
    CUSTODY_RETURN_IF_ERROR(o.store->GetVersion(env, path.name, std::nullopt));
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    CUSTODY_RETURN_IF_ERROR(o.store->DeleteSecret(env, path.name));
    if (g.json) {
      PrintJson({{"deleted", path.str()}});
    } else {
      std::printf("deleted %s and all its versions\n", path.str().c_str());
    }
    return Status::Ok();
  }());
}

namespace {

// `token info` for the TPM backend: the TPM, its SRK (as tpm2_readpublic
// names it), and each project's KEK objects as the store keeps them.
Status TpmInfo(const Globals& g, Opened& o) {
  CUSTODY_ASSIGN_OR_RETURN(tpm::Info info, o.backend.tpm->GetInfo());
  CUSTODY_ASSIGN_OR_RETURN(auto keks, o.store->ListKeks());
  char srk[16];
  std::snprintf(srk, sizeof srk, "0x%08x", info.srk_handle);
  std::string srk_where = info.srk_handle != 0 ? std::string(srk) : std::string("transient (made from the standard template)");
  if (g.json) {
    json objs = json::array();
    for (const auto& k : keks) {
      objs.push_back({{"label", k.label}, {"id", ToHex(k.ref.id)}, {"state", core::KekStateName(k.state)},
                      {"kind", "TPM sealed-data object under the SRK"}});
    }
    PrintJson({{"backend", "tpm"}, {"tcti", o.config.token.tpm.tcti}, {"manufacturer", info.manufacturer},
               {"vendor", info.vendor}, {"firmware", info.firmware}, {"srk", srk_where}, {"srk_name", info.srk_name},
               {"pcrs", o.config.token.tpm.pcrs}, {"objects", objs}});
    return Status::Ok();
  }
  std::printf("backend       tpm\ntcti          %s\nmanufacturer  %s\nvendor        %s\nfirmware      %s\nsrk           %s\nsrk name      %s\n\n",
              o.config.token.tpm.tcti.c_str(), info.manufacturer.c_str(), info.vendor.c_str(), info.firmware.c_str(),
              srk_where.c_str(), info.srk_name.c_str());
  std::vector<std::vector<std::string>> rows{{"LABEL", "ID", "STATE", "KIND"}};
  for (const auto& k : keks) {
    rows.push_back({k.label, ToHex(k.ref.id), core::KekStateName(k.state), "sealed-data object under the SRK"});
  }
  PrintTable(rows);
  return Status::Ok();
}

}  // namespace

Status TokenInfo(const Globals& g) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "token.info"));
  return Finish(o, [&]() -> Status {
  CUSTODY_RETURN_IF_ERROR(Guard(o));
  // The token's inventory is for the people who run custody: policy admins.
  CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kApplyPolicy, {}));
  CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
  CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
  if (o.backend.is_tpm()) return TpmInfo(g, o);
  core::Token& token = o.backend.token;
  CK_TOKEN_INFO ti{};
  CK_RV rv = token.module->fn()->C_GetTokenInfo(token.slot, &ti);
  if (rv != CKR_OK) return hsm::RvError(rv, "C_GetTokenInfo");
  CUSTODY_ASSIGN_OR_RETURN(auto lease, token.pool->Acquire());
  CUSTODY_ASSIGN_OR_RETURN(auto objects, hsm::ListObjects(*lease));
  std::string label = hsm::TrimPadded(ti.label, sizeof ti.label);
  std::string manufacturer = hsm::TrimPadded(ti.manufacturerID, sizeof ti.manufacturerID);
  std::string model = hsm::TrimPadded(ti.model, sizeof ti.model);
  std::string serial = hsm::TrimPadded(ti.serialNumber, sizeof ti.serialNumber);
  if (g.json) {
    json objs = json::array();
    for (const auto& ob : objects) {
      if (!ob.readable()) {
        objs.push_back({{"handle", ob.handle}, {"unreadable", hsm::RvName(ob.problem)}});
        continue;
      }
      objs.push_back({{"label", ob.label}, {"class", hsm::ClassName(ob.object_class)},
                      {"key_type", hsm::KeyTypeName(ob.key_type)}, {"id", ToHex(ob.id)},
                      {"value_len", ob.value_len}, {"sensitive", ob.sensitive}, {"extractable", ob.extractable},
                      {"always_sensitive", ob.always_sensitive}, {"never_extractable", ob.never_extractable},
                      {"local", ob.local}, {"private", ob.is_private}, {"token", ob.token}});
    }
    PrintJson({{"module", token.module->path()}, {"slot", token.slot}, {"label", label},
               {"manufacturer", manufacturer}, {"model", model}, {"serial", serial}, {"objects", objs}});
    return Status::Ok();
  }
  std::printf("module        %s\nslot          %lu\ntoken         %s\nmanufacturer  %s\nmodel         %s\nserial        %s\n\n",
              token.module->path().c_str(), static_cast<unsigned long>(token.slot), label.c_str(),
              manufacturer.c_str(), model.c_str(), serial.c_str());
  std::vector<std::vector<std::string>> rows{
      {"LABEL", "CLASS", "TYPE", "BITS", "ID", "SENSITIVE", "EXTRACTABLE", "NEVER-EXTRACTABLE", "LOCAL"}};
  auto yn = [](bool b) { return std::string(b ? "yes" : "no"); };
  size_t unreadable = 0;
  for (const auto& ob : objects) {
    if (!ob.readable()) {
      ++unreadable;
      rows.push_back({"(unreadable: " + hsm::RvName(ob.problem) + ")", "-", "-", "-", "-", "-", "-", "-", "-"});
      continue;
    }
    rows.push_back({ob.label, hsm::ClassName(ob.object_class), hsm::KeyTypeName(ob.key_type),
                    ob.value_len ? std::to_string(ob.value_len * 8) : "-", ToHex(ob.id), yn(ob.sensitive),
                    yn(ob.extractable), yn(ob.never_extractable), yn(ob.local)});
  }
  PrintTable(rows);
  if (unreadable > 0) {
    // Said, not hidden: on SoftHSM2 this is an object file cut short by a
    // process killed while creating it (docs/ROTATION.md). custody cannot
    // tell whose it is, so it never destroys one.
    std::printf("\n%zu object(s) the token lists but cannot describe; on SoftHSM2, a process killed while "
                "creating an object leaves one (see docs/ROTATION.md)\n",
                unreadable);
  }
  return Status::Ok();
  }());
}

namespace {

constexpr size_t kMaxPolicySize = 4 * 1024 * 1024;

Result<std::string> ReadPolicyFile(const std::string& file) {
  auto bytes = SecretBuffer::ReadFile(file, kMaxPolicySize, /*require_private=*/false);
  if (!bytes) {
    Error e = std::move(bytes).error();
    return Error(e.category() == Category::kNotFound ? Category::kNotFound : Category::kUsage,
                 "policy file " + e.message());
  }
  return std::string(bytes->RevealString(SecretAccess{}));
}

// Prints every error, one per line, and returns the summary error.
Status ReportPolicyErrors(const std::vector<std::string>& errors, const std::string& file) {
  for (size_t i = 0; i + 1 < errors.size(); ++i) std::fprintf(stderr, "custody: %s\n", errors[i].c_str());
  std::string last = errors.back();
  if (errors.size() > 1) last += " (" + std::to_string(errors.size()) + " errors in " + file + ")";
  return Error(Category::kIntegrity, last);
}

}  // namespace

Status PolicyCheck(const Globals& g, const std::string& file) {
  CUSTODY_RETURN_IF_ERROR(CheckArgText("FILE", file));
  CUSTODY_ASSIGN_OR_RETURN(std::string text, ReadPolicyFile(file));
  auto parsed = policy::ParsePolicy(text, file);
  if (!parsed.policy) return ReportPolicyErrors(parsed.errors, file);
  size_t grants = 0;
  for (const auto& p : parsed.policy->projects) grants += p.grants.size();
  if (g.json) {
    PrintJson({{"file", file}, {"valid", true}, {"sha256", custody::Sha256Hex(text)},
               {"projects", parsed.policy->projects.size()}, {"principals", parsed.policy->principals.size()},
               {"grants", grants}});
  } else {
    std::printf("%s: valid: %zu projects, %zu principals, %zu grants (sha256 %s)\n", file.c_str(),
                parsed.policy->projects.size(), parsed.policy->principals.size(), grants,
                custody::Sha256Hex(text).c_str());
  }
  return Status::Ok();
}

Status PolicyApply(const Globals& g, const std::string& file) {
  CUSTODY_RETURN_IF_ERROR(CheckArgText("FILE", file));  // named in the record
  CUSTODY_ASSIGN_OR_RETURN(std::string text, ReadPolicyFile(file));
  auto parsed = policy::ParsePolicy(text, file);
  if (!parsed.policy) return ReportPolicyErrors(parsed.errors, file);
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "policy.apply"));
  o.ev.detail = "file " + file + " sha256 " + custody::Sha256Hex(text);
  return Finish(o, [&]() -> Status {

  // Who may apply: an admin of the policy in force; before the first policy,
  // whoever can log in to the token (checked below: the PIN is needed).
  policy::Caller caller = LocalCaller();
  std::string applied_by;
  CUSTODY_ASSIGN_OR_RETURN(auto current, o.store->CurrentPolicy());
  if (current) {
    std::string detail = o.ev.detail;
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    o.ev.detail = detail;
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kApplyPolicy, {}));
    applied_by = o.authz->engine().PrincipalName(o.who);
  } else {
    applied_by = "bootstrap (uid " + std::to_string(::getuid()) + ")";
    o.ev.decision = core::AuditDecision::kAllow;
    o.ev.rule = "bootstrap: no policy in force yet";
  }
  // The new policy must keep the caller an admin, or nobody could fix it.
  policy::Engine next(*parsed.policy);
  auto me = next.Identify(caller);
  if (!me || !next.Decide(*me, Action::kApplyPolicy, {}).allowed) {
    return Error(Category::kUsage, file + " does not make the caller (uid " + std::to_string(::getuid()) +
                                       ") a policy admin; applying it would lock you out. Add your principal "
                                       "to admins = [...]");
  }
  // Per-environment tokens are parsed and validated, but serving an
  // environment from a second token is not built yet: refuse rather than
  // silently seal on the default token.
  for (const auto& p : parsed.policy->projects) {
    for (const auto& e : p.environments) {
      if (e.token_uri && (o.config.token.backend == "tpm" || *e.token_uri != o.config.token.pkcs11.uri)) {
        std::string serves = o.config.token.backend == "tpm" ? "the TPM (" + o.config.token.tpm.tcti + ")" : o.config.token.pkcs11.uri;
        return Error(Category::kUsage, "environment " + p.name + "/" + e.name + " names token " + *e.token_uri +
                                           ", but custody serves every environment from " + serves +
                                           " for now; remove the token key or point it at that token");
      }
    }
  }
  // Bootstrap proves the caller holds the PIN; the record goes first.
  if (!current) CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
  CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
  // Projects and environments the policy declares and the store lacks are made now.
  std::vector<std::string> created;
  for (const auto& p : parsed.policy->projects) {
    auto existing = o.store->FindProject(p.name);
    if (!existing.ok() && existing.error().category() != Category::kNotFound) return existing.error();
    if (!existing.ok()) {
      if (!o.sealer) CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
      std::vector<std::string> envs;
      for (const auto& e : p.environments) envs.push_back(e.name);
      core::SecretService svc(*o.store, *o.sealer);
      CUSTODY_RETURN_IF_ERROR(svc.CreateProject(p.name, envs));
      created.push_back("project " + p.name);
      continue;
    }
    for (const auto& e : p.environments) {
      auto env = o.store->FindEnvironment(p.name, e.name);
      if (env.ok()) continue;
      if (env.error().category() != Category::kNotFound) return env.error();
      CUSTODY_RETURN_IF_ERROR(o.store->CreateEnvironment(p.name, e.name));
      created.push_back("environment " + p.name + "/" + e.name);
    }
  }
  std::string sha = custody::Sha256Hex(text);
  CUSTODY_ASSIGN_OR_RETURN(core::PolicyRecord rec, o.store->SavePolicy(text, sha, applied_by));
  // Access tokens of principals this policy drops are revoked: a token
  // names its principal only by name, and a later policy that brought the
  // name back (a rollback, a new service reusing it) must not revive them.
  size_t tokens_revoked = 0;
  {
    CUSTODY_ASSIGN_OR_RETURN(auto tokens, o.store->ListAccessTokens());
    std::set<std::string> gone;
    for (const auto& t : tokens) {
      if (!t.revoked_at && !next.FindPrincipal(t.principal)) gone.insert(t.principal);
    }
    for (const auto& principal : gone) {
      CUSTODY_ASSIGN_OR_RETURN(size_t n, o.store->RevokeAccessTokens("", principal, SystemNow()));
      tokens_revoked += n;
    }
  }
  CUSTODY_ASSIGN_OR_RETURN(auto projects, o.store->ListProjects());
  std::vector<std::string> orphans;
  for (const auto& p : projects) {
    if (next.FindProject(p.name) == nullptr) orphans.push_back(p.name);
  }
  if (g.json) {
    PrintJson({{"version", rec.version}, {"sha256", sha}, {"applied_by", applied_by}, {"created", created},
               {"projects_without_policy", orphans}, {"access_tokens_revoked", tokens_revoked}});
    return Status::Ok();
  }
  std::printf("policy v%u in force (sha256 %s), applied by %s\n", rec.version, sha.c_str(), applied_by.c_str());
  for (const auto& c : created) std::printf("  created %s\n", c.c_str());
  if (tokens_revoked > 0) {
    std::printf("  revoked %zu access token(s) of principals no longer in the policy\n", tokens_revoked);
  }
  for (const auto& p : orphans) {
    std::printf("  note: project %s is in the store but not in this policy: nobody can use it\n", p.c_str());
  }
  return Status::Ok();
  }());
}

Status PolicyExplain(const Globals& g, const std::string& principal, const std::string& action_text,
                     const std::string& target_text) {
  // All three go into the record: refused here, before it is started.
  CUSTODY_RETURN_IF_ERROR(CheckArgText("PRINCIPAL", principal));
  if (!policy::ValidPrincipalName(principal)) {
    return Error(Category::kUsage, "PRINCIPAL '" + principal + "' is not a principal name: write user:NAME or svc:NAME");
  }
  CUSTODY_RETURN_IF_ERROR(CheckArgText("ACTION", action_text));
  CUSTODY_RETURN_IF_ERROR(CheckArgText("TARGET", target_text));
  auto action = policy::ParseAction(action_text);
  if (!action) {
    std::string all;
    for (Action a : policy::kAllActions) all += (all.empty() ? "" : ", ") + std::string(policy::ActionName(a));
    return Error(Category::kUsage, "unknown action '" + action_text + "' (actions: " + all + ")");
  }
  // PROJECT, PROJECT/ENV or PROJECT/ENV/NAME.
  std::string project, env, name;
  bool has_env = false, has_name = false;
  {
    size_t a = target_text.find('/');
    project = target_text.substr(0, a);
    if (a != std::string::npos) {
      has_env = true;
      size_t b = target_text.find('/', a + 1);
      env = target_text.substr(a + 1, b == std::string::npos ? std::string::npos : b - a - 1);
      if (b != std::string::npos) {
        has_name = true;
        name = target_text.substr(b + 1);
      }
    }
  }
  // The names as every other command takes them (an organisation action
  // may leave TARGET empty).
  auto valid = [&]() -> Status {
    if (!target_text.empty()) CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(project));
    if (has_env) CUSTODY_RETURN_IF_ERROR(core::ValidateEnvName(env));
    if (has_name) CUSTODY_RETURN_IF_ERROR(core::ValidateSecretName(name));
    return Status::Ok();
  }();
  if (!valid.ok()) return std::move(valid).error().Wrap("TARGET");
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "policy.explain"));
  o.ev.project = project;
  o.ev.environment = env;
  o.ev.name = name;
  o.ev.detail = "about " + principal + " " + action_text;
  return Finish(o, [&]() -> Status {
  CUSTODY_ASSIGN_OR_RETURN(auto authz, core::Authorizer::Load(*o.store));
  {
    // Who asked, for the record; explaining is open to anyone the policy names.
    auto me = authz.Identify(LocalCaller());
    if (me) o.ev.principal = authz.engine().PrincipalName(*me);
  }
  auto who = authz.engine().FindPrincipal(principal);
  if (!who) return Error(Category::kNotFound, "principal '" + principal + "' is not in the policy in force");
  policy::Decision d = authz.engine().Decide(*who, *action, {project, env, name});
  CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
  if (g.json) {
    PrintJson({{"principal", principal}, {"action", action_text}, {"target", target_text},
               {"decision", d.allowed ? "allow" : "deny"}, {"rule", d.rule}, {"reason", d.reason},
               {"policy_version", authz.version()}});
  } else {
    std::printf("%s: %s\n  rule: %s\n  policy v%u\n", d.allowed ? "allow" : "deny", d.reason.c_str(),
                d.rule.c_str(), authz.version());
  }
  if (!d.allowed) return Error(Category::kDenied, "denied: " + principal + " may not " + action_text + " " + target_text);
  return Status::Ok();
  }());
}

Status Usage(const Globals& g, const std::string& project) {
  std::optional<std::string> scope;
  if (!project.empty()) {
    CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(project));
    scope = project;
  }
  if (auto addr = ServerAddress()) {
    // Through the server: the same rows, as the server's policy shows them.
    CUSTODY_ASSIGN_OR_RETURN(auto c, client::Client::Connect(*addr));
    CUSTODY_ASSIGN_OR_RETURN(std::string body, c.Fetch("/v1/usage" + (scope ? "?project=" + *scope : std::string())));
    json rows = json::parse(body, nullptr, false);
    if (rows.is_discarded() || !rows.is_array()) return Error(Category::kIntegrity, "custodyd sent malformed usage");
    if (g.json) {
      PrintJson(rows);
      return Status::Ok();
    }
    std::vector<std::vector<std::string>> table{{"PROJECT/ENV", "PRINCIPAL", "UNSEALS", "TODAY", "SEALS", "DENIED",
                                                 "RATE-LIMITED", "SPEND-LIMITED", "LAST USE"}};
    for (const auto& r : rows) {
      const auto& ref = r["refusals"];
      table.push_back({r.value("project", "") + "/" + r.value("environment", ""), r.value("principal", ""),
                       std::to_string(r.value("unseals", 0)), std::to_string(r.value("unseals_today", 0)),
                       std::to_string(r.value("seals", 0)), std::to_string(ref.value("denied", 0)),
                       std::to_string(ref.value("rate_limited", 0)), std::to_string(ref.value("spend_limited", 0)),
                       FormatTime(r.value("last_use", int64_t{0}))});
    }
    PrintTable(table);
    return Status::Ok();
  }
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "usage.read"));
  o.ev.project = project;
  return Finish(o, [&]() -> Status {
  CUSTODY_RETURN_IF_ERROR(Guard(o));
  if (scope) {
    CUSTODY_RETURN_IF_ERROR(o.store->FindProject(*scope));
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kReadUsage, {*scope, "", ""}));
  }
  bool admin = o.authz->Allows(o.who, Action::kCreateProject, {});
  CUSTODY_ASSIGN_OR_RETURN(auto rows, o.store->Usage(scope, static_cast<int64_t>(std::time(nullptr))));
  json out = json::array();
  std::vector<std::vector<std::string>> table{{"PROJECT/ENV", "PRINCIPAL", "UNSEALS", "TODAY", "SEALS", "DENIED",
                                               "RATE-LIMITED", "SPEND-LIMITED", "LAST USE"}};
  for (const auto& r : rows) {
    // Owners and auditors see their projects' usage; admins see all.
    if (!admin && !o.authz->Allows(o.who, Action::kReadUsage, {r.project, "", ""})) continue;
    out.push_back({{"project", r.project}, {"environment", r.environment}, {"principal", r.principal},
                   {"unseals", r.unseals}, {"unseals_today", r.unseals_today}, {"seals", r.seals},
                   {"refusals", {{"denied", r.denied}, {"rate_limited", r.rate_limited},
                                 {"spend_limited", r.spend_limited}}},
                   {"last_use", FormatTime(r.last_use)}});
    table.push_back({r.project + "/" + r.environment, r.principal, std::to_string(r.unseals),
                     std::to_string(r.unseals_today), std::to_string(r.seals), std::to_string(r.denied),
                     std::to_string(r.rate_limited), std::to_string(r.spend_limited), FormatTime(r.last_use)});
  }
  if (o.ev.decision == core::AuditDecision::kNone) {
    o.ev.decision = core::AuditDecision::kAllow;
    o.ev.rule = "rows filtered by read-usage grants";
  }
  CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
  if (g.json) {
    PrintJson(out);
  } else {
    PrintTable(table);
  }
  return Status::Ok();
  }());
}

namespace {

Result<std::string> ReadText(const std::string& path, const std::string& what) {
  auto bytes = SecretBuffer::ReadFile(path, 1024 * 1024, /*require_private=*/false);
  if (!bytes) return std::move(bytes).error().Wrap(what);
  return std::string(bytes->RevealString(SecretAccess{}));
}

// Parses --since: an ISO date or time prefix ("2026-11-29", "2026-11-29T10:00")
// or an age ("30m", "12h", "7d").
Result<int64_t> ParseSince(const std::string& text, const char* option = "--since") {
  if (!text.empty() && (text.back() == 'm' || text.back() == 'h' || text.back() == 'd') &&
      text.find('-') == std::string::npos) {
    char* end = nullptr;
    long n = std::strtol(text.c_str(), &end, 10);
    const int64_t unit = text.back() == 'm' ? 60 : text.back() == 'h' ? 3600 : 86400;
    // At most a thousand years back: a larger number would overflow.
    if (end == text.c_str() + text.size() - 1 && n > 0 && n <= 1000L * 366 * 86400 / unit) {
      return static_cast<int64_t>(std::time(nullptr)) - n * unit;
    }
  }
  std::tm tm{};
  const char* end = strptime(text.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (end == nullptr || *end != '\0') {
    tm = {};
    end = strptime(text.c_str(), "%Y-%m-%dT%H:%M", &tm);
  }
  if (end == nullptr || *end != '\0') {
    tm = {};
    end = strptime(text.c_str(), "%Y-%m-%d", &tm);
  }
  if (end == nullptr || *end != '\0') {
    return Error(Category::kUsage, std::string(option) + " '" + text +
                                       "' is not a date (2026-11-29[T10:00[:00]], UTC) or an age (30m, 12h, 7d)");
  }
  return static_cast<int64_t>(timegm(&tm));
}

}  // namespace

namespace {

// --since of `audit show` and `audit export`: checked as text, then read
// as a date or an age; nullopt when not given.
Result<std::optional<int64_t>> SinceArg(const std::optional<std::string>& since) {
  if (!since) return std::optional<int64_t>();
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--since", *since));
  CUSTODY_ASSIGN_OR_RETURN(int64_t t, ParseSince(*since));
  return std::optional<int64_t>(t);
}

// One chain of the configured trail, read and verified.
struct ChainReport {
  std::string node;  // "" for the file log's one chain
  core::AuditVerifyReport rep;
};

void PrintUnsignedTail(const core::AuditVerifyReport& rep, const char* indent) {
  if (rep.pruned_by > 0) {
    std::printf("%sstarts at seq %" PRIu64 ": the records before it were pruned (the audit.prune record at seq %" PRIu64
                " says so)\n",
                indent, rep.first_seq, rep.pruned_by);
  }
  if (rep.unsigned_tail > 0) {
    std::printf("%s%" PRIu64 " records after the last checkpoint (seq %" PRIu64
                ") are chained but not yet signed: a cut there would not show\n",
                indent, rep.unsigned_tail, rep.last_checkpoint_seq);
  }
  if (rep.torn_tail) std::printf("%sthe last line is torn (a crash mid-write); the next write repairs it\n", indent);
}

json ReportJson(const core::AuditVerifyReport& rep) {
  return {{"intact", rep.intact}, {"records", rep.records}, {"checkpoints", rep.checkpoints},
          {"last_seq", rep.last_seq}, {"last_checkpoint_seq", rep.last_checkpoint_seq},
          {"unsigned_tail", rep.unsigned_tail}, {"torn_tail", rep.torn_tail}, {"first_seq", rep.first_seq},
          {"pruned_by", rep.pruned_by}, {"problem", rep.problem}};
}

// Every chain of the configured trail: the file log's one, or one per node
// in the store. The store's checkpoint witness is used for a file log only
// (a trail in the store keeps its checkpoints among its records, and its
// head rows witness how far each chain reached).
Result<std::vector<ChainReport>> VerifyConfiguredTrail(const core::Config& config, core::Store& store,
                                                       const std::string& public_key_pem, Progress* progress) {
  CUSTODY_ASSIGN_OR_RETURN(auto storage, core::OpenAuditStorage(config));
  const bool in_store = core::AuditInStore(config);
  CUSTODY_ASSIGN_OR_RETURN(std::vector<std::string> chains, storage->Chains());
  std::vector<ChainReport> out;
  for (const auto& chain : chains) {
    std::vector<core::AuditChainLine> lines;
    bool torn = false;
    Status read = storage->Read(chain, [&](core::AuditChainLine&& l) { lines.push_back(std::move(l)); }, &torn);
    ChainReport cr;
    cr.node = chain;
    if (!read.ok() && read.error().category() != Category::kIntegrity) return read.error();
    if (!read.ok()) {
      cr.rep.problem = read.error().message();
      out.push_back(std::move(cr));
      continue;
    }
    if (lines.empty() && !in_store) return Error(Category::kNotFound, storage->Describe() + ": no records yet");
    core::AuditVerifyOptions vo;
    vo.public_key_pem = public_key_pem;
    if (progress != nullptr) vo.progress = [&](uint64_t done, uint64_t total) { progress->Update(done, total); };
    if (!in_store) {
      CUSTODY_ASSIGN_OR_RETURN(vo.witness, store.LastAuditCheckpoint(config.node.name));
    }
    CUSTODY_ASSIGN_OR_RETURN(auto witness, storage->Witness(chain));
    CUSTODY_ASSIGN_OR_RETURN(cr.rep, core::VerifyAuditChain(lines, torn, vo, in_store ? chain : "", witness));
    out.push_back(std::move(cr));
  }
  if (out.empty()) return Error(Category::kNotFound, storage->Describe() + ": no records yet");
  return out;
}

}  // namespace

Status AuditVerify(const Globals& g, const std::vector<std::string>& files, const std::string& pubkey_file) {
  // A problem found in a segment names its file, in the --json answer too.
  for (const auto& f : files) CUSTODY_RETURN_IF_ERROR(CheckArgText("FILES", f));
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--pubkey", pubkey_file));
  std::optional<Opened> o;
  if (files.empty() || pubkey_file.empty()) {
    // The trail, the witness and the key come from the configured installation.
    auto opened = [&]() -> Result<Opened> {
      Opened x;
      x.globals = &g;
      CUSTODY_ASSIGN_OR_RETURN(x.config, core::LoadConfig(core::LocateConfig(g.config)));
      CUSTODY_ASSIGN_OR_RETURN(x.store, core::OpenStore(x.config, /*create=*/false));
      return x;
    }();
    if (!opened) {
      return std::move(opened).error().Wrap(files.empty() ? "audit verify needs FILES or a config"
                                                          : "audit verify needs --pubkey or a config");
    }
    o.emplace(std::move(*opened));
  }
  std::string public_key_pem;
  if (!pubkey_file.empty()) {
    CUSTODY_ASSIGN_OR_RETURN(public_key_pem, ReadText(pubkey_file, "--pubkey"));
  } else {
    CUSTODY_ASSIGN_OR_RETURN(auto signer, OpenSigner(g, *o, /*create=*/false));
    CUSTODY_ASSIGN_OR_RETURN(public_key_pem, signer->PublicKeyPem());
  }
  std::vector<ChainReport> chains;
  const bool in_store = files.empty() && core::AuditInStore(o->config);
  if (!files.empty()) {
    core::AuditVerifyOptions vo;
    vo.files = files;
    Progress progress(g, "checked", "records");
    vo.progress = [&](uint64_t done, uint64_t total) { progress.Update(done, total); };
    std::string first = files.front();
    vo.dir = first.rfind('/') == std::string::npos ? "." : first.substr(0, first.rfind('/'));
    vo.public_key_pem = public_key_pem;
    CUSTODY_ASSIGN_OR_RETURN(core::AuditVerifyReport rep, core::VerifyAuditLog(vo));
    chains.push_back({"", std::move(rep)});
  } else {
    Progress progress(g, "checked", "records");
    CUSTODY_ASSIGN_OR_RETURN(chains, VerifyConfiguredTrail(o->config, *o->store, public_key_pem, &progress));
  }
  if (!in_store) {
    // The file log: one chain, reported as it always was.
    const core::AuditVerifyReport& rep = chains.front().rep;
    if (g.json) PrintJson(ReportJson(rep));
    if (!rep.intact) return Error(Category::kIntegrity, "audit log is NOT intact: " + rep.problem);
    if (!g.json) {
      std::printf("audit log intact: %" PRIu64 " records, %" PRIu64 " signed checkpoints, last seq %" PRIu64 "\n",
                  rep.records, rep.checkpoints, rep.last_seq);
      PrintUnsignedTail(rep, "  ");
    }
    return Status::Ok();
  }
  // The trail in the store: every node's chain, and the first bad record of each.
  uint64_t records = 0, checkpoints = 0;
  std::string problems;
  json per_node = json::array();
  for (const auto& c : chains) {
    records += c.rep.records;
    checkpoints += c.rep.checkpoints;
    if (!c.rep.intact) problems += (problems.empty() ? "" : "; ") + ("node " + c.node + ": " + c.rep.problem);
    json j = ReportJson(c.rep);
    j["node"] = c.node;
    per_node.push_back(std::move(j));
  }
  if (g.json) {
    PrintJson({{"intact", problems.empty()}, {"records", records}, {"checkpoints", checkpoints},
               {"nodes", per_node}, {"problem", problems}});
  }
  if (!problems.empty()) return Error(Category::kIntegrity, "audit trail is NOT intact: " + problems);
  if (!g.json) {
    std::printf("audit trail intact: %zu node chain%s, %" PRIu64 " records, %" PRIu64 " signed checkpoints\n",
                chains.size(), chains.size() == 1 ? "" : "s", records, checkpoints);
    for (const auto& c : chains) {
      std::printf("  node %s: %" PRIu64 " records, %" PRIu64 " signed checkpoints, last seq %" PRIu64 "\n",
                  c.node.c_str(), c.rep.records, c.rep.checkpoints, c.rep.last_seq);
      PrintUnsignedTail(c.rep, "    ");
    }
  }
  return Status::Ok();
}

namespace {

// Each record of the trail, with its line and its chain, to `each`: chain
// by chain, in chain order. Records that do not parse are counted in
// `damaged` (audit verify names them).
struct TrailRecord {
  std::string chain;
  std::string line;
  core::AuditRecord rec;
};
Status ReadTrail(core::AuditStorage& storage, const std::optional<std::string>& node, size_t* damaged,
                 const std::function<void(TrailRecord&&)>& each) {
  CUSTODY_ASSIGN_OR_RETURN(std::vector<std::string> chains, storage.Chains());
  for (const auto& chain : chains) {
    if (node && chain != *node) continue;
    CUSTODY_RETURN_IF_ERROR(storage.Read(chain, [&](core::AuditChainLine&& l) {
      auto r = core::ParseAuditRecord(l.text);
      if (!r) {
        ++*damaged;
        return;
      }
      each({chain, std::move(l.text), std::move(*r)});
    }));
  }
  return Status::Ok();
}

// Whether the caller may see a record: admins see all, auditors and owners
// their projects' records.
bool RecordVisible(const Opened& o, bool admin, const core::AuditEvent& e) {
  return admin || (!e.project.empty() && o.authz->Allows(o.who, Action::kReadAudit, {e.project, "", ""}));
}

}  // namespace

Status AuditShow(const Globals& g, const AuditShowArgs& a) {
  // --project goes into the record; the others are only compared, but are
  // refused alike rather than echoed in a message.
  if (a.project) {
    CUSTODY_RETURN_IF_ERROR(CheckArgText("--project", *a.project));
    CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(*a.project));
  }
  if (a.principal) CUSTODY_RETURN_IF_ERROR(CheckArgText("--principal", *a.principal));
  if (a.action) CUSTODY_RETURN_IF_ERROR(CheckArgText("--action", *a.action));
  CUSTODY_ASSIGN_OR_RETURN(std::optional<int64_t> since, SinceArg(a.since));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "audit.show"));
  o.best_effort = true;  // reading a damaged log must stay possible
  o.ev.project = a.project.value_or("");
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    if (a.project) CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kReadAudit, {*a.project, "", ""}));
    bool admin = o.authz->Allows(o.who, Action::kApplyPolicy, {});
    std::vector<TrailRecord> records;
    size_t damaged = 0;
    CUSTODY_RETURN_IF_ERROR(ReadTrail(o.audit->storage(), std::nullopt, &damaged, [&](TrailRecord&& t) {
      const core::AuditRecord& r = t.rec;
      const core::AuditEvent& e = r.event;
      if (!RecordVisible(o, admin, e)) return;
      if (a.project && e.project != *a.project) return;
      if (a.principal && e.principal != *a.principal) return;
      if (a.action && e.action != *a.action && r.type != *a.action) return;
      if (since && r.unix_time < *since) return;
      t.line.clear();
      records.push_back(std::move(t));
    }));
    const bool in_store = core::AuditInStore(o.config);
    // Several nodes' chains read as one story: in time order, each chain's
    // own order kept among records of the same second.
    if (in_store) {
      std::stable_sort(records.begin(), records.end(),
                       [](const TrailRecord& x, const TrailRecord& y) { return x.rec.time < y.rec.time; });
    }
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    json out = json::array();
    std::vector<std::vector<std::string>> rows;
    if (in_store) {
      rows.push_back({"NODE", "SEQ", "TIME", "PRINCIPAL", "ACTION", "TARGET", "DECISION", "RESULT", "RULE OR ERROR"});
    } else {
      rows.push_back({"SEQ", "TIME", "PRINCIPAL", "ACTION", "TARGET", "DECISION", "RESULT", "RULE OR ERROR"});
    }
    for (const auto& t : records) {
      const core::AuditRecord& r = t.rec;
      const core::AuditEvent& e = r.event;
      std::string target = e.project;
      if (!e.environment.empty()) target += "/" + e.environment;
      if (!e.name.empty()) target += "/" + e.name;
      if (e.version) target += " v" + std::to_string(*e.version);
      std::string action = r.type == "checkpoint" ? "audit.checkpoint" : e.action;
      if (r.type == "checkpoint") target = "covers seq " + std::to_string(r.covers_seq);
      out.push_back({{"node", r.node}, {"seq", r.seq}, {"time", r.time}, {"type", r.type}, {"principal", e.principal},
                     {"identified_by", e.identified_by}, {"action", action}, {"project", e.project},
                     {"environment", e.environment}, {"name", e.name},
                     {"version", e.version ? json(*e.version) : json(nullptr)}, {"kek_id", e.kek_id},
                     {"decision", core::AuditDecisionName(e.decision)}, {"rule", e.rule}, {"result", core::AuditResultName(e.result)}, {"error", e.error},
                     {"request_id", e.request_id}, {"detail", e.detail}});
      const std::string decision = core::AuditDecisionName(e.decision), result = core::AuditResultName(e.result);
      std::vector<std::string> row{std::to_string(r.seq), r.time, e.principal.empty() ? "-" : e.principal, action,
                                   target.empty() ? "-" : target, decision.empty() ? "-" : decision,
                                   result.empty() ? "-" : result, e.error.empty() ? e.rule : e.error};
      if (in_store) row.insert(row.begin(), t.chain);
      rows.push_back(std::move(row));
    }
    if (g.json) {
      PrintJson(out);
    } else {
      PrintTable(rows);
    }
    if (damaged > 0) {
      std::fprintf(stderr, "custody: %zu damaged record(s) left out; run 'custody audit verify'\n", damaged);
    }
    return Status::Ok();
  }());
}

Status AuditExport(const Globals& g, const AuditExportArgs& a) {
  CUSTODY_ASSIGN_OR_RETURN(std::optional<int64_t> since, SinceArg(a.since));
  if (a.node) {
    CUSTODY_RETURN_IF_ERROR(CheckArgText("--node", *a.node));
    if (Status s = core::ValidateNodeName(*a.node, "--node"); !s.ok()) {
      return Error(Category::kUsage, s.error().message());
    }
  }
  if (a.out) CUSTODY_RETURN_IF_ERROR(CheckArgText("--out", *a.out));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "audit.export"));
  o.best_effort = true;  // exporting a damaged trail must stay possible
  if (a.node) o.ev.detail = "node " + *a.node;
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    const bool admin = o.authz->Allows(o.who, Action::kApplyPolicy, {});
    // With --out, a StagedFile: an export that fails or is killed half way
    // leaves no half file where the SIEM collector looks, and no leftover
    // that stops the next export; nobody can pre-create or redirect it.
    std::optional<StagedFile> staged;
    if (a.out) {
      auto made = StagedFile::Create(*a.out);
      if (!made) return Error(Category::kUsage, "--out " + *a.out + ": " + made.error().message());
      staged.emplace(std::move(*made));
    }
    std::string pending;  // records for the file, written 64 KiB at a time
    Status wrote = Status::Ok();
    auto flush = [&] {
      if (wrote.ok() && !pending.empty()) {
        wrote = staged->Write(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(pending.data()),
                                                       pending.size()));
      }
      pending.clear();
    };
    size_t damaged = 0, written = 0;
    bool write_failed = false;
    Status read = ReadTrail(o.audit->storage(), a.node, &damaged, [&](TrailRecord&& t) {
      if (!RecordVisible(o, admin, t.rec.event)) return;
      if (since && t.rec.unix_time < *since) return;
      // The line as stored, byte for byte: the file log's format.
      if (staged) {
        pending.append(t.line).push_back('\n');
        if (pending.size() >= 64 * 1024) flush();
      } else if (std::fwrite(t.line.data(), 1, t.line.size(), stdout) != t.line.size() ||
                 std::fputc('\n', stdout) == EOF) {
        write_failed = true;
      }
      ++written;
    });
    if (staged) {
      flush();
      // Committed only when every record was read and written; otherwise
      // the staged file goes away with `staged`.
      if (read.ok() && wrote.ok()) wrote = staged->Commit();
      CUSTODY_RETURN_IF_ERROR(read);
      if (!wrote.ok()) return Error(Category::kUnavailable, "audit export: " + wrote.error().message());
    } else {
      write_failed = std::fflush(stdout) != 0 || write_failed;
    }
    CUSTODY_RETURN_IF_ERROR(read);
    if (write_failed) return Error(Category::kUnavailable, "audit export: writing the records failed");
    o.ev.detail += (o.ev.detail.empty() ? "" : ", ") + std::to_string(written) + " records";
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    if (damaged > 0) {
      std::fprintf(stderr, "custody: %zu damaged record(s) left out; run 'custody audit verify'\n", damaged);
    }
    if (a.out) std::fprintf(stderr, "custody: wrote %zu records to %s\n", written, a.out->c_str());
    return Status::Ok();
  }());
}

Status AuditPubkey(const Globals& g, const std::optional<std::string>& out) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "audit.pubkey"));
  o.best_effort = true;
  return Finish(o, [&]() -> Status {
    // Made here if it does not exist yet, so it can be exported before the
    // first checkpoint is due.
    CUSTODY_ASSIGN_OR_RETURN(auto signer, OpenSigner(g, o, /*create=*/true));
    CUSTODY_ASSIGN_OR_RETURN(std::string pem, signer->PublicKeyPem());
    o.ev.detail = "key " + signer->key_id();
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    if (out) {
      CUSTODY_RETURN_IF_ERROR(WritePrivateFile(*out, std::span<const uint8_t>(
                                                         reinterpret_cast<const uint8_t*>(pem.data()), pem.size())));
      std::fprintf(stderr, "custody: wrote the audit public key (%s) to %s\n", signer->key_id().c_str(), out->c_str());
    } else {
      std::printf("%s", pem.c_str());
    }
    return Status::Ok();
  }());
}

Status AuditCheckpoint(const Globals& g) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "audit.checkpoint"));
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kApplyPolicy, {}));
    CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    CUSTODY_ASSIGN_OR_RETURN(auto signer, OpenSigner(g, o, /*create=*/true));
    std::pair<uint64_t, std::string> covers;
    CUSTODY_ASSIGN_OR_RETURN(uint64_t seq, o.audit->Checkpoint(*signer, &covers));
    if (!core::AuditInStore(o.config)) {
      CUSTODY_RETURN_IF_ERROR(o.store->RecordAuditCheckpoint(o.config.node.name, seq, covers.second));
    }
    if (g.json) {
      PrintJson({{"checkpoint_seq", seq}, {"covers_seq", covers.first}, {"covers_hash", covers.second}});
    } else {
      std::printf("checkpoint seq %" PRIu64 " signs seq %" PRIu64 " (hash %s)\n", seq, covers.first,
                  covers.second.c_str());
    }
    return Status::Ok();
  }());
}

Status AuditPrune(const Globals& g, const AuditPruneArgs& a) {
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--before", a.before));
  CUSTODY_ASSIGN_OR_RETURN(int64_t before, ParseSince(a.before, "--before"));
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  if (before > now) {
    return Error(Category::kUsage, "--before '" + a.before + "' is in the future; nothing was pruned");
  }
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, core::kAuditPruneAction));
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kApplyPolicy, {}));
    // The chain this host writes: the file log's one, or this node's in the
    // store (the prune's record must go into the chain it shortens, so each
    // node prunes its own).
    const bool in_store = core::AuditInStore(o.config);
    const std::string chain = in_store ? o.config.node.name : "";
    const std::string log_name = in_store ? "node " + chain + "'s audit chain" : "the audit log";
    // Only a log that verifies is pruned, with the token's key: removing
    // records must never hide a problem in them, and every record removed
    // must be signed by a checkpoint the remaining log still holds.
    CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
    CUSTODY_ASSIGN_OR_RETURN(auto signer, OpenSigner(g, o, /*create=*/false));
    CUSTODY_ASSIGN_OR_RETURN(std::string pem, signer->PublicKeyPem());
    CUSTODY_ASSIGN_OR_RETURN(std::vector<ChainReport> chains, VerifyConfiguredTrail(o.config, *o.store, pem, nullptr));
    auto mine = std::find_if(chains.begin(), chains.end(), [&](const ChainReport& c) { return c.node == chain; });
    if (mine == chains.end()) {
      return Error(Category::kNotFound, "audit prune: " + log_name + " has no records yet; nothing was pruned");
    }
    const core::AuditVerifyReport& rep = mine->rep;
    if (!rep.intact) {
      return Error(Category::kIntegrity, "audit prune: " + log_name + " is NOT intact (" + rep.problem +
                                             "); nothing was pruned");
    }
    // A checkpoint at seq C signs the records before it.
    const uint64_t signed_through = rep.last_checkpoint_seq > 0 ? rep.last_checkpoint_seq - 1 : 0;
    // The oldest units, while every record in them is older than --before
    // and signed; the first that is not ends the run, and says why.
    uint64_t first = 0, last = 0, bytes = 0, units = 0;
    std::string last_hash, stop;
    std::vector<std::string> names;  // the file log's segments, for the listing
    CUSTODY_RETURN_IF_ERROR(o.audit->storage().ScanPruneUnits(chain, [&](const core::AuditPruneUnit& u) {
      if (u.newest_unix_time >= before) {
        stop = u.name + " has records from " + FormatUtc(u.newest_unix_time);
        return false;
      }
      if (u.last_seq > signed_through) {
        stop = u.name + " holds records up to seq " + std::to_string(u.last_seq) +
               " and the checkpoints sign only up to seq " + std::to_string(signed_through) +
               "; run 'custody audit checkpoint' first";
        return false;
      }
      if (units++ == 0) first = u.first_seq;
      last = u.last_seq;
      last_hash = u.last_hash;
      bytes += u.bytes;
      if (!in_store) names.push_back(u.name);
      return true;
    }));
    if (stop.empty()) {
      stop = in_store ? "the newest record always stays" : "the newest segment holding records always stays";
    }
    const std::string cutoff = FormatUtc(before);
    if (units == 0) {
      o.ev.detail += "; nothing before " + cutoff + " to prune";
      if (g.json) {
        PrintJson({{"pruned", false}, {"records", 0}, {"kept_because", stop}});
      } else {
        std::printf("nothing to prune: %s\n", stop.c_str());
      }
      return Status::Ok();
    }
    const uint64_t records = last - first + 1;
    const std::string what =
        "seq " + std::to_string(first) + " to " + std::to_string(last) + " (" +
        (in_store ? "node " + chain : std::to_string(units) + " segment" + (units == 1 ? "" : "s")) + ", " +
        std::to_string(bytes) + " bytes, every record before " + cutoff + ")";
    auto report = [&](bool pruned) {
      json j = {{"pruned", pruned}, {"first_seq", first}, {"last_seq", last}, {"records", records},
                {"bytes", bytes}, {"starts_at_seq", last + 1}};
      if (!in_store) j["segments"] = names;
      if (!pruned) j["kept_because"] = stop;
      PrintJson(j);
    };
    if (a.dry_run) {
      o.ev.detail += "; dry run: would prune " + what;
      if (g.json) {
        report(false);
      } else {
        std::printf("would prune %s:\n", what.c_str());
        for (const auto& n : names) std::printf("  %s\n", n.c_str());
        std::printf("the log would then start at seq %" PRIu64 "; the next stays because %s\n", last + 1,
                    stop.c_str());
      }
      return Status::Ok();
    }
    // The record goes first, durable and signed by a checkpoint before any
    // file is removed: without it, verify would call the shorter log a
    // deletion, and unsigned it would be a claim anyone able to append could
    // make. A prune cut short after it leaves segments that the statement
    // covers; the next run removes them.
    CUSTODY_ASSIGN_OR_RETURN(std::vector<uint8_t> signature, signer->Sign(core::AuditPruneMessage(last + 1, last_hash)));
    o.ev.detail += "; pruned " + what + "; " + core::AuditPruneStatement(last + 1, last_hash, signature);
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
    // From here on the log says "pruned": a failure gets a record of its
    // own (same request id), so the log never claims more than happened.
    auto failed = [&](Error e) -> Status {
      core::AuditEvent after = o.ev;
      after.result = core::AuditResult::kError;
      after.error = e.message();
      after.detail = "the prune recorded just before did not finish";
      auto noted = o.audit->Append(after);
      if (!noted) {
        return Error(e.category(), e.message() + " (and the record saying the prune did not finish could not be "
                                                 "written: " + noted.error().message() + ")");
      }
      return e;
    };
    std::pair<uint64_t, std::string> covers;
    auto checkpoint = o.audit->Checkpoint(*signer, &covers);
    if (!checkpoint) return failed(std::move(checkpoint).error());
    if (!in_store) {
      Status witnessed = o.store->RecordAuditCheckpoint(o.config.node.name, *checkpoint, covers.second);
      if (!witnessed.ok()) return failed(witnessed.error());
    }
    auto removed = o.audit->storage().Prune(chain, last);
    if (!removed) return failed(std::move(removed).error());
    if (*removed != records) {
      return failed(Error(Category::kUnavailable, "audit prune: removed " + std::to_string(*removed) + " of the " +
                                                      std::to_string(records) +
                                                      " records meant (another prune at the same time?); run it "
                                                      "again to finish"));
    }
    if (g.json) {
      report(true);
    } else {
      std::printf("pruned %s; the log now starts at seq %" PRIu64 "\n", what.c_str(), last + 1);
    }
    return Status::Ok();
  }());
}

}  // namespace custody::cli
