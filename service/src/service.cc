#include "custody/service/service.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

namespace custody::core {

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
  std::vector<uint8_t> material;
  CUSTODY_ASSIGN_OR_RETURN(KekRef kek, sealer_.CreateKek(name, 1, &material));
  auto project = store_.CreateProject(name, envs, kek, KekLabel::For(name, 1), material);
  if (!project) {
    // Best effort: a KEK left behind here would hold nothing and is labelled.
    (void)sealer_.DestroyKek(kek);
    return project;
  }
  return project;
}

Result<uint32_t> SecretService::Put(const SecretPath& path, const SecretBuffer& value,
                                    const std::function<Status(uint32_t version)>& before_commit,
                                    const std::string& put_key, bool* replayed,
                                    std::optional<uint32_t> expect_current) {
  if (value.empty()) return Error(Category::kIntegrity, "refusing to store an empty value for " + path.str());
  CUSTODY_ASSIGN_OR_RETURN(EnvironmentRecord env, store_.FindEnvironment(path.project, path.environment));
  // A concurrent writer may take our version number between NextVersion and
  // AddVersion, or a KEK rotation may retire the KEK we sealed under; the
  // version and the KEK are bound into the seal, so re-seal and retry.
  for (int attempt = 0; attempt < 8; ++attempt) {
    if (!put_key.empty()) {
      // A retry of a put that landed (its answer was lost), or the loser of
      // a race with its twin on another node: answered with that version.
      CUSTODY_ASSIGN_OR_RETURN(std::optional<uint32_t> earlier,
                               store_.VersionForPutKey(env.id, path.name, put_key, clock_()));
      if (earlier) {
        if (replayed != nullptr) *replayed = true;
        return *earlier;
      }
    }
    CUSTODY_ASSIGN_OR_RETURN(KekRecord kek, store_.CurrentKek(env.project_id));
    CUSTODY_ASSIGN_OR_RETURN(uint32_t version, store_.NextVersion(env.id, path.name));
    // Checked on every attempt: a retry after a taken version finds the
    // newer version here and is refused, while a retry after a KEK
    // rotation (the same number still free) goes on.
    if (expect_current) CUSTODY_RETURN_IF_ERROR(CheckExpected(path, version, *expect_current));
    SealContext ctx{path.project, path.environment, path.name, version};
    CUSTODY_ASSIGN_OR_RETURN(auto blob, sealer_.Seal(kek.ref, ctx, value));
    if (before_commit) CUSTODY_RETURN_IF_ERROR(before_commit(version));
    Status s = store_.AddVersion(env.id, path.name, version, kek.id, blob, clock_(), put_key);
    if (s.ok()) return version;
    // Only a taken version is worth sealing again: every attempt spends KEK
    // budget and runs before_commit (an audit record), so anything else
    // (a plain SQL error too) ends here.
    if (!s.error().version_taken()) return s.error();
  }
  return Error(Category::kUnavailable, "too many concurrent writers to " + path.str() + "; retry");
}

Status SecretService::CheckExpected(const SecretPath& path, uint32_t next_version, uint32_t expect_current) {
  if (next_version == expect_current + 1) return Status::Ok();
  const std::string now = next_version == 1 ? " has no version" : " is at v" + std::to_string(next_version - 1);
  const std::string wanted = expect_current == 0 ? "absent" : "v" + std::to_string(expect_current);
  return Error(Category::kUsage, path.str() + now + ", not " + wanted +
                                     " as this put required; nothing stored (read it again, then retry)")
      .WithPreconditionFailed();
}

Result<Unsealed> SecretService::Get(const SecretPath& path, std::optional<uint32_t> version, uint64_t grace) {
  CUSTODY_ASSIGN_OR_RETURN(EnvironmentRecord env, store_.FindEnvironment(path.project, path.environment));
  CUSTODY_ASSIGN_OR_RETURN(SecretVersionRecord rec, store_.GetVersion(env, path.name, version));
  CUSTODY_RETURN_IF_ERROR(CheckReadable(path, rec, grace, clock_()));
  CUSTODY_ASSIGN_OR_RETURN(KekRecord kek, store_.KekById(rec.kek_record_id));
  return Unseal(path, env, rec, kek);
}

