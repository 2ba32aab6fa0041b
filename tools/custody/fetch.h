// What `secret get` and `exec` do with values once they are fetched, the
// same whether the value came from custodyd or from the token directly.
// Shared by the full CLI and the lean front (front.cc), so both print,
// write and exec exactly alike; nothing here links the store or the token.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "custody/client/client.h"
#include "custody/common/names.h"
#include "custody/common/result.h"

namespace custody::cli {

// Fetches one version (the current one when `version` is empty).
using Fetcher = std::function<Result<client::Fetched>(const core::SecretPath&, std::optional<uint32_t>)>;

// Fetches through custodyd at `address` (CUSTODY_ADDR). Errors are prefixed
// with the secret's path, as in direct mode.
Fetcher RemoteFetcher(const std::string& address);

// `secret get`: raw bytes to stdout, or to `out` created 0600 (with a line
// on stderr saying so).
Status GetAndPrint(const Fetcher& fetch, const std::string& path_text, std::optional<uint32_t> version,
                   const std::optional<std::string>& out);

// `exec`: fetches every NAME=PROJECT/ENV/SECRET first (all or nothing),
// puts the values in this process's environment and replaces the process
// with `command`. Returns only on failure.
Status ExecWith(const Fetcher& fetch, const std::vector<std::string>& envs, const std::vector<std::string>& command);

}  // namespace custody::cli
