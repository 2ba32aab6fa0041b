// Fuzzes the name rules every secret path, scope and label goes through
// (names.h): SecretPath::Parse, Scope::Parse and the three validators.
// Whatever the bytes: no crash, refusals are usage errors that never echo an
// unprintable byte (they reach terminals and logs), an accepted path or scope
// spells its parts back exactly (two spellings never name one thing), and the
// validators accept exactly the documented character sets, checked against a
// second, plain implementation of those rules.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "custody/common/names.h"

namespace {

using namespace custody;
using namespace custody::core;

void Require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "names_fuzz: %s\n", what);
  std::abort();
}

bool InRange(char c, char lo, char hi) { return c >= lo && c <= hi; }
bool LowerOrDigit(char c) { return InRange(c, 'a', 'z') || InRange(c, '0', '9'); }
bool Letter(char c) { return LowerOrDigit(c) || InRange(c, 'A', 'Z'); }

// project and environment: [a-z0-9][a-z0-9_-]{0,62}
bool IsProjectOrEnvName(std::string_view s) {
  if (s.empty() || s.size() > 63 || !LowerOrDigit(s[0])) return false;
  for (char c : s) {
    if (!LowerOrDigit(c) && c != '-' && c != '_') return false;
  }
  return true;
}

// secret: [A-Za-z0-9][A-Za-z0-9_.-]{0,127}
bool IsSecretName(std::string_view s) {
  if (s.empty() || s.size() > 128 || !Letter(s[0])) return false;
  for (char c : s) {
    if (!Letter(c) && c != '-' && c != '_' && c != '.') return false;
  }
  return true;
}

// A refusal is a usage error whose message is printable ASCII only.
void CheckRefusal(const Error& e) {
  Require(e.category() == Category::kUsage, "a refusal is not a usage error");
  Require(!e.message().empty(), "a refusal has no message");
  for (char c : e.message()) Require(c >= 0x20 && c < 0x7f, "a refusal echoes an unprintable byte");
}

void CheckValidator(Status (*validate)(std::string_view), bool (*reference)(std::string_view),
                    std::string_view text) {
  Status s = validate(text);
  Require(s.ok() == reference(text), "a validator disagrees with the documented character set");
  if (!s.ok()) CheckRefusal(s.error());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);

  CheckValidator(ValidateProjectName, IsProjectOrEnvName, text);
  CheckValidator(ValidateEnvName, IsProjectOrEnvName, text);
  CheckValidator(ValidateSecretName, IsSecretName, text);

  auto path = SecretPath::Parse(text);
  if (path.ok()) {
    Require(IsProjectOrEnvName(path->project) && IsProjectOrEnvName(path->environment) &&
                IsSecretName(path->name),
            "an accepted path has a part outside the documented character sets");
    const std::string spelled = path->str();
    Require(spelled == text, "an accepted path does not spell back to its input");
    auto again = SecretPath::Parse(spelled);
    Require(again.ok() && again->project == path->project && again->environment == path->environment &&
                again->name == path->name,
            "an accepted path's str() does not re-parse to the same parts");
  } else {
    CheckRefusal(path.error());
  }

  auto scope = Scope::Parse(text);
  if (scope.ok()) {
    if (text.empty()) {
      Require(!scope->project && !scope->environment, "the empty scope names something");
    } else {
      Require(scope->project && IsProjectOrEnvName(*scope->project), "an accepted scope has a bad project");
      std::string spelled = *scope->project;
      if (scope->environment) {
        Require(IsProjectOrEnvName(*scope->environment), "an accepted scope has a bad environment");
        spelled += "/" + *scope->environment;
      }
      Require(spelled == text, "an accepted scope does not spell back to its input");
    }
  } else {
    CheckRefusal(scope.error());
  }
  return 0;
}
