// What audit.cc and file_storage.cc share; private to audit/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "custody/audit/audit.h"

namespace custody::core {

inline const std::string kAuditGenesis(64, '0');  // the prev of the first record
inline constexpr size_t kAuditMaxLine = 64 * 1024;

// Reads the lines of segment files in order, naming each "file:line". A
// partial last line of the last file sets `torn`; one in an earlier file is
// kIntegrity. `listed`: the files were just listed from the log folder, so
// leading ones that are gone by the time they are opened were removed by a
// prune running meanwhile (it removes the oldest first, after its statement
// is in the log) and are passed over; any other missing file is kNotFound.
Status ReadAuditFiles(const std::vector<std::string>& files, const std::function<void(AuditChainLine&&)>& each,
                      bool* torn, bool listed = false);

// Forks so far in this process, counted in each child (file_storage.cc). A
// descriptor or a random draw kept from before a fork is the parent's:
// whoever keeps one notes this count with it and drops it when it moved.
uint64_t ForksSoFar();

}  // namespace custody::core
