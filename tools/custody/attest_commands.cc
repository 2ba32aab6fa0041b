// `custody attest`: a signed statement of the token (or TPM), its keys and
// their attributes as the hardware reports them, the policy in force and
// the audit log's head, bound to a verifier's nonce; and `attest verify`,
// which checks one offline. See docs/ATTESTATION.md.
#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "custody/app/backend.h"
#include "custody/attest/attestation.h"
#include "custody/attest/endorsement.h"
#include "custody/common/base64.h"
#include "custody/common/hex.h"
#include "custody/common/time.h"
#include "custody/hsm/objects.h"
#include "custody/hsm/rv.h"
#include "custody/hsm/token_signer.h"
#include "custody/hsm/uri.h"
#include "custody/tpm/tpm.h"
#include "custody/tpm/tpm_sealer.h"
#include "custody/tpm/tpm_signer.h"
#include "flow.h"
#include "io.h"

namespace custody::cli {
namespace {

using nlohmann::json;
using policy::Action;

constexpr const char* kAttestLabel = "custody:attest:v1";

Result<std::unique_ptr<core::AuditSigner>> OpenAttestationKey(const Globals& g, Opened& o, bool create) {
  CUSTODY_RETURN_IF_ERROR(OpenTokenFor(g, o));
  if (o.backend.is_tpm()) {
    CUSTODY_ASSIGN_OR_RETURN(auto s, core::TpmAuditSigner::Open(*o.backend.tpm, o.config.state_dir, o.pin, create,
                                                                kAttestLabel, "attest-key.tpm"));
    return std::unique_ptr<core::AuditSigner>(std::move(s));
  }
  CUSTODY_ASSIGN_OR_RETURN(auto s, core::TokenAuditSigner::Open(*o.backend.token.pool, create, kAttestLabel));
  return std::unique_ptr<core::AuditSigner>(std::move(s));
}

json Pkcs11Attributes(const hsm::ObjectSummary& ob) {
  return {{"local", ob.local},
          {"never_extractable", ob.never_extractable},
          {"always_sensitive", ob.always_sensitive},
          {"extractable", ob.extractable},
          {"sensitive", ob.sensitive}};
}

// A token object's attributes by CKA_ID (the KEKs), with a public
// fingerprint: the token's key check value (CKA_CHECK_VALUE) where it
// reports one, else the CKA_ID.
Result<json> Pkcs11Kek(Opened& o, const core::KekRecord& k) {
  CUSTODY_ASSIGN_OR_RETURN(auto lease, o.backend.token.pool->Acquire());
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_BBOOL yes = CK_TRUE;
  core::KekId id = k.ref.id;
  CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls},
                         {CKA_TOKEN, &yes, sizeof yes},
                         {CKA_ID, id.data(), static_cast<CK_ULONG>(id.size())}};
  CUSTODY_ASSIGN_OR_RETURN(auto found, hsm::FindObjects(*lease, tmpl, 2));
  if (found.size() != 1) {
    return Error(Category::kIntegrity, "KEK " + k.label + " (" + ToHex(k.ref.id) + ") is not in the token");
  }
  CUSTODY_ASSIGN_OR_RETURN(auto ob, hsm::Describe(*lease, found[0]));
  std::array<uint8_t, 3> kcv{};
  CK_ATTRIBUTE a{CKA_CHECK_VALUE, kcv.data(), static_cast<CK_ULONG>(kcv.size())};
  std::string fingerprint = "id:" + ToHex(k.ref.id);
  if (lease->fn()->C_GetAttributeValue(lease->handle(), found[0], &a, 1) == CKR_OK && a.ulValueLen == 3) {
    fingerprint = "kcv:" + ToHex(kcv);
  }
  return json{{"role", "kek"},
              {"label", k.label},
              {"id", ToHex(k.ref.id)},
              {"state", core::KekStateName(k.state)},
              {"key_type", hsm::KeyTypeName(ob.key_type)},
              {"bits", ob.value_len * 8},
              {"attributes", Pkcs11Attributes(ob)},
              {"fingerprint", fingerprint}};
}

json TpmAttributes(const tpm::ObjectInfo& i) {
  return {{"fixed_tpm", i.fixed_tpm},
          {"fixed_parent", i.fixed_parent},
          {"sensitive_data_origin", i.sensitive_data_origin},
          {"user_with_auth", i.user_with_auth},
          {"pcr_policy", i.policy_bound}};
}

