#include "custody/hsm/pkcs11_sealer.h"

#include <openssl/crypto.h>

#include <algorithm>
#include <string>

#include "custody/common/hex.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/rv.h"

namespace custody::core {
namespace {

constexpr size_t kNoncesPerDraw = 32;

bool IsStaleHandle(CK_RV rv) { return rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID; }

// A session-fatal error means the lease must not go back to the pool.
Error Fail(hsm::SessionPool::Lease& lease, CK_RV rv, std::string_view call) {
  if (hsm::IsSessionFatal(rv)) lease.Discard();
  return hsm::RvError(rv, call);
}

// A cheap call that only a healthy token and session can answer.
bool TokenAnswers(hsm::Session& s) {
  CK_SESSION_INFO info{};
  return s.fn()->C_GetSessionInfo(s.handle(), &info) == CKR_OK;
}

}  // namespace

Result<KekRef> Pkcs11Sealer::CreateKek(std::string_view project, uint32_t version, std::vector<uint8_t>* material) {
  if (material != nullptr) material->clear();  // the KEK is in the token
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());
  KekRef ref;
  ref.version = version;
  CUSTODY_RETURN_IF_ERROR(hsm::GenerateRandom(*lease, ref.id));

  std::string label = KekLabel::For(project, version);
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  CK_ULONG len = 32;
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE kt = CKK_AES;
  // Sensitive and non-extractable: the value can never be read or wrapped out.
  // Private: only a logged-in user sees it. Encrypt/decrypt only for now; the
  // wrap/unwrap rights for in-token re-sealing arrive with KEK rotation.
  CK_ATTRIBUTE tmpl[] = {
      {CKA_CLASS, &cls, sizeof cls},
      {CKA_KEY_TYPE, &kt, sizeof kt},
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_SENSITIVE, &yes, sizeof yes},
      {CKA_EXTRACTABLE, &no, sizeof no},
      {CKA_MODIFIABLE, &no, sizeof no},
      {CKA_ENCRYPT, &yes, sizeof yes},
      {CKA_DECRYPT, &yes, sizeof yes},
      {CKA_WRAP, &no, sizeof no},
      {CKA_UNWRAP, &no, sizeof no},
      {CKA_SIGN, &no, sizeof no},
      {CKA_VERIFY, &no, sizeof no},
      {CKA_DERIVE, &no, sizeof no},
      {CKA_VALUE_LEN, &len, sizeof len},
      {CKA_LABEL, label.data(), static_cast<CK_ULONG>(label.size())},
      {CKA_ID, ref.id.data(), static_cast<CK_ULONG>(ref.id.size())},
  };
  CK_MECHANISM mech{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
  CK_RV rv = lease->fn()->C_GenerateKey(lease->handle(), &mech, tmpl, std::size(tmpl), &h);
  if (rv != CKR_OK) return Fail(lease, rv, "C_GenerateKey").Wrap("creating KEK " + label);
  std::unique_lock lock(handles_mu_);
  handles_[ref.id] = h;
  return ref;
}

Status Pkcs11Sealer::DestroyKek(const KekRef& kek) {
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());
  CUSTODY_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE h, KekHandle(lease, kek));
  ForgetHandle(kek);
  return hsm::DestroyObject(*lease, h);
}

