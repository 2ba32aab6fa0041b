#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "../support/testenv.h"
#include "custody/app/config.h"

namespace custody::core {
namespace {

Config Sample(const test::TempDir& dir) {
  Config c;
  c.state_dir = dir / "state";
  c.token.pkcs11.module = "/usr/lib/softhsm/libsofthsm2.so";
  c.token.pkcs11.uri = "pkcs11:token=custody";
  c.token.pin_file = dir / "pin";
  c.token.environment = {{"SOFTHSM2_CONF", dir / "softhsm2.conf"}};
  c.store.path = dir / "state/custody.db";
  return c;
}

TEST(Config, WriteThenLoadRoundTripsAndIsPrivate) {
  test::TempDir dir;
  Config c = Sample(dir);
  std::string path = dir / "custody.toml";
  ASSERT_TRUE(WriteConfig(c, path).ok());
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto back = LoadConfig(path);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->token.pkcs11.module, c.token.pkcs11.module);
  EXPECT_EQ(back->token.pkcs11.uri, c.token.pkcs11.uri);
  EXPECT_EQ(back->token.pin_file, c.token.pin_file);
  EXPECT_EQ(back->store.path, c.store.path);
  EXPECT_EQ(back->token.environment, c.token.environment);
}

// The example config the package installs (dist/custody.toml.example)
// loads, and says what its comments say.
TEST(Config, TheInstalledExampleConfigLoads) {
  auto c = LoadConfig(std::string(CUSTODY_SOURCE_DIR) + "/dist/custody.toml.example");
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->state_dir, "/var/lib/custody");
  EXPECT_EQ(c->token.backend, "pkcs11");
  EXPECT_EQ(c->token.pkcs11.uri, "pkcs11:token=custody");
  EXPECT_EQ(c->token.pin_file, std::optional<std::string>("/etc/custody/pin"));
  EXPECT_EQ(c->token.call_timeout_ms, 5000);
  EXPECT_EQ(c->server.socket_path, "/run/custody/custody.sock");
  EXPECT_EQ(c->store.path, "/var/lib/custody/custody.db");
  EXPECT_EQ(c->node.name, "custody-1");
}

// Every example config that loads is written by WriteConfig and loads back
// equal: nothing a config says is dropped when custody writes one.
TEST(Config, EveryExampleConfigWritesAndLoadsBackEqual) {
  int loaded = 0;
  for (const auto& e : std::filesystem::directory_iterator(std::string(CUSTODY_SOURCE_DIR) + "/fuzz/corpus/config")) {
    auto c = LoadConfig(e.path().string());
    if (!c.ok()) continue;  // the corpus also holds configs that must be refused
    ++loaded;
    test::TempDir dir;
    ASSERT_TRUE(WriteConfig(*c, dir / "custody.toml").ok()) << e.path();
    auto back = LoadConfig(dir / "custody.toml");
    ASSERT_TRUE(back.ok()) << e.path() << ": " << back.error().message();
    EXPECT_TRUE(*back == *c) << e.path() << " changed when written:\n" << test::ReadFile(dir / "custody.toml");
    EXPECT_EQ(back->server.socket_path, c->server.socket_path) << e.path();
    EXPECT_EQ(back->audit.segment_bytes, c->audit.segment_bytes) << e.path();
  }
  EXPECT_GE(loaded, 3) << "the examples were not found";
  // And one with every [server] setting away from its default.
  test::TempDir dir;
  Config c = Sample(dir);
  c.audit.dir = dir / "audit";
  c.audit.segment_bytes = 4096;
  c.audit.gather = std::chrono::microseconds(0);
  c.server.socket_path = dir / "custody.sock";
  c.server.socket_mode = 0660;
  c.server.threads = 3;
  c.server.max_connections = 9;
  c.server.max_connections_per_peer = 4;
  c.server.max_unidentified_connections = 2;
  c.server.refusal_summary_seconds = 5;
  c.server.metrics_uids = {9100, 0};
  c.server.metrics_tls_sans = {"dns:prometheus.internal", "uri:spiffe://x/y"};
  c.server.tls_listen = "127.0.0.1:8443";
  c.server.tls_cert = dir / "c.pem";
  c.server.tls_key = dir / "k.pem";
  c.server.tls_client_ca = dir / "ca.pem";
  c.node = {"node-7.eu", true};
  c.audit.node = "node-7.eu";  // what LoadConfig derives from it
  ASSERT_TRUE(WriteConfig(c, dir / "all.toml").ok());
  auto back = LoadConfig(dir / "all.toml");
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_TRUE(*back == c) << test::ReadFile(dir / "all.toml");
  // A config with the server's defaults has no [server] table to collide
  // with one an operator appends.
  ASSERT_TRUE(WriteConfig(Sample(dir), dir / "plain.toml").ok());
  EXPECT_EQ(test::ReadFile(dir / "plain.toml").find("[server]"), std::string::npos);
}

