// Session: one connection (Unix socket or TLS): reading requests within the
// limits, writing answers, idle and drain handling. Its routing (what each
// request means) is in routes.h.
// Private to the server library: included by its own sources only.
#pragma once

#include "impl.h"

namespace custody::server {

namespace detail {

using TlsStream = beast::ssl_stream<beast::tcp_stream>;

// The transport underneath: a plain Unix socket stream, or TLS over TCP.
inline auto& Lowest(Stream& s) { return s; }
inline auto& Lowest(TlsStream& s) { return beast::get_lowest_layer(s); }
inline void Shutdown(Stream& s) {
  beast::error_code ignored;
  s.socket().shutdown(Local::socket::shutdown_both, ignored);
  s.close();
}
inline void Shutdown(TlsStream& s) {
  beast::error_code ignored;
  s.shutdown(ignored);  // close_notify; the peer may already be gone
  beast::get_lowest_layer(s).close();
}

template <typename StreamT>
class Session : public std::enable_shared_from_this<Session<StreamT>> {
 public:
  // `peer_key` was counted by AdmitPeer; the session gives it back.
  // `unidentified`: the policy does not know the peer (yet); counted in
  // srv.unidentified until Identified() says otherwise.
  Session(Server::Impl& srv, StreamT stream, core::RequestContext peer, std::string peer_key, bool unidentified)
      : srv_(srv),
        stream_(std::move(stream)),
        peer_(std::move(peer)),
        conn_peer_(peer_),
        peer_key_(std::move(peer_key)),
        unidentified_(unidentified) {
    srv_.connections.fetch_add(1);
    if (unidentified_) srv_.unidentified.fetch_add(1);
  }
  ~Session() {
    // A request refused or cut off mid-read (413, 400, a timeout, a close)
    // may have left part of a value in the read buffer or the parser's body.
    WipeAll(buffer_);
    if (parser_) OPENSSL_cleanse(parser_->get().body().data(), parser_->get().body().size());
    NotIdle();
    srv_.LeavePeer(peer_key_);
    if (unidentified_) srv_.unidentified.fetch_sub(1);
    srv_.connections.fetch_sub(1);
  }

  void Start() { Read(); }
  // For TLS: the peer's identity comes from its certificate, after the handshake.
  // The peer then takes a principal's place if the policy knows it.
  void SetPeer(core::RequestContext peer) {
    peer_ = std::move(peer);
    conn_peer_ = peer_;
    if (unidentified_ && srv_.Known(peer_)) {
      unidentified_ = false;
      srv_.unidentified.fetch_sub(1);
    }
  }
  template <typename Done>
  void Handshake(std::chrono::seconds timeout, Done done) {
    Lowest(stream_).expires_after(timeout);
    stream_.async_handshake(asio::ssl::stream_base::server,
                            [self = this->shared_from_this(), done](beast::error_code ec) {
                              if (ec) {
                                spdlog::info("tls handshake refused: {}", ec.message());
                                self->CountRefusal("tls handshake failed");
                                self->Close();
                              }
                              done(!ec, self->stream_);
                            });
  }

 private:
  void Read() {
    // Metrics labels belong to one request; a refusal before Handle() (413,
    // 431, 400) must not inherit the previous request's.
    action_ = "malformed";
    project_.clear();
    env_.clear();
    decision_ = "error";
    vault_ = false;  // a refusal before Handle() has custody's own error body
    parser_.emplace();
    parser_->header_limit(srv_.limits.max_header_bytes.load());
    parser_->body_limit(srv_.limits.max_body_bytes.load());
    // A chunked body is grown chunk by chunk, each growth freeing a copy of
    // what came before unwiped; with Content-Length the body is reserved
    // once. So a chunked body is refused at its first chunk, before any of
    // it is stored.
    chunked_refused_ = false;
    parser_->on_chunk_header(refuse_chunk_);  // kept by reference: a member
    // The idle timeout covers the whole request: a slow client cannot hold a
    // connection (and a thread's attention) forever.
    Lowest(stream_).expires_after(std::chrono::seconds(srv_.limits.idle_timeout_seconds.load()));
    waiting_ = true;
    {
      // Every handler of a session runs on its strand, so CloseIfIdle never
      // races OnRead.
      std::lock_guard lock(srv_.idle_mu);
      srv_.idle[this] = [weak = this->weak_from_this()] {
        if (auto self = weak.lock()) asio::post(self->stream_.get_executor(), [self] { self->CloseIfIdle(); });
      };
    }
    if (srv_.draining.load()) {
      // Stop() came between the last answer and this read: close now.
      NotIdle();
      CloseIfIdle();
    }
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
  }

