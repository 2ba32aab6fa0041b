#include "custody/policy/parse.h"

#include <charconv>
#include <map>
#include <set>
#include <toml++/toml.h>


namespace custody::policy {
namespace {

class Parser {
 public:
  explicit Parser(std::string_view file) : file_(file) {}

  void Error(const toml::source_region& at, const std::string& message) {
    errors_.push_back(file_ + ":" + std::to_string(at.begin.line) + ":" + std::to_string(at.begin.column) + ": " +
                      message);
  }
  void Error(const Location& at, const std::string& message) {
    errors_.push_back(file_ + ":" + std::to_string(at.line) + ":" + std::to_string(at.column) + ": " + message);
  }
  static Location Loc(const toml::node& n) {
    return Location{static_cast<int>(n.source().begin.line), static_cast<int>(n.source().begin.column)};
  }

  // Unknown keys are errors: a typo in a security policy must not be ignored.
  void OnlyKeys(const toml::table& t, std::initializer_list<std::string_view> allowed, const std::string& where) {
    for (const auto& [k, v] : t) {
      bool ok = false;
      for (auto a : allowed) ok = ok || k.str() == a;
      if (!ok) {
        std::string list;
        for (auto a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
        Error(v.source(), "unknown key '" + std::string(k.str()) + "' in " + where + " (allowed: " + list + ")");
      }
    }
  }

  std::optional<std::string> String(const toml::node& n, const std::string& what) {
    if (auto s = n.value<std::string>()) return *s;
    Error(n.source(), what + " must be a string");
    return std::nullopt;
  }

  std::vector<std::pair<std::string, Location>> Strings(const toml::node& n, const std::string& what) {
    std::vector<std::pair<std::string, Location>> out;
    if (const toml::array* a = n.as_array()) {
      for (const auto& e : *a) {
        if (auto s = e.value<std::string>()) out.emplace_back(*s, Loc(e));
        else Error(e.source(), what + " must be a list of strings");
      }
    } else if (auto s = n.value<std::string>()) {
      out.emplace_back(*s, Loc(n));
    } else {
      Error(n.source(), what + " must be a string or a list of strings");
    }
    return out;
  }

  std::optional<uint64_t> Count(const toml::node& n, const std::string& what) {
    if (auto v = n.value_exact<int64_t>(); v && *v > 0) return static_cast<uint64_t>(*v);
    Error(n.source(), what + " must be a positive whole number");
    return std::nullopt;
  }

  void ParseLimits(const toml::table& t, Limits& limits, const std::string& where) {
    auto rate = [&](const char* key, std::optional<Rate>& out) {
      if (const toml::node* n = t.get(key)) {
        if (auto s = String(*n, where + "." + key)) {
          out = ParseRate(*s);
          if (!out) {
            Error(n->source(), "invalid rate '" + *s + "' for " + where + "." + key +
                                   ": write it like 600/min (units: sec, min, hour, day)");
          }
        }
      }
    };
    rate("rate", limits.rate);
    rate("principal_rate", limits.principal_rate);
    if (const toml::node* n = t.get("unseals_per_day")) limits.unseals_per_day = Count(*n, where + ".unseals_per_day");
    if (const toml::node* n = t.get("unseals_per_month")) {
      limits.unseals_per_month = Count(*n, where + ".unseals_per_month");
    }
  }

  void ParseRotation(const toml::table& t, Rotation& r, const std::string& where) {
    auto duration = [&](const char* key, std::optional<uint64_t>& out) {
      if (const toml::node* n = t.get(key)) {
        if (auto s = String(*n, where + "." + key)) {
          out = ParseDuration(*s);
          if (!out) {
            Error(n->source(), "invalid duration '" + *s + "' for " + where + "." + key +
                                   ": write it like 90d (units: s, m, h, d, w)");
          }
        }
      }
    };
    duration("max_age", r.max_age);
    duration("grace", r.grace);
    duration("warn_before", r.warn_before);
    if (const toml::node* n = t.get("keep_versions")) {
      auto v = n->value_exact<int64_t>();
      if (v && *v >= 1 && *v <= 10000) {
        r.keep_versions = static_cast<uint32_t>(*v);
      } else {
        Error(n->source(), where + ".keep_versions must be a whole number from 1 to 10000");
      }
    }
    if (r.max_age && r.warn_before && *r.warn_before >= *r.max_age) {
      Error(t.source(), where + ".warn_before (" + FormatDuration(*r.warn_before) + ") must be shorter than max_age (" +
                            FormatDuration(*r.max_age) + ")");
    }
  }

  static bool ValidName(std::string_view s) {
    if (s.empty() || s.size() > 63) return false;
    auto lower = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
    if (!lower(s[0])) return false;
    for (char c : s) {
      if (!lower(c) && c != '-' && c != '_') return false;
    }
    return true;
  }

  void ParsePrincipal(const std::string& name, const toml::node& node, Policy& p) {
    Principal pr;
    pr.name = name;
    pr.where = Loc(node);
    if (!ValidPrincipalName(name)) {
      Error(node.source(), "principal name '" + name + "' must be user:NAME or svc:NAME");
    }
    const toml::table* t = node.as_table();
    if (t == nullptr) {
      Error(node.source(), "principals." + name + " must be a table");
      return;
    }
    OnlyKeys(*t, {"unix_user", "uid", "gid", "tls_san", "tls_subject"}, "principal " + name);
    bool refused_san = false;
    for (const auto& [key, v] : *t) {
      std::string k(key.str());
      if (k == "uid" || k == "gid") {
        auto add = [&](const toml::node& e) {
          if (auto id = e.value_exact<int64_t>(); id && *id >= 0 && *id <= 4294967294LL) {
            pr.identities.push_back({k == "uid" ? IdentityKind::kUid : IdentityKind::kGid, std::to_string(*id), Loc(e)});
          } else {
            Error(e.source(), name + "." + k + " must be a number from 0 to 4294967294");
          }
        };
        if (const toml::array* a = v.as_array()) {
          for (const auto& e : *a) add(e);
        } else {
          add(v);
        }
      } else if (k == "unix_user" || k == "tls_san" || k == "tls_subject") {
        IdentityKind kind = k == "unix_user" ? IdentityKind::kUnixUser
                            : k == "tls_san" ? IdentityKind::kTlsSan
                                             : IdentityKind::kTlsSubject;
        for (auto& [s, loc] : Strings(v, name + "." + k)) {
          if (s.empty()) {
            Error(loc, name + "." + k + " is empty");
          } else if (kind != IdentityKind::kTlsSan) {
            pr.identities.push_back({kind, s, loc});
          } else if (auto typed = PolicyTlsSan(s)) {
            // Typed and normalised here, so the overlap check below and the
            // engine compare like with like.
            pr.identities.push_back({kind, *typed, loc});
          } else {
            refused_san = true;
            Error(loc, "tls_san '" + s + "' of principal " + name +
                           " is not a SAN custody can match: write dns:NAME (or a bare NAME), uri:URI or email:ADDRESS");
          }
        }
      }
    }
    if (pr.identities.empty() && !refused_san) {
      Error(node.source(), "principal " + name + " has no identity (unix_user, uid, gid, tls_san or tls_subject)");
    }
    p.principals.push_back(std::move(pr));
  }

  void ParseProject(const std::string& name, const toml::node& node, Policy& p) {
    Project pj;
    pj.name = name;
    pj.where = Loc(node);
    if (!ValidName(name)) {
      Error(node.source(), "project name '" + name + "' is not allowed: use lower-case letters, digits, '-' and '_'");
    }
    const toml::table* t = node.as_table();
    if (t == nullptr) {
      Error(node.source(), "projects." + name + " must be a table");
      return;
    }
    std::string where = "projects." + name;
    OnlyKeys(*t, {"rate", "principal_rate", "unseals_per_day", "unseals_per_month", "max_age", "grace", "warn_before",
                  "keep_versions", "environments", "grants", "vault_value_key"},
             where);
    if (const toml::node* n = t->get("vault_value_key")) {
      // The key a Vault KV v2 client finds the value under (data.data.KEY):
      // a JSON object key clients type in code, so a plain identifier.
      auto v = n->value<std::string>();
      if (!v || v->empty() || v->size() > 64 ||
          v->find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.") !=
              std::string::npos) {
        Error(n->source(), where + ".vault_value_key must be 1 to 64 of A-Z a-z 0-9 _ - .");
      } else {
        pj.vault_value_key = *v;
      }
    }
    ParseLimits(*t, pj.limits, where);
    ParseRotation(*t, pj.rotation, where);
    if (const toml::node* envs = t->get("environments")) {
      if (const toml::table* et = envs->as_table()) {
        for (const auto& [ek, ev] : *et) ParseEnvironment(std::string(ek.str()), ev, pj);
      } else {
        Error(envs->source(), where + ".environments must be a table of environments");
      }
    }
    if (pj.environments.empty()) Error(node.source(), "project " + name + " has no environments");
    if (const toml::node* grants = t->get("grants")) {
      if (const toml::array* ga = grants->as_array()) {
        for (const auto& g : *ga) ParseGrant(g, pj);
      } else {
        Error(grants->source(), where + ".grants must be an array of tables ([[" + where + ".grants]])");
      }
    }
    p.projects.push_back(std::move(pj));
  }

  void ParseEnvironment(const std::string& name, const toml::node& node, Project& pj) {
    Environment e;
    e.name = name;
    e.where = Loc(node);
    std::string where = "projects." + pj.name + ".environments." + name;
    if (!ValidName(name)) {
      Error(node.source(), "environment name '" + name + "' is not allowed: use lower-case letters, digits, '-' and '_'");
    }
    const toml::table* t = node.as_table();
    if (t == nullptr) {
      Error(node.source(), where + " must be a table");
      return;
    }
    OnlyKeys(*t, {"production", "token", "rate", "principal_rate", "unseals_per_day", "unseals_per_month", "max_age",
                  "grace", "warn_before", "keep_versions"},
             where);
    // Production unless said otherwise: forgetting the flag must not open an
    // environment to ci.
    e.production = true;
    if (const toml::node* n = t->get("production")) {
      if (auto b = n->value<bool>()) e.production = *b;
      else Error(n->source(), where + ".production must be true or false");
    }
    if (const toml::node* n = t->get("token")) {
      if (auto s = String(*n, where + ".token")) {
        if (s->rfind("pkcs11:", 0) != 0) Error(n->source(), where + ".token must be a pkcs11: URI");
        else e.token_uri = *s;
      }
    }
    ParseLimits(*t, e.limits, where);
    ParseRotation(*t, e.rotation, where);
    pj.environments.push_back(std::move(e));
  }

  void ParseGrant(const toml::node& node, Project& pj) {
    Grant g;
    g.where = Loc(node);
    const toml::table* t = node.as_table();
    if (t == nullptr) {
      Error(node.source(), "each grant in project " + pj.name + " must be a table");
      return;
    }
    std::string where = "a grant of project " + pj.name;
    OnlyKeys(*t, {"principal", "role", "environments", "secrets"}, where);
    if (const toml::node* n = t->get("principal")) {
      if (auto s = String(*n, "principal")) g.principal = *s;
    } else {
      Error(node.source(), where + " has no principal");
    }
    if (const toml::node* n = t->get("role")) {
      if (auto s = String(*n, "role")) {
        if (auto r = ParseRole(*s)) g.role = *r;
        else Error(n->source(), "unknown role '" + *s + "' (roles: owner, reader, auditor, ci)");
      }
    } else {
      Error(node.source(), where + " has no role");
    }
    if (const toml::node* n = t->get("environments")) {
      for (auto& [s, loc] : Strings(*n, "environments")) {
        (void)loc;
        g.environments.push_back(s);
      }
    }
    if (const toml::node* n = t->get("secrets")) {
      for (auto& [s, loc] : Strings(*n, "secrets")) {
        if (s.empty()) Error(loc, "an empty secret pattern matches nothing");
        g.secrets.push_back(s);
      }
    }
    pj.grants.push_back(std::move(g));
  }

  // Cross-references, once everything is read.
  void Check(Policy& p) {
    std::set<std::string> principals;
    for (const auto& pr : p.principals) principals.insert(pr.name);
    for (size_t i = 0; i < p.admins.size(); ++i) {
      if (!principals.count(p.admins[i])) Error(admin_locs_[i], "admin '" + p.admins[i] + "' is not a declared principal");
    }
    // One identity, one principal.
    std::map<std::pair<IdentityKind, std::string>, const Principal*> seen;
    for (const auto& pr : p.principals) {
      for (const auto& id : pr.identities) {
        auto [it, fresh] = seen.emplace(std::make_pair(id.kind, id.value), &pr);
        if (!fresh && it->second != &pr) {
          Error(id.where, "identity " + id.value + " of " + pr.name + " is already " + it->second->name +
                              "'s (line " + std::to_string(it->second->where.line) +
                              "); one identity must map to one principal");
        }
      }
    }
    for (auto& pj : p.projects) {
      for (const auto& g : pj.grants) {
        if (!g.principal.empty() && !principals.count(g.principal)) {
          Error(g.where, "grant in project " + pj.name + " names unknown principal '" + g.principal + "'");
        }
        for (const auto& en : g.environments) {
          const Environment* env = nullptr;
          for (const auto& e : pj.environments) {
            if (e.name == en) env = &e;
          }
          if (env == nullptr) {
            Error(g.where, "grant in project " + pj.name + " names unknown environment '" + en + "'");
          } else if (g.role == Role::kCi && env->production) {
            Error(g.where, "grant gives role ci in production environment " + pj.name + "/" + en +
                               "; ci only reaches environments marked production = false");
          }
        }
      }
    }
  }

  ParseResult Run(std::string_view text) {
    ParseResult out;
    toml::table root;
    try {
      root = toml::parse(text, file_);
    } catch (const toml::parse_error& e) {
      Error(e.source(), std::string(e.description()));
      out.errors = std::move(errors_);
      return out;
    }
    Policy p;
    OnlyKeys(root, {"version", "admins", "principals", "projects"}, "the policy");
    if (const toml::node* v = root.get("version")) {
      if (v->value_exact<int64_t>() != 1) Error(v->source(), "version must be 1");
    } else {
      Error(root.source(), "missing 'version = 1' at the top of the policy");
    }
    if (const toml::node* a = root.get("admins")) {
      for (auto& [s, loc] : Strings(*a, "admins")) {
        p.admins.push_back(s);
        admin_locs_.push_back(loc);
      }
    }
    if (const toml::node* ps = root.get("principals")) {
      if (const toml::table* t = ps->as_table()) {
        for (const auto& [k, v] : *t) ParsePrincipal(std::string(k.str()), v, p);
      } else {
        Error(ps->source(), "principals must be a table ([principals.\"user:alice\"])");
      }
    }
    if (const toml::node* pj = root.get("projects")) {
      if (const toml::table* t = pj->as_table()) {
        for (const auto& [k, v] : *t) ParseProject(std::string(k.str()), v, p);
      } else {
        Error(pj->source(), "projects must be a table ([projects.NAME])");
      }
    }
    Check(p);
    if (errors_.empty()) out.policy = std::move(p);
    out.errors = std::move(errors_);
    return out;
  }

 private:
  std::string file_;
  std::vector<std::string> errors_;
  std::vector<Location> admin_locs_;
};

}  // namespace

ParseResult ParsePolicy(std::string_view text, std::string_view file_name) {
  return Parser(file_name).Run(text);
}

}  // namespace custody::policy
