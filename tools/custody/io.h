// Small helpers for the CLI: atomic private files, tables, and the check on
// text that arrives from argv or the environment before custody records it.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "custody/common/result.h"

namespace custody::cli {

// Writes `bytes` to `path` through a 0600 file in the same folder that no
// other user can create or replace first: an unnamed file (O_TMPFILE) linked
// in once it is whole, or, where the filesystem has no O_TMPFILE, a random
// name made with O_EXCL|O_NOFOLLOW. fsync, then rename over `path`: the file
// appears whole with mode 0600 or not at all, and a failure leaves nothing.
Status WritePrivateFile(const std::string& path, std::span<const uint8_t> bytes);

// Creates a folder (and parents) with mode 0700 if missing.
Status MakePrivateDir(const std::string& path);

// Prints rows as aligned columns; the first row is the header.
void PrintTable(const std::vector<std::vector<std::string>>& rows);

std::string FormatTime(int64_t unix_seconds);

// The longest argument custody takes as text (a path is at most PATH_MAX).
inline constexpr size_t kMaxArgBytes = 4096;

// Refuses (kUsage, exit 64) an argument that is not PrintableText
// (custody/common/untrusted.h: well-formed UTF-8 without control characters)
// or is longer than `max_bytes`, in one line naming it ("--reason is not
// valid UTF-8 text"); the refused bytes are never echoed.
Status CheckArgText(std::string_view what, std::string_view value, size_t max_bytes = kMaxArgBytes);

// The same for an environment variable (kConfig, exit 78).
Status CheckEnvText(std::string_view name, std::string_view value);

}  // namespace custody::cli
