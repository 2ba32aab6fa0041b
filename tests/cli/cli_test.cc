// The `custody` binary end to end: a real SoftHSM2 token, a real SQLite file,
// real processes. Each test asserts what a user would see: the exit code, the
// one line on stderr, and that nothing was written when something failed.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "../support/cli_fixture.h"
#include "custody/hsm/pkcs11.h"

namespace custody::test {
namespace {

constexpr const char* kSecret = "sk-live-51H8xQzLkT0pSecretValue9876";

// Tests run as root: root is the admin and owner of both projects.
constexpr const char* kPolicy = R"(version = 1
admins = ["user:root"]

[principals."user:root"]
uid = 0

[projects.payments.environments.dev]
production = false
[projects.payments.environments.staging]
production = false
[projects.payments.environments.prod]
[[projects.payments.grants]]
principal = "user:root"
role = "owner"

[projects.billing.environments.prod]
[[projects.billing.grants]]
principal = "user:root"
role = "owner"
)";

class CliTest : public CliFixture {
 protected:
  void SetUp() override { InitWithPolicy(token_, kPolicy); }

  // `custody --json secret list`, for the "nothing was written" checks: a
  // list that failed (or printed something that is not JSON) would find
  // nothing too, so it fails the test instead of passing it.
  std::string SecretList() {
    auto r = Cli({"--json", "secret", "list"});
    EXPECT_EQ(r.exit_code, 0) << "secret list failed, so it cannot show that nothing was written: " << r.err;
    EXPECT_TRUE(nlohmann::json::accept(r.out)) << "secret list printed no JSON: " << r.out;
    return r.exit_code == 0 && nlohmann::json::accept(r.out) ? r.out : "<secret list failed>";
  }

  // Runs SQL against the store file directly, as an attacker with file access could.
  void Sql(const std::string& sql) { ExecSql(token_.store_path(), sql); }

  // Takes the pin_file line out of the config: the PIN must then come from
  // CUSTODY_PIN or --pin-fd.
  void DropPinFile() {
    std::string cfg = ReadFile(token_.config_path());
    size_t at = cfg.find("pin_file");
    cfg.erase(at, cfg.find('\n', at) - at + 1);
    WriteFile(token_.config_path(), cfg);
  }
  // A pipe holding the PIN (and a newline), its writing end closed: the
  // reading end is for --pin-fd, and the caller closes it.
  static void PinPipe(int& read_end) {
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    std::string pin = std::string(SoftHsmToken::kPin) + "\n";
    ASSERT_EQ(::write(fds[1], pin.data(), pin.size()), static_cast<ssize_t>(pin.size()));
    ::close(fds[1]);
    read_end = fds[0];
  }

  // The refusal, and never the secret these tests store.
  static void ExpectOneLine(const RunResult& r, int code, const std::string& says) {
    test::ExpectOneLine(r, code, says);
    EXPECT_EQ(r.err.find(kSecret), std::string::npos);
  }
};

TEST_F(CliTest, PutGetListDelete) {
  Put("payments/prod/stripe", std::string(kSecret) + "\n");
  auto get = Cli({"secret", "get", "payments/prod/stripe"});
  ASSERT_EQ(get.exit_code, 0) << get.err;
  EXPECT_EQ(get.out, kSecret) << "trailing newline dropped on put, none added on get";

  Put("payments/prod/stripe", "second-value");
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out, "second-value");
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe", "--version", "1"}).out, kSecret);

  auto list = Cli({"secret", "list", "payments/prod"});
  ASSERT_EQ(list.exit_code, 0);
  EXPECT_NE(list.out.find("payments/prod/stripe  2       2"), std::string::npos) << list.out;
  EXPECT_EQ(list.out.find(kSecret), std::string::npos);

  auto del = Cli({"secret", "delete", "payments/prod/stripe"});
  ASSERT_EQ(del.exit_code, 0) << del.err;
  ExpectOneLine(Cli({"secret", "get", "payments/prod/stripe"}), 66, "'payments/prod/stripe' does not exist");
}

TEST_F(CliTest, ProjectsAndEnvironments) {
  auto list = Cli({"--json", "project", "list"});
  ASSERT_EQ(list.exit_code, 0);
  EXPECT_NE(list.out.find("\"payments\""), std::string::npos);
  EXPECT_NE(list.out.find("\"staging\""), std::string::npos);
  auto created = Cli({"env", "create", "payments", "qa"});
  ASSERT_EQ(created.exit_code, 0) << created.err;
  EXPECT_NE(created.err.find("not in the policy in force"), std::string::npos) << created.err;
  // Until the policy names it, nobody may use it: deny by default.
  ExpectOneLine(Cli({"secret", "put", "payments/qa/key"}, "v"), 77,
                "environment 'qa' of project payments is not in the policy in force");
  ExpectOneLine(Cli({"env", "create", "payments", "qa"}), 64, "already exists");
  ExpectOneLine(Cli({"env", "create", "nope", "qa"}), 77, "project 'nope' is not in the policy in force");
}

TEST_F(CliTest, TokenInfoShowsTheKekAsNonExtractable) {
  auto r = Cli({"--json", "token", "info"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"label\": \"custody:kek:payments:v1\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"extractable\": false"), std::string::npos);
  EXPECT_NE(r.out.find("\"never_extractable\": true"), std::string::npos);
  EXPECT_EQ(r.out.find("\"extractable\": true"), std::string::npos);
}