// Without [node] the node is the host; a bad name (given, or the host's) is
// refused naming the fix; a TPM backend with a PostgreSQL store is refused
// at load, saying why.
TEST(Config, TheNodeNameDefaultsToTheHostAndIsChecked) {
  test::TempDir dir;
  ASSERT_TRUE(WriteConfig(Sample(dir), dir / "plain.toml").ok());
  EXPECT_EQ(test::ReadFile(dir / "plain.toml").find("[node]"), std::string::npos) << "a copied config must not pin a host";
  auto plain = LoadConfig(dir / "plain.toml");
  ASSERT_TRUE(plain.ok()) << plain.error().message();
  char host[256] = {};
  ASSERT_EQ(::gethostname(host, sizeof host - 1), 0);
  EXPECT_EQ(plain->node.name, host);
  EXPECT_FALSE(plain->node.named);
  EXPECT_EQ(plain->audit.node, host);

  const std::string base = test::ReadFile(dir / "plain.toml");
  for (const char* bad : {"\"\"", "\"-lead\"", "\"a b\"", "\"n\\u00e9\"", "7"}) {
    test::WriteFile(dir / "bad.toml", base + "\n[node]\nname = " + bad + "\n");
    auto r = LoadConfig(dir / "bad.toml");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().category(), Category::kConfig) << bad;
    EXPECT_EQ(r.error().exit_code(), 78);
  }
  test::WriteFile(dir / "long.toml", base + "\n[node]\nname = \"" + std::string(64, 'n') + "\"\n");
  auto long_name = LoadConfig(dir / "long.toml");
  ASSERT_FALSE(long_name.ok());
  EXPECT_NE(long_name.error().message().find("at most 63"), std::string::npos) << long_name.error().message();

  Config tpm = Sample(dir);
  tpm.token.backend = "tpm";
  tpm.token.tpm.tcti = "swtpm:port=2321";
  tpm.store = {.path = "", .url = "host=/tmp dbname=custody"};
  ASSERT_TRUE(WriteConfig(tpm, dir / "tpm-pg.toml").ok());
  auto refused = LoadConfig(dir / "tpm-pg.toml");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().exit_code(), 78);
  EXPECT_NE(refused.error().message().find("cannot be unsealed by any other node"), std::string::npos)
      << refused.error().message();
  EXPECT_EQ(CheckConfigCoherence(tpm).ok(), false);
  tpm.store = {.path = dir / "state/custody.db", .url = ""};
  EXPECT_TRUE(CheckConfigCoherence(tpm).ok()) << "the TPM with a SQLite store is the one-host deployment";
}

TEST(Config, SyntaxErrorNamesFileLineAndColumn) {
  test::TempDir dir;
  std::string path = dir / "bad.toml";
  test::WriteFile(path, "state_dir = \"/x\"\n[token\nmodule = 1\n");
  auto r = LoadConfig(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kConfig);
  EXPECT_NE(r.error().message().find(path + ":2:"), std::string::npos) << r.error().message();
}

TEST(Config, MissingOrMistypedKeysAreConfigErrors) {
  test::TempDir dir;
  std::string path = dir / "c.toml";
  test::WriteFile(path, "state_dir = \"/x\"\n[token]\nmodule = 5\nuri = \"pkcs11:\"\n[store]\npath = \"/x/db\"\n");
  auto r = LoadConfig(path);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find(path + ":3:"), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("token.module"), std::string::npos);

  test::WriteFile(path, "state_dir = \"/x\"\n[token]\nmodule = \"/m.so\"\nuri = \"pkcs11:\"\n");
  r = LoadConfig(path);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("[store]"), std::string::npos);

  EXPECT_EQ(LoadConfig(dir / "missing.toml").error().category(), Category::kConfig);
}

// [token] call_timeout: written back when it is not the default, and
// refused (naming the key and the range) outside 100 ms to 10 minutes.
TEST(Config, ATokenCallTimeoutIsKeptAndChecked) {
  test::TempDir dir;
  Config c = Sample(dir);
  c.token.call_timeout_ms = 1500;
  std::string path = dir / "custody.toml";
  ASSERT_TRUE(WriteConfig(c, path).ok());
  auto back = LoadConfig(path);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->token.call_timeout_ms, 1500);
  EXPECT_EQ(Config{}.token.call_timeout_ms, 5000) << "the default";
  for (const std::string bad : {"0", "99", "600001", "\"5s\"", "-1"}) {
    test::WriteFile(path, "state_dir = \"/x\"\n[token]\nmodule = \"/m.so\"\nuri = \"pkcs11:\"\ncall_timeout = " + bad +
                              "\n[store]\npath = \"/x/db\"\n");
    auto r = LoadConfig(path);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().category(), Category::kConfig);
    EXPECT_NE(r.error().message().find(path + ":5:"), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find("token.call_timeout must be 100 to 600000"), std::string::npos)
        << r.error().message();
  }
}

