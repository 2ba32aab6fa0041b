#include "custody/policy/model.h"

#include <charconv>

namespace custody::policy {

const char* RoleName(Role r) {
  switch (r) {
    case Role::kOwner: return "owner";
    case Role::kReader: return "reader";
    case Role::kAuditor: return "auditor";
    case Role::kCi: return "ci";
  }
  return "?";
}

const char* ActionName(Action a) {
  switch (a) {
    case Action::kGet: return "get";
    case Action::kPut: return "put";
    case Action::kList: return "list";
    case Action::kDelete: return "delete";
    case Action::kRotate: return "rotate";
    case Action::kCreateEnv: return "create-env";
    case Action::kManageMembers: return "manage-members";
    case Action::kReadUsage: return "read-usage";
    case Action::kReadAudit: return "read-audit";
    case Action::kApplyPolicy: return "apply-policy";
    case Action::kCreateProject: return "create-project";
  }
  return "?";
}

std::optional<Role> ParseRole(std::string_view s) {
  for (Role r : kAllRoles) {
    if (s == RoleName(r)) return r;
  }
  return std::nullopt;
}

std::optional<Action> ParseAction(std::string_view s) {
  for (Action a : kAllActions) {
    if (s == ActionName(a)) return a;
  }
  return std::nullopt;
}

std::optional<Rate> ParseRate(std::string_view text) {
  size_t slash = text.find('/');
  if (slash == std::string_view::npos || slash == 0) return std::nullopt;
  uint64_t n = 0;
  auto num = text.substr(0, slash);
  auto [p, ec] = std::from_chars(num.data(), num.data() + num.size(), n);
  if (ec != std::errc() || p != num.data() + num.size() || n == 0 || n > 1000000000) return std::nullopt;
  std::string_view unit = text.substr(slash + 1);
  uint64_t period = 0;
  if (unit == "s" || unit == "sec" || unit == "second") period = 1;
  else if (unit == "m" || unit == "min" || unit == "minute") period = 60;
  else if (unit == "h" || unit == "hour") period = 3600;
  else if (unit == "d" || unit == "day") period = 86400;
  else return std::nullopt;
  return Rate{n, period, std::string(text)};
}

}  // namespace custody::policy
