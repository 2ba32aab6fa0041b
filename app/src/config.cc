#include "custody/app/config.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <tuple>
#include <type_traits>

#include "custody/common/hex.h"
#include "custody/common/untrusted.h"
#include "custody/policy/model.h"
#include "custody/service/access_tokens.h"
#include "custody/store/postgres_store.h"

namespace custody::core {
namespace {

constexpr size_t kMaxPinSize = 256;
// [audit] group_commit_us: past a tenth of a second, a hold meant to share
// an fsync would cost each GET more than the fsync it saves.
constexpr int64_t kMaxGroupCommitUs = 100000;
// [audit] timeout_ms: from a tenth of a second (a test's stuck disk) to ten
// minutes (a network file system that fails over slowly).
constexpr int64_t kMinAuditTimeoutMs = 100;
constexpr int64_t kMaxAuditTimeoutMs = 600000;

std::string Where(const std::string& path, const toml::source_region& r) {
  return path + ":" + std::to_string(r.begin.line) + ":" + std::to_string(r.begin.column);
}

Result<std::string> RequireString(const toml::table& t, std::string_view key, const std::string& path,
                                  std::string_view section) {
  const toml::node* n = t.get(key);
  std::string full = section.empty() ? std::string(key) : std::string(section) + "." + std::string(key);
  if (n == nullptr) return Error(Category::kConfig, path + ": missing key '" + full + "'");
  if (!n->is_string()) return Error(Category::kConfig, Where(path, n->source()) + ": '" + full + "' must be a string");
  std::string v = n->as_string()->get();
  if (v.empty()) return Error(Category::kConfig, Where(path, n->source()) + ": '" + full + "' is empty");
  return v;
}

}  // namespace

Result<StoreSettings> StoreFromArg(const std::string& arg) {
  StoreSettings s;
  const bool uri = arg.starts_with("postgresql://") || arg.starts_with("postgres://");
  const bool keywords = arg.find('=') != std::string::npos &&
                        (arg.find("dbname=") != std::string::npos || arg.find("host=") != std::string::npos ||
                         arg.find("service=") != std::string::npos);
  if (uri || keywords) {
    CUSTODY_RETURN_IF_ERROR(CheckPostgresUrl(arg));
    s.url = arg;
  } else {
    if (arg.empty()) return Error(Category::kUsage, "the store is empty: give a SQLite path or a PostgreSQL URL");
    s.path = std::filesystem::absolute(arg).lexically_normal().string();
  }
  return s;
}

std::string DescribeStore(const StoreSettings& store) {
  return store.url.empty() ? store.path : DescribePostgresUrl(store.url);
}

namespace {

void DropTrailingNewline(SecretBuffer& pin) {
  auto s = pin.RevealString(SecretAccess{});
  size_t n = s.size();
  if (n > 0 && s[n - 1] == '\n') --n;
  if (n > 0 && s[n - 1] == '\r') --n;
  pin.Truncate(n);
}

}  // namespace

Status ValidateNodeName(const std::string& name, const std::string& what) {
  auto alnum = [](char ch) { return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'); };
  bool ok = !name.empty() && name.size() <= 63 && alnum(name[0]);
  for (char ch : name) ok = ok && (alnum(ch) || ch == '.' || ch == '_' || ch == '-');
  if (ok) return Status::Ok();
  // The name may come from the host: shown escaped and cut, never raw.
  return Error(Category::kConfig, what + " \"" + EscapeUntrusted(name, 64) +
                                      "\" is not a node name ([A-Za-z0-9][A-Za-z0-9._-]*, at most 63); set [node] name");
}

Result<std::string> HostNodeName(const std::string& what) {
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
  CUSTODY_RETURN_IF_ERROR(ValidateNodeName(host, what));
  return std::string(host);
}

Status CheckConfigCoherence(const Config& c) {
  if (c.token.backend == "tpm" && !c.store.url.empty()) {
    return Error(Category::kConfig,
                 "the TPM backend cannot share a PostgreSQL store: a KEK sealed by this host's TPM cannot be "
                 "unsealed by any other node, so the store's secrets would be readable on this host only; use a "
                 "PKCS#11 token every node reaches (a network HSM), or keep the TPM with a SQLite store "
                 "(docs/SCALE_OUT.md)");
  }
  return Status::Ok();
}

std::string LocateConfig(const std::optional<std::string>& flag) {
  if (flag) return *flag;
  if (const char* env = std::getenv("CUSTODY_CONFIG"); env != nullptr && *env != '\0') return env;
  return "/etc/custody/custody.toml";
}

Result<Config> LoadConfig(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return Error(Category::kConfig, "config " + path + " not found; run 'custody init' or pass --config");
  }
  toml::table root;
  try {
    root = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    return Error(Category::kConfig, Where(path, e.source()) + ": " + std::string(e.description()));
  }
  Config c;
  CUSTODY_ASSIGN_OR_RETURN(c.state_dir, RequireString(root, "state_dir", path, ""));
  const toml::table* token = root["token"].as_table();
  if (token == nullptr) return Error(Category::kConfig, path + ": missing table [token]");
  if (token->contains("backend")) {
    CUSTODY_ASSIGN_OR_RETURN(c.token.backend, RequireString(*token, "backend", path, "token"));
  }
  if (c.token.backend == "pkcs11") {
    CUSTODY_ASSIGN_OR_RETURN(c.token.pkcs11.module, RequireString(*token, "module", path, "token"));
    CUSTODY_ASSIGN_OR_RETURN(c.token.pkcs11.uri, RequireString(*token, "uri", path, "token"));
  } else if (c.token.backend == "tpm") {
    CUSTODY_ASSIGN_OR_RETURN(c.token.tpm.tcti, RequireString(*token, "tcti", path, "token"));
    if (const toml::node* pcrs = token->get("pcrs")) {
      const toml::array* a = pcrs->as_array();
      if (a == nullptr) return Error(Category::kConfig, Where(path, pcrs->source()) + ": token.pcrs must be a list of PCR numbers");
      for (const auto& e : *a) {
        auto v = e.value_exact<int64_t>();
        if (!v || *v < 0 || *v > 23) {
          return Error(Category::kConfig, Where(path, e.source()) + ": token.pcrs: PCR numbers are 0 to 23");
        }
        c.token.tpm.pcrs.push_back(static_cast<uint8_t>(*v));
      }
    }
    if (const toml::node* n = token->get("persist_srk")) {
      auto b = n->value<bool>();
      if (!b) return Error(Category::kConfig, Where(path, n->source()) + ": token.persist_srk must be true or false");
      c.token.tpm.persist_srk = *b;
    }
    if (token->contains("srk_name")) {
      CUSTODY_ASSIGN_OR_RETURN(c.token.tpm.srk_name, RequireString(*token, "srk_name", path, "token"));
    }
    if (const toml::node* n = token->get("kek_cache_seconds")) {
      auto v = n->value_exact<int64_t>();
      if (!v || *v < 0 || *v > 3600) {
        return Error(Category::kConfig, Where(path, n->source()) + ": token.kek_cache_seconds must be 0 to 3600");
      }
      c.token.tpm.kek_cache_seconds = static_cast<int>(*v);
    }
  } else {
    // The value is the file's text: shown escaped and cut, never raw.
    return Error(Category::kConfig, path + ": token.backend must be \"pkcs11\" or \"tpm\" (got \"" +
                                        EscapeUntrusted(c.token.backend, 64) + "\")");
  }
  if (token->contains("pin_file")) {
    CUSTODY_ASSIGN_OR_RETURN(std::string pf, RequireString(*token, "pin_file", path, "token"));
    c.token.pin_file = std::move(pf);
  }
  if (const toml::node* n = token->get("call_timeout")) {
    auto v = n->value_exact<int64_t>();
    if (!v || *v < 100 || *v > 600000) {
      return Error(Category::kConfig, Where(path, n->source()) +
                                          ": token.call_timeout must be 100 to 600000 (milliseconds)");
    }
    c.token.call_timeout_ms = static_cast<int>(*v);
  }
  if (const toml::node* pin = token->get("pin"); pin != nullptr) {
    return Error(Category::kConfig, Where(path, pin->source()) +
                                        ": a PIN may not be written in the config; use pin_file, CUSTODY_PIN or --pin-fd");
  }
  if (const toml::table* env = (*token)["environment"].as_table()) {
    for (const auto& [k, v] : *env) {
      if (!v.is_string()) {
        return Error(Category::kConfig, Where(path, v.source()) + ": token.environment." + std::string(k.str()) +
                                            " must be a string");
      }
      c.token.environment.emplace_back(std::string(k.str()), v.as_string()->get());
    }
  }
  const toml::table* store = root["store"].as_table();
  if (store == nullptr) return Error(Category::kConfig, path + ": missing table [store]");
  // `path` (SQLite) or `url` (PostgreSQL), never both: one deployment has
  // one store.
  if (store->contains("url")) {
    if (store->contains("path")) {
      return Error(Category::kConfig, path + ": [store] has both path (SQLite) and url (PostgreSQL); keep one");
    }
    CUSTODY_ASSIGN_OR_RETURN(c.store.url, RequireString(*store, "url", path, "store"));
    if (Status s = CheckPostgresUrl(c.store.url); !s.ok()) return std::move(s).error().Wrap(path);
  } else {
    CUSTODY_ASSIGN_OR_RETURN(c.store.path, RequireString(*store, "path", path, "store"));
  }
  if (const toml::table* node = root["node"].as_table(); node != nullptr && node->contains("name")) {
    CUSTODY_ASSIGN_OR_RETURN(c.node.name, RequireString(*node, "name", path, "node"));
    CUSTODY_RETURN_IF_ERROR(ValidateNodeName(c.node.name, path + ": node.name"));
    c.node.named = true;
  } else {
    CUSTODY_ASSIGN_OR_RETURN(c.node.name, HostNodeName(path + ": the host name"));
  }
  if (Status s = CheckConfigCoherence(c); !s.ok()) return std::move(s).error().Wrap(path);
  c.audit.dir = c.state_dir + "/audit";
  c.audit.node = c.node.name;
  if (const toml::table* audit = root["audit"].as_table()) {
    if (audit->contains("dir")) {
      if (!c.store.url.empty()) {
        return Error(Category::kConfig,
                     Where(path, audit->get("dir")->source()) +
                         ": audit.dir: with a PostgreSQL store ([store] url) the audit trail is kept in the store, "
                         "one chain per node; remove audit.dir (files an earlier setup wrote can still be checked "
                         "with 'custody audit verify FILES --pubkey PEM')");
      }
      CUSTODY_ASSIGN_OR_RETURN(c.audit.dir, RequireString(*audit, "dir", path, "audit"));
    }
    auto positive = [&](const char* key, auto& out) -> Status {
      const toml::node* n = audit->get(key);
      if (n == nullptr) return Status::Ok();
      auto v = n->value_exact<int64_t>();
      if (!v || *v <= 0) {
        return Error(Category::kConfig, Where(path, n->source()) + ": audit." + key + " must be a positive number");
      }
      out = static_cast<std::remove_reference_t<decltype(out)>>(*v);
      return Status::Ok();
    };
    CUSTODY_RETURN_IF_ERROR(positive("checkpoint_every", c.audit.checkpoint_every));
    CUSTODY_RETURN_IF_ERROR(positive("checkpoint_seconds", c.audit.checkpoint_seconds));
    CUSTODY_RETURN_IF_ERROR(positive("segment_bytes", c.audit.segment_bytes));
    if (const toml::node* n = audit->get("group_commit_us")) {
      auto v = n->value_exact<int64_t>();
      if (!v || *v < 0 || *v > kMaxGroupCommitUs) {
        return Error(Category::kConfig, Where(path, n->source()) + ": audit.group_commit_us must be a number of "
                                                                   "microseconds from 0 (off) to " +
                                            std::to_string(kMaxGroupCommitUs));
      }
      c.audit.gather = std::chrono::microseconds(*v);
    }
    if (const toml::node* n = audit->get("timeout_ms")) {
      auto v = n->value_exact<int64_t>();
      if (!v || *v < kMinAuditTimeoutMs || *v > kMaxAuditTimeoutMs) {
        return Error(Category::kConfig, Where(path, n->source()) + ": audit.timeout_ms must be a number of "
                                                                   "milliseconds from " +
                                            std::to_string(kMinAuditTimeoutMs) + " to " +
                                            std::to_string(kMaxAuditTimeoutMs));
      }
      c.audit.timeout = std::chrono::milliseconds(*v);
    }
  }
  if (const toml::table* server = root["server"].as_table()) {
    if (server->contains("socket")) {
      CUSTODY_ASSIGN_OR_RETURN(c.server.socket_path, RequireString(*server, "socket", path, "server"));
    }
    if (const toml::node* n = server->get("socket_mode")) {
      auto mode = n->value<std::string>();
      if (!mode || mode->empty() || mode->size() > 4 ||
          mode->find_first_not_of("01234567") != std::string::npos) {
        return Error(Category::kConfig, Where(path, n->source()) + ": server.socket_mode must be an octal string like \"0660\"");
      }
      c.server.socket_mode = static_cast<uint32_t>(std::stoul(*mode, nullptr, 8));
    }
    auto positive = [&](const char* key, uint32_t& out, int64_t max) -> Status {
      const toml::node* n = server->get(key);
      if (n == nullptr) return Status::Ok();
      auto v = n->value_exact<int64_t>();
      if (!v || *v <= 0 || *v > max) {
        return Error(Category::kConfig, Where(path, n->source()) + ": server." + key + " must be a number from 1 to " +
                                            std::to_string(max));
      }
      out = static_cast<uint32_t>(*v);
      return Status::Ok();
    };
    for (auto [key, out] : {std::pair<const char*, std::string*>{"tls_listen", &c.server.tls_listen},
                            {"tls_cert", &c.server.tls_cert},
                            {"tls_key", &c.server.tls_key},
                            {"tls_client_ca", &c.server.tls_client_ca},
                            {"token_key_file", &c.server.token_key_file}}) {
      if (server->contains(key)) {
        CUSTODY_ASSIGN_OR_RETURN(*out, RequireString(*server, key, path, "server"));
      }
    }
    if (const toml::node* n = server->get("tls_client_certificate")) {
      auto v = n->value<std::string>();
      if (!v || (*v != "required" && *v != "optional")) {
        return Error(Category::kConfig, Where(path, n->source()) +
                                            ": server.tls_client_certificate must be \"required\" or \"optional\"");
      }
      c.server.tls_client_certificate_optional = *v == "optional";
    }
    if (!c.server.tls_listen.empty() &&
        (c.server.tls_cert.empty() || c.server.tls_key.empty() || c.server.tls_client_ca.empty())) {
      return Error(Category::kConfig, path + ": server.tls_listen needs tls_cert, tls_key and tls_client_ca "
                                             "(there is no TLS listener without client certificates)");
    }
    if (const toml::node* n = server->get("metrics_uids")) {
      const toml::array* a = n->as_array();
      bool ok = a != nullptr;
      for (size_t i = 0; ok && i < a->size(); ++i) {
        auto v = (*a)[i].value_exact<int64_t>();
        ok = v && *v >= 0 && *v <= 0xFFFFFFFFLL;
        if (ok) c.server.metrics_uids.push_back(static_cast<uint32_t>(*v));
      }
      if (!ok) return Error(Category::kConfig, Where(path, n->source()) + ": server.metrics_uids must be a list of uids");
    }
    if (const toml::node* n = server->get("metrics_tls_sans")) {
      const toml::array* a = n->as_array();
      bool ok = a != nullptr;
      for (size_t i = 0; ok && i < a->size(); ++i) {
        auto v = (*a)[i].value<std::string>();
        ok = v && !v->empty();
        if (!ok) break;
        // Typed exactly as the policy's tls_san (a bare name is a DNS name).
        auto san = policy::PolicyTlsSan(*v);
        if (!san) {
          return Error(Category::kConfig, Where(path, n->source()) +
                                              ": server.metrics_tls_sans: use dns:NAME, uri:URI or email:ADDRESS");
        }
        c.server.metrics_tls_sans.push_back(std::move(*san));
      }
      if (!ok) {
        return Error(Category::kConfig, Where(path, n->source()) + ": server.metrics_tls_sans must be a list of names");
      }
    }
    CUSTODY_RETURN_IF_ERROR(positive("max_unidentified_connections", c.server.max_unidentified_connections, 100000));
    CUSTODY_RETURN_IF_ERROR(positive("refusal_summary_seconds", c.server.refusal_summary_seconds, 3600));
    CUSTODY_RETURN_IF_ERROR(positive("threads", c.server.threads, 256));
    CUSTODY_RETURN_IF_ERROR(positive("max_connections", c.server.max_connections, 100000));
    CUSTODY_RETURN_IF_ERROR(positive("max_connections_per_peer", c.server.max_connections_per_peer, 100000));
    CUSTODY_RETURN_IF_ERROR(positive("idle_timeout_seconds", c.server.idle_timeout_seconds, 3600));
    CUSTODY_RETURN_IF_ERROR(positive("max_header_bytes", c.server.max_header_bytes, 1 << 20));
    CUSTODY_RETURN_IF_ERROR(positive("max_body_bytes", c.server.max_body_bytes, 16 << 20));
    CUSTODY_RETURN_IF_ERROR(positive("token_ttl_seconds", c.server.token_ttl_seconds, 366 * 86400));
    CUSTODY_RETURN_IF_ERROR(positive("token_max_ttl_seconds", c.server.token_max_ttl_seconds, 366 * 86400));
    if (c.server.token_max_ttl_seconds < c.server.token_ttl_seconds) {
      return Error(Category::kConfig, path + ": server.token_max_ttl_seconds is shorter than token_ttl_seconds");
    }
  }
  return c;
}

Status WriteConfig(const Config& c, const std::string& path) {
  toml::table token;
  if (c.token.backend == "tpm") {
    token.insert("backend", "tpm");
    token.insert("tcti", c.token.tpm.tcti);
    if (!c.token.tpm.pcrs.empty()) {
      toml::array pcrs;
      for (uint8_t p : c.token.tpm.pcrs) pcrs.push_back(static_cast<int64_t>(p));
      token.insert("pcrs", std::move(pcrs));
    }
    if (c.token.tpm.persist_srk) token.insert("persist_srk", true);
    if (!c.token.tpm.srk_name.empty()) token.insert("srk_name", c.token.tpm.srk_name);
    if (c.token.tpm.kek_cache_seconds > 0) token.insert("kek_cache_seconds", static_cast<int64_t>(c.token.tpm.kek_cache_seconds));
  } else {
    token.insert("module", c.token.pkcs11.module);
    token.insert("uri", c.token.pkcs11.uri);
  }
  if (c.token.pin_file) token.insert("pin_file", *c.token.pin_file);
  if (c.token.call_timeout_ms != TokenSection{}.call_timeout_ms) token.insert("call_timeout", c.token.call_timeout_ms);
  if (!c.token.environment.empty()) {
    toml::table env;
    for (const auto& [k, v] : c.token.environment) env.insert(k, v);
    token.insert("environment", std::move(env));
  }
  toml::table root{{"state_dir", c.state_dir}, {"token", std::move(token)},
                   {"store", c.store.url.empty() ? toml::table{{"path", c.store.path}}
                                                 : toml::table{{"url", c.store.url}}}};
  if (c.node.named) root.insert("node", toml::table{{"name", c.node.name}});
  if (!c.audit.dir.empty()) {
    toml::table audit{{"checkpoint_every", static_cast<int64_t>(c.audit.checkpoint_every)},
                      {"checkpoint_seconds", c.audit.checkpoint_seconds},
                      {"segment_bytes", static_cast<int64_t>(c.audit.segment_bytes)}};
    if (c.audit.gather != AuditOptions{}.gather) audit.insert("group_commit_us", static_cast<int64_t>(c.audit.gather.count()));
    if (c.audit.timeout != AuditOptions{}.timeout) audit.insert("timeout_ms", static_cast<int64_t>(c.audit.timeout.count()));
    // With a PostgreSQL store the trail is in the store: no folder.
    if (c.store.url.empty()) audit.insert("dir", c.audit.dir);
    root.insert("audit", std::move(audit));
  }
  // [server]: every setting that is not its default, so what LoadConfig
  // reads comes back (a test loads every example config, writes it and
  // loads it again), and a fresh `custody init` writes no [server] table
  // for an operator to add one to.
  const Config defaults;
  toml::table server;
  if (!c.server.socket_path.empty()) server.insert("socket", c.server.socket_path);
  if (c.server.socket_mode != defaults.server.socket_mode) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", c.server.socket_mode & 07777);
    server.insert("socket_mode", std::string(mode));
  }
  for (auto [key, value, fallback] :
       {std::tuple<const char*, uint32_t, uint32_t>{"threads", c.server.threads, defaults.server.threads},
        {"max_connections", c.server.max_connections, defaults.server.max_connections},
        {"max_connections_per_peer", c.server.max_connections_per_peer, defaults.server.max_connections_per_peer},
        {"max_unidentified_connections", c.server.max_unidentified_connections,
         defaults.server.max_unidentified_connections},
        {"refusal_summary_seconds", c.server.refusal_summary_seconds, defaults.server.refusal_summary_seconds},
        {"idle_timeout_seconds", c.server.idle_timeout_seconds, defaults.server.idle_timeout_seconds},
        {"max_header_bytes", c.server.max_header_bytes, defaults.server.max_header_bytes},
        {"max_body_bytes", c.server.max_body_bytes, defaults.server.max_body_bytes},
        {"token_ttl_seconds", c.server.token_ttl_seconds, defaults.server.token_ttl_seconds},
        {"token_max_ttl_seconds", c.server.token_max_ttl_seconds, defaults.server.token_max_ttl_seconds}}) {
    if (value != fallback) server.insert(key, static_cast<int64_t>(value));
  }
  if (!c.server.metrics_uids.empty()) {
    toml::array uids;
    for (uint32_t u : c.server.metrics_uids) uids.push_back(static_cast<int64_t>(u));
    server.insert("metrics_uids", std::move(uids));
  }
  if (!c.server.metrics_tls_sans.empty()) {
    toml::array sans;
    for (const auto& san : c.server.metrics_tls_sans) sans.push_back(san);
    server.insert("metrics_tls_sans", std::move(sans));
  }
  for (auto [key, value] : {std::pair<const char*, const std::string*>{"tls_listen", &c.server.tls_listen},
                            {"tls_cert", &c.server.tls_cert},
                            {"tls_key", &c.server.tls_key},
                            {"tls_client_ca", &c.server.tls_client_ca},
                            {"token_key_file", &c.server.token_key_file}}) {
    if (!value->empty()) server.insert(key, *value);
  }
  if (c.server.tls_client_certificate_optional) server.insert("tls_client_certificate", "optional");
  if (!server.empty()) root.insert("server", std::move(server));
  std::ostringstream out;
  out << "# custody configuration, written by 'custody init'. It never holds a PIN.\n" << root << "\n";
  std::string text = out.str();

