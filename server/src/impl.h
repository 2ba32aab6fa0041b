// Server::Impl: the state every session, listener and timer of one server
// shares.
// Private to the server library: included by its own sources only.
#pragma once

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

#include "custody/server/server.h"
#include "metrics.h"
#include "refusal_log.h"

namespace custody::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using Local = asio::local::stream_protocol;
using Stream = beast::basic_stream<Local, asio::any_io_executor, beast::unlimited_rate_policy>;
using nlohmann::json;

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
      auto failed = [this](const Error& why) {
        custodian.stats().audit_failures.fetch_add(1);
        custodian.stats().NoteAudit(why.message());
      };
      if (wait) {
        if (auto r = custodian.audit().Append(e); !r.ok()) failed(r.error());
        continue;
      }
      custodian.audit().AppendAsync(e, [failed](Result<uint64_t> r) {
        if (!r.ok()) failed(r.error());
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
  // Whether this node can serve now, for both health endpoints: records can
  // be written and no write has stalled, the token answers and no call to
  // it is out past its deadline, the store can be read. Refreshes the
  // stall figures in custodian.stats() that the detailed answer shows.
  struct Health {
    bool ok = false;
    bool audit_stalled = false;
    uint64_t token_hung = 0;
  };
  Health CheckHealth() {
    custodian.RefreshTokenStalls();
    Health h;
    h.audit_stalled = custodian.RefreshAuditStall();
    const auto& st = custodian.stats();
    h.token_hung = st.token_hung.load();
    h.ok = st.audit_healthy.load() && !h.audit_stalled && st.token_healthy.load() && st.store_healthy.load() &&
           h.token_hung == 0;
    return h;
  }
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
  unsigned threads = 1;  // request threads, set by Run()
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
  // Its timer lives on a strand of its own: the loop runs on several
  // threads, and re-arming (in the handler) and cancelling (in Stop) must
  // never touch the timer at once.
  struct Ticker {
    asio::strand<asio::io_context::executor_type> strand;
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


}  // namespace custody::server
