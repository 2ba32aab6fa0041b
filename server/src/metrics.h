// custodyd's Prometheus metrics and the label values they may carry.
// Private to the server library: included by its own sources only.
#pragma once

#include <array>
#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "custody/service/authz.h"
#include "custody/service/custodian.h"

namespace custody::server {

// Prometheus text-format metrics: counters by project, environment, action
// and decision; a latency histogram per action; health gauges.
class Metrics {
 public:
  static constexpr double kBuckets[] = {0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0};

  void Observe(const std::string& action, const std::string& project, const std::string& env,
               const std::string& decision, double seconds) {
    std::lock_guard lock(mu_);
    ++ops_[{action, project, env, decision}];
    Histogram& h = latency_[action];
    for (size_t i = 0; i < std::size(kBuckets); ++i) {
      if (seconds <= kBuckets[i]) ++h.counts[i];
    }
    ++h.count;
    h.sum += seconds;
    if (decision == "limit") ++limits_[{project, env}];
  }

  // Secrets per project, environment and rotation urgency, counted from the
  // store at most every kScheduleSeconds (a scrape must not scan the store
  // each time).
  static constexpr int kScheduleSeconds = 15;
  void RefreshSchedule(core::Custodian& c) {
    auto now = std::chrono::steady_clock::now();
    {
      std::lock_guard lock(mu_);
      if (schedule_at_ && now - *schedule_at_ < std::chrono::seconds(kScheduleSeconds)) return;
      schedule_at_ = now;
    }
    auto items = c.RotationSchedule();
    std::lock_guard lock(mu_);
    schedule_ok_ = items.ok();
    schedule_.clear();
    if (!items.ok()) return;
    for (const auto& it : *items) ++schedule_[{it.project, it.environment, core::UrgencyName(it.urgency)}];
  }

  std::string Render(core::CustodianStats& s, uint64_t usage_flush_failures, int connections,
                     const core::Custodian::PolicyState& policy, const std::string& node) {
    std::lock_guard lock(mu_);
    std::string out;
    auto esc = [](const std::string& v) {
      std::string r;
      for (char c : v) {
        if (c == '"' || c == '\\') r += '\\';
        if (c == '\n') {
          r += "\\n";
          continue;
        }
        r += c;
      }
      return r;
    };
    out += "# HELP custody_operations_total Requests by action, project, environment and decision.\n";
    out += "# TYPE custody_operations_total counter\n";
    for (const auto& [k, v] : ops_) {
      out += "custody_operations_total{action=\"" + esc(k[0]) + "\",project=\"" + esc(k[1]) + "\",environment=\"" +
             esc(k[2]) + "\",decision=\"" + esc(k[3]) + "\"} " + std::to_string(v) + "\n";
    }
    out += "# HELP custody_request_duration_seconds Time from request to response.\n";
    out += "# TYPE custody_request_duration_seconds histogram\n";
    for (const auto& [action, h] : latency_) {
      for (size_t i = 0; i < std::size(kBuckets); ++i) {
        char le[32];
        std::snprintf(le, sizeof le, "%g", kBuckets[i]);
        out += "custody_request_duration_seconds_bucket{action=\"" + esc(action) + "\",le=\"" + le + "\"} " +
               std::to_string(h.counts[i]) + "\n";
      }
      out += "custody_request_duration_seconds_bucket{action=\"" + esc(action) + "\",le=\"+Inf\"} " +
             std::to_string(h.count) + "\n";
      char sum[64];
      std::snprintf(sum, sizeof sum, "%.6f", h.sum);
      out += "custody_request_duration_seconds_sum{action=\"" + esc(action) + "\"} " + sum + "\n";
      out += "custody_request_duration_seconds_count{action=\"" + esc(action) + "\"} " + std::to_string(h.count) + "\n";
    }
    out += "# HELP custody_limit_refusals_total Requests refused by a rate or spend limit.\n";
    out += "# TYPE custody_limit_refusals_total counter\n";
    for (const auto& [k, v] : limits_) {
      out += "custody_limit_refusals_total{project=\"" + esc(k.first) + "\",environment=\"" + esc(k.second) + "\"} " +
             std::to_string(v) + "\n";
    }
    out += "# TYPE custody_token_errors_total counter\ncustody_token_errors_total " +
           std::to_string(s.token_errors.load()) + "\n";
    out += "# TYPE custody_token_recoveries_total counter\ncustody_token_recoveries_total " +
           std::to_string(s.token_recoveries.load()) + "\n";
    out += "# TYPE custody_token_reinitializations_total counter\ncustody_token_reinitializations_total " +
           std::to_string(s.token_reinitializations.load()) + "\n";
    out += "# HELP custody_token_call_timeouts_total Token or TPM calls that did not return within [token] call_timeout.\n";
    out += "# TYPE custody_token_call_timeouts_total counter\ncustody_token_call_timeouts_total " +
           std::to_string(s.token_timeouts.load()) + "\n";
    out += "# HELP custody_token_calls_hung Token or TPM calls out past their deadline now.\n";
    out += "# TYPE custody_token_calls_hung gauge\ncustody_token_calls_hung " + std::to_string(s.token_hung.load()) + "\n";
    out += "# TYPE custody_audit_write_failures_total counter\ncustody_audit_write_failures_total " +
           std::to_string(s.audit_failures.load()) + "\n";
    const int64_t stalled_ms = s.audit_write_stalled_ms.load();
    out += "# TYPE custody_audit_healthy gauge\ncustody_audit_healthy " +
           std::string(s.audit_healthy && stalled_ms == 0 ? "1" : "0") + "\n";
    out += "# HELP custody_audit_write_stalled_seconds How long the audit write under way has not returned (0: none "
           "past 2 s).\n";
    out += "# TYPE custody_audit_write_stalled_seconds gauge\ncustody_audit_write_stalled_seconds " +
           std::to_string(stalled_ms / 1000) + "\n";
    out += "# HELP custody_audit_failed_batches_total Audit batches whose writing threw; their requests were refused.\n";
    out += "# TYPE custody_audit_failed_batches_total counter\ncustody_audit_failed_batches_total " +
           std::to_string(s.audit_failed_batches.load()) + "\n";
    out += "# HELP custody_audit_failed_callbacks_total Answers to requests that threw after their record was written.\n";
    out += "# TYPE custody_audit_failed_callbacks_total counter\ncustody_audit_failed_callbacks_total " +
           std::to_string(s.audit_failed_callbacks.load()) + "\n";
    out += "# HELP custody_audit_batches_total Audit batches written, each with one fsync (or one commit in PostgreSQL).\n";
    out += "# TYPE custody_audit_batches_total counter\ncustody_audit_batches_total " +
           std::to_string(s.audit_batches.load()) + "\n";
    out += "# HELP custody_audit_records_total Audit records written; over custody_audit_batches_total, the records "
           "sharing one fsync.\n";
    out += "# TYPE custody_audit_records_total counter\ncustody_audit_records_total " +
           std::to_string(s.audit_records.load()) + "\n";
    out += "# HELP custody_usage_write_failures_total Times the write-behind usage counts could not be stored (kept, retried).\n";
    out += "# TYPE custody_usage_write_failures_total counter\ncustody_usage_write_failures_total " +
           std::to_string(usage_flush_failures) + "\n";
    out += "# TYPE custody_token_healthy gauge\ncustody_token_healthy " + std::string(s.token_healthy ? "1" : "0") + "\n";
    out += "# TYPE custody_connections_open gauge\ncustody_connections_open " + std::to_string(connections) + "\n";
    out += "# TYPE custody_policy_version gauge\ncustody_policy_version " + std::to_string(policy.in_force) + "\n";
    out += "# HELP custody_policy_load_failing 1 while a newer policy in the store cannot be loaded (the older stays in force).\n";
    out += "# TYPE custody_policy_load_failing gauge\ncustody_policy_load_failing " +
           std::string(policy.problem.empty() ? "0" : "1") + "\n";
    out += "# TYPE custody_store_healthy gauge\ncustody_store_healthy " + std::string(s.store_healthy ? "1" : "0") + "\n";
    out += "# HELP custody_secrets Secrets by project, environment and rotation state (overdue, due-soon, ok, "
           "no-current-version, no-schedule).\n";
    out += "# TYPE custody_secrets gauge\n";
    for (const auto& [k, v] : schedule_) {
      out += "custody_secrets{project=\"" + esc(k[0]) + "\",environment=\"" + esc(k[1]) + "\",state=\"" + esc(k[2]) +
             "\"} " + std::to_string(v) + "\n";
    }
    out += "# HELP custody_secrets_overdue Secrets whose current version is older than the policy's max_age.\n";
    out += "# TYPE custody_secrets_overdue gauge\n";
    uint64_t overdue = 0;
    for (const auto& [k, v] : schedule_) overdue += k[2] == "overdue" ? v : 0;
    out += "custody_secrets_overdue " + std::to_string(overdue) + "\n";
    out += "# TYPE custody_rotation_schedule_healthy gauge\ncustody_rotation_schedule_healthy " +
           std::string(schedule_ok_ ? "1" : "0") + "\n";
    return WithNodeLabel(out, node);
  }

