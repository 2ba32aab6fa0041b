// Fuzzes the policy parser and the engine built from what it accepts: any
// text must parse or be refused with located errors, never crash; an
// accepted policy must give answers for every action without crashing.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "custody/policy/engine.h"
#include "custody/policy/parse.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace custody::policy;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  ParseResult r = ParsePolicy(text, "fuzz.toml");
  if (r.policy.has_value() != r.errors.empty()) std::abort();
  for (const auto& e : r.errors) {
    if (e.rfind("fuzz.toml:", 0) != 0) std::abort();  // every error is located
  }
  if (!r.policy) return 0;
  Engine engine(std::move(*r.policy));
  for (uint32_t i = 0; i < engine.policy().principals.size() && i < 4; ++i) {
    for (Action a : kAllActions) {
      for (const auto& p : engine.policy().projects) {
        for (const auto& e : p.environments) {
          Decision d = engine.Decide(PrincipalId{i}, a, {p.name, e.name, "stripe-key"});
          if (d.rule.empty()) std::abort();
          (void)engine.LimitsFor(p.name, e.name, PrincipalId{i});
        }
      }
    }
  }
  return 0;
}
