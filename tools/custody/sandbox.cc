// `custody sandbox DIR`: custody on SoftHSM2 for a team's own CI, in one
// folder, with no PIN in any argv. It makes a SoftHSM2 configuration and
// token in DIR through PKCS#11 itself (C_InitToken, C_InitPIN: softhsm2-util
// would need the PINs as arguments), with random PINs kept in owner-only
// files, runs `custody init` on it, applies a policy (given, or a minimal
// one making the caller the owner of --project), and with --serve starts
// custodyd on a socket in DIR. What it prints on stdout is for `eval` (or
// `. FILE`): the environment a job needs. `--stop` stops that custodyd.
// See docs/CI.md.
#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>
#include <array>
#include <string_view>

#include "commands.h"
#include "custody/common/base64.h"
#include "custody/common/names.h"
#include "custody/common/secret.h"
#include "custody/common/untrusted.h"
#include "custody/hsm/module.h"
#include "custody/hsm/rv.h"
#include "custody/hsm/session.h"
#include "custody/hsm/uri.h"
#include "io.h"

extern char** environ;

namespace custody::cli {
namespace {

constexpr const char* kLabel = "custody-sandbox";
constexpr const char* kSoftHsm = "/usr/lib/softhsm/libsofthsm2.so";

// A random PIN (24 bytes of the OS RNG, base64 without padding), written to
// `path` (0600) and returned in locked memory.
Result<SecretBuffer> NewPin(const std::string& path) {
  std::vector<uint8_t> raw(24);
  std::ifstream rnd("/dev/urandom", std::ios::binary);
  if (!rnd.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()))) {
    return Error(Category::kUnavailable, "cannot read /dev/urandom");
  }
  std::string text = Base64Encode(raw);
  std::fill(raw.begin(), raw.end(), 0);
  while (!text.empty() && text.back() == '=') text.pop_back();
  SecretBuffer pin = SecretBuffer::Copy(text);
  std::fill(text.begin(), text.end(), '\0');
  auto bytes = pin.Reveal(SecretAccess{});
  CUSTODY_RETURN_IF_ERROR(WritePrivateFile(path, bytes));
  return pin;
}

// The token, made through PKCS#11: the first slot without an initialised
// token gets one labelled kLabel, with the SO PIN, then the user PIN.
Status MakeToken(const SecretBuffer& so_pin, const SecretBuffer& user_pin) {
  CUSTODY_ASSIGN_OR_RETURN(auto module, hsm::Module::Load(kSoftHsm));
  CK_FUNCTION_LIST* fn = module->fn();
  CK_ULONG n = 0;
  CK_RV rv = fn->C_GetSlotList(CK_TRUE, nullptr, &n);
  std::vector<CK_SLOT_ID> slots(n);
  if (rv == CKR_OK) rv = fn->C_GetSlotList(CK_TRUE, slots.data(), &n);
  if (rv != CKR_OK) return hsm::RvError(rv, "C_GetSlotList");
  std::optional<CK_SLOT_ID> free_slot;
  for (CK_ULONG i = 0; i < n && !free_slot; ++i) {
    CK_TOKEN_INFO ti{};
    if (fn->C_GetTokenInfo(slots[i], &ti) == CKR_OK && !(ti.flags & CKF_TOKEN_INITIALIZED)) free_slot = slots[i];
  }
  if (!free_slot) return Error(Category::kUnavailable, "SoftHSM2 offers no free slot for the sandbox token");
  CK_UTF8CHAR label[32];
  std::memset(label, ' ', sizeof label);
  std::memcpy(label, kLabel, std::strlen(kLabel));
  auto so = so_pin.Reveal(SecretAccess{});
  rv = fn->C_InitToken(*free_slot, const_cast<CK_UTF8CHAR*>(so.data()), static_cast<CK_ULONG>(so.size()), label);
  if (rv != CKR_OK) return hsm::RvError(rv, "C_InitToken");
  // SoftHSM2 gives an initialised token a slot id of its own: find it again.
  CUSTODY_RETURN_IF_ERROR(module->Reinitialize());
  CUSTODY_ASSIGN_OR_RETURN(auto uri, hsm::TokenUri::Parse(std::string("pkcs11:token=") + kLabel));
  CUSTODY_ASSIGN_OR_RETURN(CK_SLOT_ID slot, hsm::FindSlot(*module, uri));
  CUSTODY_ASSIGN_OR_RETURN(hsm::Session s, hsm::Session::Open(module, slot, /*read_write=*/true));
  rv = fn->C_Login(s.handle(), CKU_SO, const_cast<CK_UTF8CHAR*>(so.data()), static_cast<CK_ULONG>(so.size()));
  if (rv != CKR_OK) return hsm::RvError(rv, "C_Login (SO)");
  auto user = user_pin.Reveal(SecretAccess{});
  rv = fn->C_InitPIN(s.handle(), const_cast<CK_UTF8CHAR*>(user.data()), static_cast<CK_ULONG>(user.size()));
  fn->C_Logout(s.handle());
  if (rv != CKR_OK) return hsm::RvError(rv, "C_InitPIN");
  return Status::Ok();
}

