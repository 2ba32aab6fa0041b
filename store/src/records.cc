#include "custody/store/store.h"

namespace custody::core {

namespace {
// Indexed by KekState; these words are what the store's rows hold.
constexpr const char* kKekStateNames[] = {"active", "retiring", "destroying", "destroyed"};
}  // namespace

const char* KekStateName(KekState s) {
  const auto i = static_cast<size_t>(s);
  return i < std::size(kKekStateNames) ? kKekStateNames[i] : "unknown";
}

KekState ParseKekState(std::string_view word) {
  for (size_t i = 0; i < std::size(kKekStateNames); ++i) {
    if (word == kKekStateNames[i]) return static_cast<KekState>(i);
  }
  return KekState::kDestroyed;  // unknown: never used for sealing
}

}  // namespace custody::core
