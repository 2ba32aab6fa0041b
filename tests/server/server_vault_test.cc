// The Vault-compatible API with real clients: Debian's python3-hvac over
// mutual TLS (cert login, read, list, write, renew), curl on the Unix socket
// for every endpoint's shape, field by field, and tokens issued by
// `custody token issue`, revoked and expired. Every request is in the audit
// log under the principal its token speaks for; no token is ever written
// to the log, the audit trail or the store.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "../support/server_fixture.h"

namespace custody::test {
namespace {

using nlohmann::json;

class VaultServerTest : public ServerTest {
 protected:
  std::string ExtraServerConfig() override {
    pki_ = std::make_unique<TempDir>();
    auto ossl = [](const std::vector<std::string>& args) {
      auto r = RunProgram("/usr/bin/openssl", args, {});
      EXPECT_EQ(r.exit_code, 0) << r.err;
    };
    ossl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", P("ca.key"),
          "-out", P("ca.pem"), "-subj", "/CN=vault-test-ca", "-days", "2"});
    auto leaf = [&](const std::string& name, const std::string& ext) {
      WriteFile(P(name + ".ext"), ext + "\n");
      ossl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", P(name + ".key"),
            "-out", P(name + ".csr"), "-subj", "/CN=" + name});
      ossl({"x509", "-req", "-in", P(name + ".csr"), "-CA", P("ca.pem"), "-CAkey", P("ca.key"), "-CAcreateserial",
            "-out", P(name + ".pem"), "-days", "2", "-extfile", P(name + ".ext")});
    };
    leaf("server", "subjectAltName=IP:127.0.0.1,DNS:localhost");
    leaf("web-prod", "subjectAltName=DNS:web-prod.payments.internal\nextendedKeyUsage=clientAuth");
    leaf("deploy", "subjectAltName=DNS:deploy.payments.internal\nextendedKeyUsage=clientAuth");
    leaf("other", "subjectAltName=DNS:other.internal\nextendedKeyUsage=clientAuth");
    port_ = FreePort();
    return "tls_listen = \"127.0.0.1:" + std::to_string(port_) + "\"\ntls_cert = \"" + P("server.pem") +
           "\"\ntls_key = \"" + P("server.key") + "\"\ntls_client_ca = \"" + P("ca.pem") + "\"\n";
  }
  // An owner of payments and a reader of billing, both by certificate.
  void BeforeStart() override {
    auto r = Apply(std::string(kPolicy) + R"(
[principals."svc:deploy"]
tls_san = "deploy.payments.internal"
[principals."svc:other"]
tls_san = "other.internal"
[[projects.payments.grants]]
principal = "svc:deploy"
role = "owner"
[[projects.billing.grants]]
principal = "svc:other"
role = "reader"
)");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  std::string P(const std::string& f) { return *pki_ / f; }

  struct Answer {
    int status = 0;
    json body;
    std::string raw;
  };
  // curl on the Unix socket as `uid`: the status and the parsed body.
  Answer Curl(int uid, const std::string& method, const std::string& target, const std::string& token = "",
              const std::string& data = "") {
    std::vector<std::string> args{"--reuid=" + std::to_string(uid), "--regid=" + std::to_string(uid),
                                  "--clear-groups", "/usr/bin/curl", "-s", "-o", "-", "-w", "\n%{http_code}",
                                  "--unix-socket", socket_, "-X", method};
    if (!token.empty()) args.insert(args.end(), {"-H", "X-Vault-Token: " + token});
    if (!data.empty()) args.insert(args.end(), {"-H", "Content-Type: application/json", "--data-binary", data});
    args.push_back("http://custody" + target);
    auto r = RunProgram("/usr/bin/setpriv", args, {});
    Answer a;
    const size_t nl = r.out.rfind('\n');
    if (nl == std::string::npos) return a;
    a.status = std::atoi(r.out.c_str() + nl + 1);
    a.raw = r.out.substr(0, nl);
    a.body = json::parse(a.raw, nullptr, false);
    return a;
  }
  // The audit records of `principal` (direct mode), oldest first.
  json Records(const std::string& principal) {
    auto r = Cli({"--json", "audit", "show", "--principal", principal});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return json::parse(r.out, nullptr, false);
  }
  // Every file under the state folder and the server log, as one text.
  std::string EverythingWritten() {
    std::string all = ReadFile(token_.dir() / "custodyd.log");
    for (const auto& e : std::filesystem::recursive_directory_iterator(token_.dir().path())) {
      if (e.is_regular_file()) all += ReadFile(e.path());
    }
    return all;
  }
  std::unique_ptr<TempDir> pki_;
  int port_ = 0;
};

