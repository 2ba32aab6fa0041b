#include "custody/server/server.h"

#include <grp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <pwd.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "custody/common/base64.h"
#include "custody/common/inplace_json.h"
#include "custody/common/untrusted.h"
#include "custody/common/wipe.h"
#include "custody/server/peer.h"

namespace custody::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using Local = asio::local::stream_protocol;
using Stream = beast::basic_stream<Local, asio::any_io_executor, beast::unlimited_rate_policy>;
using nlohmann::json;

// Prometheus text-format metrics: counters by project, environment, action
// and decision; a latency histogram per action; health gauges.
class Metrics {
 public:
  static constexpr double kBuckets[] = {0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0};

  void Observe(const std::string& action, const std::string& project, const std::string& env,
               const std::string& decision, double seconds) {
    std::lock_guard lock(mu_);
    ++ops_[{action, project, env, decision}];
    Histogram& h = latency_[action];
    for (size_t i = 0; i < std::size(kBuckets); ++i) {
      if (seconds <= kBuckets[i]) ++h.counts[i];
    }
    ++h.count;
    h.sum += seconds;
    if (decision == "limit") ++limits_[{project, env}];
  }

  // Secrets per project, environment and rotation urgency, counted from the
  // store at most every kScheduleSeconds (a scrape must not scan the store
  // each time).
  static constexpr int kScheduleSeconds = 15;
  void RefreshSchedule(core::Custodian& c) {
    auto now = std::chrono::steady_clock::now();
    {
      std::lock_guard lock(mu_);
      if (schedule_at_ && now - *schedule_at_ < std::chrono::seconds(kScheduleSeconds)) return;
      schedule_at_ = now;
    }
    auto items = c.RotationSchedule();
    std::lock_guard lock(mu_);
    schedule_ok_ = items.ok();
    schedule_.clear();
    if (!items.ok()) return;
    for (const auto& it : *items) ++schedule_[{it.project, it.environment, core::UrgencyName(it.urgency)}];
  }

