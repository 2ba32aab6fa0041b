#include "commands.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "custody/core/config.h"
#include "custody/core/names.h"
#include "custody/core/sealer.h"
#include "custody/core/service.h"
#include "custody/core/store.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/rv.h"
#include "custody/hsm/uri.h"
#include "io.h"

namespace custody::cli {
namespace {

using nlohmann::json;

// What a command needs, opened in order and closed in reverse: the sealer
// goes before the session pool, the pool before the module.
struct Opened {
  core::Config config;
  std::unique_ptr<core::Store> store;
  core::Token token;
  std::unique_ptr<core::Sealer> sealer;
};

Result<Opened> OpenStore(const Globals& g) {
  Opened o;
  CUSTODY_ASSIGN_OR_RETURN(o.config, core::LoadConfig(core::LocateConfig(g.config)));
  CUSTODY_ASSIGN_OR_RETURN(o.store, core::OpenSqliteStore(o.config.store_path, /*create=*/false));
  return o;
}

Result<Opened> OpenAll(const Globals& g) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g));
  CUSTODY_ASSIGN_OR_RETURN(SecretBuffer pin, core::ResolvePin(o.config, g.pin_fd));
  CUSTODY_ASSIGN_OR_RETURN(o.token, core::OpenToken(o.config, pin));
  o.sealer = std::make_unique<core::Sealer>(*o.token.pool, *o.store);
  return o;
}

void PrintJson(const json& j) { std::printf("%s\n", j.dump(2).c_str()); }

}  // namespace

Status Init(const Globals& g, const InitArgs& a) {
  std::string config_path = core::LocateConfig(g.config);
  if (!a.force && std::filesystem::exists(config_path)) {
    return Error(Category::kUsage, "config " + config_path + " already exists; pass --force to replace it");
  }
  core::Config c;
  c.state_dir = std::filesystem::absolute(a.state_dir).lexically_normal().string();
  c.token_module = a.module;
  c.token_uri = a.token;
  if (a.pin_file) c.pin_file = std::filesystem::absolute(*a.pin_file).lexically_normal().string();
  for (const auto& kv : a.module_env) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) {
      return Error(Category::kUsage, "--module-env '" + kv + "' must be NAME=VALUE");
    }
    c.token_environment.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  c.store_path = c.state_dir + "/custody.db";

  // Prove the config works before writing anything: the module loads, the
  // URI selects one token, and the PIN logs in.
  CUSTODY_ASSIGN_OR_RETURN(SecretBuffer pin, core::ResolvePin(c, g.pin_fd));
  CUSTODY_ASSIGN_OR_RETURN(core::Token token, core::OpenToken(c, pin));

  CUSTODY_RETURN_IF_ERROR(MakePrivateDir(c.state_dir));
  auto parent = std::filesystem::path(config_path).parent_path();
  if (!parent.empty()) CUSTODY_RETURN_IF_ERROR(MakePrivateDir(parent.string()));
  CUSTODY_ASSIGN_OR_RETURN(auto store, core::OpenSqliteStore(c.store_path, /*create=*/true));
  CUSTODY_RETURN_IF_ERROR(core::WriteConfig(c, config_path));
  if (g.json) {
    PrintJson({{"config", config_path}, {"store", c.store_path}, {"token", c.token_uri}});
  } else {
    std::printf("wrote %s\nstore %s\n", config_path.c_str(), c.store_path.c_str());
  }
  return Status::Ok();
}

