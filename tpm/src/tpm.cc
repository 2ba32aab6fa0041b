#include "custody/tpm/tpm.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "custody/common/hex.h"

namespace custody::tpm {
namespace {

constexpr uint8_t kMagic[4] = {'C', 'S', 'T', 'K'};
constexpr uint8_t kFormat = 1;

// What Esys_Create and Esys_CreatePrimary return besides the object: its
// creation data, hash and ticket, which custody does not use. Freed on
// every path out.
struct CreationOutputs {
  TPM2B_CREATION_DATA* data = nullptr;
  TPM2B_DIGEST* hash = nullptr;
  TPMT_TK_CREATION* ticket = nullptr;
  CreationOutputs() = default;
  CreationOutputs(const CreationOutputs&) = delete;
  CreationOutputs& operator=(const CreationOutputs&) = delete;
  ~CreationOutputs() {
    Esys_Free(data);
    Esys_Free(hash);
    Esys_Free(ticket);
  }
};

// The TPM's own response code, without the layer and, for format-one codes,
// without the handle/parameter/session number.
uint32_t BaseRc(uint32_t rc) {
  rc &= 0xFFFF;
  if (rc & TPM2_RC_FMT1) return rc & (TPM2_RC_FMT1 | 0x3F);
  return rc & (TPM2_RC_WARN | TPM2_RC_VER1 | 0x7F);
}

// Wipes and frees what ESAPI handed out.
template <typename T>
void Free(T*& p) {
  if (p != nullptr) {
    OPENSSL_cleanse(p, sizeof(T));
    Esys_Free(p);
    p = nullptr;
  }
}

TPMT_SYM_DEF AesCfb() {
  TPMT_SYM_DEF s{};
  s.algorithm = TPM2_ALG_AES;
  s.keyBits.aes = 128;
  s.mode.aes = TPM2_ALG_CFB;
  return s;
}

TPML_PCR_SELECTION Selection(const std::vector<uint8_t>& pcrs) {
  TPML_PCR_SELECTION sel{};
  sel.count = 1;
  sel.pcrSelections[0].hash = TPM2_ALG_SHA256;
  sel.pcrSelections[0].sizeofSelect = 3;
  for (uint8_t p : pcrs) sel.pcrSelections[0].pcrSelect[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
  return sel;
}

Status CopyAuth(const SecretBuffer& auth, TPM2B_AUTH& out) {
  auto a = auth.Reveal(SecretAccess{});
  if (a.size() > sizeof out.buffer) return Error(Category::kInternal, "TPM auth value longer than a SHA-256 digest");
  out.size = static_cast<UINT16>(a.size());
  std::memcpy(out.buffer, a.data(), a.size());
  return Status::Ok();
}

}  // namespace

Error TpmError(uint32_t rc, std::string_view call) {
  const char* decoded = Tss2_RC_Decode(rc);
  char code[16];
  std::snprintf(code, sizeof code, "0x%x", rc);
  std::string msg = std::string(call) + " failed: " + (decoded ? decoded : "unknown error") + " (" + code + ")";
  uint32_t layer = rc & TSS2_RC_LAYER_MASK;
  if (layer == TSS2_TCTI_RC_LAYER || (layer == TSS2_ESAPI_RC_LAYER && (rc & 0xFFFF) == TSS2_BASE_RC_IO_ERROR)) {
    return Error(Category::kUnavailable, msg + ": the TPM cannot be reached through the configured TCTI",
                 Backend::kTpm, rc);
  }
  if (layer != TSS2_TPM_RC_LAYER && layer != TSS2_RESMGR_TPM_RC_LAYER) {
    return Error(Category::kUnavailable, msg, Backend::kTpm, rc);
  }
  switch (BaseRc(rc)) {
    case TPM2_RC_POLICY_FAIL:
    case TPM2_RC_PCR_CHANGED:
      return Error(Category::kDenied,
                   msg + ": the object is sealed to another boot state (its PCR policy does not match the "
                         "current PCR values)",
                   Backend::kTpm, rc);
    case TPM2_RC_AUTH_FAIL:
    case TPM2_RC_BAD_AUTH:
      return Error(Category::kDenied,
                   msg + ": wrong auth value (the PIN does not match the one the object was sealed with); "
                         "each failure counts towards the TPM's dictionary-attack lockout",
                   Backend::kTpm, rc);
    case TPM2_RC_LOCKOUT:
      return Error(Category::kUnavailable, msg + ": the TPM is in dictionary-attack lockout", Backend::kTpm, rc);
    default:
      return Error(Category::kUnavailable, msg, Backend::kTpm, rc);
  }
}

std::vector<uint8_t> SealedObject::Encode() const {
  std::vector<uint8_t> out(kMagic, kMagic + 4);
  out.push_back(kFormat);
  out.push_back(static_cast<uint8_t>(pcrs.size()));
  out.insert(out.end(), pcrs.begin(), pcrs.end());
  for (const auto* part : {&public_area, &private_area}) {
    out.push_back(static_cast<uint8_t>(part->size() >> 8));
    out.push_back(static_cast<uint8_t>(part->size()));
    out.insert(out.end(), part->begin(), part->end());
  }
  return out;
}

Result<SealedObject> SealedObject::Decode(std::span<const uint8_t> b) {
  auto bad = [](const char* why) { return Error(Category::kIntegrity, std::string("TPM object in the store: ") + why); };
  if (b.size() < 6 || std::memcmp(b.data(), kMagic, 4) != 0) return bad("not a custody TPM object");
  if (b[4] != kFormat) return bad("unknown format version");
  size_t off = 5;
  size_t npcr = b[off++];
  if (off + npcr > b.size()) return bad("truncated");
  SealedObject o;
  for (size_t i = 0; i < npcr; ++i) {
    if (b[off] >= 24) return bad("PCR index out of range");
    o.pcrs.push_back(b[off++]);
  }
  for (auto* part : {&o.public_area, &o.private_area}) {
    if (off + 2 > b.size()) return bad("truncated");
    size_t n = (size_t{b[off]} << 8) | b[off + 1];
    off += 2;
    if (off + n > b.size()) return bad("truncated");
    part->assign(b.begin() + static_cast<ptrdiff_t>(off), b.begin() + static_cast<ptrdiff_t>(off + n));
    off += n;
  }
  if (off != b.size()) return bad("trailing bytes");
  return o;
}

Result<ObjectInfo> Describe(const SealedObject& object) {
  TPM2B_PUBLIC pub{};
  size_t off = 0;
  if (Tss2_MU_TPM2B_PUBLIC_Unmarshal(object.public_area.data(), object.public_area.size(), &off, &pub) !=
      TSS2_RC_SUCCESS) {
    return Error(Category::kIntegrity, "TPM object: its public area does not parse");
  }
  uint8_t buf[sizeof(TPMT_PUBLIC)];
  size_t len = 0;
  if (Tss2_MU_TPMT_PUBLIC_Marshal(&pub.publicArea, buf, sizeof buf, &len) != TSS2_RC_SUCCESS) {
    return Error(Category::kInternal, "cannot marshal a TPM public area");
  }
  uint8_t name[2 + 32];
  name[0] = static_cast<uint8_t>(pub.publicArea.nameAlg >> 8);
  name[1] = static_cast<uint8_t>(pub.publicArea.nameAlg);
  unsigned int md = 0;
  EVP_Digest(buf, len, name + 2, &md, EVP_sha256(), nullptr);
  ObjectInfo info;
  info.name = ToHex(std::span<const uint8_t>(name, 2 + md));
  TPMA_OBJECT a = pub.publicArea.objectAttributes;
  info.fixed_tpm = (a & TPMA_OBJECT_FIXEDTPM) != 0;
  info.fixed_parent = (a & TPMA_OBJECT_FIXEDPARENT) != 0;
  info.sensitive_data_origin = (a & TPMA_OBJECT_SENSITIVEDATAORIGIN) != 0;
  info.user_with_auth = (a & TPMA_OBJECT_USERWITHAUTH) != 0;
  info.policy_bound = pub.publicArea.authPolicy.size > 0;
  info.restricted = (a & TPMA_OBJECT_RESTRICTED) != 0;
  info.sign = (a & TPMA_OBJECT_SIGN_ENCRYPT) != 0;
  info.decrypt = (a & TPMA_OBJECT_DECRYPT) != 0;
  info.name_alg_sha256 = pub.publicArea.nameAlg == TPM2_ALG_SHA256;
  return info;
}

Result<std::vector<uint8_t>> EccPoint(const SealedObject& object) {
  TPM2B_PUBLIC pub{};
  size_t off = 0;
  if (Tss2_MU_TPM2B_PUBLIC_Unmarshal(object.public_area.data(), object.public_area.size(), &off, &pub) !=
          TSS2_RC_SUCCESS ||
      pub.publicArea.type != TPM2_ALG_ECC || pub.publicArea.parameters.eccDetail.curveID != TPM2_ECC_NIST_P256) {
    return Error(Category::kIntegrity, "TPM object: not a P-256 key");
  }
  const auto& ecc = pub.publicArea.unique.ecc;
  if (ecc.x.size > 32 || ecc.y.size > 32) return Error(Category::kIntegrity, "TPM object: oversized P-256 point");
  std::vector<uint8_t> point(65, 0);
  point[0] = 0x04;
  std::memcpy(point.data() + 1 + (32 - ecc.x.size), ecc.x.buffer, ecc.x.size);
  std::memcpy(point.data() + 33 + (32 - ecc.y.size), ecc.y.buffer, ecc.y.size);
  return point;
}

struct Tpm::Impl {
  TSS2_TCTI_CONTEXT* tcti = nullptr;
  ESYS_CONTEXT* ctx = nullptr;
  ESYS_TR srk = ESYS_TR_NONE;
  bool srk_persistent = false;
  ESYS_TR session = ESYS_TR_NONE;  // salted HMAC session, AES-128-CFB