  std::string Render(core::CustodianStats& s, uint64_t usage_flush_failures, int connections, uint32_t policy_version) {
    std::lock_guard lock(mu_);
    std::string out;
    auto esc = [](const std::string& v) {
      std::string r;
      for (char c : v) {
        if (c == '"' || c == '\\') r += '\\';
        if (c == '\n') {
          r += "\\n";
          continue;
        }
        r += c;
      }
      return r;
    };
    out += "# HELP custody_operations_total Requests by action, project, environment and decision.\n";
    out += "# TYPE custody_operations_total counter\n";
    for (const auto& [k, v] : ops_) {
      out += "custody_operations_total{action=\"" + esc(k[0]) + "\",project=\"" + esc(k[1]) + "\",environment=\"" +
             esc(k[2]) + "\",decision=\"" + esc(k[3]) + "\"} " + std::to_string(v) + "\n";
    }
    out += "# HELP custody_request_duration_seconds Time from request to response.\n";
    out += "# TYPE custody_request_duration_seconds histogram\n";
    for (const auto& [action, h] : latency_) {
      for (size_t i = 0; i < std::size(kBuckets); ++i) {
        char le[32];
        std::snprintf(le, sizeof le, "%g", kBuckets[i]);
        out += "custody_request_duration_seconds_bucket{action=\"" + esc(action) + "\",le=\"" + le + "\"} " +
               std::to_string(h.counts[i]) + "\n";
      }
      out += "custody_request_duration_seconds_bucket{action=\"" + esc(action) + "\",le=\"+Inf\"} " +
             std::to_string(h.count) + "\n";
      char sum[64];
      std::snprintf(sum, sizeof sum, "%.6f", h.sum);
      out += "custody_request_duration_seconds_sum{action=\"" + esc(action) + "\"} " + sum + "\n";
      out += "custody_request_duration_seconds_count{action=\"" + esc(action) + "\"} " + std::to_string(h.count) + "\n";
    }
    out += "# HELP custody_limit_refusals_total Requests refused by a rate or spend limit.\n";
    out += "# TYPE custody_limit_refusals_total counter\n";
    for (const auto& [k, v] : limits_) {
      out += "custody_limit_refusals_total{project=\"" + esc(k.first) + "\",environment=\"" + esc(k.second) + "\"} " +
             std::to_string(v) + "\n";
    }
    out += "# TYPE custody_token_errors_total counter\ncustody_token_errors_total " +
           std::to_string(s.token_errors.load()) + "\n";
    out += "# TYPE custody_token_recoveries_total counter\ncustody_token_recoveries_total " +
           std::to_string(s.token_recoveries.load()) + "\n";
    out += "# TYPE custody_token_reinitializations_total counter\ncustody_token_reinitializations_total " +
           std::to_string(s.token_reinitializations.load()) + "\n";
    out += "# TYPE custody_audit_write_failures_total counter\ncustody_audit_write_failures_total " +
           std::to_string(s.audit_failures.load()) + "\n";
    out += "# TYPE custody_audit_healthy gauge\ncustody_audit_healthy " + std::string(s.audit_healthy ? "1" : "0") + "\n";
    out += "# HELP custody_usage_write_failures_total Times the write-behind usage counts could not be stored (kept, retried).\n";
    out += "# TYPE custody_usage_write_failures_total counter\ncustody_usage_write_failures_total " +
           std::to_string(usage_flush_failures) + "\n";
    out += "# TYPE custody_token_healthy gauge\ncustody_token_healthy " + std::string(s.token_healthy ? "1" : "0") + "\n";
    out += "# TYPE custody_connections_open gauge\ncustody_connections_open " + std::to_string(connections) + "\n";
    out += "# TYPE custody_policy_version gauge\ncustody_policy_version " + std::to_string(policy_version) + "\n";
    out += "# HELP custody_secrets Secrets by project, environment and rotation state (overdue, due-soon, ok, "
           "no-current-version, no-schedule).\n";
    out += "# TYPE custody_secrets gauge\n";
    for (const auto& [k, v] : schedule_) {
      out += "custody_secrets{project=\"" + esc(k[0]) + "\",environment=\"" + esc(k[1]) + "\",state=\"" + esc(k[2]) +
             "\"} " + std::to_string(v) + "\n";
    }
    out += "# HELP custody_secrets_overdue Secrets whose current version is older than the policy's max_age.\n";
    out += "# TYPE custody_secrets_overdue gauge\n";
    uint64_t overdue = 0;
    for (const auto& [k, v] : schedule_) overdue += k[2] == "overdue" ? v : 0;
    out += "custody_secrets_overdue " + std::to_string(overdue) + "\n";
    out += "# TYPE custody_rotation_schedule_healthy gauge\ncustody_rotation_schedule_healthy " +
           std::string(schedule_ok_ ? "1" : "0") + "\n";
    return out;
  }

 private:
  struct Histogram {
    uint64_t counts[std::size(kBuckets)] = {};
    uint64_t count = 0;
    double sum = 0;
  };
  std::mutex mu_;
  std::map<std::array<std::string, 4>, uint64_t> ops_;
  std::map<std::string, Histogram> latency_;
  std::map<std::pair<std::string, std::string>, uint64_t> limits_;
  std::optional<std::chrono::steady_clock::time_point> schedule_at_;
  std::map<std::array<std::string, 3>, uint64_t> schedule_;
  bool schedule_ok_ = true;
};

// Refusals that no request record covers: a malformed or oversized
// request, a method or endpoint that does not exist, a connection over a
// limit, a request not finished within the idle timeout. Writing one
// record each would let a stranger fill the disk, so they are summed per
// peer and written as one "http.refused" record per peer and period.
// Bounded: past kMaxPeers distinct peers in one period, the rest are summed
// under one entry.
class RefusalLog {
 public:
  static constexpr size_t kMaxPeers = 256;
  static constexpr const char* kOtherPeers = "other peers (more than 256 in this period)";

  // `peer` is shown in the record: it must already be escaped.
  void Count(const std::string& peer, const std::string& what) {
    std::lock_guard lock(mu_);
    auto it = counts_.find(peer);
    if (it == counts_.end()) {
      it = counts_.size() < kMaxPeers ? counts_.emplace(peer, Counts{}).first : counts_.try_emplace(kOtherPeers).first;
    }
    ++it->second[what];
  }