// The attributes of a SoftHSM2 2.6.1 object file, each with where it ends
// and, for a ulong, its value. The file is a u64 generation, then per
// attribute a u64 type, a u64 kind (1 bool, 2 ulong, 3 bytes) and the value
// (bytes: a u64 length first), big-endian; kinds past 3 (templates,
// mechanism sets) come after the ones read here. A private object's byte
// values are encrypted; their lengths and its ulongs are not.
struct SoftHsmAttribute {
  size_t end = 0;
  uint64_t ulong = 0;
};
std::map<uint64_t, SoftHsmAttribute> SoftHsmAttributes(const std::string& f) {
  auto u64 = [&](size_t at) {
    uint64_t v = 0;
    for (size_t i = 0; i < 8 && at + i < f.size(); ++i) v = (v << 8) | static_cast<uint8_t>(f[at + i]);
    return v;
  };
  std::map<uint64_t, SoftHsmAttribute> out;
  for (size_t at = 8; at + 16 <= f.size();) {
    uint64_t type = u64(at), kind = u64(at + 8);
    if (kind < 1 || kind > 3) break;  // attribute templates and mechanism sets: not needed here
    size_t end = at + 16 + (kind == 1 ? 1 : kind == 2 ? 8 : 8 + u64(at + 16));
    out[type] = {end, kind == 2 ? u64(at + 16) : 0};
    at = end;
  }
  return out;
}

// What a process killed inside C_GenerateKey leaves in a SoftHSM2 token: an
// object file cut short (SoftHSM writes it in place, attribute by
// attribute). Made here by copying a KEK's file under a new name and
// cutting it just after its label, where SoftHSM 2.6.1 lists the object but
// cannot describe it. The inventory must show it, not fail on it, and
// nothing else may change.
TEST_F(CliTest, TokenInfoShowsAHalfWrittenObjectAsUnreadableAndGoesOn) {
  Put("payments/prod/stripe", kSecret);
  auto listed = [&] {
    auto js = Cli({"--json", "token", "info"});
    EXPECT_EQ(js.exit_code, 0) << js.err;
    return nlohmann::json::parse(js.out.empty() ? "{}" : js.out).value("objects", nlohmann::json::array());
  };
  const auto before = listed();
  ASSERT_FALSE(before.empty());
  // A secret key's file, as the rotation's C_GenerateKey writes: SoftHSM
  // shows other classes cut at the same place differently.
  std::string some_object;
  size_t cut = std::string::npos;
  for (const std::string& file : token_.ObjectFiles()) {
    auto attrs = SoftHsmAttributes(ReadFile(file));
    if (attrs.count(CKA_CLASS) && attrs[CKA_CLASS].ulong == CKO_SECRET_KEY && attrs.count(CKA_LABEL)) {
      some_object = file;
      cut = attrs[CKA_LABEL].end;
    }
  }
  ASSERT_FALSE(some_object.empty()) << "no secret key file in the SoftHSM2 2.6.1 object file format";
  const std::string whole = ReadFile(some_object);
  const std::string dir = std::filesystem::path(some_object).parent_path().string();
  WriteFile(dir + "/0badc0de-0000-4000-8000-000000000001.object", whole.substr(0, cut));
  WriteFile(dir + "/0badc0de-0000-4000-8000-000000000001.lock", "");

  auto text = Cli({"token", "info"});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_NE(text.out.find("(unreadable: CKR_ATTRIBUTE_VALUE_INVALID)"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("1 object(s) the token lists but cannot describe"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("custody:kek:payments:v1"), std::string::npos) << text.out;
  auto after = listed();
  ASSERT_EQ(after.size(), before.size() + 1) << after.dump();
  size_t unreadable = 0;
  for (const auto& o : after) {
    if (o.contains("unreadable")) {
      ++unreadable;
      EXPECT_EQ(o["unreadable"], "CKR_ATTRIBUTE_VALUE_INVALID");
      EXPECT_FALSE(o.contains("label"));
    }
  }
  EXPECT_EQ(unreadable, 1u) << after.dump();
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out, kSecret);
  auto rotated = Cli({"kek", "rotate", "payments"});
  EXPECT_EQ(rotated.exit_code, 0) << rotated.err;
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out, kSecret);
}

