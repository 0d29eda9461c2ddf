#!/usr/bin/env bash
# Installs redis-server from Debian's packages when it is missing: the Redis broker's
# integration tests (tests/redis_broker.rs, cargo feature `redis`) start their own.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server present: $(redis-server --version)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends redis-server
# The package starts a system service where it can; the tests start their own servers.
redis-server --version