  // The records for what was counted since the last call.
  std::vector<core::AuditEvent> Take(uint32_t period_seconds) {
    std::map<std::string, Counts> counts;
    {
      std::lock_guard lock(mu_);
      counts.swap(counts_);
    }
    std::vector<core::AuditEvent> out;
    for (const auto& [peer, what] : counts) {
      core::AuditEvent e;
      e.action = "http.refused";
      e.identified_by = peer;
      e.decision = core::AuditDecision::kNone;
      e.result = core::AuditResult::kRefused;
      e.request_id = core::NewRequestId();
      std::string detail;
      uint64_t total = 0;
      for (const auto& [reason, n] : what) {
        detail += (detail.empty() ? "" : ", ") + reason + " x" + std::to_string(n);
        total += n;
      }
      e.detail = std::to_string(total) + " refused in at most " + std::to_string(period_seconds) + " s: " + detail;
      out.push_back(std::move(e));
    }
    return out;
  }

 private:
  using Counts = std::map<std::string, uint64_t>;
  std::mutex mu_;
  std::map<std::string, Counts> counts_;
};

// The label values a metric may carry for a request's project and
// environment: names the policy in force declares, else kOtherLabel. A
// name from a request that the policy does not know would otherwise make a
// new series per request (and reach the scraper unchecked).
constexpr const char* kOtherLabel = "_other";

std::pair<std::string, std::string> MetricLabels(const core::Authorizer& policy, const std::string& project,
                                                 const std::string& env) {
  const auto& engine = policy.engine();
  if (project.empty()) return {"", ""};
  if (engine.FindProject(project) == nullptr) return {kOtherLabel, env.empty() ? "" : kOtherLabel};
  if (env.empty()) return {project, ""};
  return {project, engine.FindEnvironment(project, env) != nullptr ? env : kOtherLabel};
}

