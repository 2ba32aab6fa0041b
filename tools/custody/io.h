// Small I/O helpers for the CLI: atomic private files, tables.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "custody/common/result.h"

namespace custody::cli {

// Writes `bytes` to `path` through a 0600 temporary file in the same folder,
// fsync and rename: the file appears whole with mode 0600 or not at all.
Status WritePrivateFile(const std::string& path, std::span<const uint8_t> bytes);

// Creates a folder (and parents) with mode 0700 if missing.
Status MakePrivateDir(const std::string& path);

// Prints rows as aligned columns; the first row is the header.
void PrintTable(const std::vector<std::vector<std::string>>& rows);

std::string FormatTime(int64_t unix_seconds);

}  // namespace custody::cli
