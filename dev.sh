#!/usr/bin/env bash
# hpcgate's two entry points on a fresh Debian/Ubuntu machine (run as root, or with sudo):
#
#   ./dev.sh up      install what is missing, then run the whole stack until Ctrl-C
#   ./dev.sh test    install what is missing, then run ruff, mypy and the whole test suite
#
# Both are idempotent: each step checks before it acts, so a second run only re-runs the work.
# Installs: Debian packages (PostgreSQL, Redis, Slurm + munge, nginx, jq for the docs' examples,
# kubectl, promtool) only when absent, a virtual environment in .venv pinned by constraints.txt
# (re-installed only when pyproject.toml, constraints.txt or the C relay's source changed), and
# starts PostgreSQL / Redis / the local Slurm cluster only when they are not already running.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${HPCGATE_VENV:-$ROOT/.venv}
say() { printf '[dev] %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

apt_install() {  # apt_install PKG...: install the packages that are not installed yet
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "apt-get install ${missing[*]}"
  # Keep postinst scripts from starting services: we start what we need ourselves.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d > /dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d; own_policy=1
  fi
  local rc=0
  { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    > /tmp/hpcgate-apt.log 2>&1 || rc=$?
  [ "$own_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
  [ "$rc" -eq 0 ] || { tail -n 20 /tmp/hpcgate-apt.log >&2; fail "apt-get failed (log: /tmp/hpcgate-apt.log)"; }
}

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

ensure_packages() {
  local pkgs=(postgresql redis-server munge slurmctld slurmd slurm-client nginx-light jq)
  # The k8s tests render the overlays with a real kustomize (`kubectl kustomize`) and check the
  # Prometheus rules with promtool (Debian's prometheus package; its service is never started).
  command -v kubectl > /dev/null || pkgs+=(kubernetes-client)
  command -v promtool > /dev/null || pkgs+=(prometheus)
  # The operator page (control/api/ui.py) is tested in a real headless browser.
  command -v chromium > /dev/null || pkgs+=(chromium)
  command -v openssl > /dev/null || pkgs+=(openssl)  # the TLS tests make a certificate with it
  command -v python3 > /dev/null && python_ok python3 && python3 -m venv --help > /dev/null 2>&1 \
    || pkgs+=(python3 python3-venv python3-dev)
  # gcc and the Python headers build the gateway's C relay (gateway/_crelay.c) at install time.
  command -v gcc > /dev/null || pkgs+=(gcc libc6-dev)
  python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
    2> /dev/null || pkgs+=(python3-dev)
  apt_install "${pkgs[@]}"
}

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return 0; fi
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  [ -n "$version" ] || fail "PostgreSQL is installed but has no cluster under /etc/postgresql"
  local hba=/etc/postgresql/$version/main/pg_hba.conf
  # Development and CI use trust auth for user postgres on loopback (never on a real site).
  if ! grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
    say "allowing trust auth for postgres on 127.0.0.1 in $hba"
    $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
  fi
  say "starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 0.2; done
  fail "PostgreSQL did not accept connections on 127.0.0.1:5432"
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping > /dev/null 2>&1; then return 0; fi
  say "starting Redis"
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping > /dev/null 2>&1 && return 0; sleep 0.1; done
  fail "Redis did not answer on 127.0.0.1:6379"
}

ensure_venv() {
  local py=python3 stamp="$VENV/.hpcgate-installed" want
  # The C relay is compiled at install time: an edited gateway/_crelay.c needs a reinstall too.
  want=$(cat pyproject.toml constraints.txt gateway/_crelay.c | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/hpcgate" ]; then return 0; fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    $py -m venv "$VENV"
  fi
  say "installing Python packages (pinned by constraints.txt)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
  echo "$want" > "$stamp"
}

ensure_slurm() {
  eval "$("$ROOT/slurm/local/start-cluster.sh")"
}

install_all() {
  ensure_packages
  ensure_postgres
  ensure_redis
  ensure_venv
  ensure_slurm
}

case "${1:-}" in
  up)
    shift
    install_all
    exec "$VENV/bin/hpcgate" up "$@"
    ;;
  test)
    shift
    install_all
    say "ruff"
    "$VENV/bin/ruff" check .
    say "mypy"
    "$VENV/bin/mypy"
    # pytest exits 5 when it collected no test: that is a failure here, never a pass.
    if [ "$#" -gt 0 ]; then
      say "pytest $*"
      "$VENV/bin/pytest" "$@"
    else
      # Most tests wait on real servers, not on the CPU: they run in parallel processes (one
      # test module per process: module fixtures stay whole). Those marked `serial` (per-exchange
      # deadlines, CPU-heavy runs) run afterwards, alone (two modules at a time, test_faults'
      # slow-reader test hung past its timeout in 2 runs of 11).
      say "pytest, in parallel (${HPCGATE_TEST_WORKERS:-3} processes)"
      "$VENV/bin/pytest" -n "${HPCGATE_TEST_WORKERS:-3}" --dist loadfile -m "not serial"
      say "pytest, the serial tests"
      "$VENV/bin/pytest" -m serial
    fi
    ;;
  *)
    echo "usage: $0 up|test [ARGS...]" >&2
    exit 2
    ;;
esac