  ~Impl() {
    if (ctx != nullptr) {
      if (session != ESYS_TR_NONE) Esys_FlushContext(ctx, session);
      if (srk != ESYS_TR_NONE && !srk_persistent) Esys_FlushContext(ctx, srk);
      Esys_Finalize(&ctx);
    }
    if (tcti != nullptr) Tss2_TctiLdr_Finalize(&tcti);
  }

  // A TPM error, with the lockout's duration when that is the cause.
  Error Fail(TSS2_RC rc, std::string_view call) {
    Error e = TpmError(rc, call);
    if (BaseRc(rc) == TPM2_RC_LOCKOUT || BaseRc(rc) == TPM2_RC_AUTH_FAIL) {
      TPMS_CAPABILITY_DATA* cap = nullptr;
      TPMI_YES_NO more = 0;
      if (Esys_GetCapability(ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_TPM_PROPERTIES,
                             TPM2_PT_LOCKOUT_COUNTER, 4, &more, &cap) == TSS2_RC_SUCCESS) {
        uint32_t counter = 0, max = 0, interval = 0;
        for (UINT32 i = 0; i < cap->data.tpmProperties.count; ++i) {
          const auto& p = cap->data.tpmProperties.tpmProperty[i];
          if (p.property == TPM2_PT_LOCKOUT_COUNTER) counter = p.value;
          if (p.property == TPM2_PT_MAX_AUTH_FAIL) max = p.value;
          if (p.property == TPM2_PT_LOCKOUT_INTERVAL) interval = p.value;
        }
        Esys_Free(cap);
        std::string more_text = "; failed tries " + std::to_string(counter) + " of " + std::to_string(max) +
                                ", one is forgiven every " + std::to_string(interval) + " s";
        if (BaseRc(rc) == TPM2_RC_LOCKOUT) {
          more_text += " (the lockout lasts until the count drops below the maximum: up to " +
                       std::to_string(static_cast<uint64_t>(interval) * (counter + 1 > max ? counter + 1 - max : 1)) +
                       " s)";
        }
        return Error(e.category(), e.message() + more_text, Backend::kTpm, rc);
      }
    }
    return e;
  }

  // Sets the shared session's attributes for the next command, starting
  // the session first if a failure dropped it.
  Status Attrs(TPMA_SESSION flags) {
    CUSTODY_RETURN_IF_ERROR(EnsureSession());
    TSS2_RC rc = Esys_TRSess_SetAttributes(ctx, session, flags | TPMA_SESSION_CONTINUESESSION, 0xFF);
    if (rc != TSS2_RC_SUCCESS) return Fail(rc, "Esys_TRSess_SetAttributes");
    return Status::Ok();
  }

  // The salted, parameter-encrypting HMAC session all plain uses share; it
  // is started again if a failed command left it unusable.
  Status EnsureSession() {
    if (session != ESYS_TR_NONE) return Status::Ok();
    TPMT_SYM_DEF sym = AesCfb();
    TSS2_RC rc = Esys_StartAuthSession(ctx, srk, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, nullptr,
                                       TPM2_SE_HMAC, &sym, TPM2_ALG_SHA256, &session);
    if (rc != TSS2_RC_SUCCESS) {
      session = ESYS_TR_NONE;
      return Fail(rc, "Esys_StartAuthSession");
    }
    return Status::Ok();
  }
  void DropSession() {
    if (session != ESYS_TR_NONE) Esys_FlushContext(ctx, session);
    session = ESYS_TR_NONE;
  }

  Status Srk(bool persist) {
    // TCG: the SRK lives at 0x81000001 when provisioned. Use it if present.
    TSS2_RC rc = Esys_TR_FromTPMPublic(ctx, kSrkHandle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &srk);
    if (rc == TSS2_RC_SUCCESS) {
      srk_persistent = true;
      return Status::Ok();
    }
    srk = ESYS_TR_NONE;
    // The standard ECC P-256 storage key template (TCG provisioning
    // guidance): restricted decrypt, AES-128-CFB, no DA, empty auth.
    TPM2B_PUBLIC tmpl{};
    tmpl.publicArea.type = TPM2_ALG_ECC;
    tmpl.publicArea.nameAlg = TPM2_ALG_SHA256;
    tmpl.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                       TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                                       TPMA_OBJECT_NODA | TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT;
    tmpl.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_AES;
    tmpl.publicArea.parameters.eccDetail.symmetric.keyBits.aes = 128;
    tmpl.publicArea.parameters.eccDetail.symmetric.mode.aes = TPM2_ALG_CFB;
    tmpl.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
    tmpl.publicArea.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
    tmpl.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
    tmpl.publicArea.unique.ecc.x.size = 32;
    tmpl.publicArea.unique.ecc.y.size = 32;
    TPM2B_SENSITIVE_CREATE sens{};
    TPM2B_DATA outside{};
    TPML_PCR_SELECTION none{};
    TPM2B_PUBLIC* pub = nullptr;
    CreationOutputs unused;
    rc = Esys_CreatePrimary(ctx, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &sens, &tmpl,
                            &outside, &none, &srk, &pub, &unused.data, &unused.hash, &unused.ticket);
    Esys_Free(pub);
    if (rc != TSS2_RC_SUCCESS) {
      srk = ESYS_TR_NONE;
      return Fail(rc, "Esys_CreatePrimary (SRK)");
    }
    if (persist) {
      ESYS_TR persistent = ESYS_TR_NONE;
      rc = Esys_EvictControl(ctx, ESYS_TR_RH_OWNER, srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, kSrkHandle,
                             &persistent);
      if (rc != TSS2_RC_SUCCESS) return Fail(rc, "Esys_EvictControl (persisting the SRK at 0x81000001)");
      Esys_FlushContext(ctx, srk);
      srk = persistent;
      srk_persistent = true;
    }
    return Status::Ok();
  }