Result<std::vector<uint8_t>> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error(Category::kNotFound, path + " cannot be read");
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

Result<std::string> Hex(const std::string& text, const char* what) {
  std::string out;
  for (char c : text) {
    char l = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (!((l >= '0' && l <= '9') || (l >= 'a' && l <= 'f'))) {
      return Error(Category::kUsage, std::string(what) + " must be hexadecimal");
    }
    out += l;
  }
  if (out.size() % 2 != 0 || out.size() < 16 || out.size() > 128) {
    return Error(Category::kUsage, std::string(what) + " must be 8 to 64 bytes of hex");
  }
  return out;
}

std::string NowUtc() { return FormatUtc(SystemNow()); }

}  // namespace

Status Attest(const Globals& g, const AttestArgs& a) {
  // Both are named in the --json answer.
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--out", a.out));
  if (a.pubkey_out) CUSTODY_RETURN_IF_ERROR(CheckArgText("--pubkey-out", *a.pubkey_out));
  std::optional<std::string> nonce;
  if (a.nonce) {
    CUSTODY_ASSIGN_OR_RETURN(nonce, Hex(*a.nonce, "--nonce"));
  }
  std::optional<core::ParsedEkChallenge> challenge;
  if (a.challenge) {
    CUSTODY_RETURN_IF_ERROR(CheckArgText("--challenge", *a.challenge));
    CUSTODY_ASSIGN_OR_RETURN(auto bytes, ReadBytes(*a.challenge));
    auto parsed = core::ParseEkChallenge(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    if (!parsed) return std::move(parsed).error().Wrap(*a.challenge);
    challenge = std::move(*parsed);
  }
  if (a.project) CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(*a.project));
  CUSTODY_ASSIGN_OR_RETURN(Opened o, OpenStore(g, "attest"));
  o.ev.project = a.project.value_or("");
  return Finish(o, [&]() -> Status {
    CUSTODY_RETURN_IF_ERROR(Guard(o));
    // One project's statement is for its auditors; the whole host's, for admins.
    if (a.project) {
      CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kReadAudit, {*a.project, "", ""}));
      CUSTODY_RETURN_IF_ERROR(o.store->FindProject(*a.project));
    } else {
      CUSTODY_RETURN_IF_ERROR(Ask(o, Action::kApplyPolicy, {}));
    }
    CUSTODY_ASSIGN_OR_RETURN(auto ak, OpenAttestationKey(g, o, /*create=*/true));
    CUSTODY_ASSIGN_OR_RETURN(std::string ak_pem, ak->PublicKeyPem());
    CUSTODY_ASSIGN_OR_RETURN(std::string ak_fp, core::PublicKeyFingerprint(ak_pem));
    if (challenge) {
      // The TPM gives the secret back only if the challenge was wrapped to
      // its EK for its AK; the secret is then this statement's nonce.
      if (!o.backend.is_tpm()) {
        return Error(Category::kUsage, "--challenge needs the TPM backend: a PKCS#11 token has no endorsement key");
      }
      CUSTODY_ASSIGN_OR_RETURN(auto secret,
                               o.backend.tpm->ActivateCredential(challenge->credential_blob, challenge->encrypted_secret));
      nonce = ToHex(secret);
      o.ev.detail += "; EK challenge answered";
    }
    // An answered challenge's nonce is its secret: the record says only that
    // it was answered (the statement carries it, to the verifier).
    o.ev.detail += "; attestation key " + ak_fp.substr(0, 16) + (nonce && !challenge ? "; nonce " + *nonce : "");
    // Recorded first: the statement's audit head includes this request.
    CUSTODY_RETURN_IF_ERROR(Record(o, Status::Ok()));

    json payload;
    payload["format"] = core::kStatementFormat;
    payload["time"] = NowUtc();
    payload["nonce"] = nonce ? json(*nonce) : json(nullptr);
    payload["backend"] = o.config.token.backend;
    if (a.project) payload["project"] = *a.project;
    json keys = json::array();
    CUSTODY_ASSIGN_OR_RETURN(auto keks, o.store->ListKeks());
    std::map<int64_t, std::string> project_names;
    CUSTODY_ASSIGN_OR_RETURN(auto projects, o.store->ListProjects());
    for (const auto& p : projects) project_names[p.id] = p.name;

    std::vector<uint8_t> qualifying;
    if (nonce) qualifying = FromHex(*nonce).value_or(std::vector<uint8_t>{});
    std::optional<tpm::Quote> quote;
    if (o.backend.is_tpm()) {
      // The TPM's own word: a quote over the PCRs (the configured ones, or
      // 0-7), with the nonce, by the endorsement-hierarchy attestation key.
      std::vector<uint8_t> pcrs = o.config.token.tpm.pcrs;
      if (pcrs.empty()) pcrs = {0, 1, 2, 3, 4, 5, 6, 7};
      CUSTODY_ASSIGN_OR_RETURN(quote, o.backend.tpm->QuotePcrs(qualifying, pcrs));
      CUSTODY_ASSIGN_OR_RETURN(std::string ak_tpm_pem, core::P256PublicKeyPem(quote->ak_point));
      json q{{"pcr_bank", "sha256"}, {"pcrs", quote->pcrs}, {"pcr_values", ToHex(quote->pcr_values)},
             {"message", Base64Encode(quote->attested.message)}, {"signature", Base64Encode(quote->attested.signature)},
             {"ak_public_key", ak_tpm_pem}, {"ak_name", quote->ak_name},
             {"ak_public_area", Base64Encode(quote->ak_public)}};
      payload["tpm_quote"] = q;
      // The EK certificate, for a verifier that chains the AK to the
      // manufacturer (`attest challenge`, then `attest verify --ek-ca`).
      // A TPM without one, or with an index it will not read, still
      // attests; the statement says why it carries no certificate.
      auto ek_cert = o.backend.tpm->EkCertificate();
      if (ek_cert) {
        payload["tpm_ek"] = {{"certificate", Base64Encode(*ek_cert)}};
      } else {
        payload["tpm_ek"] = {{"certificate", nullptr},
                             {"note", ek_cert.error().category() == Category::kNotFound
                                          ? std::string("this TPM holds no RSA EK certificate")
                                          : "the EK certificate could not be read: " + ek_cert.error().message()}};
      }
      CUSTODY_ASSIGN_OR_RETURN(tpm::Info info, o.backend.tpm->GetInfo());
      payload["token"] = {{"kind", "TPM 2.0"}, {"manufacturer", info.manufacturer}, {"vendor", info.vendor},
                          {"firmware", info.firmware}, {"srk_name", info.srk_name},
                          {"srk_handle", info.srk_handle != 0 ? "0x81000001" : "transient"}};
      for (const auto& k : keks) {
        if (k.state == core::KekState::kDestroyed) continue;
        if (a.project && project_names[k.project_id] != *a.project) continue;
        CUSTODY_ASSIGN_OR_RETURN(auto material, o.store->KekMaterial(k.ref));
        CUSTODY_ASSIGN_OR_RETURN(auto object, tpm::SealedObject::Decode(material));
        CUSTODY_ASSIGN_OR_RETURN(auto oi, tpm::Describe(object));
        auto* tpm_sealer = static_cast<core::TpmSealer*>(o.sealer);
        CUSTODY_ASSIGN_OR_RETURN(auto cert, tpm_sealer->CertifyKek(k.ref, project_names[k.project_id], qualifying));
        keys.push_back({{"role", "kek"}, {"label", k.label}, {"id", ToHex(k.ref.id)},
                        {"state", core::KekStateName(k.state)}, {"attributes", TpmAttributes(oi)},
                        {"fingerprint", "tpm-name:" + oi.name},
                        {"certify", {{"message", Base64Encode(cert.message)}, {"signature", Base64Encode(cert.signature)}}}});
      }
      for (const auto& [role, file] : {std::pair<const char*, const char*>{"audit", "audit-key.tpm"},
                                       {"attestation", "attest-key.tpm"}}) {
        auto bytes = ReadBytes(o.config.state_dir + "/" + file);
        if (!bytes || bytes->size() <= 65) continue;
        CUSTODY_ASSIGN_OR_RETURN(auto object, tpm::SealedObject::Decode(std::span<const uint8_t>(*bytes).subspan(65)));
        CUSTODY_ASSIGN_OR_RETURN(auto oi, tpm::Describe(object));
        std::string label = std::string(role) == "audit" ? core::TpmAuditSigner::kLabel : kAttestLabel;
        auto signer = core::TpmAuditSigner::Open(*o.backend.tpm, o.config.state_dir, o.pin, false, label, file);
        std::string fp = "tpm-name:" + oi.name;
        if (signer) {
          if (auto pem = (*signer)->PublicKeyPem(); pem) {
            if (auto f = core::PublicKeyFingerprint(*pem); f) fp = *f;
          }
        }
        json entry{{"role", role}, {"label", label}, {"attributes", TpmAttributes(oi)}, {"fingerprint", fp},
                   {"tpm_name", oi.name}, {"public_area", Base64Encode(object.public_area)}};
        if (std::string(role) == "attestation") {
          // The key signing this statement, certified by the AK with the
          // nonce: the statement is then the TPM's, not only the quote.
          if (!signer) return std::move(signer).error();
          CUSTODY_ASSIGN_OR_RETURN(auto cert, (*signer)->Certify(qualifying));
          entry["certify"] = {{"message", Base64Encode(cert.message)}, {"signature", Base64Encode(cert.signature)}};
        }
        keys.push_back(std::move(entry));
      }
    } else {
      core::Token& t = o.backend.token;
      CK_TOKEN_INFO ti{};
      CK_RV rv = t.module->fn()->C_GetTokenInfo(t.slot, &ti);
      if (rv != CKR_OK) return hsm::RvError(rv, "C_GetTokenInfo");
      payload["token"] = {
          {"kind", "PKCS#11"},
          {"label", hsm::TrimPadded(ti.label, sizeof ti.label)},
          {"manufacturer", hsm::TrimPadded(ti.manufacturerID, sizeof ti.manufacturerID)},
          {"model", hsm::TrimPadded(ti.model, sizeof ti.model)},
          {"serial", hsm::TrimPadded(ti.serialNumber, sizeof ti.serialNumber)},
          {"firmware", std::to_string(ti.firmwareVersion.major) + "." + std::to_string(ti.firmwareVersion.minor)},
          {"hardware", std::to_string(ti.hardwareVersion.major) + "." + std::to_string(ti.hardwareVersion.minor)}};
      for (const auto& k : keks) {
        if (k.state == core::KekState::kDestroyed) continue;
        if (a.project && project_names[k.project_id] != *a.project) continue;
        CUSTODY_ASSIGN_OR_RETURN(json kj, Pkcs11Kek(o, k));
        keys.push_back(std::move(kj));
      }
      for (const char* label : {core::TokenAuditSigner::kLabel, kAttestLabel}) {
        auto signer = core::TokenAuditSigner::Open(*t.pool, /*create=*/false, label);
        if (!signer) continue;  // no audit key until the first checkpoint
        CUSTODY_ASSIGN_OR_RETURN(auto ob, (*signer)->DescribePrivateKey());
        CUSTODY_ASSIGN_OR_RETURN(std::string pem, (*signer)->PublicKeyPem());
        CUSTODY_ASSIGN_OR_RETURN(std::string fp, core::PublicKeyFingerprint(pem));
        keys.push_back({{"role", label == kAttestLabel ? "attestation" : "audit"}, {"label", label},
                        {"id", (*signer)->key_id()}, {"key_type", "EC P-256"}, {"attributes", Pkcs11Attributes(ob)},
                        {"fingerprint", fp}});
      }
    }
    payload["keys"] = keys;

    CUSTODY_ASSIGN_OR_RETURN(auto policy, o.store->CurrentPolicy());
    payload["policy"] = {{"version", policy ? policy->version : 0}, {"sha256", policy ? policy->sha256 : ""}};
    // This node's chain (with a PostgreSQL store, each node has its own).
    CUSTODY_ASSIGN_OR_RETURN(core::AuditHead head, o.audit->storage().Head());
    json audit{{"head_seq", head.seq}, {"head_hash", head.seq == 0 ? "" : head.hash}};
    // The store's witness of the newest checkpoint (a file log's; a trail in
    // the store has its checkpoints among its records).
    std::optional<std::pair<uint64_t, std::string>> last_ckpt;
    if (!core::AuditInStore(o.config)) {
      CUSTODY_ASSIGN_OR_RETURN(last_ckpt, o.store->LastAuditCheckpoint(o.config.node.name));
    }
    if (last_ckpt) {
      audit["last_checkpoint"] = {{"seq", last_ckpt->first}, {"covers_hash", last_ckpt->second}};
    }
    payload["audit"] = audit;
    payload["attestation_key"] = {{"label", kAttestLabel}, {"fingerprint", ak_fp}};

    // Compact, keys in sorted order: the exact bytes signed (and the ones
    // `openssl dgst -verify` checks).
    std::string bytes = payload.dump();
    CUSTODY_ASSIGN_OR_RETURN(auto sig, ak->Sign(bytes));
    std::string file = core::EncodeStatementFile(bytes, sig, ak_pem);
    auto as_span = [](const std::string& s) {
      return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    };
    CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.out, as_span(file)));
    CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.out + ".bin", as_span(bytes)));
    CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.out + ".sig", sig));
    if (a.pubkey_out) CUSTODY_RETURN_IF_ERROR(WritePrivateFile(*a.pubkey_out, as_span(ak_pem)));
    if (quote) {
      // What tpm2_checkquote reads, beside the statement.
      CUSTODY_ASSIGN_OR_RETURN(std::string ak_tpm_pem, core::P256PublicKeyPem(quote->ak_point));
      CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.out + ".quote.msg", quote->attested.message));
      CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.out + ".quote.sig", quote->attested.signature));
      CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.out + ".quote.pcrs", quote->pcr_file));
      CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.out + ".ak.pem", as_span(ak_tpm_pem)));
    }
    if (g.json) {
      PrintJson({{"statement", a.out}, {"signed_bytes", a.out + ".bin"}, {"signature", a.out + ".sig"},
                 {"keys", keys.size()}, {"attestation_key", ak_fp}});
    } else {
      std::printf("wrote %s: %zu key(s), policy v%u, audit head seq %" PRIu64 "%s\n", a.out.c_str(), keys.size(),
                  policy ? policy->version : 0u, head.seq,
                  nonce ? ", nonce bound" : "");
      std::printf("signed bytes %s.bin, signature %s.sig (attestation key %s)\n", a.out.c_str(), a.out.c_str(),
                  ak_fp.c_str());
    }
    return Status::Ok();
  }());
}

