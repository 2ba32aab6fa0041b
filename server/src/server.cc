#include "custody/server/server.h"

#include "routes.h"

namespace custody::server {

using detail::PeerOf;
using detail::Session;
using detail::TlsStream;

void Server::Impl::AcceptTls() {
  // Each connection on its own strand: its handlers never run concurrently,
  // so the audit writer and Stop() can post to it safely.
  tls_acceptor->async_accept(asio::make_strand(io), [this](beast::error_code ec, asio::ip::tcp::socket socket) {
    if (ec) {
      if (ec != asio::error::operation_aborted) AcceptTls();
      return;
    }
    beast::error_code addr_ec;
    const auto remote = socket.remote_endpoint(addr_ec);
    std::string key = "address " + (addr_ec ? std::string("unknown") : remote.address().to_string());
    // Over a limit: closed before the handshake (no HTTP can be spoken
    // yet). Until its certificate names a principal, a TLS connection takes
    // one of the places strangers share.
    if (connections.load() >= static_cast<int>(limits.max_connections.load()) ||
        unidentified.load() >= UnidentifiedPlaces() || !AdmitPeer(key)) {
      refused.Count(key, "503 connection limit");
      beast::error_code ignored;
      socket.close(ignored);
    } else {
      auto session = std::make_shared<Session<TlsStream>>(*this, TlsStream(beast::tcp_stream(std::move(socket)), *tls),
                                                          core::RequestContext{}, std::move(key), /*unidentified=*/true);
      // The handshake has the same deadline as a request.
      auto* raw = session.get();
      raw->Handshake(std::chrono::seconds(limits.idle_timeout_seconds.load()), [session](bool ok, TlsStream& stream) {
        if (!ok) return;
        auto peer = PeerOf(stream);
        // No certificate (only when tls_client_certificate = "optional"):
        // nobody, until an access token says otherwise.
        if (!peer) {
          peer.emplace();
          peer->identified_by = "tls client without a certificate";
        }
        session->SetPeer(std::move(*peer));
        session->Start();
      });
    }
    AcceptTls();
  });
}

namespace {

// Over max_connections: a short 503 that says why, then a close. Closing a
// Unix socket whose request is still unread resets it, and the client would
// see "connection reset" instead of the answer; so the refusal is written,
// our side shut, and what the client sent is read and dropped until it
// closes or one second passes. At most `cap` refusals wait at once; past
// that a connection is closed with no answer.
class Refusal : public std::enable_shared_from_this<Refusal> {
 public:
  static void Start(Local::socket socket, const std::string& why, std::atomic<int>& waiting, int cap) {
    if (waiting.fetch_add(1) >= cap) {
      waiting.fetch_sub(1);
      beast::error_code ignored;
      socket.close(ignored);
      return;
    }
    auto r = std::shared_ptr<Refusal>(new Refusal(std::move(socket), waiting));
    r->answer_ = Answer(why);
    r->timer_.expires_after(std::chrono::seconds(1));
    r->timer_.async_wait([r](beast::error_code) {
      beast::error_code ignored;
      r->socket_.close(ignored);
    });
    asio::async_write(r->socket_, asio::buffer(r->answer_), [r](beast::error_code ec, size_t) {
      if (ec) {
        r->timer_.cancel();
        return;
      }
      beast::error_code ignored;
      r->socket_.shutdown(Local::socket::shutdown_send, ignored);
      r->Drain();
    });
  }
  ~Refusal() {
    OPENSSL_cleanse(sink_, sizeof sink_);  // the dropped request may have carried a value
    waiting_.fetch_sub(1);
  }

 private:
  Refusal(Local::socket socket, std::atomic<int>& waiting)
      : socket_(std::move(socket)), timer_(socket_.get_executor()), waiting_(waiting) {}
  static std::string Answer(const std::string& why) {
    const std::string body = nlohmann::json{{"error", why}, {"category", "unavailable"}, {"status", 503}}.dump() + "\n";
    return "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nServer: custodyd\r\n"
           "Connection: close\r\nContent-Length: " +
           std::to_string(body.size()) + "\r\n\r\n" + body;
  }
  void Drain() {
    socket_.async_read_some(asio::buffer(sink_), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) {
        self->timer_.cancel();  // the client closed (or the timer did)
        return;
      }
      self->Drain();
    });
  }
  Local::socket socket_;
  asio::steady_timer timer_;
  std::atomic<int>& waiting_;
  std::string answer_;
  char sink_[512];
};

}  // namespace

