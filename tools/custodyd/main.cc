// custodyd: holds the token session and serves sealed keys to local
// processes over a Unix socket, enforcing the policy, the limits and the
// audit log on every request. Clients never see the PIN.
//
//   custodyd --config /etc/custody/custody.toml [--pin-fd N]
//   custodyd --version
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <boost/asio/signal_set.hpp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "custody/app/backend.h"
#include "custody/audit/deadline_signer.h"
#include "custody/seal/deadline_sealer.h"
#include "custody/app/config.h"
#include "custody/audit/audit.h"
#include "custody/common/secret.h"
#include "custody/hsm/token_signer.h"
#include "custody/server/server.h"
#include "custody/service/authz.h"
#include "custody/service/custodian.h"
#include "custody/service/service.h"
#include "custody/store/store.h"
#include "custody/tpm/tpm_signer.h"
#include "custody/common/untrusted.h"
#include "custody/version.h"
#include "token_key.h"

namespace {

using custody::Category;
using custody::Status;

// SIGTERM: requests in flight get this long to finish. The whole stop ends
// within it and the margin, whatever hangs (under systemd's TimeoutStopSec
// of 15 s in dist/custodyd.service, so custodyd says why before a SIGKILL).
constexpr std::chrono::seconds kDrainGrace{10};
constexpr std::chrono::seconds kStopMargin{4};

int Fail(const custody::Error& e) {
  spdlog::error("{}", e.message());
  std::fprintf(stderr, "custodyd: %s\n", e.message().c_str());
  return e.exit_code();
}

}  // namespace

