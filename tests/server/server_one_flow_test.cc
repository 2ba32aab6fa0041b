// One flow (issue 14): the same request gets the same answer and the same
// audit record through every front: the CLI in direct mode, the CLI
// through custodyd (CUSTODY_ADDR), and curl on the socket.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "../support/server_fixture.h"

namespace custody::test {
namespace {

class OneFlowServerTest : public ServerTest {
 protected:
  // What a person sees of one request through one front: the exit code (for
  // curl, the HTTP status mapped as the client maps it) and the fields of
  // the audit record it left.
  struct Seen {
    int exit_code = -1;
    std::string action, decision, rule, result;
    std::string str() const {
      return "exit " + std::to_string(exit_code) + ", " + action + "/" + decision + "/" + rule + "/" + result;
    }
  };
  static int ExitFor(const std::string& http) {
    const int status = http.size() > 12 ? std::atoi(http.substr(9, 3).c_str()) : 0;
    switch (status) {
      case 200: case 201: return 0;
      case 400: case 405: case 413: case 431: return 64;
      case 401: case 403: return 77;
      case 404: return 66;
      case 429: return 75;
      case 500: return http.find("\"category\":\"integrity\"") != std::string::npos ? 65 : 70;
      case 503: return 69;
      default: return -status;
    }
  }
  // The rule with its numbers taken out: a limit's "refills in N s" moves
  // between two requests.
  static std::string Shape(std::string rule) {
    std::string out;
    for (char c : rule) {
      if (c >= '0' && c <= '9') {
        if (out.empty() || out.back() != '#') out += '#';
      } else {
        out += c;
      }
    }
    return out;
  }
  Seen Last(const std::string& action, int exit_code) {
    auto show = Cli({"--json", "audit", "show", "--action", action});
    auto j = nlohmann::json::parse(show.out, nullptr, false);
    Seen s;
    s.exit_code = exit_code;
    if (!j.is_array() || j.empty()) return s;
    const auto& r = j.back();
    s.action = r.value("action", "");
    s.decision = r.value("decision", "");
    s.rule = Shape(r.value("rule", ""));
    s.result = r.value("result", "");
    return s;
  }
  // A GET through each front, in order: direct, CLI through custodyd, curl.
  std::vector<Seen> GetThroughEach(const std::string& path) {
    std::vector<Seen> out;
    out.push_back(Last("secret.get", Cli({"secret", "get", path}).exit_code));
    out.push_back(Last("secret.get", AsUser(std::nullopt, {"secret", "get", path}).exit_code));
    out.push_back(Last("secret.get", ExitFor(Raw(socket_, "GET /v1/secrets/" + path + " HTTP/1.1\r\nHost: x\r\n\r\n"))));
    return out;
  }
  void ExpectSame(const std::string& what, const std::vector<Seen>& seen, int exit_code) {
    ASSERT_EQ(seen.size(), 3u);
    static const char* kFront[] = {"direct", "through custodyd", "curl"};
    for (size_t i = 0; i < seen.size(); ++i) {
      EXPECT_EQ(seen[i].exit_code, exit_code) << what << ", " << kFront[i] << ": " << seen[i].str();
      EXPECT_EQ(seen[i].str(), seen[0].str()) << what << ": " << kFront[i] << " differs from direct mode";
    }
  }
};

TEST_F(OneFlowServerTest, EveryFrontGivesTheSameAnswerAndTheSameRecord) {
  // A project root has no grant in, a revoked secret, a secret to tamper with.
  std::string policy = kPolicy;
  // billing/prod's 3 a minute refills one every 20 s: a refill landing
  // between the spending below and the three fronts' requests (a slow,
  // busy machine) once let the first front through. 3 an hour cannot
  // refill within this test.
  const auto rate = policy.find("rate = \"3/min\"");
  ASSERT_NE(rate, std::string::npos);
  policy.replace(rate, std::string("rate = \"3/min\"").size(), "rate = \"3/hour\"");
  policy += "[projects.hr]\n[projects.hr.environments.prod]\n[[projects.hr.grants]]\nprincipal = \"user:nobody\"\nrole = \"owner\"\n";
  WriteFile(token_.dir() / "policy2.toml", policy);
  ASSERT_EQ(Cli({"policy", "apply", token_.dir() / "policy2.toml"}).exit_code, 0);
  ASSERT_EQ(::kill(pid_, SIGHUP), 0);  // custodyd takes the new policy
  for (int i = 0; i < 100; ++i) {
    if (Raw(socket_, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").find("\"policy_version\":2") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(Cli({"secret", "put", "payments/prod/revoked"}, "old").exit_code, 0);
  ASSERT_EQ(Cli({"secret", "revoke", "payments/prod/revoked", "--version", "1", "--reason", "leaked"}).exit_code, 0);

  ExpectSame("allowed", GetThroughEach("payments/prod/stripe"), 0);
  ExpectSame("denied", GetThroughEach("hr/prod/anything"), 77);
  ExpectSame("unknown secret", GetThroughEach("payments/prod/no-such-secret"), 66);
  ExpectSame("revoked", GetThroughEach("payments/prod/revoked"), 66);

  // Over the rate limit (billing/prod: 3/hour, shared by every front): spent
  // first, then each front is refused alike.
  for (int i = 0; i < 5 && Cli({"secret", "get", "billing/prod/invoice-key"}).exit_code != 75; ++i) {
  }
  ExpectSame("over the rate limit", GetThroughEach("billing/prod/invoice-key"), 75);

  // An empty value: a usage error after the policy, recorded, everywhere.
  std::vector<Seen> empty;
  empty.push_back(Last("secret.put", Cli({"secret", "put", "payments/prod/empty"}, "").exit_code));
  empty.push_back(Last("secret.put", AsUser(std::nullopt, {"secret", "put", "payments/prod/empty"}).exit_code));
  const std::string body = "{\"value\":\"\"}";
  empty.push_back(Last("secret.put", ExitFor(Raw(socket_, "PUT /v1/secrets/payments/prod/empty HTTP/1.1\r\nHost: x\r\n"
                                                           "Content-Length: " + std::to_string(body.size()) +
                                                           "\r\n\r\n" + body))));
  ExpectSame("empty value", empty, 64);

  // A tampered blob: an integrity error, 65, and the record says so.
  TamperWithStripe(token_.config_path());
  ASSERT_FALSE(HasFatalFailure());
  ExpectSame("tampered blob", GetThroughEach("payments/prod/stripe"), 65);
}

}  // namespace
}  // namespace custody::test
