#include "custody/hsm/uri.h"

#include <p11-kit/uri.h>

#include <vector>

#include "custody/hsm/module.h"
#include "custody/hsm/rv.h"

namespace custody::hsm {

Result<TokenUri> TokenUri::Parse(const std::string& text) {
  P11KitUri* uri = p11_kit_uri_new();
  int r = p11_kit_uri_parse(text.c_str(), static_cast<P11KitUriType>(P11_KIT_URI_FOR_SLOT | P11_KIT_URI_FOR_TOKEN), uri);
  if (r != P11_KIT_URI_OK) {
    p11_kit_uri_free(uri);
    return Error(Category::kConfig,
                 "token URI '" + text + "' is not a valid pkcs11: URI: " + p11_kit_uri_message(r));
  }
  if (p11_kit_uri_get_pin_value(uri) != nullptr || p11_kit_uri_get_pin_source(uri) != nullptr) {
    p11_kit_uri_free(uri);
    // Do not echo the URI: it holds a PIN.
    return Error(Category::kConfig,
                 "token URI carries a PIN (pin-value or pin-source); give the PIN through "
                 "pin_file, CUSTODY_PIN or --pin-fd instead");
  }
  // Object attributes are parsed only for P11_KIT_URI_FOR_OBJECT; reparse to
  // refuse a URI that names one, rather than silently ignoring it.
  P11KitUri* probe = p11_kit_uri_new();
  if (p11_kit_uri_parse(text.c_str(), P11_KIT_URI_FOR_OBJECT, probe) == P11_KIT_URI_OK) {
    CK_ULONG n = 0;
    p11_kit_uri_get_attributes(probe, &n);
    if (n > 0) {
      p11_kit_uri_free(probe);
      p11_kit_uri_free(uri);
      return Error(Category::kConfig, "token URI '" + text +
                                          "' names an object; give only token attributes "
                                          "(token=, serial=, manufacturer=, model=, slot-id=)");
    }
  }
  p11_kit_uri_free(probe);
  return TokenUri(text, uri);
}

TokenUri::~TokenUri() {
  if (uri_ != nullptr) p11_kit_uri_free(static_cast<P11KitUri*>(uri_));
}
TokenUri::TokenUri(TokenUri&& o) noexcept : text_(std::move(o.text_)), uri_(o.uri_) { o.uri_ = nullptr; }
TokenUri& TokenUri::operator=(TokenUri&& o) noexcept {
  if (this != &o) {
    if (uri_ != nullptr) p11_kit_uri_free(static_cast<P11KitUri*>(uri_));
    text_ = std::move(o.text_);
    uri_ = o.uri_;
    o.uri_ = nullptr;
  }
  return *this;
}

bool TokenUri::Matches(CK_SLOT_ID slot, const CK_SLOT_INFO& slot_info,
                       const CK_TOKEN_INFO& token) const {
  auto* uri = static_cast<P11KitUri*>(uri_);
  CK_SLOT_ID want = p11_kit_uri_get_slot_id(uri);
  if (want != static_cast<CK_SLOT_ID>(-1) && want != slot) return false;
  return p11_kit_uri_match_slot_info(uri, const_cast<CK_SLOT_INFO*>(&slot_info)) == 1 &&
         p11_kit_uri_match_token_info(uri, const_cast<CK_TOKEN_INFO*>(&token)) == 1;
}

std::string TrimPadded(const unsigned char* field, size_t len) {
  while (len > 0 && (field[len - 1] == ' ' || field[len - 1] == '\0')) --len;
  return std::string(reinterpret_cast<const char*>(field), len);
}

Result<CK_SLOT_ID> FindSlot(const Module& module, const TokenUri& uri) {
  CK_FUNCTION_LIST* fn = module.fn();
  CK_ULONG count = 0;
  CK_RV rv = fn->C_GetSlotList(CK_TRUE, nullptr, &count);
  if (rv != CKR_OK) return RvError(rv, "C_GetSlotList");
  std::vector<CK_SLOT_ID> slots(count);
  if (count > 0) {
    rv = fn->C_GetSlotList(CK_TRUE, slots.data(), &count);
    if (rv != CKR_OK) return RvError(rv, "C_GetSlotList");
    slots.resize(count);
  }
  std::vector<CK_SLOT_ID> matches;
  std::string seen;
  for (CK_SLOT_ID s : slots) {
    CK_SLOT_INFO si{};
    CK_TOKEN_INFO ti{};
    if (fn->C_GetSlotInfo(s, &si) != CKR_OK || fn->C_GetTokenInfo(s, &ti) != CKR_OK) continue;
    std::string label = TrimPadded(ti.label, sizeof ti.label);
    if (!(ti.flags & CKF_TOKEN_INITIALIZED)) continue;
    if (!seen.empty()) seen += ", ";
    seen += "'" + label + "'";
    if (uri.Matches(s, si, ti)) matches.push_back(s);
  }
  if (matches.empty()) {
    return Error(Category::kUnavailable,
                 "no token matches " + uri.str() + " in module " + module.path() +
                     (seen.empty() ? " (the module shows no initialised token)"
                                   : " (tokens present: " + seen + ")"),
                 Backend::kPkcs11, CKR_TOKEN_NOT_PRESENT);
  }
  if (matches.size() > 1) {
    return Error(Category::kConfig, "token URI " + uri.str() + " matches " +
                                        std::to_string(matches.size()) +
                                        " tokens; add serial= to pick one");
  }
  return matches.front();
}

}  // namespace custody::hsm