// custodyd: beside this program (the build tree, libexec), then in PATH's
// usual system places.
std::string FindCustodyd() {
  if (const char* e = std::getenv("CUSTODYD"); e != nullptr && *e != '\0') return e;
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const char* rel : {"custodyd", "../custodyd/custodyd", "../../sbin/custodyd", "../../../sbin/custodyd"}) {
      auto p = (self.parent_path() / rel).lexically_normal();
      if (::access(p.c_str(), X_OK) == 0) return p.string();
    }
  }
  for (const char* p : {"/usr/sbin/custodyd", "/usr/local/sbin/custodyd", "/usr/bin/custodyd"}) {
    if (::access(p, X_OK) == 0) return p;
  }
  const char* path = std::getenv("PATH");
  std::string dirs = path != nullptr ? path : "";
  for (size_t at = 0; at <= dirs.size();) {
    const size_t end = std::min(dirs.find(':', at), dirs.size());
    const std::string candidate = dirs.substr(at, end - at) + "/custodyd";
    if (end > at && ::access(candidate.c_str(), X_OK) == 0) return candidate;
    at = end + 1;
  }
  return "/usr/sbin/custodyd";  // not found: the error names where it was expected
}

bool HealthAnswers(const std::string& socket_path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, socket_path.c_str(), sizeof a.sun_path - 1);
  bool ok = false;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    const char req[] = "GET /v1/health HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n";
    if (::write(fd, req, sizeof req - 1) == static_cast<ssize_t>(sizeof req - 1)) {
      char buf[64] = {};
      ok = ::read(fd, buf, sizeof buf - 1) > 12 && std::strncmp(buf, "HTTP/1.1 200", 12) == 0;
    }
  }
  ::close(fd);
  return ok;
}

std::string Quoted(const std::string& s) { return "'" + s + "'"; }

// Runs `fn` with its stdout sent to stderr: this command's stdout carries
// only the environment lines a shell evaluates.
template <typename Fn>
Status OnStderr(Fn fn) {
  std::fflush(stdout);
  const int saved = ::dup(1);
  ::dup2(2, 1);
  Status s = fn();
  std::fflush(stdout);
  ::dup2(saved, 1);
  ::close(saved);
  return s;
}

Result<pid_t> ReadPid(const std::string& path) {
  std::ifstream in(path);
  long pid = 0;
  if (!(in >> pid) || pid <= 1) return Error(Category::kNotFound, "no custodyd of this sandbox is running (" + path + ")");
  return static_cast<pid_t>(pid);
}

// Whether `pid` is a custodyd started for this sandbox: its executable is a
// custodyd (also one replaced on disk since: "custodyd (deleted)") and its
// environment names this sandbox's config.
bool OursRunning(pid_t pid, const std::string& dir) {
  std::error_code ec;
  const std::string proc = "/proc/" + std::to_string(pid);
  auto exe = std::filesystem::read_symlink(proc + "/exe", ec);
  if (ec || exe.filename().string().rfind("custodyd", 0) != 0) return false;
  std::ifstream env(proc + "/environ", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(env)), std::istreambuf_iterator<char>());
  const std::string want = std::string("CUSTODY_CONFIG=") + dir + "/custody.toml";
  for (size_t at = 0; at < all.size();) {
    const size_t end = all.find('\0', at);
    if (all.compare(at, (end == std::string::npos ? all.size() : end) - at, want) == 0) return true;
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return false;
}

