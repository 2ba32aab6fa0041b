// The PostgreSQL store: the state of a deployment that several custodyd
// nodes on several hosts share, in a database server teams already run and
// make highly available with its own means (streaming replication, Patroni).
#pragma once

#include <memory>
#include <string>

#include "custody/store/store.h"

namespace custody::core {

// Checks a libpq connection string or URI from custody.toml without
// connecting: kConfig if it cannot be parsed, or if it holds a password (a
// password never sits in the config: use a passfile, PGPASSFILE, or client
// certificates). The message names the fix, never the password.
Status CheckPostgresUrl(const std::string& url);

// The server and database a URL names, for messages ("postgresql host
// db.internal port 5432 database custody"); no password, no other option.
std::string DescribePostgresUrl(const std::string& url);

// Connects and checks (creating it if `create`) the custody schema, migrated
// to this binary's version. An unreachable server is kUnavailable naming the
// host and libpq's reason; a database that holds something other than a
// custody schema is kIntegrity, and a newer custody schema kConfig: neither
// is modified.
Result<std::unique_ptr<Store>> OpenPostgresStore(const std::string& url, bool create);

}  // namespace custody::core