// [audit] group_commit_us: 0 (off) to 100000, kept when written; anything
// else refused naming the key, its place and the range.
TEST(Config, AGroupCommitHoldIsKeptAndChecked) {
  test::TempDir dir;
  const std::string path = dir / "custody.toml";
  EXPECT_EQ(Config{}.audit.gather, std::chrono::microseconds(500)) << "the default";
  const std::string head = "state_dir = \"/x\"\n[token]\nmodule = \"/m.so\"\nuri = \"pkcs11:\"\n[store]\npath = \"/x/db\"\n"
                           "[audit]\ngroup_commit_us = ";
  for (const auto& [text, us] : std::vector<std::pair<std::string, int64_t>>{{"0", 0}, {"250", 250}, {"100000", 100000}}) {
    test::WriteFile(path, head + text + "\n");
    auto c = LoadConfig(path);
    ASSERT_TRUE(c.ok()) << text << ": " << c.error().message();
    EXPECT_EQ(c->audit.gather, std::chrono::microseconds(us));
    ASSERT_TRUE(WriteConfig(*c, dir / "back.toml").ok());
    auto back = LoadConfig(dir / "back.toml");
    ASSERT_TRUE(back.ok()) << back.error().message();
    EXPECT_EQ(back->audit.gather, std::chrono::microseconds(us)) << test::ReadFile(dir / "back.toml");
  }
  for (const std::string bad : {"-1", "100001", "\"500us\"", "0.5"}) {
    test::WriteFile(path, head + bad + "\n");
    auto r = LoadConfig(path);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().category(), Category::kConfig);
    EXPECT_NE(r.error().message().find(path + ":8:"), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find("audit.group_commit_us must be a number of microseconds from 0 (off) to 100000"),
              std::string::npos)
        << r.error().message();
  }
}

// [audit] timeout_ms: 100 to 600000, kept when written; anything else
// refused naming the key, its place and the range.
TEST(Config, AnAuditTimeoutIsKeptAndChecked) {
  test::TempDir dir;
  const std::string path = dir / "custody.toml";
  EXPECT_EQ(Config{}.audit.timeout, std::chrono::milliseconds(10000)) << "the default";
  const std::string head = "state_dir = \"/x\"\n[token]\nmodule = \"/m.so\"\nuri = \"pkcs11:\"\n[store]\npath = \"/x/db\"\n"
                           "[audit]\ntimeout_ms = ";
  for (const auto& [text, ms] : std::vector<std::pair<std::string, int64_t>>{{"100", 100}, {"2500", 2500}, {"600000", 600000}}) {
    test::WriteFile(path, head + text + "\n");
    auto c = LoadConfig(path);
    ASSERT_TRUE(c.ok()) << text << ": " << c.error().message();
    EXPECT_EQ(c->audit.timeout, std::chrono::milliseconds(ms));
    ASSERT_TRUE(WriteConfig(*c, dir / "back.toml").ok());
    auto back = LoadConfig(dir / "back.toml");
    ASSERT_TRUE(back.ok()) << back.error().message();
    EXPECT_EQ(back->audit.timeout, std::chrono::milliseconds(ms)) << test::ReadFile(dir / "back.toml");
  }
  for (const std::string bad : {"0", "99", "600001", "-5", "\"10s\"", "1.5"}) {
    test::WriteFile(path, head + bad + "\n");
    auto r = LoadConfig(path);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().category(), Category::kConfig);
    EXPECT_NE(r.error().message().find(path + ":8:"), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find("audit.timeout_ms must be a number of milliseconds from 100 to 600000"),
              std::string::npos)
        << r.error().message();
  }
}

TEST(Config, APinInTheConfigIsRefused) {
  test::TempDir dir;
  std::string path = dir / "c.toml";
  test::WriteFile(path, "state_dir = \"/x\"\n[token]\nmodule = \"/m.so\"\nuri = \"pkcs11:\"\npin = \"1234\"\n"
                        "[store]\npath = \"/x/db\"\n");
  auto r = LoadConfig(path);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("may not be written in the config"), std::string::npos);
  EXPECT_EQ(r.error().message().find("1234"), std::string::npos);
}

