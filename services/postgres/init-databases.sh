#!/bin/bash
# One database per tool (MLflow, the cvops prediction log), created on first start.
set -euo pipefail
for db in "$MLFLOW_DB" "$CVOPS_DB"; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" -c "CREATE DATABASE \"$db\";"
done
