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
    o.ev.detail += "; attestation key " + ak_fp.substr(0, 16) + (nonce ? "; nonce " + *nonce : "");
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
    if (nonce) {
      for (size_t i = 0; i < nonce->size(); i += 2) {
        qualifying.push_back(static_cast<uint8_t>(std::stoi(nonce->substr(i, 2), nullptr, 16)));
      }
    }
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
             {"ak_public_key", ak_tpm_pem}, {"ak_name", quote->ak_name}};
      payload["tpm_quote"] = q;
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
        keys.push_back({{"role", role}, {"label", label}, {"attributes", TpmAttributes(oi)}, {"fingerprint", fp},
                        {"tpm_name", oi.name}});
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

Status AttestVerify(const Globals& g, const std::string& file, const std::string& pubkey,
                    const std::optional<std::string>& nonce_text) {
  // Offline: no config, no store, no token. Only the file, the key and the nonce.
  std::optional<std::string> nonce;
  if (nonce_text) {
    CUSTODY_ASSIGN_OR_RETURN(nonce, Hex(*nonce_text, "--nonce"));
  }
  CUSTODY_ASSIGN_OR_RETURN(auto text, ReadBytes(file));
  CUSTODY_ASSIGN_OR_RETURN(auto pem, ReadBytes(pubkey));
  auto s = core::VerifyStatementFile(std::string_view(reinterpret_cast<const char*>(text.data()), text.size()),
                                     std::string(pem.begin(), pem.end()), nonce);
  if (!s) return std::move(s).error().Wrap(file);
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
               {"nonce", s->nonce}, {"nonce_checked", nonce.has_value()}});
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
    PrintTable(rows);
  }
  return Status::Ok();
}

}  // namespace custody::cli
