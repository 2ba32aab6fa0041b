// Rotation end to end through the `custody` binary: rotate (stdin, file,
// token RNG, provider command), revoke, versions, rotation status and its CI
// gate, and KEK rotation, including SIGKILL at random points and a re-run.
// Real SoftHSM2 token, real SQLite file, real processes.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ctime>
#include <filesystem>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "../support/cli_fixture.h"
#include "custody/app/backend.h"
#include "custody/app/config.h"
#include "custody/hsm/pkcs11_sealer.h"
#include "custody/service/service.h"
#include "custody/store/sqlite_store.h"
#include "custody/store/store.h"
#include "custody/store/store_lock.h"

namespace custody::test {
namespace {

using nlohmann::json;

// Root (the test user) owns payments; grace and retention are set per
// environment so each test can see them act: prod keeps 3 versions with a
// one-hour grace, dev has a one-second grace and a one-second max_age.
constexpr const char* kPolicy = R"(version = 1
admins = ["user:root"]

[principals."user:root"]
uid = 0

[projects.payments]
max_age = "90d"
warn_before = "14d"
[projects.payments.environments.prod]
grace = "1h"
keep_versions = 3
[projects.payments.environments.dev]
production = false
grace = "1s"
max_age = "1s"
[[projects.payments.grants]]
principal = "user:root"
role = "owner"
)";

class RotationCliTest : public CliFixture {
 protected:
  void SetUp() override { InitWithPolicy(token_, kPolicy); }

  std::string Get(const std::string& path, std::optional<int> version = std::nullopt) {
    std::vector<std::string> args{"secret", "get", path};
    if (version) {
      args.push_back("--version");
      args.push_back(std::to_string(*version));
    }
    auto r = Cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }
  json Json(const std::vector<std::string>& args) {
    std::vector<std::string> a{"--json"};
    a.insert(a.end(), args.begin(), args.end());
    auto r = Cli(a);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return json::parse(r.out.empty() ? "null" : r.out);
  }
};

TEST_F(RotationCliTest, RotateKeepsThePreviousVersionReadableForTheGracePeriod) {
  Put("payments/prod/stripe", "old-value");
  auto r = Cli({"secret", "rotate", "payments/prod/stripe"}, "new-value\n");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("version 2 is current"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("version 1 stays readable until"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(grace 1h)"), std::string::npos) << r.out;
  EXPECT_EQ(Get("payments/prod/stripe"), "new-value");
  EXPECT_EQ(Get("payments/prod/stripe", 1), "old-value") << "within grace, servers can still switch over";

  auto versions = Json({"secret", "versions", "payments/prod/stripe"});
  ASSERT_EQ(versions.size(), 2u);
  EXPECT_EQ(versions[0]["state"], "previous");
  EXPECT_TRUE(versions[0].contains("readable_until"));
  EXPECT_EQ(versions[1]["state"], "current");
}

TEST_F(RotationCliTest, AfterTheGracePeriodTheOldVersionIsRetired) {
  Put("payments/dev/hook", "v1-value");
  ASSERT_EQ(Cli({"secret", "rotate", "payments/dev/hook"}, "v2-value").exit_code, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));  // dev grace is 1s
  ExpectOneLine(Cli({"secret", "get", "payments/dev/hook", "--version", "1"}), 77,
                "version 1 of payments/dev/hook is retired: its grace period ended at");
  EXPECT_EQ(Get("payments/dev/hook"), "v2-value");
  auto versions = Json({"secret", "versions", "payments/dev/hook"});
  EXPECT_EQ(versions[0]["state"], "retired");
}

TEST_F(RotationCliTest, RotateNeedsAnExistingSecretAndAValue) {
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/nope"}, "x"), 66,
                "does not exist; store its first version with 'custody secret put'");
  Put("payments/prod/stripe", "old-value");
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/stripe"}, ""), 64, "refusing to store an empty value");
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/stripe", "--format", "hex"}, "x"), 64,
                "--format and --prefix go with --generate");
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/stripe", "--generate", "8"}), 64, "16 to 1024 bytes");
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/stripe", "--generate", "32", "--format", "rot13"}), 64,
                "--format must be hex, base64 or base64url");
  EXPECT_EQ(Json({"secret", "versions", "payments/prod/stripe"}).size(), 1u) << "nothing was stored";
}

