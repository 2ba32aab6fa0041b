// `custody store copy` end to end through the `custody` binary: a
// deployment moved from the fixture's store (SQLite, or PostgreSQL in the
// pg/ run) to the other kind and back, then used through the CLI with the
// config pointed at the copy; a target that holds a deployment refused and
// left as it was; a version that does not unseal from the copy named.
// Real SoftHSM2 token, real SQLite files, a real PostgreSQL server.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../support/cli_fixture.h"
#include "../support/pg_server.h"
#include "custody/app/config.h"

namespace custody::test {
namespace {

using nlohmann::json;

constexpr const char* kPolicy = R"(version = 1
admins = ["user:root"]

[principals."user:root"]
uid = 0

[projects.payments.environments.prod]
[projects.payments.environments.dev]
[[projects.payments.grants]]
principal = "user:root"
role = "owner"

[projects.billing.environments.prod]
[[projects.billing.grants]]
principal = "user:root"
role = "owner"
)";

// The same with a third project: applied to the copy, it creates a project,
// an environment and a KEK there.
const std::string kPolicyWithFresh = std::string(kPolicy) + R"(
[projects.fresh.environments.prod]
[[projects.fresh.grants]]
principal = "user:root"
role = "owner"
)";

// Values no output may show.
const std::map<std::string, std::string> kValues = {
    {"payments/prod/stripe", "sk-copy-stripe-3"},   // v1 and v2 before it
    {"payments/dev/hook", "sk-copy-hook-1"},
    {"billing/prod/ledger", "sk-copy-ledger-2"},    // v1 revoked
};

class StoreCopyCliTest : public CliFixture {
 protected:
  void SetUp() override { InitWithPolicy(token_, kPolicy); }

