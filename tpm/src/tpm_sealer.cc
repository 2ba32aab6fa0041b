#include "custody/tpm/tpm_sealer.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <algorithm>
#include <memory>

#include "custody/common/hex.h"

namespace custody::core {
namespace {

constexpr size_t kKekBytes = 32;

using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)>;

Error CryptoFail(const char* what) { return Error(Category::kInternal, std::string("OpenSSL ") + what + " failed"); }

}  // namespace

TpmSealer::TpmSealer(tpm::Tpm& tpm, KekUsageLedger& ledger, KekMaterialSource& material, const SecretBuffer& pin,
                     Options options)
    : tpm_(tpm),
      material_(material),
      pin_(SecretBuffer::Copy(pin.Reveal(SecretAccess{}))),
      options_(std::move(options)),
      budget_(ledger, options_.max_encryptions) {}

SecretBuffer TpmSealer::AuthFor(std::string_view project, uint32_t version) const {
  std::string label = KekLabel::For(project, version);
  SecretBuffer auth(32);
  auto key = pin_.Reveal(SecretAccess{});
  unsigned int len = 32;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(label.data()),
       label.size(), auth.RevealMutable(SecretAccess{}).data(), &len);
  return auth;
}

Result<KekRef> TpmSealer::CreateKek(std::string_view project, uint32_t version, std::vector<uint8_t>* material) {
  if (material == nullptr) return Error(Category::kInternal, "the TPM backend must keep its KEK material in the store");
  KekRef ref;
  ref.version = version;
  CUSTODY_RETURN_IF_ERROR(tpm_.Random(ref.id));
  SecretBuffer key(kKekBytes);
  CUSTODY_RETURN_IF_ERROR(tpm_.Random(key.RevealMutable(SecretAccess{})));
  auto sealed = tpm_.Seal(key, AuthFor(project, version), {.pcrs = options_.pcrs});
  if (!sealed) return std::move(sealed).error().Wrap("sealing KEK " + KekLabel::For(project, version) + " in the TPM");
  *material = sealed->Encode();
  return ref;
}

Status TpmSealer::DestroyKek(const KekRef& kek) {
  std::lock_guard lock(cache_mu_);
  cache_.erase(kek.id);  // wiped with its SecretBuffer
  return Status::Ok();
}

std::string TpmSealer::ResealMode() {
  return "host re-seal: a TPM is no bulk cipher, so each value is decrypted with the old KEK (unsealed by the TPM) "
         "into locked memory, re-sealed under the new KEK and wiped; the old KEK's sealed object is dropped from "
         "the store";
}

Status TpmSealer::Random(std::span<uint8_t> out) { return tpm_.Random(out); }

bool TpmSealer::Recover(const Error& failure) {
  if (!tpm::Tpm::LooksLost(failure)) return false;
  // Reconnect even if another request just did: a second reconnect costs a
  // few TPM commands, a stale connection costs every request.
  return tpm_.Reconnect().ok();
}

Result<tpm::Attested> TpmSealer::CertifyKek(const KekRef& kek, std::string_view project,
                                            std::span<const uint8_t> qualifying) {
  CUSTODY_ASSIGN_OR_RETURN(auto material, material_.KekMaterial(kek));
  CUSTODY_ASSIGN_OR_RETURN(auto object, tpm::SealedObject::Decode(material));
  return tpm_.Certify(object, AuthFor(project, kek.version), qualifying);
}

Result<SecretBuffer> TpmSealer::Kek(const KekRef& kek, std::string_view project) {
  auto now = std::chrono::steady_clock::now();
  if (options_.kek_cache_seconds > 0) {
    std::lock_guard lock(cache_mu_);
    if (auto it = cache_.find(kek.id); it != cache_.end()) {
      if (it->second.until > now) return SecretBuffer::Copy(it->second.key.Reveal(SecretAccess{}));
      cache_.erase(it);
    }
  }
  if (pin_refused_.load()) {
    // One refusal is enough: every further try with the same PIN would add
    // to the TPM-wide dictionary-attack counter, for every user of the TPM.
    return Error(Category::kDenied, "the TPM refused this PIN earlier in this process; fix the PIN and restart",
                 Backend::kTpm, 0);
  }
  CUSTODY_ASSIGN_OR_RETURN(auto material, material_.KekMaterial(kek));
  if (material.empty()) {
    // Destroyed by a KEK rotation (or made by the PKCS#11 backend): gone, as
    // a destroyed token object would be, so callers may read the row again.
    return Error(Category::kNotFound, "KEK " + KekLabel::For(project, kek.version) +
                                          " has no TPM object in the store (destroyed by a KEK rotation, or made by "
                                          "another backend)");
  }
  CUSTODY_ASSIGN_OR_RETURN(auto object, tpm::SealedObject::Decode(material));
  auto key = tpm_.Unseal(object, AuthFor(project, kek.version));
  if (!key && key.error().backend() == Backend::kTpm && key.error().category() == Category::kDenied &&
      key.error().message().find("wrong auth value") != std::string::npos) {
    pin_refused_.store(true);
  }
  if (!key) return std::move(key).error().Wrap("unsealing KEK " + KekLabel::For(project, kek.version));
  if (key->size() != kKekBytes) return Error(Category::kIntegrity, "the TPM returned a KEK of the wrong size");
  if (options_.kek_cache_seconds > 0) {
    std::lock_guard lock(cache_mu_);
    cache_[kek.id] = Cached{SecretBuffer::Copy(key->Reveal(SecretAccess{})),
                            now + std::chrono::seconds(options_.kek_cache_seconds)};
  }
  return key;
}

