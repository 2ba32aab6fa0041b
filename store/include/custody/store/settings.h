// [store] of custody.toml.
#pragma once

#include <string>

namespace custody::core {

// Where the deployment's state lives: `path`, a SQLite file.
struct StoreSettings {
  std::string path;

  bool operator==(const StoreSettings&) const = default;
};

}  // namespace custody::core
