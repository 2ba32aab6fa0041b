// One policy decision with a large policy: 10,000 principals and 10 to 1,000
// projects (each with dev/staging/prod and 10 grants, one narrowed to secret
// patterns). Reports the median cost per decision and how it grows from 10
// to 1,000 projects. Target: under 1 microsecond, flat in the number of
// projects. Build: release preset; run: build/release/bench/policy_bench
#include <benchmark/benchmark.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "custody/policy/engine.h"

namespace {

using namespace custody::policy;

constexpr int kPrincipals = 10000;

std::unique_ptr<Engine> MakeEngine(int projects) {
  Policy p;
  p.admins = {"user:p0"};
  for (int i = 0; i < kPrincipals; ++i) {
    Principal pr;
    pr.name = "user:p" + std::to_string(i);
    pr.identities.push_back({IdentityKind::kUid, std::to_string(10000 + i), {}});
    p.principals.push_back(std::move(pr));
  }
  for (int j = 0; j < projects; ++j) {
    Project pj;
    pj.name = "project-" + std::to_string(j);
    for (const char* e : {"dev", "staging", "prod"}) {
      Environment env;
      env.name = e;
      env.production = std::string(e) == "prod";
      pj.environments.push_back(env);
    }
    for (int g = 0; g < 10; ++g) {
      Grant gr;
      gr.principal = "user:p" + std::to_string((j * 10 + g) % kPrincipals);
      gr.role = g == 0 ? Role::kOwner : g < 7 ? Role::kReader : g < 9 ? Role::kCi : Role::kAuditor;
      if (g == 3) gr.secrets = {"stripe-*", "db.*"};
      if (g == 4) gr.environments = {"prod"};
      pj.grants.push_back(std::move(gr));
    }
    p.projects.push_back(std::move(pj));
  }
  return std::make_unique<Engine>(std::move(p));
}

std::map<int, std::unique_ptr<Engine>> g_engines;

Engine& EngineFor(int projects) {
  auto& e = g_engines[projects];
  if (!e) e = MakeEngine(projects);
  return *e;
}

// The common case: a reader narrowed to patterns reading a prod secret.
void BM_DecideAllow(benchmark::State& state) {
  int projects = static_cast<int>(state.range(0));
  Engine& e = EngineFor(projects);
  int j = projects - 1;  // the last project: no advantage from insertion order
  PrincipalId who = *e.FindPrincipal("user:p" + std::to_string((j * 10 + 3) % kPrincipals));
  std::string project = "project-" + std::to_string(j);
  for (auto _ : state) {
    Decision d = e.Decide(who, Action::kGet, {project, "prod", "stripe-live"});
    if (!d.allowed) state.SkipWithError("expected allow");
    benchmark::DoNotOptimize(d);
  }
}

// A refusal: a ci principal asking for production.
void BM_DecideDeny(benchmark::State& state) {
  int projects = static_cast<int>(state.range(0));
  Engine& e = EngineFor(projects);
  int j = projects / 2;
  PrincipalId who = *e.FindPrincipal("user:p" + std::to_string((j * 10 + 7) % kPrincipals));
  std::string project = "project-" + std::to_string(j);
  for (auto _ : state) {
    Decision d = e.Decide(who, Action::kGet, {project, "prod", "stripe-live"});
    if (d.allowed) state.SkipWithError("expected deny");
    benchmark::DoNotOptimize(d);
  }
}

// Identify a caller by uid among 10,000 principals.
void BM_Identify(benchmark::State& state) {
  Engine& e = EngineFor(static_cast<int>(state.range(0)));
  Caller c;
  c.uid = 10000 + 7777;
  for (auto _ : state) benchmark::DoNotOptimize(e.Identify(c));
}

class MedianReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const auto& r : runs) {
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name == "median") {
        medians[r.run_name.function_name + "/" + r.run_name.args] = r.GetAdjustedCPUTime();
      }
    }
  }
  std::map<std::string, double> medians;  // ns
};

}  // namespace

BENCHMARK(BM_DecideAllow)->Arg(10)->Arg(100)->Arg(1000)->Repetitions(5)->ReportAggregatesOnly(true);
BENCHMARK(BM_DecideDeny)->Arg(10)->Arg(100)->Arg(1000)->Repetitions(5)->ReportAggregatesOnly(true);
BENCHMARK(BM_Identify)->Arg(1000)->Repetitions(5)->ReportAggregatesOnly(true);

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  MedianReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::printf("\n");
  for (const char* fn : {"BM_DecideAllow", "BM_DecideDeny"}) {
    double small = reporter.medians[std::string(fn) + "/10"];
    double large = reporter.medians[std::string(fn) + "/1000"];
    if (small <= 0 || large <= 0) continue;
    std::printf("%-15s median %.0f ns at 10 projects, %.0f ns at 1,000 (x%.2f); target < 1000 ns and flat: %s\n", fn,
                small, large, large / small, large < 1000 && large / small < 2.0 ? "met" : "NOT met");
  }
  benchmark::Shutdown();
  return 0;
}