  // Every sample with node="NAME" as its first label, so that the series of
  // several nodes behind one scrape job stay apart. The name was checked by
  // the config ([A-Za-z0-9._-]): nothing to escape.
  static std::string WithNodeLabel(const std::string& text, const std::string& node) {
    if (node.empty()) return text;
    const std::string label = "node=\"" + node + "\"";
    std::string out;
    out.reserve(text.size() + text.size() / 4);
    size_t pos = 0;
    while (pos < text.size()) {
      size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      std::string_view line(text.data() + pos, end - pos);
      if (!line.empty() && line[0] != '#') {
        size_t brace = line.find('{'), space = line.find(' ');
        if (brace != std::string_view::npos && brace < space) {
          out.append(line.substr(0, brace + 1)).append(label).append(",").append(line.substr(brace + 1));
        } else {
          out.append(line.substr(0, space)).append("{").append(label).append("}").append(line.substr(space));
        }
      } else {
        out.append(line);
      }
      out += '\n';
      pos = end + 1;
    }
    return out;
  }

 private:
  struct Histogram {
    uint64_t counts[std::size(kBuckets)] = {};
    uint64_t count = 0;
    double sum = 0;
  };
  std::mutex mu_;
  std::map<std::array<std::string, 4>, uint64_t> ops_;
  std::map<std::string, Histogram> latency_;
  std::map<std::pair<std::string, std::string>, uint64_t> limits_;
  std::optional<std::chrono::steady_clock::time_point> schedule_at_;
  std::map<std::array<std::string, 3>, uint64_t> schedule_;
  bool schedule_ok_ = true;
};

// The label values a metric may carry for a request's project and
// environment: names the policy in force declares, else kOtherLabel. A
// name from a request that the policy does not know would otherwise make a
// new series per request (and reach the scraper unchecked).
inline constexpr const char* kOtherLabel = "_other";

std::pair<std::string, std::string> MetricLabels(const core::Authorizer& policy, const std::string& project,
                                                 const std::string& env);


}  // namespace custody::server