TEST_F(VaultServerTest, HvacLogsInReadsListsAndWrites) {
  RunOptions o;
  o.env = {{"VAULT_ADDR", "https://127.0.0.1:" + std::to_string(port_)},
           {"VAULT_CACERT", P("ca.pem")},
           {"PKI", pki_->path()},
           {"EXPECTED_VALUE", kSecret},
           {"PATH", "/usr/bin:/bin"}};
  auto r = RunProgram("/usr/bin/python3", {CUSTODY_SOURCE_DIR "/tests/server/vault_hvac_client.py"}, o);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  for (const char* step : {"ok: cert login as svc:web-prod", "ok: read_secret_version payments prod/stripe v1",
                           "ok: list_secrets payments prod", "ok: a reader's write is Forbidden",
                           "ok: create_or_update_secret by svc:deploy made version 2", "ok: the reader reads version 2",
                           "ok: a write with cas=1 on version 2 is InvalidRequest", "ok: the refused write stored nothing",
                           "ok: a reader's destroy is Forbidden",
                           "ok: destroy_secret_versions [1] by svc:deploy: version 1 destroyed, 2 current",
                           "ok: svc:other cannot read payments", "ok: svc:other reads billing", "ok: renew_self",
                           "ok: an unknown token is Forbidden"}) {
    EXPECT_NE(r.out.find(step), std::string::npos) << "missing step: " << step << "\n" << r.out;
  }
  // Every request of the reader is in the log, under its principal, and
  // (after the login) identified by its token's accessor.
  json recs = Records("svc:web-prod");
  ASSERT_TRUE(recs.is_array()) << recs;
  std::vector<std::string> actions;
  for (const auto& rec : recs) actions.push_back(rec.value("action", ""));
  EXPECT_EQ(actions, (std::vector<std::string>{"token.login", "token.lookup", "secret.get", "secret.list",
                                               "secret.put", "secret.get", "secret.get", "secret.revoke", "token.renew"}))
      << recs.dump(1);
  ASSERT_GE(recs.size(), 7u);
  EXPECT_EQ(recs[0].value("identified_by", "").find("tls client certificate san dns:web-prod.payments.internal"), 0u)
      << recs[0];
  EXPECT_EQ(recs[2].value("identified_by", "").rfind("token ", 0), 0u) << recs[2];
  EXPECT_EQ(recs[4].value("result", ""), "refused") << recs[4];
  json deploy = Records("svc:deploy");
  bool wrote = false;
  for (const auto& rec : deploy) wrote = wrote || (rec.value("action", "") == "secret.put" && rec.value("result", "") == "ok");
  EXPECT_TRUE(wrote) << deploy.dump(1);
  // The unknown token's refusal is recorded too.
  auto refused = Cli({"--json", "audit", "show", "--action", "secret.get"});
  EXPECT_NE(refused.out.find("the access token is unknown"), std::string::npos) << refused.out;
  // The reader's token (the script printed it last) was written nowhere.
  const size_t at = r.err.find("token-of-reader: cst.");
  ASSERT_NE(at, std::string::npos) << r.err;
  const std::string token = r.err.substr(at + 17, 36);
  EXPECT_EQ(EverythingWritten().find(token.substr(4)), std::string::npos) << "the token was written down";
}

