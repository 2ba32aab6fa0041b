// TPM 2.0 through tpm2-tss ESAPI: one connection (TCTI chosen by a config
// string through the TCTI loader), the storage root key, and sealed-data
// objects whose public and private parts live outside the TPM.
//
//   auto tpm = tpm::Tpm::Open({.tcti = "swtpm:host=127.0.0.1,port=2321"});
//   auto obj = (*tpm)->Seal(secret, auth, {.pcrs = {16}});   // -> public/private blobs
//   auto back = (*tpm)->Unseal(*obj, auth);                    // load, unseal, flush
//
// Every command that carries a secret (Create's sensitive data, Unseal's
// answer, Sign's digest) runs in a salted HMAC or policy session with
// AES-128-CFB parameter encryption, so values never cross the bus in clear.
// Objects are loaded for one use and flushed: a TPM has only a few
// transient slots, and nothing may leak (there may be no resource manager).
// One Tpm serialises its callers: an ESAPI context is not thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "custody/common/result.h"
#include "custody/common/secret.h"

namespace custody::tpm {

// The TCG-recommended persistent handle of the storage root key.
inline constexpr uint32_t kSrkHandle = 0x81000001;

struct Options {
  std::string tcti = {};  // "device:/dev/tpmrm0", "swtpm:host=...,port=...", "tabrmd", "mssim:..."
  // Make a created SRK persistent at kSrkHandle (opt-in: it takes an NV slot
  // and the owner hierarchy's consent). Otherwise a transient SRK is made
  // once per process from the standard template.
  bool persist_srk = false;
  // The SRK's Name recorded at `custody init` (hex). When set, Open refuses
  // a TPM whose SRK has another Name: the salt of every encrypted session
  // goes to the SRK's public key, so a substituted SRK would read them all.
  std::string expected_srk_name = {};
};

// A sealed-data object: TPM2B_PUBLIC and TPM2B_PRIVATE as marshalled by the
// TSS, plus the PCRs (SHA-256 bank) its policy binds, if any.
struct SealedObject {
  std::vector<uint8_t> public_area, private_area;
  std::vector<uint8_t> pcrs;  // PCR indexes; empty: no PCR policy

  std::vector<uint8_t> Encode() const;  // "CSTK" v1 framing for the store
  static Result<SealedObject> Decode(std::span<const uint8_t> bytes);
};

struct SealOptions {
  std::vector<uint8_t> pcrs;  // bind to the current values of these SHA-256 PCRs
};

struct Info {
  std::string manufacturer;  // TPM_PT_MANUFACTURER as text ("IBM ")
  std::string vendor;        // TPM_PT_VENDOR_STRING_1..4
  std::string firmware;      // TPM_PT_FIRMWARE_VERSION_1.2 as "a.b.c.d"
  uint32_t srk_handle = 0;   // kSrkHandle if persistent, else 0 (transient)
  std::string srk_name;      // hex, as tpm2_readpublic prints it
};

// An ECDSA P-256 signing key under the SRK (for audit checkpoints).
struct SigningKey {
  SealedObject blobs;
  std::vector<uint8_t> point;  // uncompressed 04||X||Y
};

// A TPM-signed attestation: the TPMS_ATTEST bytes the TPM signed and its
// TPMT_SIGNATURE, both as the TSS marshals them (the formats tpm2_quote
// writes and tpm2_checkquote reads).
struct Attested {
  std::vector<uint8_t> message, signature;
};
struct Quote {
  Attested attested;
  std::vector<uint8_t> pcrs;        // SHA-256 bank indexes quoted
  std::vector<uint8_t> pcr_values;  // their digests, concatenated in that order
  // The PCR selection and values as tpm2_quote -o writes them (and
  // tpm2_checkquote -f reads them): the TSS structures as laid out in memory.
  std::vector<uint8_t> pcr_file;
  std::vector<uint8_t> ak_point;    // the attestation key, 04||X||Y
  std::string ak_name;              // hex
  std::vector<uint8_t> ak_public;   // its TPM2B_PUBLIC, as the TSS marshals it
};
// What a verifier reads from TPMS_ATTEST bytes without the TPM.
struct AttestInfo {
  bool quote = false, certify = false;
  std::vector<uint8_t> extra_data;  // the qualifying data (the nonce)
  std::vector<uint8_t> pcr_digest;  // for a quote: SHA-256 of the quoted PCR values
  std::string certified_name;       // hex, for certify
};
Result<AttestInfo> ParseAttest(std::span<const uint8_t> message);
// r||s (32 bytes each) of a marshalled ECDSA/SHA-256 TPMT_SIGNATURE.
Result<std::vector<uint8_t>> EcdsaSignatureRs(std::span<const uint8_t> signature);

class Tpm {
 public:
  static Result<std::unique_ptr<Tpm>> Open(const Options& options);
  ~Tpm();
  Tpm(const Tpm&) = delete;
  Tpm& operator=(const Tpm&) = delete;

  // Seals `data` (at most 128 bytes) under the SRK with `auth` as the
  // object's auth value, and, with PCRs, a policy of PolicyPCR and
  // PolicyAuthValue. Returns the blobs; nothing stays loaded.
  Result<SealedObject> Seal(const SecretBuffer& data, const SecretBuffer& auth, const SealOptions& options);
  // Loads, unseals (in an encrypted session) and flushes. ESAPI's copy of
  // the data is wiped before it is freed. A PCR mismatch is kDenied and says
  // the object is sealed to another boot state; dictionary-attack lockout
  // is kUnavailable and says how long it lasts.
  Result<SecretBuffer> Unseal(const SealedObject& object, const SecretBuffer& auth);