  void NotIdle() {
    std::lock_guard lock(srv_.idle_mu);
    srv_.idle.erase(this);
  }
  // Stop(): a connection waiting for its next request is closed now.
  void CloseIfIdle() {
    if (!waiting_) return;
    closed_idle_ = true;
    beast::error_code ignored;
    Lowest(stream_).socket().close(ignored);  // the pending read ends with an error
  }

  void OnRead(beast::error_code ec) {
    waiting_ = false;
    NotIdle();
    if (closed_idle_) return;
    // An idle keep-alive connection that times out between requests is
    // not a refusal; a request not complete within the timeout is.
    if (ec == beast::error::timeout && parser_->got_some()) CountRefusal("request not complete within the idle timeout");
    if (ec == http::error::end_of_stream || ec == beast::error::timeout || ec == asio::error::connection_reset ||
        ec == asio::error::eof || ec == asio::ssl::error::stream_truncated) {
      Close();
      return;
    }
    if (ec) Observe(0);
    if (ec && chunked_refused_) {
      CountRefusal("411 chunked body");
      Reply(Error(411, "send the body with Content-Length, not in chunks"), false);
      return;
    }
    if (ec == http::error::body_limit) {
      CountRefusal("413 body too large");
      Reply(Error(413, "request body is larger than " + std::to_string(srv_.limits.max_body_bytes.load()) + " bytes"), false);
      return;
    }
    if (ec == http::error::header_limit) {
      CountRefusal("431 headers too large");
      Reply(Error(431, "request headers are larger than " + std::to_string(srv_.limits.max_header_bytes.load()) + " bytes"),
            false);
      return;
    }
    if (ec) {
      CountRefusal("400 malformed HTTP");
      Reply(Error(400, "malformed HTTP request: " + ec.message()), false);
      return;
    }
    auto req = parser_->release();
    // A PUT's value passed through the read buffer: wipe its storage once
    // everything read has been consumed (not when a pipelined request waits).
    WipeSpent(buffer_);
    keep_ = req.keep_alive() && !srv_.draining.load();
    started_ = std::chrono::steady_clock::now();
    std::optional<http::response<http::string_body>> res = Handle(req);
    // The request body may hold a value being stored: wipe it; and an
    // access token's header (Beast keeps each field in its own block).
    OPENSSL_cleanse(req.body().data(), req.body().size());
    if (auto t = req.find("X-Vault-Token"); t != req.end()) {
      OPENSSL_cleanse(const_cast<char*>(t->value().data()), t->value().size());
    }
    // Nothing: StartGet's callback answers, maybe already on another thread,
    // so no member of this session may be touched here any more.
    if (res) Answer(std::move(*res));
  }

  void Answer(http::response<http::string_body> res) {
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    Observe(seconds);
    // A refusal the custodian did not record (a bad path, an unknown
    // endpoint, /metrics to a stranger) goes into the per-peer summary.
    if (!audited_ && res.result_int() >= 400) CountRefusal(std::to_string(res.result_int()) + " " + action_);
    srv_.NoteTokenEvents();
    Reply(std::move(res), keep_);
  }

  // GET of a secret: everything up to the audit record runs here; the wait
  // for the record's fsync holds no server thread, so every request in
  // flight shares one fsync. The answer is built back on the server's
  // threads once the record is durable (and never if it is not).
  void StartGet(const core::SecretPath& sp, std::optional<uint32_t> version);

  http::response<http::string_body> GetAnswer(const core::SecretPath& sp, Result<core::Unsealed>& u);

  http::response<http::string_body> Error(int status, const std::string& message, Category category = Category::kUsage,
                                          uint64_t retry_after = 0);

  http::response<http::string_body> FromError(const custody::Error& e);

