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

namespace {
struct Unit {
  char suffix;
  uint64_t seconds;
};
// Largest first: FormatDuration picks the largest unit that divides exactly.
constexpr Unit kUnits[] = {{'w', 604800}, {'d', 86400}, {'h', 3600}, {'m', 60}, {'s', 1}};
constexpr uint64_t kMaxDuration = uint64_t{100} * 365 * 86400;
}  // namespace

std::optional<uint64_t> ParseDuration(std::string_view text) {
  if (text.size() < 2) return std::nullopt;
  char suffix = text.back();
  auto num = text.substr(0, text.size() - 1);
  uint64_t n = 0;
  auto [p, ec] = std::from_chars(num.data(), num.data() + num.size(), n);
  if (ec != std::errc() || p != num.data() + num.size() || n == 0) return std::nullopt;
  for (const Unit& u : kUnits) {
    if (u.suffix != suffix) continue;
    if (n > kMaxDuration / u.seconds) return std::nullopt;
    return n * u.seconds;
  }
  return std::nullopt;
}

std::string FormatDuration(uint64_t seconds) {
  if (seconds == 0) return "0s";
  for (const Unit& u : kUnits) {
    if (seconds % u.seconds == 0) return std::to_string(seconds / u.seconds) + u.suffix;
  }
  return std::to_string(seconds) + "s";
}

namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

// The typed form of `value` under `type` (already lower-case), or nullopt
// for an unknown type or an empty value.
std::optional<std::string> Typed(std::string_view type, std::string_view value) {
  if (value.empty()) return std::nullopt;
  if (type == "dns") return "dns:" + Lower(value);
  if (type == "uri" || type == "email") return std::string(type) + ":" + std::string(value);
  return std::nullopt;
}

}  // namespace

std::optional<std::string> PolicyTlsSan(std::string_view text) {
  size_t colon = text.find(':');
  // A DNS name never holds ':'; a URI always does, so it needs its prefix.
  if (colon == std::string_view::npos) return Typed("dns", text);
  return Typed(Lower(text.substr(0, colon)), text.substr(colon + 1));
}

std::optional<std::string> CallerTlsSan(std::string_view typed) {
  size_t colon = typed.find(':');
  if (colon == std::string_view::npos) return std::nullopt;
  return Typed(typed.substr(0, colon), typed.substr(colon + 1));
}

bool ValidPrincipalName(std::string_view s) {
  size_t colon = s.find(':');
  if (colon == std::string_view::npos) return false;
  auto kind = s.substr(0, colon);
  if (kind != "user" && kind != "svc") return false;
  auto rest = s.substr(colon + 1);
  if (rest.empty() || rest.size() > 128) return false;
  for (char c : rest) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
              c == '.' || c == '@';
    if (!ok) return false;
  }
  return true;
}

}  // namespace custody::policy
