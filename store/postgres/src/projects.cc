// Projects and their environments.
#include <ctime>

#include "pg_store_impl.h"

namespace custody::core::pg {
namespace {
int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }
}  // namespace

Result<int64_t> PgStore::ProjectId(Session& s, const std::string& name) {
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT id FROM projects WHERE name = $1", Params().Add(name)));
  if (r.rows() == 0) return Error(Category::kNotFound, "project '" + name + "' does not exist");
  return r.Int(0, 0);
}

Result<ProjectRecord> PgStore::CreateProject(const std::string& name, const std::vector<std::string>& envs,
                                             const KekRef& kek, const std::string& kek_label,
                                             const std::vector<uint8_t>& kek_material) {
  // The project, its first KEK and its environments land together or not
  // at all: a project without a KEK record could never seal.
  const int64_t now = Now();
  return InTx<ProjectRecord>([&](Session& s) -> Result<ProjectRecord> {
    auto p = s.Run("INSERT INTO projects(name, created_at) VALUES ($1, $2) RETURNING id", Params().Add(name).Add(now));
    if (!p && HasSqlState(p.error(), "23505")) return Error(Category::kUsage, "project '" + name + "' already exists");
    if (!p) return std::move(p).error();
    const int64_t pid = p->Int(0, 0);
    Params k;
    k.Add(pid).Add(static_cast<int64_t>(kek.version)).AddBytes(kek.id).Add(kek_label).Add(now);
    if (kek_material.empty()) {
      k.AddNull();
    } else {
      k.AddBytes(kek_material);
    }
    CUSTODY_RETURN_IF_ERROR(s.Run("INSERT INTO keks(project_id, version, token_id, label, created_at, material) "
                                  "VALUES ($1, $2, $3, $4, $5, $6)",
                                  k));
    for (const auto& e : envs) {
      auto r = s.Run("INSERT INTO environments(project_id, name, created_at) VALUES ($1, $2, $3)",
                     Params().Add(pid).Add(e).Add(now));
      if (!r && HasSqlState(r.error(), "23505")) {
        return Error(Category::kUsage, "environment '" + e + "' is listed twice");
      }
      if (!r) return std::move(r).error();
    }
    return ProjectRecord{pid, name, now};
  });
}

Result<ProjectRecord> PgStore::FindProject(const std::string& name) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT id, created_at FROM projects WHERE name = $1", Params().Add(name)));
  if (r.rows() == 0) return Error(Category::kNotFound, "project '" + name + "' does not exist");
  return ProjectRecord{r.Int(0, 0), name, r.Int(0, 1)};
}

Result<std::vector<ProjectRecord>> PgStore::ListProjects() {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT id, name, created_at FROM projects ORDER BY name COLLATE \"C\""));
  std::vector<ProjectRecord> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back({r.Int(i, 0), r.Text(i, 1), r.Int(i, 2)});
  return out;
}

Result<EnvironmentRecord> PgStore::CreateEnvironment(const std::string& project, const std::string& env) {
  return InTx<EnvironmentRecord>([&](Session& s) -> Result<EnvironmentRecord> {
    CUSTODY_ASSIGN_OR_RETURN(int64_t pid, ProjectId(s, project));
    auto r = s.Run("INSERT INTO environments(project_id, name, created_at) VALUES ($1, $2, $3) RETURNING id",
                   Params().Add(pid).Add(env).Add(Now()));
    if (!r && HasSqlState(r.error(), "23505")) {
      return Error(Category::kUsage, "environment '" + project + "/" + env + "' already exists");
    }
    if (!r) return std::move(r).error();
    return EnvironmentRecord{r->Int(0, 0), pid, project, env};
  });
}

Result<EnvironmentRecord> PgStore::FindEnvironment(const std::string& project, const std::string& env) {
  Session s(*this);
  if (!s.ok()) return s.error();
  return FindEnvironmentOn(s, project, env);
}

Result<EnvironmentRecord> PgStore::FindEnvironmentOn(Session& s, const std::string& project, const std::string& env) {
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT e.id, p.id FROM environments e JOIN projects p ON p.id = e.project_id "
                                        "WHERE p.name = $1 AND e.name = $2",
                                        Params().Add(project).Add(env)));
  if (r.rows() == 1) return EnvironmentRecord{r.Int(0, 0), r.Int(0, 1), project, env};
  CUSTODY_RETURN_IF_ERROR(ProjectId(s, project));
  return Error(Category::kNotFound, "environment '" + env + "' does not exist in project '" + project + "'");
}

Result<std::vector<EnvironmentRecord>> PgStore::ListEnvironments(const std::string& project) {
  Session s(*this);
  if (!s.ok()) return s.error();
  CUSTODY_ASSIGN_OR_RETURN(int64_t pid, ProjectId(s, project));
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT id, name FROM environments WHERE project_id = $1 ORDER BY name COLLATE \"C\"",
                                        Params().Add(pid)));
  std::vector<EnvironmentRecord> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back({r.Int(i, 0), pid, project, r.Text(i, 1)});
  return out;
}

}  // namespace custody::core::pg
