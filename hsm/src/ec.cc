#include "custody/hsm/ec.h"

#include "custody/hsm/objects.h"
#include "custody/hsm/rv.h"

namespace custody::hsm {
namespace {

// DER of the named curve prime256v1 (OID 1.2.840.10045.3.1.7), for CKA_EC_PARAMS.
constexpr uint8_t kP256Params[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

// CKA_EC_POINT is a DER OCTET STRING holding the point (PKCS#11 2.40); some
// tokens return the bare point. Accept both, return the bare 65 bytes.
Result<std::vector<uint8_t>> BarePoint(std::vector<uint8_t> v) {
  if (v.size() == 65 && v[0] == 0x04) return v;
  if (v.size() == 67 && v[0] == 0x04 && v[1] == 65 && v[2] == 0x04) return std::vector<uint8_t>(v.begin() + 2, v.end());
  return Error(Category::kIntegrity, "the token returned an EC point that is not an uncompressed P-256 point");
}

Result<std::vector<uint8_t>> ReadPoint(Session& s, CK_OBJECT_HANDLE pub) {
  CK_ATTRIBUTE a{CKA_EC_POINT, nullptr, 0};
  CK_RV rv = s.fn()->C_GetAttributeValue(s.handle(), pub, &a, 1);
  if (rv != CKR_OK) return RvError(rv, "C_GetAttributeValue(CKA_EC_POINT)");
  std::vector<uint8_t> v(a.ulValueLen);
  a.pValue = v.data();
  rv = s.fn()->C_GetAttributeValue(s.handle(), pub, &a, 1);
  if (rv != CKR_OK) return RvError(rv, "C_GetAttributeValue(CKA_EC_POINT)");
  v.resize(a.ulValueLen);
  return BarePoint(std::move(v));
}

}  // namespace

Result<EcKey> GenerateEcKey(Session& s, const std::string& label) {
  EcKey k;
  k.id.resize(16);
  CUSTODY_RETURN_IF_ERROR(GenerateRandom(s, k.id));
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  CK_ATTRIBUTE pub_tmpl[] = {
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &no, sizeof no},
      {CKA_VERIFY, &yes, sizeof yes},
      {CKA_ENCRYPT, &no, sizeof no},
      {CKA_WRAP, &no, sizeof no},
      {CKA_EC_PARAMS, const_cast<uint8_t*>(kP256Params), sizeof kP256Params},
      {CKA_LABEL, const_cast<char*>(label.data()), static_cast<CK_ULONG>(label.size())},
      {CKA_ID, k.id.data(), static_cast<CK_ULONG>(k.id.size())},
  };
  CK_ATTRIBUTE priv_tmpl[] = {
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_SENSITIVE, &yes, sizeof yes},
      {CKA_EXTRACTABLE, &no, sizeof no},
      {CKA_SIGN, &yes, sizeof yes},
      {CKA_DECRYPT, &no, sizeof no},
      {CKA_UNWRAP, &no, sizeof no},
      {CKA_DERIVE, &no, sizeof no},
      {CKA_LABEL, const_cast<char*>(label.data()), static_cast<CK_ULONG>(label.size())},
      {CKA_ID, k.id.data(), static_cast<CK_ULONG>(k.id.size())},
  };
  CK_MECHANISM mech{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_RV rv = s.fn()->C_GenerateKeyPair(s.handle(), &mech, pub_tmpl, std::size(pub_tmpl), priv_tmpl,
                                       std::size(priv_tmpl), &k.public_key, &k.private_key);
  if (rv != CKR_OK) return RvError(rv, "C_GenerateKeyPair(P-256)").Wrap("creating " + label);
  CUSTODY_ASSIGN_OR_RETURN(k.point, ReadPoint(s, k.public_key));
  return k;
}

Result<std::optional<EcKey>> FindEcKey(Session& s, const std::string& label) {
  auto find = [&](CK_OBJECT_CLASS cls) -> Result<std::vector<CK_OBJECT_HANDLE>> {
    CK_KEY_TYPE kt = CKK_EC;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls},
                        {CKA_KEY_TYPE, &kt, sizeof kt},
                        {CKA_LABEL, const_cast<char*>(label.data()), static_cast<CK_ULONG>(label.size())}};
    return FindObjects(s, t, 2);
  };
  CUSTODY_ASSIGN_OR_RETURN(auto privs, find(CKO_PRIVATE_KEY));
  CUSTODY_ASSIGN_OR_RETURN(auto pubs, find(CKO_PUBLIC_KEY));
  if (privs.empty() && pubs.empty()) return std::optional<EcKey>();
  if (privs.size() != 1 || pubs.size() != 1) {
    return Error(Category::kIntegrity, "the token holds " + std::to_string(privs.size()) + " private and " +
                                           std::to_string(pubs.size()) + " public keys labelled " + label +
                                           "; expected one pair");
  }
  EcKey k;
  k.private_key = privs[0];
  k.public_key = pubs[0];
  CUSTODY_ASSIGN_OR_RETURN(auto d, Describe(s, k.private_key));
  k.id = d.id;
  CUSTODY_ASSIGN_OR_RETURN(k.point, ReadPoint(s, k.public_key));
  return std::optional<EcKey>(std::move(k));
}

Result<std::vector<uint8_t>> SignDigest(Session& s, CK_OBJECT_HANDLE private_key, std::span<const uint8_t, 32> digest) {
  CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
  CK_RV rv = s.fn()->C_SignInit(s.handle(), &mech, private_key);
  if (rv != CKR_OK) return RvError(rv, "C_SignInit(CKM_ECDSA)");
  std::vector<uint8_t> sig(64);
  CK_ULONG len = sig.size();
  rv = s.fn()->C_Sign(s.handle(), const_cast<uint8_t*>(digest.data()), 32, sig.data(), &len);
  if (rv != CKR_OK) return RvError(rv, "C_Sign(CKM_ECDSA)");
  if (len != 64) return Error(Category::kInternal, "the token returned a " + std::to_string(len) + "-byte P-256 signature");
  return sig;
}

}  // namespace custody::hsm