// [store] url: a PostgreSQL store; loaded and written back as it is, but
// never with a password in it, and never beside a SQLite path.
TEST(Config, AStoreUrlLoadsButNotWithAPasswordOrBesideAPath) {
  test::TempDir dir;
  std::string path = dir / "c.toml";
  const std::string head = "state_dir = \"/x\"\n[token]\nmodule = \"/m.so\"\nuri = \"pkcs11:\"\n[store]\n";
  test::WriteFile(path, head + "url = \"postgresql://custody@db.internal/custody?sslmode=verify-full\"\n");
  auto ok = LoadConfig(path);
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_EQ(ok->store.url, "postgresql://custody@db.internal/custody?sslmode=verify-full");
  EXPECT_TRUE(ok->store.path.empty());
  ASSERT_TRUE(WriteConfig(*ok, dir / "back.toml").ok());
  auto back = LoadConfig(dir / "back.toml");
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->store, ok->store);

  test::WriteFile(path, head + "url = \"postgresql://custody:s3cr3t-pw@db.internal/custody\"\n");
  auto pw = LoadConfig(path);
  ASSERT_FALSE(pw.ok());
  EXPECT_EQ(pw.error().category(), Category::kConfig);
  EXPECT_EQ(pw.error().exit_code(), 78);
  EXPECT_EQ(pw.error().message().find("s3cr3t-pw"), std::string::npos) << pw.error().message();
  EXPECT_NE(pw.error().message().find("PGPASSFILE"), std::string::npos) << pw.error().message();
  EXPECT_NE(pw.error().message().find(path), std::string::npos) << "names the file: " << pw.error().message();

  test::WriteFile(path, head + "path = \"/x/db\"\nurl = \"host=/run/postgresql dbname=custody\"\n");
  auto both = LoadConfig(path);
  ASSERT_FALSE(both.ok());
  EXPECT_NE(both.error().message().find("both path (SQLite) and url (PostgreSQL)"), std::string::npos)
      << both.error().message();

  // With the store, the audit trail is in it: a folder is refused, and
  // the config written back for a store has none.
  EXPECT_EQ(test::ReadFile(dir / "back.toml").find("\ndir = "), std::string::npos) << test::ReadFile(dir / "back.toml");
  test::WriteFile(path, head + "url = \"host=/run/postgresql dbname=custody\"\n[audit]\ndir = \"/var/lib/custody/audit\"\n");
  auto folder = LoadConfig(path);
  ASSERT_FALSE(folder.ok());
  EXPECT_EQ(folder.error().exit_code(), 78);
  EXPECT_NE(folder.error().message().find("audit.dir: with a PostgreSQL store ([store] url) the audit trail is kept in "
                                          "the store"),
            std::string::npos)
      << folder.error().message();
}

TEST(ResolvePin, DescriptorThenEnvironmentThenFile) {
  test::TempDir dir;
  Config c = Sample(dir);
  test::WriteFile(*c.token.pin_file, "from-file\n");
  ::chmod(c.token.pin_file->c_str(), 0600);

  ::unsetenv("CUSTODY_PIN");
  auto f = ResolvePin(c, std::nullopt);
  ASSERT_TRUE(f.ok()) << f.error().message();
  EXPECT_EQ(f->RevealString(SecretAccess{}), "from-file");  // newline dropped

  ::setenv("CUSTODY_PIN", "from-env", 1);
  auto e = ResolvePin(c, std::nullopt);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->RevealString(SecretAccess{}), "from-env");
  EXPECT_EQ(::getenv("CUSTODY_PIN"), nullptr) << "CUSTODY_PIN must be removed after reading";

  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  ASSERT_EQ(::write(fds[1], "from-fd", 7), 7);
  ::close(fds[1]);
  ::setenv("CUSTODY_PIN", "from-env", 1);
  auto d = ResolvePin(c, fds[0]);
  ::close(fds[0]);
  ::unsetenv("CUSTODY_PIN");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->RevealString(SecretAccess{}), "from-fd");
}

TEST(ResolvePin, NoSourceOrEmptyPinIsAConfigError) {
  test::TempDir dir;
  Config c = Sample(dir);
  c.token.pin_file.reset();
  ::unsetenv("CUSTODY_PIN");
  auto r = ResolvePin(c, std::nullopt);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().category(), Category::kConfig);

  c = Sample(dir);
  test::WriteFile(*c.token.pin_file, "\n");
  ::chmod(c.token.pin_file->c_str(), 0600);
  r = ResolvePin(c, std::nullopt);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("empty"), std::string::npos);
}

}  // namespace
}  // namespace custody::core