Status AttestVerify(const Globals& g, const AttestVerifyArgs& a) {
  // Offline: no config, no store, no token. Only the file, the key, the
  // nonce (or the challenge key) and the EK CA.
  const std::string& file = a.statement;
  std::optional<std::string> nonce;
  if (a.nonce) {
    CUSTODY_ASSIGN_OR_RETURN(nonce, Hex(*a.nonce, "--nonce"));
  }
  std::optional<core::EkChallengeKey> challenge_key;
  std::string ca_pem;
  if (a.challenge_key) {
    CUSTODY_ASSIGN_OR_RETURN(auto key_bytes, ReadBytes(*a.challenge_key));
    auto k = core::ParseEkChallengeKey(std::string_view(reinterpret_cast<const char*>(key_bytes.data()), key_bytes.size()));
    if (!k) return std::move(k).error().Wrap(*a.challenge_key);
    challenge_key = std::move(*k);
    nonce = challenge_key->nonce;
  }
  if (a.ek_ca) {
    CUSTODY_ASSIGN_OR_RETURN(auto ca_bytes, ReadBytes(*a.ek_ca));
    ca_pem.assign(ca_bytes.begin(), ca_bytes.end());
  }
  CUSTODY_ASSIGN_OR_RETURN(auto text, ReadBytes(file));
  CUSTODY_ASSIGN_OR_RETURN(auto pem, ReadBytes(a.pubkey));
  auto s = core::VerifyStatementFile(std::string_view(reinterpret_cast<const char*>(text.data()), text.size()),
                                     std::string(pem.begin(), pem.end()), nonce);
  if (!s) return std::move(s).error().Wrap(file);
  std::optional<core::Endorsement> endorsement;
  if (challenge_key) {
    auto e = core::VerifyEndorsement(*s, ca_pem, *challenge_key);
    if (!e) return std::move(e).error().Wrap(file);
    endorsement = std::move(*e);
  }
  // Everything shown comes from the signed bytes (the summary), never from
  // the file's readable copy, which verify has checked to be the same.
  std::string nonce_note = nonce ? "matches" : (s->nonce.empty() ? "none" : "not checked (no --nonce)");
  if (g.json) {
    json keys = json::array();
    for (const auto& k : s->key_list) {
      keys.push_back({{"role", k.role}, {"label", k.label}, {"id", k.id}, {"fingerprint", k.fingerprint}});
    }
    PrintJson({{"verified", true}, {"time", s->time}, {"backend", s->backend}, {"token", s->token},
               {"keys", s->keys}, {"key_list", keys},
               {"policy_version", s->policy_version ? json(*s->policy_version) : json(nullptr)},
               {"policy_sha256", s->policy_sha256}, {"audit_head_seq", s->audit_head_seq},
               {"audit_head_hash", s->audit_head_hash}, {"attestation_key", s->attestation_key},
               {"nonce", s->nonce}, {"nonce_checked", nonce.has_value()},
               {"ek_chained", endorsement.has_value()},
               {"ek_issuer", endorsement ? json(endorsement->ek_issuer) : json(nullptr)}});
  } else {
    std::string policy_version = s->policy_version ? " v" + std::to_string(*s->policy_version) : "";
    std::printf("statement verified: made %s on %s (%s), %zu key(s), policy%s %s, audit head seq %" PRIu64 "%s\n",
                s->time.c_str(), s->backend.c_str(), s->token.c_str(), s->keys, policy_version.c_str(),
                s->policy_sha256.substr(0, 16).c_str(), s->audit_head_seq,
                nonce ? ", nonce matches" : (s->nonce.empty() ? ", no nonce" : ", nonce not checked"));
    std::printf("what was signed:\n");
    std::vector<std::vector<std::string>> rows;
    rows.push_back({"  policy", "v" + (s->policy_version ? std::to_string(*s->policy_version) : std::string("?")) +
                                    " sha256 " + s->policy_sha256});
    rows.push_back({"  audit head", "seq " + std::to_string(s->audit_head_seq) + " hash " + s->audit_head_hash});
    rows.push_back({"  nonce", (s->nonce.empty() ? std::string("none") : s->nonce) + " (" + nonce_note + ")"});
    rows.push_back({"  attestation key", s->attestation_key});
    for (const auto& k : s->key_list) {
      rows.push_back({"  key", k.role + " " + k.label + (k.id.empty() ? "" : " id " + k.id) + " " + k.fingerprint});
    }
    if (endorsement) {
      rows.push_back({"  endorsement", "AK " + s->ak_name.substr(0, 20) + "... activated the challenge for EK " +
                                           endorsement->ek_cert_sha256.substr(0, 16) + "..., issued by " +
                                           endorsement->ek_issuer + " (chains to --ek-ca)"});
    } else if (!s->ak_name.empty()) {
      rows.push_back({"  endorsement", "not checked: the AK is not shown to be a genuine TPM's (see attest challenge)"});
    }
    PrintTable(rows);
  }
  return Status::Ok();
}

