// [store] of custody.toml.
#pragma once

#include <string>

namespace custody::core {

// Where the deployment's state lives: `path`, a SQLite file (the embedded
// default), or `url`, a PostgreSQL database (any libpq connection string or
// URI, without a password). Exactly one is set.
struct StoreSettings {
  std::string path;
  std::string url;

  bool operator==(const StoreSettings&) const = default;
};

}  // namespace custody::core