void Server::Impl::Refuse(Local::socket socket, const std::string& why) {
  Refusal::Start(std::move(socket), why, refusals, static_cast<int>(limits.max_connections.load()));
}

void Server::Impl::Accept() {
  // Each connection on its own strand (see AcceptTls).
  acceptor->async_accept(asio::make_strand(io), [this](beast::error_code ec, Local::socket socket) {
    if (ec) {
      if (ec != asio::error::operation_aborted) {
        spdlog::warn("accept failed: {}", ec.message());
        Accept();
      }
      return;
    }
    // The peer is identified before it takes a place: strangers share at
    // most max_unidentified_connections, so they cannot starve principals.
    auto peer = options.unix_peer_for_fuzzing ? options.unix_peer_for_fuzzing(socket.native_handle()) : PeerOf(socket);
    if (peer) {
      std::string key = "uid " + std::to_string(peer->caller.uid.value_or(0));
      const bool known = Known(*peer);
      if (connections.load() >= static_cast<int>(limits.max_connections.load())) {
        refused.Count(key, "503 connection limit");
        Refuse(std::move(socket), "too many connections; retry");
      } else if (!known && unidentified.load() >= UnidentifiedPlaces()) {
        refused.Count(key, "503 connection limit for unidentified peers");
        Refuse(std::move(socket), "too many connections from peers the policy does not know; retry");
      } else if (!AdmitPeer(key)) {
        refused.Count(key, "503 connection limit per peer");
        Refuse(std::move(socket), "too many connections from " + key + "; retry");
      } else {
        std::make_shared<Session<Stream>>(*this, Stream(std::move(socket)), std::move(*peer), std::move(key), !known)
            ->Start();
      }
    }
    Accept();
  });
}

Server::Server(ServerOptions options, core::Custodian& custodian)
    : impl_(std::make_unique<Impl>(std::move(options), custodian)) {}

Server::~Server() = default;

Status Server::Listen() {
  const std::string& path = impl_->options.socket_path;
  if (path.empty()) return custody::Error(Category::kConfig, "no listener configured: set [server] socket");
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return custody::Error(Category::kConfig, path + " exists and is not a socket; refusing to replace it");
    }
    ::unlink(path.c_str());  // a stale socket from a previous run
  }
  beast::error_code ec;
  impl_->acceptor.emplace(impl_->io);
  impl_->acceptor->open(Local{}, ec);
  if (!ec) impl_->acceptor->bind(Local::endpoint(path), ec);
  if (!ec) impl_->acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return custody::Error(Category::kUnavailable, "cannot listen on " + path + ": " + ec.message());
  // Who may connect is the socket's mode; what they get is the policy's.
  ::chmod(path.c_str(), impl_->options.socket_mode);
  impl_->Accept();
  if (!impl_->options.tls_listen.empty()) CUSTODY_RETURN_IF_ERROR(ListenTls());
  Every(std::chrono::seconds(impl_->options.refusal_summary_seconds), [impl = impl_.get()] { impl->WriteRefusals(/*wait=*/false); });
  return Status::Ok();
}

Status Server::ListenTls() {
  const ServerOptions& o = impl_->options;
  auto fail = [&](const std::string& what) {
    return custody::Error(Category::kConfig, "TLS listener " + o.tls_listen + ": " + what);
  };
  size_t colon = o.tls_listen.rfind(':');
  if (colon == std::string::npos) return fail("write it as HOST:PORT");
  std::string host = o.tls_listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  unsigned long port = std::strtoul(o.tls_listen.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || port == 0 || port > 65535) return fail("bad port");
  beast::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (ec) return fail("'" + host + "' is not an IP address");
  impl_->tls.emplace(asio::ssl::context::tls_server);
  auto& ctx = *impl_->tls;
  // TLS 1.3 only, and a client certificate from the configured CA always.
  SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_3_VERSION);
  ctx.set_options(asio::ssl::context::no_compression);
  // OpenSSL wipes its record buffers of decrypted data once read: a PUT
  // carries a value. (Beast's flat_stream, which gathers a TLS write into
  // one buffer, still frees that buffer unwiped: see docs/ARCHITECTURE.md.)
  SSL_CTX_set_options(ctx.native_handle(), SSL_OP_CLEANSE_PLAINTEXT);
  ctx.use_certificate_chain_file(o.tls_cert, ec);
  if (ec) return fail("cannot load tls_cert " + o.tls_cert + ": " + ec.message());
  if (o.tls_key.rfind("pkcs11:", 0) == 0) {
    // The key stays in the token; OpenSSL signs the handshake through libp11.
    if (!o.token_key) return fail("no token key loader");
    CUSTODY_ASSIGN_OR_RETURN(EVP_PKEY* pkey, o.token_key(o.tls_key));
    if (SSL_CTX_use_PrivateKey(ctx.native_handle(), pkey) != 1 || SSL_CTX_check_private_key(ctx.native_handle()) != 1) {
      return fail("the token key does not match tls_cert");
    }
  } else {
    ctx.use_private_key_file(o.tls_key, asio::ssl::context::pem, ec);
    if (ec) return fail("cannot load tls_key " + o.tls_key + ": " + ec.message());
  }
  ctx.load_verify_file(o.tls_client_ca, ec);
  if (ec) return fail("cannot load tls_client_ca " + o.tls_client_ca + ": " + ec.message());
  // A certificate that is sent is always verified; "optional" only lets a
  // client send none (it then needs an access token for anything).
  ctx.set_verify_mode(o.tls_client_certificate_optional
                          ? asio::ssl::verify_peer
                          : asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert);
  impl_->tls_acceptor.emplace(impl_->io);
  asio::ip::tcp::endpoint ep(addr, static_cast<unsigned short>(port));
  impl_->tls_acceptor->open(ep.protocol(), ec);
  if (!ec) impl_->tls_acceptor->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl_->tls_acceptor->bind(ep, ec);
  if (!ec) impl_->tls_acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return custody::Error(Category::kUnavailable, "cannot listen on " + o.tls_listen + ": " + ec.message());
  impl_->AcceptTls();
  return Status::Ok();
}

