#include "custody/common/names.h"

#include <string>

namespace custody::core {
namespace {

bool Lower(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
bool Alnum(char c) { return Lower(c) || (c >= 'A' && c <= 'Z'); }

Status Check(std::string_view kind, std::string_view name, size_t max, bool (*first)(char),
             bool (*rest)(char), std::string_view allowed) {
  if (name.empty()) return Error(Category::kUsage, std::string(kind) + " name is empty");
  if (name.size() > max) {
    return Error(Category::kUsage, std::string(kind) + " name is longer than " + std::to_string(max) + " characters");
  }
  bool ok = first(name[0]);
  for (char c : name.substr(1)) ok = ok && rest(c);
  if (!ok) {
    // Show the name only when it is printable: it may come from a bad paste.
    std::string shown;
    for (char c : name) shown += (c >= 0x20 && c < 0x7f) ? c : '?';
    return Error(Category::kUsage, std::string(kind) + " name '" + shown + "' is not allowed: use " +
                                       std::string(allowed));
  }
  return Status::Ok();
}

}  // namespace

Status ValidateProjectName(std::string_view n) {
  return Check("project", n, 63, Lower, [](char c) { return Lower(c) || c == '-' || c == '_'; },
               "lower-case letters, digits, '-' and '_', starting with a letter or digit");
}
Status ValidateEnvName(std::string_view n) {
  return Check("environment", n, 63, Lower, [](char c) { return Lower(c) || c == '-' || c == '_'; },
               "lower-case letters, digits, '-' and '_', starting with a letter or digit");
}
Status ValidateSecretName(std::string_view n) {
  return Check("secret", n, 128, Alnum, [](char c) { return Alnum(c) || c == '-' || c == '_' || c == '.'; },
               "letters, digits, '-', '_' and '.', starting with a letter or digit");
}

Result<SecretPath> SecretPath::Parse(std::string_view text) {
  size_t a = text.find('/');
  size_t b = a == std::string_view::npos ? a : text.find('/', a + 1);
  if (b == std::string_view::npos || text.find('/', b + 1) != std::string_view::npos) {
    return Error(Category::kUsage, "secret path must be PROJECT/ENV/NAME");
  }
  SecretPath p{std::string(text.substr(0, a)), std::string(text.substr(a + 1, b - a - 1)),
               std::string(text.substr(b + 1))};
  CUSTODY_RETURN_IF_ERROR(ValidateProjectName(p.project));
  CUSTODY_RETURN_IF_ERROR(ValidateEnvName(p.environment));
  CUSTODY_RETURN_IF_ERROR(ValidateSecretName(p.name));
  return p;
}

Result<Scope> Scope::Parse(std::string_view text) {
  Scope s;
  if (text.empty()) return s;
  size_t a = text.find('/');
  s.project = std::string(text.substr(0, a));
  CUSTODY_RETURN_IF_ERROR(ValidateProjectName(*s.project));
  if (a != std::string_view::npos) {
    s.environment = std::string(text.substr(a + 1));
    CUSTODY_RETURN_IF_ERROR(ValidateEnvName(*s.environment));
  }
  return s;
}

}  // namespace custody::core
