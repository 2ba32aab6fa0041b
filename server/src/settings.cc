#include "custody/server/settings.h"

namespace custody::server {

std::vector<std::string> ChangesNeedingRestart(const ServerSettings& running, const ServerSettings& fresh) {
  std::vector<std::string> out;
  auto note = [&](const char* key, bool changed) {
    if (changed) out.emplace_back(key);
  };
  note("socket", running.socket_path != fresh.socket_path);
  note("socket_mode", running.socket_mode != fresh.socket_mode);
  note("threads", running.threads != fresh.threads);
  note("max_unidentified_connections", running.max_unidentified_connections != fresh.max_unidentified_connections);
  note("metrics_uids", running.metrics_uids != fresh.metrics_uids);
  note("metrics_tls_sans", running.metrics_tls_sans != fresh.metrics_tls_sans);
  note("refusal_summary_seconds", running.refusal_summary_seconds != fresh.refusal_summary_seconds);
  note("tls_listen", running.tls_listen != fresh.tls_listen);
  note("tls_cert", running.tls_cert != fresh.tls_cert);
  note("tls_key", running.tls_key != fresh.tls_key);
  note("tls_client_ca", running.tls_client_ca != fresh.tls_client_ca);
  note("tls_client_certificate", running.tls_client_certificate_optional != fresh.tls_client_certificate_optional);
  note("token_key_file", running.token_key_file != fresh.token_key_file);
  note("token_ttl_seconds", running.token_ttl_seconds != fresh.token_ttl_seconds);
  note("token_max_ttl_seconds", running.token_max_ttl_seconds != fresh.token_max_ttl_seconds);
  // Whatever is left must be what SetLimits applies: a field added to the
  // settings and to neither list still shows up, as the whole table.
  ServerSettings masked = fresh;
  masked.max_connections = running.max_connections;
  masked.max_connections_per_peer = running.max_connections_per_peer;
  masked.idle_timeout_seconds = running.idle_timeout_seconds;
  masked.max_header_bytes = running.max_header_bytes;
  masked.max_body_bytes = running.max_body_bytes;
  if (out.empty() && masked != running) out.emplace_back("(a setting of the table)");
  return out;
}

}  // namespace custody::server
