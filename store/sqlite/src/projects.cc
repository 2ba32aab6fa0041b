// Projects and their environments.
#include "sqlite_store_impl.h"

namespace custody::core::sqlite {

Result<int64_t> SqliteStore::ProjectId(const std::string& name) {
  Stmt s(db(), "SELECT id FROM projects WHERE name = ?");
  s.Bind(1, name);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return s.Int(0);
  if (rc == SQLITE_DONE) return Error(Category::kNotFound, "project '" + name + "' does not exist");
  return Fail(rc, "finding project");
}

Result<ProjectRecord> SqliteStore::CreateProject(const std::string& name, const std::vector<std::string>& envs,
                                                 const KekRef& kek, const std::string& kek_label,
                                                 const std::vector<uint8_t>& kek_material) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  // The project, its first KEK and its environments land together or not at
  // all: a project without a KEK record could never seal.
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  int64_t now = Now();
  {
    Stmt s(db(), "INSERT INTO projects(name, created_at) VALUES (?, ?)");
    s.Bind(1, name).Bind(2, now);
    int rc = s.Step();
    if ((rc & 0xff) == SQLITE_CONSTRAINT) return Error(Category::kUsage, "project '" + name + "' already exists");
    if (rc != SQLITE_DONE) return Fail(rc, "creating project");
  }
  int64_t pid = sqlite3_last_insert_rowid(db());
  {
    Stmt s(db(), "INSERT INTO keks(project_id, version, token_id, label, created_at, material) VALUES (?, ?, ?, ?, ?, ?)");
    s.Bind(1, pid).Bind(2, kek.version).Bind(3, kek.id).Bind(4, kek_label).Bind(5, now);
    if (!kek_material.empty()) s.Bind(6, kek_material);
    int rc = s.Step();
    if (rc != SQLITE_DONE) return Fail(rc, "recording KEK");
  }
  for (const auto& e : envs) {
    Stmt s(db(), "INSERT INTO environments(project_id, name, created_at) VALUES (?, ?, ?)");
    s.Bind(1, pid).Bind(2, e).Bind(3, now);
    int rc = s.Step();
    if ((rc & 0xff) == SQLITE_CONSTRAINT) return Error(Category::kUsage, "environment '" + e + "' is listed twice");
    if (rc != SQLITE_DONE) return Fail(rc, "creating environment");
  }
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
  return ProjectRecord{pid, name, now};
}

Result<ProjectRecord> SqliteStore::FindProject(const std::string& name) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(), "SELECT id, created_at FROM projects WHERE name = ?");
  s.Bind(1, name);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return ProjectRecord{s.Int(0), name, s.Int(1)};
  if (rc == SQLITE_DONE) return Error(Category::kNotFound, "project '" + name + "' does not exist");
  return Fail(rc, "finding project");
}

Result<std::vector<ProjectRecord>> SqliteStore::ListProjects() {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  Stmt s(db(), "SELECT id, name, created_at FROM projects ORDER BY name");
  std::vector<ProjectRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back({s.Int(0), s.Text(1), s.Int(2)});
  if (rc != SQLITE_DONE) return Fail(rc, "listing projects");
  return out;
}

Result<EnvironmentRecord> SqliteStore::CreateEnvironment(const std::string& project, const std::string& env) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(Transaction tx, Transaction::Begin(*this, Transaction::kWrite));
  CUSTODY_ASSIGN_OR_RETURN(int64_t pid, ProjectId(project));
  Stmt s(db(), "INSERT INTO environments(project_id, name, created_at) VALUES (?, ?, ?)");
  s.Bind(1, pid).Bind(2, env).Bind(3, Now());
  int rc = s.Step();
  if ((rc & 0xff) == SQLITE_CONSTRAINT) {
    return Error(Category::kUsage, "environment '" + project + "/" + env + "' already exists");
  }
  if (rc != SQLITE_DONE) return Fail(rc, "creating environment");
  int64_t id = sqlite3_last_insert_rowid(db());
  CUSTODY_RETURN_IF_ERROR(tx.Commit());
  return EnvironmentRecord{id, pid, project, env};
}

Result<EnvironmentRecord> SqliteStore::FindEnvironment(const std::string& project, const std::string& env) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  return FindEnvironmentHeld(project, env);
}

Result<EnvironmentRecord> SqliteStore::FindEnvironmentHeld(const std::string& project, const std::string& env) {
  // One statement on the hot path (every GET); the project is looked up on
  // its own only to say which of the two names does not exist.
  Stmt s(db(), "SELECT e.id, p.id FROM environments e JOIN projects p ON p.id = e.project_id "
               "WHERE p.name = ? AND e.name = ?");
  s.Bind(1, project).Bind(2, env);
  int rc = s.Step();
  if (rc == SQLITE_ROW) return EnvironmentRecord{s.Int(0), s.Int(1), project, env};
  if (rc == SQLITE_DONE) {
    CUSTODY_RETURN_IF_ERROR(ProjectId(project));
    return Error(Category::kNotFound, "environment '" + env + "' does not exist in project '" + project + "'");
  }
  return Fail(rc, "finding environment");
}

Result<std::vector<EnvironmentRecord>> SqliteStore::ListEnvironments(const std::string& project) {
  Lease lease(*this);
  if (!lease.ok()) return lease.error();
  CUSTODY_ASSIGN_OR_RETURN(int64_t pid, ProjectId(project));
  Stmt s(db(), "SELECT id, name FROM environments WHERE project_id = ? ORDER BY name");
  s.Bind(1, pid);
  std::vector<EnvironmentRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back({s.Int(0), pid, project, s.Text(1)});
  if (rc != SQLITE_DONE) return Fail(rc, "listing environments");
  return out;
}

}  // namespace custody::core::sqlite