Result<std::vector<uint32_t>> SecretService::ApplyRetention(const SecretPath& path, uint32_t keep, uint64_t grace) {
  CUSTODY_ASSIGN_OR_RETURN(EnvironmentRecord env, store_.FindEnvironment(path.project, path.environment));
  CUSTODY_ASSIGN_OR_RETURN(auto versions, store_.ListVersions(env, path.name));
  auto trim = VersionsToTrim(versions, keep, grace, clock_());
  CUSTODY_RETURN_IF_ERROR(store_.TrimVersions(env, path.name, trim));
  return trim;
}

Result<uint32_t> SecretService::Revoke(const SecretPath& path, uint32_t version, const std::string& reason,
                                       const std::string& by) {
  CUSTODY_ASSIGN_OR_RETURN(EnvironmentRecord env, store_.FindEnvironment(path.project, path.environment));
  return store_.RevokeVersion(env, path.name, version, reason, by, clock_());
}

std::optional<ValueFormat> ParseValueFormat(std::string_view s) {
  if (s == "hex") return ValueFormat::kHex;
  if (s == "base64") return ValueFormat::kBase64;
  if (s == "base64url") return ValueFormat::kBase64Url;
  return std::nullopt;
}

Result<SecretBuffer> GenerateValue(Sealer& sealer, size_t bytes, ValueFormat format, std::string_view prefix) {
  if (bytes < 16 || bytes > 1024) {
    return Error(Category::kUsage, "--generate takes 16 to 1024 bytes (got " + std::to_string(bytes) + ")");
  }
  for (char c : prefix) {
    if (c <= ' ' || c > '~') return Error(Category::kUsage, "--prefix must be printable ASCII without spaces");
  }
  if (prefix.size() > 64) return Error(Category::kUsage, "--prefix is longer than 64 characters");
  SecretBuffer raw(bytes);
  CUSTODY_RETURN_IF_ERROR(sealer.Random(raw.RevealMutable(SecretAccess{})));
  auto in = raw.Reveal(SecretAccess{});
  size_t body = format == ValueFormat::kHex ? bytes * 2 : 4 * ((bytes + 2) / 3);
  // EVP_EncodeBlock writes a terminating NUL: one byte of room, cut after.
  SecretBuffer out(prefix.size() + body + 1);
  auto dst = out.RevealMutable(SecretAccess{});
  std::copy(prefix.begin(), prefix.end(), dst.begin());
  uint8_t* p = dst.data() + prefix.size();
  if (format == ValueFormat::kHex) {
    static constexpr char kHex[] = "0123456789abcdef";
    for (size_t i = 0; i < bytes; ++i) {
      p[2 * i] = static_cast<uint8_t>(kHex[in[i] >> 4]);
      p[2 * i + 1] = static_cast<uint8_t>(kHex[in[i] & 0xf]);
    }
  } else {
    int n = EVP_EncodeBlock(p, in.data(), static_cast<int>(bytes));
    body = static_cast<size_t>(n);
    if (format == ValueFormat::kBase64Url) {
      // RFC 4648 section 5, unpadded: safe in URLs, headers and shells.
      while (body > 0 && p[body - 1] == '=') --body;
      for (size_t i = 0; i < body; ++i) {
        if (p[i] == '+') p[i] = '-';
        if (p[i] == '/') p[i] = '_';
      }
    }
  }
  out.Truncate(prefix.size() + body);
  return out;
}

Result<Unsealed> SecretService::Unseal(const SecretPath& path, const EnvironmentRecord& env,
                                       const SecretVersionRecord& rec, const KekRecord& kek) {
  if (kek.project_id != env.project_id) {
    return Error(Category::kIntegrity, path.str() + " is recorded under another project's KEK; refusing");
  }
  SealContext ctx{path.project, path.environment, path.name, rec.version};
  auto value = sealer_.Unseal(kek.ref, ctx, rec.blob);
  if (!value && value.error().category() == Category::kNotFound) {
    // A KEK rotation may have re-sealed this version and destroyed its old
    // KEK between the caller's read and this unseal: read it again, once.
    // (Any other error is the blob's or the token's own.)
    auto again = store_.GetVersion(env, path.name, rec.version);
    if (again.ok() && again->kek_record_id != rec.kek_record_id) {
      auto kek2 = store_.KekById(again->kek_record_id);
      if (kek2.ok() && kek2->project_id == env.project_id) value = sealer_.Unseal(kek2->ref, ctx, again->blob);
    }
  }
  if (!value) return std::move(value).error().Wrap(path.str() + " v" + std::to_string(rec.version));
  return Unsealed{std::move(*value), rec.version};
}

}  // namespace custody::core