TEST_F(VaultServerTest, EveryEndpointHasVaultsShapeFieldByField) {
  // sys/health: Vault's fields, 200 while this node serves.
  auto h = Curl(0, "GET", "/v1/sys/health");
  ASSERT_EQ(h.status, 200) << h.raw;
  EXPECT_EQ(h.body["initialized"], true);
  EXPECT_EQ(h.body["sealed"], false);
  EXPECT_EQ(h.body["standby"], false);
  EXPECT_EQ(h.body["cluster_name"], "custody");
  EXPECT_EQ(h.body["version"].get<std::string>().rfind("custody-", 0), 0u) << h.raw;

  // The mount, as the vault CLI and vault-agent ask for it first.
  auto m = Curl(0, "GET", "/v1/sys/internal/ui/mounts/payments/prod/stripe");
  ASSERT_EQ(m.status, 200) << m.raw;
  EXPECT_EQ(m.body["data"]["type"], "kv");
  EXPECT_EQ(m.body["data"]["options"]["version"], "2");
  EXPECT_EQ(m.body["data"]["path"], "payments/");
  // A user with no grant in payments learns nothing about it.
  EXPECT_EQ(Curl(65534, "GET", "/v1/sys/internal/ui/mounts/payments/prod/stripe").status, 403);
  EXPECT_EQ(Curl(0, "GET", "/v1/sys/internal/ui/mounts/no-such-project/x").status, 403);

  // A read: Vault's envelope, the value under "value".
  const std::regex rfc3339(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)");
  auto g = Curl(0, "GET", "/v1/payments/data/prod/stripe");
  ASSERT_EQ(g.status, 200) << g.raw;
  EXPECT_FALSE(g.body["request_id"].get<std::string>().empty());
  EXPECT_EQ(g.body["lease_id"], "");
  EXPECT_EQ(g.body["renewable"], false);
  EXPECT_EQ(g.body["lease_duration"], 0);
  EXPECT_EQ(g.body["data"]["data"], json({{"value", kSecret}}));
  const json& meta = g.body["data"]["metadata"];
  EXPECT_TRUE(std::regex_match(meta["created_time"].get<std::string>(), rfc3339)) << meta;
  EXPECT_TRUE(meta["custom_metadata"].is_null());
  EXPECT_EQ(meta["deletion_time"], "");
  EXPECT_EQ(meta["destroyed"], false);
  EXPECT_EQ(meta["version"], 1);
  EXPECT_TRUE(g.body["wrap_info"].is_null());
  EXPECT_TRUE(g.body["warnings"].is_null());
  EXPECT_TRUE(g.body["auth"].is_null());

  // A write makes version 2; POST and PUT alike.
  auto w = Curl(0, "POST", "/v1/payments/data/prod/stripe", "", R"({"options":{},"data":{"value":"second"}})");
  ASSERT_EQ(w.status, 200) << w.raw;
  EXPECT_EQ(w.body["data"]["version"], 2);
  EXPECT_EQ(w.body["data"]["destroyed"], false);
  auto w3 = Curl(0, "PUT", "/v1/payments/data/prod/other", "", R"({"data":{"value":"x"}})");
  ASSERT_EQ(w3.status, 200) << w3.raw;
  EXPECT_EQ(w3.body["data"]["version"], 1);
  // Not one value under "value": refused, with Vault's error body.
  auto bad = Curl(0, "POST", "/v1/payments/data/prod/stripe", "", R"({"data":{"user":"a","password":"b"}})");
  EXPECT_EQ(bad.status, 400) << bad.raw;
  ASSERT_TRUE(bad.body["errors"].is_array()) << bad.raw;
  EXPECT_NE(bad.body["errors"][0].get<std::string>().find("one value per secret"), std::string::npos) << bad.raw;
  // Check-and-set, as Vault's: cas = the newest version, or 0 for none yet.
  // A mismatch is a 400 with Vault's words and stores nothing.
  auto stale = Curl(0, "POST", "/v1/payments/data/prod/stripe", "", R"({"options":{"cas":1},"data":{"value":"x"}})");
  EXPECT_EQ(stale.status, 400) << stale.raw;
  ASSERT_TRUE(stale.body["errors"].is_array()) << stale.raw;
  EXPECT_NE(stale.body["errors"][0].get<std::string>().find("check-and-set parameter did not match the current version"),
            std::string::npos) << stale.raw;
  EXPECT_NE(stale.body["errors"][0].get<std::string>().find("is at v2, not v1"), std::string::npos) << stale.raw;
  auto taken = Curl(0, "POST", "/v1/payments/data/prod/other", "", R"({"options":{"cas":0},"data":{"value":"x"}})");
  EXPECT_EQ(taken.status, 400) << taken.raw;
  auto next = Curl(0, "POST", "/v1/payments/data/prod/other", "", R"({"options":{"cas":1},"data":{"value":"y"}})");
  ASSERT_EQ(next.status, 200) << next.raw;
  EXPECT_EQ(next.body["data"]["version"], 2);
  auto fresh = Curl(0, "POST", "/v1/payments/data/prod/fresh", "", R"({"options":{"cas":0},"data":{"value":"z"}})");
  ASSERT_EQ(fresh.status, 200) << fresh.raw;
  EXPECT_EQ(fresh.body["data"]["version"], 1);
  for (const char* body : {R"({"options":{"cas":-1},"data":{"value":"x"}})", R"({"options":{"cas":"2"},"data":{"value":"x"}})",
                           R"({"options":{"cas":4294967296},"data":{"value":"x"}})"}) {
    auto badcas = Curl(0, "POST", "/v1/payments/data/prod/other", "", body);
    EXPECT_EQ(badcas.status, 400) << body << ": " << badcas.raw;
    EXPECT_NE(badcas.raw.find("options.cas must be a version number"), std::string::npos) << badcas.raw;
  }
  auto after = Curl(0, "GET", "/v1/payments/data/prod/other");
  ASSERT_EQ(after.status, 200) << after.raw;
  EXPECT_EQ(after.body["data"]["metadata"]["version"], 2) << "a refused check-and-set stored a version";

  // Metadata: versions, never values.
  auto md = Curl(0, "GET", "/v1/payments/metadata/prod/stripe");
  ASSERT_EQ(md.status, 200) << md.raw;
  EXPECT_EQ(md.body["data"]["current_version"], 2);
  EXPECT_EQ(md.body["data"]["oldest_version"], 1);
  EXPECT_EQ(md.body["data"]["versions"].size(), 2u);
  EXPECT_EQ(md.body["data"]["versions"]["1"]["destroyed"], false);
  EXPECT_EQ(md.raw.find(kSecret), std::string::npos);
  EXPECT_EQ(md.raw.find("second"), std::string::npos);

  // LIST, both spellings; the mount's root lists environments.
  auto l1 = Curl(0, "LIST", "/v1/payments/metadata/prod");
  ASSERT_EQ(l1.status, 200) << l1.raw;
  EXPECT_EQ(l1.body["data"]["keys"], json({"fresh", "other", "stripe"}));
  auto l2 = Curl(0, "GET", "/v1/payments/metadata/prod/?list=true");
  EXPECT_EQ(l2.body["data"]["keys"], json({"fresh", "other", "stripe"})) << l2.raw;
  auto root = Curl(0, "LIST", "/v1/payments/metadata/");
  EXPECT_EQ(root.body["data"]["keys"], json({"prod/"})) << root.raw;
  // Nobody reads billing only: payments lists nothing for them.
  EXPECT_EQ(Curl(65534, "LIST", "/v1/payments/metadata/prod").status, 403);

  // A revoked version reads as a destroyed one: 404, metadata, no data.
  ASSERT_EQ(Cli({"secret", "revoke", "payments/prod/stripe", "--version", "1", "--reason", "leaked"}).exit_code, 0);
  auto gone = Curl(0, "GET", "/v1/payments/data/prod/stripe?version=1");
  ASSERT_EQ(gone.status, 404) << gone.raw;
  EXPECT_TRUE(gone.body["data"]["data"].is_null()) << gone.raw;
  EXPECT_EQ(gone.body["data"]["metadata"]["destroyed"], true);
  EXPECT_EQ(gone.body["data"]["metadata"]["version"], 1);
  EXPECT_TRUE(std::regex_match(gone.body["data"]["metadata"]["deletion_time"].get<std::string>(), rfc3339)) << gone.raw;
  EXPECT_EQ(gone.raw.find(kSecret), std::string::npos);
  EXPECT_EQ(Curl(0, "GET", "/v1/payments/metadata/prod/stripe").body["data"]["versions"]["1"]["destroyed"], true);

  // Refusals and the unknown: Vault's codes and its error body.
  auto denied = Curl(65534, "GET", "/v1/payments/data/prod/stripe");
  EXPECT_EQ(denied.status, 403) << denied.raw;
  EXPECT_TRUE(denied.body["errors"].is_array()) << denied.raw;
  auto missing = Curl(0, "GET", "/v1/payments/data/prod/nothing");
  EXPECT_EQ(missing.status, 404);
  EXPECT_EQ(missing.body, json({{"errors", json::array()}})) << missing.raw;
  for (const auto& [method, target] : std::vector<std::pair<std::string, std::string>>{
           {"GET", "/v1/sys/mounts"}, {"GET", "/v1/auth/approle/login"}, {"POST", "/v1/payments/undelete/prod/stripe"},
           {"DELETE", "/v1/payments/data/prod/stripe"}}) {
    auto a = Curl(0, method, target);
    EXPECT_TRUE(a.status == 404 || a.status == 405) << method << " " << target << ": " << a.status << " " << a.raw;
    EXPECT_TRUE(a.body.contains("errors")) << method << " " << target << ": " << a.raw;
  }
  // A mount that is no project: 403 "permission denied", as Vault answers a
  // path no policy grants; and a caller with no grant in a project that
  // exists gets the very same answer, so no project name can be probed.
  auto no_mount = Curl(0, "GET", "/v1/no-such/data/prod/x");
  EXPECT_EQ(no_mount.status, 403) << no_mount.raw;
  EXPECT_EQ(no_mount.body, json({{"errors", {"permission denied"}}})) << no_mount.raw;
  for (const char* kind : {"data", "metadata"}) {
    auto exists = Curl(65534, "GET", std::string("/v1/payments/") + kind + "/prod/stripe");
    auto absent = Curl(65534, "GET", std::string("/v1/no-such/") + kind + "/prod/stripe");
    EXPECT_EQ(exists.status, 403) << exists.raw;
    EXPECT_EQ(exists.raw, absent.raw) << kind;
  }
  EXPECT_EQ(Curl(65534, "GET", "/v1/sys/internal/ui/mounts/payments").raw,
            Curl(65534, "GET", "/v1/sys/internal/ui/mounts/no-such").raw);
  // The audit record keeps the reason the answer leaves out.
  auto why = Cli({"--json", "audit", "show", "--action", "secret.get"});
  EXPECT_NE(why.out.find("project 'no-such' is not in the policy"), std::string::npos) << why.out;
  // HEAD /v1/sys/health (a balancer's probe) has no body: the next answer
  // on the same connection is read cleanly.
  const std::string two = Raw(socket_, "HEAD /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n"
                                       "GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  const size_t second = two.find("HTTP/1.1 200", 1);
  ASSERT_NE(second, std::string::npos) << two;
  EXPECT_EQ(two.substr(0, second).find("initialized"), std::string::npos) << two;
  EXPECT_NE(two.substr(second).find("\"initialized\":true"), std::string::npos) << two;
  // Cert login needs a certificate: on the Unix socket it is refused.
  auto login = Curl(0, "POST", "/v1/auth/cert/login", "", "{}");
  EXPECT_EQ(login.status, 400) << login.raw;
  // Still serving, and every request of the test above was recorded.
  EXPECT_EQ(Curl(0, "GET", "/v1/sys/health").status, 200);
  EXPECT_EQ(Cli({"audit", "verify"}).exit_code, 0);
}

TEST_F(VaultServerTest, AnIssuedTokenSpeaksForItsPrincipalUntilRevokedOrExpired) {
  // `custody token issue` (root is a policy admin) prints the token once.
  auto issued = Cli({"token", "issue", "--principal", "svc:web-prod", "--ttl", "1h"});
  ASSERT_EQ(issued.exit_code, 0) << issued.err;
  const std::string token = issued.out.substr(0, issued.out.find('\n'));
  ASSERT_EQ(token.size(), 36u) << issued.out;
  EXPECT_NE(issued.err.find("accessor "), std::string::npos) << issued.err;
  // nobody (uid 65534) reads billing only, but with the token it is svc:web-prod.
  EXPECT_EQ(Curl(65534, "GET", "/v1/payments/data/prod/stripe").status, 403);
  auto g = Curl(65534, "GET", "/v1/payments/data/prod/stripe", token);
  ASSERT_EQ(g.status, 200) << g.raw;
  EXPECT_EQ(g.body["data"]["data"]["value"], kSecret);
  // The native API takes the token too.
  auto native = Curl(65534, "GET", "/v1/secrets/payments/prod/stripe", token);
  EXPECT_EQ(native.status, 200) << native.raw;
  EXPECT_EQ(native.body["value"], kSecret);
  // lookup-self: who the token is, never the token itself.
  auto self = Curl(65534, "GET", "/v1/auth/token/lookup-self", token);
  ASSERT_EQ(self.status, 200) << self.raw;
  EXPECT_EQ(self.body["data"]["meta"]["principal"], "svc:web-prod");
  EXPECT_GT(self.body["data"]["ttl"].get<int>(), 3500);
  EXPECT_EQ(self.raw.find(token), std::string::npos);
  auto renewed = Curl(65534, "POST", "/v1/auth/token/renew-self", token, R"({"increment":"10m"})");
  ASSERT_EQ(renewed.status, 200) << renewed.raw;
  EXPECT_EQ(renewed.body["auth"]["lease_duration"], 600);
  // The record names the principal and the transport under the token.
  json recs = Records("svc:web-prod");
  ASSERT_TRUE(recs.is_array() && !recs.empty());
  bool found = false;
  for (const auto& rec : recs) {
    const std::string by = rec.value("identified_by", "");
    found = found || (rec.value("action", "") == "secret.get" && by.rfind("token ", 0) == 0 &&
                      by.find("uid 65534") != std::string::npos);
  }
  EXPECT_TRUE(found) << recs.dump(1);

  // Revoked: refused on the next request after the one-second cache.
  auto list = Cli({"--json", "token", "list"});
  json tokens = json::parse(list.out, nullptr, false);
  ASSERT_TRUE(tokens.is_array() && tokens.size() == 1) << list.out;
  EXPECT_EQ(list.out.find(token), std::string::npos);
  ASSERT_EQ(Cli({"token", "revoke", "--accessor", tokens[0]["accessor"]}).exit_code, 0);
  Answer after;
  for (int i = 0; i < 30; ++i) {
    after = Curl(65534, "GET", "/v1/payments/data/prod/stripe", token);
    if (after.status == 403) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_EQ(after.status, 403) << after.raw;
  EXPECT_NE(after.raw.find("was revoked"), std::string::npos) << after.raw;
  EXPECT_EQ(Cli({"token", "revoke", "--accessor", tokens[0]["accessor"]}).exit_code, 66) << "revoked twice";

  // Expired: a one-second token, two seconds later.
  auto brief = Cli({"token", "issue", "--principal", "svc:web-prod", "--ttl", "1s"});
  ASSERT_EQ(brief.exit_code, 0) << brief.err;
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));
  auto expired = Curl(65534, "GET", "/v1/payments/data/prod/stripe", brief.out.substr(0, 36));
  EXPECT_EQ(expired.status, 403);
  EXPECT_NE(expired.raw.find("has expired"), std::string::npos) << expired.raw;
  // A token for someone the policy does not know is not issued; bad input is 64.
  auto nobody = Cli({"token", "issue", "--principal", "svc:ghost"});
  EXPECT_EQ(nobody.exit_code, 66) << nobody.err;
  EXPECT_EQ(Cli({"token", "issue", "--principal", "svc:web-prod", "--ttl", "forever"}).exit_code, 64);
  EXPECT_EQ(Cli({"token", "revoke", "--accessor", "not-hex"}).exit_code, 64);
  EXPECT_EQ(Cli({"token", "issue", "--principal", "svc:web-prod", "--max-ttl", ""}).exit_code, 64);
  // No token in the log, the audit trail or the store.
  EXPECT_EQ(EverythingWritten().find(token.substr(4)), std::string::npos) << "the token was written down";
}