Status Stop(const std::string& dir) {
  const std::string pid_file = dir + "/custodyd.pid";
  CUSTODY_ASSIGN_OR_RETURN(pid_t pid, ReadPid(pid_file));
  // Only ever this sandbox's custodyd: a stale file (a pid used again) must
  // not make us signal another process.
  if (!OursRunning(pid, dir)) {
    ::unlink(pid_file.c_str());
    return Error(Category::kNotFound, "the sandbox's custodyd (pid " + std::to_string(pid) + ") is not running");
  }
  ::kill(pid, SIGTERM);
  for (int i = 0; i < 200; ++i) {
    // Reaps it if it is our child (it is not, after --serve returned).
    ::waitpid(pid, nullptr, WNOHANG);
    if (::kill(pid, 0) != 0) {
      ::unlink(pid_file.c_str());
      std::fprintf(stderr, "custody: sandbox: custodyd (pid %d) stopped\n", static_cast<int>(pid));
      return Status::Ok();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return Error(Category::kUnavailable, "custodyd (pid " + std::to_string(pid) + ") did not stop within 10 s of SIGTERM");
}

Result<pid_t> Serve(const std::string& dir, const std::string& config, const std::string& socket_path) {
  if (auto running = ReadPid(dir + "/custodyd.pid"); running && OursRunning(*running, dir)) {
    if (HealthAnswers(socket_path)) return *running;
  }
  const std::string bin = FindCustodyd();
  const std::string log = dir + "/custodyd.log";
  // Everything the child needs is made before fork: between fork and exec
  // only async-signal-safe calls.
  std::vector<std::string> env_text{"CUSTODY_CONFIG=" + config};
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view kv(*e);
    bool keep = true;
    for (const char* drop : {"CUSTODY_CONFIG=", "CUSTODY_ADDR=", "CUSTODY_PIN="}) keep = keep && kv.rfind(drop, 0) != 0;
    if (keep) env_text.emplace_back(kv);
  }
  std::vector<char*> envp;
  for (auto& e : env_text) envp.push_back(e.data());
  envp.push_back(nullptr);
  const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  const int err = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (null < 0 || err < 0) {
    if (null >= 0) ::close(null);
    if (err >= 0) ::close(err);
    return Error::Os(errno, "cannot open " + log);
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(null);
    ::close(err);
    return Error::Os(errno, "fork");
  }
  if (pid == 0) {
    ::setsid();  // outlives this command and its terminal
    // dup2 to 0, 1, 2 clears close-on-exec there (the sources are >= 3,
    // since 0 to 2 are open in a CLI process).
    ::dup2(null, 0);
    ::dup2(null, 1);
    ::dup2(err, 2);
    ::execve(bin.c_str(), const_cast<char* const*>(std::array<const char*, 2>{"custodyd", nullptr}.data()),
             envp.data());
    ::_exit(127);
  }
  ::close(null);
  ::close(err);
  // At once: a sandbox stopped before custodyd answers can still be stopped.
  const std::string text = std::to_string(pid) + "\n";
  CUSTODY_RETURN_IF_ERROR(WritePrivateFile(
      dir + "/custodyd.pid", std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size())));
  for (int i = 0; i < 300; ++i) {
    if (HealthAnswers(socket_path)) return pid;
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      return Error(Category::kUnavailable, "custodyd (" + bin + ") exited at start; see " + log);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(pid, SIGTERM);
  return Error(Category::kUnavailable, "custodyd did not answer on " + socket_path + " within 15 s; see " + log);
}

}  // namespace