  // Loads blobs under the SRK; the handle is flushed when the guard goes.
  struct Loaded {
    Impl* impl;
    ESYS_TR handle = ESYS_TR_NONE;
    ~Loaded() {
      if (handle != ESYS_TR_NONE) Esys_FlushContext(impl->ctx, handle);
    }
  };
  Status Load(const SealedObject& o, Loaded& out) {
    TPM2B_PUBLIC pub{};
    TPM2B_PRIVATE priv{};
    size_t off = 0;
    if (Tss2_MU_TPM2B_PUBLIC_Unmarshal(o.public_area.data(), o.public_area.size(), &off, &pub) != TSS2_RC_SUCCESS ||
        off != o.public_area.size()) {
      return Error(Category::kIntegrity, "TPM object in the store: its public area does not parse");
    }
    off = 0;
    if (Tss2_MU_TPM2B_PRIVATE_Unmarshal(o.private_area.data(), o.private_area.size(), &off, &priv) !=
            TSS2_RC_SUCCESS ||
        off != o.private_area.size()) {
      return Error(Category::kIntegrity, "TPM object in the store: its private area does not parse");
    }
    // TPM2_Load carries no secret: the private part is already encrypted
    // under the SRK, and the SRK's auth is empty. So it is authorised with a
    // plain password session: tpm2-tss 3.2 with OpenSSL 3 spends about 2.5 ms
    // of host CPU per command in a salted session (a fresh OpenSSL library
    // context per hash). The command that returns a secret, Unseal, still
    // runs in the encrypted session, and its HMAC covers the object's Name,
    // so a swapped object is refused there.
    TSS2_RC rc = Esys_Load(ctx, srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &priv, &pub, &out.handle);
    if (rc != TSS2_RC_SUCCESS) {
      out.handle = ESYS_TR_NONE;
      if (BaseRc(rc) == TPM2_RC_INTEGRITY || BaseRc(rc) == TPM2_RC_SIZE || BaseRc(rc) == TPM2_RC_VALUE) {
        Error e = Fail(rc, "Esys_Load");
        return Error(Category::kIntegrity,
                     e.message() + ": the object was altered, or was sealed under another TPM's SRK", Backend::kTpm,
                     rc);
      }
      return Fail(rc, "Esys_Load");
    }
    return Status::Ok();
  }

  // A policy session satisfying PolicyPCR(pcrs) + PolicyAuthValue, with
  // response encryption; trial sessions compute the digest at creation.
  Result<ESYS_TR> PolicySession(const std::vector<uint8_t>& pcrs, bool trial) {
    TPMT_SYM_DEF sym = trial ? TPMT_SYM_DEF{} : AesCfb();
    if (trial) sym.algorithm = TPM2_ALG_NULL;
    ESYS_TR s = ESYS_TR_NONE;
    TSS2_RC rc = Esys_StartAuthSession(ctx, trial ? ESYS_TR_NONE : srk, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                       ESYS_TR_NONE, nullptr, trial ? TPM2_SE_TRIAL : TPM2_SE_POLICY, &sym,
                                       TPM2_ALG_SHA256, &s);
    if (rc != TSS2_RC_SUCCESS) return Fail(rc, "Esys_StartAuthSession (policy)");
    TPM2B_DIGEST current{};  // empty: the TPM uses the PCRs' current values
    TPML_PCR_SELECTION sel = Selection(pcrs);
    const char* step = "Esys_PolicyPCR";
    rc = Esys_PolicyPCR(ctx, s, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &current, &sel);
    if (rc == TSS2_RC_SUCCESS) {
      step = "Esys_PolicyAuthValue";
      rc = Esys_PolicyAuthValue(ctx, s, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE);
    }
    if (rc != TSS2_RC_SUCCESS) {
      Esys_FlushContext(ctx, s);
      return Fail(rc, step);
    }
    return s;
  }

  Result<std::pair<TPM2B_PRIVATE*, TPM2B_PUBLIC*>> Create(TPM2B_SENSITIVE_CREATE& sens, const TPM2B_PUBLIC& tmpl) {
    // The sensitive data (a KEK, an auth value) is wiped on every path out.
    struct Wipe {
      TPM2B_SENSITIVE_CREATE& s;
      ~Wipe() { OPENSSL_cleanse(&s, sizeof s); }
    } wipe{sens};
    // DECRYPT: the first parameter, the sensitive data and its auth value,
    // crosses the bus encrypted.
    CUSTODY_RETURN_IF_ERROR(Attrs(TPMA_SESSION_DECRYPT));
    TPM2B_DATA outside{};
    TPML_PCR_SELECTION none{};
    TPM2B_PRIVATE* priv = nullptr;
    TPM2B_PUBLIC* pub = nullptr;
    CreationOutputs unused;
    TSS2_RC rc = Esys_Create(ctx, srk, session, ESYS_TR_NONE, ESYS_TR_NONE, &sens, &tmpl, &outside, &none, &priv,
                             &pub, &unused.data, &unused.hash, &unused.ticket);
    OPENSSL_cleanse(&sens, sizeof sens);
    if (rc != TSS2_RC_SUCCESS) {
      DropSession();
      return Fail(rc, "Esys_Create");
    }
    return std::make_pair(priv, pub);
  }

  // The attestation key, made from the endorsement seed (deterministic), and
  // flushed by the caller's guard.
  Status LoadAk(Loaded& out, std::vector<uint8_t>* point, std::string* name,
                std::vector<uint8_t>* public_area = nullptr) {
    TPM2B_PUBLIC tmpl{};
    tmpl.publicArea.type = TPM2_ALG_ECC;
    tmpl.publicArea.nameAlg = TPM2_ALG_SHA256;
    tmpl.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                       TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                                       TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_SIGN_ENCRYPT;
    tmpl.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
    tmpl.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_ECDSA;
    tmpl.publicArea.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256;
    tmpl.publicArea.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
    tmpl.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
    TPM2B_SENSITIVE_CREATE sens{};
    TPM2B_DATA outside{};
    TPML_PCR_SELECTION none{};
    TPM2B_PUBLIC* pub = nullptr;
    CreationOutputs unused;
    TSS2_RC rc = Esys_CreatePrimary(ctx, ESYS_TR_RH_ENDORSEMENT, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &sens,
                                    &tmpl, &outside, &none, &out.handle, &pub, &unused.data, &unused.hash,
                                    &unused.ticket);
    if (rc != TSS2_RC_SUCCESS) {
      out.handle = ESYS_TR_NONE;
      return Fail(rc, "Esys_CreatePrimary (attestation key, endorsement hierarchy)");
    }
    const auto& ecc = pub->publicArea.unique.ecc;
    if (ecc.x.size > 32 || ecc.y.size > 32) {
      Esys_Free(pub);
      return Error(Category::kInternal, "TPM returned an oversized P-256 point for the attestation key");
    }
    point->assign(65, 0);
    (*point)[0] = 0x04;
    std::memcpy(point->data() + 1 + (32 - ecc.x.size), ecc.x.buffer, std::min<size_t>(ecc.x.size, 32));
    std::memcpy(point->data() + 33 + (32 - ecc.y.size), ecc.y.buffer, std::min<size_t>(ecc.y.size, 32));
    if (public_area != nullptr) {
      // As the TSS marshals a TPM2B_PUBLIC: a verifier recomputes the Name
      // from it and reads the attributes (fixedTPM, restricted, sign).
      uint8_t buf[sizeof(TPM2B_PUBLIC)];
      size_t off = 0;
      if (Tss2_MU_TPM2B_PUBLIC_Marshal(pub, buf, sizeof buf, &off) != TSS2_RC_SUCCESS) {
        Esys_Free(pub);
        return Error(Category::kInternal, "cannot marshal the attestation key's public area");
      }
      public_area->assign(buf, buf + off);
    }
    Esys_Free(pub);
    TPM2B_NAME* n = nullptr;
    if (Esys_TR_GetName(ctx, out.handle, &n) == TSS2_RC_SUCCESS) {
      *name = ToHex(std::span<const uint8_t>(n->name, n->size));
      Esys_Free(n);
    }
    return Status::Ok();
  }

