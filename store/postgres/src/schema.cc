// The schema: telling a custody database from any other, and migrating it.
#include "pg_store_impl.h"

namespace custody::core::pg {
namespace {

// Numbered migrations, each applied in one transaction together with the
// version that counts it. Append only: never edit a released step. Step 1
// is the whole schema of the SQLite store's six steps; the two stores share
// the Store interface, not their migration history.
constexpr const char* kMigrations[] = {
    R"sql(
CREATE TABLE custody_schema (
  marker  TEXT PRIMARY KEY CHECK (marker = 'custody'),
  version INTEGER NOT NULL
);
INSERT INTO custody_schema(marker, version) VALUES ('custody', 0);
CREATE TABLE projects (
  id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name       TEXT NOT NULL UNIQUE,
  created_at BIGINT NOT NULL
);
CREATE TABLE environments (
  id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  project_id BIGINT NOT NULL REFERENCES projects(id),
  name       TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  UNIQUE (project_id, name)
);
CREATE TABLE keks (
  id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  project_id           BIGINT NOT NULL REFERENCES projects(id),
  version              BIGINT NOT NULL,
  token_id             BYTEA NOT NULL UNIQUE,
  label                TEXT NOT NULL,
  state                TEXT NOT NULL DEFAULT 'active',
  encryptions_reserved BIGINT NOT NULL DEFAULT 0,
  created_at           BIGINT NOT NULL,
  material             BYTEA,
  UNIQUE (project_id, version)
);
CREATE TABLE secrets (
  id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  environment_id BIGINT NOT NULL REFERENCES environments(id),
  name           TEXT NOT NULL,
  created_at     BIGINT NOT NULL,
  UNIQUE (environment_id, name)
);
CREATE TABLE secret_versions (
  secret_id      BIGINT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
  version        BIGINT NOT NULL,
  kek_id         BIGINT NOT NULL REFERENCES keks(id),
  blob           BYTEA NOT NULL,
  created_at     BIGINT NOT NULL,
  superseded_at  BIGINT,
  revoked_at     BIGINT,
  revoked_reason TEXT,
  revoked_by     TEXT,
  PRIMARY KEY (secret_id, version)
);
CREATE INDEX secret_versions_by_kek ON secret_versions(kek_id, secret_id, version);
CREATE TABLE policies (
  version    BIGINT PRIMARY KEY,
  sha256     TEXT NOT NULL,
  text       TEXT NOT NULL,
  applied_at BIGINT NOT NULL,
  applied_by TEXT NOT NULL
);
CREATE TABLE usage (
  project       TEXT NOT NULL,
  environment   TEXT NOT NULL,
  principal     TEXT NOT NULL,
  day           TEXT NOT NULL,
  unseals       BIGINT NOT NULL DEFAULT 0,
  seals         BIGINT NOT NULL DEFAULT 0,
  denied        BIGINT NOT NULL DEFAULT 0,
  rate_limited  BIGINT NOT NULL DEFAULT 0,
  spend_limited BIGINT NOT NULL DEFAULT 0,
  last_use      BIGINT NOT NULL,
  PRIMARY KEY (project, environment, principal, day)
);
CREATE TABLE buckets (
  key        TEXT PRIMARY KEY,
  tokens     DOUBLE PRECISION NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE audit_checkpoints (
  seq         BIGINT PRIMARY KEY,
  covers_hash TEXT NOT NULL,
  created_at  BIGINT NOT NULL
);
CREATE TABLE locks (
  name            TEXT PRIMARY KEY,
  holder_host     TEXT NOT NULL,
  holder_pid      BIGINT NOT NULL,
  holder_started  BIGINT NOT NULL,
  holder_instance TEXT NOT NULL,
  expires_at      BIGINT NOT NULL
);
)sql",
    // 2: the checkpoint witness per node (several custodyd nodes share the
    // store, each with its own audit chain and seqs); rows from before keep
    // node '' (the one host that wrote them).
    R"sql(
ALTER TABLE audit_checkpoints ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_checkpoints DROP CONSTRAINT audit_checkpoints_pkey;
ALTER TABLE audit_checkpoints ADD PRIMARY KEY (node, seq);
)sql",
    // 3: the audit trail of the nodes that use this store: one hash chain
    // per node (records are the file log's lines, byte for byte), and each
    // chain's head, whose row lock gives one writer of a node at a time.
    R"sql(
CREATE TABLE audit_heads (
  node      TEXT PRIMARY KEY,
  seq       BIGINT NOT NULL DEFAULT 0,
  hash      TEXT NOT NULL DEFAULT repeat('0', 64),
  ckpt_seq  BIGINT NOT NULL DEFAULT 0,
  ckpt_time BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE audit_records (
  node TEXT NOT NULL,
  seq  BIGINT NOT NULL,
  line TEXT NOT NULL,
  PRIMARY KEY (node, seq)
);
)sql",
    // 4: idempotency keys of puts (Idempotency-Key): the version each stored.
    R"sql(
CREATE TABLE put_keys (
  secret_id  BIGINT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
  key        TEXT NOT NULL,
  version    BIGINT NOT NULL,
  created_at BIGINT NOT NULL,
  PRIMARY KEY (secret_id, key)
);
)sql",
    // 5: change notifications for nodes' read caches. Any statement that
    // changes what a GET reads (a project, an environment, a secret, a
    // version, a KEK) notifies channel custody_store_changed; PostgreSQL
    // sends it to listeners when the transaction commits, once per
    // transaction, and never for one that rolls back.
    R"sql(
CREATE FUNCTION custody_store_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('custody_store_changed', '');
  RETURN NULL;
END
$$;
CREATE TRIGGER projects_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON projects
  FOR EACH STATEMENT EXECUTE FUNCTION custody_store_changed();
CREATE TRIGGER environments_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON environments
  FOR EACH STATEMENT EXECUTE FUNCTION custody_store_changed();
CREATE TRIGGER secrets_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON secrets
  FOR EACH STATEMENT EXECUTE FUNCTION custody_store_changed();
CREATE TRIGGER secret_versions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON secret_versions
  FOR EACH STATEMENT EXECUTE FUNCTION custody_store_changed();
CREATE TRIGGER keks_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keks
  FOR EACH STATEMENT EXECUTE FUNCTION custody_store_changed();
)sql",
    // 6: access tokens for the Vault-compatible API, by keyed hash only.
    R"sql(
