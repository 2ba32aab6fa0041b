// A token selector from an RFC 7512 `pkcs11:` URI, parsed by p11-kit.
//
//   auto uri = hsm::TokenUri::Parse("pkcs11:token=custody;serial=1a2b");
//   auto slot = hsm::FindSlot(*module, *uri);
//
// Only the token and slot parts select; object attributes in the URI
// (object=, id=, type=) are refused here because custody names its own
// objects. PIN attributes (pin-value, pin-source) are refused too: a PIN
// never travels inside a URI or a config string.
#pragma once

#include <memory>
#include <string>

#include "custody/common/result.h"
#include "custody/hsm/pkcs11.h"

namespace custody::hsm {

class Module;

class TokenUri {
 public:
  static Result<TokenUri> Parse(const std::string& uri);
  ~TokenUri();
  TokenUri(TokenUri&&) noexcept;
  TokenUri& operator=(TokenUri&&) noexcept;

  bool Matches(CK_SLOT_ID slot, const CK_SLOT_INFO& slot_info, const CK_TOKEN_INFO& token) const;
  const std::string& str() const { return text_; }

 private:
  TokenUri(std::string text, void* uri) : text_(std::move(text)), uri_(uri) {}
  std::string text_;
  void* uri_;  // P11KitUri*, kept opaque so p11-kit headers stay out of ours
};

// Picks the one slot whose token matches. No match: kUnavailable naming the
// URI and the tokens seen. More than one: kConfig (the URI is ambiguous).
Result<CK_SLOT_ID> FindSlot(const Module& module, const TokenUri& uri);

// Trims the blank padding of a fixed-width PKCS#11 string field.
std::string TrimPadded(const unsigned char* field, size_t len);

}  // namespace custody::hsm