Result<size_t> Pkcs11Sealer::DestroyUnrecorded(const std::string& label, const std::vector<KekId>& keep) {
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_BBOOL yes = CK_TRUE;
  std::string l = label;
  CK_ATTRIBUTE tmpl[] = {
      {CKA_CLASS, &cls, sizeof cls},
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_LABEL, l.data(), static_cast<CK_ULONG>(l.size())},
  };
  CUSTODY_ASSIGN_OR_RETURN(auto found, hsm::FindObjects(*lease, tmpl, 16));
  size_t destroyed = 0;
  for (CK_OBJECT_HANDLE h : found) {
    KekId id{};
    CK_ATTRIBUTE a{CKA_ID, id.data(), static_cast<CK_ULONG>(id.size())};
    CK_RV rv = lease->fn()->C_GetAttributeValue(lease->handle(), h, &a, 1);
    // An id that cannot be read is what a SoftHSM2 object file cut short
    // between its label and its id looks like (a run killed inside
    // C_GenerateKey; SoftHSM answers TYPE_INVALID or VALUE_INVALID). The
    // store refers to KEKs by id and has no KEK with this label yet (the
    // caller passes the next version's), so such an object is unrecorded.
    const bool no_id = rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_ATTRIBUTE_VALUE_INVALID;
    if (rv != CKR_OK && !no_id) return Fail(lease, rv, "C_GetAttributeValue(CKA_ID)");
    if (rv == CKR_OK && a.ulValueLen == id.size() && std::find(keep.begin(), keep.end(), id) != keep.end()) continue;
    CUSTODY_RETURN_IF_ERROR(hsm::DestroyObject(*lease, h));
    ++destroyed;
  }
  return destroyed;
}

bool Pkcs11Sealer::Recover(const Error& failure) {
  if (failure.backend() != Backend::kPkcs11 || !hsm::IsSessionFatal(static_cast<CK_RV>(failure.code()))) return false;
  // The failed session was discarded by the pool; re-open it and log in
  // again (the token may have been reset, losing every session and the
  // login), re-initialising the module if that is what it takes. Retried
  // once either way: if recovery failed, the retry says so.
  (void)pool_.Recover();
  return true;
}

Sealer::Recoveries Pkcs11Sealer::recoveries() const { return {pool_.recoveries(), pool_.reinitializations()}; }

std::string Pkcs11Sealer::ResealMode() {
  // Re-sealing inside the token needs AES-GCM as an unwrap and a wrap
  // mechanism (the blob's GCM ciphertext unwrapped into a non-extractable
  // session object, wrapped again under the new KEK). SoftHSM 2.6.1 offers
  // GCM for encrypt/decrypt only, and the in-token path is not built yet; so
  // every value passes through locked host memory, and we say so.
  return GcmWrapOffered()
             ? "host re-seal: the token offers AES-GCM wrap/unwrap, but in-token re-sealing is not built "
               "yet; each value is decrypted into locked memory, re-sealed under the new KEK and wiped"
             : "host re-seal: this token does not offer AES-GCM wrap/unwrap, so each value is decrypted "
               "into locked memory (never swapped or dumped), re-sealed under the new KEK and wiped";
}

bool Pkcs11Sealer::GcmWrapOffered() {
  CK_MECHANISM_INFO info{};
  CK_RV rv = pool_.module().fn()->C_GetMechanismInfo(pool_.slot(), CKM_AES_GCM, &info);
  return rv == CKR_OK && (info.flags & CKF_WRAP) != 0 && (info.flags & CKF_UNWRAP) != 0;
}

Status Pkcs11Sealer::Random(std::span<uint8_t> out) {
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());
  return hsm::GenerateRandom(*lease, out);
}