TEST_F(RotationCliTest, GenerateDrawsFromTheTokenInTheRequestedFormat) {
  Put("payments/prod/api", "old-value");
  auto r = Cli({"secret", "rotate", "payments/prod/api", "--generate", "32", "--format", "hex", "--prefix", "sk-live-"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string v = Get("payments/prod/api");
  ASSERT_EQ(v.size(), 8u + 64u) << v;
  EXPECT_EQ(v.rfind("sk-live-", 0), 0u);
  EXPECT_EQ(v.find_first_not_of("0123456789abcdef", 8), std::string::npos) << v;
  EXPECT_EQ(r.out.find(v), std::string::npos) << "the generated value is never printed";

  ASSERT_EQ(Cli({"secret", "rotate", "payments/prod/api", "--generate", "33"}).exit_code, 0);
  std::string u = Get("payments/prod/api");
  EXPECT_EQ(u.size(), 44u) << "33 bytes, base64url without padding";
  EXPECT_EQ(u.find_first_of("+/="), std::string::npos) << u;
  EXPECT_NE(u, v);
}

// The generated value is the token's: the module is a forwarding shim over
// SoftHSM2 (tests/support/faulty_pkcs11.cc) that logs every C_GenerateRandom
// with the bytes it returned. The stored value must be exactly the hex of
// one such call of the requested length; a value drawn from any other
// source (the OS, a PRNG in the process) has the right format but matches
// no call.
TEST_F(RotationCliTest, GenerateDrawsFromTheTokenRngCall) {
  Put("payments/prod/api", "old-value");
  std::string cfg = ReadFile(token_.config_path());
  const std::string from = std::string("'") + SoftHsmToken::kModule + "'";  // as `custody init` wrote it
  const size_t at = cfg.find(from);
  ASSERT_NE(at, std::string::npos) << cfg;
  WriteFile(token_.config_path(), cfg.replace(at, from.size(), std::string("'") + FAULTY_PKCS11 + "'"));
  const std::string calls = token_.dir() / "pkcs11-calls";
  RunOptions o;
  o.env["CUSTODY_FAULT_CALLS"] = calls;
  auto r = Cli({"secret", "rotate", "payments/prod/api", "--generate", "32", "--format", "hex", "--prefix", "sk-"}, "", o);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string v = Get("payments/prod/api");
  ASSERT_EQ(v.size(), 3u + 64u) << v;
  ASSERT_EQ(v.rfind("sk-", 0), 0u) << v;
  int of_32 = 0;
  bool drawn = false;
  std::istringstream log(ReadFile(calls));
  for (std::string line; std::getline(log, line);) {
    std::istringstream f(line);
    std::string fn, rv, hex;
    size_t n = 0;
    f >> fn >> rv >> n >> hex;
    if (fn != "C_GenerateRandom" || rv != "CKR_OK" || n != 32) continue;
    ++of_32;
    drawn = drawn || hex == v.substr(3);
  }
  EXPECT_GE(of_32, 1) << "no C_GenerateRandom of 32 bytes reached the token:\n" << ReadFile(calls);
  EXPECT_TRUE(drawn) << "the value is not the output of any 32-byte C_GenerateRandom";
}

TEST_F(RotationCliTest, ProviderCommandSuppliesTheValueAndNeverSeesThePin) {
  Put("payments/prod/vendor", "old-value");
  std::string seen = token_.dir() / "provider-env";
  auto r = Cli({"secret", "rotate", "payments/prod/vendor", "--exec",
                "env > " + seen + "; echo 'vendor-key-123'"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Get("payments/prod/vendor"), "vendor-key-123");
  EXPECT_EQ(ReadFile(seen).find(SoftHsmToken::kPin), std::string::npos);

  // A failing or hanging provider changes nothing.
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/vendor", "--exec", "echo half; exit 3"}), 69,
                "provider command exited with status 3; the current version stays");
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/vendor", "--exec", "sleep 30", "--timeout", "1"}), 69,
                "did not finish within 1 s and was killed");
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/vendor", "--exec", "true"}), 65,
                "provider command printed nothing");
  EXPECT_EQ(Get("payments/prod/vendor"), "vendor-key-123");
  EXPECT_EQ(Json({"secret", "versions", "payments/prod/vendor"}).size(), 2u);
}