Status ProjectCreate(const Globals& g, const std::string& name, const std::vector<std::string>& envs) {
  // Validate before touching the token, so a typo costs no PIN attempt.
  CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(name));
  for (const auto& e : envs) CUSTODY_RETURN_IF_ERROR(core::ValidateEnvName(e));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenAll(g));
  core::SecretService svc(*o.store, *o.sealer);
  CUSTODY_ASSIGN_OR_RETURN(core::ProjectRecord p, svc.CreateProject(name, envs));
  CUSTODY_ASSIGN_OR_RETURN(core::KekRecord kek, o.store->CurrentKek(p.id));
  if (g.json) {
    PrintJson({{"project", p.name}, {"environments", envs}, {"kek", kek.label},
               {"kek_id", hsm::ToHex(kek.ref.id)}});
  } else {
    std::printf("created project %s with KEK %s (id %s)\n", p.name.c_str(), kek.label.c_str(),
                hsm::ToHex(kek.ref.id).c_str());
    for (const auto& e : envs) std::printf("  environment %s\n", e.c_str());
  }
  return Status::Ok();
}

Status ProjectList(const Globals& g) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g));
  CUSTODY_ASSIGN_OR_RETURN(auto projects, o.store->ListProjects());
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
  if (g.json) {
    PrintJson(out);
  } else {
    PrintTable(rows);
  }
  return Status::Ok();
}

Status EnvCreate(const Globals& g, const std::string& project, const std::string& env) {
  CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(project));
  CUSTODY_RETURN_IF_ERROR(core::ValidateEnvName(env));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g));
  CUSTODY_ASSIGN_OR_RETURN(auto e, o.store->CreateEnvironment(project, env));
  if (g.json) {
    PrintJson({{"project", e.project}, {"environment", e.name}});
  } else {
    std::printf("created environment %s/%s\n", e.project.c_str(), e.name.c_str());
  }
  return Status::Ok();
}

Status SecretPut(const Globals& g, const PutArgs& a) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(a.path));
  Result<SecretBuffer> value = Error(Category::kInternal, "unset");
  if (a.from_file) {
    value = SecretBuffer::ReadFile(*a.from_file, core::kMaxSecretSize, /*require_private=*/false);
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
  if (!a.keep_newline) {
    auto s = value->RevealString(SecretAccess{});
    if (!s.empty() && s.back() == '\n') value->Truncate(s.size() - 1);
  }
  if (value->empty()) return Error(Category::kIntegrity, "refusing to store an empty value for " + path.str());

  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenAll(g));
  core::SecretService svc(*o.store, *o.sealer);
  CUSTODY_ASSIGN_OR_RETURN(uint32_t version, svc.Put(path, *value));
  if (g.json) {
    PrintJson({{"path", path.str()}, {"version", version}});
  } else {
    std::printf("sealed %s version %u\n", path.str().c_str(), version);
  }
  return Status::Ok();
}

Status SecretGet(const Globals& g, const GetArgs& a) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(a.path));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenAll(g));
  core::SecretService svc(*o.store, *o.sealer);
  CUSTODY_ASSIGN_OR_RETURN(core::Unsealed u, svc.Get(path, a.version));
  auto bytes = u.value.Reveal(SecretAccess{});
  if (a.out) {
    CUSTODY_RETURN_IF_ERROR(WritePrivateFile(*a.out, bytes));
    std::fprintf(stderr, "custody: wrote %s version %u to %s\n", path.str().c_str(), u.version, a.out->c_str());
    return Status::Ok();
  }
  // The value goes to stdout as raw bytes, never through a JSON string copy.
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(STDOUT_FILENO, bytes.data() + off, bytes.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Os(errno, "writing to stdout");
    off += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status SecretList(const Globals& g, const std::string& scope_text) {
  CUSTODY_ASSIGN_OR_RETURN(core::Scope scope, core::Scope::Parse(scope_text));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g));
  if (scope.project && scope.environment) {
    CUSTODY_RETURN_IF_ERROR(o.store->FindEnvironment(*scope.project, *scope.environment));
  }
  CUSTODY_ASSIGN_OR_RETURN(auto secrets, o.store->ListSecrets(scope.project, scope.environment));
  if (g.json) {
    json out = json::array();
    for (const auto& s : secrets) {
      out.push_back({{"project", s.project}, {"environment", s.environment}, {"name", s.name},
                     {"latest_version", s.latest_version}, {"versions", s.version_count},
                     {"updated_at", FormatTime(s.updated_at)}});
    }
    PrintJson(out);
    return Status::Ok();
  }
  std::vector<std::vector<std::string>> rows{{"SECRET", "LATEST", "VERSIONS", "UPDATED"}};
  for (const auto& s : secrets) {
    rows.push_back({s.project + "/" + s.environment + "/" + s.name, std::to_string(s.latest_version),
                    std::to_string(s.version_count), FormatTime(s.updated_at)});
  }
  PrintTable(rows);
  return Status::Ok();
}

