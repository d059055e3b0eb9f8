#!/bin/sh
# Creates the Prefect and MLflow databases, each owned by its own role, on the first
# start of the postgres container (it runs files in /docker-entrypoint-initdb.d/ once,
# when the data volume is empty; later password changes need ALTER ROLE by hand).
#
# Passwords come from the environment and reach PostgreSQL as psql variables, so they
# are never part of a command line or a log line.
set -eu
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD must be set (see .env.example)}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set (see .env.example)}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v prefect_password="$PREFECT_DB_PASSWORD" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
SQL
