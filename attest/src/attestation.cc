#include "custody/attest/attestation.h"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "custody/audit/audit.h"
#include "custody/common/base64.h"
#include "custody/common/hex.h"
#include "custody/tpm/tpm.h"

namespace custody::core {
namespace {

using nlohmann::json;

Error Bad(const std::string& what) { return Error(Category::kIntegrity, "attestation statement: " + what); }

// The first place (in key order) where `copy` says something `signed_part`
// does not, as a field path ("keys[0].id", "policy.sha256"); nullopt when
// they are the same JSON. `at` is the path so far ("" at the top).
std::optional<std::string> FirstDifference(const json& signed_part, const json& copy, const std::string& at) {
  auto field = [&](const std::string& key) { return at.empty() ? key : at + "." + key; };
  if (signed_part.is_object() && copy.is_object()) {
    auto a = signed_part.begin(), b = copy.begin();
    // Both iterate their keys in sorted order: walk them side by side.
    while (a != signed_part.end() || b != copy.end()) {
      if (b == copy.end() || (a != signed_part.end() && a.key() < b.key())) return field(a.key());
      if (a == signed_part.end() || b.key() < a.key()) return field(b.key());
      if (auto d = FirstDifference(*a, *b, field(a.key()))) return d;
      ++a;
      ++b;
    }
    return std::nullopt;
  }
  if (signed_part.is_array() && copy.is_array()) {
    size_t n = std::min(signed_part.size(), copy.size());
    for (size_t i = 0; i < n; ++i) {
      if (auto d = FirstDifference(signed_part[i], copy[i], at + "[" + std::to_string(i) + "]")) return d;
    }
    if (signed_part.size() != copy.size()) return at + "[" + std::to_string(n) + "]";
    return std::nullopt;
  }
  // Scalars (numbers compare by value whatever their JSON type), or a
  // change of kind.
  if (signed_part == copy) return std::nullopt;
  return at;
}

Result<EVP_PKEY*> ReadPublicKey(const std::string& pem) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
  EVP_PKEY* key = bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr;
  if (key == nullptr) return Error(Category::kUsage, "--pubkey is not a PEM public key");
  return key;
}

}  // namespace

Result<std::string> PublicKeyFingerprint(const std::string& public_key_pem) {
  CUSTODY_ASSIGN_OR_RETURN(EVP_PKEY * key, ReadPublicKey(public_key_pem));
  unsigned char* der = nullptr;
  int n = i2d_PUBKEY(key, &der);
  EVP_PKEY_free(key);
  if (n <= 0) return Error(Category::kInternal, "cannot encode the public key");
  unsigned char md[32];
  unsigned int len = 0;
  EVP_Digest(der, static_cast<size_t>(n), md, &len, EVP_sha256(), nullptr);
  OPENSSL_free(der);
  return ToHex(std::span<const uint8_t>(md, len));
}

std::string EncodeStatementFile(const std::string& payload, std::span<const uint8_t> signature,
                                const std::string& public_key_pem) {
  json j{{"format", kStatementFormat},
         {"payload", Base64Encode(payload)},
         {"signature", Base64Encode(signature)},
         {"public_key", public_key_pem},
         {"statement", json::parse(payload)}};  // for people; verify reads only the signed payload
  return j.dump(2) + "\n";
}

Result<StatementFile> ParseStatementFile(std::string_view text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad("not a JSON object");
  auto str = [&](const char* k) -> Result<std::string> {
    auto it = j.find(k);
    if (it == j.end() || !it->is_string()) return Bad(std::string("field '") + k + "' is missing or not a string");
    return it->get<std::string>();
  };
  CUSTODY_ASSIGN_OR_RETURN(std::string format, str("format"));
  if (format != kStatementFormat) return Bad("format '" + format + "' is not " + kStatementFormat);
  CUSTODY_ASSIGN_OR_RETURN(std::string payload_b64, str("payload"));
  CUSTODY_ASSIGN_OR_RETURN(std::string sig_b64, str("signature"));
  auto payload = Base64Decode(payload_b64);
  if (!payload) return Bad("payload is not base64");
  auto sig = Base64Decode(sig_b64);
  if (!sig || sig->empty()) return Bad("signature is not base64");
  StatementFile f{std::string(payload->begin(), payload->end()), std::move(*sig), std::nullopt};
  if (auto it = j.find("statement"); it != j.end()) f.readable = it->dump();
  return f;
}

