// Several custodyd nodes on one PostgreSQL store and one SoftHSM2 token, in
// one run: one, two and three nodes, 16 clients spread over them, each
// client GETting one secret in a loop. Per row: the total rate, p50 and p99,
// the nodes' CPU time per GET (all their threads, summed), PostgreSQL's CPU
// time per GET (its processes, from /proc) and the statements each GET sent
// to PostgreSQL (pg_stat_statements), the audit trail's batches included.
//
// On a 2-core machine the clients, the nodes and PostgreSQL share two cores,
// so the total rate cannot grow with nodes: what the run shows is the cost
// per GET on each side, from which the capacity model follows (printed at
// the end): GETs per second per node core = 1e6 / node CPU us per GET, and
// what PostgreSQL must take per node at that rate.
//
//   build/rel/bench/cluster_bench            (CLUSTER_BENCH_SECONDS=N, default 3)
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "custody/app/config.h"
#include "server_support.h"

namespace {

using namespace bench;
const std::string kPin = "bench-pin-1234";

// CPU time of every postgres process on the machine (the postmaster and
// its backends; backends rename themselves, so they are told by their
// command name), in microseconds. The bench's server is the only one while
// it runs: do not run it beside the test suite.
double PostgresCpuMicros() {
  double us = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream comm(e.path() / "comm");
    std::string c;
    if (comm >> c && c.rfind("postgres", 0) == 0) us += CpuMicros(static_cast<pid_t>(std::stol(name)));
  }
  return us;
}

}  // namespace