Result<std::vector<uint8_t>> TpmSealer::Seal(const KekRef& kek, const SealContext& ctx, const SecretBuffer& value) {
  if (value.empty()) return Error(Category::kIntegrity, "refusing to seal an empty value");
  if (value.size() > kMaxSecretSize) {
    return Error(Category::kUsage, "value is " + std::to_string(value.size()) + " bytes; the limit is " +
                                       std::to_string(kMaxSecretSize));
  }
  CUSTODY_RETURN_IF_ERROR(budget_.TakeUse(kek));
  CUSTODY_ASSIGN_OR_RETURN(SecretBuffer key, Kek(kek, ctx.project));
  BlobHeader header;
  header.kek = kek;
  // Nonces from OpenSSL's DRBG: one TPM round trip per seal for 12 bytes
  // would cost more than the seal; uniqueness is what GCM needs.
  if (RAND_bytes(header.nonce.data(), static_cast<int>(header.nonce.size())) != 1) return CryptoFail("RAND_bytes");
  auto header_bytes = EncodeHeader(header);
  std::vector<uint8_t> aad = ContextAad(header_bytes, ctx);
  std::vector<uint8_t> blob(kHeaderSize + value.size() + kTagSize);
  std::copy(header_bytes.begin(), header_bytes.end(), blob.begin());
  CipherCtx c(EVP_CIPHER_CTX_new(), &EVP_CIPHER_CTX_free);
  int len = 0;
  auto plain = value.Reveal(SecretAccess{});
  uint8_t* out = blob.data() + kHeaderSize;
  if (!c || EVP_EncryptInit_ex(c.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kNonceSize), nullptr) != 1 ||
      EVP_EncryptInit_ex(c.get(), nullptr, nullptr, key.Reveal(SecretAccess{}).data(), header.nonce.data()) != 1 ||
      EVP_EncryptUpdate(c.get(), nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(c.get(), out, &len, plain.data(), static_cast<int>(plain.size())) != 1 ||
      EVP_EncryptFinal_ex(c.get(), out + len, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagSize), out + value.size()) != 1) {
    return CryptoFail("AES-256-GCM encryption");
  }
  return blob;
}

Result<SecretBuffer> TpmSealer::Unseal(const KekRef& expected, const SealContext& ctx,
                                       std::span<const uint8_t> blob) {
  CUSTODY_ASSIGN_OR_RETURN(BlobView view, ParseBlobFor(expected, blob));
  CUSTODY_ASSIGN_OR_RETURN(SecretBuffer key, Kek(expected, ctx.project));
  std::vector<uint8_t> aad = ContextAad(view.header_bytes, ctx);
  size_t n = view.ciphertext_and_tag.size() - kTagSize;
  SecretBuffer out(std::max<size_t>(n, 1));
  auto dst = out.RevealMutable(SecretAccess{});
  CipherCtx c(EVP_CIPHER_CTX_new(), &EVP_CIPHER_CTX_free);
  int len = 0;
  std::array<uint8_t, kTagSize> tag{};
  std::copy_n(view.ciphertext_and_tag.begin() + static_cast<ptrdiff_t>(n), kTagSize, tag.begin());
  if (!c || EVP_DecryptInit_ex(c.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kNonceSize), nullptr) != 1 ||
      EVP_DecryptInit_ex(c.get(), nullptr, nullptr, key.Reveal(SecretAccess{}).data(), view.header.nonce.data()) != 1 ||
      EVP_DecryptUpdate(c.get(), nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(c.get(), dst.data(), &len, view.ciphertext_and_tag.data(), static_cast<int>(n)) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagSize), tag.data()) != 1) {
    return CryptoFail("AES-256-GCM decryption");
  }
  if (EVP_DecryptFinal_ex(c.get(), dst.data() + len, &len) != 1) {
    return Error(Category::kIntegrity,
                 "sealed blob failed authentication: it was altered, truncated, or copied from another project, "
                 "environment, name or version");
  }
  out.Truncate(n);
  return out;
}

}  // namespace custody::core
