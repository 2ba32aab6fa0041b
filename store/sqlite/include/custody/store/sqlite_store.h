// The SQLite store: the embedded default, one file on one host.
#pragma once

#include <memory>
#include <string>

#include "custody/store/store.h"

namespace custody::core {

// Opens (creating if `create`) a SQLite store, in WAL mode, migrated to the
// current schema. A file that is not a custody store is kIntegrity; a path
// that cannot be opened or written is kUnavailable.
Result<std::unique_ptr<Store>> OpenSqliteStore(const std::string& path, bool create);

}  // namespace custody::core