int main() {
  char tmpl[] = "/var/tmp/custody-cluster-bench-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) Die("mkdtemp");
  const std::string dir = tmpl;
  ::chmod(dir.c_str(), 0755);
  std::filesystem::create_directories(dir + "/tokens");
  const std::string conf = dir + "/softhsm2.conf";
  std::ofstream(conf) << "directories.tokendir = " << dir << "/tokens\nobjectstore.backend = file\nlog.level = ERROR\n";
  ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  const std::string cfg = dir + "/state/custody.toml";
  ::setenv("CUSTODY_CONFIG", cfg.c_str(), 1);
  std::ofstream(dir + "/pin") << kPin << "\n";
  ::chmod((dir + "/pin").c_str(), 0600);
  const std::string custody = CUSTODY_BIN, custodyd = CUSTODYD_BIN;

  std::string pg_bindir;
  const std::string url = StartPostgres(dir + "/pg", &pg_bindir);
  if (url.empty()) Die("PostgreSQL is not installed (ci/install-deps.sh installs it)");
  Sh("softhsm2-util --init-token --free --label bench --so-pin bench-so-5678 --pin " + kPin + " >/dev/null");
  Sh(custody + " init --module /usr/lib/softhsm/libsofthsm2.so --token pkcs11:token=bench --pin-file " + dir +
     "/pin --state-dir " + dir + "/state --store '" + url + "' >/dev/null");
  std::ofstream(dir + "/policy.toml") << "version = 1\nadmins = [\"user:bench\"]\n[principals.\"user:bench\"]\nuid = "
                                      << ::getuid()
                                      << "\n[projects.bench.environments.prod]\n[[projects.bench.grants]]\n"
                                         "principal = \"user:bench\"\nrole = \"owner\"\n";
  Sh(custody + " policy apply " + dir + "/policy.toml >/dev/null");
  Sh("head -c 48 /dev/urandom | base64 | head -c 64 | " + custody + " secret put bench/prod/api-key >/dev/null");

  // Three node configs: the same file with its own name and socket (each
  // node's audit chain is in the store).
  auto loaded = custody::core::LoadConfig(cfg);
  if (!loaded) Die(loaded.error().message());
  std::vector<std::string> sockets, configs;
  for (int i = 0; i < 3; ++i) {
    const std::string name = "node-" + std::string(1, static_cast<char>('a' + i));
    custody::core::Config c = *loaded;
    c.node = {name, true};
    c.server.socket_path = dir + "/" + name + ".sock";
    c.server.max_connections = 1024;
    c.server.max_connections_per_peer = 1024;
    sockets.push_back(c.server.socket_path);
    configs.push_back(dir + "/state/" + name + ".toml");
    if (auto s = custody::core::WriteConfig(c, configs.back()); !s.ok()) Die(s.error().message());
  }
  std::vector<pid_t> nodes;
  auto start = [&](size_t i) {
    pid_t pid = ::fork();
    if (pid == 0) {
      ::setenv("CUSTODY_CONFIG", configs[i].c_str(), 1);
      FILE* log = std::freopen((configs[i] + ".log").c_str(), "a", stderr);  // kept out of the table
      (void)log;
      ::execl(custodyd.c_str(), custodyd.c_str(), nullptr);
      ::_exit(127);
    }
    for (int n = 0; n < 200 && !std::filesystem::exists(sockets[i]); ++n) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (!std::filesystem::exists(sockets[i])) Die("custodyd " + configs[i] + " did not start");
    nodes.push_back(pid);
  };

  const char* secs_env = std::getenv("CLUSTER_BENCH_SECONDS");
  const auto secs = std::chrono::seconds(secs_env ? std::max(1, std::atoi(secs_env)) : 3);
  std::printf("%-6s %10s %8s %8s %12s %10s %12s %8s\n", "nodes", "GETs/s", "p50 ms", "p99 ms", "node cpu us",
              "pg cpu us", "stmts/GET", "errors");
  double node_us_3 = 0, pg_us_3 = 0, stmts_3 = 0;
  for (size_t n = 1; n <= 3; ++n) {
    start(n - 1);
    std::vector<std::string> active(sockets.begin(), sockets.begin() + static_cast<long>(n));
    ServerRun(nodes, active, 4, std::chrono::seconds(1));  // warm up (each node's token sessions, connections)
    const double pg0 = PostgresCpuMicros();
    const double st0 = PgStatements(pg_bindir, url);
    Run r = ServerRun(nodes, active, 16, secs);
    const double gets = r.rate * static_cast<double>(secs.count());
    const double pg_us = gets > 0 ? (PostgresCpuMicros() - pg0) / gets : 0;
    const double stmts = gets > 0 ? (PgStatements(pg_bindir, url) - st0) / gets : 0;
    std::printf("%-6zu %10.0f %8.3f %8.3f %12.1f %10.1f %12.2f %8llu\n", n, r.rate, r.p50_ms, r.p99_ms, r.server_us,
                pg_us, stmts, static_cast<unsigned long long>(r.errors));
    node_us_3 = r.server_us;
    pg_us_3 = pg_us;
    stmts_3 = stmts;
  }
  if (node_us_3 > 0) {
    const double per_core = 1e6 / node_us_3;
    std::printf("\ncapacity model (from the 3-node row): one node core serves about %.0f GETs/s; at that rate "
                "each node sends PostgreSQL %.0f statements/s and takes %.2f of a PostgreSQL core.\n"
                "On this 2-core machine the 16 client threads, the nodes and PostgreSQL share the cores, so the "
                "total rate cannot grow with nodes; on hosts of their own it grows with nodes until PostgreSQL "
                "is the limit (about %.0f GETs/s per PostgreSQL core).\n",
                per_core, per_core * stmts_3, per_core * pg_us_3 / 1e6, pg_us_3 > 0 ? 1e6 / pg_us_3 : 0.0);
  }
  for (pid_t p : nodes) ::kill(p, SIGTERM);
  for (pid_t p : nodes) ::waitpid(p, nullptr, 0);
  const std::string as = ::geteuid() == 0 ? "setpriv --reuid=65534 --regid=65534 --clear-groups " : "";
  Sh(as + pg_bindir + "/pg_ctl -D " + dir + "/pg/data -m fast -w stop >/dev/null");
  std::filesystem::remove_all(dir);
  return 0;
}
