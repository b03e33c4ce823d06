#!/bin/bash
# One database and one role per tool, each role a plain login role (not superuser, cannot create
# databases or roles) that owns its own database and nothing else:
#   MLFLOW_DB / MLFLOW_DB_USER / MLFLOW_DB_PASSWORD   the MLflow server's store
#   CVOPS_DB  / CVOPS_DB_USER  / CVOPS_DB_PASSWORD    the prediction log (service, migrate, monitor, dashboards)
# The postgres image runs it once, on the first start of an empty data folder, as POSTGRES_USER
# over the local socket. It is safe to run again (roles and databases are created only when
# missing; passwords, ownership and grants are set every time), and it does not mind a database
# the image has made already (POSTGRES_DB, which defaults to POSTGRES_USER).
# Passwords reach SQL as psql variables (:'name' quotes them), never spliced into the text.
set -euo pipefail

for var in MLFLOW_DB MLFLOW_DB_USER MLFLOW_DB_PASSWORD CVOPS_DB CVOPS_DB_USER CVOPS_DB_PASSWORD; do
  if [ -z "${!var:-}" ]; then echo "init-databases.sh: $var is not set (see .env)" >&2; exit 1; fi
done
if [ "$MLFLOW_DB" = "$CVOPS_DB" ] || [ "$MLFLOW_DB_USER" = "$CVOPS_DB_USER" ]; then
  echo "init-databases.sh: MLflow and cvops need a database and a role each (MLFLOW_DB != CVOPS_DB, MLFLOW_DB_USER != CVOPS_DB_USER)" >&2; exit 1
fi
for role in "$MLFLOW_DB_USER" "$CVOPS_DB_USER"; do
  if [ "$role" = "${POSTGRES_USER:-postgres}" ]; then
    echo "init-databases.sh: the tool role '$role' must differ from POSTGRES_USER (the superuser)" >&2; exit 1
  fi
done

one_tool() {   # database role password
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
       -v db="$1" -v role="$2" -v pw="$3" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L', :'role', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'role') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db') \gexec
SELECT format('GRANT ALL ON DATABASE %I TO %I', :'db', :'role') \gexec
SQL
  # PostgreSQL 15: the public schema belongs to pg_database_owner (the role above) in a new
  # database; a database made before (e.g. POSTGRES_DB) may still have it owned by the superuser.
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "$1" -v role="$2" <<'SQL'
SELECT format('ALTER SCHEMA public OWNER TO %I', :'role') \gexec
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
  echo "init-databases.sh: database $1 owned by role $2 (no superuser, CONNECT for its owner only)"
}

one_tool "$MLFLOW_DB" "$MLFLOW_DB_USER" "$MLFLOW_DB_PASSWORD"
one_tool "$CVOPS_DB" "$CVOPS_DB_USER" "$CVOPS_DB_PASSWORD"
