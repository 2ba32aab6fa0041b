// The Vault-compatible API: the part of HashiCorp Vault's HTTP API that KV
// version 2 clients (hvac, the vault CLI, vault-agent, consul-template,
// External Secrets) need to read, list and write secrets. A KV v2 mount is
// a custody project: /v1/{project}/data/{env}/{name}. Every request goes
// through the same flow as the native API (policy, limits, durable audit
// record, unseal in the token, wipe); only the shapes differ. The table of
// what is offered and what is not is docs/VAULT_COMPAT.md.
// Private to the server library: included by routes.h only.
#pragma once

#include "session.h"

namespace custody::server {

namespace detail {

namespace vault {

inline std::string Quote(std::string_view s) { return json(std::string(s)).dump(-1, ' ', false, json::error_handler_t::replace); }

// Vault's times are RFC 3339 in UTC.
inline std::string Time(int64_t unix_seconds) { return unix_seconds > 0 ? FormatUtc(unix_seconds) : ""; }

// "30m", "1h", "90s", "3600" or a JSON number: seconds, or nullopt.
inline std::optional<int64_t> Duration(const json& v) {
  if (v.is_number_unsigned()) return static_cast<int64_t>(std::min<uint64_t>(v.get<uint64_t>(), 366ull * 86400));
  if (!v.is_string()) return std::nullopt;
  const std::string s = v.get<std::string>();
  if (s.empty() || s.size() > 12) return std::nullopt;
  size_t digits = s.find_first_not_of("0123456789");
  if (digits == 0) return std::nullopt;
  const int64_t n = std::stoll(s.substr(0, digits));
  const std::string unit = digits == std::string::npos ? "s" : s.substr(digits);
  const int64_t scale = unit == "s" ? 1 : unit == "m" ? 60 : unit == "h" ? 3600 : unit == "d" ? 86400 : 0;
  if (scale == 0) return std::nullopt;
  return std::min<int64_t>(n * scale, 366 * 86400);
}

// The policy names of a token's auth block: custody has one principal, not
// Vault policies; clients only show these.
inline json Policies(const std::string& principal) { return json::array({"default", principal}); }

inline json TokenData(const core::AccessTokenRecord& t, int64_t now) {
  return {{"accessor", t.accessor},
          {"creation_time", t.issued_at},
          {"creation_ttl", t.ttl},
          {"display_name", "custody-" + t.principal},
          {"entity_id", ""},
          {"expire_time", Time(t.expires_at)},
          {"explicit_max_ttl", t.max_expires_at - t.issued_at},
          {"issue_time", Time(t.issued_at)},
          {"meta", {{"principal", t.principal}}},
          {"num_uses", 0},
          {"orphan", true},
          {"path", t.issued_by.rfind("login ", 0) == 0 ? "auth/cert/login" : "auth/token/create"},
          {"policies", Policies(t.principal)},
          {"renewable", t.expires_at < t.max_expires_at},
          {"ttl", std::max<int64_t>(0, t.expires_at - now)},
          {"type", "service"}};
}

}  // namespace vault

template <typename StreamT>
http::response<http::string_body> Session<StreamT>::VaultJson(int status, const std::string& data_json,
                                                              const std::string& auth_json) {
  http::response<http::string_body> res{static_cast<http::status>(status), 11};
  res.set(http::field::content_type, "application/json");
  std::string& body = res.body();
  body.reserve(data_json.size() + auth_json.size() + 160);
  // The request id is custody's own hex: no escaping needed.
  body += "{\"request_id\":\"" + peer_.request_id +
          "\",\"lease_id\":\"\",\"renewable\":false,\"lease_duration\":0,\"data\":";
  body += data_json;
  body += ",\"wrap_info\":null,\"warnings\":null,\"auth\":";
  body += auth_json;
  body += "}\n";
  return res;
}

template <typename StreamT>
std::optional<http::response<http::string_body>> Session<StreamT>::UseToken(
    http::request<http::string_body>& req, std::optional<core::AccessTokenRecord>* used) {
  auto h = req.find("X-Vault-Token");
  if (h == req.end() || h->value().empty()) return std::nullopt;
  const std::string_view token(h->value().data(), h->value().size());
  // Not even a token's shape: refused here, counted in the peer's refusal
  // summary (no store query, no fsync'd record per stranger's guess).
  if (!core::AccessTokens::LooksLikeToken(token)) {
    decision_ = "deny";
    return Error(403, "the X-Vault-Token is not a custody access token", Category::kDenied);
  }
  token_used_ = true;  // peer_ changes: reset from conn_peer_ at the next request
  auto r = srv_.custodian.Authenticate(peer_, token, action_, project_, env_);
  if (!r) {
    audited_ = true;  // Authenticate wrote the refusal's record
    decision_ = "deny";
    // The reason is about the token (unknown, expired, revoked), never
    // about a project, and helps its holder: it is kept.
    return Error(r.error().category() == Category::kDenied ? 403 : r.error().http_status(), r.error().message(),
                 r.error().category());
  }
  // A client the transport did not identify (a TLS client without a
  // certificate, a uid the policy does not know) now is a principal: it
  // leaves the places strangers share.
  if (unidentified_ && srv_.Known(peer_)) {
    unidentified_ = false;
    srv_.unidentified.fetch_sub(1);
  }
  if (used != nullptr) *used = std::move(*r);
  return std::nullopt;
}

template <typename StreamT>
http::response<http::string_body> Session<StreamT>::VaultGetAnswer(Result<core::Unsealed>& u) {
  if (!u) {
    // A revoked or retired version reads as a destroyed one does in Vault:
    // 404, with its metadata and no data.
    if (auto gone = u.error().gone()) {
      decision_ = "deny";
      json meta{{"created_time", vault::Time(gone->created_at)},
                {"custom_metadata", nullptr},
                {"deletion_time", vault::Time(gone->gone_at)},
                {"destroyed", true},
                {"version", gone->version}};
      return VaultJson(404, "{\"data\":null,\"metadata\":" + meta.dump() + "}");
    }
    return FromError(u.error());
  }
  std::string_view value = u->value.RevealString(SecretAccess{});
  // Written by hand, as the rest of this answer: the hot path of every
  // Vault read (the fields are custody's own: a time and a number).
  const std::string meta = "{\"created_time\":\"" + vault::Time(u->created_at) +
                           "\",\"custom_metadata\":null,\"deletion_time\":\"\",\"destroyed\":false,\"version\":" +
                           std::to_string(u->version) + "}";
  const bool text = SendableAsJsonText(value);
  const std::string key = vault::Quote(text ? vault_key_ : vault_key_ + "_base64");
  // As GetAnswer: the value is written once, into a body reserved at its
  // largest size, and the body is wiped after it is sent.
  std::string data;
  if (text) {
    data.reserve(value.size() * 6 + key.size() + meta.size() + 40);
    data += "{\"data\":{" + key + ":\"";
    AppendJsonEscaped(data, value);
  } else {
    std::string encoded = Base64Encode(value);
    data.reserve(encoded.size() + key.size() + meta.size() + 40);
    data += "{\"data\":{" + key + ":\"";
    data += encoded;
    OPENSSL_cleanse(encoded.data(), encoded.size());
  }
  data += "\"},\"metadata\":" + meta + "}";
  auto res = VaultJson(200, data);
  OPENSSL_cleanse(data.data(), data.size());
  return res;
}

template <typename StreamT>
bool Session<StreamT>::Vault(http::request<http::string_body>& req, std::string_view path, std::string_view query,
                             std::optional<http::response<http::string_body>>& out) {
  constexpr std::string_view kV1 = "/v1/";
  if (path.substr(0, kV1.size()) != kV1) return false;
  const std::string_view rest = path.substr(kV1.size());
  const bool get = req.method() == http::verb::get;
  const bool write = req.method() == http::verb::post || req.method() == http::verb::put;
  const bool list = req.method_string() == "LIST" || (get && ("&" + std::string(query) + "&").find("&list=true&") !=
                                                                  std::string::npos);
  auto starts = [&](std::string_view p) { return rest.substr(0, p.size()) == p; };

  if (rest == "sys/health" && (get || req.method() == http::verb::head)) {
    vault_ = true;
    action_ = "health";
    const bool ok = srv_.CheckHealth().ok;
    // Vault's codes: 200 serving; 503 sealed (here: cannot serve now).
    out = Json(ok ? 200 : 503, {{"initialized", true},
                                {"sealed", !ok},
                                {"standby", false},
                                {"performance_standby", false},
                                {"replication_performance_mode", "disabled"},
                                {"replication_dr_mode", "disabled"},
                                {"server_time_utc", SystemNow()},
                                {"version", "custody-" + srv_.options.version},
                                {"cluster_name", "custody"},
                                {"cluster_id", ""},
                                {"node", srv_.options.node_name}});
    // HEAD (load balancers): the status alone. A body would be read as the
    // start of the next answer on a kept-alive connection.
    if (req.method() == http::verb::head) out->body().clear();
    return true;
  }
  constexpr std::string_view kMounts = "sys/internal/ui/mounts/";
  if (starts(kMounts)) {
    vault_ = true;
    action_ = "vault.mounts";
    const std::string_view after = rest.substr(kMounts.size());
    const std::string project(after.substr(0, after.find('/')));
    if (auto refused = UseToken(req)) {
      out = std::move(refused);
      return true;
    }
    // Only to a principal with a grant in the project (or a policy admin):
    // strangers learn no project names. Vault answers such a caller 403 too.
    auto authz = srv_.custodian.policy();
    auto who = authz->Identify(peer_.caller);
    const policy::Project* pj = core::ValidateProjectName(project).ok() ? authz->engine().FindProject(project) : nullptr;
    bool member = false;
    if (who && pj != nullptr) {
      member = authz->Allows(*who, policy::Action::kCreateProject, {});
      for (const auto& g : pj->grants) member = member || g.principal == authz->engine().PrincipalName(*who);
    }
    if (!member) {
      decision_ = "deny";
      out = Error(403, "permission denied (no such KV mount, or no grant in it)", Category::kDenied);
      return true;
    }
    project_ = project;
    out = VaultJson(200, json{{"accessor", "kv_custody_" + project},
                              {"config", {{"default_lease_ttl", 0}, {"force_no_cache", false}, {"max_lease_ttl", 0}}},
                              {"description", "custody project " + project},
                              {"external_entropy_access", false},
                              {"local", false},
                              {"options", {{"version", "2"}}},
                              {"path", project + "/"},
                              {"seal_wrap", false},
                              {"type", "kv"},
                              {"uuid", ""}}
                             .dump());
    return true;
  }
  if (starts("sys/")) {
    vault_ = true;
    action_ = "vault.other";
    out = Error(404, "custody offers sys/health and sys/internal/ui/mounts of Vault's sys API, no other",
                Category::kNotFound);
    return true;
  }

  if (starts("auth/")) {
    vault_ = true;
    const auto now = SystemNow();
    if (rest == "auth/cert/login") {
      action_ = "token.login";
      if (!write) {
        out = Error(405, "use POST for auth/cert/login");
        return true;
      }
      // The certificate is the credential: over the Unix socket there is
      // none, and the uid already decides there without a token.
      if (peer_.caller.tls_sans.empty() && !peer_.caller.tls_subject) {
        out = Error(400, "cert login needs a client certificate (mutual TLS); on the Unix socket send no token: "
                         "the peer's uid decides");
        return true;
      }
      audited_ = true;
      auto issued = srv_.custodian.Login(peer_, srv_.options.token_ttl_seconds, srv_.options.token_max_ttl_seconds);
      if (!issued) {
        out = FromError(issued.error());
        return true;
      }
      const auto& t = issued->record;
      json auth{{"accessor", t.accessor},
                {"policies", vault::Policies(t.principal)},
                {"token_policies", vault::Policies(t.principal)},
                {"metadata", {{"principal", t.principal}}},
                {"lease_duration", t.ttl},
                {"renewable", true},
                {"entity_id", ""},
                {"token_type", "service"},
                {"orphan", true},
                {"client_token", "@"}};
      // The token is spliced in where "@" stands, so no JSON writer holds a
      // copy of it; the body is wiped once sent.
      std::string a = auth.dump();
      const size_t at = a.find("\"@\"");
      std::string_view token = issued->token.RevealString(SecretAccess{});
      std::string spliced;
      spliced.reserve(a.size() + token.size());
      spliced.append(a, 0, at + 1).append(token).append(a, at + 2);
      out = VaultJson(200, "null", spliced);
      OPENSSL_cleanse(spliced.data(), spliced.size());
      return true;
    }
    const bool lookup = rest == "auth/token/lookup-self", renew = rest == "auth/token/renew-self";
    if (lookup || renew) {
      action_ = lookup ? "token.lookup" : "token.renew";
      if ((lookup && !get && !write) || (renew && !write)) {
        out = Error(405, lookup ? "use GET for auth/token/lookup-self" : "use POST for auth/token/renew-self");
        return true;
      }
      auto h = req.find("X-Vault-Token");
      if (h == req.end() || h->value().empty()) {
        out = Error(403, "permission denied: send the token in X-Vault-Token", Category::kDenied);
        return true;
      }
      std::optional<core::AccessTokenRecord> used;
      if (auto refused = UseToken(req, &used)) {
        out = std::move(refused);
        return true;
      }
      int64_t increment = 0;
      if (renew && !req.body().empty()) {
        json body = json::parse(req.body(), nullptr, /*allow_exceptions=*/false);
        std::optional<int64_t> inc;
        if (body.is_object() && body.contains("increment")) inc = vault::Duration(body["increment"]);
        if (!body.is_object() || (body.contains("increment") && !inc)) {
          out = Error(400, "the body must be {\"increment\": \"1h\"} (or a number of seconds)");
          return true;
        }
        increment = inc.value_or(0);
      }
      auto r = lookup ? srv_.custodian.LookupSelf(peer_, *used)
                      : srv_.custodian.RenewSelf(peer_, std::string_view(h->value().data(), h->value().size()),
                                                 increment);
      if (!r) {
        out = FromError(r.error());
        return true;
      }
      if (lookup) {
        out = VaultJson(200, vault::TokenData(*r, now).dump());
      } else {
        out = VaultJson(200, "null",
                        json{{"accessor", r->accessor},
                             {"policies", vault::Policies(r->principal)},
                             {"token_policies", vault::Policies(r->principal)},
                             {"metadata", {{"principal", r->principal}}},
                             {"lease_duration", std::max<int64_t>(0, r->expires_at - now)},
                             {"renewable", r->expires_at < r->max_expires_at},
                             {"entity_id", ""},
                             {"token_type", "service"},
                             {"orphan", true}}
                            .dump());
      }
      return true;
    }
    action_ = "vault.other";
    out = Error(404, "custody offers auth/cert/login, auth/token/lookup-self and auth/token/renew-self, no other",
                Category::kNotFound);
    return true;
  }

  // KV v2: {project}/data/... and {project}/metadata/...
  const size_t slash = rest.find('/');
  if (slash == std::string_view::npos) return false;
  const std::string project(rest.substr(0, slash));
  // custody's own paths win: a project of these names has no Vault mount.
  if (project == "secrets" || project == "usage" || project == "health") return false;
  if (!core::ValidateProjectName(project).ok()) return false;
  std::string_view tail = rest.substr(slash + 1);
  const std::string_view kind = tail.substr(0, tail.find('/'));
  if (kind != "data" && kind != "metadata" && kind != "delete" && kind != "undelete" && kind != "destroy" &&
      kind != "config" && kind != "subkeys") {
    return false;
  }
  vault_ = true;
  peer_.via = "custodyd vault-api";
  project_ = project;
  {
    auto authz = srv_.custodian.policy();
    const policy::Project* pj = authz->engine().FindProject(project);
    vault_key_ = pj != nullptr ? pj->vault_value_key : "value";
  }
  const std::string_view sub = tail.size() > kind.size() ? tail.substr(kind.size() + 1) : std::string_view();
  if (kind != "data" && kind != "metadata" && kind != "destroy") {
    action_ = "vault.other";
    out = Error(405, "custody does not " + std::string(kind) +
                         " through the Vault API: versions are withdrawn with destroy (or 'custody secret revoke')");
    return true;
  }

  if (kind == "metadata" && list) {
    action_ = "secret.list";
    // "" (the mount: its environments) or "ENV" / "ENV/" (its secrets).
    std::string env(sub);
    if (!env.empty() && env.back() == '/') env.pop_back();
    if (!env.empty() && !core::ValidateProjectName(env).ok()) {
      out = Error(404, "", Category::kNotFound);
      return true;
    }
    env_ = env;
    if (auto refused = UseToken(req)) {
      out = std::move(refused);
      return true;
    }
    audited_ = true;
    auto rows = srv_.custodian.List(peer_, project, env);
    if (!rows) {
      out = FromError(rows.error());
      return true;
    }
    std::vector<std::string> keys;
    for (const auto& r : *rows) keys.push_back(env.empty() ? r.environment + "/" : r.name);
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    // Vault answers an empty folder with 404.
    out = keys.empty() ? Error(404, "", Category::kNotFound) : VaultJson(200, json{{"keys", keys}}.dump());
    return true;
  }

  auto sp = core::SecretPath::Parse(project + "/" + std::string(sub));
  if (!sp) {
    out = FromError(sp.error());
    return true;
  }
  env_ = sp->environment;

  if (kind == "destroy") {
    // Vault's destroy: {"versions": [N, ...]} withdrawn for good, which is
    // custody's revoke (a destroyed version reads as revoked, and back).
    // Idempotent as in Vault: a version already revoked is left as it is.
    action_ = "secret.revoke";
    if (req.method() != http::verb::post && req.method() != http::verb::put) {
      out = Error(405, "use POST or PUT for destroy");
      return true;
    }
    if (auto refused = UseToken(req)) {
      out = std::move(refused);
      return true;
    }
    // No value travels in this body: parsed as a whole, without throwing.
    const json body = json::parse(req.body(), nullptr, /*allow_exceptions=*/false);
    std::vector<uint32_t> versions;
    const bool shaped = body.is_object() && body.contains("versions") && body["versions"].is_array() &&
                        !body["versions"].empty() && body["versions"].size() <= 100;
    if (shaped) {
      for (const auto& v : body["versions"]) {
        if (!v.is_number_unsigned() || v.get<uint64_t>() == 0 || v.get<uint64_t>() > UINT32_MAX) {
          versions.clear();
          break;
        }
        versions.push_back(static_cast<uint32_t>(v.get<uint64_t>()));
      }
    }
    if (versions.empty()) {
      out = Error(400, "the body must be {\"versions\": [N, ...]}: 1 to 100 positive version numbers");
      return true;
    }
    std::sort(versions.begin(), versions.end());
    versions.erase(std::unique(versions.begin(), versions.end()), versions.end());
    audited_ = true;
    // One record per version. Every version named must exist, checked
    // before the first changes (400 naming the one that does not: Vault's
    // 404 carries no words); a failure after that (the store lost) stops
    // there and says which versions were withdrawn (those stay withdrawn).
    std::string done;
    for (size_t i = 0; i < versions.size(); ++i) {
      auto r = srv_.custodian.Revoke(peer_, *sp, versions[i], "destroyed through the Vault API", /*already_ok=*/true,
                                     i == 0 ? versions : std::vector<uint32_t>{});
      if (!r) {
        custody::Error e = r.error();
        if (!done.empty()) {
          e = custody::Error(e.category(), e.message() + " (destroyed before it: version(s) " + done + ")");
        }
        out = FromError(e);
        return true;
      }
      done += (done.empty() ? "" : ", ") + std::to_string(versions[i]);
    }
    http::response<http::string_body> res{http::status::no_content, 11};
    out = std::move(res);
    return true;
  }

  if (kind == "metadata") {
    action_ = "secret.metadata";
    if (!get) {
      out = Error(405, "custody offers GET and LIST on metadata: metadata is not written through the Vault API");
      return true;
    }
    if (auto refused = UseToken(req)) {
      out = std::move(refused);
      return true;
    }
    audited_ = true;
    auto versions = srv_.custodian.Versions(peer_, *sp);
    if (!versions) {
      out = FromError(versions.error());
      return true;
    }
    json all = json::object();
    uint32_t current = 0, oldest = UINT32_MAX, newest = 0;
    int64_t first = 0, updated = 0;
    for (const auto& v : *versions) {
      all[std::to_string(v.version)] = {{"created_time", vault::Time(v.created_at)},
                                        {"deletion_time", vault::Time(v.revoked_at.value_or(0))},
                                        {"destroyed", v.revoked_at.has_value()}};
      current = v.current_version;
      oldest = std::min(oldest, v.version);
      if (v.version > newest) {
        newest = v.version;
        updated = v.created_at;
      }
      if (first == 0 || v.created_at < first) first = v.created_at;
    }
    out = VaultJson(200, json{{"cas_required", false},
                              {"created_time", vault::Time(first)},
                              {"current_version", current},
                              {"custom_metadata", nullptr},
                              {"delete_version_after", "0s"},
                              {"max_versions", 0},
                              {"oldest_version", oldest},
                              {"updated_time", vault::Time(updated)},
                              {"versions", all}}
                             .dump());
    return true;
  }

  // kind == "data"
  if (get) {
    action_ = "secret.get";
    std::optional<uint32_t> version;
    const std::string q = "&" + std::string(query) + "&";
    if (size_t at = q.find("&version="); at != std::string::npos) {
      const std::string v = q.substr(at + 9, q.find('&', at + 9) - (at + 9));
      char* end = nullptr;
      unsigned long n = std::strtoul(v.c_str(), &end, 10);
      // Vault reads version=0 as the current one.
      if (v.empty() || *end != '\0' || n > UINT32_MAX) {
        out = Error(400, "version must be a number");
        return true;
      }
      if (n > 0) version = static_cast<uint32_t>(n);
    }
    if (auto refused = UseToken(req)) {
      out = std::move(refused);
      return true;
    }
    StartGet(*sp, version);
    out = std::nullopt;
    return true;
  }
  if (!write) {
    action_ = "vault.other";
    out = Error(405, "use GET to read and POST or PUT to write " + std::string(kind) + " paths");
    return true;
  }
  action_ = "secret.put";
  if (auto refused = UseToken(req)) {
    out = std::move(refused);
    return true;
  }
  // Parsed in place, as the native PUT: the value is copied once, into
  // locked memory; the body is wiped after the answer.
  auto body = InPlaceJson::Parse(req.body());
  const std::string shape = "the body must be {\"data\": {\"" + vault_key_ + "\": \"...\"}}";
  if (!body) {
    out = Error(400, shape + ": " + body.error().message());
    return true;
  }
  auto keys = body->ObjectKeys("data");
  if (!keys || keys->size() != 1 || (*keys)[0] != vault_key_) {
    out = Error(400, shape + " (custody keeps one value per secret, under \"" + vault_key_ + "\")");
    return true;
  }
  auto text = body->String("data", vault_key_);
  if (!text) {
    out = Error(400, shape + " with a string value");
    return true;
  }
  // Check-and-set as Vault has it: options.cas = 0 writes only if the
  // secret has no version yet, N only if N is its newest version.
  std::optional<uint32_t> cas;
  if (auto opts = body->ObjectKeys("options"); opts && std::find(opts->begin(), opts->end(), "cas") != opts->end()) {
    auto n = body->Uint("options", "cas");
    if (!n || *n > UINT32_MAX) {
      out = Error(400, "options.cas must be a version number (0: only if the secret has no version yet)");
      return true;
    }
    cas = static_cast<uint32_t>(*n);
  }
  SecretBuffer value = SecretBuffer::Copy(*text);
  if (value.size() > core::kMaxSecretSize) {
    out = Error(413, "the value is larger than 65536 bytes");
    return true;
  }
  audited_ = true;
  auto v = srv_.custodian.Put(peer_, *sp, value, "", nullptr, cas);
  if (!v) {
    // Vault's own words for a failed check-and-set, with a 400 as Vault's.
    out = v.error().precondition_failed()
              ? Error(400, "check-and-set parameter did not match the current version (" + v.error().message() + ")")
              : FromError(v.error());
    return true;
  }
  out = VaultJson(200, json{{"created_time", vault::Time(SystemNow())},
                            {"custom_metadata", nullptr},
                            {"deletion_time", ""},
                            {"destroyed", false},
                            {"version", *v}}
                           .dump());
  return true;
}

}  // namespace detail

}  // namespace custody::server
