// `custody sandbox`: the CI job that docs/CI.md shows, run exactly as it is
// written there (the ```sh block after its "tested" marker), as a user's CI
// would run it: custody on a fresh SoftHSM2 token, custodyd serving, a key
// sealed, an application reading it from its environment, custodyd stopped
// and the audit trail checked. Then what the user relies on around it: the
// PINs only in owner-only files (never in the config, the log or an argv
// custody wrote), a second run on the same folder, and --stop with nothing
// running.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "../support/cli_fixture.h"

namespace custody::test {
namespace {

// The documented job: the first ```sh block after the tested marker.
std::string DocumentedJob() {
  const std::string doc = ReadFile(CUSTODY_SOURCE_DIR "/docs/CI.md");
  const size_t marker = doc.find("<!-- tested:");
  if (marker == std::string::npos) return "";
  const size_t start = doc.find("```sh\n", marker);
  const size_t end = doc.find("\n```", start + 6);
  if (start == std::string::npos || end == std::string::npos) return "";
  return doc.substr(start + 6, end - start - 6);
}

RunResult Shell(const std::string& script, const std::string& scratch) {
  const std::string bin_dir = std::filesystem::path(CUSTODY_BIN).parent_path().string();
  RunOptions o;
  o.env = {{"RUNNER_TEMP", scratch}, {"PATH", bin_dir + ":/usr/sbin:/usr/bin:/sbin:/bin"}, {"HOME", scratch}};
  return RunProgram("/bin/bash", {"-euo", "pipefail", "-c", script}, o);
}

TEST(SandboxCliTest, TheDocumentedCiJobRunsAsWritten) {
  const std::string job = DocumentedJob();
  ASSERT_NE(job.find("custody sandbox"), std::string::npos) << "docs/CI.md lost its tested block";
  TempDir scratch;
  auto r = Shell(job, scratch.path());
  ASSERT_EQ(r.exit_code, 0) << job << "\n--- stdout\n" << r.out << "\n--- stderr\n" << r.err;
  EXPECT_NE(r.out.find("the application sees a 40-byte key"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("audit log intact"), std::string::npos) << r.out;

  const std::string dir = scratch / "custody";
  // The PINs: random, in owner-only files, and nowhere else custody wrote.
  for (const char* f : {"user.pin", "so.pin"}) {
    struct stat st {};
    ASSERT_EQ(::stat((dir + "/" + f).c_str(), &st), 0) << f;
    EXPECT_EQ(st.st_mode & 0777, 0600u) << f;
  }
  const std::string user_pin = ReadFile(dir + "/user.pin");
  const std::string so_pin = ReadFile(dir + "/so.pin");
  EXPECT_GE(user_pin.size(), 24u);
  EXPECT_NE(user_pin, so_pin);
  for (const char* f : {"custody.toml", "custodyd.log", "softhsm2.conf", "custody.env"}) {
    const std::string path = std::string(f) == "custody.env" ? scratch / "custody.env" : dir + "/" + f;
    const std::string text = ReadFile(path);
    EXPECT_EQ(text.find(user_pin), std::string::npos) << "the user PIN is in " << path;
    EXPECT_EQ(text.find(so_pin), std::string::npos) << "the SO PIN is in " << path;
  }
  // custodyd is gone after --stop, and --stop again says so (66).
  EXPECT_FALSE(std::filesystem::exists(dir + "/custodyd.pid"));
  auto again = Shell("custody sandbox \"$RUNNER_TEMP/custody\" --stop", scratch.path());
  EXPECT_EQ(again.exit_code, 66) << again.err;
  // A second run on the same folder keeps the token and serves again.
  auto rerun = Shell(". \"$RUNNER_TEMP/custody.env\"; custody sandbox \"$RUNNER_TEMP/custody\" --serve > \"$RUNNER_TEMP/env2\"; "
                     ". \"$RUNNER_TEMP/env2\"; custody secret get myapp/test/api-key | head -c 8; "
                     "custody sandbox \"$RUNNER_TEMP/custody\" --stop",
                     scratch.path());
  EXPECT_EQ(rerun.exit_code, 0) << rerun.out << rerun.err;
  EXPECT_EQ(rerun.out, "sk-test-") << "the key sealed in the first run is still there";
}

TEST(SandboxCliTest, AFolderNameThatCannotBeQuotedIsRefused) {
  TempDir scratch;
  auto r = RunCustody({"sandbox", scratch / "it's"}, {});
  ExpectOneLine(r, 64, "DIR must not hold quotes");
  // The same quote reached through a symlink: the full path is checked too.
  std::filesystem::create_directory(scratch / "it's");
  std::filesystem::create_directory_symlink(scratch / "it's", scratch / "link");
  auto linked = RunCustody({"sandbox", scratch / "link/sb"}, {});
  ExpectOneLine(linked, 64, "holds a quote");
  EXPECT_FALSE(std::filesystem::exists(scratch / "it's/sb/custody.toml"));
}

// Only a folder of the caller's own, new or already a sandbox: another
// user's folder (a config or module planted there would run as the caller)
// and a folder with other things in it are refused, and left as they were.
TEST(SandboxCliTest, SomeoneElsesFolderOrABusyOneIsRefused) {
  TempDir scratch;
  const std::string theirs = scratch / "theirs";
  std::filesystem::create_directory(theirs);
  ASSERT_EQ(::chown(theirs.c_str(), 65534, 65534), 0) << "the tests run as root";
  ExpectOneLine(RunCustody({"sandbox", theirs}, {}), 77, "belongs to another user");
  EXPECT_TRUE(std::filesystem::is_empty(theirs));
  const std::string busy = scratch / "busy";
  std::filesystem::create_directory(busy);
  WriteFile(busy + "/notes.txt", "mine");
  ExpectOneLine(RunCustody({"sandbox", busy, "--project", "x"}, {}), 64, "is not empty and holds no sandbox");
  struct stat st {};
  ASSERT_EQ(::stat(busy.c_str(), &st), 0);
  EXPECT_NE(st.st_mode & 0777, 0700u) << "its mode was changed";
}

}  // namespace
}  // namespace custody::test
