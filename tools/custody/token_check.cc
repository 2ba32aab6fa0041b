// `custody token check`: does this token offer what custody relies on? Each
// capability is tried, not only looked up (a module may list a mechanism it
// then refuses, or ignore an attribute): a session-only AES-256 key made
// sensitive and non-extractable and read back, an AES-GCM round trip with a
// 12-byte IV and AAD whose tampered tag must be refused, the token RNG, an
// EC P-256 key pair and an ECDSA signature. Only session objects are made
// (CKA_TOKEN false): nothing is left in the token. The report says, per
// line, whether custody needs it and what custody does without it; `--json`
// is for CI, and `--against` compares with a report saved from another
// token (CI's SoftHSM2 against production's HSM).
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "custody/app/backend.h"
#include "custody/common/untrusted.h"
#include "custody/hsm/module.h"
#include "custody/hsm/rv.h"
#include "custody/hsm/session.h"
#include "custody/hsm/uri.h"
#include "flow.h"
#include "io.h"
#include "token_report.h"

namespace custody::cli {
namespace {

using nlohmann::json;

std::string Rv(CK_RV rv) { return hsm::RvName(rv); }

// One session-only object, destroyed with its session or here.
struct SessionObject {
  CK_FUNCTION_LIST* fn;
  CK_SESSION_HANDLE session;
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  ~SessionObject() {
    if (handle != CK_INVALID_HANDLE) fn->C_DestroyObject(session, handle);
  }
};

class Prober {
 public:
  Prober(hsm::Session& s, CK_SLOT_ID slot) : s_(s), fn_(s.fn()), h_(s.handle()), slot_(slot) {}

  std::vector<Capability> Run() {
    std::vector<Capability> out;
    out.push_back(TokenState());
    out.push_back(PinCounters());
    out.push_back(Random());
    SessionObject aes{fn_, h_};
    out.push_back(AesKey(aes));
    out.push_back(AesGcm(aes.handle));
    out.push_back(EcKeyAndEcdsa());
    out.push_back(Wrap());
    out.push_back(Sessions());
    out.push_back(Memory());
    return out;
  }

 private:
  CK_TOKEN_INFO& Info() {
    if (!have_info_) {
      info_rv_ = fn_->C_GetTokenInfo(slot_, &info_);
      have_info_ = true;
    }
    return info_;
  }

  Capability TokenState() {
    Capability c{"login", "user PIN set, not locked, login works", true, false, "", ""};
    CK_TOKEN_INFO& ti = Info();
    if (info_rv_ != CKR_OK) {
      c.detail = "C_GetTokenInfo: " + Rv(info_rv_);
    } else {
      const bool initialized = ti.flags & CKF_USER_PIN_INITIALIZED, locked = ti.flags & CKF_USER_PIN_LOCKED;
      c.present = initialized && !locked;  // and logged in: this session got here after C_Login
      c.detail = std::string(initialized ? "user PIN initialised" : "no user PIN") + (locked ? ", PIN LOCKED" : "") +
                 ((ti.flags & CKF_LOGIN_REQUIRED) ? ", login required" : "");
    }
    c.without_it = "custody cannot log in: nothing can be sealed or unsealed";
    return c;
  }

  Capability PinCounters() {
    Capability c{"pin_counters", "no failed PIN tries pending (CKF_USER_PIN_COUNT_LOW, FINAL_TRY)", false, true, "", ""};
    CK_TOKEN_INFO& ti = Info();
    if (info_rv_ == CKR_OK) {
      if (ti.flags & CKF_USER_PIN_FINAL_TRY) {
        c.present = false;
        c.detail = "one more wrong PIN locks the token";
      } else if (ti.flags & CKF_USER_PIN_COUNT_LOW) {
        c.present = false;
        c.detail = "a wrong PIN was entered since the last good login";
      } else {
        c.detail = "clear";
      }
    }
    c.without_it = "a wrong PIN in any custody config now may lock the token for every service";
    return c;
  }

