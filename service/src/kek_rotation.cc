#include "custody/service/kek_rotation.h"

#include <algorithm>

#include "custody/common/hex.h"
#include "custody/store/store_lock.h"

namespace custody::core {

Result<KekRotationPlan> KekRotator::Plan(const std::string& project) {
  KekRotationPlan plan;
  plan.project = project;
  CUSTODY_ASSIGN_OR_RETURN(ProjectRecord p, store_.FindProject(project));
  plan.project_id = p.id;
  CUSTODY_ASSIGN_OR_RETURN(auto keks, store_.ProjectKeks(p.id));
  uint32_t max_version = 0;
  for (const auto& k : keks) {
    max_version = std::max(max_version, k.ref.version);
    if (k.state == KekState::kActive) {
      if (!plan.active || plan.active->ref.version < k.ref.version) plan.active = k;
    } else if (k.state == KekState::kRetiring || k.state == KekState::kDestroying) {
      CUSTODY_ASSIGN_OR_RETURN(uint64_t n, store_.CountSealedUnder(k.id));
      plan.pending.push_back({k, n});
      plan.to_reseal += n;
    }
  }
  if (!plan.active) {
    return Error(Category::kIntegrity, "project '" + project + "' has no active KEK in the store; refusing to rotate");
  }
  plan.resume = !plan.pending.empty();
  plan.next_version = max_version + 1;
  if (!plan.resume) {
    CUSTODY_ASSIGN_OR_RETURN(plan.to_reseal, store_.CountSealedUnder(plan.active->id));
  }
  plan.in_token = false;
  plan.mode = sealer_.ResealMode();
  return plan;
}

Result<KekRotationResult> KekRotator::Run(const std::string& project, const Hooks& hooks) {
  // One rotation of a project at a time, across every host sharing the
  // store: two runs would both make KEK v(n+1), and one would destroy the
  // other's as an unrecorded leftover (step 1). Taken before planning, so
  // the plan cannot go stale under another run.
  CUSTODY_ASSIGN_OR_RETURN(StoreLock lock,
                           StoreLock::Take(store_, "kek-rotate/" + project, hooks.lock_seconds,
                                           "KEK rotation of " + project));
  int64_t renewed = clock_();
  CUSTODY_ASSIGN_OR_RETURN(KekRotationPlan plan, Plan(project));
  KekRotationResult result;
  result.resumed = plan.resume;
  result.mode = plan.mode;
  KekRecord target = *plan.active;
  if (!plan.resume) {
    // Step 1. A token object with the new label that the store does not know
    // is what a run killed between C_GenerateKey and the store's commit
    // left; nothing was sealed under it.
    std::string label = KekLabel::For(project, plan.next_version);
    CUSTODY_ASSIGN_OR_RETURN(auto keks, store_.ProjectKeks(plan.project_id));
    std::vector<KekId> known;
    for (const auto& k : keks) known.push_back(k.ref.id);
    CUSTODY_ASSIGN_OR_RETURN(result.unrecorded_removed, sealer_.DestroyUnrecorded(label, known));
    std::vector<uint8_t> material;
    CUSTODY_ASSIGN_OR_RETURN(KekRef ref, sealer_.CreateKek(project, plan.next_version, &material));
    // Recorded only if the lock is still ours, checked in the same
    // transaction: a run that stalled past its lock may have been taken
    // over, and the new holder's step 1 destroys this key as unrecorded, so
    // recording it would leave the project's active KEK missing from the
    // token. Refused, it destroys its own key instead.
    const LockFence fence = lock.Fence();
    auto rec = store_.AddKek(plan.project_id, ref, label, clock_(), material, &fence);
    renewed = clock_();
    if (!rec) {
      (void)sealer_.DestroyKek(ref);  // best effort; the next run removes it otherwise
      return std::move(rec).error();
    }
    plan.pending.push_back({*plan.active, plan.to_reseal});
    target = *rec;
  }
  result.kek = target;
  if (hooks.started) CUSTODY_RETURN_IF_ERROR(hooks.started(plan, target));

  // Step 2.
  uint64_t done = 0;
  uint64_t failed = 0;
  std::string first_failure;
  const size_t batch = std::max<size_t>(1, hooks.batch);
  for (const auto& pend : plan.pending) {
    if (pend.kek.state == KekState::kDestroying) continue;
    std::pair<int64_t, uint32_t> after{0, 0};
    for (;;) {
      CUSTODY_ASSIGN_OR_RETURN(auto items, store_.SealedUnder(pend.kek.id, after, batch));
      if (items.empty()) break;
      after = {items.back().secret_id, items.back().version};
      std::vector<Resealed> out;
      out.reserve(items.size());
      for (const auto& it : items) {
        // A slow token or a large batch must not let the lock lapse mid-batch.
        if (clock_() - renewed >= hooks.lock_seconds / 2) {
          CUSTODY_RETURN_IF_ERROR(lock.Renew());
          renewed = clock_();
        }
        SealContext ctx{project, it.environment, it.name, it.version};
        auto value = sealer_.Unseal(pend.kek.ref, ctx, it.blob);
        if (!value) {
          // A blob that fails authentication cannot be re-sealed; it stays
          // under its old KEK, which is then kept. The others go on.
          if (value.error().category() != Category::kIntegrity) return std::move(value).error();
          if (failed++ == 0) {
            first_failure = project + "/" + it.environment + "/" + it.name + " v" + std::to_string(it.version) +
                            ": " + value.error().message();
          }
          continue;
        }
        CUSTODY_ASSIGN_OR_RETURN(auto blob, sealer_.Seal(target.ref, ctx, *value));
        out.push_back({it.secret_id, it.version, std::move(blob)});
      }  // each plaintext was wiped as `value` went out of scope
      CUSTODY_ASSIGN_OR_RETURN(size_t n, store_.ReplaceSealed(pend.kek.id, target.id, out));
      result.resealed += n;
      done += items.size();
      if (hooks.progress) hooks.progress(done, plan.to_reseal);
      // A run that lost its lock (stalled past it, and another took over)
      // stops here; the other run finishes the work.
      CUSTODY_RETURN_IF_ERROR(lock.Renew());
      renewed = clock_();
    }
  }
  if (failed > 0) {
    return Error(Category::kIntegrity,
                 std::to_string(failed) + " sealed version(s) failed authentication and were not re-sealed (first: " +
                     first_failure + "); the old KEK is kept so they stay as they were");
  }

  // Step 3.
  CUSTODY_RETURN_IF_ERROR(lock.Renew());
  for (const auto& pend : plan.pending) {
    if (pend.kek.state != KekState::kDestroying) {
      CUSTODY_RETURN_IF_ERROR(store_.SetKekState(pend.kek.id, KekState::kDestroying));
    }
    Status d = sealer_.DestroyKek(pend.kek.ref);
    if (!d.ok() && d.error().category() != Category::kNotFound) return Error(d.error()).Wrap("destroying " + pend.kek.label);
    CUSTODY_RETURN_IF_ERROR(store_.SetKekState(pend.kek.id, KekState::kDestroyed));
    KekRecord gone = pend.kek;
    gone.state = KekState::kDestroyed;
    result.destroyed.push_back(std::move(gone));
  }
  return result;
}

}  // namespace custody::core
