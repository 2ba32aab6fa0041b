// KEK rotation: a new KEK version for a project inside the token, every
// sealed version of the project re-sealed under it, the old KEK destroyed
// once no blob needs it.
//
//   core::KekRotator rot(store, sealer);
//   auto plan = rot.Plan("payments");          // what would happen (--dry-run)
//   auto done = rot.Run("payments", hooks);    // do it, or finish it
//
// Crash-safe and resumable, because every step leaves the store consistent
// and the next run can tell where it stopped:
//   1. the new KEK is created in the token, then recorded in the store as the
//      only active one (the old ones become "retiring"). A crash between the
//      two leaves an unrecorded token object, which the next run destroys
//      (nothing was ever sealed under it).
//   2. versions are re-sealed in batches; each batch replaces its blobs in
//      one transaction, so every row holds either its old blob (old KEK) or
//      its new one (new KEK), never neither.
//   3. a retiring KEK with no blob left becomes "destroying" (checked in the
//      same transaction), its token object is destroyed, then it is
//      "destroyed". Puts seal only under an active KEK (the store checks at
//      commit), so no blob can appear under a KEK after step 3 began.
// A run that finds retiring or destroying KEKs resumes instead of starting
// another rotation.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "custody/common/result.h"
#include "custody/seal/sealer.h"
#include "custody/service/rotation.h"
#include "custody/store/store.h"

namespace custody::core {

struct KekRotationPlan {
  std::string project;
  int64_t project_id = 0;
  std::optional<KekRecord> active;  // the KEK new seals use now
  struct Pending {
    KekRecord kek;
    uint64_t sealed = 0;  // versions still sealed under it
  };
  std::vector<Pending> pending;  // retiring or destroying KEKs of an interrupted run
  bool resume = false;           // finish an interrupted run instead of starting one
  uint32_t next_version = 0;     // the KEK version a fresh run creates
  uint64_t to_reseal = 0;        // versions to re-seal
  bool in_token = false;         // re-sealing inside the token (see mode)
  std::string mode;              // how values are re-sealed, for people
};

struct KekRotationResult {
  KekRecord kek;  // the active KEK afterwards
  bool resumed = false;
  uint64_t resealed = 0;
  size_t unrecorded_removed = 0;  // token objects left by an interrupted run
  std::vector<KekRecord> destroyed;
  std::string mode;
};

class KekRotator {
 public:
  struct Hooks {
    // Called after each batch: versions done, versions in all.
    std::function<void(uint64_t done, uint64_t total)> progress;
    // Called once the new KEK is recorded (or found, on resume), before any
    // blob changes: the CLI writes its audit record here, fail closed.
    std::function<Status(const KekRotationPlan& plan, const KekRecord& target)> started;
    size_t batch = 128;  // versions per store transaction
    // The run holds the store lock "kek-rotate/PROJECT" (see StoreLock)
    // and renews it after every batch; it lapses this long after a run
    // killed on another host (one killed on this host is seen at once).
    int64_t lock_seconds = 60;
  };

  KekRotator(Store& store, Sealer& sealer, Clock clock = SystemClock())
      : store_(store), sealer_(sealer), clock_(std::move(clock)) {}

  Result<KekRotationPlan> Plan(const std::string& project);
  Result<KekRotationResult> Run(const std::string& project, const Hooks& hooks);

 private:
  Store& store_;
  Sealer& sealer_;
  Clock clock_;
};

}  // namespace custody::core
