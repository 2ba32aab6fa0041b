// Who is at the other end of a connection, as the transport says it: the
// kernel (SO_PEERCRED) on the Unix socket, the client certificate over TLS.
// Every field that came from outside (a user name from NSS, a certificate's
// SANs and subject) is kept raw for matching against the policy, and shown
// escaped (custody/common/untrusted.h) in identified_by, which reaches the
// audit record and the logs.
#pragma once

#include <openssl/x509.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "custody/service/custodian.h"

namespace custody::server {

// A peer on the Unix socket: uid, gid, pid from the kernel; user name and
// groups from NSS (cached for a minute).
core::RequestContext PeerFromCredentials(uint32_t uid, uint32_t gid, uint32_t pid);

// The same for a user name and groups already known (the NSS look-up done):
// for tests and fuzzing.
core::RequestContext PeerFromAccount(uint32_t uid, uint32_t pid, std::optional<std::string> user,
                                     std::vector<uint32_t> gids);

// A client certificate that already chains to tls_client_ca: its DNS, URI
// and e-mail SANs as typed identities ("dns:NAME", "uri:URI",
// "email:ADDRESS", which the policy's tls_san matches by type) and its
// subject (RFC 2253). Never throws, whatever bytes the fields hold.
core::RequestContext PeerFromCertificate(X509* cert);

}  // namespace custody::server