struct Server::Impl {
  ServerOptions options;
  core::Custodian& custodian;
  // The limits a reload (SIGHUP) may change, read by every session; they
  // apply to requests read after the change.
  struct Limits {
    std::atomic<uint32_t> max_connections, max_connections_per_peer, idle_timeout_seconds, max_header_bytes,
        max_body_bytes, max_unidentified_connections;
    void Set(const ServerOptions& o) {
      max_connections.store(o.max_connections);
      max_unidentified_connections.store(o.max_unidentified_connections);
      max_connections_per_peer.store(o.max_connections_per_peer);
      idle_timeout_seconds.store(o.idle_timeout_seconds);
      max_header_bytes.store(o.max_header_bytes);
      max_body_bytes.store(o.max_body_bytes);
    }
  } limits;
  // Everything a session or a refusal touches when it is destroyed comes
  // before `io`: handlers still pending when the loop stops (a drain cut
  // off at its deadline) are destroyed with `io`, and with them the last
  // references to their sessions, so these members must outlive it.
  std::atomic<int> connections{0};
  // Of those, connections from peers the policy did not identify.
  std::atomic<int> unidentified{0};
  std::atomic<int> refusals{0};  // 503s over max_connections still being sent
  RefusalLog refused;
  // The places strangers share: max_unidentified_connections, and never
  // more than half of max_connections (a small max_connections keeps its
  // reserve for principals too).
  int UnidentifiedPlaces() const {
    const uint32_t all = limits.max_connections.load();
    return static_cast<int>(std::max<uint32_t>(1, std::min(limits.max_unidentified_connections.load(), all / 2)));
  }
  // Writes the refusal summaries counted so far: on the loop without
  // waiting for them (`wait` false), or at the end of Run, waiting (the
  // server may be gone before an asynchronous callback would run).
  void WriteRefusals(bool wait) {
    for (auto& e : refused.Take(options.refusal_summary_seconds)) {
      auto failed = [this] {
        custodian.stats().audit_failures.fetch_add(1);
        custodian.stats().audit_healthy.store(false);
      };
      if (wait) {
        if (!custodian.audit().Append(e).ok()) failed();
        continue;
      }
      custodian.audit().AppendAsync(e, [failed](Result<uint64_t> r) {
        if (!r.ok()) failed();
      });
    }
  }
  // Who may read /metrics and the details of /v1/health: policy admins,
  // principals with the auditor role in any project, and the configured
  // scraper uids and certificate SANs.
  bool MayReadMetrics(const core::RequestContext& rc) {
    const auto& c = rc.caller;
    if (c.uid && std::find(options.metrics_uids.begin(), options.metrics_uids.end(), *c.uid) != options.metrics_uids.end()) {
      return true;
    }
    for (const auto& san : c.tls_sans) {
      // Normalised as the policy matches it (type kept, DNS without case).
      auto typed = policy::CallerTlsSan(san);
      if (typed && std::find(options.metrics_tls_sans.begin(), options.metrics_tls_sans.end(), *typed) !=
                       options.metrics_tls_sans.end()) {
        return true;
      }
    }
    auto authz = custodian.policy();
    auto who = authz->Identify(c);
    if (!who) return false;
    if (authz->Allows(*who, policy::Action::kCreateProject, {})) return true;  // a policy admin
    const std::string& name = authz->engine().PrincipalName(*who);
    for (const auto& project : authz->engine().policy().projects) {
      for (const auto& g : project.grants) {
        if (g.principal == name && g.role == policy::Role::kAuditor) return true;
      }
    }
    return false;
  }
  // Whether the policy in force knows this peer (decides which share of
  // the connection places it may take).
  bool Known(const core::RequestContext& rc) { return custodian.policy()->Identify(rc.caller).ok(); }
  // Open connections per peer ("uid 1000", "address 10.0.0.7").
  std::mutex peers_mu;
  std::map<std::string, uint32_t> peers;
  // Counts a new connection from `peer`, unless it already has its share.
  bool AdmitPeer(const std::string& peer) {
    std::lock_guard lock(peers_mu);
    uint32_t& n = peers[peer];
    if (n >= limits.max_connections_per_peer.load()) {
      if (n == 0) peers.erase(peer);
      return false;
    }
    ++n;
    return true;
  }
  void LeavePeer(const std::string& peer) {
    std::lock_guard lock(peers_mu);
    auto it = peers.find(peer);
    if (it != peers.end() && --it->second == 0) peers.erase(it);
  }
  std::atomic<bool> draining{false};
  bool stop_requested = false;  // on the loop only
  // GETs waiting for their audit record (Custodian::GetAsync): their
  // callbacks post to `io`, so Run() waits for them before it returns.
  std::atomic<int> pending_audits{0};
  // Sessions waiting for their next request, and how to close each: on
  // Stop() they are closed at once instead of holding the drain until
  // their idle timeout. Requests in flight still finish.
  std::mutex idle_mu;
  std::map<const void*, std::function<void()>> idle;
  void CloseIdle() {
    std::map<const void*, std::function<void()>> all;
    {
      std::lock_guard lock(idle_mu);
      all.swap(idle);
    }
    for (auto& [session, close] : all) close();
  }
  Metrics metrics;
  asio::io_context io;
  std::optional<Local::acceptor> acceptor;
  std::optional<asio::ssl::context> tls;
  std::optional<asio::ip::tcp::acceptor> tls_acceptor;

  // Logs token recoveries once each, as they happen (the counters move in
  // core::Custodian, which does not log).
  std::atomic<uint64_t> logged_recoveries{0}, logged_reinits{0};
  void NoteTokenEvents() {
    auto& st = custodian.stats();
    uint64_t r = st.token_recoveries.load(), i = st.token_reinitializations.load();
    if (logged_reinits.exchange(i) < i) {
      spdlog::warn("token: the module was re-initialised after device errors ({} time(s) since start)", i);
    }
    if (logged_recoveries.exchange(r) < r) {
      spdlog::warn("token: sessions re-opened and logged in again after session or device errors ({} time(s))", r);
    }
  }