  // A temporary name nobody can guess or pre-create (a fixed name with
  // O_TRUNC would follow a link another user put there).
  uint8_t r[8];
  if (::getrandom(r, sizeof r, 0) != static_cast<ssize_t>(sizeof r)) {
    return Error::Os(errno, "cannot write config " + path, Category::kConfig);
  }
  std::string tmp = path + ".tmp-" + ToHex(r);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return Error::Os(errno, "cannot write config " + tmp, Category::kConfig);
  size_t off = 0;
  while (off < text.size()) {
    ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return Error::Os(e, "cannot write config " + tmp, Category::kConfig);
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    return Error::Os(e, "cannot write config " + tmp, Category::kConfig);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    return Error::Os(e, "cannot write config " + path, Category::kConfig);
  }
  return Status::Ok();
}

void ApplyTokenEnvironment(const Config& c) {
  for (const auto& [k, v] : c.token.environment) ::setenv(k.c_str(), v.c_str(), /*overwrite=*/0);
}

Result<std::optional<SecretBuffer>> LoadAccessTokenKey(const Config& config) {
  if (!config.server.token_key_file.empty()) {
    // Named: it must be there. Made here, each node would get a key of its
    // own, and a token issued through one node would be unknown to the rest.
    CUSTODY_ASSIGN_OR_RETURN(SecretBuffer key, AccessTokens::LoadKey(config.server.token_key_file, /*create=*/false));
    return std::optional<SecretBuffer>(std::move(key));
  }
  if (!config.store.url.empty()) return std::optional<SecretBuffer>();
  CUSTODY_ASSIGN_OR_RETURN(SecretBuffer key, AccessTokens::LoadKey(config.state_dir + "/access-token.key", true));
  return std::optional<SecretBuffer>(std::move(key));
}

