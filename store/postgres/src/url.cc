// The store URL: checked at load, described for messages, and connected to.
#include <memory>

#include "custody/common/untrusted.h"
#include "custody/store/postgres_store.h"
#include "pg_store_impl.h"

namespace custody::core {
namespace {

struct ConninfoFree {
  void operator()(PQconninfoOption* o) const { PQconninfoFree(o); }
};
using Conninfo = std::unique_ptr<PQconninfoOption, ConninfoFree>;

// libpq parses both forms (URI and key=value); custody never parses one by
// hand.
Result<Conninfo> Parse(const std::string& url) {
  char* err = nullptr;
  Conninfo opts(PQconninfoParse(url.c_str(), &err));
  if (!opts) {
    std::string why = err != nullptr ? err : "out of memory";
    PQfreemem(err);
    while (!why.empty() && why.back() == '\n') why.pop_back();
    return Error(Category::kConfig, "store.url is not a libpq connection string or URI: " + EscapeUntrusted(why, 200));
  }
  return opts;
}

std::string Option(const Conninfo& opts, std::string_view key) {
  for (auto* o = opts.get(); o->keyword != nullptr; ++o) {
    if (key == o->keyword && o->val != nullptr) return o->val;
  }
  return "";
}

}  // namespace

Status CheckPostgresUrl(const std::string& url) {
  CUSTODY_ASSIGN_OR_RETURN(Conninfo opts, Parse(url));
  for (const char* secret : {"password", "sslpassword"}) {
    if (!Option(opts, secret).empty()) {
      return Error(Category::kConfig,
                   std::string("store.url holds a ") + (secret[0] == 's' ? "client key password" : "password") +
                       "; a password may not be written in custody.toml: put it in a passfile (passfile=PATH in "
                       "the URL, or PGPASSFILE), or use client certificates (sslcert and sslkey)");
    }
  }
  return Status::Ok();
}

std::string DescribePostgresUrl(const std::string& url) {
  auto opts = Parse(url);
  if (!opts) return "postgresql (unparsable URL)";
  std::string host = Option(*opts, "host");
  if (host.empty()) host = Option(*opts, "hostaddr");
  if (host.empty()) host = "the default socket";
  std::string out = "postgresql host " + EscapeUntrusted(host, 200);
  if (std::string port = Option(*opts, "port"); !port.empty()) out += " port " + EscapeUntrusted(port, 20);
  if (std::string db = Option(*opts, "dbname"); !db.empty()) out += " database " + EscapeUntrusted(db, 100);
  return out;
}

namespace pg {

Result<std::unique_ptr<Conn>> PgStore::Open(bool relaxed) {
  // Defaults first, the configured URL after: what the operator wrote wins.
  // connect_timeout and the keepalives bound how long a call can wait on a
  // server that stopped answering (TCP only; a Unix socket fails at once).
  const char* keys[] = {"connect_timeout", "keepalives_idle", "keepalives_interval", "keepalives_count",
                        "tcp_user_timeout", "fallback_application_name", "client_encoding", "dbname", nullptr};
  const char* values[] = {"5", "10", "3", "3", "15000", "custody", "UTF8", url_.c_str(), nullptr};
  auto c = std::make_unique<Conn>();
  c->pg = PQconnectdbParams(keys, values, /*expand_dbname=*/1);
  if (c->pg == nullptr || PQstatus(c->pg) != CONNECTION_OK) {
    std::string why = c->pg != nullptr ? PQerrorMessage(c->pg) : "out of memory";
    // libpq's lines (one per address it tried, and a hint) as one line.
    std::string line;
    for (char ch : why) {
      if (ch == '\n' || ch == '\t' || ch == '\r') ch = ' ';
      if (ch == ' ' && (line.empty() || line.back() == ' ')) continue;
      line += ch;
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    why = std::move(line);
    return Error(Category::kUnavailable, "cannot connect to the store (" + where_ + "): " + EscapeUntrusted(why, 300),
                 Backend::kStore, 0);
  }
  // Bounded waits on the server side: a statement, a row lock, or a
  // transaction left idle by a stalled caller never holds anyone forever.
  // Relaxed connections (usage counts, limit buckets) do not wait for the
  // WAL flush at commit: the audit log is the durable record of each
  // request, and every other write keeps the database's own setting (on,
  // or a synchronous standby: see docs/STORE.md).
  const char* setup = relaxed ? "SET bytea_output = 'hex'; SET statement_timeout = '15s'; SET lock_timeout = '10s'; "
                                "SET idle_in_transaction_session_timeout = '60s'; SET synchronous_commit = off"
                              : "SET bytea_output = 'hex'; SET statement_timeout = '15s'; SET lock_timeout = '10s'; "
                                "SET idle_in_transaction_session_timeout = '60s'";
  Res r(PQexec(c->pg, setup));
  if (PQresultStatus(r.raw()) != PGRES_COMMAND_OK) {
    return Error(Category::kUnavailable, "store " + where_ + ": setting up a connection failed: " +
                                             EscapeUntrusted(PQerrorMessage(c->pg), 300));
  }
  return c;
}

}  // namespace pg

Result<std::unique_ptr<Store>> OpenPostgresStore(const std::string& url, bool create) {
  CUSTODY_RETURN_IF_ERROR(CheckPostgresUrl(url));
  auto store = std::make_unique<pg::PgStore>(url, DescribePostgresUrl(url));
  CUSTODY_RETURN_IF_ERROR(store->Init(create));
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace custody::core
