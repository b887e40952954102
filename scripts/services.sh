#!/usr/bin/env bash
# Make sure RabbitMQ (with the management and prometheus plugins) and Postgres answer on this machine.
# Starts a service that is installed but stopped; fails with one line naming what is missing.
set -euo pipefail

AMQP_PORT=${AMQP_PORT:-5672}
MGMT_PORT=${MGMT_PORT:-15672}
PG_PORT=${PG_PORT:-5432}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port, what, seconds
  for _ in $(seq "$3"); do answers "$1" && return 0; sleep 1; done
  echo "services: $2 does not answer on 127.0.0.1:$1" >&2; exit 1
}

ensure_rabbitmq() {
  if ! answers "$AMQP_PORT"; then
    command -v rabbitmq-server >/dev/null || { echo "services: RabbitMQ is not running and not installed (apt-get install rabbitmq-server)" >&2; exit 1; }
    echo "services: starting RabbitMQ"
    rabbitmq-server -detached
    wait_for "$AMQP_PORT" RabbitMQ 90
  fi
  if ! answers "$MGMT_PORT"; then
    command -v rabbitmq-plugins >/dev/null || { echo "services: the management API does not answer and rabbitmq-plugins is missing" >&2; exit 1; }
    echo "services: enabling rabbitmq_management and rabbitmq_prometheus"
    rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus >/dev/null
    wait_for "$MGMT_PORT" "RabbitMQ management API" 60
  fi
}

ensure_postgres() {
  answers "$PG_PORT" && return 0
  command -v pg_ctlcluster >/dev/null || { echo "services: Postgres is not running and not installed (apt-get install postgresql)" >&2; exit 1; }
  echo "services: starting Postgres"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  wait_for "$PG_PORT" Postgres 60
}

ensure_rabbitmq
ensure_postgres
echo "services: RabbitMQ (amqp $AMQP_PORT, management $MGMT_PORT) and Postgres ($PG_PORT) answer"