// The PIN's real leak paths into a provider: CUSTODY_PIN in the environment
// it would inherit, and the --pin-fd descriptor (a file it could read again
// through /proc/self/fd, or a pipe). The provider dumps its environment and
// whatever it can read through that descriptor number.
TEST_F(RotationCliTest, ProviderSeesNeitherCustodyPinNorThePinDescriptor) {
  Put("payments/prod/vendor", "old-value");
  // Without pin_file in the config, the PIN must come from where the test says.
  std::string cfg = ReadFile(token_.config_path());
  size_t at = cfg.find("pin_file");
  ASSERT_NE(at, std::string::npos);
  cfg.erase(at, cfg.find('\n', at) - at + 1);
  WriteFile(token_.config_path(), cfg);

  auto GetWithEnvPin = [&](const std::string& path) {
    auto g = Cli({"secret", "get", path}, "", {.env = {{"CUSTODY_PIN", SoftHsmToken::kPin}}});
    EXPECT_EQ(g.exit_code, 0) << g.err;
    return g.out;
  };
  std::string seen = token_.dir() / "provider-saw";
  auto r = Cli({"secret", "rotate", "payments/prod/vendor", "--exec", "env > " + seen + "; echo 'from-env-run'"}, "",
               {.env = {{"CUSTODY_PIN", SoftHsmToken::kPin}}});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(GetWithEnvPin("payments/prod/vendor"), "from-env-run");
  EXPECT_EQ(ReadFile(seen).find(SoftHsmToken::kPin), std::string::npos) << "CUSTODY_PIN reached the provider";

  // --pin-fd from a file: what a provider could re-read through the number.
  std::string pin_path = token_.dir() / "pin-for-fd";
  WriteFile(pin_path, std::string(SoftHsmToken::kPin) + "\n");
  int fd = ::open(pin_path.c_str(), O_RDONLY);  // no O_CLOEXEC: custody gets it
  ASSERT_GE(fd, 0);
  const std::string n = std::to_string(fd);
  r = Cli({"--pin-fd", n, "secret", "rotate", "payments/prod/vendor", "--exec",
           "{ env; cat /proc/self/fd/" + n + "; cat <&" + n + "; } > " + seen + " 2>/dev/null; echo 'from-fd-run'"},
          "", {.keep_fds = {fd}});
  ::close(fd);
  // The provider runs before custody reads the PIN: it would find it unread.
  EXPECT_EQ(ReadFile(seen).find(SoftHsmToken::kPin), std::string::npos)
      << "the provider could read the PIN through descriptor " << n << ":\n" << ReadFile(seen);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(GetWithEnvPin("payments/prod/vendor"), "from-fd-run");
}