// One kept-alive connection, the token on its first request only: the
// second request is the transport's peer again (nobody reads payments),
// never the token's principal.
TEST_F(VaultServerTest, ATokenSpeaksForOneRequestNotForTheConnection) {
  auto issued = Cli({"token", "issue", "--principal", "svc:web-prod", "--ttl", "1h"});
  ASSERT_EQ(issued.exit_code, 0) << issued.err;
  const std::string token = issued.out.substr(0, 36);
  const std::string url = "http://custody/v1/payments/data/prod/stripe";
  auto r = RunProgram("/usr/bin/setpriv",
                      {"--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/curl", "-s", "-o", "/dev/null",
                       "-w", "%{http_code} %{num_connects}\n", "--unix-socket", socket_, "-H",
                       "X-Vault-Token: " + token, url, "--next", "-s", "-o", "/dev/null", "-w",
                       "%{http_code} %{num_connects}\n", "--unix-socket", socket_, url},
                      {});
  // 200 on a new connection, then 403 on the same one (no new connect).
  EXPECT_EQ(r.out, "200 1\n403 0\n") << r.out << r.err;
}

// A policy that drops a principal revokes its tokens: bringing the name
// back later does not revive them. A header that is not a token's shape is
// refused without a store query or a record of its own.
TEST_F(VaultServerTest, APolicyThatDropsAPrincipalRevokesItsTokens) {
  auto issued = Cli({"token", "issue", "--principal", "svc:deploy", "--ttl", "1h"});
  ASSERT_EQ(issued.exit_code, 0) << issued.err;
  const std::string token = issued.out.substr(0, 36);
  ASSERT_EQ(Curl(65534, "GET", "/v1/payments/data/prod/stripe", token).status, 200);
  auto dropped = Apply(kPolicy);
  ASSERT_EQ(dropped.exit_code, 0) << dropped.err;
  EXPECT_NE(dropped.out.find("revoked 1 access token(s) of principals no longer in the policy"), std::string::npos)
      << dropped.out;
  BeforeStart();  // svc:deploy is back
  // (Until this node's one-second cache of the token passes, the refusal
  // may still be the policy's "permission denied".)
  Answer after;
  for (int i = 0; i < 30; ++i) {
    after = Curl(65534, "GET", "/v1/payments/data/prod/stripe", token);
    if (after.raw.find("was revoked") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(after.status, 403) << after.raw;
  EXPECT_NE(after.raw.find("was revoked"), std::string::npos) << after.raw;

  const size_t before = AuditCount("secret.get");
  auto junk = Curl(65534, "GET", "/v1/payments/data/prod/stripe", "hvs.CAESIJunkJunkJunk");
  EXPECT_EQ(junk.status, 403) << junk.raw;
  EXPECT_NE(junk.raw.find("not a custody access token"), std::string::npos) << junk.raw;
  EXPECT_EQ(AuditCount("secret.get"), before) << "a malformed token cost a durable record";
}

// tls_client_certificate = "optional": a Vault client with a token and no
// certificate reads over TLS; without a token it is nobody; a certificate
// it does send must still chain to the CA.
// custody's revoke over its own API: POST {"revoke": N, "reason": ...} on
// the secret, for principals the policy lets rotate. The version is never
// readable again, the one before it becomes current, and the record (with
// the reason) is written before the store changes.
TEST_F(VaultServerTest, APostRevokesAVersionForGoodForThoseWhoMayRotate) {
  auto put = Curl(0, "PUT", "/v1/secrets/payments/prod/stripe", "", R"({"value":"second-value"})");
  ASSERT_EQ(put.status, 201) << put.raw;
  // A reader of billing only, and bodies that do not say what to do: refused,
  // nothing changed.
  const std::string target = "/v1/secrets/payments/prod/stripe";
  auto denied = Curl(65534, "POST", target, "", R"({"revoke":1,"reason":"leaked"})");
  EXPECT_EQ(denied.status, 403) << denied.raw;
  for (const std::string& body : {std::string(R"({"reason":"leaked"})"), std::string(R"({"revoke":0,"reason":"x"})"),
                                  std::string(R"({"revoke":"1","reason":"x"})"), std::string(R"({"revoke":1})"),
                                  std::string(R"({"revoke":1,"reason":""})"),
                                  std::string("{\"revoke\":1,\"reason\":\"a\\u001b[31mb\"}"),
                                  std::string(R"({"revoke":1,"reason":")") + std::string(501, 'r') + "\"}",
                                  std::string("not json")}) {
    auto bad = Curl(0, "POST", target, "", body);
    EXPECT_EQ(bad.status, 400) << body << ": " << bad.raw;
    EXPECT_EQ(bad.raw.find("\x1b"), std::string::npos) << bad.raw;
  }
  EXPECT_EQ(Curl(0, "GET", target + "?version=1").status, 200) << "a refused revoke changed something";
  // An owner revokes version 2, the current one: version 1 is current again.
  auto ok = Curl(0, "POST", target, "", R"({"revoke":2,"reason":"pasted into a CI log"})");
  ASSERT_EQ(ok.status, 200) << ok.raw;
  EXPECT_EQ(ok.body, json({{"path", "payments/prod/stripe"}, {"revoked", 2}, {"current_version", 1}})) << ok.raw;
  auto v2 = Curl(0, "GET", target + "?version=2");
  EXPECT_EQ(v2.status, 403) << v2.raw;
  EXPECT_NE(v2.raw.find("revoked"), std::string::npos) << v2.raw;
  EXPECT_EQ(v2.raw.find("second-value"), std::string::npos) << v2.raw;
  auto now = Curl(0, "GET", target);
  ASSERT_EQ(now.status, 200) << now.raw;
  EXPECT_EQ(now.body["version"], 1) << now.raw;
  // Once only; a version that never was is not found.
  auto again = Curl(0, "POST", target, "", R"({"revoke":2,"reason":"again"})");
  EXPECT_EQ(again.status, 400) << again.raw;
  EXPECT_NE(again.raw.find("version 2 of payments/prod/stripe was already revoked at "), std::string::npos) << again.raw;
  EXPECT_EQ(Curl(0, "POST", target, "", R"({"revoke":9,"reason":"x"})").status, 404);
  // The records: one per request, the reason in the successful one.
  auto recs = Cli({"--json", "audit", "show", "--action", "secret.revoke"});
  ASSERT_EQ(recs.exit_code, 0) << recs.err;
  json all = json::parse(recs.out, nullptr, false);
  ASSERT_TRUE(all.is_array()) << recs.out;
  size_t ok_records = 0, refused = 0;
  for (const auto& r : all) {
    if (r.value("result", "") == "ok") {
      ++ok_records;
      EXPECT_NE(r.value("detail", "").find("reason: pasted into a CI log"), std::string::npos) << r;
      EXPECT_EQ(r.value("version", 0), 2) << r;
      EXPECT_EQ(r.value("principal", ""), "user:root") << r;
    } else {
      ++refused;
    }
  }
  EXPECT_EQ(ok_records, 1u) << all.dump(1);
  EXPECT_EQ(refused, 3u) << "the reader's, the second and the unknown version's: " << all.dump(1);
  EXPECT_EQ(Cli({"audit", "verify"}).exit_code, 0);
}

// Vault's destroy is custody's revoke: {"versions": [...]} withdrawn for
// good, 204 as Vault answers, idempotent as in Vault; one record per version.
TEST_F(VaultServerTest, DestroyWithdrawsVersionsForGoodAsRevokeDoes) {
  auto put = Curl(0, "PUT", "/v1/secrets/payments/prod/stripe", "", R"({"value":"second-value"})");
  ASSERT_EQ(put.status, 201) << put.raw;
  const std::string destroy = "/v1/payments/destroy/prod/stripe";
  EXPECT_EQ(Curl(65534, "POST", destroy, "", R"({"versions":[1]})").status, 403);
  for (const std::string& body : {std::string("{}"), std::string(R"({"versions":[]})"), std::string(R"({"versions":[0]})"),
                                  std::string(R"({"versions":["1"]})"), std::string(R"({"versions":1})"),
                                  std::string("nope")}) {
    auto bad = Curl(0, "POST", destroy, "", body);
    EXPECT_EQ(bad.status, 400) << body << ": " << bad.raw;
    EXPECT_TRUE(bad.body.contains("errors")) << bad.raw;
  }
  EXPECT_EQ(Curl(0, "GET", destroy).status, 405);
  auto gone = Curl(0, "POST", destroy, "", R"({"versions":[1]})");
  EXPECT_EQ(gone.status, 204) << gone.raw;
  EXPECT_EQ(gone.raw, "");
  auto meta = Curl(0, "GET", "/v1/payments/metadata/prod/stripe");
  EXPECT_EQ(meta.body["data"]["versions"]["1"]["destroyed"], true) << meta.raw;
  EXPECT_EQ(meta.body["data"]["versions"]["2"]["destroyed"], false) << meta.raw;
  EXPECT_EQ(meta.body["data"]["current_version"], 2) << meta.raw;
  EXPECT_EQ(Curl(0, "GET", "/v1/payments/data/prod/stripe?version=1").status, 404);
  EXPECT_EQ(Curl(0, "GET", "/v1/payments/data/prod/stripe").body["data"]["data"]["value"], "second-value");
  // Again: nothing to do, 204, and said so in its record.
  EXPECT_EQ(Curl(0, "POST", destroy, "", R"({"versions":[1]})").status, 204);
  // Versions 2 and 9: 9 never was, so nothing is destroyed, and the
  // answer names it (Vault's 404 would carry no words).
  auto none = Curl(0, "POST", destroy, "", R"({"versions":[9,2]})");
  EXPECT_EQ(none.status, 400) << none.raw;
  EXPECT_EQ(none.body, json({{"errors", {"version 9 of payments/prod/stripe does not exist; nothing was revoked"}}}))
      << none.raw;
  EXPECT_EQ(Curl(0, "GET", "/v1/payments/data/prod/stripe").body["data"]["data"]["value"], "second-value");
  // Then 2 alone: no version is left to read.
  EXPECT_EQ(Curl(0, "POST", destroy, "", R"({"versions":[2]})").status, 204);
  EXPECT_EQ(Curl(0, "GET", "/v1/payments/data/prod/stripe").status, 404) << "no version is left to read";
  auto recs = Cli({"--json", "audit", "show", "--action", "secret.revoke"});
  ASSERT_EQ(recs.exit_code, 0) << recs.err;
  json all = json::parse(recs.out, nullptr, false);
  ASSERT_TRUE(all.is_array()) << recs.out;
  std::vector<std::string> seen;
  for (const auto& r : all) {
    const std::string d = r.value("detail", "");
    seen.push_back(r.value("result", "") + " v" + std::to_string(r.value("version", 0)) +
                   (d.find("already revoked") != std::string::npos ? " already" : "") +
                   (d.find("reason: destroyed through the Vault API") != std::string::npos ? " vault" : ""));
    if (r.value("result", "") == "ok") {
      EXPECT_NE(d.find("vault-api"), std::string::npos) << r;
    }
  }
  EXPECT_EQ(seen, (std::vector<std::string>{"refused v1", "ok v1 vault", "ok v1 already", "error v2", "ok v2 vault"}))
      << all.dump(1);
  EXPECT_EQ(Cli({"audit", "verify"}).exit_code, 0);
}

class VaultOptionalCertServerTest : public VaultServerTest {
 protected:
  std::string ExtraServerConfig() override {
    return VaultServerTest::ExtraServerConfig() + "tls_client_certificate = \"optional\"\n";
  }
  RunResult Https(const std::vector<std::string>& extra, const std::string& target) {
    std::vector<std::string> args{"-s", "-o", "-", "-w", "\n%{http_code}", "--cacert", P("ca.pem")};
    args.insert(args.end(), extra.begin(), extra.end());
    args.push_back("https://127.0.0.1:" + std::to_string(port_) + target);
    return RunProgram("/usr/bin/curl", args, {});
  }
};

TEST_F(VaultOptionalCertServerTest, ATokenAloneReadsOverTlsAndNothingElseDoes) {
  auto issued = Cli({"token", "issue", "--principal", "svc:web-prod", "--ttl", "1h"});
  ASSERT_EQ(issued.exit_code, 0) << issued.err;
  const std::string token = issued.out.substr(0, 36);
  auto ok = Https({"-H", "X-Vault-Token: " + token}, "/v1/payments/data/prod/stripe");
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.out.find(kSecret), std::string::npos) << ok.out;
  EXPECT_EQ(ok.out.substr(ok.out.size() - 3), "200") << ok.out;
  auto none = Https({}, "/v1/payments/data/prod/stripe");
  EXPECT_EQ(none.out.substr(none.out.size() - 3), "403") << none.out;
  EXPECT_EQ(none.out.find(kSecret), std::string::npos);
  auto login = Https({"-X", "POST", "-d", "{}"}, "/v1/auth/cert/login");
  EXPECT_EQ(login.out.substr(login.out.size() - 3), "400") << login.out;
  // A certificate from another CA is still refused at the handshake.
  auto ossl = [](const std::vector<std::string>& args) { return RunProgram("/usr/bin/openssl", args, {}).exit_code; };
  ASSERT_EQ(ossl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                  P("rogue.key"), "-out", P("rogue.pem"), "-subj", "/CN=rogue", "-days", "2"}),
            0);
  auto rogue = Https({"--cert", P("rogue.pem"), "--key", P("rogue.key"), "-H", "X-Vault-Token: " + token},
                     "/v1/payments/data/prod/stripe");
  EXPECT_NE(rogue.exit_code, 0) << rogue.out;
  EXPECT_EQ(rogue.out.find(kSecret), std::string::npos);
  // The record says how the token came.
  auto show = Cli({"--json", "audit", "show", "--principal", "svc:web-prod", "--action", "secret.get"});
  EXPECT_NE(show.out.find("via tls client without a certificate"), std::string::npos) << show.out;
}

}  // namespace
}  // namespace custody::test