Result<CK_OBJECT_HANDLE> Pkcs11Sealer::KekHandle(hsm::SessionPool::Lease& lease, const KekRef& kek) {
  const uint64_t generation = pool_.module().generation();
  {
    std::shared_lock lock(handles_mu_);
    if (generation == handles_generation_) {
      if (auto it = handles_.find(kek.id); it != handles_.end()) return it->second;
    }
  }
  {
    // After a module re-initialisation every cached handle is dead, and its
    // number may now name another object: forget them all.
    std::unique_lock lock(handles_mu_);
    if (generation != handles_generation_) {
      handles_.clear();
      handles_generation_ = generation;
    }
  }
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_BBOOL yes = CK_TRUE;
  KekId id = kek.id;
  CK_ATTRIBUTE tmpl[] = {
      {CKA_CLASS, &cls, sizeof cls},
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_ID, id.data(), static_cast<CK_ULONG>(id.size())},
  };
  // A private object is invisible to a session that is not logged in:
  // after C_CloseAllSessions (by any application of this process, or a
  // token reset) the login is gone, and a session opened before the pool
  // logged in again finds nothing. That is a lost login, to recover from,
  // not a deleted key (a 404 to a client that did nothing wrong). Login is
  // the token's state, not the session's: another thread's recovery may
  // log in between an empty search and the look at the state, so a state
  // that says "logged in" earns one more search before the key is called
  // missing.
  Result<std::vector<CK_OBJECT_HANDLE>> found = std::vector<CK_OBJECT_HANDLE>{};
  for (int search = 0;; ++search) {
    found = hsm::FindObjects(*lease, tmpl, 2);
    if (!found) {
      if (found.error().backend() == Backend::kPkcs11 && hsm::IsSessionFatal(static_cast<CK_RV>(found.error().code()))) {
        lease.Discard();
      }
      return found.error();
    }
    if (!found->empty()) break;
    CK_SESSION_INFO info{};
    const CK_RV rv = lease->fn()->C_GetSessionInfo(lease->handle(), &info);
    if (rv != CKR_OK) return Fail(lease, rv, "C_GetSessionInfo");
    if (info.state != CKS_RO_USER_FUNCTIONS && info.state != CKS_RW_USER_FUNCTIONS) {
      return Fail(lease, CKR_USER_NOT_LOGGED_IN, "C_FindObjects (the session's login was lost)");
    }
    if (search > 0) {
      return Error(Category::kNotFound, "KEK " + ToHex(kek.id) + " (v" + std::to_string(kek.version) +
                                            ") is not in the token; was the token replaced or the key deleted?");
    }
  }
  if (found->size() > 1) {
    return Error(Category::kIntegrity, "two token objects share KEK id " + ToHex(kek.id));
  }
  std::unique_lock lock(handles_mu_);
  handles_[kek.id] = (*found)[0];
  return (*found)[0];
}

void Pkcs11Sealer::ForgetHandle(const KekRef& kek) {
  std::unique_lock lock(handles_mu_);
  handles_.erase(kek.id);
}

Status Pkcs11Sealer::NextNonce(hsm::Session& s, std::span<uint8_t, kNonceSize> out) {
  std::lock_guard lock(nonce_mu_);
  if (nonce_off_ + kNonceSize > nonce_pool_.size()) {
    nonce_pool_.assign(kNonceSize * kNoncesPerDraw, 0);
    CUSTODY_RETURN_IF_ERROR(hsm::GenerateRandom(s, nonce_pool_));
    nonce_off_ = 0;
  }
  std::copy_n(nonce_pool_.begin() + static_cast<ptrdiff_t>(nonce_off_), kNonceSize, out.begin());
  // Each nonce is used once: wipe it from the pool as it is taken.
  OPENSSL_cleanse(nonce_pool_.data() + nonce_off_, kNonceSize);
  nonce_off_ += kNonceSize;
  return Status::Ok();
}

