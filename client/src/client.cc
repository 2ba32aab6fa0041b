#include "custody/client/client.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "addresses.h"
#include "custody/common/base64.h"
#include "custody/common/inplace_json.h"
#include "custody/common/untrusted.h"
#include "custody/common/wipe.h"
#include "tls_request.h"

namespace custody::client {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using nlohmann::json;

namespace {

// The server's status back to the category the CLI maps to its exit codes.
Category FromStatus(int status) {
  switch (status) {
    case 400: case 405: case 413: case 431: return Category::kUsage;
    case 401: case 403: return Category::kDenied;
    case 404: return Category::kNotFound;
    case 429: return Category::kLimit;
    case 503: return Category::kUnavailable;
    default: return Category::kInternal;
  }
}

// The category the server named in its error body ("category"), so that a
// 500 for a tampered blob exits 65 as in direct mode; the status otherwise.
Category CategoryOf(const json& body, int status) {
  if (!body.is_discarded() && body.is_object()) {
    if (auto it = body.find("category"); it != body.end() && it->is_string()) {
      for (Category c : {Category::kUsage, Category::kNotFound, Category::kDenied, Category::kLimit,
                         Category::kIntegrity, Category::kUnavailable, Category::kConfig, Category::kInternal}) {
        if (CategoryName(c) == it->get_ref<const std::string&>()) return c;
      }
    }
  }
  return FromStatus(status);
}

}  // namespace

struct Client::Connection {
  asio::io_context io;
  std::optional<asio::local::stream_protocol::socket> sock;
  beast::flat_buffer buf;
};

struct Client::State {
  std::mutex turn;
  size_t preferred = 0;  // under turn
};

struct Client::Outgoing {
  http::request<http::string_body> req;
};

namespace {

// CUSTODY_TIMEOUT: whole seconds, 1 to 300; anything else is refused.
Result<int> TimeoutFromEnv() {
  const char* v = std::getenv("CUSTODY_TIMEOUT");
  if (v == nullptr || *v == '\0') return 10;
  int n = 0;
  for (const char* p = v; *p != '\0'; ++p) {
    if (*p < '0' || *p > '9' || n > 300) return Error(Category::kConfig, "CUSTODY_TIMEOUT must be 1 to 300 seconds");
    n = n * 10 + (*p - '0');
  }
  if (n < 1 || n > 300) return Error(Category::kConfig, "CUSTODY_TIMEOUT must be 1 to 300 seconds");
  return n;
}

}  // namespace

Result<Client> Client::Connect(const std::string& addresses) {
  Client c;
  CUSTODY_ASSIGN_OR_RETURN(c.timeout_seconds_, TimeoutFromEnv());
  c.state_ = std::make_shared<State>();
  CUSTODY_ASSIGN_OR_RETURN(std::vector<NodeAddress> list, ParseAddressList(addresses));
  for (auto& address : list) {
    Node n;
    n.conn = std::make_shared<Connection>();
    if (!address.tls()) {
      n.socket_path = std::move(address.socket_path);
    } else {
      auto env = [](const char* k) { const char* v = std::getenv(k); return std::string(v ? v : ""); };
      n.tls = std::make_shared<Tls>(Tls{std::move(address.host), std::move(address.port), env("CUSTODY_CLIENT_CERT"),
                                        env("CUSTODY_CLIENT_KEY"), env("CUSTODY_CA")});
      if (n.tls->cert.empty() || n.tls->key.empty() || n.tls->ca.empty()) {
        return Error(Category::kConfig, "CUSTODY_ADDR https://" + EscapeUntrusted(n.tls->host, 200) + ":" + n.tls->port +
                                            " needs CUSTODY_CLIENT_CERT, CUSTODY_CLIENT_KEY and CUSTODY_CA (PEM files)");
      }
    }
    c.nodes_.push_back(std::move(n));
  }
  return c;
}

Result<Client::Response> Client::RequestOn(const Node& node, Outgoing& out, bool* sent) const {
  auto& req = out.req;
  http::response<http::string_body> res;
  beast::error_code ec;
  if (node.tls) {
    auto r = detail::RequestTls(
        {node.tls->host, node.tls->port, node.tls->cert, node.tls->key, node.tls->ca, timeout_seconds_}, req, sent);
    if (!r) return std::move(r).error();
    res = std::move(*r);
    return Response{static_cast<int>(res.result_int()), std::move(res.body())};
  }
  Connection& c = *node.conn;
  const std::string& path = node.socket_path;
  for (int attempt = 0; attempt < 2; ++attempt) {
    // A kept-alive connection the server has since closed fails on first
    // use: open a fresh one once and send again.
    bool reused = c.sock.has_value();
    // A node that stops answering must not hold the caller: the connect,
    // the write and the read together get timeout_seconds_, then the
    // connection is closed. (Asio's blocking calls would wait forever: they
    // poll again after a socket timeout; and a node whose backlog is full
    // holds a Unix-socket connect.)
    http::response_parser<http::string_body> parser;
    parser.body_limit(4 * 1024 * 1024);
    bool finished = false, unreachable = false;
    auto exchange = [&] {
      http::async_write(*c.sock, req, [&](beast::error_code wec, size_t) {
        ec = wec;
        if (wec) {
          finished = true;
          return;
        }
        // Sent: the whole request reached the node, which may act on it
        // even if no answer comes. A write that failed left at most part of
        // a request, which no node acts on.
        *sent = true;
        http::async_read(*c.sock, c.buf, parser, [&](beast::error_code rec, size_t) {
          ec = rec;
          finished = true;
        });
      });
    };
    if (!c.sock) {
      c.sock.emplace(c.io);
      c.buf.clear();
      c.sock->async_connect(asio::local::stream_protocol::endpoint(path), [&](beast::error_code cec) {
        if (cec) {
          ec = cec;
          unreachable = finished = true;
          return;
        }
        exchange();
      });
    } else {
      exchange();
    }
    c.io.restart();
    c.io.run_for(std::chrono::seconds(timeout_seconds_));
    bool timed_out = false;
    if (!finished) {
      timed_out = true;
      beast::error_code ignored;
      c.sock->close(ignored);  // the pending operation ends with operation_aborted
      c.io.restart();
      c.io.run();
      ec = asio::error::timed_out;
    }
    if (unreachable) {
      c.sock.reset();
      return Error(Category::kUnavailable, "cannot reach custodyd at " + path + ": " + ec.message());
    }
    if (ec) {
      c.sock.reset();
      // A connection kept from before that the node closed meanwhile: the
      // write fails, or the read ends at once. Once more on a fresh one.
      if (reused && !timed_out) continue;
      return Error(Category::kUnavailable, "custodyd at " + path + ": " +
                                               (timed_out ? "no answer within " + std::to_string(timeout_seconds_) + " s"
                                                          : ec.message()));
    }
    res = parser.release();
    WipeSpent(c.buf);  // the answer, a value with it, passed through here
    if (!res.keep_alive()) c.sock.reset();
    return Response{static_cast<int>(res.result_int()), std::move(res.body())};
  }
  return Error(Category::kUnavailable, "custodyd at " + path + ": the connection was closed");
}

Result<Client::Response> Client::Request(const std::string& method, const std::string& target,
                                         std::string* body, const std::string& idempotency_key,
                                         const Headers& headers) const {
  Outgoing out;
  auto& req = out.req;
  req = http::request<http::string_body>{http::string_to_verb(method), target, 11};
  req.set(http::field::host, "custodyd");
  req.set(http::field::user_agent, "custody-client");
  req.keep_alive(true);
  if (!idempotency_key.empty()) req.set("Idempotency-Key", idempotency_key);
  for (const auto& [name, value] : headers) req.set(name, value);
  if (body != nullptr) {
    req.set(http::field::content_type, "application/json");
    req.body() = std::move(*body);
    req.prepare_payload();
  }
  // A put's body holds the value: wiped on every way out, early failures
  // (no server, a refused handshake) included.
  struct WipeBody {
    http::request<http::string_body>& r;
    ~WipeBody() { OPENSSL_cleanse(r.body().data(), r.body().size()); }
  } wipe_body{req};
  // Once sent, only a read, or a write the store recognises when it comes
  // again (its Idempotency-Key), may be asked of another node.
  const bool may_repeat = method == "GET" || !idempotency_key.empty();
  std::lock_guard lock(state_->turn);
  std::optional<Result<Response>> last;
  const size_t n = nodes_.size();
  for (size_t i = 0; i < n; ++i) {
    const size_t at = (state_->preferred + i) % n;
    bool sent = false;
    auto r = RequestOn(nodes_[at], out, &sent);
    const bool unavailable = r ? r->status == 503 : r.error().category() == Category::kUnavailable;
    if (!unavailable) {
      state_->preferred = at;
      last = std::move(r);
      break;
    }
    last = std::move(r);
    if (sent && !may_repeat) break;
  }
  Result<Response> got = std::move(*last);
  if (!got) return std::move(got).error();
  Response res = std::move(*got);
  if (res.status >= 400) {
    json j = json::parse(res.body, nullptr, false);
    std::string message = !j.is_discarded() && j.contains("error") && j["error"].is_string()
                              ? j["error"].get<std::string>()
                              : "custodyd answered HTTP " + std::to_string(res.status);
    const bool has_retry = !j.is_discarded() && j.contains("retry_after_seconds") &&
                           j["retry_after_seconds"].is_number_unsigned();
    uint64_t retry = has_retry ? j["retry_after_seconds"].get<uint64_t>() : 0;
    // The server's typed details, as the direct mode would have them.
    Error e(CategoryOf(j, res.status), message);
    if (res.status == 401) return std::move(e).WithNeedsAuthentication();
    if (res.status == 412) return std::move(e).WithPreconditionFailed();
    if (retry > 0) return std::move(e).WithRetryAfter(retry);
    return e;
  }
  return res;
}

Result<Fetched> Client::Get(const std::string& path, std::optional<uint32_t> version) const {
  std::string target = "/v1/secrets/" + path + (version ? "?version=" + std::to_string(*version) : "");
  CUSTODY_ASSIGN_OR_RETURN(Response r, Request("GET", target, nullptr));
  // Parsed in place, so the value's only copies are the answer (wiped
  // below) and the locked buffer it is returned in.
  Fetched f;
  Status got = [&]() -> Status {
    auto j = InPlaceJson::Parse(r.body);
    if (!j) return Error(Category::kIntegrity, "custodyd sent a malformed answer");
    f.version = static_cast<uint32_t>(j->Uint("version").value_or(0));
    if (auto text = j->String("value")) {
      f.value = SecretBuffer::Copy(*text);
    } else if (auto encoded = j->String("value_base64")) {
      auto out = Base64DecodeSecret(*encoded);
      if (!out) return Error(Category::kIntegrity, "custodyd sent invalid base64");
      f.value = std::move(*out);
    } else {
      return Error(Category::kIntegrity, "custodyd's answer has no value");
    }
    return Status::Ok();
  }();
  OPENSSL_cleanse(r.body.data(), r.body.size());
  if (!got.ok()) return got.error();
  return f;
}

Result<uint32_t> Client::Put(const std::string& path, const SecretBuffer& value,
                             std::optional<uint32_t> expect_current) const {
  std::string_view v = value.RevealString(SecretAccess{});
  // Written straight into a body reserved at its largest size, so no
  // reallocation (and no serializer's buffer) leaves a copy of the value
  // behind; the body is wiped once sent.
  std::string body;
  if (SendableAsJsonText(v)) {
    body.reserve(v.size() * 6 + 16);
    body += "{\"value\":\"";
    AppendJsonEscaped(body, v);
  } else {
    std::string encoded = Base64Encode(v);
    body.reserve(encoded.size() + 24);
    body += "{\"value_base64\":\"";
    body += encoded;
    OPENSSL_cleanse(encoded.data(), encoded.size());
  }
  body += "\"}";
  // One key for this put, on every node it is tried on.
  uint8_t key[16];
  if (RAND_bytes(key, sizeof key) != 1) return Error(Category::kInternal, "no random bytes for the Idempotency-Key");
  static constexpr char kHex[] = "0123456789abcdef";
  std::string idempotency_key;
  for (uint8_t b : key) {
    idempotency_key += kHex[b >> 4];
    idempotency_key += kHex[b & 15];
  }
  Headers conditions;
  if (expect_current) {
    if (*expect_current == 0) {
      conditions.emplace_back("If-None-Match", "*");
    } else {
      conditions.emplace_back("If-Match", "\"" + std::to_string(*expect_current) + "\"");
    }
  }
  auto sent = Request("PUT", "/v1/secrets/" + path, &body, idempotency_key, conditions);
  OPENSSL_cleanse(body.data(), body.size());
  CUSTODY_ASSIGN_OR_RETURN(Response r, std::move(sent));
  json a = json::parse(r.body, nullptr, false);
  if (a.is_discarded() || !a.contains("version")) return Error(Category::kIntegrity, "custodyd sent a malformed answer");
  return a["version"].get<uint32_t>();
}

Result<uint32_t> Client::Revoke(const std::string& path, uint32_t version, const std::string& reason) const {
  // No value in this body: the JSON writer may keep its copies.
  std::string body = json{{"revoke", version}, {"reason", reason}}.dump(-1, ' ', false, json::error_handler_t::replace);
  CUSTODY_ASSIGN_OR_RETURN(Response r, Request("POST", "/v1/secrets/" + path, &body, "", {}));
  json a = json::parse(r.body, nullptr, false);
  if (a.is_discarded() || !a.contains("current_version") || !a["current_version"].is_number_unsigned()) {
    return Error(Category::kIntegrity, "custodyd sent a malformed answer");
  }
  return a["current_version"].get<uint32_t>();
}

Result<std::string> Client::Fetch(const std::string& target, const Headers& headers) const {
  CUSTODY_ASSIGN_OR_RETURN(Response r, Request("GET", target, nullptr, "", headers));
  return r.body;
}

}  // namespace custody::client