  // A periodic job on the loop; owned by Impl, so callbacks may hold `this`.
  struct Ticker {
    asio::steady_timer timer;
    std::chrono::seconds period;
    std::function<void()> fn;
    Impl* impl;
    void Arm() {
      timer.expires_after(period);
      timer.async_wait([this](beast::error_code ec) {
        if (ec || impl->draining.load()) return;
        fn();
        Arm();
      });
    }
  };
  std::vector<std::unique_ptr<Ticker>> tickers;
  std::optional<asio::steady_timer> drain_timer;
  std::chrono::steady_clock::time_point drain_deadline;

  Impl(ServerOptions o, core::Custodian& c) : options(std::move(o)), custodian(c) { limits.Set(options); }
  void Accept();
  void Refuse(Local::socket socket, const std::string& why);
  void AcceptTls();
  // Ends the loop once no connection is open, or at the drain deadline.
  void DrainCheck() {
    if (connections.load() == 0 || std::chrono::steady_clock::now() >= drain_deadline) {
      io.stop();
      return;
    }
    drain_timer->expires_after(std::chrono::milliseconds(50));
    drain_timer->async_wait([this](beast::error_code) { DrainCheck(); });
  }
};

namespace {

using TlsStream = beast::ssl_stream<beast::tcp_stream>;

// The transport underneath: a plain Unix socket stream, or TLS over TCP.
auto& Lowest(Stream& s) { return s; }
auto& Lowest(TlsStream& s) { return beast::get_lowest_layer(s); }
void Shutdown(Stream& s) {
  beast::error_code ignored;
  s.socket().shutdown(Local::socket::shutdown_both, ignored);
  s.close();
}
void Shutdown(TlsStream& s) {
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
    // The request body may hold a value being stored: wipe it.
    OPENSSL_cleanse(req.body().data(), req.body().size());
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
  void StartGet(const core::SecretPath& sp, std::optional<uint32_t> version) {
    audited_ = true;
    srv_.pending_audits.fetch_add(1);
    srv_.custodian.GetAsync(peer_, sp, version, [self = this->shared_from_this(), sp](Result<core::Unsealed> u) {
      auto got = std::make_shared<Result<core::Unsealed>>(std::move(u));
      asio::post(self->stream_.get_executor(), [self, got, sp] { self->Answer(self->GetAnswer(sp, *got)); });
      self->srv_.pending_audits.fetch_sub(1);
    });
  }

  http::response<http::string_body> GetAnswer(const core::SecretPath& sp, Result<core::Unsealed>& u) {
    if (!u) return FromError(u.error());
    std::string_view value = u->value.RevealString(SecretAccess{});
    // Written straight into a body reserved at its largest size: no JSON
    // writer's buffer and no reallocation leaves a copy of the value behind.
    // The body is wiped after it is written (see OnWrite).
    const std::string path = json(sp.str()).dump();
    const std::string version = std::to_string(u->version);
    http::response<http::string_body> res{http::status::ok, 11};
    res.set(http::field::content_type, "application/json");
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

  http::response<http::string_body> Error(int status, const std::string& message, Category category = Category::kUsage,
                                          uint64_t retry_after = 0) {
    if (decision_ == "allow") decision_ = "error";
    http::response<http::string_body> res{static_cast<http::status>(status), 11};
    res.set(http::field::content_type, "application/json");
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

  http::response<http::string_body> FromError(const custody::Error& e) {
    decision_ = e.category() == Category::kDenied  ? "deny"
                : e.category() == Category::kLimit ? "limit"
                                                   : "error";
    int status = e.http_status();
    uint64_t retry = e.retry_after().value_or(0);
    // Token, system and audit-log failures are the operator's business: in
    // the server log (their messages are custody's own, never a caller's).
    if (e.backend() == Backend::kPkcs11 || e.backend() == Backend::kOs || e.category() == Category::kUnavailable) {
      spdlog::warn("request {}: {} {}/{}: {}", peer_.request_id, action_, project_, env_, e.message());
    }
    return Error(status, e.message(), e.category(), retry);
  }

  http::response<http::string_body> Json(int status, const json& j) {
    http::response<http::string_body> res{static_cast<http::status>(status), 11};
    res.set(http::field::content_type, "application/json");
    // `replace`: no answer can throw on a string that slipped past the edge.
    res.body() = j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
    return res;
  }

  // The answer, or nothing when it will come from StartGet.
  std::optional<http::response<http::string_body>> Handle(http::request<http::string_body>& req) {
    peer_.request_id = core::NewRequestId();
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
      auto& st = srv_.custodian.stats();
      bool ok = st.audit_healthy.load() && st.token_healthy.load();
      // Anyone who can connect learns whether this node can serve (a load
      // balancer needs no more); what fails and the policy version are for
      // the readers of /metrics.
      if (!srv_.MayReadMetrics(peer_)) return Json(ok ? 200 : 503, {{"status", ok ? "ok" : "degraded"}});
      return Json(ok ? 200 : 503, {{"status", ok ? "ok" : "degraded"},
                                   {"audit", st.audit_healthy.load() ? "ok" : "failing: records cannot be written"},
                                   {"token", st.token_healthy.load() ? "ok" : "failing: see custody_token_errors_total"},
                                   {"policy_version", srv_.custodian.policy()->version()}});
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
      srv_.metrics.RefreshSchedule(srv_.custodian);
      res.body() = srv_.metrics.Render(srv_.custodian.stats(), srv_.custodian.usage_flush_failures(), srv_.connections.load(),
                                       srv_.custodian.policy()->version());
      return res;
    }
    if (path == "/v1/usage") {
      action_ = "usage.read";
      if (req.method() != http::verb::get) return Error(405, "use GET for /v1/usage");
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
    constexpr std::string_view kSecrets = "/v1/secrets/";
    if (path.substr(0, kSecrets.size()) == kSecrets) {
      auto sp = core::SecretPath::Parse(path.substr(kSecrets.size()));
      if (!sp) return FromError(sp.error());
      project_ = sp->project;
      env_ = sp->environment;
      if (req.method() == http::verb::get) {
        action_ = "secret.get";
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
        audited_ = true;
        auto v = srv_.custodian.Put(peer_, *sp, *value);
        if (!v) return FromError(v.error());
        return Json(201, {{"path", sp->str()}, {"version", *v}});
      }
      return Error(405, "use GET or PUT for /v1/secrets/PROJECT/ENV/NAME");
    }
    return Error(404, "no such endpoint: " + EscapeUntrusted(path, 64), Category::kNotFound);
  }

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
std::optional<core::RequestContext> PeerOf(Local::socket& s) {
  struct ucred cred {};
  socklen_t len = sizeof cred;
  if (::getsockopt(s.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return std::nullopt;
  return PeerFromCredentials(cred.uid, cred.gid, static_cast<uint32_t>(cred.pid));
}

// The client certificate's word on who it is. The handshake already checked
// that it chains to the configured CA.
std::optional<core::RequestContext> PeerOf(TlsStream& s) {
  X509* cert = SSL_get0_peer_certificate(s.native_handle());
  if (cert == nullptr) return std::nullopt;
  return PeerFromCertificate(cert);
}

}  // namespace

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
        if (!peer) return;
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
  ctx.set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert);
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
  auto t = std::make_unique<Impl::Ticker>(Impl::Ticker{asio::steady_timer(impl_->io), period, std::move(fn), impl_.get()});
  Impl::Ticker* raw = t.get();
  impl_->tickers.push_back(std::move(t));
  asio::post(impl_->io, [raw] { raw->Arm(); });
}

void Server::SetLimits(const ServerOptions& fresh) { impl_->limits.Set(fresh); }

void Server::Stop(std::chrono::seconds grace) {
  asio::post(impl_->io, [this, grace] {
    impl_->draining.store(true);
    beast::error_code ignored;
    if (impl_->acceptor) impl_->acceptor->close(ignored);
    if (impl_->tls_acceptor) impl_->tls_acceptor->close(ignored);
    ::unlink(impl_->options.socket_path.c_str());
    for (auto& t : impl_->tickers) t->timer.cancel();
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