Result<std::vector<uint8_t>> Pkcs11Sealer::Seal(const KekRef& kek, const SealContext& ctx,
                                          const SecretBuffer& value) {
  if (value.empty()) return Error(Category::kIntegrity, "refusing to seal an empty value");
  if (value.size() > kMaxSecretSize) {
    return Error(Category::kUsage, "value is " + std::to_string(value.size()) + " bytes; the limit is " +
                                       std::to_string(kMaxSecretSize));
  }
  CUSTODY_RETURN_IF_ERROR(budget_.TakeUse(kek));
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());

  BlobHeader header;
  header.kek = kek;
  CUSTODY_RETURN_IF_ERROR(NextNonce(*lease, header.nonce));
  auto header_bytes = EncodeHeader(header);
  std::vector<uint8_t> aad = ContextAad(header_bytes, ctx);

  std::vector<uint8_t> blob(kHeaderSize + value.size() + kTagSize);
  std::copy(header_bytes.begin(), header_bytes.end(), blob.begin());

  for (int attempt = 0;; ++attempt) {
    CUSTODY_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE key, KekHandle(lease, kek));
    CK_GCM_PARAMS gcm{header.nonce.data(), kNonceSize, kNonceSize * 8, aad.data(),
                      static_cast<CK_ULONG>(aad.size()), kTagSize * 8};
    CK_MECHANISM mech{CKM_AES_GCM, &gcm, sizeof gcm};
    CK_RV rv = lease->fn()->C_EncryptInit(lease->handle(), &mech, key);
    if (IsStaleHandle(rv) && attempt == 0) {
      ForgetHandle(kek);  // the token was reset under us: search again once
      continue;
    }
    if (rv != CKR_OK) return Fail(lease, rv, "C_EncryptInit");
    CK_ULONG out_len = static_cast<CK_ULONG>(blob.size() - kHeaderSize);
    auto plain = value.Reveal(SecretAccess{});
    rv = lease->fn()->C_Encrypt(lease->handle(), const_cast<CK_BYTE*>(plain.data()),
                                static_cast<CK_ULONG>(plain.size()), blob.data() + kHeaderSize, &out_len);
    if (rv != CKR_OK) return Fail(lease, rv, "C_Encrypt");
    if (out_len != value.size() + kTagSize) {
      return Error(Category::kInternal, "token returned " + std::to_string(out_len) +
                                            " bytes of AES-GCM output, expected " +
                                            std::to_string(value.size() + kTagSize));
    }
    return blob;
  }
}

Result<SecretBuffer> Pkcs11Sealer::Unseal(const KekRef& expected, const SealContext& ctx,
                                    std::span<const uint8_t> blob) {
  CUSTODY_ASSIGN_OR_RETURN(BlobView view, ParseBlobFor(expected, blob));
  std::vector<uint8_t> aad = ContextAad(view.header_bytes, ctx);
  CUSTODY_ASSIGN_OR_RETURN(auto lease, pool_.Acquire());
  // SoftHSM2 asks for room for the ciphertext including the tag; the plaintext
  // is shorter by the tag and the buffer is truncated after.
  SecretBuffer out(view.ciphertext_and_tag.size());
  for (int attempt = 0;; ++attempt) {
    CUSTODY_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE key, KekHandle(lease, expected));
    CK_GCM_PARAMS gcm{const_cast<CK_BYTE*>(view.header.nonce.data()), kNonceSize, kNonceSize * 8,
                      aad.data(), static_cast<CK_ULONG>(aad.size()), kTagSize * 8};
    CK_MECHANISM mech{CKM_AES_GCM, &gcm, sizeof gcm};
    CK_RV rv = lease->fn()->C_DecryptInit(lease->handle(), &mech, key);
    if (IsStaleHandle(rv) && attempt == 0) {
      ForgetHandle(expected);
      continue;
    }
    if (rv != CKR_OK) return Fail(lease, rv, "C_DecryptInit");
    auto dst = out.RevealMutable(SecretAccess{});
    CK_ULONG out_len = static_cast<CK_ULONG>(dst.size());
    rv = lease->fn()->C_Decrypt(lease->handle(), const_cast<CK_BYTE*>(view.ciphertext_and_tag.data()),
                                static_cast<CK_ULONG>(view.ciphertext_and_tag.size()), dst.data(), &out_len);
    if (rv == CKR_GENERAL_ERROR && TokenAnswers(*lease)) {
      // SoftHSM2 up to 2.6.1 reports a failed GCM tag check as
      // CKR_GENERAL_ERROR instead of CKR_ENCRYPTED_DATA_INVALID (SoftHSMv2
      // issue 689, fixed after 2.6.1). The key and parameters were accepted by
      // C_DecryptInit and the token still answers, so the data is at fault.
      rv = CKR_ENCRYPTED_DATA_INVALID;
    }
    if (rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE) {
      return Error(Category::kIntegrity,
                   "sealed blob failed authentication in the token (" + hsm::RvName(rv) +
                       "): it was altered, truncated, or copied from another project, environment, "
                       "name or version",
                   Backend::kPkcs11, rv);
    }
    if (rv != CKR_OK) return Fail(lease, rv, "C_Decrypt");
    out.Truncate(out_len);
    return out;
  }
}

}  // namespace custody::core
