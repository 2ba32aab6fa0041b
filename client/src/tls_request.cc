#include "tls_request.h"

#include <openssl/crypto.h>
#include <openssl/ssl.h>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include "custody/common/wipe.h"

namespace custody::client::detail {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

Result<HttpResponse> RequestTls(const TlsEndpoint& to, HttpRequest& req, bool* sent) {
  beast::error_code ec;
  const std::string where = "custodyd at " + to.host + ":" + to.port;
  asio::ssl::context ctx(asio::ssl::context::tls_client);
  SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_3_VERSION);
  // OpenSSL wipes its record buffers of decrypted data once read: an answer
  // carries a value.
  SSL_CTX_set_options(ctx.native_handle(), SSL_OP_CLEANSE_PLAINTEXT);
  ctx.load_verify_file(to.ca, ec);
  if (!ec) ctx.use_certificate_chain_file(to.cert, ec);
  if (!ec) ctx.use_private_key_file(to.key, asio::ssl::context::pem, ec);
  if (ec) return Error(Category::kConfig, "client certificate or CA: " + ec.message());
  ctx.set_verify_mode(asio::ssl::verify_peer);
  asio::io_context io;
  beast::ssl_stream<beast::tcp_stream> stream(io, ctx);
  SSL_set_tlsext_host_name(stream.native_handle(), to.host.c_str());
  stream.set_verify_callback(asio::ssl::host_name_verification(to.host));
  asio::ip::tcp::resolver resolver(io);
  auto results = resolver.resolve(to.host, to.port, ec);
  if (ec) return Error(Category::kUnavailable, "cannot reach " + where + ": " + ec.message());
  // Each step asynchronously under the stream's own timer, so that a node
  // that stops answering gives an error after the timeout, never a hang.
  auto& tcp = beast::get_lowest_layer(stream);
  const auto limit = std::chrono::seconds(to.timeout_seconds);
  auto run = [&] {
    io.restart();
    io.run();
  };
  auto said = [&](const beast::error_code& e) {
    return e == beast::error::timeout ? "no answer within " + std::to_string(to.timeout_seconds) + " s" : e.message();
  };
  tcp.expires_after(limit);
  tcp.async_connect(results, [&](beast::error_code e, const asio::ip::tcp::endpoint&) { ec = e; });
  run();
  if (ec) return Error(Category::kUnavailable, "cannot reach " + where + ": " + said(ec));
  tcp.expires_after(limit);
  stream.async_handshake(asio::ssl::stream_base::client, [&](beast::error_code e) { ec = e; });
  run();
  if (ec) return Error(Category::kUnavailable, where + " refused the TLS handshake: " + said(ec));
  req.keep_alive(false);
  tcp.expires_after(limit);
  http::async_write(stream, req, [&](beast::error_code e, size_t) { ec = e; });
  run();
  if (!ec) *sent = true;
  // Wiped at once when sent; a body that did not leave is kept for the next
  // node (the caller wipes it in the end).
  if (*sent) OPENSSL_cleanse(req.body().data(), req.body().size());
  beast::flat_buffer buf;
  http::response_parser<http::string_body> parser;
  parser.body_limit(4 * 1024 * 1024);
  if (!ec) {
    tcp.expires_after(limit);
    http::async_read(stream, buf, parser, [&](beast::error_code e, size_t) { ec = e; });
    run();
  }
  WipeAll(buf);  // the answer, a value with it, passed through here
  if (ec) return Error(Category::kUnavailable, where + ": " + said(ec));
  HttpResponse res = parser.release();
  // The close, bounded too: a peer that never sends its close_notify does
  // not hold the answer already read.
  tcp.expires_after(std::chrono::seconds(1));
  stream.async_shutdown([](beast::error_code) {});
  run();
  return res;
}

}  // namespace custody::client::detail
