#include "custody/seal/sealer.h"

#include <algorithm>
#include <string>

namespace custody::core {
namespace {
// The largest reservation drawn from the ledger at once: at most this many
// nonces are lost when the process ends.
constexpr uint64_t kMaxBlock = 1024;
}  // namespace

std::string KekLabel::For(std::string_view project, uint32_t version) {
  return "custody:kek:" + std::string(project) + ":v" + std::to_string(version);
}

Status KekBudget::TakeUse(const KekRef& kek) {
  std::lock_guard lock(mu_);
  Budget& b = budgets_[kek.id];
  if (b.left == 0) {
    // Reservations grow 1, 2, 4 ... 1024: a one-shot CLI burns one count, a
    // busy server one ledger write per 1024 seals.
    Status s = ledger_.Reserve(kek, b.block, max_);
    if (!s.ok() && s.error().category() == Category::kLimit && b.block > 1) {
      b.block = 1;  // near the limit: take what is left one at a time
      s = ledger_.Reserve(kek, 1, max_);
    }
    CUSTODY_RETURN_IF_ERROR(s);
    b.left = b.block;
    b.block = std::min(b.block * 2, kMaxBlock);
  }
  --b.left;
  return Status::Ok();
}

}  // namespace custody::core