  http::response<http::string_body> Json(int status, const json& j);

  // The answer, or nothing when it will come from StartGet.
  std::optional<http::response<http::string_body>> Handle(http::request<http::string_body>& req);

  // The Vault-compatible API (vault_routes.h; docs/VAULT_COMPAT.md). False
  // when `path` is none of its routes; else `out` is the answer, or
  // nothing when StartGet will give it.
  bool Vault(http::request<http::string_body>& req, std::string_view path, std::string_view query,
             std::optional<http::response<http::string_body>>& out);
  // X-Vault-Token, when the request has one: the request then speaks for
  // the token's principal. An answer when the token is refused (its record
  // written), or nothing to go on.
  std::optional<http::response<http::string_body>> UseToken(http::request<http::string_body>& req,
                                                            std::optional<core::AccessTokenRecord>* used = nullptr);
  http::response<http::string_body> VaultGetAnswer(Result<core::Unsealed>& u);
  // Vault's envelope around `data` (an object's JSON text, or "null").
  http::response<http::string_body> VaultJson(int status, const std::string& data_json,
                                              const std::string& auth_json = "null");

  void Reply(http::response<http::string_body> res, bool keep) {
    res.keep_alive(keep);
    res.set(http::field::server, "custodyd");
    res.prepare_payload();
    res_ = std::move(res);
    Lowest(stream_).expires_after(std::chrono::seconds(srv_.limits.idle_timeout_seconds.load()));
    http::async_write(stream_, res_, [self = this->shared_from_this(), keep](beast::error_code ec, size_t) {
      self->OnWrite(ec, keep);
    });
  }

  void OnWrite(beast::error_code ec, bool keep) {
    OPENSSL_cleanse(res_.body().data(), res_.body().size());
    res_ = {};
    if (ec || !keep) {
      Close();
      return;
    }
    Read();
  }

  void Close() { Shutdown(stream_); }

  void Observe(double seconds) {
    auto [project, env] = MetricLabels(*srv_.custodian.policy(), project_, env_);
    srv_.metrics.Observe(action_, project, env, decision_, seconds);
  }
  void CountRefusal(const std::string& what) { srv_.refused.Count(peer_key_, what); }

  Server::Impl& srv_;
  StreamT stream_;
  beast::flat_buffer buffer_;
  // Before parser_, which refers to it.
  bool chunked_refused_ = false;
  std::function<void(uint64_t, beast::string_view, beast::error_code&)> refuse_chunk_ =
      [this](uint64_t, beast::string_view, beast::error_code& ec) {
        chunked_refused_ = true;
        ec = http::error::bad_chunk;
      };
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> res_;
  core::RequestContext peer_;
  // Who the transport says the peer is; peer_ is this request's (a token
  // may speak for another principal), reset from it when a token was used.
  core::RequestContext conn_peer_;
  bool token_used_ = false;
  bool vault_ = false;  // this request is on the Vault API: Vault's error body
  std::string vault_key_ = "value";  // the project's vault_value_key
  std::string action_, project_, env_, decision_;
  std::string peer_key_;
  bool unidentified_ = false;  // counted in srv_.unidentified
  bool audited_ = false;       // this request's refusal is in a custodian record
  bool keep_ = false;
  bool waiting_ = false;      // a read for the next request is pending
  bool closed_idle_ = false;  // closed by Stop() while waiting
  std::chrono::steady_clock::time_point started_;
};

// The kernel's word on who is at the other end of a Unix socket.
inline std::optional<core::RequestContext> PeerOf(Local::socket& s) {
  struct ucred cred {};
  socklen_t len = sizeof cred;
  if (::getsockopt(s.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return std::nullopt;
  return PeerFromCredentials(cred.uid, cred.gid, static_cast<uint32_t>(cred.pid));
}

// The client certificate's word on who it is. The handshake already checked
// that it chains to the configured CA.
inline std::optional<core::RequestContext> PeerOf(TlsStream& s) {
  X509* cert = SSL_get0_peer_certificate(s.native_handle());
  if (cert == nullptr) return std::nullopt;
  return PeerFromCertificate(cert);
}

}  // namespace detail
}  // namespace custody::server