TEST_F(RotationCliTest, RevokingTheCurrentVersionFallsBackThenLeavesNone) {
  Put("payments/prod/stripe", "one");
  Put("payments/prod/stripe", "two");
  auto r = Cli({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "leaked in a CI log"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("current version: 1"), std::string::npos) << r.out;
  EXPECT_EQ(Get("payments/prod/stripe"), "one");
  ExpectOneLine(Cli({"secret", "get", "payments/prod/stripe", "--version", "2"}), 77,
                "version 2 of payments/prod/stripe was revoked at");
  ExpectOneLine(Cli({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "again"}), 64,
                "already revoked");
  ExpectOneLine(Cli({"secret", "revoke", "payments/prod/stripe", "--version", "9", "--reason", "x"}), 66,
                "has no version 9");
  ExpectOneLine(Cli({"secret", "revoke", "payments/prod/stripe", "--version", "1"}), 64, "--reason");

  r = Cli({"secret", "revoke", "payments/prod/stripe", "--version", "1", "--reason", "rotate the vendor key"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("has no current version now"), std::string::npos) << r.out;
  ExpectOneLine(Cli({"secret", "get", "payments/prod/stripe"}), 66,
                "has no current version: every stored version is revoked");

  // The revocation is in the audit trail with its reason.
  auto shown = Cli({"--json", "audit", "show", "--action", "secret.revoke"});
  ASSERT_EQ(shown.exit_code, 0) << shown.err;
  EXPECT_NE(shown.out.find("leaked in a CI log"), std::string::npos) << shown.out;
}

TEST_F(RotationCliTest, RetentionKeepsTheLastVersionsButNeverOneInGrace) {
  // prod keeps 3 with a 1h grace: every replaced version is still in grace,
  // so nothing may be trimmed yet, whatever keep_versions says.
  Put("payments/prod/k", "v1");
  for (int i = 2; i <= 5; ++i) ASSERT_EQ(Cli({"secret", "rotate", "payments/prod/k"}, "v" + std::to_string(i)).exit_code, 0);
  EXPECT_EQ(Json({"secret", "versions", "payments/prod/k"}).size(), 5u);
  // Revoked versions are not in grace: they go first.
  ASSERT_EQ(Cli({"secret", "revoke", "payments/prod/k", "--version", "1", "--reason", "old"}).exit_code, 0);
  ASSERT_EQ(Cli({"secret", "revoke", "payments/prod/k", "--version", "2", "--reason", "old"}).exit_code, 0);
  auto r = Cli({"secret", "rotate", "payments/prod/k"}, "v6");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("trimmed v1, v2 (keep_versions = 3)"), std::string::npos) << r.out;
  auto versions = Json({"secret", "versions", "payments/prod/k"});
  ASSERT_EQ(versions.size(), 4u) << versions.dump();
  EXPECT_EQ(versions[0]["version"], 3);
  EXPECT_EQ(Get("payments/prod/k"), "v6");
}

TEST_F(RotationCliTest, StatusSortsByUrgencyAndGatesCi) {
  Put("payments/prod/fresh", "a");
  Put("payments/dev/stale", "b");
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // dev max_age is 1s
  auto status = Json({"rotation", "status", "payments"});
  ASSERT_EQ(status.size(), 2u) << status.dump();
  EXPECT_EQ(status[0]["name"], "stale");
  EXPECT_EQ(status[0]["state"], "overdue");
  EXPECT_EQ(status[1]["name"], "fresh");
  EXPECT_EQ(status[1]["state"], "ok");
  EXPECT_EQ(status[1]["max_age_seconds"], 90 * 86400);

  auto table = Cli({"rotation", "status"});
  ASSERT_EQ(table.exit_code, 0) << "without --fail-on-overdue the listing succeeds";
  EXPECT_LT(table.out.find("payments/dev/stale"), table.out.find("payments/prod/fresh")) << table.out;

  auto gate = Cli({"rotation", "status", "--fail-on-overdue"});
  EXPECT_EQ(gate.exit_code, 1) << gate.err;
  EXPECT_NE(gate.err.find("1 secret(s) overdue for rotation"), std::string::npos) << gate.err;

  // Rotating starts its age again from the new version.
  ASSERT_EQ(Cli({"secret", "rotate", "payments/dev/stale"}, "c").exit_code, 0);
  auto rotated = Json({"rotation", "status", "payments"});
  for (const auto& it : rotated) {
    if (it["name"] != "stale") continue;
    EXPECT_EQ(it["current_version"], 2);
    EXPECT_LT(it["age_seconds"].get<int64_t>(), 60);
  }
  // With nothing overdue the gate passes (dev's max_age is 1 s, so the
  // secret goes rather than racing the clock).
  ASSERT_EQ(Cli({"secret", "delete", "payments/dev/stale"}).exit_code, 0);
  auto after = Cli({"rotation", "status", "payments", "--fail-on-overdue"});
  EXPECT_EQ(after.exit_code, 0) << after.out << after.err;
}

// Progress of a long command: on a terminal (a pty made by script(1)) a
// line rewritten in place with counts, rate and time taken; plain lines
// when asked (--progress lines, for logs); nothing with --json on a
// terminal, and nothing off a terminal (the test above).
TEST_F(RotationCliTest, ProgressShowsOnATerminalAsLinesWhenAskedAndNeverInJson) {
  Put("payments/prod/a", "value-a");
  Put("payments/dev/b", "value-b");
  RunOptions o;
  o.env = cli_env_;
  auto on_tty = RunProgram("/usr/bin/script", {"-qec", std::string(CUSTODY_BIN) + " kek rotate payments", "/dev/null"}, o);
  ASSERT_EQ(on_tty.exit_code, 0) << on_tty.out << on_tty.err;
  EXPECT_NE(on_tty.out.find("\r\033[Kcustody: re-sealed "), std::string::npos) << "a line redrawn in place: " << on_tty.out;
  EXPECT_NE(on_tty.out.find("re-sealed 2/2 versions ("), std::string::npos) << on_tty.out;
  EXPECT_NE(on_tty.out.find("/s, done in "), std::string::npos) << on_tty.out;
  auto lines = Cli({"kek", "rotate", "payments", "--progress", "lines"});
  ASSERT_EQ(lines.exit_code, 0) << lines.err;
  EXPECT_NE(lines.err.find("custody: re-sealed 2/2\n"), std::string::npos) << lines.err;
  auto json_tty =
      RunProgram("/usr/bin/script", {"-qec", std::string(CUSTODY_BIN) + " --json kek rotate payments", "/dev/null"}, o);
  ASSERT_EQ(json_tty.exit_code, 0) << json_tty.out;
  EXPECT_EQ(json_tty.out.find("re-sealed 2/2"), std::string::npos) << json_tty.out;
  auto bad = Cli({"kek", "rotate", "payments", "--progress", "sometimes"});
  EXPECT_EQ(bad.exit_code, 64) << bad.err;
}

TEST_F(RotationCliTest, KekRotationReSealsEverythingAndDestroysTheOldKek) {
  Put("payments/prod/a", "value-a");
  Put("payments/prod/a", "value-a2");
  Put("payments/dev/b", "value-b");

  auto dry = Cli({"kek", "rotate", "payments", "--dry-run"});
  ASSERT_EQ(dry.exit_code, 0) << dry.err;
  EXPECT_NE(dry.out.find("would create KEK v2 for payments in the token, re-seal 3 version(s)"), std::string::npos)
      << dry.out;
  EXPECT_NE(dry.out.find("host re-seal: this token does not offer AES-GCM wrap/unwrap"), std::string::npos) << dry.out;
  EXPECT_EQ(Json({"kek", "list", "payments"}).size(), 1u) << "a dry run changes nothing";

  auto r = Cli({"kek", "rotate", "payments"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("KEK v2 is active; re-sealed 3 version(s); destroyed KEK v1"), std::string::npos) << r.out;
  EXPECT_EQ(r.err.find("re-sealed 3/3"), std::string::npos) << "no progress off a terminal unless asked: " << r.err;

  auto keks = Json({"kek", "list", "payments"});
  ASSERT_EQ(keks.size(), 2u);
  EXPECT_EQ(keks[0]["state"], "destroyed");
  EXPECT_EQ(keks[0]["sealed_versions"], 0);
  EXPECT_EQ(keks[1]["state"], "active");
  EXPECT_EQ(keks[1]["sealed_versions"], 3);
  auto info = Cli({"--json", "token", "info"});
  EXPECT_EQ(info.out.find("custody:kek:payments:v1"), std::string::npos) << "old KEK destroyed in the token";
  EXPECT_NE(info.out.find("custody:kek:payments:v2"), std::string::npos);

  EXPECT_EQ(Get("payments/prod/a"), "value-a2");
  EXPECT_EQ(Get("payments/prod/a", 1), "value-a");
  EXPECT_EQ(Get("payments/dev/b"), "value-b");
  auto shown = Cli({"--json", "audit", "show", "--action", "kek.rotate.done"});
  EXPECT_NE(shown.out.find("re-sealed 3 version(s) under KEK v2"), std::string::npos) << shown.out;
}

TEST_F(RotationCliTest, OnlyOneKekRotationOfAProjectRunsAtATime) {
  Put("payments/prod/a", "value-a");
  auto config = core::LoadConfig(token_.config_path());
  ASSERT_TRUE(config.ok()) << config.error().message();
  auto store = core::OpenStore(*config, false);
  ASSERT_TRUE(store.ok()) << store.error().message();
  const std::string name = "kek-rotate/payments";
  // Takes the lock for `holder` for `ttl` seconds of the store's clock
  // (negative: already expired); true when it was free to take.
  constexpr int64_t kHeld = 600, kExpired = -100;
  auto take = [&](const core::LockHolder& holder, int64_t ttl) {
    auto other = (*store)->TakeLock(name, holder, ttl, core::HolderEnded);
    EXPECT_TRUE(other.ok()) << other.error().message();
    return other.ok() && !other->has_value();
  };
  auto refused = [&](const std::string& why) {
    const size_t keks = Json({"kek", "list", "payments"}).size();
    auto r = Cli({"kek", "rotate", "payments"});
    EXPECT_EQ(r.exit_code, 69) << why << ": " << r.err;
    EXPECT_NE(r.err.find("another KEK rotation of payments is running"), std::string::npos) << r.err;
    EXPECT_EQ(Json({"kek", "list", "payments"}).size(), keks) << why << ": nothing was made";
  };
  // A live process on this host holds the lock (this test, as a running
  // `kek rotate` would): refused, naming it.
  const core::LockHolder me = core::ThisProcess();
  ASSERT_TRUE(take(me, kHeld));
  refused("held by a live process");
  auto r = Cli({"kek", "rotate", "payments"});
  EXPECT_NE(r.err.find("pid " + std::to_string(::getpid())), std::string::npos) << r.err;
  ASSERT_TRUE((*store)->ReleaseLock(name, me).ok());

  // A process on another host holds it: refused until its lock expires.
  core::LockHolder remote{"another-host.example", 4242, 99, "boot/pidns:1"};
  ASSERT_TRUE(take(remote, kHeld));
  refused("held on another host");
  ASSERT_FALSE(take(me, kHeld)) << "another host's live lock is not ours to take";
  ASSERT_TRUE(take(remote, kExpired));  // renewed to have expired 100 s ago
  EXPECT_EQ(Cli({"kek", "rotate", "payments"}).exit_code, 0) << "an expired lock is taken over";

  // A holder on this host that has ended (killed, say) holds nothing: its
  // lock is taken over at once, although it has not expired.
  pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  // The same host name in another pid namespace (a container) is not
  // judged by pid: its lock holds until it expires.
  core::LockHolder container{me.host, child, 1, "another-boot/pidns:4026531836"};
  ASSERT_TRUE(take(container, kHeld));
  refused("held in another pid namespace under the same host name");
  ASSERT_TRUE(take(container, kExpired));
  core::LockHolder ended{me.host, child, 1, me.instance};
  ASSERT_TRUE(take(ended, kHeld));
  auto taken = Cli({"kek", "rotate", "payments"});
  EXPECT_EQ(taken.exit_code, 0) << taken.err;
  EXPECT_EQ(Get("payments/prod/a"), "value-a");
  // A finished run lets go of its lock: the next one is not refused.
  EXPECT_EQ(Cli({"kek", "rotate", "payments"}).exit_code, 0);
}

// The crash test of the issue: KEK rotation SIGKILLed at random points, 20
// times, each followed by a re-run that must finish; after every re-run each
// secret reads back its value and the token holds exactly one KEK for the
// project. Every other kill is placed inside the rotation: at a random
// moment after its first "re-sealed" progress line, when blobs have moved
// and others have not. Such kills are counted from what the killed run had
// written to stderr, and a minimum of them is required: a kill that only
// ever lands during process start or login shows nothing about the rotation.
TEST_F(RotationCliTest, KekRotationSurvivesSigkillAtRandomPoints) {
  constexpr int kSecrets = 60;
  constexpr int kRuns = 20;
  auto path = [](int i) { return core::SecretPath{"payments", i % 2 ? "prod" : "dev", "s" + std::to_string(i)}; };
  // In this process (one token login instead of 60 processes), letting go
  // of the token before the CLI runs again.
  auto with_service = [&](const std::function<void(core::SecretService&)>& fn) {
    auto config = core::LoadConfig(token_.config_path());
    ASSERT_TRUE(config.ok()) << config.error().message();
    auto store = core::OpenStore(*config, false);
    ASSERT_TRUE(store.ok());
    auto tok = core::OpenToken(*config, token_.pin());
    ASSERT_TRUE(tok.ok()) << tok.error().message();
    core::Pkcs11Sealer sealer(*tok->pool, **store);
    core::SecretService svc(**store, sealer);
    fn(svc);
  };
  with_service([&](core::SecretService& svc) {
    for (int i = 0; i < kSecrets; ++i) {
      ASSERT_TRUE(svc.Put(path(i), SecretBuffer::Copy("value-" + std::to_string(i))).ok());
    }
  });
  auto check_all = [&](int run) {
    with_service([&](core::SecretService& svc) {
      for (int i = 0; i < kSecrets; ++i) {
        auto got = svc.Get(path(i), std::nullopt);
        ASSERT_TRUE(got.ok()) << "run " << run << ", " << path(i).str() << ": " << got.error().message();
        EXPECT_EQ(got->value.RevealString(SecretAccess{}), "value-" + std::to_string(i));
      }
    });
  };
  // How long one whole rotation takes here, and how long from its first
  // "re-sealed" line to its end, to spread the kills over them.
  constexpr const char* kResealed = "custody: re-sealed ";
  RunOptions measure;
  measure.kill_after = std::chrono::hours(1);  // never: only to note when the line came
  measure.kill_after_stderr = kResealed;
  auto full = Cli({"kek", "rotate", "payments", "--batch", "4", "--progress", "lines"}, "", measure);
  ASSERT_EQ(full.exit_code, 0) << full.err;
  ASSERT_TRUE(full.stderr_seen_after.has_value()) << "no progress line: " << full.err;
  const auto span = full.elapsed;
  const auto rotating = span - *full.stderr_seen_after;

  // SoftHSM2's file backend rewrites token.object in place (ftruncate, then
  // write) at every C_Login. A kill inside that window leaves SoftHSM with an
  // empty token.object and no initialised token: SoftHSM's own hazard, not a
  // step of custody's rotation (docs/ROTATION.md says so). The file holds the
  // token's label, PIN hashes and flags, never a key, so when a kill lands
  // there the test puts the file back as it was, counts it, and goes on
  // checking custody's state like after any other kill.
  std::string token_object;
  for (const auto& e : std::filesystem::directory_iterator(token_.dir() / "tokens")) {
    if (std::filesystem::exists(e.path() / "token.object")) token_object = (e.path() / "token.object").string();
  }
  ASSERT_FALSE(token_object.empty());
  const std::string token_object_before = ReadFile(token_object);

  std::mt19937 rng(20261129);
  int killed_mid_run = 0;
  int killed_inside_rotation = 0;  // after the killed run's first "re-sealed" line
  int killed_in_softhsm_login = 0;
  size_t half_written = 0;
  for (int run = 0; run < kRuns; ++run) {
    RunOptions o;
    if (run % 2 == 0) {
      o.kill_after = std::chrono::microseconds(std::uniform_int_distribution<int64_t>(0, span.count())(rng));
    } else {
      // Within the first third of the measured re-sealing: a run faster
      // than the measured one (the measured run is the first, on a cold
      // token and page cache) must still be inside it. Over the whole of
      // it, a CI run once saw 6 of 10 placed kills land after the end.
      o.kill_after_stderr = kResealed;
      o.kill_after = std::chrono::microseconds(std::uniform_int_distribution<int64_t>(0, rotating.count() / 3)(rng));
    }
    auto k = Cli({"kek", "rotate", "payments", "--batch", "4", "--progress", "lines"}, "", o);
    if (k.exit_code == 137) ++killed_mid_run;
    if (k.exit_code == 137 && k.err.find(kResealed) != std::string::npos) ++killed_inside_rotation;
    if (k.exit_code == 137 && ReadFile(token_object).size() < token_object_before.size()) {
      ++killed_in_softhsm_login;
      WriteFile(token_object, token_object_before);
    }
    // Run again: it finishes what the killed run left (or rotates once more).
    auto again = Cli({"kek", "rotate", "payments", "--batch", "4"});
    ASSERT_EQ(again.exit_code, 0) << "run " << run << ": " << again.err;

    auto keks = Json({"kek", "list", "payments"});
    int active = 0;
    for (const auto& kk : keks) {
      EXPECT_TRUE(kk["state"] == "active" || kk["state"] == "destroyed") << kk.dump();
      if (kk["state"] == "active") {
        ++active;
        EXPECT_EQ(kk["sealed_versions"], kSecrets);
      } else {
        EXPECT_EQ(kk["sealed_versions"], 0);
      }
    }
    EXPECT_EQ(active, 1);
    auto info = Cli({"--json", "token", "info"});
    ASSERT_EQ(info.exit_code, 0) << "run " << run << ": token info: " << info.err;
    size_t objects = 0, unreadable = 0;
    const auto listed = nlohmann::json::parse(info.out);
    for (const auto& ob : listed["objects"]) {
      if (ob.contains("unreadable")) ++unreadable;
      if (ob.value("label", "").rfind("custody:kek:payments:", 0) == 0) ++objects;
    }
    EXPECT_EQ(objects, 1u) << "run " << run << ": one KEK object in the token, no leftovers\n" << info.out;
    // SoftHSM2 writes a new key's file in place; a kill inside C_GenerateKey
    // can leave it cut before its label, where nobody can tell whose it is
    // (docs/ROTATION.md). Only a kill can leave one.
    if (unreadable > half_written) {
      EXPECT_EQ(k.exit_code, 137) << "run " << run << ": an unreadable object appeared without a kill";
      half_written = unreadable;
    }
    check_all(run);
  }
  // Where the unplaced kills land depends on the machine's speed; the placed
  // ones start their clock at the progress line, so most land inside the
  // rotation (a run three times faster than the measured one can still
  // finish first).
  EXPECT_GE(killed_mid_run, 1) << "no kill landed before the run finished";
  EXPECT_GE(killed_inside_rotation, kRuns / 4)
      << "only " << killed_inside_rotation << " of " << kRuns
      << " kills landed after a killed run's first \"re-sealed\" line; re-sealing took about " << rotating.count()
      << " us of " << span.count() << " us";
  std::cout << killed_inside_rotation << " of " << kRuns << " kill(s) landed inside the rotation, "
            << killed_mid_run << " before the run finished\n";
  if (killed_in_softhsm_login > 0) {
    std::cout << killed_in_softhsm_login << " kill(s) landed inside SoftHSM2's token.object rewrite at login\n";
  }
  if (half_written > 0) std::cout << half_written << " kill(s) left a half-written key file that the token cannot describe\n";
  // And through the binary, as a user reads them.
  EXPECT_EQ(Get("payments/prod/s1"), "value-1");
  EXPECT_EQ(Get("payments/dev/s58"), "value-58");
}

}  // namespace
}  // namespace custody::test