  Capability Random() {
    Capability c{"rng", "token random number generator (C_GenerateRandom)", true, false, "", ""};
    uint8_t buf[32] = {};
    CK_RV rv = fn_->C_GenerateRandom(h_, buf, sizeof buf);
    bool nonzero = false;
    for (uint8_t b : buf) nonzero = nonzero || b != 0;
    c.present = rv == CKR_OK && nonzero;
    c.detail = rv == CKR_OK ? (nonzero ? "32 bytes" : "returned only zeros") : "C_GenerateRandom: " + Rv(rv);
    c.without_it = "request ids, GCM nonces and generated secrets need the token RNG; custody refuses to run";
    return c;
  }

  Capability AesKey(SessionObject& key) {
    Capability c{"aes256_keygen", "AES-256 key generation, sensitive, not extractable, private", true, false, "", ""};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls},        {CKA_KEY_TYPE, &kt, sizeof kt},
                        {CKA_VALUE_LEN, &len, sizeof len},    {CKA_TOKEN, &no, sizeof no},
                        {CKA_PRIVATE, &yes, sizeof yes},      {CKA_SENSITIVE, &yes, sizeof yes},
                        {CKA_EXTRACTABLE, &no, sizeof no},    {CKA_ENCRYPT, &yes, sizeof yes},
                        {CKA_DECRYPT, &yes, sizeof yes}};
    CK_MECHANISM m{CKM_AES_KEY_GEN, nullptr, 0};
    CK_RV rv = fn_->C_GenerateKey(h_, &m, t, sizeof t / sizeof t[0], &key.handle);
    if (rv != CKR_OK) {
      key.handle = CK_INVALID_HANDLE;
      c.detail = "C_GenerateKey: " + Rv(rv);
    } else {
      CK_BBOOL sensitive = CK_FALSE, extractable = CK_TRUE;
      CK_ATTRIBUTE back[] = {{CKA_SENSITIVE, &sensitive, sizeof sensitive},
                             {CKA_EXTRACTABLE, &extractable, sizeof extractable}};
      rv = fn_->C_GetAttributeValue(h_, key.handle, back, 2);
      c.present = rv == CKR_OK && sensitive == CK_TRUE && extractable == CK_FALSE;
      c.detail = rv != CKR_OK ? "C_GetAttributeValue: " + Rv(rv)
                              : std::string("made; reads back sensitive=") + (sensitive ? "yes" : "NO") +
                                    ", extractable=" + (extractable ? "YES" : "no");
    }
    c.without_it = "KEKs cannot be made in the token as custody requires (never extractable)";
    return c;
  }