Status Sandbox(const Globals& g, const SandboxArgs& a) {
  CUSTODY_RETURN_IF_ERROR(CheckArgText("DIR", a.dir));
  // The paths go into the environment lines this prints for `eval`, inside
  // single quotes, and into the config: no quote, no control character.
  auto quotable = [](const std::string& path) { return path.find_first_of("'\"\\\n$`") == std::string::npos; };
  if (!quotable(a.dir)) return Error(Category::kUsage, "DIR must not hold quotes, backslashes, $ or backquotes");
  std::error_code ec;
  const bool existed = std::filesystem::exists(a.dir, ec);
  std::filesystem::create_directories(a.dir, ec);
  if (ec) return Error(Category::kUsage, "cannot make " + a.dir + ": " + ec.message());
  const std::string dir = std::filesystem::canonical(a.dir, ec).string();
  if (ec) return Error(Category::kUsage, "cannot resolve " + a.dir + ": " + ec.message());
  // The full path too (the current folder, a symlink's target).
  if (!quotable(dir)) return Error(Category::kUsage, "DIR's full path " + EscapeUntrusted(dir) + " holds a quote, backslash, $ or backquote");
  // Only a folder of the caller's own, that nobody else may write in: a
  // config or a module planted there would run as the caller, and a
  // custodyd socket there would receive the job's secrets.
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return Error(Category::kUsage, dir + " is not a folder");
  if (st.st_uid != ::geteuid()) {
    return Error(Category::kDenied, dir + " belongs to another user; a sandbox needs a folder of your own");
  }
  if (a.stop) return Stop(dir);
  if (a.policy) CUSTODY_RETURN_IF_ERROR(CheckArgText("--policy", *a.policy));
  if (a.project) CUSTODY_RETURN_IF_ERROR(core::ValidateProjectName(*a.project));
  if (existed && !std::filesystem::exists(dir + "/custody.toml") && !std::filesystem::is_empty(dir, ec)) {
    return Error(Category::kUsage, dir + " is not empty and holds no sandbox: give a new or empty folder");
  }
  if (::chmod(dir.c_str(), 0700) != 0) return Error::Os(errno, "cannot make " + dir + " private");
  const std::string softhsm_conf = dir + "/softhsm2.conf";
  const std::string config = dir + "/custody.toml";
  const std::string socket_path = dir + "/custody.sock";
  if (socket_path.size() >= sizeof(sockaddr_un::sun_path)) {
    return Error(Category::kUsage, "DIR is too long for a Unix socket path inside it");
  }
  ::setenv("SOFTHSM2_CONF", softhsm_conf.c_str(), 1);
  const bool fresh = !std::filesystem::exists(config);
  if (fresh) {
    std::filesystem::create_directories(dir + "/tokens", ec);
    if (ec) return Error(Category::kUnavailable, "cannot make " + dir + "/tokens: " + ec.message());
    const std::string conf_text = "directories.tokendir = " + dir + "/tokens\nobjectstore.backend = file\nlog.level = ERROR\n";
    CUSTODY_RETURN_IF_ERROR(WritePrivateFile(
        softhsm_conf, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(conf_text.data()), conf_text.size())));
    CUSTODY_ASSIGN_OR_RETURN(SecretBuffer so_pin, NewPin(dir + "/so.pin"));
    CUSTODY_ASSIGN_OR_RETURN(SecretBuffer user_pin, NewPin(dir + "/user.pin"));
    CUSTODY_RETURN_IF_ERROR(MakeToken(so_pin, user_pin));
    Globals ig = g;
    ig.config = config;
    ig.json = false;
    InitArgs init;
    init.module = kSoftHsm;
    init.token = std::string("pkcs11:token=") + kLabel;
    init.pin_file = dir + "/user.pin";
    init.state_dir = dir + "/state";
    init.module_env = {"SOFTHSM2_CONF=" + softhsm_conf};
    // Init prints what it did: keep stdout for the environment lines.
    CUSTODY_RETURN_IF_ERROR(OnStderr([&] { return Init(ig, init); }));
    std::ofstream(config, std::ios::app) << "\n[server]\nsocket = \"" << socket_path << "\"\n";
  }
  // The policy: the one given, or the caller as admin and owner of --project.
  std::string policy_file;
  if (a.policy) {
    policy_file = *a.policy;
  } else if (a.project && fresh) {
    const uid_t uid = ::getuid();
    passwd* pw = ::getpwuid(uid);
    std::string user = pw != nullptr ? pw->pw_name : "uid" + std::to_string(uid);
    if (!core::ValidateProjectName(user).ok()) user = "uid" + std::to_string(uid);
    std::string text = "version = 1\nadmins = [\"user:" + user + "\"]\n[principals.\"user:" + user + "\"]\nuid = " +
                       std::to_string(uid) + "\n[projects." + *a.project + "]\n[projects." + *a.project +
                       ".environments.test]\nproduction = false\n[[projects." + *a.project +
                       ".grants]]\nprincipal = \"user:" + user + "\"\nrole = \"owner\"\n";
    policy_file = dir + "/policy.toml";
    CUSTODY_RETURN_IF_ERROR(WritePrivateFile(
        policy_file, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size())));
  }
  if (!policy_file.empty()) {
    Globals pg = g;
    pg.config = config;
    pg.json = false;
    CUSTODY_RETURN_IF_ERROR(OnStderr([&] { return PolicyApply(pg, policy_file); }));
  }
  std::printf("SOFTHSM2_CONF=%s; export SOFTHSM2_CONF\n", Quoted(softhsm_conf).c_str());
  std::printf("CUSTODY_CONFIG=%s; export CUSTODY_CONFIG\n", Quoted(config).c_str());
  if (a.serve) {
    CUSTODY_ASSIGN_OR_RETURN(pid_t pid, Serve(dir, config, socket_path));
    std::printf("CUSTODY_ADDR=%s; export CUSTODY_ADDR\n", Quoted("unix:" + socket_path).c_str());
    std::printf("CUSTODY_SANDBOX_PID=%d; export CUSTODY_SANDBOX_PID\n", static_cast<int>(pid));
  }
  std::fflush(stdout);
  return Status::Ok();
}

}  // namespace custody::cli