namespace {

// A handler that throws ends io_context::run; running it again goes on with
// the other handlers (Asio's documented pattern). One bad request then costs
// its own connection, not the server. The exception's text is not logged:
// it may quote the bytes that caused it.
void RunCatching(asio::io_context& io) {
  for (;;) {
    try {
      io.run();
      return;
    } catch (const std::exception&) {
      spdlog::error("a request handler failed with an exception; its connection was dropped");
    }
  }
}

}  // namespace

bool Server::Run(unsigned threads) {
  impl_->threads = std::max(1u, threads);
  std::vector<std::thread> pool;
  for (unsigned i = 1; i < threads; ++i) {
    pool.emplace_back([this] {
      ::pthread_setname_np(::pthread_self(), "custodyd-io");
      RunCatching(impl_->io);
    });
  }
  RunCatching(impl_->io);
  for (auto& t : pool) t.join();
  // A GET whose audit record is still being written will post its answer
  // to `io`: wait for it, so nothing posts to a destroyed loop; but not past
  // the drain deadline (and a little for the records in flight): a disk
  // that never answers must not keep the process from stopping.
  const auto deadline = (impl_->stop_requested ? impl_->drain_deadline : std::chrono::steady_clock::now()) +
                        std::chrono::seconds(2);
  while (impl_->pending_audits.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (impl_->pending_audits.load() > 0) return false;
  // The refusals of the last period, written before the log closes.
  impl_->WriteRefusals(/*wait=*/true);
  return true;
}

void Server::Post(std::function<void()> fn) { asio::post(impl_->io, std::move(fn)); }

void Server::Every(std::chrono::seconds period, std::function<void()> fn) {
  auto strand = asio::make_strand(impl_->io);
  auto t = std::make_unique<Impl::Ticker>(
      Impl::Ticker{strand, asio::steady_timer(strand), period, std::move(fn), impl_.get()});
  Impl::Ticker* raw = t.get();
  impl_->tickers.push_back(std::move(t));
  asio::post(raw->strand, [raw] { raw->Arm(); });
}

void Server::SetLimits(const ServerOptions& fresh) { impl_->limits.Set(fresh); }

void Server::Stop(std::chrono::seconds grace) {
  asio::post(impl_->io, [this, grace] {
    impl_->draining.store(true);
    beast::error_code ignored;
    if (impl_->acceptor) impl_->acceptor->close(ignored);
    if (impl_->tls_acceptor) impl_->tls_acceptor->close(ignored);
    ::unlink(impl_->options.socket_path.c_str());
    for (auto& t : impl_->tickers) {
      Impl::Ticker* raw = t.get();
      asio::post(raw->strand, [raw] { raw->timer.cancel(); });
    }
    // Requests in flight finish; connections waiting for a request close now.
    impl_->CloseIdle();
    impl_->drain_deadline = std::chrono::steady_clock::now() + grace;
    impl_->stop_requested = true;
    impl_->drain_timer.emplace(impl_->io);
    impl_->DrainCheck();
  });
}

int Server::open_connections() const { return impl_->connections.load(); }

}  // namespace custody::server