  Capability AesGcm(CK_OBJECT_HANDLE key) {
    Capability c{"aes_gcm", "AES-GCM encrypt and decrypt, 12-byte IV, AAD, 128-bit tag", true, false, "", ""};
    c.without_it = "secrets cannot be sealed: custody's blobs are AES-256-GCM under a KEK in the token";
    if (key == CK_INVALID_HANDLE) {
      c.detail = "not tried: no AES key";
      return c;
    }
    uint8_t iv[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    uint8_t aad[] = "custody token check";
    CK_GCM_PARAMS p{};
    p.pIv = iv;
    p.ulIvLen = sizeof iv;
    p.ulIvBits = sizeof iv * 8;
    p.pAAD = aad;
    p.ulAADLen = sizeof aad - 1;
    p.ulTagBits = 128;
    CK_MECHANISM m{CKM_AES_GCM, &p, sizeof p};
    uint8_t plain[64];
    for (size_t i = 0; i < sizeof plain; ++i) plain[i] = static_cast<uint8_t>(i);
    uint8_t sealed[64 + 16] = {};
    CK_ULONG sealed_len = sizeof sealed;
    CK_RV rv = fn_->C_EncryptInit(h_, &m, key);
    if (rv == CKR_OK) rv = fn_->C_Encrypt(h_, plain, sizeof plain, sealed, &sealed_len);
    if (rv != CKR_OK) {
      c.detail = "encrypt: " + Rv(rv);
      return c;
    }
    uint8_t back[64 + 16] = {};
    CK_ULONG back_len = sizeof back;
    rv = fn_->C_DecryptInit(h_, &m, key);
    if (rv == CKR_OK) rv = fn_->C_Decrypt(h_, sealed, sealed_len, back, &back_len);
    if (rv != CKR_OK || back_len != sizeof plain || std::memcmp(back, plain, sizeof plain) != 0) {
      c.detail = rv != CKR_OK ? "decrypt: " + Rv(rv) : "decrypt returned other bytes";
      return c;
    }
    if (sealed_len != sizeof plain + 16) {
      c.detail = "encrypt returned " + std::to_string(sealed_len) + " bytes, not the 64 + 16-byte tag";
      return c;
    }
    sealed[sealed_len - 1] ^= 1;  // a tampered tag must be refused
    back_len = sizeof back;
    rv = fn_->C_DecryptInit(h_, &m, key);
    if (rv == CKR_OK) rv = fn_->C_Decrypt(h_, sealed, sealed_len, back, &back_len);
    c.present = rv != CKR_OK;
    c.detail = c.present ? "round trip works; a tampered tag is refused (" + Rv(rv) + ")"
                         : "a TAMPERED ciphertext decrypted: the tag is not checked";
    return c;
  }

  Capability EcKeyAndEcdsa() {
    Capability c{"ec_p256_ecdsa", "EC P-256 key pair generation and CKM_ECDSA signatures", true, false, "", ""};
    c.without_it = "no audit checkpoint key and no attestation key: the audit log cannot be signed";
    static const uint8_t kP256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE pub[] = {{CKA_TOKEN, &no, sizeof no},
                          {CKA_EC_PARAMS, const_cast<uint8_t*>(kP256), sizeof kP256},
                          {CKA_VERIFY, &yes, sizeof yes}};
    CK_ATTRIBUTE priv[] = {{CKA_TOKEN, &no, sizeof no},
                           {CKA_PRIVATE, &yes, sizeof yes},
                           {CKA_SENSITIVE, &yes, sizeof yes},
                           {CKA_EXTRACTABLE, &no, sizeof no},
                           {CKA_SIGN, &yes, sizeof yes}};
    CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
    SessionObject pk{fn_, h_}, sk{fn_, h_};
    CK_RV rv = fn_->C_GenerateKeyPair(h_, &gen, pub, 3, priv, 5, &pk.handle, &sk.handle);
    if (rv != CKR_OK) {
      pk.handle = sk.handle = CK_INVALID_HANDLE;
      c.detail = "C_GenerateKeyPair: " + Rv(rv);
      return c;
    }
    uint8_t digest[32] = {0x5a};
    uint8_t sig[132] = {};
    CK_ULONG sig_len = sizeof sig;
    CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
    rv = fn_->C_SignInit(h_, &m, sk.handle);
    if (rv == CKR_OK) rv = fn_->C_Sign(h_, digest, sizeof digest, sig, &sig_len);
    c.present = rv == CKR_OK && sig_len == 64;
    c.detail = rv != CKR_OK ? "sign: " + Rv(rv) : "signed (" + std::to_string(sig_len) + "-byte r||s)";
    return c;
  }

  Capability Wrap() {
    Capability c{"aes_wrap", "AES-GCM wrap/unwrap or AES key wrap with padding (in-token re-seal)", false, false, "",
                 ""};
    auto offers = [&](CK_MECHANISM_TYPE mech, CK_FLAGS flags) {
      CK_MECHANISM_INFO mi{};
      return fn_->C_GetMechanismInfo(slot_, mech, &mi) == CKR_OK && (mi.flags & flags) == flags;
    };
    const bool gcm = offers(CKM_AES_GCM, CKF_WRAP | CKF_UNWRAP);
    const bool kwp = offers(CKM_AES_KEY_WRAP_PAD, CKF_WRAP | CKF_UNWRAP);
    c.present = gcm || kwp;
    c.detail = std::string("AES-GCM wrap ") + (gcm ? "offered" : "not offered") + ", AES-KWP " +
               (kwp ? "offered" : "not offered");
    c.without_it = "KEK rotation re-seals each value on the host, in locked memory, and wipes it (what custody "
                   "does today on every token)";
    return c;
  }

  Capability Sessions() {
    Capability c{"sessions", "at least 32 concurrent sessions", false, false, "", ""};
    CK_TOKEN_INFO& ti = Info();
    auto text = [](CK_ULONG n) -> std::string {
      if (n == CK_EFFECTIVELY_INFINITE) return "unlimited";
      if (n == CK_UNAVAILABLE_INFORMATION) return "not reported";
      return std::to_string(n);
    };
    if (info_rv_ == CKR_OK) {
      auto enough = [](CK_ULONG n) { return n == CK_EFFECTIVELY_INFINITE || n == CK_UNAVAILABLE_INFORMATION || n >= 32; };
      c.present = enough(ti.ulMaxSessionCount) && enough(ti.ulMaxRwSessionCount);
      c.detail = "max sessions " + text(ti.ulMaxSessionCount) + " (read-write " + text(ti.ulMaxRwSessionCount) +
                 "), open now " + text(ti.ulSessionCount);
    }
    c.without_it = "custodyd keeps up to 8 idle sessions and opens more under load (and for calls left hanging); "
                   "with fewer, requests get 503 when the token refuses another session";
    return c;
  }

  Capability Memory() {
    Capability c{"memory", "free token memory reported", false, false, "", ""};
    CK_TOKEN_INFO& ti = Info();
    if (info_rv_ == CKR_OK) {
      const bool reported = ti.ulFreePrivateMemory != CK_UNAVAILABLE_INFORMATION;
      c.present = reported;
      c.detail = reported ? "free private memory " + std::to_string(ti.ulFreePrivateMemory) + " bytes, public " +
                                std::to_string(ti.ulFreePublicMemory)
                          : "not reported";
    }
    c.without_it = "nothing changes; a full token shows only when a KEK cannot be made (one KEK per project and "
                   "rotation)";
    return c;
  }

  hsm::Session& s_;
  CK_FUNCTION_LIST* fn_;
  CK_SESSION_HANDLE h_;
  CK_SLOT_ID slot_;
  CK_TOKEN_INFO info_{};
  CK_RV info_rv_ = CKR_OK;
  bool have_info_ = false;
};

json ReportJson(const std::string& module, const std::string& token, const std::vector<Capability>& caps) {
  json list = json::array();
  for (const auto& c : caps) {
    list.push_back({{"id", c.id}, {"what", c.what}, {"required", c.required}, {"present", c.present},
                    {"detail", c.detail}, {"without_it", c.without_it}});
  }
  return {{"format", "custody-token-check-v1"}, {"module", module}, {"token", token}, {"capabilities", list}};
}

Result<std::vector<std::string>> Compare(const std::vector<Capability>& caps, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error(Category::kNotFound, "--against " + path + " cannot be read");
  // A saved report is a few KB: anything past 1 MiB is refused before it
  // is held in memory whole.
  constexpr size_t kMaxSavedReport = 1024 * 1024;
  std::string text(kMaxSavedReport + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  if (text.size() > kMaxSavedReport) {
    return Error(Category::kIntegrity,
                 "--against " + path + " is not a saved `custody token check --json` report (larger than 1 MiB)");
  }
  return CompareWithSaved(caps, text, path);
}

}  // namespace

Status TokenCheck(const Globals& g, const TokenCheckArgs& a) {
  if (a.against) CUSTODY_RETURN_IF_ERROR(CheckArgText("--against", *a.against));
  std::vector<Capability> caps;
  std::string module_path, token_name;
  auto probe = [&](hsm::SessionPool& pool, CK_SLOT_ID slot) -> Status {
    CUSTODY_ASSIGN_OR_RETURN(auto lease, pool.Acquire());
    Prober p(*lease, slot);
    caps = p.Run();
    return Status::Ok();
  };
  if (a.module) {
    // Without a config: any token, e.g. production's HSM from an admin's
    // host. Nothing is audited (there is no audit log to write to).
    if (!a.token) return Error(Category::kUsage, "--module needs --token URI");
    CUSTODY_RETURN_IF_ERROR(CheckArgText("--module", *a.module));
    CUSTODY_RETURN_IF_ERROR(CheckArgText("--token", *a.token));
    core::Config c;
    c.token.pin_file = a.pin_file;
    CUSTODY_ASSIGN_OR_RETURN(SecretBuffer pin, core::ResolvePin(c, g.pin_fd));
    CUSTODY_ASSIGN_OR_RETURN(auto uri, hsm::TokenUri::Parse(*a.token));
    CUSTODY_ASSIGN_OR_RETURN(auto module, hsm::Module::Load(*a.module));
    CUSTODY_ASSIGN_OR_RETURN(CK_SLOT_ID slot, hsm::FindSlot(*module, uri));
    CUSTODY_ASSIGN_OR_RETURN(auto pool, hsm::SessionPool::Open(module, slot, pin));
    CUSTODY_RETURN_IF_ERROR(probe(*pool, slot));
    module_path = *a.module;
    token_name = *a.token;
  } else {
    CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "token.check"));
    Status s = Finish(o, [&]() -> Status {
      CUSTODY_RETURN_IF_ERROR(Guard(o));
      CUSTODY_RETURN_IF_ERROR(Ask(o, policy::Action::kApplyPolicy, {}));
      if (o.config.token.backend == "tpm") {
        return Error(Category::kUsage, "token check is for PKCS#11 tokens; the configured backend is the TPM");
      }
      CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
      CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));
      module_path = o.config.token.pkcs11.module;
      token_name = o.config.token.pkcs11.uri;
      return probe(*o.backend.token.pool, o.backend.token.slot);
    }());
    CUSTODY_RETURN_IF_ERROR(s);
  }
  std::vector<std::string> differences;
  if (a.against) {
    CUSTODY_ASSIGN_OR_RETURN(differences, Compare(caps, *a.against));
  }
  std::vector<std::string> missing;
  for (const auto& c : caps) {
    if (c.required && !c.present) missing.push_back(c.id);
  }
  if (g.json) {
    json j = ReportJson(module_path, token_name, caps);
    if (a.against) j["differences"] = differences;
    j["missing_required"] = missing;
    PrintJson(j);
  } else {
    std::printf("token %s (module %s)\n", EscapeUntrusted(token_name).c_str(), EscapeUntrusted(module_path).c_str());
    std::vector<std::vector<std::string>> rows{{"CAPABILITY", "NEED", "HERE", "WHAT THE TOKEN DID", "WITHOUT IT"}};
    for (const auto& c : caps) {
      rows.push_back({c.id, c.required ? "required" : "optional", c.present ? "present" : "MISSING",
                      EscapeUntrusted(c.detail), c.present ? "" : c.without_it});
    }
    PrintTable(rows);
    if (a.against) {
      std::printf("\ncompared with %s: %zu difference(s)\n", a.against->c_str(), differences.size());
      for (const auto& d : differences) std::printf("  %s\n", d.c_str());
    }
  }
  if (!missing.empty()) {
    std::string list;
    for (const auto& m : missing) list += (list.empty() ? "" : ", ") + m;
    std::fprintf(stderr, "custody: token check: required capability missing: %s\n", list.c_str());
    g.check_failed_exit = 1;
  }
  return Status::Ok();
}

}  // namespace custody::cli