  static Result<Attested> Collect(TPM2B_ATTEST* attest, TPMT_SIGNATURE* sig) {
    Attested a;
    a.message.assign(attest->attestationData, attest->attestationData + attest->size);
    uint8_t buf[sizeof(TPMT_SIGNATURE)];
    size_t off = 0;
    TSS2_RC rc = Tss2_MU_TPMT_SIGNATURE_Marshal(sig, buf, sizeof buf, &off);
    Esys_Free(attest);
    Esys_Free(sig);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "Tss2_MU_TPMT_SIGNATURE_Marshal");
    a.signature.assign(buf, buf + off);
    return a;
  }

  static Result<SealedObject> Marshal(TPM2B_PRIVATE* priv, TPM2B_PUBLIC* pub) {
    SealedObject o;
    uint8_t buf[sizeof(TPM2B_PUBLIC) + sizeof(TPM2B_PRIVATE)];
    size_t off = 0;
    TSS2_RC rc = Tss2_MU_TPM2B_PUBLIC_Marshal(pub, buf, sizeof buf, &off);
    if (rc == TSS2_RC_SUCCESS) o.public_area.assign(buf, buf + off);
    off = 0;
    if (rc == TSS2_RC_SUCCESS) rc = Tss2_MU_TPM2B_PRIVATE_Marshal(priv, buf, sizeof buf, &off);
    if (rc == TSS2_RC_SUCCESS) o.private_area.assign(buf, buf + off);
    Esys_Free(priv);
    Esys_Free(pub);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "Tss2_MU marshal");
    return o;
  }
};

Tpm::Tpm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tpm::~Tpm() = default;

namespace {

// A connection: the TCTI, the ESAPI context, TPM2_Startup if the TPM was
// just powered on, the SRK (checked against `expected_srk_name` when set).
// The SRK's Name goes to `srk_name`.
Result<std::unique_ptr<Tpm::Impl>> Connect(const Options& options, std::string* srk_name) {
  auto impl = std::make_unique<Tpm::Impl>();
  TSS2_RC rc = Tss2_TctiLdr_Initialize(options.tcti.empty() ? nullptr : options.tcti.c_str(), &impl->tcti);
  if (rc != TSS2_RC_SUCCESS) {
    impl->tcti = nullptr;
    return Error(Category::kUnavailable,
                 "cannot open the TPM through TCTI '" + options.tcti + "': " + Tss2_RC_Decode(rc) +
                     " (is the TPM, swtpm or tpm2-abrmd running, and is the TCTI string right?)",
                 Backend::kTpm, rc);
  }
  rc = Esys_Initialize(&impl->ctx, impl->tcti, nullptr);
  if (rc != TSS2_RC_SUCCESS) {
    impl->ctx = nullptr;
    return TpmError(rc, "Esys_Initialize");
  }
  // A TPM that was just powered on needs TPM2_Startup; one that is running
  // answers TPM_RC_INITIALIZE, which is fine.
  rc = Esys_Startup(impl->ctx, TPM2_SU_CLEAR);
  if (rc != TSS2_RC_SUCCESS && BaseRc(rc) != TPM2_RC_INITIALIZE) return TpmError(rc, "Esys_Startup");
  CUSTODY_RETURN_IF_ERROR(impl->Srk(options.persist_srk));
  TPM2B_NAME* name = nullptr;
  rc = Esys_TR_GetName(impl->ctx, impl->srk, &name);
  if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "Esys_TR_GetName (SRK)");
  std::string got = ToHex(std::span<const uint8_t>(name->name, name->size));
  Esys_Free(name);
  if (!options.expected_srk_name.empty() && got != options.expected_srk_name) {
    return Error(Category::kIntegrity, "the TPM's storage root key (name " + got +
                                           ") is not the one custody was set up with (" + options.expected_srk_name +
                                           "): another TPM, a cleared owner hierarchy, or a substituted key; refusing",
                 Backend::kTpm, 0);
  }
  *srk_name = std::move(got);
  return impl;
}

}  // namespace

Result<std::unique_ptr<Tpm>> Tpm::Open(const Options& options) {
  // tpm2-tss logs its errors to stderr; custody reports them itself, in one
  // line. An explicit TSS2_LOG from the user still wins.
  ::setenv("TSS2_LOG", "all+NONE", /*overwrite=*/0);
  std::string srk_name;
  CUSTODY_ASSIGN_OR_RETURN(auto impl, Connect(options, &srk_name));
  std::unique_ptr<Tpm> tpm(new Tpm(std::move(impl)));
  tpm->options_ = options;
  // Pinned from here on: a reconnect must find the same SRK (re-created
  // from the same template on the same TPM, it has the same Name).
  tpm->options_.expected_srk_name = srk_name;
  return tpm;
}

Result<Tpm::Impl*> Tpm::Ready() {
  if (impl_) return impl_.get();
  // Lost at the last reconnect: every call tries again, so serving resumes
  // as soon as the TPM answers.
  std::string srk_name;
  auto fresh = Connect(options_, &srk_name);
  if (!fresh) return std::move(fresh).error().Wrap("reconnecting to the TPM");
  impl_ = std::move(*fresh);
  ++reconnects_;
  return impl_.get();
}

Status Tpm::Reconnect() {
  std::lock_guard lock(mu_);
  // The old context goes first, flushing what it had loaded (on a TPM
  // that did not restart these are still there; on one that did the
  // flushes fail harmlessly). Done after the new context existed, they
  // could hit the new context's objects under the same handle numbers.
  impl_.reset();
  auto r = Ready();
  if (!r) return std::move(r).error();
  return Status::Ok();
}

uint64_t Tpm::reconnects() const { return reconnects_.load(); }

