#!/usr/bin/env bash
# Make sure the servers the integration tests talk to answer: PostgreSQL and Redis, at KILN_TEST_DATABASE_URL /
# KILN_TEST_REDIS_URL when set (then they are only checked), else at the local defaults of tests/support/servers.py,
# which this script starts when they are installed but not running.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WAIT_S=30

# Prints nothing and succeeds when the server answers; else prints where it looked and why it failed.
probe() {
    "$PYTHON" - "$1" <<'PY'
import os
import sys

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.support.servers import DEFAULT_ADMIN_URL, DEFAULT_REDIS_URL

try:
    if sys.argv[1] == "postgres":
        url = os.environ.get("KILN_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
        where = make_url(url).render_as_string(hide_password=True)
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    else:
        url = os.environ.get("KILN_TEST_REDIS_URL", DEFAULT_REDIS_URL)
        where = url.rpartition("@")[2]
        redis.Redis.from_url(url, socket_timeout=3).ping()
except Exception as error:
    print(f"{where}: {type(error).__name__}: {str(error).strip()}")
    sys.exit(1)
PY
}

wait_for() {
    local deadline=$((SECONDS + WAIT_S))
    until probe "$1" >/dev/null; do
        if ((SECONDS > deadline)); then
            return 1
        fi
        sleep 0.5
    done
}

start_postgres() {
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        local version
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
    elif command -v pg_ctl >/dev/null && [ -n "${PGDATA:-}" ]; then
        # PostgreSQL refuses to run as root: its tools go through the postgres user there.
        local as_owner=()
        if [ "$(id -u)" = 0 ]; then as_owner=(runuser -u postgres --); fi
        "${as_owner[@]}" pg_ctl -D "$PGDATA" -l "$PGDATA/server.log" -w start
    else
        echo "PostgreSQL is not installed here (no pg_ctlcluster, nor pg_ctl with PGDATA set)" >&2
        return 1
    fi
}

start_redis() {
    if ! command -v redis-server >/dev/null; then
        echo "Redis is not installed here (no redis-server on PATH)" >&2
        return 1
    fi
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
}

# ensure NAME VARIABLE: check the server; start it if the tests use the local default and it is down.
ensure() {
    local name=$1 variable=$2 problem
    if problem=$(probe "$name"); then
        echo "$name: answering"
        return 0
    fi
    if [ -n "${!variable:-}" ]; then
        echo "$name does not answer at $problem (from $variable)" >&2
        return 1
    fi
    echo "$name: not answering ($problem); starting it"
    if ! "start_$name" || ! wait_for "$name"; then
        echo "$name does not answer at $problem; install and start it, or set $variable" >&2
        return 1
    fi
    echo "$name: answering"
}

status=0
ensure postgres KILN_TEST_DATABASE_URL || status=1
ensure redis KILN_TEST_REDIS_URL || status=1
exit "$status"
