#include "custody/client/client.h"

#include <openssl/crypto.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "custody/common/base64.h"
#include "custody/common/inplace_json.h"
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
  std::mutex mu;
  asio::io_context io;
  std::optional<asio::local::stream_protocol::socket> sock;
  beast::flat_buffer buf;
};

Client::Client(std::string socket_path) : socket_path_(std::move(socket_path)), conn_(std::make_shared<Connection>()) {}

Result<Client> Client::Connect(const std::string& address) {
  if (address.rfind("unix:", 0) == 0 && address.size() > 5) return Client(address.substr(5));
  if (address.rfind("https://", 0) == 0) {
    std::string hostport = address.substr(8);
    if (!hostport.empty() && hostport.back() == '/') hostport.pop_back();
    size_t colon = hostport.rfind(':');
    if (colon == std::string::npos) return Error(Category::kConfig, "CUSTODY_ADDR " + address + " needs a port");
    auto env = [](const char* k) { const char* v = std::getenv(k); return std::string(v ? v : ""); };
    auto tls = std::make_shared<Tls>(Tls{hostport.substr(0, colon), hostport.substr(colon + 1), env("CUSTODY_CLIENT_CERT"),
                                         env("CUSTODY_CLIENT_KEY"), env("CUSTODY_CA")});
    if (tls->cert.empty() || tls->key.empty() || tls->ca.empty()) {
      return Error(Category::kConfig, "CUSTODY_ADDR " + address +
                                          " needs CUSTODY_CLIENT_CERT, CUSTODY_CLIENT_KEY and CUSTODY_CA (PEM files)");
    }
    Client c("");
    c.tls_ = std::move(tls);
    return c;
  }
  return Error(Category::kConfig, "CUSTODY_ADDR '" + address + "' must be unix:/path/to/custody.sock");
}

Result<Client::Response> Client::Request(const std::string& method, const std::string& target,
                                         std::string* body) const {
  http::request<http::string_body> req{http::string_to_verb(method), target, 11};
  req.set(http::field::host, "custodyd");
  req.set(http::field::user_agent, "custody-client");
  req.keep_alive(true);
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
  std::lock_guard lock(conn_->mu);
  Connection& c = *conn_;
  http::response<http::string_body> res;
  beast::error_code ec;
  if (tls_) {
    auto r = detail::RequestTls({tls_->host, tls_->port, tls_->cert, tls_->key, tls_->ca}, req);
    if (!r) return std::move(r).error();
    res = std::move(*r);
  }
  for (int attempt = 0; !tls_ && attempt < 2; ++attempt) {
  // A kept-alive connection the server has since closed fails on first
  // use: open a fresh one once and send again.
    bool reused = c.sock.has_value();
    if (!c.sock) {
      c.sock.emplace(c.io);
      c.buf.clear();
      c.sock->connect(asio::local::stream_protocol::endpoint(socket_path_), ec);
      if (ec) {
        c.sock.reset();
        return Error(Category::kUnavailable, "cannot reach custodyd at " + socket_path_ + ": " + ec.message());
      }
    }
    http::write(*c.sock, req, ec);
    http::response_parser<http::string_body> parser;
    parser.body_limit(4 * 1024 * 1024);
    if (!ec) http::read(*c.sock, c.buf, parser, ec);
    if (ec) {
      c.sock.reset();
      if (reused) continue;
      return Error(Category::kUnavailable, "custodyd at " + socket_path_ + ": " + ec.message());
    }
    res = parser.release();
    WipeSpent(c.buf);  // the answer, a value with it, passed through here
    if (!res.keep_alive()) c.sock.reset();
    break;
  }
  if (ec) return Error(Category::kUnavailable, "custodyd at " + socket_path_ + ": " + ec.message());
  Response out{static_cast<int>(res.result_int()), std::move(res.body())};
  if (out.status >= 400) {
    json j = json::parse(out.body, nullptr, false);
    std::string message = !j.is_discarded() && j.contains("error") && j["error"].is_string()
                              ? j["error"].get<std::string>()
                              : "custodyd answered HTTP " + std::to_string(out.status);
    const bool has_retry = !j.is_discarded() && j.contains("retry_after_seconds") &&
                           j["retry_after_seconds"].is_number_unsigned();
    uint64_t retry = has_retry ? j["retry_after_seconds"].get<uint64_t>() : 0;
    // The server's typed details, as the direct mode would have them.
    Error e(CategoryOf(j, out.status), message);
    if (out.status == 401) return std::move(e).WithNeedsAuthentication();
    if (retry > 0) return std::move(e).WithRetryAfter(retry);
    return e;
  }
  return out;
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

Result<uint32_t> Client::Put(const std::string& path, const SecretBuffer& value) const {
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
  CUSTODY_ASSIGN_OR_RETURN(Response r, Request("PUT", "/v1/secrets/" + path, &body));
  OPENSSL_cleanse(body.data(), body.size());
  json a = json::parse(r.body, nullptr, false);
  if (a.is_discarded() || !a.contains("version")) return Error(Category::kIntegrity, "custodyd sent a malformed answer");
  return a["version"].get<uint32_t>();
}

Result<std::string> Client::Fetch(const std::string& target) const {
  CUSTODY_ASSIGN_OR_RETURN(Response r, Request("GET", target, nullptr));
  return r.body;
}

}  // namespace custody::client
