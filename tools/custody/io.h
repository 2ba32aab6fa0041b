// Small helpers for the CLI: atomic private files, tables, and the check on
// text that arrives from argv or the environment before custody records it.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "custody/common/result.h"

namespace custody::cli {

// A file that appears at `path` whole, with mode 0600, when Commit()
// succeeds, and not at all otherwise: it is written unnamed (O_TMPFILE) or
// under a random name made with O_EXCL|O_NOFOLLOW in `path`'s folder, which
// no other user can create or replace first; Commit() fsyncs it and renames
// it over `path`. Destroyed without a Commit(), it leaves nothing, also when
// the process is killed half way (an unnamed file) or nothing but a hidden
// `.custody-<random>.tmp` (the named way, on filesystems without O_TMPFILE).
//
//   CUSTODY_ASSIGN_OR_RETURN(auto f, StagedFile::Create(path));
//   CUSTODY_RETURN_IF_ERROR(f.Write(bytes));   // as often as needed
//   return f.Commit();
class StagedFile {
 public:
  static Result<StagedFile> Create(const std::string& path);
  StagedFile(StagedFile&& other) noexcept;
  StagedFile& operator=(StagedFile&&) = delete;
  StagedFile(const StagedFile&) = delete;
  ~StagedFile();
  Status Write(std::span<const uint8_t> bytes);
  Status Commit();

 private:
  StagedFile() = default;
  Status OpenNamed();
  Status LinkUnnamed();
  Status CopyIntoNamed();
  void Discard();
  std::string path_, dir_;
  std::string named_;  // the temporary name, while it has one
  int fd_ = -1;
};

// Writes `bytes` to `path` through a 0600 file in the same folder that no
// other user can create or replace first: an unnamed file (O_TMPFILE) linked
// in once it is whole, or, where the filesystem has no O_TMPFILE, a random
// name made with O_EXCL|O_NOFOLLOW (a StagedFile). fsync, then rename over
// `path`: the file appears whole with mode 0600 or not at all, and a failure
// leaves nothing.
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
