// SecretService: the operations on projects, environments and secrets that
// the CLI and custodyd (through core::Custodian) call. It joins the store and the sealer;
// it has no idea how either is implemented.
//
//   auto backend = core::OpenBackend(config, pin, *store);   // custody/app/backend.h
//   core::SecretService svc(*store, *backend->sealer);
//   auto version = svc.Put(path, value);
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "custody/audit/audit.h"
#include "custody/common/names.h"
#include "custody/common/result.h"
#include "custody/common/secret.h"
#include "custody/seal/sealer.h"
#include "custody/service/rotation.h"
#include "custody/store/store.h"

namespace custody::core {

struct Unsealed {
  SecretBuffer value;
  uint32_t version = 0;
  int64_t created_at = 0;  // of this version (unix seconds)
};

// A new value from the token's RNG for `secret rotate --generate`: `bytes`
// random bytes, encoded, after `prefix` ("sk-live-"). Built in locked memory.
enum class ValueFormat : uint8_t { kHex, kBase64, kBase64Url };
std::optional<ValueFormat> ParseValueFormat(std::string_view s);
Result<SecretBuffer> GenerateValue(Sealer& sealer, size_t bytes, ValueFormat format, std::string_view prefix);

class SecretService {
 public:
  SecretService(Store& store, Sealer& sealer, Clock clock = SystemClock())
      : store_(store), sealer_(sealer), clock_(std::move(clock)) {}

  // Creates the project's KEK in the token, then the project and its
  // environments in the store; if the store refuses, the new KEK is
  // destroyed again so nothing is half-made.
  Result<ProjectRecord> CreateProject(const std::string& name, const std::vector<std::string>& envs);

  // Seals `value` as the next version. Returns the version number.
  // `before_commit`, if given, runs after sealing and before the store
  // commits the version (the CLI makes its audit record durable there); an
  // error from it stops the put with nothing stored.
  // `put_key` (not empty): the request's Idempotency-Key. If a put with it
  // already stored a version of this secret (within a day), that version
  // is returned, nothing is sealed or stored, and `*replayed` is set; a
  // concurrent put with the same key on another node ends the same way.
  // `expect_current` (check-and-set): store only if the secret's newest
  // version is this one (0: only if it has none yet). Otherwise kUsage
  // with precondition_failed(), nothing sealed or stored. Atomic with the
  // store's own version numbering: of two puts expecting the same version,
  // one stores and the other is refused (nodes sharing PostgreSQL meet at
  // the same unique version number).
  Result<uint32_t> Put(const SecretPath& path, const SecretBuffer& value,
                       const std::function<Status(uint32_t version)>& before_commit = {},
                       const std::string& put_key = "", bool* replayed = nullptr,
                       std::optional<uint32_t> expect_current = std::nullopt);
  // The check-and-set test: `next_version` (the store's NextVersion) must
  // follow `expect_current`; else the refusal naming the newest version.
  static Status CheckExpected(const SecretPath& path, uint32_t next_version, uint32_t expect_current);
  // The current version, or `version` if its state allows (current or
  // previous within `grace`).
  Result<Unsealed> Get(const SecretPath& path, std::optional<uint32_t> version,
                       uint64_t grace = policy::Engine::kDefaultGrace);
  // Retention after a put: deletes the oldest retired or revoked versions
  // beyond `keep`. Returns the versions deleted.
  Result<std::vector<uint32_t>> ApplyRetention(const SecretPath& path, uint32_t keep, uint64_t grace);
  // Revokes a version now; returns the current version afterwards (0: none).
  Result<uint32_t> Revoke(const SecretPath& path, uint32_t version, const std::string& reason, const std::string& by);
  int64_t Now() const { return clock_(); }
  // The unseal alone, for callers that have already read the environment,
  // the version and its KEK (to audit them before unsealing): no second
  // round of store lookups on the hot path. If a KEK rotation moved the
  // version to a new KEK and destroyed the old one since the caller's read,
  // the version is read again once and unsealed under its new KEK.
  Result<Unsealed> Unseal(const SecretPath& path, const EnvironmentRecord& env, const SecretVersionRecord& rec,
                          const KekRecord& kek);

 private:
  Store& store_;
  Sealer& sealer_;
  Clock clock_;
};

}  // namespace custody::core