bool Tpm::LooksLost(const Error& e) {
  if (e.backend() != Backend::kTpm) return false;
  const auto rc = static_cast<uint32_t>(e.code());
  const uint32_t layer = rc & TSS2_RC_LAYER_MASK;
  // The transport: swtpm or tpm2-abrmd restarted, the device gone.
  if (layer == TSS2_TCTI_RC_LAYER) return true;
  if (layer == TSS2_ESAPI_RC_LAYER || layer == TSS2_SYS_RC_LAYER) {
    const uint32_t base = rc & 0xFFFF;
    // BAD_SEQUENCE: a command cut off half-way (the transport broke between
    // its send and its answer) leaves the ESAPI context in a state no call
    // can leave; only a new context can.
    return base == TSS2_BASE_RC_IO_ERROR || base == TSS2_BASE_RC_NO_CONNECTION || base == TSS2_BASE_RC_TRY_AGAIN ||
           base == TSS2_BASE_RC_BAD_SEQUENCE;
  }
  if (layer != TSS2_TPM_RC_LAYER && layer != TSS2_RESMGR_TPM_RC_LAYER) return false;
  const uint32_t base = BaseRc(rc);
  // A TPM that restarted (TPM2_Startup not yet run), or whose transient
  // objects and sessions are gone (a reset flushes them): the handles this
  // context holds refer to nothing.
  if (base == TPM2_RC_INITIALIZE) return true;
  if (base >= TPM2_RC_REFERENCE_H0 && base <= TPM2_RC_REFERENCE_S6) return true;
  if (base == TPM2_RC_HANDLE) return true;
  return false;
}

Result<SealedObject> Tpm::Seal(const SecretBuffer& data, const SecretBuffer& auth, const SealOptions& options) {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  auto d = data.Reveal(SecretAccess{});
  TPM2B_SENSITIVE_CREATE sens{};
  if (d.empty() || d.size() > sizeof sens.sensitive.data.buffer) {
    return Error(Category::kInternal, "TPM sealed data must be 1 to 128 bytes");
  }
  for (uint8_t p : options.pcrs) {
    if (p >= 24) return Error(Category::kConfig, "PCR " + std::to_string(p) + " does not exist (0 to 23)");
  }
  TPM2B_PUBLIC tmpl{};
  tmpl.publicArea.type = TPM2_ALG_KEYEDHASH;
  tmpl.publicArea.nameAlg = TPM2_ALG_SHA256;
  tmpl.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT;
  tmpl.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL;
  if (options.pcrs.empty()) {
    tmpl.publicArea.objectAttributes |= TPMA_OBJECT_USERWITHAUTH;
  } else {
    // Only the policy (these PCR values, and the auth value) can unseal it.
    CUSTODY_ASSIGN_OR_RETURN(ESYS_TR trial, t.PolicySession(options.pcrs, /*trial=*/true));
    TPM2B_DIGEST* digest = nullptr;
    TSS2_RC rc = Esys_PolicyGetDigest(t.ctx, trial, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &digest);
    Esys_FlushContext(t.ctx, trial);
    if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_PolicyGetDigest");
    tmpl.publicArea.authPolicy = *digest;
    Esys_Free(digest);
  }
  CUSTODY_RETURN_IF_ERROR(CopyAuth(auth, sens.sensitive.userAuth));
  sens.sensitive.data.size = static_cast<UINT16>(d.size());
  std::memcpy(sens.sensitive.data.buffer, d.data(), d.size());
  CUSTODY_ASSIGN_OR_RETURN(auto created, t.Create(sens, tmpl));  // wipes `sens`
  CUSTODY_ASSIGN_OR_RETURN(SealedObject o, Impl::Marshal(created.first, created.second));
  o.pcrs = options.pcrs;
  return o;
}

Result<SecretBuffer> Tpm::Unseal(const SealedObject& object, const SecretBuffer& auth) {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  Impl::Loaded obj{&t};
  CUSTODY_RETURN_IF_ERROR(t.Load(object, obj));
  TPM2B_AUTH a{};
  CUSTODY_RETURN_IF_ERROR(CopyAuth(auth, a));
  TSS2_RC rc = Esys_TR_SetAuth(t.ctx, obj.handle, &a);
  OPENSSL_cleanse(&a, sizeof a);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_TR_SetAuth");
  TPM2B_SENSITIVE_DATA* out = nullptr;
  if (object.pcrs.empty()) {
    CUSTODY_RETURN_IF_ERROR(t.Attrs(TPMA_SESSION_ENCRYPT));  // the answer crosses the bus encrypted
    rc = Esys_Unseal(t.ctx, obj.handle, t.session, ESYS_TR_NONE, ESYS_TR_NONE, &out);
    if (rc != TSS2_RC_SUCCESS) t.DropSession();
  } else {
    CUSTODY_ASSIGN_OR_RETURN(ESYS_TR ps, t.PolicySession(object.pcrs, /*trial=*/false));
    rc = Esys_TRSess_SetAttributes(t.ctx, ps, TPMA_SESSION_ENCRYPT, 0xFF);
    if (rc == TSS2_RC_SUCCESS) rc = Esys_Unseal(t.ctx, obj.handle, ps, ESYS_TR_NONE, ESYS_TR_NONE, &out);
    // Without continueSession the TPM ends the policy session after a
    // successful command; after a failed one it is still loaded.
    if (rc != TSS2_RC_SUCCESS) Esys_FlushContext(t.ctx, ps);
  }
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_Unseal");
  SecretBuffer value = SecretBuffer::Copy(std::span<const uint8_t>(out->buffer, out->size));
  Free(out);  // ESAPI's copy, wiped before it is freed
  return value;
}

Result<SigningKey> Tpm::CreateSigningKey(const SecretBuffer& auth) {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  TPM2B_PUBLIC tmpl{};
  tmpl.publicArea.type = TPM2_ALG_ECC;
  tmpl.publicArea.nameAlg = TPM2_ALG_SHA256;
  tmpl.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                     TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                                     TPMA_OBJECT_SIGN_ENCRYPT;
  tmpl.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
  tmpl.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_ECDSA;
  tmpl.publicArea.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256;
  tmpl.publicArea.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  tmpl.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  TPM2B_SENSITIVE_CREATE sens{};
  CUSTODY_RETURN_IF_ERROR(CopyAuth(auth, sens.sensitive.userAuth));
  CUSTODY_ASSIGN_OR_RETURN(auto created, t.Create(sens, tmpl));
  SigningKey key;
  const auto& ecc = created.second->publicArea.unique.ecc;
  if (ecc.x.size > 32 || ecc.y.size > 32) return Error(Category::kInternal, "TPM returned an oversized P-256 point");
  key.point.assign(65, 0);
  key.point[0] = 0x04;
  std::memcpy(key.point.data() + 1 + (32 - ecc.x.size), ecc.x.buffer, ecc.x.size);
  std::memcpy(key.point.data() + 33 + (32 - ecc.y.size), ecc.y.buffer, ecc.y.size);
  CUSTODY_ASSIGN_OR_RETURN(key.blobs, Impl::Marshal(created.first, created.second));
  return key;
}

