// A Google Benchmark console reporter that also keeps items/s per benchmark,
// so a bench's main() can print ours/raw ratios measured in the same run.
#pragma once

#include <benchmark/benchmark.h>

#include <map>
#include <string>

namespace custody::bench {

class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const auto& r : runs) {
      if (r.run_type != Run::RT_Iteration || r.error_occurred) continue;
      auto it = r.counters.find("items_per_second");
      if (it != r.counters.end()) rates[r.benchmark_name()] = it->second.value;
    }
  }
  std::map<std::string, double> rates;
};

}  // namespace custody::bench
