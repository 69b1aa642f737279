#!/usr/bin/env bash
# Make sure the machine's own servers are up (PostgreSQL, MariaDB, Redis, RabbitMQ on their standard
# loopback ports). Servers that exist only for the tests (moto, DynamoDB Local, a Redis
# Cluster) are started and stopped by the test suite's fixtures on free ports.
set -u

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {
  for _ in $(seq 1 50); do up "$1" && return 0; sleep 0.2; done
  return 1
}

if ! up 5432 && command -v pg_ctlcluster >/dev/null; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  wait_up 5432 || echo "services: PostgreSQL did not come up" >&2
fi
if ! up 3306 && [ -x /usr/sbin/mariadbd ]; then
  echo "services: starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  wait_up 3306 || echo "services: MariaDB did not come up" >&2
fi
if ! up 6379 && command -v redis-server >/dev/null; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  wait_up 6379 || echo "services: Redis did not come up" >&2
fi
if ! up 5672 && command -v rabbitmq-server >/dev/null; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 150); do up 5672 && break; sleep 0.2; done
  up 5672 || echo "services: RabbitMQ did not come up" >&2
fi
if up 5432 && command -v psql >/dev/null; then
  psql -h 127.0.0.1 -U postgres -d test -qc 'CREATE EXTENSION IF NOT EXISTS pg_stat_statements' \
    >/dev/null 2>&1 || true
fi
exit 0