int main(int argc, char** argv) {
  custody::HardenProcess();
  ::umask(077);
  ::signal(SIGPIPE, SIG_IGN);

  CLI::App app{"custodyd: serves sealed keys over a Unix socket under the custody policy", "custodyd"};
  std::optional<std::string> config_flag;
  std::optional<int> pin_fd;
  // An empty value (a unit's unset variable) is refused, not read as not
  // given: that would serve another config, or look for the PIN elsewhere.
  const CLI::Validator not_empty(
      [](std::string& v) { return v.empty() ? std::string("empty; give a value") : std::string(); }, "", "not empty");
  app.add_option("--config", config_flag, "config file (default: $CUSTODY_CONFIG, then /etc/custody/custody.toml)")
      ->check(not_empty);
  app.add_option("--pin-fd", pin_fd, "read the token PIN from this file descriptor")->check(not_empty);
  // Answered during the parse, before the config is looked for.
  app.set_version_flag("--version", custody::VersionLine("custodyd"), "print the version and the backends built in");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // CLI11 quotes the arguments it did not expect: shown escaped.
    std::fprintf(stderr, "custodyd: %s (see 'custodyd --help')\n", custody::EscapeUntrusted(e.what(), 1024).c_str());
    return 64;
  }
  // Operational logs go to stderr (the journal under systemd); never a value or a PIN.
  spdlog::set_default_logger(spdlog::stderr_logger_mt("custodyd"));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");

  std::string config_path = custody::core::LocateConfig(config_flag);
  auto config = custody::core::LoadConfig(config_path);
  if (!config) return Fail(config.error());
  auto store = custody::core::OpenStore(*config, /*create=*/false);
  if (!store) return Fail(store.error());
  (*store)->EnableReadCache();
  auto audit = custody::core::OpenAuditLog(*config);
  if (!audit) return Fail(std::move(audit).error().Wrap("refusing to serve without an audit log"));
  auto authz = custody::core::Authorizer::Load(**store);
  if (!authz) return Fail(authz.error());

  // Log in once; the PIN buffer is wiped once the pool (and libp11, for a
  // TLS key in the token) have logged in.
  custody::core::SealingBackend backend;
  std::optional<custody::SecretBuffer> pin_held;
  {
    auto pin = custody::core::ResolvePin(*config, pin_fd);
    if (!pin) return Fail(pin.error());
    auto b = custody::core::OpenBackend(*config, *pin, **store);
    if (!b) return Fail(b.error());
    backend = std::move(*b);
    pin_held.emplace(std::move(*pin));
  }
  // Token and TPM calls of requests run under [token] call_timeout: a hung
  // call costs its request a 503, never a server thread for longer.
  custody::core::DeadlineSealer sealer(
      *backend.sealer, {std::chrono::milliseconds(config->token.call_timeout_ms), /*max_calls=*/16});
  custody::core::Custodian custodian(**store, **audit, sealer,
                                     std::make_shared<const custody::core::Authorizer>(std::move(*authz)));
  auto signer = custody::core::OpenAuditSigner(backend, *config, *pin_held, /*create=*/true, store->get());
  if (!signer) return Fail(signer.error());
  // A checkpoint is signed inside an audit batch: a C_Sign that hangs must
  // not hold the records of the requests in that batch past the deadline.
  custody::core::DeadlineSigner checkpoint_signer(**signer, std::chrono::milliseconds(config->token.call_timeout_ms));

  // Access tokens of the Vault-compatible API (docs/VAULT_COMPAT.md).
  std::optional<custody::core::AccessTokens> access_tokens;
  {
    auto key = custody::core::LoadAccessTokenKey(*config);
    if (!key) return Fail(key.error());
    if (*key) {
      access_tokens.emplace(**store, std::move(**key));
      custodian.SetAccessTokens(&*access_tokens);
    } else {
      spdlog::info("no access tokens: with a PostgreSQL store, name the same [server] token_key_file on every node");
    }
  }
  custody::server::ServerOptions options;
  static_cast<custody::server::ServerSettings&>(options) = config->server;
  if (options.tls_key.rfind("pkcs11:", 0) == 0) {
    if (backend.is_tpm()) {
      return Fail(custody::Error(custody::Category::kConfig,
                                 "server.tls_key is a pkcs11: URI but the backend is the TPM; use a PEM key file"));
    }
    // libp11 holds its own sessions and key handles on this module for the
    // TLS key and cannot re-open them: a module re-initialisation would
    // leave TLS broken. Session and login recovery still happen; a token
    // that needs more says so, and custodyd must be restarted.
    backend.token.pool->set_allow_reinitialize(false);
  }
  options.node_name = config->node.name;
  options.version = std::string(custody::kVersion);
  options.token_key = [&](const std::string& uri) { return custody::server::LoadTokenKey(*config, uri, *pin_held); };
  custody::server::Server server(options, custodian);
  Status listening = server.Listen();
  pin_held.reset();  // wiped
  if (!listening.ok()) return Fail(listening.error());

  // Checkpoints are signed here, on the server's own schedule.
  auto checkpoint = [&] {
    if (!(*audit)->CheckpointDue()) return;
    std::pair<uint64_t, std::string> covers;
    auto seq = (*audit)->Checkpoint(checkpoint_signer, &covers);
    if (seq) {
      if (!custody::core::AuditInStore(*config)) {
        (void)(*store)->RecordAuditCheckpoint(config->node.name, *seq, covers.second);
      }
    } else {
      spdlog::warn("audit checkpoint failed: {}", seq.error().message());
    }
  };
  server.Every(std::chrono::seconds(1), checkpoint);
  // GETs queued behind a batch whose fsync does not return (a disk that
  // stopped answering) are refused at [audit] timeout_ms, not held for ever.
  server.Every(std::chrono::seconds(1), [&] {
    if (const size_t n = (*audit)->ExpireQueued(); n > 0) {
      spdlog::warn("audit log: {} request(s) refused after waiting {} ms for the disk", n, config->audit.timeout.count());
    }
  });

  // The policy watcher: a policy applied through any node (or the CLI on any
  // host sharing the store) is in force here within about a second, with
  // no restart. One cheap query (the newest version) every half second, on
  // a thread of its own so a slow store never holds the server's loop.
  std::mutex watch_mu;
  std::condition_variable watch_cv;
  bool watch_stop = false;
  std::thread policy_watcher([&] {
    uint32_t said_in_force = custodian.policy()->version();
    std::string said_problem;
    bool said_store_down = false;
    std::unique_lock lock(watch_mu);
    while (!watch_cv.wait_for(lock, std::chrono::milliseconds(500), [&] { return watch_stop; })) {
      lock.unlock();
      auto r = custodian.RefreshPolicy();
      const auto state = custodian.policy_state();
      if (r && *r != said_in_force) {
        spdlog::info("policy v{} in force (was v{}): applied through the store", *r, said_in_force);
        said_in_force = *r;
      }
      if (!state.problem.empty() && state.problem != said_problem) spdlog::error("{}", state.problem);
      said_problem = state.problem;
      const bool store_down = !custodian.stats().store_healthy.load();
      if (store_down && !said_store_down) spdlog::error("the store cannot be read: {}", r.error().message());
      if (!store_down && said_store_down) spdlog::info("the store can be read again");
      said_store_down = store_down;
      lock.lock();
    }
  });

  boost::asio::io_context signal_io;
  boost::asio::signal_set signals(signal_io, SIGTERM, SIGINT, SIGHUP);
  std::function<void()> wait_signal;
  wait_signal = [&] {
    signals.async_wait([&](const boost::system::error_code& ec, int sig) {
      if (ec) return;
      if (sig == SIGHUP) {
        // Reload: the config must still parse and the policy in force is
        // re-read from the store; anything wrong keeps what runs now.
        sd_notify(0, "RELOADING=1");
        auto fresh = custody::core::LoadConfig(config_path);
        if (!fresh) {
          spdlog::error("reload refused, keeping the running config: {}", fresh.error().message());
        } else if (auto next = custodian.RefreshPolicy(/*retry=*/true); !next) {
          spdlog::error("reload refused, keeping policy v{}: {}", custodian.policy()->version(), next.error().message());
        } else {
          custody::server::ServerOptions limits;
          static_cast<custody::server::ServerSettings&>(limits) = fresh->server;
          server.SetLimits(limits);
          spdlog::info("reloaded: policy v{} in force; limits: {} connections, idle {} s, headers {} B, body {} B",
                       custodian.policy()->version(), fresh->server.max_connections,
                       fresh->server.idle_timeout_seconds, fresh->server.max_header_bytes,
                       fresh->server.max_body_bytes);
          // What the running server cannot change: said, not silently dropped.
          auto note = [](const char* key, bool changed) {
            if (changed) spdlog::warn("reload: {} changed; restart custodyd to apply it", key);
          };
          const auto& c = *config;
          const auto& f = *fresh;
          for (const auto& key : custody::server::ChangesNeedingRestart(c.server, f.server)) {
            note(("[server] " + key).c_str(), true);
          }
          note("[token]", c.token != f.token);
          note("state_dir", c.state_dir != f.state_dir);
          note("[store]", c.store != f.store);
          note("[audit]", c.audit != f.audit);
        }
        sd_notify(0, "READY=1");
        wait_signal();
        return;
      }
      spdlog::info("signal {}: draining and stopping", sig);
      sd_notify(0, "STOPPING=1");
      server.Stop(kDrainGrace);
      // The stop's last resort. Every step of the stop has its own deadline,
      // but a thread inside a call that never returns (an fdatasync on a
      // disk that stopped answering, taken by a PUT's record or a summary
      // record; a token call) cannot be joined, and a destructor that joins
      // it would hang the process for ever. Past the drain and a margin,
      // end without closing anything: nothing is released without its
      // record, and a PUT whose record was not durable was not stored.
      static std::once_flag armed;
      std::call_once(armed, [] {
        std::thread([] {
          std::this_thread::sleep_for(kDrainGrace + kStopMargin);
          spdlog::error("not stopped {} s after the stop signal: a disk or token call has not returned; exiting "
                        "without closing the token or the audit log",
                        (kDrainGrace + kStopMargin).count());
          spdlog::default_logger()->flush();
          std::fflush(nullptr);
          std::_Exit(69);
        }).detach();
      });
    });
  };
  wait_signal();
  std::thread signal_thread([&] { signal_io.run(); });

  const unsigned threads =
      config->server.threads != 0 ? config->server.threads : std::max(2u, std::thread::hardware_concurrency());
  if (!config->server.tls_listen.empty()) spdlog::info("serving TLS 1.3 with client certificates on {}", config->server.tls_listen);
  spdlog::info("serving on {} (policy v{}, token {}, {} threads)", config->server.socket_path,
               custodian.policy()->version(),
               backend.is_tpm() ? "tpm " + config->token.tpm.tcti : config->token.pkcs11.uri, threads);
  sd_notify(0, "READY=1");
  if (!server.Run(threads)) {
    // Requests still wait for records the disk has not taken by the drain
    // deadline. Their values are never released (no record, no value), but
    // their callbacks may still run: end here without destroying anything.
    spdlog::error("stopped with requests still waiting for their audit records (the audit disk does not "
                  "answer); they were not answered");
    std::fflush(nullptr);
    std::_Exit(69);
  }
  signal_io.stop();
  signal_thread.join();
  {
    std::lock_guard lock(watch_mu);
    watch_stop = true;
  }
  watch_cv.notify_all();
  policy_watcher.join();
  checkpoint();
  // A token call still hung: closing the token under it (C_CloseSession,
  // C_Finalize) could hang too or free what it uses. End without closing.
  if (!sealer.Drain(std::chrono::milliseconds(config->token.call_timeout_ms)) ||
      !checkpoint_signer.Drain(std::chrono::milliseconds(config->token.call_timeout_ms))) {
    spdlog::error("stopped with a token call that has not returned; exiting without closing the token");
    std::fflush(nullptr);
    std::_Exit(69);
  }
  spdlog::info("stopped");
  return 0;
}
