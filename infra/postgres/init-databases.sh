#!/bin/sh
# Runs once, on the first start of an empty Postgres volume: one database per service.
set -eu
for db in mlflow prefect; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE $db"
done