  Result<SigningKey> CreateSigningKey(const SecretBuffer& auth);
  // ECDSA over a SHA-256 digest; r||s, 32 bytes each.
  Result<std::vector<uint8_t>> Sign(const SigningKey& key, const SecretBuffer& auth,
                                    std::span<const uint8_t, 32> digest);

  Status Random(std::span<uint8_t> out);
  Result<Info> GetInfo();
  // TPM2_Quote over SHA-256 PCRs with `qualifying` (the verifier's nonce) as
  // extra data, signed by the attestation key: an ECDSA P-256 restricted
  // signing primary in the endorsement hierarchy (the same key every time on
  // one TPM, since it derives from the endorsement seed).
  Result<Quote> QuotePcrs(std::span<const uint8_t> qualifying, const std::vector<uint8_t>& pcrs);
  // TPM2_Certify of a sealed object by that attestation key: the TPM vouches
  // that an object with this Name is loaded in it (under our SRK).
  Result<Attested> Certify(const SealedObject& object, const SecretBuffer& auth, std::span<const uint8_t> qualifying);
  // The endorsement key's certificate (DER) from its NV index: the RSA 2048
  // EK's, 0x01c00002, which the manufacturer (or `swtpm_setup
  // --create-ek-cert`) writes. kNotFound when the TPM holds none.
  Result<std::vector<uint8_t>> EkCertificate();
  // TPM2_ActivateCredential: the TPM gives back the secret a verifier
  // wrapped with MakeCredential (below) only if the endorsement key it was
  // wrapped to is this TPM's (the RSA EK, re-created from the TCG default
  // template L-1) and the object it names is this TPM's attestation key.
  // That is what chains the AK to the EK certificate. A credential made for
  // another TPM or another key is kIntegrity.
  Result<std::vector<uint8_t>> ActivateCredential(std::span<const uint8_t> credential_blob,
                                                  std::span<const uint8_t> encrypted_secret);
  // After the TPM's transport failed or the TPM restarted (swtpm or
  // tpm2-abrmd restarted, a TPM reset that flushed every loaded object):
  // drops this connection (flushing what it had loaded, when it still can)
  // and opens a new one: the TCTI, TPM2_Startup if needed, the SRK (the
  // persistent one, or re-created from the same template) checked against
  // the Name it had at Open, and a new session. No handle crosses it. When
  // the TPM cannot be reached yet, every later call tries again first.
  Status Reconnect();
  uint64_t reconnects() const;  // connections made again, by Reconnect or a later call
  // Whether `e` says the connection or the TPM's loaded objects were lost
  // (a TCTI error, TPM_RC_INITIALIZE, a handle that refers to nothing).
  static bool LooksLost(const Error& e);

  // Transient objects and sessions loaded now (leak checks in tests).
  Result<size_t> TransientObjects();
  Result<size_t> LoadedSessions();
  // Extends a SHA-256 PCR with `data`'s digest (tests; and to bind to state).
  Status ExtendPcr(uint32_t pcr, std::span<const uint8_t> data);

  struct Impl;

 private:
  explicit Tpm(std::unique_ptr<Impl> impl);
  Result<size_t> LoadedHandles(uint32_t first, const char* what);
  // The connection, made again first if the last reconnect failed. Call
  // with mu_ held.
  Result<Impl*> Ready();
  mutable std::mutex mu_;
  std::unique_ptr<Impl> impl_;  // null after a reconnect that failed
  Options options_;             // expected_srk_name pinned at Open
  std::atomic<uint64_t> reconnects_{0};  // read without mu_ (health must not wait on a hung call)
};

// What a verifier can learn from an object's public area, without the TPM:
// its Name (nameAlg || SHA-256 of TPMT_PUBLIC, as tpm2-tools prints it) and
// the attributes that say where its secret came from and how it is bound.
struct ObjectInfo {
  std::string name;  // hex
  bool fixed_tpm = false, fixed_parent = false, sensitive_data_origin = false, user_with_auth = false;
  bool policy_bound = false;  // authPolicy set (PCR policy)
  bool restricted = false, sign = false, decrypt = false;
  bool name_alg_sha256 = false;  // the Name above is nameAlg || SHA-256 only when this holds
};
Result<ObjectInfo> Describe(const SealedObject& object);
// The P-256 public point (04||X||Y) of an ECC key's public area.
Result<std::vector<uint8_t>> EccPoint(const SealedObject& object);

// TPM2_MakeCredential done in software, by a verifier that has no TPM: wraps
// `secret` (at most 32 bytes) so that only the TPM holding the RSA 2048
// endorsement key `ek_public_der` (a DER SubjectPublicKeyInfo, from the EK
// certificate) can recover it, and only for the object named `ak_name`
// (TPM Name bytes). Returns the TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
// as the TSS marshals them (TPM 2.0 Part 1, 24: seed by RSA-OAEP with the
// label "IDENTITY", KDFa "STORAGE" and "INTEGRITY", AES-128-CFB, HMAC).
struct Credential {
  std::vector<uint8_t> blob, encrypted_secret;
};
Result<Credential> MakeCredential(std::span<const uint8_t> ek_public_der, std::span<const uint8_t> ak_name,
                                  std::span<const uint8_t> secret);

// Maps a TSS2_RC to custody's error: the decoded text (Tss2_RC_Decode), the
// call, and advice for the cases people meet (PCR mismatch, lockout).
Error TpmError(uint32_t rc, std::string_view call);

}  // namespace custody::tpm
