// `custody token issue|revoke|list`: the access tokens of the Vault-compatible
// API, for clients that can neither log in with a certificate nor use the
// Unix socket. Run in direct mode, through the same Custodian flow as
// custodyd: policy admins only, each use in the audit trail (by accessor).
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "custody/app/config.h"
#include "custody/common/names.h"
#include "custody/common/time.h"
#include "flow.h"
#include "io.h"

namespace custody::cli {
namespace {

using nlohmann::json;

// "90s", "30m", "1h", "7d" or plain seconds.
Result<int64_t> ParseTtl(std::string_view what, const std::string& text) {
  CUSTODY_RETURN_IF_ERROR(CheckArgText(what, text, 16));
  const size_t digits = text.find_first_not_of("0123456789");
  if (text.empty() || digits == 0) {
    return Error(Category::kUsage, std::string(what) + " must be a duration like 90s, 30m, 1h or 7d");
  }
  const std::string unit = digits == std::string::npos ? "s" : text.substr(digits);
  const int64_t scale = unit == "s" ? 1 : unit == "m" ? 60 : unit == "h" ? 3600 : unit == "d" ? 86400 : 0;
  if (digits == 0 || scale == 0 || (digits != std::string::npos && digits > 9)) {
    return Error(Category::kUsage, std::string(what) + " must be a duration like 90s, 30m, 1h or 7d");
  }
  const int64_t n = std::stoll(text.substr(0, digits)) * scale;
  if (n <= 0 || n > 366 * 86400) return Error(Category::kUsage, std::string(what) + " must be from 1s to 366d");
  return n;
}

Status WithTokens(const Globals& g, const std::string& action,
                  const std::function<Status(core::Custodian&, const core::RequestContext&, const core::Config&)>& fn) {
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, action));
  auto key = core::LoadAccessTokenKey(o.config);
  if (!key) return Finish(o, std::move(key).error());
  if (!*key) {
    return Finish(o, Error(Category::kConfig, "no access tokens: with a PostgreSQL store, name the same "
                                              "[server] token_key_file in every node's config"));
  }
  core::AccessTokens tokens(*o.store, std::move(**key));
  return WithCustodian(g, o, [&](core::Custodian& c, const core::RequestContext& rc) -> Status {
    c.SetAccessTokens(&tokens);
    return fn(c, rc, o.config);
  });
}

}  // namespace

Status TokenIssue(const Globals& g, const TokenIssueArgs& a) {
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--principal", a.principal, 128));
  std::optional<int64_t> asked_ttl, asked_max;
  if (!a.ttl.empty()) {
    CUSTODY_ASSIGN_OR_RETURN(asked_ttl, ParseTtl("--ttl", a.ttl));
  }
  if (a.max_ttl) {
    CUSTODY_ASSIGN_OR_RETURN(asked_max, ParseTtl("--max-ttl", *a.max_ttl));
  }
  if (asked_ttl && asked_max && *asked_max < *asked_ttl) return Error(Category::kUsage, "--max-ttl is shorter than --ttl");
  return WithTokens(g, "token.issue", [&](core::Custodian& c, const core::RequestContext& rc,
                                          const core::Config& config) -> Status {
    const int64_t ttl = asked_ttl.value_or(config.server.token_ttl_seconds);
    const int64_t max_ttl = asked_max.value_or(std::max<int64_t>(ttl, config.server.token_max_ttl_seconds));
    CUSTODY_ASSIGN_OR_RETURN(auto issued, c.IssueToken(rc, a.principal, ttl, max_ttl));
    const auto& r = issued.record;
    // The token goes to stdout once, straight from locked memory (write(2),
    // not stdio, whose buffer would keep a copy); what it is goes to
    // stderr, so `custody token issue ... > file` keeps only the token.
    std::string_view token = issued.token.RevealString(SecretAccess{});
    auto out = [](std::string_view s) -> Status {
      while (!s.empty()) {
        const ssize_t n = ::write(STDOUT_FILENO, s.data(), s.size());
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return Error::Os(errno, "cannot write the token to stdout");
        s.remove_prefix(static_cast<size_t>(n));
      }
      return Status::Ok();
    };
    std::fflush(stdout);
    if (g.json) {
      CUSTODY_RETURN_IF_ERROR(out("{\"token\":\""));
      CUSTODY_RETURN_IF_ERROR(out(token));
      CUSTODY_RETURN_IF_ERROR(out("\",\"accessor\":\"" + r.accessor + "\",\"principal\":" + json(r.principal).dump() +
                                  ",\"expires_at\":" + std::to_string(r.expires_at) +
                                  ",\"max_expires_at\":" + std::to_string(r.max_expires_at) + "}\n"));
    } else {
      CUSTODY_RETURN_IF_ERROR(out(token));
      CUSTODY_RETURN_IF_ERROR(out("\n"));
      std::fprintf(stderr, "token for %s, accessor %s, expires %s (renewable until %s); shown once\n",
                   r.principal.c_str(), r.accessor.c_str(), FormatTime(r.expires_at).c_str(),
                   FormatTime(r.max_expires_at).c_str());
    }
    return Status::Ok();
  });
}

Status TokenRevoke(const Globals& g, const std::string& accessor, const std::string& principal) {
  if (accessor.empty() == principal.empty()) {
    return Error(Category::kUsage, "name the token to revoke: --accessor A, or --principal P for all of theirs");
  }
  if (!accessor.empty() && (accessor.size() != 16 || accessor.find_first_not_of("0123456789abcdef") != std::string::npos)) {
    return Error(Category::kUsage, "--accessor is 16 lower-case hex digits, as `custody token list` shows");
  }
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--principal", principal, 128));
  return WithTokens(g, "token.revoke", [&](core::Custodian& c, const core::RequestContext& rc,
                                           const core::Config&) -> Status {
    CUSTODY_ASSIGN_OR_RETURN(size_t n, c.RevokeTokens(rc, accessor, principal));
    if (n == 0) {
      return Error(Category::kNotFound, accessor.empty() ? "no live token of " + principal
                                                         : "no live token with accessor " + accessor);
    }
    if (g.json) {
      PrintJson({{"revoked", n}});
    } else {
      std::printf("revoked %zu token(s)\n", n);
    }
    return Status::Ok();
  });
}

Status TokenList(const Globals& g) {
  return WithTokens(g, "token.list", [&](core::Custodian& c, const core::RequestContext& rc,
                                         const core::Config&) -> Status {
    CUSTODY_ASSIGN_OR_RETURN(auto all, c.ListTokens(rc));
    const int64_t now = SystemNow();
    auto state = [&](const core::AccessTokenRecord& t) -> std::string {
      if (t.revoked_at) return "revoked";
      return t.expires_at <= now ? "expired" : "live";
    };
    if (g.json) {
      json out = json::array();
      for (const auto& t : all) {
        out.push_back({{"accessor", t.accessor}, {"principal", t.principal}, {"issued_by", t.issued_by},
                       {"issued_at", t.issued_at}, {"expires_at", t.expires_at}, {"max_expires_at", t.max_expires_at},
                       {"state", state(t)}});
      }
      PrintJson(out);
      return Status::Ok();
    }
    std::vector<std::vector<std::string>> table{{"ACCESSOR", "PRINCIPAL", "STATE", "ISSUED", "EXPIRES", "ISSUED BY"}};
    for (const auto& t : all) {
      table.push_back({t.accessor, t.principal, state(t), FormatTime(t.issued_at), FormatTime(t.expires_at),
                       t.issued_by});
    }
    PrintTable(table);
    return Status::Ok();
  });
}

}  // namespace custody::cli