Result<std::vector<uint8_t>> Tpm::Sign(const SigningKey& key, const SecretBuffer& auth,
                                       std::span<const uint8_t, 32> digest) {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  Impl::Loaded obj{&t};
  CUSTODY_RETURN_IF_ERROR(t.Load(key.blobs, obj));
  TPM2B_AUTH a{};
  CUSTODY_RETURN_IF_ERROR(CopyAuth(auth, a));
  TSS2_RC rc = Esys_TR_SetAuth(t.ctx, obj.handle, &a);
  OPENSSL_cleanse(&a, sizeof a);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_TR_SetAuth");
  TPM2B_DIGEST d{};
  d.size = 32;
  std::memcpy(d.buffer, digest.data(), 32);
  TPMT_SIG_SCHEME scheme{};
  scheme.scheme = TPM2_ALG_ECDSA;
  scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256;
  TPMT_TK_HASHCHECK check{};
  check.tag = TPM2_ST_HASHCHECK;
  check.hierarchy = TPM2_RH_NULL;
  CUSTODY_RETURN_IF_ERROR(t.Attrs(TPMA_SESSION_DECRYPT));
  TPMT_SIGNATURE* sig = nullptr;
  rc = Esys_Sign(t.ctx, obj.handle, t.session, ESYS_TR_NONE, ESYS_TR_NONE, &d, &scheme, &check, &sig);
  if (rc != TSS2_RC_SUCCESS) {
    t.DropSession();
    return t.Fail(rc, "Esys_Sign");
  }
  std::vector<uint8_t> rs(64, 0);
  const auto& r = sig->signature.ecdsa.signatureR;
  const auto& s = sig->signature.ecdsa.signatureS;
  if (r.size > 32 || s.size > 32) {
    Esys_Free(sig);
    return Error(Category::kInternal, "TPM returned an oversized ECDSA signature");
  }
  std::memcpy(rs.data() + (32 - r.size), r.buffer, r.size);
  std::memcpy(rs.data() + 32 + (32 - s.size), s.buffer, s.size);
  Esys_Free(sig);
  return rs;
}

Status Tpm::Random(std::span<uint8_t> out) {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  size_t off = 0;
  while (off < out.size()) {
    UINT16 want = static_cast<UINT16>(std::min<size_t>(32, out.size() - off));
    CUSTODY_RETURN_IF_ERROR(t.EnsureSession());
    CUSTODY_RETURN_IF_ERROR(t.Attrs(TPMA_SESSION_ENCRYPT));
    TPM2B_DIGEST* r = nullptr;
    TSS2_RC rc = Esys_GetRandom(t.ctx, t.session, ESYS_TR_NONE, ESYS_TR_NONE, want, &r);
    if (rc != TSS2_RC_SUCCESS) {
      t.DropSession();
      return t.Fail(rc, "Esys_GetRandom");
    }
    size_t n = std::min<size_t>(r->size, out.size() - off);
    std::memcpy(out.data() + off, r->buffer, n);
    off += n;
    Free(r);
  }
  return Status::Ok();
}

Result<Info> Tpm::GetInfo() {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  TPMS_CAPABILITY_DATA* cap = nullptr;
  TPMI_YES_NO more = 0;
  TSS2_RC rc = Esys_GetCapability(t.ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_TPM_PROPERTIES,
                                  TPM2_PT_MANUFACTURER, 8, &more, &cap);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_GetCapability");
  Info info;
  auto chars = [](uint32_t v) {
    std::string s;
    for (int shift = 24; shift >= 0; shift -= 8) {
      char c = static_cast<char>((v >> shift) & 0xFF);
      if (c >= 0x20 && c < 0x7F) s += c;
    }
    return s;
  };
  uint32_t fw1 = 0, fw2 = 0;
  for (UINT32 i = 0; i < cap->data.tpmProperties.count; ++i) {
    const auto& p = cap->data.tpmProperties.tpmProperty[i];
    if (p.property == TPM2_PT_MANUFACTURER) info.manufacturer = chars(p.value);
    if (p.property >= TPM2_PT_VENDOR_STRING_1 && p.property <= TPM2_PT_VENDOR_STRING_1 + 3) info.vendor += chars(p.value);
    if (p.property == TPM2_PT_FIRMWARE_VERSION_1) fw1 = p.value;
    if (p.property == TPM2_PT_FIRMWARE_VERSION_1 + 1) fw2 = p.value;
  }
  Esys_Free(cap);
  info.firmware = std::to_string(fw1 >> 16) + "." + std::to_string(fw1 & 0xFFFF) + "." + std::to_string(fw2 >> 16) +
                  "." + std::to_string(fw2 & 0xFFFF);
  info.srk_handle = t.srk_persistent ? kSrkHandle : 0;
  TPM2B_NAME* name = nullptr;
  rc = Esys_TR_GetName(t.ctx, t.srk, &name);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_TR_GetName");
  info.srk_name = ToHex(std::span<const uint8_t>(name->name, name->size));
  Esys_Free(name);
  return info;
}

Result<AttestInfo> ParseAttest(std::span<const uint8_t> message) {
  TPMS_ATTEST a{};
  size_t off = 0;
  if (Tss2_MU_TPMS_ATTEST_Unmarshal(message.data(), message.size(), &off, &a) != TSS2_RC_SUCCESS ||
      off != message.size()) {
    return Error(Category::kIntegrity, "TPM attestation: the message does not parse as TPMS_ATTEST");
  }
  if (a.magic != TPM2_GENERATED_VALUE) {
    return Error(Category::kIntegrity, "TPM attestation: the message was not generated by a TPM (bad magic)");
  }
  AttestInfo info;
  info.quote = a.type == TPM2_ST_ATTEST_QUOTE;
  info.certify = a.type == TPM2_ST_ATTEST_CERTIFY;
  info.extra_data.assign(a.extraData.buffer, a.extraData.buffer + a.extraData.size);
  if (info.quote) {
    info.pcr_digest.assign(a.attested.quote.pcrDigest.buffer,
                           a.attested.quote.pcrDigest.buffer + a.attested.quote.pcrDigest.size);
  }
  if (info.certify) {
    info.certified_name = ToHex(std::span<const uint8_t>(a.attested.certify.name.name, a.attested.certify.name.size));
  }
  return info;
}

Result<std::vector<uint8_t>> EcdsaSignatureRs(std::span<const uint8_t> signature) {
  TPMT_SIGNATURE sig{};
  size_t off = 0;
  if (Tss2_MU_TPMT_SIGNATURE_Unmarshal(signature.data(), signature.size(), &off, &sig) != TSS2_RC_SUCCESS ||
      off != signature.size() || sig.sigAlg != TPM2_ALG_ECDSA || sig.signature.ecdsa.hash != TPM2_ALG_SHA256 ||
      sig.signature.ecdsa.signatureR.size > 32 || sig.signature.ecdsa.signatureS.size > 32) {
    return Error(Category::kIntegrity, "TPM attestation: the signature is not an ECDSA/SHA-256 TPMT_SIGNATURE");
  }
  std::vector<uint8_t> rs(64, 0);
  const auto& r = sig.signature.ecdsa.signatureR;
  const auto& s = sig.signature.ecdsa.signatureS;
  std::memcpy(rs.data() + (32 - r.size), r.buffer, r.size);
  std::memcpy(rs.data() + 32 + (32 - s.size), s.buffer, s.size);
  return rs;
}

