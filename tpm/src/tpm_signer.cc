#include "custody/tpm/tpm_signer.h"

#include <fcntl.h>
#include <openssl/hmac.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

#include "custody/common/hex.h"

namespace custody::core {
namespace {

// audit-key.tpm: the 65-byte public point, then the TPM object's encoding.
std::vector<uint8_t> EncodeKeyFile(const tpm::SigningKey& k) {
  std::vector<uint8_t> out = k.point;
  auto blobs = k.blobs.Encode();
  out.insert(out.end(), blobs.begin(), blobs.end());
  return out;
}

}  // namespace

Result<std::unique_ptr<TpmAuditSigner>> TpmAuditSigner::Open(tpm::Tpm& tpm, const std::string& state_dir,
                                                             const SecretBuffer& pin, bool create,
                                                             const std::string& label, const std::string& file) {
  SecretBuffer auth(32);
  auto key = pin.Reveal(SecretAccess{});
  unsigned int len = 32;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(label.data()),
       label.size(), auth.RevealMutable(SecretAccess{}).data(), &len);
  std::string path = state_dir + "/" + file;
  std::ifstream in(path, std::ios::binary);
  if (in) {
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (bytes.size() < 65 || bytes[0] != 0x04) {
      return Error(Category::kIntegrity, path + " is not a custody TPM signing key");
    }
    tpm::SigningKey k;
    CUSTODY_ASSIGN_OR_RETURN(k.blobs, tpm::SealedObject::Decode(std::span<const uint8_t>(bytes).subspan(65)));
    // The public key is taken from the key's own public area (the part the
    // TPM checks when it loads the key), not from the copy beside it.
    CUSTODY_ASSIGN_OR_RETURN(k.point, tpm::EccPoint(k.blobs));
    return std::unique_ptr<TpmAuditSigner>(new TpmAuditSigner(tpm, std::move(k), std::move(auth)));
  }
  if (!create) {
    return Error(Category::kNotFound, "there is no TPM signing key " + path);
  }
  CUSTODY_ASSIGN_OR_RETURN(auto k, tpm.CreateSigningKey(auth));
  // Written whole or not at all: a temporary file, fsync, rename.
  auto bytes = EncodeKeyFile(k);
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Error::Os(errno, "cannot write " + tmp);
  bool ok = ::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()) && ::fsync(fd) == 0;
  ok = (::close(fd) == 0) && ok;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    return Error::Os(e, "cannot write " + path);
  }
  return std::unique_ptr<TpmAuditSigner>(new TpmAuditSigner(tpm, std::move(k), std::move(auth)));
}

std::string TpmAuditSigner::key_id() const {
  // The SHA-256 of the public point, shortened: stable and public.
  unsigned char md[32];
  unsigned int len = 0;
  EVP_Digest(key_.point.data(), key_.point.size(), md, &len, EVP_sha256(), nullptr);
  return ToHex(std::span<const uint8_t>(md, 16));
}

Result<std::vector<uint8_t>> TpmAuditSigner::Sign(std::string_view message) {
  std::array<uint8_t, 32> digest{};
  unsigned int len = 0;
  EVP_Digest(message.data(), message.size(), digest.data(), &len, EVP_sha256(), nullptr);
  CUSTODY_ASSIGN_OR_RETURN(auto rs, tpm_.Sign(key_, auth_, digest));
  return P256SignatureDer(rs);
}

Result<std::string> TpmAuditSigner::PublicKeyPem() const { return P256PublicKeyPem(key_.point); }

}  // namespace custody::core
