// What the server benches share: running shell steps, a load of N client
// threads against one custodyd (rate, latency percentiles, the server's CPU
// per request), and a PostgreSQL server of the bench's own with
// pg_stat_statements. Included by bench/server_bench.cc and
// bench/cluster_bench.cc only.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "custody/client/client.h"

namespace bench {

using Clock = std::chrono::steady_clock;

[[noreturn]] inline void Die(const std::string& what) {
  std::fprintf(stderr, "bench: %s\n", what.c_str());
  std::exit(1);
}

inline void Sh(const std::string& cmd) {
  if (std::system(cmd.c_str()) != 0) Die("failed: " + cmd);
}

struct Run {
  int clients = 0;
  double rate = 0, p50_ms = 0, p90_ms = 0, p99_ms = 0, p999_ms = 0;
  double server_us = 0;  // custodyd CPU time per request, all its threads
  double server_switches = 0;  // custodyd context switches per request, all its threads
  double records_per_batch = 0;  // audit records per fsync (custodyd's /metrics); 0: unknown
  uint64_t errors = 0;
};

// CPU time a process has used so far, all threads, in microseconds (the
// scheduler's own account, in ns, from /proc/PID/task/*/schedstat). Less
// noisy than a rate on a shared machine: it does not count time spent
// waiting for a core.
inline double CpuMicros(pid_t pid) {
  double ns = 0;
  std::error_code ec;
  for (const auto& t : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::ifstream in(t.path() / "schedstat");
    double run = 0;
    if (in >> run) ns += run;
  }
  return ns / 1000.0;
}

// Context switches a process has made so far, all threads, voluntary or
// not (/proc/PID/task/*/status). Each is a hand-off between threads or a
// wait for the disk; on a virtual machine each costs more than on bare
// metal, so their count per request says more than a rate. Only threads
// alive when it is read count: custodyd keeps its threads for its life,
// so none is lost between two readings.
inline double ContextSwitches(pid_t pid) {
  double n = 0;
  std::error_code ec;
  for (const auto& t : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::ifstream in(t.path() / "status");
    std::string key;
    double v = 0;
    while (in >> key) {
      if (key == "voluntary_ctxt_switches:" || key == "nonvoluntary_ctxt_switches:") {
        if (in >> v) n += v;
      }
    }
  }
  return n;
}

// custody_audit_batches_total and custody_audit_records_total from
// custodyd's /metrics (the bench's user is a policy admin); zeros when
// they cannot be read.
inline std::pair<double, double> AuditBatches(const std::string& socket) {
  auto client = custody::client::Client::Connect("unix:" + socket);
  if (!client) return {0, 0};
  auto m = client->Fetch("/metrics");
  if (!m) return {0, 0};
  // "NAME{node=\"...\"} VALUE": the value after the line's last space.
  auto value = [&](const std::string& name) {
    const size_t at = m->find("\n" + name);
    if (at == std::string::npos) return 0.0;
    const size_t eol = m->find('\n', at + 1);
    const size_t sp = m->rfind(' ', eol);
    return sp == std::string::npos || sp < at ? 0.0 : std::atof(m->c_str() + sp + 1);
  };
  return {value("custody_audit_batches_total"), value("custody_audit_records_total")};
}

// `clients` threads, each GETting `secret` (or fetching `target`) in a loop
// for `length`, client c through sockets[c % n]; the CPU time counted is
// that of every process in `servers`, per request.
inline Run ServerRun(const std::vector<pid_t>& servers, const std::vector<std::string>& sockets, int clients,
                     std::chrono::seconds length, const std::string& target = "",
                     const std::string& secret = "bench/prod/api-key",
                     const custody::client::Client::Headers& headers = {}) {
  auto cpu = [&] {
    double us = 0;
    for (pid_t p : servers) us += CpuMicros(p);
    return us;
  };
  auto switches = [&] {
    double n = 0;
    for (pid_t p : servers) n += ContextSwitches(p);
    return n;
  };
  const auto batches0 = AuditBatches(sockets.front());
  const double cpu0 = cpu(), switches0 = switches();
  std::vector<std::vector<double>> lat(static_cast<size_t>(clients));
  std::atomic<uint64_t> errors{0};
  std::vector<std::thread> threads;
  auto t0 = Clock::now();
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      auto client = custody::client::Client::Connect("unix:" + sockets[static_cast<size_t>(c) % sockets.size()]);
      while (Clock::now() - t0 < length) {
        auto s = Clock::now();
        // A secret, or (for the floor) another endpoint's body.
        std::optional<custody::Error> failed;
        if (target.empty()) {
          auto f = client->Get(secret);
          if (!f) failed = f.error();
        } else {
          auto f = client->Fetch(target, headers);
          if (!f) failed = f.error();
        }
        lat[static_cast<size_t>(c)].push_back(std::chrono::duration<double, std::milli>(Clock::now() - s).count());
        if (failed && errors.fetch_add(1) == 0) std::fprintf(stderr, "bench: first error: %s\n", failed->message().c_str());
      }
    });
  }
  for (auto& t : threads) t.join();
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> all;
  for (auto& v : lat) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  Run r;
  r.clients = clients;
  r.rate = all.size() / secs;
  r.p50_ms = all.empty() ? 0 : all[all.size() / 2];
  auto at = [&](size_t per_mille) { return all.empty() ? 0 : all[std::min(all.size() - 1, all.size() * per_mille / 1000)]; };
  r.p90_ms = at(900);
  r.p99_ms = at(990);
  r.p999_ms = at(999);
  r.errors = errors.load();
  r.server_us = all.empty() ? 0 : (cpu() - cpu0) / static_cast<double>(all.size());
  r.server_switches = all.empty() ? 0 : (switches() - switches0) / static_cast<double>(all.size());
  const auto batches1 = AuditBatches(sockets.front());
  if (batches1.first > batches0.first) {
    r.records_per_batch = (batches1.second - batches0.second) / (batches1.first - batches0.first);
  }
  return r;
}