Result<Quote> Tpm::QuotePcrs(std::span<const uint8_t> qualifying, const std::vector<uint8_t>& pcrs) {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  TPM2B_DATA q{};
  if (qualifying.size() > sizeof q.buffer) return Error(Category::kUsage, "the nonce is longer than 64 bytes");
  q.size = static_cast<UINT16>(qualifying.size());
  std::memcpy(q.buffer, qualifying.data(), qualifying.size());
  Quote out;
  std::vector<uint8_t> sorted = pcrs;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  if (sorted.empty() || sorted.back() >= 24) return Error(Category::kUsage, "quote: PCRs are 0 to 23");
  Impl::Loaded ak{&t};
  CUSTODY_RETURN_IF_ERROR(t.LoadAk(ak, &out.ak_point, &out.ak_name, &out.ak_public));
  TPML_PCR_SELECTION sel = Selection(sorted);
  TPMT_SIG_SCHEME scheme{};
  scheme.scheme = TPM2_ALG_NULL;  // the key's own: ECDSA with SHA-256
  TPM2B_ATTEST* attest = nullptr;
  TPMT_SIGNATURE* sig = nullptr;
  TSS2_RC rc = Esys_Quote(t.ctx, ak.handle, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &q, &scheme, &sel, &attest, &sig);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_Quote");
  CUSTODY_ASSIGN_OR_RETURN(out.attested, Impl::Collect(attest, sig));
  // The quoted values, one PCR at a time, in index order (as tpm2_pcrread
  // writes them and tpm2_checkquote -f with -l reads them).
  for (uint8_t p : sorted) {
    TPML_PCR_SELECTION one = Selection({p});
    UINT32 counter = 0;
    TPML_PCR_SELECTION* got_sel = nullptr;
    TPML_DIGEST* values = nullptr;
    rc = Esys_PCR_Read(t.ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &one, &counter, &got_sel, &values);
    if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_PCR_Read");
    bool ok = values->count == 1 && values->digests[0].size == 32;
    if (ok) {
      out.pcr_values.insert(out.pcr_values.end(), values->digests[0].buffer, values->digests[0].buffer + 32);
    }
    Esys_Free(got_sel);
    Esys_Free(values);
    if (!ok) {
      return Error(Category::kUnavailable, "quote: the TPM has no SHA-256 value for PCR " + std::to_string(p) +
                                               " (is the SHA-256 bank allocated?)");
    }
  }
  out.pcrs = sorted;
  {
    // The values read must be the ones quoted (a PCR may be extended between
    // the quote and the read): the quote's pcrDigest is their SHA-256.
    CUSTODY_ASSIGN_OR_RETURN(AttestInfo info, ParseAttest(out.attested.message));
    unsigned char md[32];
    unsigned int len = 0;
    EVP_Digest(out.pcr_values.data(), out.pcr_values.size(), md, &len, EVP_sha256(), nullptr);
    if (info.pcr_digest != std::vector<uint8_t>(md, md + 32)) {
      return Error(Category::kUnavailable, "quote: the PCRs changed while they were quoted; ask again");
    }
  }
  // tpm2-tools' "serialized" PCR file: TPML_PCR_SELECTION, a UINT32 count,
  // then that many TPML_DIGEST (up to 8 digests each), all as raw structs.
  TPML_PCR_SELECTION all = Selection(sorted);
  auto raw = [&](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    out.pcr_file.insert(out.pcr_file.end(), b, b + n);
  };
  raw(&all, sizeof all);
  UINT32 lists = static_cast<UINT32>((sorted.size() + 7) / 8);
  raw(&lists, sizeof lists);
  for (UINT32 l = 0; l < lists; ++l) {
    TPML_DIGEST d{};
    for (size_t i = l * 8; i < sorted.size() && i < (l + 1) * 8; ++i) {
      TPM2B_DIGEST& dg = d.digests[d.count++];
      dg.size = 32;
      std::memcpy(dg.buffer, out.pcr_values.data() + i * 32, 32);
    }
    raw(&d, sizeof d);
  }
  return out;
}

Result<Attested> Tpm::Certify(const SealedObject& object, const SecretBuffer& auth, std::span<const uint8_t> qualifying) {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  TPM2B_DATA q{};
  if (qualifying.size() > sizeof q.buffer) return Error(Category::kUsage, "the nonce is longer than 64 bytes");
  q.size = static_cast<UINT16>(qualifying.size());
  std::memcpy(q.buffer, qualifying.data(), qualifying.size());
  Impl::Loaded obj{&t};
  CUSTODY_RETURN_IF_ERROR(t.Load(object, obj));
  TPM2B_AUTH a{};
  CUSTODY_RETURN_IF_ERROR(CopyAuth(auth, a));
  TSS2_RC rc = Esys_TR_SetAuth(t.ctx, obj.handle, &a);
  OPENSSL_cleanse(&a, sizeof a);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_TR_SetAuth");
  Impl::Loaded ak{&t};
  std::vector<uint8_t> point;
  std::string name;
  CUSTODY_RETURN_IF_ERROR(t.LoadAk(ak, &point, &name));
  TPMT_SIG_SCHEME scheme{};
  scheme.scheme = TPM2_ALG_NULL;
  TPM2B_ATTEST* attest = nullptr;
  TPMT_SIGNATURE* sig = nullptr;
  // The object's admin role is proven with its auth value in the salted
  // HMAC session (never as a cleartext password on the bus).
  CUSTODY_RETURN_IF_ERROR(t.Attrs(0));
  rc = Esys_Certify(t.ctx, obj.handle, ak.handle, t.session, ESYS_TR_PASSWORD, ESYS_TR_NONE, &q, &scheme, &attest, &sig);
  if (rc != TSS2_RC_SUCCESS) {
    t.DropSession();
    return t.Fail(rc, "Esys_Certify");
  }
  return Impl::Collect(attest, sig);
}

Result<std::vector<uint8_t>> Tpm::EkCertificate() {
  // TCG EK Credential Profile: the RSA 2048 EK certificate's NV index.
  constexpr TPM2_HANDLE kRsaEkCertIndex = 0x01c00002;
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  ESYS_TR nv = ESYS_TR_NONE;
  TSS2_RC rc = Esys_TR_FromTPMPublic(t.ctx, kRsaEkCertIndex, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &nv);
  if (rc != TSS2_RC_SUCCESS) {
    if (BaseRc(rc) == TPM2_RC_HANDLE) {
      return Error(Category::kNotFound,
                   "this TPM holds no RSA EK certificate (NV index 0x01c00002): its manufacturer did not write one; "
                   "a swtpm gets one from `swtpm_setup --create-ek-cert`",
                   Backend::kTpm, rc);
    }
    return t.Fail(rc, "Esys_TR_FromTPMPublic (EK certificate index)");
  }
  // Released (not flushed: an NV index is not a loaded object) on every path.
  struct Close {
    ESYS_CONTEXT* ctx;
    ESYS_TR* tr;
    ~Close() { Esys_TR_Close(ctx, tr); }
  } close{t.ctx, &nv};
  TPM2B_NV_PUBLIC* pub = nullptr;
  TPM2B_NAME* name = nullptr;
  rc = Esys_NV_ReadPublic(t.ctx, nv, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, &name);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_NV_ReadPublic (EK certificate index)");
  const size_t size = pub->nvPublic.dataSize;
  Esys_Free(pub);
  Esys_Free(name);
  std::vector<uint8_t> out;
  // 512 bytes per read: at or under every TPM's TPM_PT_NV_BUFFER_MAX.
  while (out.size() < size) {
    UINT16 n = static_cast<UINT16>(std::min<size_t>(512, size - out.size()));
    TPM2B_MAX_NV_BUFFER* data = nullptr;
    rc = Esys_NV_Read(t.ctx, nv, nv, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, n,
                      static_cast<UINT16>(out.size()), &data);
    if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_NV_Read (EK certificate)");
    out.insert(out.end(), data->buffer, data->buffer + data->size);
    bool short_read = data->size == 0;
    Esys_Free(data);
    if (short_read) return Error(Category::kIntegrity, "the TPM's EK certificate index returned no data");
  }
  // Some manufacturers pad the index; a DER certificate says its own length.
  if (out.size() >= 4 && out[0] == 0x30 && out[1] == 0x82) {
    size_t der = 4 + ((size_t{out[2]} << 8) | out[3]);
    if (der <= out.size()) out.resize(der);
  }
  return out;
}

