// The client without TLS, for the lean `custody` front (custody_client_notls_obj):
// the front serves unix: addresses only and hands https:// to custody-full
// (tools/custody/front.cc checks the address before it fetches). This
// definition keeps Asio's SSL layer, and its start-up cost, out of the
// front; reaching it would be a bug in front.cc, and it says so instead of
// failing silently.
#include "tls_request.h"

namespace custody::client::detail {

Result<HttpResponse> RequestTls(const TlsEndpoint& to, HttpRequest&, bool*) {
  return Error(Category::kInternal, "custody front: https://" + to.host + " must be served by custody-full");
}

}  // namespace custody::client::detail
