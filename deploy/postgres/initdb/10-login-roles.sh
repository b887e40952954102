#!/bin/sh
# Runs once, when the postgres image initialises an empty data volume (docker-entrypoint-initdb.d): the
# consumers' writer and the read-only login roles with their passwords from deploy/.env. Their privileges
# come from migration 0004 (detfleet db migrate), which finds the roles already there and only grants.
set -eu
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v writer_password="$DB_WRITER_PASSWORD" -v reader_password="$DB_READER_PASSWORD" <<'SQL'
CREATE ROLE detfleet_writer LOGIN PASSWORD :'writer_password';
CREATE ROLE detfleet_reader LOGIN PASSWORD :'reader_password';
SQL