Result<std::vector<uint8_t>> Tpm::ActivateCredential(std::span<const uint8_t> credential_blob,
                                                     std::span<const uint8_t> encrypted_secret) {
  TPM2B_ID_OBJECT blob{};
  TPM2B_ENCRYPTED_SECRET secret{};
  size_t off = 0;
  if (Tss2_MU_TPM2B_ID_OBJECT_Unmarshal(credential_blob.data(), credential_blob.size(), &off, &blob) !=
          TSS2_RC_SUCCESS ||
      off != credential_blob.size()) {
    return Error(Category::kIntegrity, "the challenge's credential is not a TPM2B_ID_OBJECT");
  }
  off = 0;
  if (Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal(encrypted_secret.data(), encrypted_secret.size(), &off, &secret) !=
          TSS2_RC_SUCCESS ||
      off != encrypted_secret.size()) {
    return Error(Category::kIntegrity, "the challenge's encrypted secret is not a TPM2B_ENCRYPTED_SECRET");
  }
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  // The EK from the TCG default template L-1 (RSA 2048, AES-128-CFB,
  // admin only through PolicySecret(TPM_RH_ENDORSEMENT)): the key whose
  // public part the certificate carries, re-created from the endorsement
  // seed, so the same key every time on one TPM.
  static constexpr uint8_t kEkPolicy[32] = {0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xB3, 0xF8, 0x1A, 0x90, 0xCC,
                                            0x8D, 0x46, 0xA5, 0xD7, 0x24, 0xFD, 0x52, 0xD7, 0x6E, 0x06, 0x52,
                                            0x0B, 0x64, 0xF2, 0xA1, 0xDA, 0x1B, 0x33, 0x14, 0x69, 0xAA};
  TPM2B_PUBLIC tmpl{};
  tmpl.publicArea.type = TPM2_ALG_RSA;
  tmpl.publicArea.nameAlg = TPM2_ALG_SHA256;
  tmpl.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                     TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_ADMINWITHPOLICY |
                                     TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT;
  tmpl.publicArea.authPolicy.size = sizeof kEkPolicy;
  std::memcpy(tmpl.publicArea.authPolicy.buffer, kEkPolicy, sizeof kEkPolicy);
  tmpl.publicArea.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_AES;
  tmpl.publicArea.parameters.rsaDetail.symmetric.keyBits.aes = 128;
  tmpl.publicArea.parameters.rsaDetail.symmetric.mode.aes = TPM2_ALG_CFB;
  tmpl.publicArea.parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL;
  tmpl.publicArea.parameters.rsaDetail.keyBits = 2048;
  tmpl.publicArea.parameters.rsaDetail.exponent = 0;
  tmpl.publicArea.unique.rsa.size = 256;
  TPM2B_SENSITIVE_CREATE sens{};
  TPM2B_DATA outside{};
  TPML_PCR_SELECTION none{};
  Impl::Loaded ek{&t};
  {
    TPM2B_PUBLIC* pub = nullptr;
    CreationOutputs unused;
    TSS2_RC rc = Esys_CreatePrimary(t.ctx, ESYS_TR_RH_ENDORSEMENT, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                                    &sens, &tmpl, &outside, &none, &ek.handle, &pub, &unused.data, &unused.hash,
                                    &unused.ticket);
    if (rc != TSS2_RC_SUCCESS) {
      ek.handle = ESYS_TR_NONE;
      return t.Fail(rc, "Esys_CreatePrimary (endorsement key)");
    }
    Esys_Free(pub);
  }
  Impl::Loaded ak{&t};
  std::vector<uint8_t> point;
  std::string name;
  CUSTODY_RETURN_IF_ERROR(t.LoadAk(ak, &point, &name));
  // The EK's user role is its policy: PolicySecret on the endorsement
  // hierarchy (whose auth is empty here, as provisioned).
  Impl::Loaded policy{&t};
  TPMT_SYM_DEF sym{};
  sym.algorithm = TPM2_ALG_NULL;
  TSS2_RC rc = Esys_StartAuthSession(t.ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                     nullptr, TPM2_SE_POLICY, &sym, TPM2_ALG_SHA256, &policy.handle);
  if (rc != TSS2_RC_SUCCESS) {
    policy.handle = ESYS_TR_NONE;
    return t.Fail(rc, "Esys_StartAuthSession (EK policy)");
  }
  TPM2B_TIMEOUT* timeout = nullptr;
  TPMT_TK_AUTH* ticket = nullptr;
  rc = Esys_PolicySecret(t.ctx, ESYS_TR_RH_ENDORSEMENT, policy.handle, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                         nullptr, nullptr, nullptr, 0, &timeout, &ticket);
  Esys_Free(timeout);
  Esys_Free(ticket);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_PolicySecret (endorsement hierarchy)");
  TPM2B_DIGEST* info = nullptr;
  rc = Esys_ActivateCredential(t.ctx, ak.handle, ek.handle, ESYS_TR_PASSWORD, policy.handle, ESYS_TR_NONE, &blob,
                               &secret, &info);
  if (rc != TSS2_RC_SUCCESS) {
    if ((rc & TSS2_RC_LAYER_MASK) == TSS2_TPM_RC_LAYER) {
      // The TPM refuses a credential whose seed it cannot decrypt (another
      // EK) or whose integrity HMAC fails (another AK Name).
      return Error(Category::kIntegrity,
                   TpmError(rc, "Esys_ActivateCredential").message() +
                       ": the challenge was not made for this TPM's endorsement key and attestation key",
                   Backend::kTpm, rc);
    }
    return t.Fail(rc, "Esys_ActivateCredential");
  }
  std::vector<uint8_t> out(info->buffer, info->buffer + info->size);
  Free(info);
  return out;
}

// How many handles of one kind (from `first`) the TPM has loaded now.
Result<size_t> Tpm::LoadedHandles(uint32_t first, const char* what) {
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  TPMS_CAPABILITY_DATA* cap = nullptr;
  TPMI_YES_NO more = 0;
  TSS2_RC rc = Esys_GetCapability(t.ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES, first,
                                  TPM2_MAX_CAP_HANDLES, &more, &cap);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, what);
  size_t n = cap->data.handles.count;
  Esys_Free(cap);
  return n;
}

Result<size_t> Tpm::TransientObjects() {
  return LoadedHandles(TPM2_TRANSIENT_FIRST, "Esys_GetCapability(handles)");
}

Result<size_t> Tpm::LoadedSessions() {
  return LoadedHandles(TPM2_LOADED_SESSION_FIRST, "Esys_GetCapability(sessions)");
}

Status Tpm::ExtendPcr(uint32_t pcr, std::span<const uint8_t> data) {
  if (pcr >= 24) return Error(Category::kUsage, "PCR " + std::to_string(pcr) + " does not exist");
  std::lock_guard lock(mu_);
  CUSTODY_ASSIGN_OR_RETURN(Impl * connected, Ready());
  Impl& t = *connected;
  TPML_DIGEST_VALUES values{};
  values.count = 1;
  values.digests[0].hashAlg = TPM2_ALG_SHA256;
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), values.digests[0].digest.sha256, &len, EVP_sha256(), nullptr);
  TSS2_RC rc = Esys_PCR_Extend(t.ctx, static_cast<ESYS_TR>(ESYS_TR_PCR0 + pcr), ESYS_TR_PASSWORD, ESYS_TR_NONE,
                               ESYS_TR_NONE, &values);
  if (rc != TSS2_RC_SUCCESS) return t.Fail(rc, "Esys_PCR_Extend");
  return Status::Ok();
}

}  // namespace custody::tpm