Result<StatementSummary> VerifyStatementFile(std::string_view text, const std::string& public_key_pem,
                                             const std::optional<std::string>& nonce_hex) {
  CUSTODY_ASSIGN_OR_RETURN(StatementFile f, ParseStatementFile(text));
  {
    CUSTODY_ASSIGN_OR_RETURN(EVP_PKEY * key, ReadPublicKey(public_key_pem));
    std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> k(key, &EVP_PKEY_free);
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
    int ok = ctx && EVP_DigestVerifyInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key) == 1
                 ? EVP_DigestVerify(ctx.get(), f.signature.data(), f.signature.size(),
                                    reinterpret_cast<const unsigned char*>(f.payload.data()), f.payload.size())
                 : 0;
    if (ok != 1) {
      return Bad("the signature does not verify with this public key: the statement was changed, or it was made by "
                 "another key (another token)");
    }
  }
  json p = json::parse(f.payload, nullptr, false);
  if (p.is_discarded() || !p.is_object()) return Bad("signed payload is not a JSON object");
  if (f.readable) {
    // What a person reads in the file must be what was signed: an edited
    // copy beside a valid signature would show keys, a policy or a nonce
    // that nobody vouched for.
    json copy = json::parse(*f.readable, nullptr, false);
    if (auto d = FirstDifference(p, copy, "")) {
      return Bad((d->empty() ? std::string("the readable copy") : "field " + *d + " of the readable copy") +
                 " differs from the signed payload: the file was changed after it was signed");
    }
  }
  auto need = [&](const json& obj, const char* path, const char* key, json::value_t type) -> Result<const json*> {
    auto it = obj.find(key);
    bool ok = it != obj.end() &&
              (it->type() == type || (type == json::value_t::number_unsigned && it->is_number_integer() &&
                                      it->get<int64_t>() >= 0));
    if (!ok) return Bad(std::string("payload field ") + path + " is missing or has the wrong type");
    return &*it;
  };
  using T = json::value_t;
  CUSTODY_ASSIGN_OR_RETURN(const json* format, need(p, "format", "format", T::string));
  if (*format != kStatementFormat) return Bad("payload format is not " + std::string(kStatementFormat));
  CUSTODY_ASSIGN_OR_RETURN(const json* time, need(p, "time", "time", T::string));
  CUSTODY_ASSIGN_OR_RETURN(const json* backend, need(p, "backend", "backend", T::string));
  CUSTODY_ASSIGN_OR_RETURN(const json* token, need(p, "token", "token", T::object));
  CUSTODY_ASSIGN_OR_RETURN(const json* keys, need(p, "keys", "keys", T::array));
  for (size_t i = 0; i < keys->size(); ++i) {
    const json& k = (*keys)[i];
    std::string at = "keys[" + std::to_string(i) + "]";
    if (!k.is_object()) return Bad("payload field " + at + " is not an object");
    CUSTODY_RETURN_IF_ERROR(need(k, (at + ".role").c_str(), "role", T::string));
    CUSTODY_RETURN_IF_ERROR(need(k, (at + ".label").c_str(), "label", T::string));
    CUSTODY_RETURN_IF_ERROR(need(k, (at + ".fingerprint").c_str(), "fingerprint", T::string));
    CUSTODY_ASSIGN_OR_RETURN(const json* attrs, need(k, (at + ".attributes").c_str(), "attributes", T::object));
    for (const auto& [name, v] : attrs->items()) {
      if (!v.is_boolean()) return Bad("payload field " + at + ".attributes." + name + " is not true or false");
    }
  }
  CUSTODY_ASSIGN_OR_RETURN(const json* policy, need(p, "policy", "policy", T::object));
  CUSTODY_ASSIGN_OR_RETURN(const json* policy_sha, need(*policy, "policy.sha256", "sha256", T::string));
  CUSTODY_ASSIGN_OR_RETURN(const json* audit, need(p, "audit", "audit", T::object));
  CUSTODY_ASSIGN_OR_RETURN(const json* head_seq, need(*audit, "audit.head_seq", "head_seq", T::number_unsigned));
  CUSTODY_RETURN_IF_ERROR(need(*audit, "audit.head_hash", "head_hash", T::string));
  CUSTODY_ASSIGN_OR_RETURN(const json* ak, need(p, "attestation_key", "attestation_key", T::object));
  CUSTODY_ASSIGN_OR_RETURN(const json* ak_fp, need(*ak, "attestation_key.fingerprint", "fingerprint", T::string));
  CUSTODY_ASSIGN_OR_RETURN(std::string fp, PublicKeyFingerprint(public_key_pem));
  if (*ak_fp != fp) {
    return Bad("the payload names attestation key " + ak_fp->get<std::string>() + ", not the given key " + fp);
  }
  StatementSummary s;
  s.time = time->get<std::string>();
  s.backend = backend->get<std::string>();
  if (auto m = token->find("manufacturer"); m != token->end() && m->is_string()) s.token = m->get<std::string>();
  if (auto m = token->find("serial"); m != token->end() && m->is_string()) s.token += " serial " + m->get<std::string>();
  s.keys = keys->size();
  for (const json& k : *keys) {
    StatementKey sk{k["role"].get<std::string>(), k["label"].get<std::string>(), "", k["fingerprint"].get<std::string>()};
    if (auto id = k.find("id"); id != k.end() && id->is_string()) sk.id = id->get<std::string>();
    s.key_list.push_back(std::move(sk));
  }
  s.policy_sha256 = policy_sha->get<std::string>();
  if (auto v = policy->find("version"); v != policy->end() && v->is_number_unsigned()) {
    s.policy_version = v->get<uint64_t>();
  }
  s.audit_head_seq = head_seq->get<uint64_t>();
  s.audit_head_hash = (*audit)["head_hash"].get<std::string>();
  s.attestation_key = fp;
  auto nonce = p.find("nonce");
  if (nonce != p.end() && !nonce->is_string() && !nonce->is_null()) return Bad("payload field nonce has the wrong type");
  if (nonce != p.end() && nonce->is_string()) s.nonce = nonce->get<std::string>();
  if (nonce_hex) {
    std::string want = *nonce_hex;
    for (auto& c : want) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (s.nonce.empty()) return Bad("the statement carries no nonce, but nonce " + want + " was required");
    if (s.nonce != want) return Bad("the statement's nonce is " + s.nonce + ", not " + want + ": it is not fresh");
  }
  // The TPM's own evidence, inside the signed payload: the quote and each
  // KEK's certification must be TPM-made attestations of the right kind,
  // signed by the attestation key the quote carries (its signature checked
  // here with that public key), over the statement's nonce; the quote must cover exactly
  // the PCR values listed, and each certification the object it is attached
  // to. Whether that AK belongs to a genuine TPM (its chain to the EK
  // certificate) is not checked: see docs/ATTESTATION.md.
  std::string ak_pem;
  auto ecdsa_ok = [&](const std::vector<uint8_t>& message, const std::vector<uint8_t>& tpm_sig) -> Status {
    CUSTODY_ASSIGN_OR_RETURN(auto rs, tpm::EcdsaSignatureRs(tpm_sig));
    CUSTODY_ASSIGN_OR_RETURN(std::vector<uint8_t> der, P256SignatureDer(rs));
    CUSTODY_ASSIGN_OR_RETURN(EVP_PKEY * key, ReadPublicKey(ak_pem));
    std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> k(key, &EVP_PKEY_free);
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
    int ok = ctx && EVP_DigestVerifyInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key) == 1
                 ? EVP_DigestVerify(ctx.get(), der.data(), der.size(), message.data(), message.size())
                 : 0;
    if (ok != 1) return Error(Category::kIntegrity, "its TPM signature does not verify with the quote's attestation key");
    return Status::Ok();
  };
  auto tpm_evidence = [&](const json& obj, const std::string& at, bool want_quote) -> Result<tpm::AttestInfo> {
    CUSTODY_ASSIGN_OR_RETURN(const json* msg, need(obj, (at + ".message").c_str(), "message", T::string));
    CUSTODY_ASSIGN_OR_RETURN(const json* sig, need(obj, (at + ".signature").c_str(), "signature", T::string));
    auto bytes = Base64Decode(msg->get<std::string>());
    auto sig_bytes = Base64Decode(sig->get<std::string>());
    if (!bytes || !sig_bytes) return Bad(at + " is not base64");
    auto info = tpm::ParseAttest(*bytes);
    if (!info) return Bad(at + ": " + info.error().message());
    if (want_quote ? !info->quote : !info->certify) return Bad(at + " is not a TPM " + (want_quote ? "quote" : "certification"));
    if (ToHex(info->extra_data) != s.nonce) return Bad(at + " was made for another nonce than the statement's");
    Status sig_ok = ecdsa_ok(*bytes, *sig_bytes);
    if (!sig_ok.ok()) return Bad(at + ": " + sig_ok.error().message());
    return info;
  };
  auto q = p.find("tpm_quote");
  bool any_certify = false;
  for (const auto& k : *keys) any_certify = any_certify || k.contains("certify");
  if (any_certify && q == p.end()) return Bad("the statement has TPM certifications but no tpm_quote naming their key");
  if (q != p.end()) {
    if (!q->is_object()) return Bad("payload field tpm_quote is not an object");
    CUSTODY_ASSIGN_OR_RETURN(const json* pem, need(*q, "tpm_quote.ak_public_key", "ak_public_key", T::string));
    CUSTODY_RETURN_IF_ERROR(need(*q, "tpm_quote.ak_name", "ak_name", T::string));
    CUSTODY_ASSIGN_OR_RETURN(const json* values, need(*q, "tpm_quote.pcr_values", "pcr_values", T::string));
    ak_pem = pem->get<std::string>();
    CUSTODY_ASSIGN_OR_RETURN(auto info, tpm_evidence(*q, "tpm_quote", true));
    std::vector<uint8_t> pcr_bytes;
    const std::string hex = values->get<std::string>();
    if (hex.size() % 2 != 0) return Bad("tpm_quote.pcr_values is not hex");
    for (size_t i = 0; i < hex.size(); i += 2) {
      unsigned v = 0;
      if (std::sscanf(hex.c_str() + i, "%2x", &v) != 1) return Bad("tpm_quote.pcr_values is not hex");
      pcr_bytes.push_back(static_cast<uint8_t>(v));
    }
    unsigned char md[32];
    unsigned int len = 0;
    EVP_Digest(pcr_bytes.data(), pcr_bytes.size(), md, &len, EVP_sha256(), nullptr);
    if (info.pcr_digest != std::vector<uint8_t>(md, md + 32)) {
      return Bad("tpm_quote: the listed PCR values are not the ones the TPM quoted");
    }
    s.ak_name = (*q)["ak_name"].get<std::string>();
    // The AK's public area (newer statements carry it): its Name must be the
    // one quoted, its point the key the quote was checked with, and its
    // attributes those of a key the TPM made and keeps (fixedTPM, fixedParent,
    // sensitiveDataOrigin) that signs only what the TPM itself produced
    // (restricted). What a credential from the EK is bound to is this Name.
    if (auto ap = q->find("ak_public_area"); ap != q->end()) {
      if (!ap->is_string()) return Bad("payload field tpm_quote.ak_public_area is not a string");
      auto area = Base64Decode(ap->get<std::string>());
      if (!area) return Bad("tpm_quote.ak_public_area is not base64");
      tpm::SealedObject ak_obj;
      ak_obj.public_area = std::move(*area);
      auto described = tpm::Describe(ak_obj);
      if (!described) return Bad("tpm_quote.ak_public_area: " + described.error().message());
      if (!described->name_alg_sha256 || described->name != s.ak_name) {
        return Bad("tpm_quote.ak_public_area is not the public area of the AK named in the quote");
      }
      if (!(described->fixed_tpm && described->fixed_parent && described->sensitive_data_origin &&
            described->restricted && described->sign && !described->decrypt)) {
        return Bad("tpm_quote.ak_public_area: the AK is not a restricted signing key made and kept by the TPM");
      }
      auto point = tpm::EccPoint(ak_obj);
      if (!point) return Bad("tpm_quote.ak_public_area: " + point.error().message());
      auto pem_point = P256PublicKeyPem(*point);
      if (!pem_point || *pem_point != ak_pem) {
        return Bad("tpm_quote.ak_public_area holds another key than tpm_quote.ak_public_key");
      }
      s.ak_public_area = std::move(ak_obj.public_area);
    }
  }
  if (auto ek = p.find("tpm_ek"); ek != p.end()) {
    if (!ek->is_object()) return Bad("payload field tpm_ek is not an object");
    auto c = ek->find("certificate");
    if (c != ek->end() && !c->is_null()) {
      if (!c->is_string()) return Bad("payload field tpm_ek.certificate is not a string");
      auto der = Base64Decode(c->get<std::string>());
      if (!der || der->empty()) return Bad("tpm_ek.certificate is not base64");
      s.ek_certificate = std::move(*der);
    }
  }
  for (size_t i = 0; i < keys->size(); ++i) {
    const json& k = (*keys)[i];
    auto c = k.find("certify");
    if (c == k.end()) continue;
    std::string at = "keys[" + std::to_string(i) + "].certify";
    if (!c->is_object()) return Bad("payload field " + at + " is not an object");
    CUSTODY_ASSIGN_OR_RETURN(auto info, tpm_evidence(*c, at, false));
    // A KEK's fingerprint is its TPM Name; a signing key's is its public
    // key's, with the Name beside it (tpm_name).
    std::string certified_object = k["fingerprint"].get<std::string>();
    if (certified_object.rfind("tpm-name:", 0) != 0) {
      auto tn = k.find("tpm_name");
      if (tn == k.end() || !tn->is_string()) return Bad("payload field keys[" + std::to_string(i) + "].tpm_name is missing");
      certified_object = "tpm-name:" + tn->get<std::string>();
    }
    if ("tpm-name:" + info.certified_name != certified_object) {
      return Bad(at + " certifies another object than the key it is attached to");
    }
    // The key that signed this statement, certified by the AK: its public
    // area must hash to the certified Name and hold the very key the
    // statement's signature was checked with. Then the statement, not only
    // the quote, comes from the TPM the AK is in.
    if (k["role"] == "attestation") {
      auto pa = k.find("public_area");
      if (pa == k.end() || !pa->is_string()) return Bad("payload field keys[" + std::to_string(i) + "].public_area is missing");
      auto area = Base64Decode(pa->get<std::string>());
      if (!area) return Bad("keys[" + std::to_string(i) + "].public_area is not base64");
      tpm::SealedObject obj;
      obj.public_area = std::move(*area);
      auto described = tpm::Describe(obj);
      auto point = tpm::EccPoint(obj);
      if (!described || !point || "tpm-name:" + described->name != certified_object) {
        return Bad("keys[" + std::to_string(i) + "].public_area is not the certified object's public area");
      }
      // Made by the TPM and never leaving it: a key loaded from outside
      // (TPM2_LoadExternal, or a duplicable one) would be certified just the
      // same, and whoever holds its private half could sign any statement.
      if (!(described->name_alg_sha256 && described->fixed_tpm && described->fixed_parent &&
            described->sensitive_data_origin && described->sign && !described->decrypt)) {
        return Bad("keys[" + std::to_string(i) +
                   "]: the certified attestation key is not a signing key made and kept by the TPM (fixedTPM, "
                   "fixedParent, sensitiveDataOrigin)");
      }
      auto pem_point = P256PublicKeyPem(*point);
      if (!pem_point) return Bad("keys[" + std::to_string(i) + "].public_area: " + pem_point.error().message());
      CUSTODY_ASSIGN_OR_RETURN(EVP_PKEY * given, ReadPublicKey(public_key_pem));
      std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> g(given, &EVP_PKEY_free);
      CUSTODY_ASSIGN_OR_RETURN(EVP_PKEY * certified, ReadPublicKey(*pem_point));
      std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> ck(certified, &EVP_PKEY_free);
      if (EVP_PKEY_eq(given, certified) != 1) {
        return Bad("keys[" + std::to_string(i) + "]: the certified attestation key is not the key that signed the statement");
      }
      s.signer_certified = true;
    }
  }
  return s;
}

}  // namespace custody::core
