#!/bin/bash
# Runs once in each primary (docker-entrypoint-initdb.d): the application role and
# database, and replication access for the replicas' pg_basebackup.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE ROLE app LOGIN PASSWORD 'app';
CREATE DATABASE app OWNER app;
SQL
echo "host replication all 172.28.0.0/16 scram-sha-256" >> "$PGDATA/pg_hba.conf"
