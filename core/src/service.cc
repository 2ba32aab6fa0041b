#include "custody/core/service.h"

#include "custody/hsm/uri.h"

namespace custody::core {

Result<Token> OpenToken(const Config& config, const SecretBuffer& pin) {
  ApplyTokenEnvironment(config);
  Token t;
  CUSTODY_ASSIGN_OR_RETURN(t.module, hsm::Module::Load(config.token_module));
  CUSTODY_ASSIGN_OR_RETURN(auto uri, hsm::TokenUri::Parse(config.token_uri));
  CUSTODY_ASSIGN_OR_RETURN(t.slot, hsm::FindSlot(*t.module, uri));
  CUSTODY_ASSIGN_OR_RETURN(t.pool, hsm::SessionPool::Open(t.module, t.slot, pin));
  return t;
}

Result<ProjectRecord> SecretService::CreateProject(const std::string& name, const std::vector<std::string>& envs) {
  CUSTODY_RETURN_IF_ERROR(ValidateProjectName(name));
  for (size_t i = 0; i < envs.size(); ++i) {
    CUSTODY_RETURN_IF_ERROR(ValidateEnvName(envs[i]));
    for (size_t j = 0; j < i; ++j) {
      if (envs[i] == envs[j]) return Error(Category::kUsage, "environment '" + envs[i] + "' is listed twice");
    }
  }
  // Checked before the KEK is made, so a duplicate name costs no token object.
  if (auto existing = store_.FindProject(name); existing.ok()) {
    return Error(Category::kUsage, "project '" + name + "' already exists");
  } else if (existing.error().category() != Category::kNotFound) {
    return existing.error();
  }
  CUSTODY_ASSIGN_OR_RETURN(KekRef kek, sealer_.CreateKek(name, 1));
  auto project = store_.CreateProject(name, envs, kek, KekLabel::For(name, 1));
  if (!project) {
    // Best effort: a KEK left behind here would hold nothing and is labelled.
    (void)sealer_.DestroyKek(kek);
    return project;
  }
  return project;
}

Result<uint32_t> SecretService::Put(const SecretPath& path, const SecretBuffer& value) {
  if (value.empty()) return Error(Category::kIntegrity, "refusing to store an empty value for " + path.str());
  CUSTODY_ASSIGN_OR_RETURN(EnvironmentRecord env, store_.FindEnvironment(path.project, path.environment));
  CUSTODY_ASSIGN_OR_RETURN(KekRecord kek, store_.CurrentKek(env.project_id));
  // A concurrent writer may take our version number between NextVersion and
  // AddVersion; the version is bound into the seal, so re-seal and retry.
  for (int attempt = 0; attempt < 8; ++attempt) {
    CUSTODY_ASSIGN_OR_RETURN(uint32_t version, store_.NextVersion(env.id, path.name));
    SealContext ctx{path.project, path.environment, path.name, version};
    CUSTODY_ASSIGN_OR_RETURN(auto blob, sealer_.Seal(kek.ref, ctx, value));
    Status s = store_.AddVersion(env.id, path.name, version, kek.id, blob);
    if (s.ok()) return version;
    if (s.error().backend() != Backend::kStore || s.error().code() != Store::kVersionTaken) return s.error();
  }
  return Error(Category::kUnavailable, "too many concurrent writers to " + path.str() + "; retry");
}

Result<Unsealed> SecretService::Get(const SecretPath& path, std::optional<uint32_t> version) {
  CUSTODY_ASSIGN_OR_RETURN(EnvironmentRecord env, store_.FindEnvironment(path.project, path.environment));
  CUSTODY_ASSIGN_OR_RETURN(SecretVersionRecord rec, store_.GetVersion(env, path.name, version));
  CUSTODY_ASSIGN_OR_RETURN(KekRecord kek, store_.KekById(rec.kek_record_id));
  if (kek.project_id != env.project_id) {
    return Error(Category::kIntegrity, path.str() + " is recorded under another project's KEK; refusing");
  }
  SealContext ctx{path.project, path.environment, path.name, rec.version};
  auto value = sealer_.Unseal(kek.ref, ctx, rec.blob);
  if (!value) return std::move(value).error().Wrap(path.str() + " v" + std::to_string(rec.version));
  return Unsealed{std::move(*value), rec.version};
}

}  // namespace custody::core
