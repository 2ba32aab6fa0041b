// No copy of a secret value outlives its request: not in custodyd's log,
// not in its memory (freed heap included) after it answered, on a SoftHSM2
// token and on a TPM, and not in the memory of an application that used the
// client library.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <thread>
#include <utility>
#include <vector>

#include "../support/server_fixture.h"
#include "custody/client/client.h"
#include "custody/common/base64.h"

namespace custody::test {
namespace {

TEST_F(ServerTest, NoSecretInTheServerLog) {
  auto c = client::Client::Connect("unix:" + socket_);
  ASSERT_TRUE(c->Get("payments/prod/stripe").ok());
  ::kill(pid_, SIGTERM);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
  std::string log = ReadFile(token_.dir() / "custodyd.log");
  EXPECT_EQ(log.find(kSecret), std::string::npos);
  EXPECT_EQ(log.find(SoftHsmToken::kPin), std::string::npos);
}

// Where each needle occurs in the readable memory of process `pid`: for
// each needle, "region+offset" strings (root reads another process's memory
// through /proc/PID/mem). One pass over the memory for all needles.
std::vector<std::vector<std::string>> FindInMemory(pid_t pid, const std::vector<std::string>& needles) {
  std::vector<std::vector<std::string>> found(needles.size());
  size_t longest = 1;
  for (const auto& n : needles) longest = std::max(longest, n.size());
  std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
  int mem = ::open(("/proc/" + std::to_string(pid) + "/mem").c_str(), O_RDONLY);
  if (mem < 0) return found;
  std::string line;
  while (std::getline(maps, line)) {
    unsigned long lo = 0, hi = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s", &lo, &hi, perms) != 3 || perms[0] != 'r') continue;
    if (line.find("[vvar]") != std::string::npos || line.find("[vsyscall]") != std::string::npos) continue;
    // Skip the terabytes ASan reserves for its shadow (the server's own heap
    // is far smaller); read the rest in chunks, keeping an overlap so a
    // match across two chunks is seen.
    if (hi - lo > (1ul << 30)) continue;
    std::string name = line.substr(line.find_last_of(' ') + 1);
    if (name.empty()) name = line.substr(0, line.find(' '));
    const size_t chunk = 1 << 20;
    std::string carry;
    for (unsigned long at = lo; at < hi;) {
      size_t want = std::min<unsigned long>(chunk, hi - at);
      std::string part(want, '\0');
      ssize_t got = ::pread(mem, part.data(), want, static_cast<off_t>(at));
      if (got <= 0) break;
      part.resize(static_cast<size_t>(got));
      std::string window = carry + part;
      for (size_t i = 0; i < needles.size(); ++i) {
        for (size_t f = window.find(needles[i]); f != std::string::npos; f = window.find(needles[i], f + 1)) {
          size_t off = at - carry.size() + f - lo;
          // A match inside the carried overlap was already seen last chunk.
          if (f + needles[i].size() <= carry.size()) continue;
          found[i].push_back(name + "+" + std::to_string(off));
        }
      }
      carry = part.size() >= longest ? part.substr(part.size() - longest + 1) : part;
      at += static_cast<unsigned long>(got);
    }
  }
  ::close(mem);
  return found;
}

// What is looked for of a value: 32-byte windows spread over it, each past
// its first 16 bytes (an allocator writes its bookkeeping over the start of
// a freed block, and a buffer that grew leaves pieces, not the whole).
std::vector<std::string> Windows(const std::string& whole) {
  std::vector<std::string> out;
  if (whole.size() <= 48) {
    out.push_back(whole.substr(16));
    return out;
  }
  for (size_t at = 16; at + 32 <= whole.size(); at += std::max<size_t>(32, (whole.size() - 16) / 8)) {
    out.push_back(whole.substr(at, 32));
  }
  return out;
}

// Fails the test if any window of any form of `values` is in `pid`'s
// memory. `present` must be found (the scan's own check that it reads the
// memory at all): a string the process surely holds on its heap. For
// custodyd that is the socket's path, kept for as long as it runs, not a
// request's path, which an optimised build may have freed and overwritten
// by then.
void ExpectNoCopyIn(pid_t pid, const std::vector<std::string>& values, const std::string& present) {
  std::vector<std::string> needles{present};
  std::vector<std::string> what{"(control)"};
  for (const auto& v : values) {
    for (const std::string& form : {v, Base64Encode(std::string_view(v))}) {
      for (auto& w : Windows(form)) {
        needles.push_back(w);
        what.push_back(form.substr(0, 24) + "...");
      }
    }
  }
  auto hits = FindInMemory(pid, needles);
  ASSERT_FALSE(hits[0].empty()) << "the scan did not find '" << present << "': it cannot see the memory";
  for (size_t i = 1; i < needles.size(); ++i) {
    std::string where;
    for (const auto& h : hits[i]) where += " " + h;
    EXPECT_TRUE(hits[i].empty()) << "a piece of '" << what[i] << "' found in memory at" << where;
  }
}

// Waits until custodyd has closed every client connection (each one's
// buffers are wiped as it ends): /metrics then sees only its own.
void WaitForClientsToClose(const std::string& socket) {
  for (int i = 0; i < 100; ++i) {
    if (Raw(socket, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").find("\ncustody_connections_open 1\n") !=
        std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// Every buffer a value passes through in custodyd is wiped once the answer
// is written: after gets and puts, no piece of any value is in its memory,
// in clear or in base64, freed heap included. Values of several sizes: a
// buffer that grows frees its smaller copies.
TEST_F(ServerTest, AfterServingNoPlaintextStaysInTheServersMemory) {
  const std::string put_value = "sk-live-PUT-THROUGH-THE-SERVER-9876543210-abcdefghijkl";
  const std::string put_b64_value = "sk-live-PUT-AS-BASE64-0011223344-mnopqrstuvwxyz";
  std::string large = "sk-live-LARGE-";
  for (int i = 0; large.size() < 3000; ++i) large += "chunk" + std::to_string(i * 7919) + "-";
  std::string binary;  // not text: travels as base64 both ways
  for (int i = 0; i < 1500; ++i) binary += static_cast<char>((i * 37 + 11) & 0xff);
  {
    auto c = client::Client::Connect("unix:" + socket_);
    ASSERT_TRUE(c.ok());
    for (const auto& [path, v] : {std::pair{"payments/prod/put-key", put_value}, std::pair{"payments/prod/large", large},
                                   std::pair{"payments/prod/binary", binary}}) {
      auto put = c->Put(path, SecretBuffer::Copy(std::string_view(v)));
      ASSERT_TRUE(put.ok()) << put.error().message();
    }
    for (const char* path : {"payments/prod/stripe", "payments/prod/large", "payments/prod/binary"}) {
      for (int i = 0; i < 3; ++i) {
        auto f = c->Get(path);
        ASSERT_TRUE(f.ok()) << f.error().message();
      }
    }
  }
  // The other body form, as curl or another client would send it.
  RunOptions o;
  o.stdin_data = "{\"value_base64\": \"" + Base64Encode(std::string_view(put_b64_value)) + "\"}";
  auto r = RunProgram("/usr/bin/curl",
                      {"-s", "-X", "PUT", "--unix-socket", socket_, "--data-binary", "@-",
                       "http://custody/v1/secrets/payments/prod/b64-key"},
                      o);
  ASSERT_NE(r.out.find("\"version\""), std::string::npos) << r.out << r.err;
  WaitForClientsToClose(socket_);
  ExpectNoCopyIn(pid_, {std::string(kSecret), put_value, put_b64_value, large, binary}, socket_);
}

// The client library, as an application links it: after a get and a put
// through it, with the application's own SecretBuffers gone, the values are
// nowhere in the application's memory. The application is a child process
// that learns the values only through the library (the get) or through a
// pipe read straight into locked memory (the put), so the only copies the
// scan can find are ones the library left.
TEST_F(ServerTest, TheClientLibraryLeavesNoCopyOfTheValuesItCarried) {
  int go[2], to_put[2], done[2];
  ASSERT_EQ(::pipe(go), 0);
  ASSERT_EQ(::pipe(to_put), 0);
  ASSERT_EQ(::pipe(done), 0);
  pid_t app = ::fork();
  if (app == 0) {
    char byte = 0;
    if (::read(go[0], &byte, 1) != 1) ::_exit(1);
    bool ok = true;
    {
      auto c = client::Client::Connect("unix:" + socket_);
      ok = c.ok();
      if (ok) ok = c->Get("payments/prod/fetched").ok();
      ::close(to_put[1]);
      auto v = SecretBuffer::ReadFd(to_put[0], 8192);
      ok = ok && v.ok() && c.ok() && c->Put("payments/prod/carried", *v).ok();
    }
    char r = ok ? 'y' : 'n';
    (void)!::write(done[1], &r, 1);
    ::pause();
    ::_exit(0);
  }
  // Made after the fork: the child's memory cannot hold them from before.
  // Long enough that a growing buffer would have left pieces behind.
  auto fresh = [](const char* tag) {
    std::string out = tag;
    while (out.size() < 2500) {
      std::vector<uint8_t> raw(24);
      for (auto& b : raw) b = static_cast<uint8_t>(std::rand());
      out += Base64Encode(std::span<const uint8_t>(raw));
    }
    return out;
  };
  std::srand(static_cast<unsigned>(::getpid()) ^ static_cast<unsigned>(std::time(nullptr)));
  const std::string fetched = fresh("sk-fetched-by-the-library-"), carried = fresh("sk-carried-by-the-library-");
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/fetched"}, fetched).exit_code, 0);
  ASSERT_EQ(::write(to_put[1], carried.data(), carried.size()), static_cast<ssize_t>(carried.size()));
  ::close(to_put[1]);
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  char r = 0;
  ASSERT_EQ(::read(done[0], &r, 1), 1);
  EXPECT_EQ(r, 'y') << "the get or the put through the library failed";
  EXPECT_EQ(Cli({"secret", "get", "payments/prod/carried"}).out, carried);
  ExpectNoCopyIn(app, {fetched, carried}, "payments/prod/carried");
  ::kill(app, SIGKILL);
  ::waitpid(app, nullptr, 0);
  for (int fd : {go[0], go[1], to_put[0], done[0], done[1]}) ::close(fd);
}

// The same memory check as for SoftHSM2, with the value unsealed by a TPM
// (tpm2-tss ESAPI): after gets and a put, no piece of it is in custodyd.
TEST_F(TpmServerTest, AfterServingFromTheTpmNoPlaintextStaysInTheServersMemory) {
  std::string large = "sk-live-TPM-";
  for (int i = 0; large.size() < 2000; ++i) large += "tpmchunk" + std::to_string(i * 104729) + "-";
  {
    auto c = client::Client::Connect("unix:" + socket_);
    ASSERT_TRUE(c.ok());
    auto put = c->Put("payments/prod/tpm-large", SecretBuffer::Copy(std::string_view(large)));
    ASSERT_TRUE(put.ok()) << put.error().message();
    for (const char* path : {"payments/prod/stripe", "payments/prod/tpm-large"}) {
      for (int i = 0; i < 3; ++i) {
        auto f = c->Get(path);
        ASSERT_TRUE(f.ok()) << f.error().message();
      }
    }
  }
  WaitForClientsToClose(socket_);
  ExpectNoCopyIn(pid_, {std::string(kSecret), large}, socket_);
}

}  // namespace
}  // namespace custody::test
