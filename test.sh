#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what the tests need beyond
# Rust when it is missing, then runs nextest. Extra arguments go to nextest.
set -euo pipefail
cd "$(dirname "$0")"

# Debian package -> a file it installs. python3 runs the original renderer as a reference;
# Chromium checks the web gallery in a real browser; the tests start their own PostgreSQL
# servers, Patroni members, etcd members and OpenStack Swift clusters (S3 through s3api)
# from the installed programs; the multi-host tests make hosts of network namespaces
# (ip, from iproute2) and run PostgreSQL as its own user (setpriv, from util-linux);
# `faafo bench http` drives wrk and compares with haproxy; gcc and make build the C code
# of some crates (SQLite, jemalloc).
declare -A needs=(
  [gcc]=/usr/bin/gcc
  [make]=/usr/bin/make
  [python3]=/usr/bin/python3
  [chromium]=/usr/bin/chromium
  [postgresql]=/usr/lib/postgresql
  [etcd-server]=/usr/bin/etcd
  [swift]=/usr/bin/swift-ring-builder
  [swift-proxy]=/usr/bin/swift-proxy-server
  [swift-object]=/usr/bin/swift-object-server
  [swift-container]=/usr/bin/swift-container-server
  [swift-account]=/usr/bin/swift-account-server
  [rsync]=/usr/bin/rsync
  [iproute2]=/sbin/ip
  [util-linux]=/usr/bin/setpriv
  [python3-venv]=/usr/lib/python3.11/ensurepip
  [wrk]=/usr/bin/wrk
  [haproxy]=/usr/sbin/haproxy
)
missing=()
for package in "${!needs[@]}"; do
  [ -e "${needs[$package]}" ] || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: the tests need these Debian packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "test.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo-nextest >/dev/null || {
  echo "test.sh: cargo-nextest is missing: cargo install cargo-nextest --locked" >&2
  exit 1
}

# Patroni before 3.1.2 can lose acknowledged writes in a failover (Debian 12 ships 3.0.2;
# see SAFE_VERSION in crates/faafo-store/src/patroni.rs). The tests run the last 3.x
# release from PyPI, in a venv under target/, replaced when it holds another version.
patroni_venv=target/patroni-venv
patroni_version=3.3.11
if [ "$("$patroni_venv/bin/patroni" --version 2>/dev/null)" != "patroni $patroni_version" ]; then
  echo "test.sh: installing Patroni $patroni_version from PyPI into $patroni_venv"
  rm -rf "$patroni_venv"
  # The system Python: Patroni runs as the postgres user, who may not reach another.
  /usr/bin/python3 -m venv "$patroni_venv"
  "$patroni_venv/bin/pip" install --quiet "patroni[etcd3]==$patroni_version" psycopg2-binary
fi
export FAAFO_PATRONI_PROGRAM="$PWD/$patroni_venv/bin/patroni"

# Schemathesis (PyPI) fuzzes the API from its own OpenAPI description.
schemathesis_venv=target/schemathesis-venv
if [ ! -x "$schemathesis_venv/bin/st" ]; then
  echo "test.sh: installing Schemathesis from PyPI into $schemathesis_venv"
  /usr/bin/python3 -m venv "$schemathesis_venv"
  "$schemathesis_venv/bin/pip" install --quiet 'schemathesis==4.32.5'
fi
export FAAFO_SCHEMATHESIS="$PWD/$schemathesis_venv/bin/st"

exec cargo nextest run --workspace --locked "$@"