// One custodyd.
inline Run ServerRun(pid_t server, const std::string& socket, int clients, std::chrono::seconds length,
                     const std::string& target = "", const std::string& secret = "bench/prod/api-key",
                     const custody::client::Client::Headers& headers = {}) {
  return ServerRun(std::vector<pid_t>{server}, std::vector<std::string>{socket}, clients, length, target, secret,
                   headers);
}

// A PostgreSQL server for the PostgreSQL row, in `dir` (as nobody when
// root: PostgreSQL refuses root). Returns its libpq URL for database
// "custody", or "" if PostgreSQL is not installed.
inline std::string StartPostgres(const std::string& dir, std::string* bindir_out) {
  std::string bindir;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/usr/lib/postgresql", ec)) {
    if (std::filesystem::exists(e.path() / "bin/initdb")) bindir = (e.path() / "bin").string();
  }
  if (bindir.empty()) return "";
  *bindir_out = bindir;
  std::filesystem::create_directories(dir);
  const std::string as = ::geteuid() == 0 ? "setpriv --reuid=65534 --regid=65534 --clear-groups " : "";
  if (::geteuid() == 0) Sh("chown 65534:65534 " + dir);
  Sh(as + bindir + "/initdb -D " + dir + "/data --no-locale -E UTF8 -U custody --auth=trust --no-sync >/dev/null");
  Sh(as + bindir + "/pg_ctl -D " + dir + "/data -l " + dir + "/server.log -w -o \"-k " + dir +
     " -c listen_addresses= -c shared_preload_libraries=pg_stat_statements -c max_connections=200\" start >/dev/null");
  const std::string base = "host=" + dir + " port=5432 user=custody dbname=";
  Sh(bindir + "/psql -X -q -d '" + base + "postgres' -c 'CREATE DATABASE custody'");
  // In a schema of its own: custody refuses a schema that holds anything
  // but its own tables.
  Sh(bindir + "/psql -X -q -d '" + base + "custody' -c 'CREATE SCHEMA stats' -c 'CREATE EXTENSION pg_stat_statements SCHEMA stats'");
  return base + "custody";
}

// Statements PostgreSQL has run in database custody so far (pg_stat_statements).
inline double PgStatements(const std::string& bindir, const std::string& url) {
  std::string out = "/tmp/custody-bench-pgstat";
  Sh(bindir + "/psql -X -q -t -A -d '" + url +
     "' -c \"SELECT coalesce(sum(calls), 0) FROM stats.pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
     "WHERE d.datname = 'custody' AND s.query NOT LIKE '%pg_stat_statements%'\" > " + out);
  double n = 0;
  std::ifstream(out) >> n;
  std::filesystem::remove(out);
  return n;
}

// What PostgreSQL ran in database custody, by statement: calls and mean
// time, most total time first (pg_stat_statements), to show where a GET's
// round trips go.
inline void PrintPgStatements(const std::string& bindir, const std::string& url, double gets) {
  std::string out = "/tmp/custody-bench-pgstat";
  Sh(bindir + "/psql -X -q -t -A -F '|' -d '" + url +
     "' -c \"SELECT calls, round(mean_exec_time::numeric * 1000, 1), left(regexp_replace(query, '\\\\s+', ' ', 'g'), 90) "
     "FROM stats.pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'custody' AND "
     "s.query NOT LIKE '%pg_stat_statements%' ORDER BY total_exec_time DESC LIMIT 8\" > " + out);
  std::ifstream in(out);
  std::string line;
  std::printf("         %9s %9s  statement\n", "per GET", "mean us");
  while (std::getline(in, line)) {
    const auto a = line.find('|'), b = line.find('|', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const double calls = std::atof(line.substr(0, a).c_str());
    std::printf("         %9.3f %9s  %s\n", gets > 0 ? calls / gets : 0, line.substr(a + 1, b - a - 1).c_str(),
                line.substr(b + 1).c_str());
  }
  std::filesystem::remove(out);
}

}  // namespace bench