CREATE TABLE access_tokens (
  token_hash     TEXT PRIMARY KEY,
  accessor       TEXT NOT NULL UNIQUE,
  principal      TEXT NOT NULL,
  issued_by      TEXT NOT NULL,
  issued_at      BIGINT NOT NULL,
  ttl            BIGINT NOT NULL,
  expires_at     BIGINT NOT NULL,
  max_expires_at BIGINT NOT NULL,
  revoked_at     BIGINT
);
CREATE INDEX access_tokens_by_principal ON access_tokens(principal);
)sql",
};

// Taken by every migration's transaction: two nodes starting at once on a
// new database migrate one after the other, and the second finds the work
// done. ('CSTD', as the SQLite store's application id.)
constexpr const char* kMigrationLock = "SELECT pg_advisory_xact_lock(1129534532)";

// The custody schema's version in the connection's schema (search_path),
// or nullopt when there is none.
Result<std::optional<int64_t>> SchemaVersion(Session& s) {
  // A scan of pg_class, not to_regclass(): a name lookup answers from the
  // session's catalog cache, which can still say "no such table" after
  // another node's migration committed while this one waited for the lock.
  CUSTODY_ASSIGN_OR_RETURN(Res r, s.Run("SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n "
                                        "ON n.oid = c.relnamespace WHERE c.relname = 'custody_schema' "
                                        "AND n.nspname = current_schema())"));
  if (r.Text(0, 0) != "t") return std::optional<int64_t>();
  CUSTODY_ASSIGN_OR_RETURN(Res v, s.Run("SELECT version FROM custody_schema WHERE marker = 'custody'"));
  if (v.rows() != 1) return std::optional<int64_t>(-1);
  return std::optional<int64_t>(v.Int(0, 0));
}

}  // namespace

Status PgStore::Init(bool create) {
  const int64_t want = static_cast<int64_t>(std::size(kMigrations));
  {
    Session s(*this);
    if (!s.ok()) return s.error();
    CUSTODY_ASSIGN_OR_RETURN(std::optional<int64_t> have, SchemaVersion(s));
    if (!have) {
      CUSTODY_ASSIGN_OR_RETURN(
          Res t, s.Run("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"));
      if (t.Int(0, 0) > 0) {
        return Error(Category::kIntegrity, "store " + where_ +
                                               " holds tables that are not a custody store; refusing to touch it "
                                               "(give custody a database, or a schema, of its own)");
      }
      if (!create) {
        return Error(Category::kNotFound,
                     "store " + where_ + " has no custody schema; run 'custody init --store URL' first");
      }
    } else if (*have < 0) {
      return Error(Category::kIntegrity, "store " + where_ + " has a damaged custody_schema table; refusing to touch it");
    } else if (*have > want) {
      return Error(Category::kConfig, "store " + where_ + " has schema version " + std::to_string(*have) +
                                          ", newer than this custody understands (" + std::to_string(want) +
                                          "); upgrade custody");
    } else if (*have == want) {
      return Status::Ok();
    }
  }
  for (int64_t step = 1; step <= want; ++step) {
    auto done = InTx<bool>([&](Session& s) -> Result<bool> {
      CUSTODY_RETURN_IF_ERROR(s.Exec(kMigrationLock));
      CUSTODY_ASSIGN_OR_RETURN(std::optional<int64_t> have, SchemaVersion(s));
      if (have.value_or(0) >= step) return false;  // another node ran it
      CUSTODY_RETURN_IF_ERROR(s.Exec(kMigrations[step - 1]));
      Params p;
      p.Add(step);
      CUSTODY_RETURN_IF_ERROR(s.Run("UPDATE custody_schema SET version = $1 WHERE marker = 'custody'", p));
      return true;
    });
    if (!done) return std::move(done).error();
  }
  return Status::Ok();
}

}  // namespace custody::core::pg
