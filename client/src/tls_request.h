// The TLS transport of the client, in its own file so that the lean
// `custody` front (which serves only unix: addresses and hands https:// to
// custody-full) links no TLS: Asio's SSL layer initialises OpenSSL's whole
// SSL library at program start, which is most of a short process's cost.
#pragma once

#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <string>

#include "custody/common/result.h"

namespace custody::client::detail {

struct TlsEndpoint {
  std::string host, port, cert, key, ca;
  int timeout_seconds = 10;  // for each of connect, handshake, write and read
};

using HttpRequest = boost::beast::http::request<boost::beast::http::string_body>;
using HttpResponse = boost::beast::http::response<boost::beast::http::string_body>;

// One TLS 1.3 connection per request: the server checked against the CA and
// its name, our certificate presented. The request body is wiped once sent.
// `sent` becomes true once any byte of the request may have left (after the
// handshake): before that, another node may be asked instead.
Result<HttpResponse> RequestTls(const TlsEndpoint& to, HttpRequest& req, bool* sent);

}  // namespace custody::client::detail