Result<SecretBuffer> ResolvePin(const Config& c, std::optional<int> pin_fd) {
  Result<SecretBuffer> pin = Error(Category::kConfig,
                                   "no PIN given: set pin_file in [token], CUSTODY_PIN, or pass --pin-fd");
  if (pin_fd) {
    pin = SecretBuffer::ReadFd(*pin_fd, kMaxPinSize);
    if (!pin) return std::move(pin).error().Wrap("reading PIN from descriptor " + std::to_string(*pin_fd));
  } else if (const char* env = std::getenv("CUSTODY_PIN"); env != nullptr) {
    pin = SecretBuffer::Copy(std::string_view(env));
    // The environment copy cannot be wiped safely (other code may hold the
    // pointer); unsetting it at least keeps it out of child processes.
    ::unsetenv("CUSTODY_PIN");
  } else if (c.token.pin_file) {
    pin = SecretBuffer::ReadFile(*c.token.pin_file, kMaxPinSize, /*require_private=*/true);
    if (!pin) {
      Error e = std::move(pin).error();
      return Error(e.category() == Category::kNotFound ? Category::kConfig : e.category(),
                   "PIN file: " + e.message());
    }
  } else {
    return pin;
  }
  DropTrailingNewline(*pin);
  if (pin->empty()) return Error(Category::kConfig, "the PIN is empty");
  return pin;
}

}  // namespace custody::core