Status AttestChallenge(const Globals&, const AttestChallengeArgs& a) {
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--out", a.out));
  CUSTODY_RETURN_IF_ERROR(CheckArgText("--key-out", a.key_out));
  CUSTODY_ASSIGN_OR_RETURN(auto text, ReadBytes(a.statement));
  CUSTODY_ASSIGN_OR_RETURN(auto pem, ReadBytes(a.pubkey));
  CUSTODY_ASSIGN_OR_RETURN(auto ca, ReadBytes(a.ek_ca));
  // The statement the EK certificate and the AK come from must itself
  // verify with the key the verifier trusts (its nonce is not checked here:
  // freshness comes from the challenge's answer).
  auto s = core::VerifyStatementFile(std::string_view(reinterpret_cast<const char*>(text.data()), text.size()),
                                     std::string(pem.begin(), pem.end()), std::nullopt);
  if (!s) return std::move(s).error().Wrap(a.statement);
  auto c = core::MakeEkChallenge(*s, std::string(ca.begin(), ca.end()));
  if (!c) return std::move(c).error().Wrap(a.statement);
  auto as_span = [](const std::string& t) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(t.data()), t.size());
  };
  // The key first: a challenge sent without its key kept could never be checked.
  CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.key_out, as_span(c->key)));
  CUSTODY_RETURN_IF_ERROR(WritePrivateFile(a.out, as_span(c->challenge)));
  std::printf("challenge for the TPM whose EK certificate (%s) is issued by %s, bound to AK %s\n",
              c->ek_subject.c_str(), c->ek_issuer.c_str(), s->ak_name.c_str());
  std::printf("send %s to the host (custody attest --challenge %s --out FILE); keep %s for attest verify "
              "--challenge-key\n",
              a.out.c_str(), a.out.c_str(), a.key_out.c_str());
  return Status::Ok();
}

}  // namespace custody::cli