Status SecretDelete(const Globals& g, const std::string& text) {
  CUSTODY_ASSIGN_OR_RETURN(core::SecretPath path, core::SecretPath::Parse(text));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g));
  CUSTODY_ASSIGN_OR_RETURN(auto env, o.store->FindEnvironment(path.project, path.environment));
  CUSTODY_RETURN_IF_ERROR(o.store->DeleteSecret(env, path.name));
  if (g.json) {
    PrintJson({{"deleted", path.str()}});
  } else {
    std::printf("deleted %s and all its versions\n", path.str().c_str());
  }
  return Status::Ok();
}

Status TokenInfo(const Globals& g) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenAll(g));
  CK_TOKEN_INFO ti{};
  CK_RV rv = o.token.module->fn()->C_GetTokenInfo(o.token.slot, &ti);
  if (rv != CKR_OK) return hsm::RvError(rv, "C_GetTokenInfo");
  CUSTODY_ASSIGN_OR_RETURN(auto lease, o.token.pool->Acquire());
  CUSTODY_ASSIGN_OR_RETURN(auto objects, hsm::ListObjects(*lease));
  std::string label = hsm::TrimPadded(ti.label, sizeof ti.label);
  std::string manufacturer = hsm::TrimPadded(ti.manufacturerID, sizeof ti.manufacturerID);
  std::string model = hsm::TrimPadded(ti.model, sizeof ti.model);
  std::string serial = hsm::TrimPadded(ti.serialNumber, sizeof ti.serialNumber);
  if (g.json) {
    json objs = json::array();
    for (const auto& ob : objects) {
      objs.push_back({{"label", ob.label}, {"class", hsm::ClassName(ob.object_class)},
                      {"key_type", hsm::KeyTypeName(ob.key_type)}, {"id", hsm::ToHex(ob.id)},
                      {"value_len", ob.value_len}, {"sensitive", ob.sensitive}, {"extractable", ob.extractable},
                      {"always_sensitive", ob.always_sensitive}, {"never_extractable", ob.never_extractable},
                      {"local", ob.local}, {"private", ob.is_private}, {"token", ob.token}});
    }
    PrintJson({{"module", o.token.module->path()}, {"slot", o.token.slot}, {"label", label},
               {"manufacturer", manufacturer}, {"model", model}, {"serial", serial}, {"objects", objs}});
    return Status::Ok();
  }
  std::printf("module        %s\nslot          %lu\ntoken         %s\nmanufacturer  %s\nmodel         %s\nserial        %s\n\n",
              o.token.module->path().c_str(), static_cast<unsigned long>(o.token.slot), label.c_str(),
              manufacturer.c_str(), model.c_str(), serial.c_str());
  std::vector<std::vector<std::string>> rows{
      {"LABEL", "CLASS", "TYPE", "BITS", "ID", "SENSITIVE", "EXTRACTABLE", "NEVER-EXTRACTABLE", "LOCAL"}};
  auto yn = [](bool b) { return std::string(b ? "yes" : "no"); };
  for (const auto& ob : objects) {
    rows.push_back({ob.label, hsm::ClassName(ob.object_class), hsm::KeyTypeName(ob.key_type),
                    ob.value_len ? std::to_string(ob.value_len * 8) : "-", hsm::ToHex(ob.id), yn(ob.sensitive),
                    yn(ob.extractable), yn(ob.never_extractable), yn(ob.local)});
  }
  PrintTable(rows);
  return Status::Ok();
}

}  // namespace custody::cli
