#include "metrics.h"

namespace custody::server {

std::pair<std::string, std::string> MetricLabels(const core::Authorizer& policy, const std::string& project,
                                                 const std::string& env) {
  const auto& engine = policy.engine();
  if (project.empty()) return {"", ""};
  if (engine.FindProject(project) == nullptr) return {kOtherLabel, env.empty() ? "" : kOtherLabel};
  if (env.empty()) return {project, ""};
  return {project, engine.FindEnvironment(project, env) != nullptr ? env : kOtherLabel};
}

}  // namespace custody::server
