#!/bin/sh
# MLflow server with the basic-auth app, runs in PostgreSQL, artifacts served through the server.
# Secrets come from the environment and stay there or in files only this user can read; they never
# appear on a command line or in logs. The addresses default to the compose stack's; each can be set
# through the environment (tests/test_mlflow_service.py runs this same script on 127.0.0.1).
set -eu
: "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD in .env}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY in .env}"
POSTGRES_HOST="${POSTGRES_HOST:-postgres}"
POSTGRES_PORT="${POSTGRES_PORT:-5432}"
MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-4}"  # MLflow's default; each worker is a process of its own
MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}"
MLFLOW_AUTH_DIR="${MLFLOW_AUTH_DIR:-/tmp}"  # the auth config and its user database
# Seconds a worker trusts a password it has checked (MLflow's default, 0: check every request, each a
# deliberately slow hash). A password changed or revoked stays valid that long on the other workers.
MLFLOW_AUTH_CACHE_TTL_SECONDS="${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}"
umask 077

# The admin account is created from these on the first start; MLflow reads them from the environment,
# so the password is in no file. ('%' in a password would break the ini file's interpolation anyway.)
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_ADMIN_USERNAME:-admin}"
export MLFLOW_AUTH_ADMIN_PASSWORD="${MLFLOW_ADMIN_PASSWORD}"
cat > "${MLFLOW_AUTH_DIR}/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///${MLFLOW_AUTH_DIR}/basic_auth.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS}
INI
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_DIR}/basic_auth.ini"

# The driver is named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, the images install
# psycopg2. The password is percent-encoded, so that one with '/', '@' or ':' still makes a valid URI.
password=$(python3 -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${POSTGRES_USER:-mlflow}:${password}@${POSTGRES_HOST}:${POSTGRES_PORT}/${POSTGRES_DB:-mlflow}"
unset password
exec mlflow server --app-name basic-auth --host "${MLFLOW_HOST}" --port "${MLFLOW_PORT}" \
    --workers "${MLFLOW_WORKERS}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}" --serve-artifacts