  core::StoreSettings Configured() {
    auto c = core::LoadConfig(token_.config_path());
    EXPECT_TRUE(c.ok());
    return c.ok() ? c->store : core::StoreSettings{};
  }
  // Rewrites [store] in the config: what the operator does after a copy.
  void PointAt(const core::StoreSettings& store) {
    auto c = core::LoadConfig(token_.config_path());
    ASSERT_TRUE(c.ok());
    c->store = store;
    ASSERT_TRUE(core::WriteConfig(*c, token_.config_path()).ok());
  }
  static std::string Arg(const core::StoreSettings& s) { return s.path.empty() ? s.url : s.path; }
  // A new, empty store of the other kind than `s`.
  core::StoreSettings OtherKind(const core::StoreSettings& s, const std::string& name) {
    core::StoreSettings out;
    if (s.path.empty()) {
      out.path = token_.dir() / (name + ".db");
    } else {
      out.url = pg_->NewDatabase();
    }
    return out;
  }
  // A new, empty store of the same kind as `s`.
  core::StoreSettings SameKind(const core::StoreSettings& s, const std::string& name) {
    core::StoreSettings out;
    if (s.path.empty()) {
      out.url = pg_->NewDatabase();
    } else {
      out.path = token_.dir() / (name + ".db");
    }
    return out;
  }
  void SqlOn(const core::StoreSettings& s, const std::string& sql) {
    if (!s.path.empty()) {
      ExecSql(s.path, sql);
      return;
    }
    auto at = s.url.find("dbname=");
    ASSERT_NE(at, std::string::npos) << s.url;
    std::string db = s.url.substr(at + 7);
    db = db.substr(0, db.find(' '));
    pg_->Sql(db, sql);
  }
  RunResult Copy(const core::StoreSettings& from, const core::StoreSettings& to, bool as_json = false) {
    std::vector<std::string> args{"store", "copy", "--from", Arg(from), "--to", Arg(to)};
    if (as_json) args.push_back("--json");
    auto r = Cli(args);
    for (const auto& [path, value] : kValues) {
      EXPECT_EQ(r.out.find(value), std::string::npos) << "a value on stdout";
      EXPECT_EQ(r.err.find(value), std::string::npos) << "a value on stderr";
    }
    return r;
  }
  json Json(const std::vector<std::string>& args) {
    std::vector<std::string> a{"--json"};
    a.insert(a.end(), args.begin(), args.end());
    auto r = Cli(a);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return json::parse(r.out.empty() ? "null" : r.out);
  }
  // What a user sees of the deployment: values, versions, KEKs, usage.
  struct View {
    std::map<std::string, std::string> values;
    json versions, keks, usage, secrets;
  };
  View Look() {
    View v;
    for (const auto& [path, value] : kValues) {
      auto r = Cli({"secret", "get", path});
      EXPECT_EQ(r.exit_code, 0) << path << ": " << r.err;
      v.values[path] = r.out;
    }
    for (const auto& [path, value] : kValues) v.versions[path] = Json({"secret", "versions", path});
    for (const char* p : {"payments", "billing"}) v.keks[p] = Json({"kek", "list", p});
    v.secrets = Json({"secret", "list", ""});
    return v;
  }
  // The deployment every test copies: two projects, three environments, a
  // secret with three versions, a revoked version, a rotated KEK (one
  // destroyed record beside the active one), usage counts.
  void Populate() {
    Put("payments/prod/stripe", "sk-copy-stripe-1");
    Put("payments/prod/stripe", "sk-copy-stripe-2");
    Put("payments/prod/stripe", "sk-copy-stripe-3");
    Put("payments/dev/hook", "sk-copy-hook-1");
    Put("billing/prod/ledger", "sk-copy-ledger-1");
    Put("billing/prod/ledger", "sk-copy-ledger-2");
    auto r = Cli({"secret", "revoke", "billing/prod/ledger", "--version", "1", "--reason", "leaked in a log"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = Cli({"kek", "rotate", "payments"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  PgServer* pg_ = PgServer::Shared();
};

TEST_F(StoreCopyCliTest, CopiesToTheOtherBackendAndBackAndTheCopyServesEveryValue) {
  CUSTODY_REQUIRE_PG(pg_);
  Populate();
  const core::StoreSettings source = Configured();
  const View before = Look();
  const json usage_before = Json({"usage", "payments"});
  ASSERT_EQ(before.keks["payments"].size(), 2u) << before.keks.dump();
  for (const auto& [path, value] : kValues) EXPECT_EQ(before.values.at(path), value);

  const core::StoreSettings there = OtherKind(source, "there");
  auto r = Copy(source, there);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("copied 2 project(s), 3 KEK record(s), 3 secret(s), 6 version(s)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("every version unseals from the copy"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("dbname="), std::string::npos) << "never the whole URL: " << r.out;

  // One audit record, naming both stores without the whole URL.
  std::string audit;
  for (const auto& f : std::filesystem::recursive_directory_iterator(token_.dir() / "state/audit")) {
    if (f.is_regular_file()) audit += ReadFile(f.path().string());
  }
  EXPECT_NE(audit.find("\"store.copy\""), std::string::npos);
  EXPECT_EQ(audit.find("dbname="), std::string::npos) << "never the whole URL in the audit log";
  for (const auto& [path, value] : kValues) EXPECT_EQ(audit.find(value), std::string::npos);

  PointAt(there);
  EXPECT_EQ(Json({"usage", "payments"}), usage_before) << "usage counts came along";
  const View after = Look();
  EXPECT_EQ(after.values, before.values);
  EXPECT_EQ(after.versions, before.versions);
  EXPECT_EQ(after.keks, before.keks);
  EXPECT_EQ(after.secrets, before.secrets);
  // The copy is a working store: new rows number after the copied ones
  // (on PostgreSQL, the identity sequences were moved past them).
  Put("payments/prod/stripe", "sk-copy-stripe-4");
  r = Apply(kPolicyWithFresh, "policy2.toml");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Put("fresh/prod/one", "sk-copy-fresh-1");
  Put("payments/dev/other", "sk-copy-other-1");

  const json keks_there = Json({"kek", "list", "payments"});
  const json stripe_there = Json({"secret", "versions", "payments/prod/stripe"});

  // And back, into a new store of the first kind, as JSON.
  const core::StoreSettings back = OtherKind(there, "back");
  r = Copy(there, back, /*as_json=*/true);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json summary = json::parse(r.out);
  EXPECT_EQ(summary["versions"], 9);
  EXPECT_EQ(summary["verified"], 9);
  EXPECT_EQ(summary["projects"], 3);
  PointAt(back);
  auto got = Cli({"secret", "get", "payments/prod/stripe"});
  EXPECT_EQ(got.out, "sk-copy-stripe-4") << got.err;
  got = Cli({"secret", "get", "fresh/prod/one"});
  EXPECT_EQ(got.out, "sk-copy-fresh-1") << got.err;
  EXPECT_EQ(Look().versions["payments/dev/hook"], before.versions["payments/dev/hook"]);
  EXPECT_EQ(Json({"kek", "list", "payments"}), keks_there);
  EXPECT_EQ(Json({"secret", "versions", "payments/prod/stripe"}), stripe_there);

  // And between two stores of one kind.
  const core::StoreSettings same = SameKind(back, "same");
  r = Copy(back, same);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("9 version(s)"), std::string::npos) << r.out;
  PointAt(same);
  got = Cli({"secret", "get", "payments/dev/other"});
  EXPECT_EQ(got.out, "sk-copy-other-1") << got.err;
}

TEST_F(StoreCopyCliTest, ATargetThatHoldsADeploymentIsRefusedAndLeftAsItWas) {
  CUSTODY_REQUIRE_PG(pg_);
  Populate();
  const core::StoreSettings source = Configured();
  const core::StoreSettings there = OtherKind(source, "there");
  ASSERT_EQ(Copy(source, there).exit_code, 0);
  // The source moves on; a second copy into the same target must not mix.
  Put("payments/prod/late", "sk-copy-late");
  auto r = Copy(source, there);
  ExpectOneLine(r, 64, "already holds a custody deployment");
  PointAt(there);
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/late"}).exit_code, 66) << "nothing of the second copy landed";
  EXPECT_EQ(Json({"secret", "versions", "payments/prod/stripe"}).size(), 3u);
}

TEST_F(StoreCopyCliTest, ASourceThatDoesNotExistIs66AndBadArgumentsAreRefused) {
  const core::StoreSettings source = Configured();
  ExpectOneLine(Cli({"store", "copy", "--from", token_.dir() / "nowhere.db", "--to", token_.dir() / "x.db"}), 66,
                "does not exist");
  EXPECT_FALSE(std::filesystem::exists(token_.dir() / "x.db")) << "nothing made for a copy that cannot start";
  ExpectOneLine(Cli({"store", "copy", "--from", Arg(source), "--to", "postgresql://custody:hunter2@db/custody"}), 78,
                "password");
  ExpectOneLine(Cli({"store", "copy", "--from", Arg(source), "--to", std::string("bad\x01name.db")}), 64, "--to");
  ExpectOneLine(Cli({"store", "copy", "--from", Arg(source), "--to", Arg(source)}), 64, "the same store");
}

TEST_F(StoreCopyCliTest, AVersionThatDoesNotUnsealFromTheCopyIsNamedAnd65) {
  CUSTODY_REQUIRE_PG(pg_);
  Populate();
  const core::StoreSettings source = Configured();
  // Damage one version's sealed blob in the source: the copy carries it as
  // it is, and the proof after the copy must catch it.
  SqlOn(source, "UPDATE secret_versions SET blob = substr(blob, 1, length(blob) - 5) "
                "WHERE version = 2 AND secret_id = (SELECT id FROM secrets WHERE name = 'stripe')");
  const core::StoreSettings there = OtherKind(source, "there");
  auto r = Copy(source, there);
  ExpectOneLine(r, 65, "payments/prod/stripe v2 does not unseal");
  EXPECT_NE(r.err.find("do not switch to it"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace custody::test