TEST_F(CliTest, TheStoreFileNeverHoldsThePlaintext) {
  Put("payments/prod/stripe", kSecret);
  Put("payments/dev/stripe", kSecret);
  ASSERT_EQ(Cli({"secret", "list"}).exit_code, 0);
  for (const char* suffix : {"", "-wal", "-shm"}) {
    std::string data = ReadFile(token_.store_path() + suffix);
    EXPECT_EQ(data.find(kSecret), std::string::npos) << "plaintext found in custody.db" << suffix;
    EXPECT_EQ(data.find("sk-live-51H8"), std::string::npos) << suffix;
  }
  std::string config = ReadFile(token_.config_path());
  EXPECT_EQ(config.find(SoftHsmToken::kPin), std::string::npos) << "the config must not hold the PIN";
  struct stat st {};
  ASSERT_EQ(::stat(token_.store_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(CliTest, GetToFileCreatesItPrivate) {
  Put("payments/prod/stripe", kSecret);
  std::string out = token_.dir() / "out.txt";
  auto r = Cli({"secret", "get", "payments/prod/stripe", "--out", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "") << "the value goes to the file only";
  EXPECT_EQ(ReadFile(out), kSecret);
  struct stat st {};
  ASSERT_EQ(::stat(out.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

// --out never writes through a name another user can take first: a file or
// a symlink at the old predictable FILE.custody-tmp (in a shared folder)
// neither stops the command nor is touched, and an existing FILE is
// replaced whole and made private.
TEST_F(CliTest, GetToFileIgnoresWhatOthersPutBesideIt) {
  Put("payments/prod/stripe", kSecret);
  std::string shared = token_.dir() / "shared";
  ASSERT_EQ(::mkdir(shared.c_str(), 01777), 0);
  ASSERT_EQ(::chmod(shared.c_str(), 01777), 0);
  auto expect_written = [&](const std::string& out) {
    auto r = Cli({"secret", "get", "payments/prod/stripe", "--out", out});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(ReadFile(out), kSecret);
    struct stat st {};
    ASSERT_EQ(::lstat(out.c_str(), &st), 0);
    EXPECT_TRUE(S_ISREG(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  };

  // Someone else's file at the old temporary name.
  std::string a = shared + "/a.key";
  WriteFile(a + ".custody-tmp", "not yours");
  ASSERT_EQ(::chmod((a + ".custody-tmp").c_str(), 0644), 0);
  expect_written(a);
  EXPECT_EQ(ReadFile(a + ".custody-tmp"), "not yours");

  // A symlink there, pointing at a file the attacker wants overwritten.
  std::string b = shared + "/b.key", victim = token_.dir() / "victim";
  WriteFile(victim, "victim's data");
  ASSERT_EQ(::symlink(victim.c_str(), (b + ".custody-tmp").c_str()), 0);
  expect_written(b);
  EXPECT_EQ(ReadFile(victim), "victim's data");
  struct stat st {};
  ASSERT_EQ(::lstat((b + ".custody-tmp").c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));

  // An existing, readable FILE is replaced, and is private after.
  std::string c = shared + "/c.key";
  WriteFile(c, "old value");
  ASSERT_EQ(::chmod(c.c_str(), 0644), 0);
  expect_written(c);

  // Nothing else is left in the folder: no temporary file, whole or half.
  std::set<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(shared)) names.insert(e.path().filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"a.key", "a.key.custody-tmp", "b.key", "b.key.custody-tmp", "c.key"}));
}

// The same --out where the unnamed temporary file cannot be used: a
// filesystem without O_TMPFILE (a random O_EXCL name instead), and a host
// where the unnamed file cannot be given a name (no /proc, no capability
// for linkat AT_EMPTY_PATH: it is copied into a random named file). Made so
// by an LD_PRELOAD shim that also notes each refusal, so the fallback is
// known to have run. Same result: the value, 0600, nothing else left.
TEST_F(CliTest, GetToFileWorksWhereTheUnnamedFileCannotBeUsed) {
  Put("payments/prod/stripe", kSecret);
  std::string shared = token_.dir() / "shared";
  ASSERT_EQ(::mkdir(shared.c_str(), 0700), 0);
  std::string asan = std::getenv("ASAN_OPTIONS") ? std::getenv("ASAN_OPTIONS") : "";
  for (const auto& [mode, refusal] : std::vector<std::pair<std::string, std::string>>{
           {"open", "open O_TMPFILE refused"}, {"link", "linkat AT_EMPTY_PATH refused"}}) {
    SCOPED_TRACE(mode);
    const std::string out = shared + "/" + mode + ".key", log = token_.dir() / (mode + ".shim");
    WriteFile(out, "old value");
    auto r = Cli({"secret", "get", "payments/prod/stripe", "--out", out}, "",
                 {.env = {{"LD_PRELOAD", NO_TMPFILE},
                          {"CUSTODY_TEST_NO_TMPFILE", mode},
                          {"CUSTODY_TEST_NO_TMPFILE_LOG", log},
                          {"ASAN_OPTIONS", asan + (asan.empty() ? "" : ":") + "verify_asan_link_order=0"}}});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(ReadFile(log).find(refusal), std::string::npos) << "the fallback did not run: " << ReadFile(log);
    EXPECT_EQ(ReadFile(out), kSecret);
    struct stat st {};
    ASSERT_EQ(::lstat(out.c_str(), &st), 0);
    EXPECT_TRUE(S_ISREG(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }
  std::set<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(shared)) names.insert(e.path().filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"link.key", "open.key"})) << "a temporary file was left";
}

TEST_F(CliTest, PutFromFileAndPinFromEnvironmentOrDescriptor) {
  std::string f = token_.dir() / "value";
  WriteFile(f, "from-a-file");
  DropPinFile();

  ExpectOneLine(Cli({"secret", "put", "payments/prod/a", "--from-file", f}), 78, "no PIN given");
  auto r = Cli({"secret", "put", "payments/prod/a", "--from-file", f}, "",
               {.env = {{"CUSTODY_PIN", SoftHsmToken::kPin}}});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  int pin_fd = -1;
  ASSERT_NO_FATAL_FAILURE(PinPipe(pin_fd));
  auto g = Cli({"--pin-fd", std::to_string(pin_fd), "secret", "get", "payments/prod/a"}, "", {.keep_fds = {pin_fd}});
  ::close(pin_fd);
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_EQ(g.out, "from-a-file");
}

// --- Bad input: one line, the documented code, nothing written. ---

TEST_F(CliTest, UnknownSecretOrVersionIs66AndUnknownProjectOrEnvironmentIsDenied) {
  // The policy is asked first: what it does not name is refused (77) without
  // saying whether it exists.
  ExpectOneLine(Cli({"secret", "put", "nope/prod/x"}, "v"), 77, "project 'nope' is not in the policy in force");
  ExpectOneLine(Cli({"secret", "put", "payments/qa/x"}, "v"), 77,
                "environment 'qa' of project payments is not in the policy in force");
  ExpectOneLine(Cli({"secret", "get", "payments/prod/x"}), 66, "secret 'payments/prod/x' does not exist");
  Put("payments/prod/x", "v");
  ExpectOneLine(Cli({"secret", "get", "payments/prod/x", "--version", "9"}), 66, "has no version 9");
  ExpectOneLine(Cli({"secret", "list", "nope"}), 66, "project 'nope' does not exist");
  ExpectOneLine(Cli({"secret", "delete", "payments/dev/x"}), 66, "does not exist");
  EXPECT_EQ(SecretList().find("\"nope\""), std::string::npos);
}

TEST_F(CliTest, WrongPinIs77AndWritesNothing) {
  WriteFile(token_.pin_file(), "wrong-pin-0000\n");
  auto r = Cli({"secret", "put", "payments/prod/stripe"}, kSecret);
  ExpectOneLine(r, 77, "CKR_PIN_INCORRECT");
  EXPECT_EQ(r.err.find("wrong-pin-0000"), std::string::npos);
  EXPECT_EQ(SecretList().find("stripe"), std::string::npos);
}

TEST_F(CliTest, MissingModuleIs78AndMissingTokenIs69) {
  std::string cfg = ReadFile(token_.config_path());
  std::string broken = cfg;
  broken.replace(broken.find("/usr/lib/softhsm/libsofthsm2.so"), 31, "/nonexistent/module.so");
  WriteFile(token_.config_path(), broken);
  ExpectOneLine(Cli({"secret", "put", "payments/prod/a"}, "v"), 78, "PKCS#11 module /nonexistent/module.so not found");

  broken = cfg;
  broken.replace(broken.find("token=custody-test"), 18, "token=elsewhere");
  WriteFile(token_.config_path(), broken);
  ExpectOneLine(Cli({"secret", "put", "payments/prod/a"}, "v"), 69, "no token matches pkcs11:token=elsewhere");
  WriteFile(token_.config_path(), cfg);
  EXPECT_EQ(SecretList().find("\"a\""), std::string::npos);
}

TEST_F(CliTest, TruncatedOrCorruptedBlobIs65) {
  Put("payments/prod/stripe", kSecret);
  Sql("UPDATE secret_versions SET blob = substr(blob, 1, length(blob) - 5)");
  ExpectOneLine(Cli({"secret", "get", "payments/prod/stripe"}), 65, "failed authentication");
  Sql("UPDATE secret_versions SET blob = substr(blob, 1, 30)");
  ExpectOneLine(Cli({"secret", "get", "payments/prod/stripe"}), 65, "truncated");

  Put("payments/prod/other", kSecret);
  // Flip one ciphertext byte (offset 45, past the 40-byte header).
  Sql("UPDATE secret_versions SET blob = substr(blob, 1, 44) || "
      "CASE WHEN substr(blob, 45, 1) = X'00' THEN X'01' ELSE X'00' END || substr(blob, 46) "
      "WHERE secret_id = (SELECT id FROM secrets WHERE name = 'other')");
  ExpectOneLine(Cli({"secret", "get", "payments/prod/other"}), 65, "failed authentication");
}

TEST_F(CliTest, BlobMovedToAnotherNameEnvironmentProjectOrVersionIs65) {
  Put("payments/prod/stripe", kSecret);
  Put("payments/prod/github", "gh-value");
  Put("payments/dev/stripe", "dev-value");
  Put("billing/prod/stripe", "billing-value");
  Put("payments/prod/stripe", "v2-value");
  const std::string src =
      "(SELECT v.blob FROM secret_versions v JOIN secrets s ON s.id = v.secret_id JOIN environments e ON "
      "e.id = s.environment_id JOIN projects p ON p.id = e.project_id WHERE p.name = 'payments' AND e.name = 'prod' "
      "AND s.name = 'stripe' AND v.version = 1)";
  auto target = [](const std::string& project, const std::string& env, const std::string& name, int version) {
    return "secret_id = (SELECT s.id FROM secrets s JOIN environments e ON e.id = s.environment_id JOIN projects p "
           "ON p.id = e.project_id WHERE p.name = '" + project + "' AND e.name = '" + env + "' AND s.name = '" +
           name + "') AND version = " + std::to_string(version);
  };
  Sql("UPDATE secret_versions SET blob = " + src + " WHERE " + target("payments", "prod", "github", 1));
  ExpectOneLine(Cli({"secret", "get", "payments/prod/github"}), 65, "failed authentication");
  Sql("UPDATE secret_versions SET blob = " + src + " WHERE " + target("payments", "dev", "stripe", 1));
  ExpectOneLine(Cli({"secret", "get", "payments/dev/stripe"}), 65, "failed authentication");
  Sql("UPDATE secret_versions SET blob = " + src + " WHERE " + target("payments", "prod", "stripe", 2));
  ExpectOneLine(Cli({"secret", "get", "payments/prod/stripe"}), 65, "failed authentication");
  // To another project: the blob also names a KEK that is not billing's.
  Sql("UPDATE secret_versions SET blob = " + src + " WHERE " + target("billing", "prod", "stripe", 1));
  ExpectOneLine(Cli({"secret", "get", "billing/prod/stripe"}), 65, "store records another");
  // The original is still fine.
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe", "--version", "1"}).out, kSecret);
}

TEST_F(CliTest, UnwritableOrCorruptStore) {
  std::string cfg = ReadFile(token_.config_path());
  std::string dir_store = cfg;
  // A folder where the store should be: it cannot be opened as a file.
  std::filesystem::create_directories(token_.dir() / "a-folder");
  dir_store.replace(dir_store.find(token_.store_path()), token_.store_path().size(), token_.dir() / "a-folder");
  WriteFile(token_.config_path(), dir_store);
  ExpectOneLine(Cli({"secret", "list"}), 69, "cannot open store");

  std::string garbage = token_.dir() / "garbage.db";
  WriteFile(garbage, std::string(8192, 'z'));
  std::string bad = cfg;
  bad.replace(bad.find(token_.store_path()), token_.store_path().size(), garbage);
  WriteFile(token_.config_path(), bad);
  ExpectOneLine(Cli({"secret", "put", "payments/prod/x"}, "v"), 65, "corrupt or not a custody store");
  EXPECT_EQ(ReadFile(garbage), std::string(8192, 'z')) << "a corrupt store must not be modified";
}

// An empty value is a usage error (64), recorded, as through custodyd: one
// flow for both (issue 14; it was 65 here and 64 there).
TEST_F(CliTest, EmptyValueIs64AndStoresNothing) {
  ExpectOneLine(Cli({"secret", "put", "payments/prod/stripe"}, ""), 64, "empty value");
  ExpectOneLine(Cli({"secret", "put", "payments/prod/stripe"}, "\n"), 64, "empty value");
  EXPECT_EQ(SecretList().find("stripe"), std::string::npos);
}

TEST_F(CliTest, UsageErrorsAre64) {
  ExpectOneLine(Cli({"secret", "put", "payments/prod"}), 64, "PROJECT/ENV/NAME");
  ExpectOneLine(Cli({"secret", "get", "Payments/prod/x"}), 64, "project name 'Payments' is not allowed");
  ExpectOneLine(Cli({"frobnicate"}), 64, "frobnicate");
  // There is no way to pass a PIN or a value in argv.
  ExpectOneLine(Cli({"--pin", "1234", "secret", "list"}), 64, "--pin");
  ExpectOneLine(Cli({"secret", "put", "payments/prod/x", "sk-live-value"}), 64, "sk-live-value");
  ExpectOneLine(Cli({"project", "create", "payments"}), 64, "project 'payments' already exists");
  ExpectOneLine(Cli({"project", "create", "new", "--env", "prod,prod"}), 64, "listed twice");
  EXPECT_EQ(Cli({"project", "list"}).out.find("new"), std::string::npos);
}

// An option given an empty value (a script's "$V" with V unset) is refused
// naming it. CLI11 read it as not given or as 0: `secret get --version ""`
// printed the newest version, `revoke --version ""` went for version 0,
// `--pin-fd ""` looked for the PIN elsewhere, `--timeout ""` ran the
// provider with no time at all.
TEST_F(CliTest, AnEmptyOptionValueIsRefusedNamingTheOption) {
  Put("payments/prod/stripe", "first");
  Put("payments/prod/stripe", "second");
  ExpectOneLine(Cli({"secret", "get", "payments/prod/stripe", "--version", ""}), 64, "--version: empty; give a number");
  ExpectOneLine(Cli({"secret", "get", "payments/prod/stripe", "--version="}), 64, "--version");
  ExpectOneLine(Cli({"secret", "revoke", "payments/prod/stripe", "--version", "", "--reason", "leaked"}), 64,
                "--version: empty; give a number");
  ExpectOneLine(Cli({"--pin-fd", "", "secret", "list"}), 64, "--pin-fd: empty; give a number");
  ExpectOneLine(Cli({"secret", "list", "--pin-fd", ""}), 64, "--pin-fd: empty; give a number");
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/stripe", "--generate", ""}), 64, "--generate: empty");
  ExpectOneLine(Cli({"secret", "rotate", "payments/prod/stripe", "--exec", "/bin/echo", "--timeout", ""}), 64,
                "--timeout: empty; give a number");
  ExpectOneLine(Cli({"kek", "rotate", "payments", "--batch", ""}), 64, "--batch: empty; give a number");
  ExpectOneLine(Cli({"audit", "show", "--since", ""}), 64, "--since: empty; give a value");
  ExpectOneLine(Cli({"--config", "", "secret", "list"}), 64, "--config: empty; give a value");
  // Nothing happened: both versions are there and readable, the newest is 2.
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe", "--version", "1"}).out, "first");
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out, "second");
  // An empty --prefix is no prefix, as before.
  auto rot = Cli({"secret", "rotate", "payments/prod/stripe", "--generate", "16", "--format", "hex", "--prefix", ""});
  EXPECT_EQ(rot.exit_code, 0) << rot.err;
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out.size(), 32u);
}

// Bytes that are not UTF-8 (or control characters) in an argument that goes
// into the audit record are refused before anything happens: exit 64, one
// line naming the argument, the bytes never echoed. (They used to reach the
// audit writer, whose JSON serializer threw: exit 134, no record, and for
// revoke the version not revoked either.)
TEST_F(CliTest, ArgumentsThatAreNotTextAreRefusedNamingTheArgument) {
  Put("payments/prod/stripe", "one");
  Put("payments/prod/stripe", "two");
  const std::string bad = "\xff\xfe\xc3";  // not UTF-8: a lone lead byte at the end
  auto refused = [&](const std::vector<std::string>& args, const std::string& arg,
                     const std::string& says = " is not valid UTF-8 text") {
    auto r = Cli(args);
    ExpectOneLine(r, 64, arg + says);
    EXPECT_EQ(r.err.find('\xff'), std::string::npos) << "the refused bytes are not echoed";
    EXPECT_EQ(r.out, "");
  };
  refused({"policy", "explain", "user:r" + bad, "get", "payments/prod/stripe"}, "PRINCIPAL");
  refused({"policy", "explain", "user:root", "get", "payments/prod/" + bad}, "TARGET");
  refused({"policy", "explain", "user:root", "get", "pay" + bad + "/prod/x"}, "TARGET");
  refused({"audit", "show", "--project", "pay" + bad}, "--project");
  refused({"--json", "audit", "show", "--project", bad}, "--project");
  refused({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "leaked " + bad}, "--reason");
  // Free text is one line of UTF-8: no newline, no other control
  // character (DEL, or U+009B, a terminal's escape), and not too long.
  std::string controls = " holds a control character";
  refused({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "two\nlines"}, "--reason",
          controls);
  refused({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "del\x7f"}, "--reason", controls);
  refused({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "csi\xc2\x9b" "31m"}, "--reason",
          controls);
  refused({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", std::string(501, 'x')}, "--reason",
          " is longer than 500 bytes");
  // A malformed principal name is refused as such, before any record.
  ExpectOneLine(Cli({"policy", "explain", "root", "get", "payments/prod/stripe"}), 64, "PRINCIPAL 'root'");
  ExpectOneLine(Cli({"policy", "explain", "user:root", "get", "payments/PROD/x"}), 64,
                "TARGET: environment name 'PROD' is not allowed");

  // Nothing was revoked: version 2 is still the current one.
  auto versions = Cli({"--json", "secret", "versions", "payments/prod/stripe"});
  ASSERT_EQ(versions.exit_code, 0) << versions.err;
  auto list = nlohmann::json::parse(versions.out);
  ASSERT_EQ(list.size(), 2u);
  for (const auto& v : list) EXPECT_FALSE(v.contains("revoked_at")) << v.dump();
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe"}).out, "two");

  // Text that is UTF-8 is taken as it is, and recorded.
  auto r = Cli({"secret", "revoke", "payments/prod/stripe", "--version", "2", "--reason", "fuite: cl\xc3\xa9 r\xc3\xa9\xc3\xa9mise"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto shown = Cli({"--json", "audit", "show", "--action", "secret.revoke"});
  ASSERT_EQ(shown.exit_code, 0) << shown.err;
  EXPECT_NE(shown.out.find("fuite: cl\xc3\xa9 r\xc3\xa9\xc3\xa9mise"), std::string::npos) << shown.out;
  // The log is intact: every refusal above stopped before it.
  EXPECT_EQ(Cli({"audit", "verify"}).exit_code, 0);
}

// The same for the environment: a config path that is not text is refused
// (78) before it can be named in a record or an answer.
TEST_F(CliTest, EnvironmentValuesThatAreNotTextAreRefused) {
  auto r = Cli({"--json", "secret", "list"}, "",
               {.env = {{"CUSTODY_CONFIG", token_.dir() / "st\xffte/custody.toml"}}});
  ExpectOneLine(r, 78, "environment variable CUSTODY_CONFIG is not valid UTF-8 text");
  ExpectOneLine(Cli({"--config", token_.dir() / "\xff.toml", "secret", "list"}), 64, "--config is not valid UTF-8 text");
}

TEST_F(CliTest, DuplicateProjectLeavesNoKekInTheToken) {
  ASSERT_EQ(Cli({"project", "create", "payments"}).exit_code, 64);
  auto info = Cli({"--json", "token", "info"});
  // One KEK per project of the policy (payments, billing), no more.
  EXPECT_NE(info.out.find("custody:kek:payments:v1"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("custody:kek:billing:v1"), std::string::npos) << info.out;
  size_t count = 0;
  for (size_t at = info.out.find("custody:kek:"); at != std::string::npos; at = info.out.find("custody:kek:", at + 1)) {
    ++count;
  }
  EXPECT_EQ(count, 2u) << info.out;
}

// The duplicate above is refused before a KEK is made. Here `project
// create` loses a race: another writer creates the project between the
// existence check and the insert (a trigger in the store stands in for it,
// inserting the name just before custody's row), so the refusal comes after
// the KEK exists, and the KEK must go again. Counted on the token: no object
// with the project's KEK label, and only the policy's two KEKs.
TEST_F(CliTest, AProjectCreateThatLosesARaceLeavesNoKekInTheToken) {
  Sql("CREATE TRIGGER created_concurrently BEFORE INSERT ON projects WHEN NEW.name = 'ledger' "
      "BEGIN INSERT INTO projects(name, created_at) VALUES (NEW.name, 0); END");
  ExpectOneLine(Cli({"project", "create", "ledger"}), 64, "project 'ledger' already exists");
  auto info = Cli({"--json", "token", "info"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  auto objects = nlohmann::json::parse(info.out).at("objects");
  std::map<std::string, int> keks;  // KEK label: objects with it
  for (const auto& o : objects) {
    ASSERT_TRUE(o.contains("label")) << "an unreadable object on the token: " << o.dump();
    const auto label = o.at("label").get<std::string>();
    if (label.rfind("custody:kek:", 0) == 0) ++keks[label];
  }
  EXPECT_EQ(keks.count("custody:kek:ledger:v1"), 0u) << info.out;
  EXPECT_EQ(keks, (std::map<std::string, int>{{"custody:kek:billing:v1", 1}, {"custody:kek:payments:v1", 1}}))
      << info.out;
  EXPECT_EQ(Cli({"--json", "project", "list"}).out.find("ledger"), std::string::npos);
}

// A PIN in the token URI (pin-value, pin-source) is refused as a config
// error, 78, with the one line naming where the PIN goes instead: given to
// `init`, and found in the config file. Nothing is made by the refused init.
TEST_F(CliTest, APinInTheTokenUriIs78NamingTheFix) {
  const std::string fix =
      "token URI carries a PIN (pin-value or pin-source); give the PIN through pin_file, CUSTODY_PIN or --pin-fd "
      "instead";
  RunOptions o;
  o.env = {{"CUSTODY_CONFIG", token_.dir() / "other.toml"}, {"SOFTHSM2_CONF", token_.conf()}};
  const std::string queries[] = {"?pin-source=file:/tmp/p", "?pin-value=" + std::string(SoftHsmToken::kPin)};
  for (const std::string& query : queries) {
    SCOPED_TRACE(query);
    auto init = RunCustody({"init", "--module", SoftHsmToken::kModule, "--token", token_.uri() + query, "--pin-file",
                            token_.pin_file(), "--state-dir", token_.dir() / "state2"},
                           o);
    ExpectOneLine(init, 78, fix);
    EXPECT_EQ(init.err.find("/tmp/p"), std::string::npos) << init.err;
    EXPECT_FALSE(std::filesystem::exists(token_.dir() / "other.toml"));
    EXPECT_FALSE(std::filesystem::exists(token_.dir() / "state2"));

    const std::string cfg = ReadFile(token_.config_path());
    std::string with_pin = cfg;
    const std::string uri = "'" + token_.uri() + "'";
    ASSERT_NE(with_pin.find(uri), std::string::npos) << cfg;
    with_pin.replace(with_pin.find(uri), uri.size(), "'" + token_.uri() + query + "'");
    WriteFile(token_.config_path(), with_pin);
    auto get = Cli({"secret", "put", "payments/prod/a"}, "v");
    WriteFile(token_.config_path(), cfg);
    ExpectOneLine(get, 78, fix);
    EXPECT_EQ(get.err.find("/tmp/p"), std::string::npos) << get.err;
  }
  EXPECT_EQ(SecretList().find("\"a\""), std::string::npos);
}

TEST_F(CliTest, MissingConfigIs78) {
  RunOptions o;
  o.env = {{"CUSTODY_CONFIG", token_.dir() / "none.toml"}};
  ExpectOneLine(RunCustody({"secret", "list"}, o), 78, "none.toml not found");
}

TEST_F(CliTest, InitRefusesToOverwriteAndChecksTheTokenFirst) {
  ExpectOneLine(Cli({"init", "--module", SoftHsmToken::kModule, "--token", token_.uri(), "--pin-file",
                     token_.pin_file(), "--state-dir", token_.dir() / "state"}),
                64, "already exists");
  RunOptions o;
  o.env = {{"CUSTODY_CONFIG", token_.dir() / "other.toml"}, {"SOFTHSM2_CONF", token_.conf()}};
  WriteFile(token_.dir() / "badpin", "nope-nope\n");
  ::chmod((token_.dir() / "badpin").c_str(), 0600);
  ExpectOneLine(RunCustody({"init", "--module", SoftHsmToken::kModule, "--token", token_.uri(), "--pin-file",
                     token_.dir() / "badpin", "--state-dir", token_.dir() / "state2"},
                    o),
                77, "CKR_PIN_INCORRECT");
  EXPECT_FALSE(std::filesystem::exists(token_.dir() / "other.toml"));
  EXPECT_FALSE(std::filesystem::exists(token_.dir() / "state2"));
}

TEST_F(CliTest, ConcurrentPutsFromSeparateProcessesGetDistinctVersions) {
  constexpr int kProcs = 6;
  std::vector<std::thread> threads;
  std::vector<RunResult> results(kProcs);
  for (int i = 0; i < kProcs; ++i) {
    threads.emplace_back([&, i] { results[i] = Cli({"secret", "put", "payments/prod/shared"}, "value-" + std::to_string(i)); });
  }
  for (auto& t : threads) t.join();
  std::set<std::string> versions;
  for (const auto& r : results) {
    ASSERT_EQ(r.exit_code, 0) << r.err;
    versions.insert(r.out);
  }
  EXPECT_EQ(versions.size(), static_cast<size_t>(kProcs)) << "each put must report its own version";
  for (int v = 1; v <= kProcs; ++v) {
    auto g = Cli({"secret", "get", "payments/prod/shared", "--version", std::to_string(v)});
    ASSERT_EQ(g.exit_code, 0) << g.err;
    EXPECT_EQ(g.out.rfind("value-", 0), 0u);
  }
}

// --- The command line as people type it. ---

// custody-full and custodyd are built beside `custody`, in the build tree's
// tools/ folder; this test runs from its tests/ folder.
std::string BuiltTool(const std::string& name) {
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path().parent_path() / "tools" / name).string();
}

// --config, --json and --pin-fd after the command mean what they mean
// before it (they used to be refused there as unexpected arguments).
TEST_F(CliTest, GlobalOptionsWorkAfterTheCommandToo) {
  Put("payments/prod/stripe", kSecret);
  for (const auto& args : std::vector<std::vector<std::string>>{{"usage", "payments", "--json"},
                                                                {"rotation", "status", "--json"},
                                                                {"secret", "list", "payments/prod", "--json"},
                                                                {"project", "--json", "list"},
                                                                {"--json", "project", "list", "--json"}}) {
    std::string line;
    for (const auto& a : args) line += a + " ";
    auto r = Cli(args);
    ASSERT_EQ(r.exit_code, 0) << line << r.err;
    EXPECT_TRUE(nlohmann::json::accept(r.out)) << line << r.out;
  }
  EXPECT_EQ(Cli({"secret", "list", "payments/prod", "--json"}).out, SecretList());
  // A --config after the command is the one used: this one does not exist.
  ExpectOneLine(Cli({"secret", "list", "--config", token_.dir() / "absent.toml"}), 78, "absent.toml");
  ExpectOneLine(Cli({"secret", "list", "--config=" + token_.dir() / "absent.toml"}), 78, "absent.toml");
  // Before and after: two configs are a mistake, not a tie for the order to break.
  ExpectOneLine(Cli({"--config", token_.config_path(), "secret", "list", "--config", token_.config_path()}), 64,
                "--config is given twice");
  // exec: before the command's "--" they are custody's, after it the command's.
  auto e =
      Cli({"exec", "--env", "K=payments/prod/stripe", "--json", "--", "/bin/sh", "-c", "printf %s \"$K\"", "--json"});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  EXPECT_EQ(e.out, kSecret);
  ExpectOneLine(Cli({"exec", "--env", "K=payments/prod/stripe", "--bogus", "--", "/bin/true"}), 64, "'--bogus'");
  // --version after a command that has none is still an unknown option.
  ExpectOneLine(Cli({"secret", "list", "--version"}), 64, "--version");

  // The PIN's descriptor, wherever it is given.
  DropPinFile();
  const std::string show = "printf %s \"$K\"";
  for (int form = 0; form < 3; ++form) {
    int pin_fd = -1;
    ASSERT_NO_FATAL_FAILURE(PinPipe(pin_fd));
    const std::string fd = std::to_string(pin_fd);
    const std::vector<std::vector<std::string>> lines = {
        {"secret", "get", "payments/prod/stripe", "--pin-fd", fd},
        {"secret", "get", "payments/prod/stripe", "--pin-fd=" + fd},
        {"exec", "--env", "K=payments/prod/stripe", "--pin-fd", fd, "--", "/bin/sh", "-c", show}};
    auto g = Cli(lines[form], "", {.keep_fds = {pin_fd}});
    ::close(pin_fd);
    ASSERT_EQ(g.exit_code, 0) << form << ": " << g.err;
    EXPECT_EQ(g.out, kSecret);
  }
}

// One line, the same from the lean front and from custody-full, and from
// custodyd with its own name; no config needed, exit 0.
TEST_F(CliTest, VersionNamesTheReleaseAndTheBackends) {
  const std::string want_suffix = " (backends: pkcs11, tpm)\n";
  auto front = RunCustody({"--version"}, {});
  ASSERT_EQ(front.exit_code, 0) << front.err;
  EXPECT_EQ(front.err, "");
  ASSERT_EQ(front.out.rfind("custody ", 0), 0u) << front.out;
  ASSERT_GE(front.out.size(), want_suffix.size());
  EXPECT_EQ(front.out.substr(front.out.size() - want_suffix.size()), want_suffix) << front.out;
  std::string version = front.out.substr(8, front.out.size() - 8 - want_suffix.size());
  EXPECT_EQ(std::count(version.begin(), version.end(), '.'), 2) << version;
  EXPECT_EQ(version.find_first_not_of("0123456789."), std::string::npos) << version;

  auto full = RunProgram(BuiltTool("custody-full"), {"--version"}, {});
  EXPECT_EQ(full.exit_code, 0) << full.err;
  EXPECT_EQ(full.out, front.out);
  EXPECT_EQ(full.err, "");
  // custody-full answers --version among the global options too.
  EXPECT_EQ(RunCustody({"--json", "--version"}, {}).out, front.out);

  // The front answers by itself: a copy with no custody-full to hand off to.
  std::filesystem::path alone = token_.dir() / "alone";
  std::filesystem::create_directory(alone);
  std::filesystem::copy_file(BuiltTool("custody"), alone / "custody");
  auto lone = RunProgram(alone / "custody", {"--version"}, {});
  EXPECT_EQ(lone.exit_code, 0) << lone.err;
  EXPECT_EQ(lone.out, front.out);

  auto daemon = RunProgram(BuiltTool("custodyd"), {"--version"}, {});
  EXPECT_EQ(daemon.exit_code, 0) << daemon.err;
  EXPECT_EQ(daemon.out, "custodyd " + version + want_suffix);
  EXPECT_EQ(daemon.err, "");

  // Under `secret get`, --version is still the secret's.
  Put("payments/prod/stripe", "one");
  Put("payments/prod/stripe", "two");
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/stripe", "--version", "1"}).out, "one");
}

// A node list that is not one is refused before anything is sent: exit 78,
// one line naming the address (escaped: the variable may hold any bytes).
TEST_F(CliTest, ABadNodeListInCustodyAddrIsRefusedNamingTheAddress) {
  auto with = [&](const std::string& addr) { return Cli({"secret", "get", "payments/prod/stripe"}, "", {.env = {{"CUSTODY_ADDR", addr}}}); };
  ExpectOneLine(with("unix:/run/a.sock,,unix:/run/b.sock"), 78, "CUSTODY_ADDR has an empty address");
  ExpectOneLine(with("unix:/run/a.sock,https://node-b:99999"), 78, "CUSTODY_ADDR 'https://node-b:99999' needs a port from 1 to 65535");
  ExpectOneLine(with("ftp://x"), 78, "CUSTODY_ADDR 'ftp://x' must be unix:/path/to/custody.sock or https://host:port");
  std::string many;
  for (int i = 0; i < 65; ++i) many += (i ? ",unix:/run/n" : "unix:/run/n") + std::to_string(i);
  ExpectOneLine(with(many), 78, "CUSTODY_ADDR names more than 64 nodes");
}

}  // namespace
}  // namespace custody::test
