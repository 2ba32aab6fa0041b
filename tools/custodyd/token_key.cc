#include "token_key.h"

#include <libp11.h>
#include <p11-kit/uri.h>

#include <cctype>
#include <cstring>
#include <vector>

#include "custody/hsm/uri.h"

namespace custody::server {

Result<EVP_PKEY*> LoadTokenKey(const core::Config& config, const std::string& uri_text, const SecretBuffer& pin) {
  // The query part (after '?') is never echoed: it is where a PIN would
  // be (pin-value=), and this message goes to the journal. A PIN is refused
  // before parsing, so that even a URI that does not parse is not shown.
  const std::string shown = uri_text.substr(0, uri_text.find('?'));
  auto fail = [&](const std::string& why) { return Error(Category::kConfig, "tls_key " + shown + ": " + why); };
  std::string lower = uri_text;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower.find("pin-value") != std::string::npos || lower.find("pin-source") != std::string::npos) {
    return Error(Category::kConfig, "tls_key URI carries a PIN; the PIN comes from pin_file, CUSTODY_PIN or --pin-fd");
  }
  P11KitUri* uri = p11_kit_uri_new();
  if (p11_kit_uri_parse(uri_text.c_str(), P11_KIT_URI_FOR_OBJECT_ON_TOKEN, uri) != P11_KIT_URI_OK) {
    p11_kit_uri_free(uri);
    return fail("not a valid pkcs11: URI");
  }
  if (p11_kit_uri_get_pin_value(uri) != nullptr) {
    p11_kit_uri_free(uri);
    return Error(Category::kConfig, "tls_key URI carries a PIN; the PIN comes from pin_file, CUSTODY_PIN or --pin-fd");
  }
  std::string token_label = hsm::TrimPadded(p11_kit_uri_get_token_info(uri)->label, 32);
  std::string object_label;
  std::vector<unsigned char> object_id;
  if (CK_ATTRIBUTE* a = p11_kit_uri_get_attribute(uri, CKA_LABEL)) {
    object_label.assign(static_cast<const char*>(a->pValue), a->ulValueLen);
  }
  if (CK_ATTRIBUTE* a = p11_kit_uri_get_attribute(uri, CKA_ID)) {
    const auto* p = static_cast<const unsigned char*>(a->pValue);
    object_id.assign(p, p + a->ulValueLen);
  }
  p11_kit_uri_free(uri);
  if (token_label.empty() || (object_label.empty() && object_id.empty())) {
    return fail("name the token (token=) and the key (object= or id=)");
  }

  // Never freed: see the header.
  PKCS11_CTX* ctx = PKCS11_CTX_new();
  if (PKCS11_CTX_load(ctx, config.token.pkcs11.module.c_str()) != 0) return fail("libp11 cannot load " + config.token.pkcs11.module);
  PKCS11_SLOT* slots = nullptr;
  unsigned int nslots = 0;
  if (PKCS11_enumerate_slots(ctx, &slots, &nslots) != 0) return fail("libp11 cannot list the slots");
  PKCS11_SLOT* slot = nullptr;
  for (unsigned int i = 0; i < nslots; ++i) {
    if (slots[i].token != nullptr && slots[i].token->label != nullptr && token_label == slots[i].token->label) {
      slot = &slots[i];
    }
  }
  if (slot == nullptr) return fail("no token labelled '" + token_label + "'");
  // libp11 wants a C string; built in locked memory and wiped after.
  SecretBuffer cpin(pin.size() + 1);
  std::memcpy(cpin.RevealMutable(SecretAccess{}).data(), pin.Reveal(SecretAccess{}).data(), pin.size());
  // PKCS11_login opens libp11's own session. Calling PKCS11_open_session
  // (or PKCS11_is_logged_in, which opens one) first would make libp11 "re-open"
  // with C_CloseAllSessions, which closes custody's sessions too: PKCS#11
  // sessions belong to the application, not to the library that opened them.
  if (PKCS11_login(slot, 0, reinterpret_cast<const char*>(cpin.Reveal(SecretAccess{}).data())) != 0) {
    return fail("libp11 cannot log in to the token");
  }
  PKCS11_KEY* keys = nullptr;
  unsigned int nkeys = 0;
  if (PKCS11_enumerate_keys(slot->token, &keys, &nkeys) != 0) return fail("libp11 cannot list the token's keys");
  for (unsigned int i = 0; i < nkeys; ++i) {
    bool label_ok = object_label.empty() || (keys[i].label != nullptr && object_label == keys[i].label);
    bool id_ok = object_id.empty() ||
                 (keys[i].id_len == object_id.size() && std::memcmp(keys[i].id, object_id.data(), object_id.size()) == 0);
    if (keys[i].isPrivate && label_ok && id_ok) {
      EVP_PKEY* pkey = PKCS11_get_private_key(&keys[i]);
      if (pkey == nullptr) return fail("libp11 cannot use the key");
      return pkey;
    }
  }
  return Error(Category::kNotFound, "tls_key " + uri_text + ": no private key with that label or id in the token");
}

}  // namespace custody::server
