// custody: the command-line tool. See README.md for the commands and
// docs/ARCHITECTURE.md for what happens underneath.
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "commands.h"
#include "custody/common/secret.h"
#include "custody/common/untrusted.h"
#include "custody/version.h"

using custody::Category;
using custody::Status;

namespace {

int Report(const Status& s) {
  if (s.ok()) return 0;
  std::fprintf(stderr, "custody: %s\n", s.error().message().c_str());
  return s.error().exit_code();
}

// The global options. People type them after the command as often as before
// it (`custody usage demo --json`, as docs/POLICY.md shows), so they go on
// the top and on every subcommand, bound to the same Globals.
// (CLI11's fallthrough would hand a subcommand's unknown options to its
// parent instead, but it hands up its extra words too: exec's command, and
// under `attest verify` attest's own options would pass silently.)
void AddGlobalOptions(CLI::App& app, custody::cli::Globals& g) {
  app.add_option("--config", g.config, "config file (default: $CUSTODY_CONFIG, then /etc/custody/custody.toml)");
  app.add_flag("--json", g.json, "machine-readable output");
  app.add_option("--pin-fd", g.pin_fd, "read the token PIN from this file descriptor");
  app.add_option("--progress", g.progress,
                 "long commands: auto (on a terminal), lines (plain lines, for logs) or none")
      ->check(CLI::IsMember({"auto", "lines", "none"}));
}

// An option given an empty value ("--version \"$V\"" with V unset) is
// refused, naming it: CLI11 would read it as not given (the newest version,
// the default timeout, the PIN from elsewhere) or as 0 (revoke version 0), a
// request other than the one the caller wrote. On every option that takes a
// value, at every level; --prefix may be empty (no prefix), and
// --if-version has its own words.
void RefuseEmptyValues(CLI::App& app) {
  for (CLI::Option* opt : app.get_options()) {
    if (opt->get_positional() || opt->get_items_expected_min() == 0) continue;  // flags
    const std::string name = opt->get_name();
    if (name == "--prefix" || name == "--if-version") continue;
    const bool number = opt->get_type_name() == "UINT" || opt->get_type_name() == "INT";
    opt->check(CLI::Validator(
        [number](std::string& v) {
          return v.empty() ? std::string(number ? "empty; give a number" : "empty; give a value") : std::string();
        },
        "", "not empty"));
  }
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) RefuseEmptyValues(*sub);
}

void AddGlobalOptionsBelow(CLI::App& app, custody::cli::Globals& g) {
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
    AddGlobalOptions(*sub, g);
    AddGlobalOptionsBelow(*sub, g);
  }
}

// How often `name` was given on the line, before and after the command.
size_t GivenTimes(const CLI::App& app, const std::string& name) {
  size_t n = app.count(name);
  for (const CLI::App* sub : app.get_subcommands()) n += GivenTimes(*sub, name);
  return n;
}

// Two configs or two PIN descriptors on one line (one before the command,
// one after) is a mistake to name, not a tie for the order to break.
Status GivenOnce(const CLI::App& app) {
  for (const char* name : {"--config", "--pin-fd"}) {
    if (GivenTimes(app, name) > 1) return custody::Error(Category::kUsage, std::string(name) + " is given twice");
  }
  return Status::Ok();
}

}  // namespace

