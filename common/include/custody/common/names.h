// Names of projects, environments and secrets, and PROJECT/ENV/NAME paths.
//
//   auto p = core::SecretPath::Parse("payments/prod/stripe-key");
//
// Names are restricted so they are safe in token labels, file names, logs
// and URLs, and so two spellings never name one thing.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "custody/common/result.h"

namespace custody::core {

// project and environment: [a-z0-9][a-z0-9_-]{0,62}
Status ValidateProjectName(std::string_view name);
Status ValidateEnvName(std::string_view name);
// secret: [A-Za-z0-9][A-Za-z0-9_.-]{0,127}
Status ValidateSecretName(std::string_view name);

struct SecretPath {
  std::string project, environment, name;
  static Result<SecretPath> Parse(std::string_view text);
  std::string str() const { return project + "/" + environment + "/" + name; }
};

// "PROJECT" or "PROJECT/ENV" (for listings).
struct Scope {
  std::optional<std::string> project, environment;
  static Result<Scope> Parse(std::string_view text);
};

}  // namespace custody::core
