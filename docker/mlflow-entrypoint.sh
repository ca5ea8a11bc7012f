#!/bin/sh
# MLflow server with the basic-auth app. Credentials come from the environment and go into a config
# file readable by this container only; they never appear on the command line or in logs.
set -eu
: "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD in .env}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"
umask 077
cat > /tmp/basic_auth.ini <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:////tmp/basic_auth.db
admin_username = ${MLFLOW_ADMIN_USERNAME:-admin}
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini
export MLFLOW_BACKEND_STORE_URI="postgresql://${POSTGRES_USER:-mlflow}:${POSTGRES_PASSWORD}@postgres:5432/${POSTGRES_DB:-mlflow}"
exec mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000 \
    --artifacts-destination /mlartifacts --serve-artifacts