int main(int argc, char** argv) {
  // Before anything touches a secret: no core dumps, no ptrace by peers, and
  // every file we create is private.
  custody::HardenProcess();
  ::umask(077);

  CLI::App app{"custody: hardware-backed key custody for projects and environments", "custody"};
  app.require_subcommand(1);
  custody::cli::Globals g;
  AddGlobalOptions(app, g);
  // Before the command only: under `secret get` and `secret revoke`,
  // --version is the secret's.
  app.set_version_flag("--version", custody::VersionLine("custody"), "print the version and the backends built in");

  Status result;
  // fn() may return `result` itself (attest after attest verify): it is
  // read before it is assigned.
  auto run = [&](auto fn) {
    return [&, fn] {
      Status edge = GivenOnce(app);
      if (edge.ok()) edge = custody::cli::CheckGlobals(g);
      result = edge.ok() ? fn() : std::move(edge);
    };
  };

  // init
  custody::cli::InitArgs init;
  auto* c_init = app.add_subcommand("init", "write the config and create the store");
  c_init->add_option("--backend", init.backend, "pkcs11 (an HSM or SoftHSM2) or tpm (a TPM 2.0)")->capture_default_str();
  c_init->add_option("--module", init.module, "pkcs11: PKCS#11 module path");
  c_init->add_option("--token", init.token, "pkcs11: token URI (RFC 7512), e.g. pkcs11:token=custody");
  c_init->add_option("--tcti", init.tcti, "tpm: device:/dev/tpmrm0, swtpm:host=H,port=P, or tabrmd");
  c_init->add_option("--pcrs", init.pcrs, "tpm: bind KEKs to these SHA-256 PCRs, comma-separated")->delimiter(',');
  c_init->add_flag("--persist-srk", init.persist_srk, "tpm: make the SRK persistent at 0x81000001 if absent");
  c_init->add_option("--pin-file", init.pin_file, "file holding the user PIN (mode 0600)");
  c_init->add_option("--state-dir", init.state_dir, "folder for the store")->capture_default_str();
  c_init->add_option("--store", init.store,
                     "SQLite file (default STATE_DIR/custody.db), or a PostgreSQL URL: postgresql://USER@HOST/DB "
                     "(no password in it: use a passfile, PGPASSFILE or client certificates)");
  c_init->add_option("--module-env", init.module_env, "NAME=VALUE set before the module loads (repeatable)");
  c_init->add_flag("--force", init.force, "overwrite an existing config");
  c_init->callback(run([&] { return custody::cli::Init(g, init); }));

  // project
  auto* c_project = app.add_subcommand("project", "projects: each has its own KEK in the token");
  c_project->require_subcommand(1);
  std::string project_name;
  std::vector<std::string> project_envs;
  auto* c_pcreate = c_project->add_subcommand("create", "create a project and its KEK");
  c_pcreate->add_option("NAME", project_name)->required();
  c_pcreate->add_option("--env", project_envs, "environments, comma-separated")->delimiter(',');
  c_pcreate->callback(run([&] { return custody::cli::ProjectCreate(g, project_name, project_envs); }));
  c_project->add_subcommand("list", "list projects")->callback(run([&] { return custody::cli::ProjectList(g); }));

  // env
  auto* c_env = app.add_subcommand("env", "environments of a project");
  c_env->require_subcommand(1);
  std::string env_project, env_name;
  auto* c_ecreate = c_env->add_subcommand("create", "add an environment to a project");
  c_ecreate->add_option("PROJECT", env_project)->required();
  c_ecreate->add_option("ENV", env_name)->required();
  c_ecreate->callback(run([&] { return custody::cli::EnvCreate(g, env_project, env_name); }));

  // secret
  auto* c_secret = app.add_subcommand("secret", "sealed secrets");
  c_secret->require_subcommand(1);
  custody::cli::PutArgs put;
  auto* c_put = c_secret->add_subcommand("put", "seal a new version (value from stdin, never from argv)");
  c_put->add_option("PATH", put.path, "PROJECT/ENV/NAME")->required();
  c_put->add_option("--from-file", put.from_file, "read the value from this file instead of stdin");
  c_put->add_flag("--keep-newline", put.keep_newline, "keep a trailing newline in the value");
  c_put->add_option("--if-version", put.if_version,
                    "store only if N is the newest version (0: only if there is none yet); else exit 64, nothing stored")
      // An empty value (a script's unset variable) would otherwise read as
      // no condition at all: an unconditional write the caller did not ask for.
      ->check([](const std::string& v) { return v.empty() ? std::string("empty; give a version number (0: only if there is none yet)") : std::string(); });
  c_put->callback(run([&] { return custody::cli::SecretPut(g, put); }));

  custody::cli::GetArgs get;
  auto* c_get = c_secret->add_subcommand("get", "unseal a version and print it");
  c_get->add_option("PATH", get.path, "PROJECT/ENV/NAME")->required();
  c_get->add_option("--version", get.version, "version number (default: the newest)");
  c_get->add_option("--out", get.out, "write to this file (created 0600) instead of stdout");
  c_get->callback(run([&] { return custody::cli::SecretGet(g, get); }));

  std::string list_scope;
  auto* c_list = c_secret->add_subcommand("list", "list secrets (names and versions, never values)");
  c_list->add_option("SCOPE", list_scope, "PROJECT or PROJECT/ENV");
  c_list->callback(run([&] { return custody::cli::SecretList(g, list_scope); }));

  std::string del_path;
  auto* c_del = c_secret->add_subcommand("delete", "delete a secret and all its versions");
  c_del->add_option("PATH", del_path, "PROJECT/ENV/NAME")->required();
  c_del->callback(run([&] { return custody::cli::SecretDelete(g, del_path); }));

  custody::cli::RotateArgs rot;
  auto* c_rot = c_secret->add_subcommand("rotate", "store a new current version; the old one stays readable for the grace period");
  c_rot->add_option("PATH", rot.path, "PROJECT/ENV/NAME")->required();
  auto* o_file = c_rot->add_option("--from-file", rot.from_file, "read the new value from this file");
  auto* o_gen = c_rot->add_option("--generate", rot.generate, "generate BYTES random bytes in the token");
  c_rot->add_option("--format", rot.format, "for --generate: hex, base64 or base64url")->capture_default_str();
  c_rot->add_option("--prefix", rot.prefix, "for --generate: text before the encoded bytes, e.g. sk-live-");
  auto* o_exec = c_rot->add_option("--exec", rot.exec, "provider command that prints the new value on stdout");
  c_rot->add_option("--timeout", rot.timeout_seconds, "seconds the provider command may take")->capture_default_str();
  c_rot->add_flag("--keep-newline", rot.keep_newline, "keep a trailing newline in the value");
  o_file->excludes(o_gen)->excludes(o_exec);
  o_gen->excludes(o_exec);
  c_rot->callback(run([&] { return custody::cli::SecretRotate(g, rot); }));

  std::string rev_path, rev_reason;
  uint32_t rev_version = 0;
  auto* c_rev = c_secret->add_subcommand("revoke", "withdraw a version at once: no grace, never readable again");
  c_rev->add_option("PATH", rev_path, "PROJECT/ENV/NAME")->required();
  c_rev->add_option("--version", rev_version, "the version to revoke")->required();
  c_rev->add_option("--reason", rev_reason, "why (recorded in the store and the audit log)")->required();
  c_rev->callback(run([&] { return custody::cli::SecretRevoke(g, rev_path, rev_version, rev_reason); }));

  std::string versions_path;
  auto* c_vers = c_secret->add_subcommand("versions", "list a secret's versions and their states");
  c_vers->add_option("PATH", versions_path, "PROJECT/ENV/NAME")->required();
  c_vers->callback(run([&] { return custody::cli::SecretVersions(g, versions_path); }));

  // rotation
  auto* c_rotation = app.add_subcommand("rotation", "rotation schedules");
  c_rotation->require_subcommand(1);
  std::string status_project;
  bool fail_on_overdue = false;
  auto* c_rstatus = c_rotation->add_subcommand("status", "each secret's age, due date and state, most urgent first");
  c_rstatus->add_option("PROJECT", status_project);
  c_rstatus->add_flag("--fail-on-overdue", fail_on_overdue, "exit 1 when any secret is overdue (for CI gates)");
  c_rstatus->callback(run([&] { return custody::cli::RotationStatus(g, status_project, fail_on_overdue); }));

  // kek
  auto* c_kek = app.add_subcommand("kek", "project key-encryption keys in the token");
  c_kek->require_subcommand(1);
  custody::cli::KekRotateArgs krot;
  auto* c_krot = c_kek->add_subcommand("rotate", "new KEK version; re-seal every version under it; destroy the old");
  c_krot->add_option("PROJECT", krot.project)->required();
  c_krot->add_flag("--dry-run", krot.dry_run, "say what would happen, change nothing");
  c_krot->add_option("--batch", krot.batch, "versions re-sealed per store transaction")->capture_default_str();
  c_krot->callback(run([&] { return custody::cli::KekRotate(g, krot); }));
  std::string klist_project;
  auto* c_klist = c_kek->add_subcommand("list", "KEK versions and their states");
  c_klist->add_option("PROJECT", klist_project)->required();
  c_klist->callback(run([&] { return custody::cli::KekList(g, klist_project); }));

  // store
  auto* c_store = app.add_subcommand("store", "the store itself: moving a deployment between backends");
  c_store->require_subcommand(1);
  custody::cli::StoreCopyArgs scopy;
  auto* c_scopy = c_store->add_subcommand(
      "copy", "copy a deployment into an empty store (SQLite or PostgreSQL) in one transaction, then unseal every "
              "copied version from it; the config is not changed");
  c_scopy->add_option("--from", scopy.from, "the store to copy: a SQLite file or a PostgreSQL URL")->required();
  c_scopy->add_option("--to", scopy.to, "the empty store to copy into (its schema is made if missing)")->required();
  c_scopy->callback(run([&] { return custody::cli::StoreCopy(g, scopy); }));

  // attest
  auto* c_attest = app.add_subcommand("attest", "a signed statement of the keys, their attributes, the policy and the audit head");
  custody::cli::AttestArgs attest;
  c_attest->add_option("--project", attest.project, "only this project's KEKs (its auditors may ask)");
  c_attest->add_option("--nonce", attest.nonce, "the verifier's challenge, hex (8 to 64 bytes)");
  c_attest->add_option("--challenge", attest.challenge,
                       "answer an EK challenge file from `attest challenge` (TPM): its secret becomes the nonce");
  c_attest->add_option("--out", attest.out, "statement file; FILE.bin and FILE.sig are written beside it for openssl");
  c_attest->add_option("--pubkey-out", attest.pubkey_out, "also write the attestation public key (PEM)");
  custody::cli::AttestVerifyArgs verify;
  auto* c_atverify = c_attest->add_subcommand("verify", "check a statement offline: signature, structure, nonce, EK chain");
  c_atverify->add_option("STATEMENT", verify.statement)->required();
  c_atverify->add_option("--pubkey", verify.pubkey, "the attestation public key (PEM) you trust")->required();
  auto* v_nonce = c_atverify->add_option("--nonce", verify.nonce, "require this nonce (hex)");
  auto* v_ca = c_atverify->add_option("--ek-ca", verify.ek_ca,
                                      "TPM: the manufacturer's CA certificates (PEM); needs --challenge-key");
  auto* v_key = c_atverify->add_option("--challenge-key", verify.challenge_key,
                                       "TPM: the key file `attest challenge` kept; its secret is the nonce required");
  v_key->excludes(v_nonce);
  v_ca->needs(v_key);
  v_key->needs(v_ca);
  c_atverify->callback(run([&] { return custody::cli::AttestVerify(g, verify); }));
  custody::cli::AttestChallengeArgs challenge;
  auto* c_atchallenge = c_attest->add_subcommand(
      "challenge", "verifier, TPM: wrap a secret to the EK of a statement's TPM, for that TPM's AK only");
  c_atchallenge->add_option("STATEMENT", challenge.statement, "a statement from the host (carries its EK certificate)")
      ->required();
  c_atchallenge->add_option("--pubkey", challenge.pubkey, "the attestation public key (PEM) you trust")->required();
  c_atchallenge->add_option("--ek-ca", challenge.ek_ca, "the manufacturer's CA certificates (PEM)")->required();
  c_atchallenge->add_option("--out", challenge.out, "the challenge to send to the host")->required();
  c_atchallenge->add_option("--key-out", challenge.key_out, "the secret to keep for `attest verify --challenge-key`")
      ->required();
  c_atchallenge->callback(run([&] { return custody::cli::AttestChallenge(g, challenge); }));
  c_attest->callback(run([&] {
    if (c_atverify->parsed() || c_atchallenge->parsed()) return result;
    if (attest.out.empty()) return Status(custody::Error(Category::kUsage, "attest needs --out FILE"));
    if (attest.nonce && attest.challenge) {
      return Status(custody::Error(Category::kUsage, "attest takes --nonce or --challenge, not both"));
    }
    return custody::cli::Attest(g, attest);
  }));

  // sandbox
  custody::cli::SandboxArgs sandbox;
  auto* c_sandbox = app.add_subcommand(
      "sandbox", "custody on a SoftHSM2 token in DIR for CI: random PINs in files, init, policy, custodyd");
  c_sandbox->add_option("DIR", sandbox.dir)->required();
  auto* sb_project = c_sandbox->add_option("--project", sandbox.project, "a minimal policy: you own this project");
  auto* sb_policy = c_sandbox->add_option("--policy", sandbox.policy, "apply this policy file");
  sb_project->excludes(sb_policy);
  auto* sb_serve = c_sandbox->add_flag("--serve", sandbox.serve, "start custodyd on DIR/custody.sock");
  c_sandbox->add_flag("--stop", sandbox.stop, "stop the custodyd that --serve started")
      ->excludes(sb_serve)
      ->excludes(sb_project)
      ->excludes(sb_policy);
  c_sandbox->callback(run([&] { return custody::cli::Sandbox(g, sandbox); }));

  // token
  auto* c_token = app.add_subcommand("token", "the HSM token, and access tokens of the Vault-compatible API");
  c_token->require_subcommand(1);
  c_token->add_subcommand("info", "show the token and the objects it holds")
      ->callback(run([&] { return custody::cli::TokenInfo(g); }));
  custody::cli::TokenCheckArgs token_check;
  auto* c_tcheck = c_token->add_subcommand(
      "check", "try every capability custody relies on; exit 1 when a required one is missing");
  c_tcheck->add_option("--against", token_check.against, "a saved `token check --json` report to compare with");
  auto* tc_module = c_tcheck->add_option("--module", token_check.module, "without a config: the PKCS#11 module");
  auto* tc_token = c_tcheck->add_option("--token", token_check.token, "without a config: the token URI (RFC 7512)");
  c_tcheck->add_option("--pin-file", token_check.pin_file, "with --module: file holding the user PIN (mode 0600)")
      ->needs(tc_module);
  tc_module->needs(tc_token);
  tc_token->needs(tc_module);
  c_tcheck->callback(run([&] { return custody::cli::TokenCheck(g, token_check); }));
  custody::cli::TokenIssueArgs token_issue;
  auto* c_tissue = c_token->add_subcommand(
      "issue", "an access token for the Vault-compatible API, printed once (policy admins only)");
  c_tissue->add_option("--principal", token_issue.principal, "the principal it speaks for (svc:web)")->required();
  c_tissue->add_option("--ttl", token_issue.ttl, "its life: 90s, 30m, 1h, 7d (default [server] token_ttl_seconds)");
  c_tissue->add_option("--max-ttl", token_issue.max_ttl, "renewable up to this after issue");
  c_tissue->callback(run([&] { return custody::cli::TokenIssue(g, token_issue); }));
  std::string revoke_accessor, revoke_principal;
  auto* c_trevoke = c_token->add_subcommand("revoke", "revoke an access token (by accessor) or all of a principal's");
  auto* tr_acc = c_trevoke->add_option("--accessor", revoke_accessor, "the accessor `token list` shows");
  c_trevoke->add_option("--principal", revoke_principal, "every live token of this principal")->excludes(tr_acc);
  c_trevoke->callback(run([&] { return custody::cli::TokenRevoke(g, revoke_accessor, revoke_principal); }));
  c_token->add_subcommand("list", "access tokens: accessor, principal, state, expiry (never the tokens)")
      ->callback(run([&] { return custody::cli::TokenList(g); }));

  // policy
  auto* c_policy = app.add_subcommand("policy", "policy as code: who may do what, and the limits");
  c_policy->require_subcommand(1);
  std::string policy_file;
  auto* c_pcheck = c_policy->add_subcommand("check", "validate a policy file and print every error");
  c_pcheck->add_option("FILE", policy_file)->required();
  c_pcheck->callback(run([&] { return custody::cli::PolicyCheck(g, policy_file); }));
  auto* c_papply = c_policy->add_subcommand("apply", "validate, store and put a policy in force");
  c_papply->add_option("FILE", policy_file)->required();
  c_papply->callback(run([&] { return custody::cli::PolicyApply(g, policy_file); }));
  std::string ex_principal, ex_action, ex_target;
  auto* c_pexplain = c_policy->add_subcommand("explain", "allow or deny, and the rule that decided");
  c_pexplain->add_option("PRINCIPAL", ex_principal, "e.g. svc:web-prod")->required();
  c_pexplain->add_option("ACTION", ex_action, "get, put, list, delete, rotate, ...")->required();
  c_pexplain->add_option("TARGET", ex_target, "PROJECT[/ENV[/NAME]]")->required();
  c_pexplain->callback(run([&] { return custody::cli::PolicyExplain(g, ex_principal, ex_action, ex_target); }));

  // usage
  std::string usage_project;
  auto* c_usage = app.add_subcommand("usage", "unseals, refusals and last use per project, environment, principal");
  c_usage->add_option("PROJECT", usage_project);
  c_usage->callback(run([&] { return custody::cli::Usage(g, usage_project); }));

  // exec
  std::vector<std::string> exec_envs, exec_command;
  std::optional<std::vector<std::string>> exec_after_dashes;  // set below, before the parse
  auto* c_exec = app.add_subcommand("exec", "run a command with secrets in its environment only");
  c_exec->add_option("--env", exec_envs, "NAME=PROJECT/ENV/SECRET (repeatable)")->required();
  // Everything after the first word of the command is the command's own.
  c_exec->prefix_command();
  c_exec->footer("usage: custody exec --env NAME=PROJECT/ENV/SECRET [--env ...] -- COMMAND [ARGS...]");
  c_exec->callback(run([&] {
    if (exec_after_dashes) {
      // Only exec's own options came before the "--": what CLI11 did not
      // know there is a mistake, not the start of the command.
      if (!c_exec->remaining().empty()) {
        return Status(custody::Error(Category::kUsage, "exec: unknown option '" +
                                                           custody::EscapeUntrusted(c_exec->remaining().front()) +
                                                           "' (see 'custody exec --help')"));
      }
      exec_command = *exec_after_dashes;
    }
    for (const auto& a : c_exec->remaining()) {
      if (exec_command.empty() && a == "--") continue;
      exec_command.push_back(a);
    }
    return custody::cli::Exec(g, exec_envs, exec_command);
  }));

  // audit
  auto* c_audit = app.add_subcommand("audit", "the tamper-evident audit log");
  c_audit->require_subcommand(1);
  std::vector<std::string> verify_files;
  std::string verify_pubkey;
  auto* c_averify = c_audit->add_subcommand("verify", "check the hash chain and every checkpoint signature");
  c_averify->add_option("FILES", verify_files, "segment files in order (default: the configured log)");
  c_averify->add_option("--pubkey", verify_pubkey, "PEM public key of the audit key (default: from the token)");
  c_averify->callback(run([&] { return custody::cli::AuditVerify(g, verify_files, verify_pubkey); }));
  custody::cli::AuditShowArgs show;
  auto* c_ashow = c_audit->add_subcommand("show", "read the log, filtered");
  c_ashow->add_option("--project", show.project);
  c_ashow->add_option("--principal", show.principal);
  c_ashow->add_option("--since", show.since, "UTC date or time (2026-11-29T10:00), or an age (30m, 12h, 7d)");
  c_ashow->add_option("--action", show.action, "e.g. secret.get");
  c_ashow->callback(run([&] { return custody::cli::AuditShow(g, show); }));
  custody::cli::AuditExportArgs export_args;
  auto* c_aexport = c_audit->add_subcommand("export", "write the records as JSON lines (the file log's format), for a SIEM");
  c_aexport->add_option("--since", export_args.since, "UTC date or time (2026-11-29T10:00), or an age (30m, 12h, 7d)");
  c_aexport->add_option("--node", export_args.node, "only this node's chain (a trail in a PostgreSQL store)");
  c_aexport->add_option("--out", export_args.out, "write to this file (made whole or not at all) instead of stdout");
  c_aexport->callback(run([&] { return custody::cli::AuditExport(g, export_args); }));
  std::optional<std::string> pubkey_out;
  auto* c_apub = c_audit->add_subcommand("pubkey", "export the checkpoint key's public key as PEM");
  c_apub->add_option("--out", pubkey_out, "write to this file instead of stdout");
  c_apub->callback(run([&] { return custody::cli::AuditPubkey(g, pubkey_out); }));
  c_audit->add_subcommand("checkpoint", "sign a checkpoint now (policy admins)")
      ->callback(run([&] { return custody::cli::AuditCheckpoint(g); }));
  custody::cli::AuditPruneArgs prune_args;
  auto* c_aprune = c_audit->add_subcommand(
      "prune", "remove the oldest segments of the file log, once signed and older than --before (policy admins)");
  c_aprune->add_option("--before", prune_args.before, "UTC date or time (2026-09-01), or an age (90d)")->required();
  c_aprune->add_flag("--dry-run", prune_args.dry_run, "say what would go; remove nothing");
  c_aprune->callback(run([&] { return custody::cli::AuditPrune(g, prune_args); }));

  // Now that every subcommand exists (each one's help lists them too).
  AddGlobalOptionsBelow(app, g);
  RefuseEmptyValues(app);

  // Before a subcommand, CLI11 reports an unknown command as "a subcommand is
  // required" and may take an unknown option's value for the command; name
  // the word that is wrong instead.
  int command_at = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--config" || a == "--pin-fd") {
      ++i;
      continue;
    }
    if (a.rfind("-", 0) == 0) {
      if (a == "--json" || a == "--help" || a == "-h" || a == "--version" || a.rfind("--config=", 0) == 0 ||
          a.rfind("--pin-fd=", 0) == 0) {
        continue;
      }
      std::fprintf(stderr, "custody: unknown option '%s' (see 'custody --help')\n",
                   custody::EscapeUntrusted(a).c_str());
      return custody::ExitCode(Category::kUsage);
    }
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
      known = known || sub->check_name(a);
    }
    if (!known) {
      std::fprintf(stderr, "custody: unknown command '%s' (see 'custody --help')\n",
                   custody::EscapeUntrusted(a).c_str());
      return custody::ExitCode(Category::kUsage);
    }
    command_at = i;
    break;
  }

  // exec's command is what follows its "--". CLI11 ends a subcommand at a
  // "--" that no list option (--env) swallows and hands the rest to the top,
  // which refuses it: `custody exec --env K=P/E/S --pin-fd 3 -- cmd` would
  // fail where `custody --pin-fd 3 exec ...` works. So the command is cut
  // off here when "--" follows only exec's options and their values; at any
  // other word the command starts as before (prefix_command above).
  int parse_argc = argc;
  if (command_at > 0 && std::string_view(argv[command_at]) == "exec") {
    for (int i = command_at + 1; i < argc; ++i) {
      std::string_view a = argv[i];
      if (a == "--") {
        exec_after_dashes.emplace(argv + i + 1, argv + argc);
        parse_argc = i;
        break;
      }
      if (a == "--env" || a == "--config" || a == "--pin-fd") {
        ++i;
      } else if (a.empty() || a[0] != '-') {
        break;
      }
    }
  }

  try {
    app.parse(parse_argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // CLI11 quotes the arguments it did not expect: shown escaped.
    std::fprintf(stderr, "custody: %s (see 'custody --help')\n", custody::EscapeUntrusted(e.what(), 1024).c_str());
    return custody::ExitCode(Category::kUsage);
  }
  int code = Report(result);
  if (code == 0 && g.check_failed_exit != 0) return g.check_failed_exit;
  return code;
}
