#include "custody/hsm/objects.h"

#include "custody/hsm/rv.h"

namespace custody::hsm {
namespace {

// Ends a search on every path: a search left open blocks the session for any
// other operation (CKR_OPERATION_ACTIVE).
class FindGuard {
 public:
  explicit FindGuard(Session& s) : s_(s) {}
  ~FindGuard() { (void)s_.fn()->C_FindObjectsFinal(s_.handle()); }

 private:
  Session& s_;
};

}  // namespace

Result<std::vector<CK_OBJECT_HANDLE>> FindObjects(Session& s, std::span<CK_ATTRIBUTE> tmpl,
                                                  size_t max_results) {
  CK_RV rv = s.fn()->C_FindObjectsInit(s.handle(), tmpl.data(), static_cast<CK_ULONG>(tmpl.size()));
  if (rv != CKR_OK) return RvError(rv, "C_FindObjectsInit");
  FindGuard guard(s);
  std::vector<CK_OBJECT_HANDLE> out;
  CK_OBJECT_HANDLE batch[32];
  while (out.size() < max_results) {
    CK_ULONG n = 0;
    rv = s.fn()->C_FindObjects(s.handle(), batch, 32, &n);
    if (rv != CKR_OK) return RvError(rv, "C_FindObjects");
    if (n == 0) break;
    out.insert(out.end(), batch, batch + n);
  }
  if (out.size() > max_results) out.resize(max_results);
  return out;
}

Status GenerateRandom(Session& s, std::span<uint8_t> out) {
  CK_RV rv = s.fn()->C_GenerateRandom(s.handle(), out.data(), static_cast<CK_ULONG>(out.size()));
  if (rv != CKR_OK) return RvError(rv, "C_GenerateRandom");
  return Status::Ok();
}

Status DestroyObject(Session& s, CK_OBJECT_HANDLE h) {
  CK_RV rv = s.fn()->C_DestroyObject(s.handle(), h);
  if (rv != CKR_OK) return RvError(rv, "C_DestroyObject");
  return Status::Ok();
}

Result<ObjectSummary> Describe(Session& s, CK_OBJECT_HANDLE h) {
  ObjectSummary o;
  o.handle = h;
  CK_BBOOL token = 0, priv = 0, sens = 0, extr = 0, asens = 0, nextr = 0, local = 0;
  CK_ATTRIBUTE base[] = {
      {CKA_CLASS, &o.object_class, sizeof o.object_class},
      {CKA_LABEL, nullptr, 0},
      {CKA_ID, nullptr, 0},
      {CKA_TOKEN, &token, sizeof token},
      {CKA_PRIVATE, &priv, sizeof priv},
  };
  CK_RV rv = s.fn()->C_GetAttributeValue(s.handle(), h, base, 5);
  if (rv != CKR_OK && rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_ATTRIBUTE_SENSITIVE) {
    return RvError(rv, "C_GetAttributeValue");
  }
  // Every object has a class (PKCS#11 3.0, 4.2); without one this is not an
  // object the token can describe, and guessing CKO_DATA would mislead.
  if (base[0].ulValueLen == CK_UNAVAILABLE_INFORMATION) {
    return RvError(CKR_ATTRIBUTE_TYPE_INVALID, "C_GetAttributeValue(CKA_CLASS)");
  }
  const bool has_label = base[1].ulValueLen != CK_UNAVAILABLE_INFORMATION;
  const bool has_id = base[2].ulValueLen != CK_UNAVAILABLE_INFORMATION;
  std::string label(has_label ? base[1].ulValueLen : 0, '\0');
  o.id.resize(has_id ? base[2].ulValueLen : 0);
  CK_ATTRIBUTE strs[2];
  CK_ULONG n = 0;
  if (has_label) strs[n++] = {CKA_LABEL, label.data(), static_cast<CK_ULONG>(label.size())};
  if (has_id) strs[n++] = {CKA_ID, o.id.data(), static_cast<CK_ULONG>(o.id.size())};
  if (n > 0) {
    rv = s.fn()->C_GetAttributeValue(s.handle(), h, strs, n);
    if (rv != CKR_OK) return RvError(rv, "C_GetAttributeValue");
  }
  o.label = std::move(label);
  o.token = token;
  o.is_private = priv;

  if (o.object_class == CKO_SECRET_KEY || o.object_class == CKO_PRIVATE_KEY ||
      o.object_class == CKO_PUBLIC_KEY) {
    CK_ATTRIBUTE key[] = {
        {CKA_KEY_TYPE, &o.key_type, sizeof o.key_type},
        {CKA_LOCAL, &local, sizeof local},
    };
    (void)s.fn()->C_GetAttributeValue(s.handle(), h, key, 2);
    o.local = local;
  }
  if (o.object_class == CKO_SECRET_KEY || o.object_class == CKO_PRIVATE_KEY) {
    CK_ATTRIBUTE priv_attrs[] = {
        {CKA_SENSITIVE, &sens, sizeof sens},
        {CKA_EXTRACTABLE, &extr, sizeof extr},
        {CKA_ALWAYS_SENSITIVE, &asens, sizeof asens},
        {CKA_NEVER_EXTRACTABLE, &nextr, sizeof nextr},
    };
    // Each attribute is independent; a token that lacks one leaves it false.
    (void)s.fn()->C_GetAttributeValue(s.handle(), h, priv_attrs, 4);
    o.sensitive = sens;
    o.extractable = extr;
    o.always_sensitive = asens;
    o.never_extractable = nextr;
  }
  if (o.object_class == CKO_SECRET_KEY) {
    CK_ATTRIBUTE len{CKA_VALUE_LEN, &o.value_len, sizeof o.value_len};
    (void)s.fn()->C_GetAttributeValue(s.handle(), h, &len, 1);
  }
  return o;
}

Result<std::vector<ObjectSummary>> ListObjects(Session& s) {
  CUSTODY_ASSIGN_OR_RETURN(auto handles, FindObjects(s, {}, 100000));
  std::vector<ObjectSummary> out;
  out.reserve(handles.size());
  for (CK_OBJECT_HANDLE h : handles) {
    auto o = Describe(s, h);
    if (o) {
      out.push_back(std::move(*o));
      continue;
    }
    const CK_RV rv = o.error().backend() == Backend::kPkcs11 ? static_cast<CK_RV>(o.error().code()) : CKR_OK;
    // HANDLE_INVALID: destroyed since the search, or an object file SoftHSM
    // could not read. Listed, not skipped, so a listing never looks shorter
    // than the token without saying so.
    if (rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_ATTRIBUTE_VALUE_INVALID && rv != CKR_OBJECT_HANDLE_INVALID) {
      return std::move(o).error();
    }
    ObjectSummary unreadable;
    unreadable.handle = h;
    unreadable.problem = rv;
    out.push_back(std::move(unreadable));
  }
  return out;
}

std::string ClassName(CK_OBJECT_CLASS c) {
  switch (c) {
    case CKO_DATA: return "data";
    case CKO_CERTIFICATE: return "certificate";
    case CKO_PUBLIC_KEY: return "public-key";
    case CKO_PRIVATE_KEY: return "private-key";
    case CKO_SECRET_KEY: return "secret-key";
    default: return "class-" + std::to_string(c);
  }
}

std::string KeyTypeName(CK_KEY_TYPE k) {
  switch (k) {
    case CKK_AES: return "AES";
    case CKK_EC: return "EC";
    case CKK_RSA: return "RSA";
    case CKK_GENERIC_SECRET: return "generic";
    default: return "type-" + std::to_string(k);
  }
}

}  // namespace custody::hsm
