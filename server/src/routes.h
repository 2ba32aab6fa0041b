// The HTTP routing of a Session: what each method and path means, and the
// answers (a secret's value, an error, JSON).
// Private to the server library: included by its own sources only.
#pragma once

#include "custody/common/time.h"
#include "session.h"

namespace custody::server {

namespace detail {

// A version sent as a strong entity tag, the form GET's ETag has: "N",
// N in 1..2^32-1 in plain decimal. Anything else (weak tags W/"N", lists,
// *, leading zeros or signs) is refused by the caller: a check-and-set
// must name one version exactly.
inline std::optional<uint32_t> ParseVersionTag(std::string_view tag) {
  if (tag.size() < 3 || tag.size() > 12 || tag.front() != '"' || tag.back() != '"') return std::nullopt;
  const std::string_view digits = tag.substr(1, tag.size() - 2);
  if (digits.front() == '0') return std::nullopt;
  uint64_t n = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  if (n > UINT32_MAX) return std::nullopt;
  return static_cast<uint32_t>(n);
}

// GET of a secret: everything up to the audit record runs here; the wait
// for the record's fsync holds no server thread, so every request in
// flight shares one fsync. The answer is built back on the server's
// threads once the record is durable (and never if it is not).
template <typename StreamT>
void Session<StreamT>::StartGet(const core::SecretPath& sp, std::optional<uint32_t> version) {
  audited_ = true;
  // Alone in flight, and another thread to serve whoever comes meanwhile:
  // this thread writes the record itself if the log is idle (the hand-offs
  // to the writer thread and back cost a lone GET on an idle machine more
  // than the fsync). A disk that stops answering holds at most this one
  // thread: the next GETs find the batch under way and queue behind it.
  // Under load the writer thread batches the records, and no request
  // thread waits for the disk.
  const bool alone = srv_.pending_audits.fetch_add(1) == 0 && srv_.threads > 1;
  srv_.custodian.GetAsync(peer_, sp, version, [self = this->shared_from_this(), sp](Result<core::Unsealed> u) {
    // Counted down however this ends, an answer that throws included: a
    // count left up would make no GET `alone` again and hold Run()'s end
    // to its deadline. After the post below, so that Run() never sees zero
    // while an answer is still on its way to the loop.
    struct Settled {
      std::atomic<int>& pending;
      ~Settled() { pending.fetch_sub(1); }
    } settled{self->srv_.pending_audits};
    auto got = std::make_shared<Result<core::Unsealed>>(std::move(u));
    auto answer = [self, got, sp] {
      self->Answer(self->vault_ ? self->VaultGetAnswer(*got) : self->GetAnswer(sp, *got));
    };
    // When this thread wrote the record itself (`alone`), it is still
    // inside this session's handler, on its strand: answer here and now. A
    // post would queue the answer behind that handler, and the strand would
    // hand it to the io_context with a wake-up of another server thread (an
    // epoll interrupt, two context switches) to do the write this thread
    // can do. Safe because StartGet's callers return at once and touch no
    // member after it. Any other thread posts: the audit writer, and also a
    // thread that led a batch for a PUT or a checkpoint, which must not
    // write other sessions' answers one after another on its own (what
    // asio::dispatch would do whenever their strands are idle).
    auto ex = self->stream_.get_executor();
    const auto* strand = ex.template target<asio::strand<asio::io_context::executor_type>>();
    if (strand != nullptr && strand->running_in_this_thread()) {
      answer();
    } else {
      asio::post(ex, std::move(answer));
    }
  }, alone);
}

template <typename StreamT>
http::response<http::string_body> Session<StreamT>::GetAnswer(const core::SecretPath& sp, Result<core::Unsealed>& u) {
  if (!u) return FromError(u.error());
  std::string_view value = u->value.RevealString(SecretAccess{});
  // Written straight into a body reserved at its largest size: no JSON
  // writer's buffer and no reallocation leaves a copy of the value behind.
  // The body is wiped after it is written (see OnWrite).
  const std::string path = json(sp.str()).dump();
  const std::string version = std::to_string(u->version);
  http::response<http::string_body> res{http::status::ok, 11};
  res.set(http::field::content_type, "application/json");
  // The version as a strong entity tag: a client that read it can put the
  // next value with If-Match and lose no concurrent writer's version.
  res.set(http::field::etag, "\"" + version + "\"");
  std::string& body = res.body();
  // (A looser text check once let an overlong UTF-8 form through, and the
  // JSON writer threw on it: one stored value could stop the server.)
  if (SendableAsJsonText(value)) {
    body.reserve(value.size() * 6 + path.size() + version.size() + 48);
    body += "{\"path\":" + path + ",\"value\":\"";
    AppendJsonEscaped(body, value);
  } else {
    std::string encoded = Base64Encode(value);
    body.reserve(encoded.size() + path.size() + version.size() + 48);
    body += "{\"path\":" + path + ",\"value_base64\":\"";
    body += encoded;
    OPENSSL_cleanse(encoded.data(), encoded.size());
  }
  body += "\",\"version\":" + version + "}\n";
  return res;
}

template <typename StreamT>
http::response<http::string_body> Session<StreamT>::Error(int status, const std::string& message, Category category,
                                        uint64_t retry_after) {
  if (decision_ == "allow") decision_ = "error";
  http::response<http::string_body> res{static_cast<http::status>(status), 11};
  res.set(http::field::content_type, "application/json");
  if (vault_) {
    // Vault's shape: {"errors": [...]}, and Retry-After as a header only.
    if (retry_after > 0) res.set(http::field::retry_after, std::to_string(retry_after));
    json errors = json::array();
    if (!message.empty()) errors.push_back(ValidUtf8(message));
    res.body() = json{{"errors", errors}}.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
    return res;
  }
  // A message may quote what a caller sent (a certificate's SAN in "... is
  // not a principal"): bytes that are not UTF-8 are shown as \xHH.
  json body{{"error", ValidUtf8(message)}, {"category", std::string(CategoryName(category))}, {"status", status}};
  if (retry_after > 0) {
    res.set(http::field::retry_after, std::to_string(retry_after));
    body["retry_after_seconds"] = retry_after;
  }
  res.body() = body.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  return res;
}

template <typename StreamT>
http::response<http::string_body> Session<StreamT>::FromError(const custody::Error& e) {
  decision_ = e.category() == Category::kDenied  ? "deny"
              : e.category() == Category::kLimit ? "limit"
                                                 : "error";
  int status = e.http_status();
  // Vault answers every refusal of identity or policy with 403 and only
  // "permission denied" (which project exists, and what the policy says,
  // are in the audit record, not in the answer), and a read of nothing
  // with 404 and no message.
  if (vault_ && e.category() == Category::kDenied) {
    return Error(403, "permission denied", Category::kDenied);
  }
  if (vault_ && e.category() == Category::kNotFound) {
    return Error(404, "", Category::kNotFound);
  }
  uint64_t retry = e.retry_after().value_or(0);
  // Unavailable (the token, the store's database restarting): worth asking
  // again shortly, and clients that honour Retry-After do so without a
  // busy loop.
  if (retry == 0 && e.category() == Category::kUnavailable) retry = 1;
  // Token, system and audit-log failures are the operator's business: in
  // the server log (their messages are custody's own, never a caller's).
  if (e.backend() == Backend::kPkcs11 || e.backend() == Backend::kOs || e.category() == Category::kUnavailable) {
    spdlog::warn("request {}: {} {}/{}: {}", peer_.request_id, action_, project_, env_, e.message());
  }
  return Error(status, e.message(), e.category(), retry);
}

template <typename StreamT>
http::response<http::string_body> Session<StreamT>::Json(int status, const json& j) {
  http::response<http::string_body> res{static_cast<http::status>(status), 11};
  res.set(http::field::content_type, "application/json");
  // `replace`: no answer can throw on a string that slipped past the edge.
  res.body() = j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  return res;
}

// The answer, or nothing when it will come from StartGet.
template <typename StreamT>
std::optional<http::response<http::string_body>> Session<StreamT>::Handle(http::request<http::string_body>& req) {
  if (token_used_) {
    peer_ = conn_peer_;
    token_used_ = false;
  }
  peer_.request_id = core::NewRequestId();
  peer_.via = "custodyd";
  vault_ = false;
  action_ = "other";
  project_.clear();
  env_.clear();
  decision_ = "allow";
  audited_ = false;
  std::string_view target(req.target().data(), req.target().size());
  // The target (path and query) is the first untrusted text: anything
  // that is not printable UTF-8 is refused here, before it can reach a
  // record, a label, a log line or a message (and is never echoed).
  if (!PrintableText(target)) {
    action_ = "malformed";
    return Error(400, "the request target is not printable UTF-8 text");
  }
  std::string_view path = target.substr(0, target.find('?'));
  std::string_view query = target.find('?') == std::string_view::npos ? "" : target.substr(target.find('?') + 1);
  // A peer the policy does not know, without an access token: its first
  // request of each refusal_summary_seconds is handled and recorded like
  // any other (the policy refuses it, or it is the open health answer);
  // the rest are refused here, before the store or the log, and counted in
  // its http.refused summary. The check costs nothing for known peers
  // (unidentified_ is settled when the connection is identified).
  // (The Vault login routes under /v1/auth/ keep their own answers: a
  // login is how a client without a principal gets a token.)
  if (unidentified_ && path != "/v1/health" && path != "/v1/sys/health" && !path.starts_with("/v1/auth/") &&
      req.find("X-Vault-Token") == req.end() && !srv_.Known(peer_) && !srv_.refused.FirstRecordOf(peer_key_)) {
    action_ = "unidentified";
    decision_ = "deny";
    return Error(401, peer_key_ + " is not a principal in the policy", Category::kDenied);
  }
  auto param = [&](std::string_view key) -> std::optional<std::string> {
    size_t pos = 0;
    while (pos <= query.size()) {
      size_t amp = query.find('&', pos);
      std::string_view kv = query.substr(pos, amp == std::string_view::npos ? std::string_view::npos : amp - pos);
      if (kv.substr(0, kv.find('=')) == key && kv.find('=') != std::string_view::npos) {
        return std::string(kv.substr(kv.find('=') + 1));
      }
      if (amp == std::string_view::npos) break;
      pos = amp + 1;
    }
    return std::nullopt;
  };

  if (path == "/v1/health") {
    action_ = "health";
    // A write to the audit disk that has not returned (a stuck fdatasync
    // raises no error) or a call to the token past [token] call_timeout:
    // this node's requests wait or are refused; let a balancer choose
    // another node until it answers again.
    const auto health = srv_.CheckHealth();
    const bool ok = health.ok, audit_stalled = health.audit_stalled;
    const uint64_t hung = health.token_hung;
    auto& st = srv_.custodian.stats();
    // Anyone who can connect learns whether this node can serve (a load
    // balancer needs no more) and which node answered; what fails and the
    // policy version are for the readers of /metrics.
    if (!srv_.MayReadMetrics(peer_)) {
      return Json(ok ? 200 : 503, {{"status", ok ? "ok" : "degraded"}, {"node", srv_.options.node_name}});
    }
    const auto policy = srv_.custodian.policy_state();
    return Json(ok ? 200 : 503, {{"status", ok ? "ok" : "degraded"},
                                 {"node", srv_.options.node_name},
                                 {"audit", audit_stalled ? "stalled: a write to the audit log has not returned for " +
                                                               std::to_string(st.audit_write_stalled_ms.load() / 1000) +
                                                               " s (the disk does not answer)"
                                           : st.audit_healthy.load() ? "ok"
                                                                     : "failing: " + st.audit_problem()},
                                 {"token", hung > 0 ? "slow or hung since " + FormatUtc(st.token_hung_since.load()) + ": " +
                                                          std::to_string(hung) + " call(s) have not returned"
                                            : st.token_healthy.load() ? "ok"
                                                                      : "failing: see custody_token_errors_total"},
                                 {"store", st.store_healthy.load() ? "ok" : "failing: " + st.store_problem()},
                                 {"policy_version", policy.in_force},
                                 {"policy", policy.problem.empty() ? "ok" : policy.problem}});
  }
  if (path == "/metrics") {
    action_ = "metrics";
    if (!srv_.MayReadMetrics(peer_)) {
      const bool known = srv_.Known(peer_);
      decision_ = "deny";
      return Error(known ? 403 : 401,
                   "/metrics is for policy admins and auditors and the configured metrics_uids and metrics_tls_sans",
                   Category::kDenied);
    }
    http::response<http::string_body> res{http::status::ok, 11};
    res.set(http::field::content_type, "text/plain; version=0.0.4");
    (void)srv_.CheckHealth();  // the stall figures the metrics show
    srv_.metrics.RefreshSchedule(srv_.custodian);
    res.body() = srv_.metrics.Render(srv_.custodian.stats(), srv_.custodian.usage_flush_failures(), srv_.connections.load(),
                                     srv_.custodian.policy_state(), srv_.options.node_name);
    return res;
  }
  if (path == "/v1/usage") {
    action_ = "usage.read";
    if (req.method() != http::verb::get) return Error(405, "use GET for /v1/usage");
    if (auto refused = UseToken(req)) return refused;
    auto project = param("project");
    if (project && !core::ValidateProjectName(*project).ok()) {
      return Error(400, "the project parameter is not a project name ([a-z0-9][a-z0-9_-]*, at most 63)");
    }
    project_ = project.value_or("");
    audited_ = true;
    auto rows = srv_.custodian.Usage(peer_, project);
    if (!rows) return FromError(rows.error());
    json out = json::array();
    for (const auto& r : *rows) {
      out.push_back({{"project", r.project}, {"environment", r.environment}, {"principal", r.principal},
                     {"unseals", r.unseals}, {"unseals_today", r.unseals_today}, {"seals", r.seals},
                     {"refusals", {{"denied", r.denied}, {"rate_limited", r.rate_limited},
                                   {"spend_limited", r.spend_limited}}},
                     {"last_use", r.last_use}});
    }
    return Json(200, out);
  }
  {
    std::optional<http::response<http::string_body>> out;
    if (Vault(req, path, query, out)) return out;
  }
  constexpr std::string_view kSecrets = "/v1/secrets/";
  if (path.substr(0, kSecrets.size()) == kSecrets) {
    auto sp = core::SecretPath::Parse(path.substr(kSecrets.size()));
    if (!sp) return FromError(sp.error());
    project_ = sp->project;
    env_ = sp->environment;
    if (req.method() == http::verb::get) {
      action_ = "secret.get";
      if (auto refused = UseToken(req)) return refused;
      std::optional<uint32_t> version;
      if (auto v = param("version")) {
        char* end = nullptr;
        unsigned long n = std::strtoul(v->c_str(), &end, 10);
        if (v->empty() || *end != '\0' || n == 0 || n > UINT32_MAX) return Error(400, "version must be a positive number");
        version = static_cast<uint32_t>(n);
      }
      StartGet(*sp, version);
      return std::nullopt;
    }
    if (req.method() == http::verb::put) {
      action_ = "secret.put";
      if (auto refused = UseToken(req)) return refused;
      // Parsed in place: the value is copied once, into locked memory, and
      // the body (wiped after the answer) holds the only other copy.
      auto body = InPlaceJson::Parse(req.body());
      // The parser's reason names a position, never the text.
      if (!body) return Error(400, "the body must be a JSON object {\"value\": \"...\"}: " + body.error().message());
      std::optional<SecretBuffer> value;
      if (auto text = body->String("value")) {
        value = SecretBuffer::Copy(*text);
      } else if (auto encoded = body->String("value_base64")) {
        value = Base64DecodeSecret(*encoded);
        if (!value) return Error(400, "value_base64 is not valid base64");
      } else {
        return Error(400, "the body must have a string \"value\" (or \"value_base64\")");
      }
      if (value->size() > core::kMaxSecretSize) return Error(413, "the value is larger than 65536 bytes");
      // Idempotency-Key (as in the IETF httpapi draft): a retry of this put
      // with the same key, through any node, is answered with the version
      // the first one stored. 16 to 64 of [A-Za-z0-9_-], so it can be
      // stored and compared as it is; anything else is refused, unquoted.
      std::string put_key;
      if (auto k = req.find("Idempotency-Key"); k != req.end()) {
        const std::string_view key(k->value().data(), k->value().size());
        const bool good = key.size() >= 16 && key.size() <= 64 &&
                          key.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") ==
                              std::string_view::npos;
        if (!good) return Error(400, "the Idempotency-Key header must be 16 to 64 characters of A-Z a-z 0-9 _ -");
        put_key = std::string(key);
      }
      // Check-and-set (RFC 9110 conditional requests): If-Match: "N" stores
      // only if N is still the newest version (the ETag a GET gave), and
      // If-None-Match: * only if the secret has no version yet; else 412.
      std::optional<uint32_t> expect;
      const auto if_match = req.find(http::field::if_match);
      const auto if_none = req.find(http::field::if_none_match);
      if (if_match != req.end() && if_none != req.end()) {
        return Error(400, "send If-Match or If-None-Match, not both");
      }
      if (if_match != req.end()) {
        expect = ParseVersionTag(std::string_view(if_match->value().data(), if_match->value().size()));
        if (!expect) return Error(400, "the If-Match header must be one version as an entity tag, such as \"3\"");
      } else if (if_none != req.end()) {
        if (std::string_view(if_none->value().data(), if_none->value().size()) != "*") {
          return Error(400, "the If-None-Match header of a put must be * (store only if there is no version yet)");
        }
        expect = 0;
      }
      audited_ = true;
      bool replayed = false;
      auto v = srv_.custodian.Put(peer_, *sp, *value, put_key, &replayed, expect);
      if (!v) return FromError(v.error());
      // 200 for a retry (nothing new was made), 201 for a new version.
      return Json(replayed ? 200 : 201, {{"path", sp->str()}, {"version", *v}, {"replayed", replayed}});
    }
    if (req.method() == http::verb::post) {
      // An operation on the secret, named by the body: {"revoke": N,
      // "reason": "..."} withdraws version N at once (custody secret
      // revoke), for principals the policy lets rotate.
      action_ = "secret.revoke";
      if (auto refused = UseToken(req)) return refused;
      auto body = InPlaceJson::Parse(req.body());
      if (!body) {
        return Error(400, "the body must be a JSON object {\"revoke\": N, \"reason\": \"...\"}: " +
                              body.error().message());
      }
      const auto version = body->Uint("revoke");
      if (!version || *version == 0 || *version > UINT32_MAX) {
        return Error(400, "the body must have \"revoke\": the version to revoke, a positive number");
      }
      const auto reason = body->String("reason");
      if (!reason || reason->empty()) return Error(400, "the body must have \"reason\": why the version is revoked");
      if (reason->size() > core::Custodian::kMaxRevokeReasonBytes || !PrintableText(*reason)) {
        return Error(400, "\"reason\" must be printable UTF-8 text of at most " +
                              std::to_string(core::Custodian::kMaxRevokeReasonBytes) + " bytes");
      }
      audited_ = true;
      auto current = srv_.custodian.Revoke(peer_, *sp, static_cast<uint32_t>(*version), std::string(*reason));
      if (!current) return FromError(current.error());
      return Json(200, {{"path", sp->str()}, {"revoked", *version}, {"current_version", *current}});
    }
    return Error(405, "use GET, PUT or POST for /v1/secrets/PROJECT/ENV/NAME");
  }
  return Error(404, "no such endpoint: " + EscapeUntrusted(path, 64), Category::kNotFound);
}

}  // namespace detail

}  // namespace custody::server

#include "vault_routes.h"
