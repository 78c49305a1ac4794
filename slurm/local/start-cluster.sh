#!/usr/bin/env bash
# hpcgate's private single-node Slurm cluster (munged + slurmctld + slurmd [+ slurmrestd]),
# started without systemd. Idempotent: a healthy cluster in DIR is reused as it is.
#
#   eval "$(slurm/local/start-cluster.sh [DIR])"      # DIR defaults to /tmp/hpcgate-slurm
#
# stdout carries only `export ...` lines (also saved to DIR/env.sh); progress goes to stderr.
# Every daemon's PID is recorded under DIR/run so stop-cluster.sh ends exactly these.
# Knobs: HPCGATE_SLURM_CPUS (declared CPUs, default 64; may exceed the real ones),
#        HPCGATE_SLURM_MEM_MB (default 65536), HPCGATE_SLURM_PARTITIONS (default "debug gpu"),
#        HPCGATE_SLURM_RESTD=1 (also run slurmrestd on a unix socket),
#        HPCGATE_SLURM_CTLD_PORT / HPCGATE_SLURM_SLURMD_PORT (default 6817 / 6818).
set -euo pipefail

say() { printf '[slurm-local] %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "run as root (the daemons and the job user are root)"
started_ns=$(date +%s%N)

DIR=${1:-${HPCGATE_SLURM_DIR:-/tmp/hpcgate-slurm}}
CPUS=${HPCGATE_SLURM_CPUS:-64}
MEM=${HPCGATE_SLURM_MEM_MB:-65536}
PARTITIONS=${HPCGATE_SLURM_PARTITIONS:-debug gpu}
RESTD=${HPCGATE_SLURM_RESTD:-0}
CTLD_PORT=${HPCGATE_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${HPCGATE_SLURM_SLURMD_PORT:-6818}
NODE=localhost
HERE=$(cd "$(dirname "$0")" && pwd)

# --- packages (no service may start during install: policy-rc.d says no) ---------------
need=(munge slurmctld slurmd slurm-client)
[ "$RESTD" = 1 ] && need+=(slurmrestd)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  log=$(mktemp)
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    tail -n 20 "$log" >&2; fail "apt-get install failed"
  fi
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  rm -f "$log"
fi

mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd -P)
RUN=$DIR/run LOG=$DIR/log STATE=$DIR/state CONF=$DIR/slurm.conf
# munged refuses a socket directory unless every parent is world-searchable; unix socket
# paths are also limited to ~108 bytes. Fall back to a short path under /tmp otherwise.
SOCK=$DIR/sock
p=$DIR
while [ "$p" != / ]; do
  [ $(( 8#$(stat -c %a "$p") & 1 )) -eq 1 ] || SOCK=""
  p=$(dirname "$p")
done
if [ -z "$SOCK" ] || [ ${#DIR} -gt 60 ]; then
  SOCK=/tmp/hpcgate-slurm-sock-$(printf %s "$DIR" | sha1sum | cut -c1-10)
fi
export SLURM_CONF=$CONF

# is_up NAME: the PID recorded for NAME is a live, non-zombie process named NAME*
is_up() {
  local pid state
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1"* ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ]
}

write_env() {
  {
    echo "export SLURM_CONF=$CONF"
    [ "$RESTD" = 1 ] && echo "export HPCGATE_SLURM_RESTD_SOCKET=$SOCK/rest/slurmrestd.sock"
    true
  } > "$DIR/env.sh"
  cat "$DIR/env.sh"
  say "ready in $(( ($(date +%s%N) - started_ns) / 1000000 )) ms: $CPUS CPUs, partitions: $PARTITIONS"
}

# The node must be schedulable and slurmctld must have run its first scheduling cycle
# (a few seconds after start); before that a submitted job just waits.
wait_schedulable() {
  local i state="" cycles
  for i in $(seq 150); do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 || true)
    case "$state" in idle*|mix*|alloc*|comp*) break ;; esac
    sleep 0.2
  done
  case "$state" in idle*|mix*|alloc*|comp*) ;; *)
    say "node state is '${state:-unknown}' after 30 s"; tail -n 15 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
    return 1 ;;
  esac
  for i in $(seq 150); do
    cycles=$(sdiag 2>/dev/null | awk '/Main schedule statistics/ {m = 1} m && /Total cycles:/ {print $3; exit}')
    [ "${cycles:-0}" -gt 0 ] && return 0
    sleep 0.2
  done
  say "scheduler did not run a cycle within 30 s"; return 1
}

daemons=(munged slurmctld slurmd); [ "$RESTD" = 1 ] && daemons+=(slurmrestd)
healthy=1
for d in "${daemons[@]}"; do is_up "$d" || healthy=0; done
if [ "$healthy" = 1 ]; then
  say "reusing the cluster in $DIR"
  wait_schedulable || fail "cluster in $DIR is not schedulable"
  write_env; exit 0
fi

# Partly up or stale: stop what we recorded and start clean (jobs of a dead cluster are gone).
"$HERE/stop-cluster.sh" "$DIR" >&2 || true
mkdir -p "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd" "$DIR/munge" "$SOCK"
chmod 700 "$DIR/munge"; chmod 755 "$SOCK"
rm -rf "${STATE:?}"/ctld/* "${STATE:?}"/slurmd/* "$RUN"/*.pid
if [ ! -s "$DIR/munge/munge.key" ]; then
  head -c 1024 /dev/urandom > "$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"
fi

partition_lines=""
default=YES
for part in $PARTITIONS; do
  partition_lines+="PartitionName=$part Nodes=$NODE Default=$default MaxTime=INFINITE State=UP"$'\n'
  default=NO
done
cat > "$CONF" <<CONF
# written by hpcgate slurm/local/start-cluster.sh
ClusterName=hpcgate-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# Without systemd or cgroups: track job processes by their parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Declared CPUs and memory may exceed the machine's: this cluster schedules simulators.
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
$partition_lines
CONF

await_up() {
  local i
  for i in $(seq 100); do is_up "$1" && return 0; sleep 0.1; done
  tail -n 15 "$LOG/$1.log" >&2 || true; fail "$1 did not start"
}
munged --key-file="$DIR/munge/munge.key" --socket="$SOCK/munge.socket" --pid-file="$RUN/munged.pid" \
  --log-file="$LOG/munged.log" --seed-file="$DIR/munge/munged.seed" || fail "munged failed ($LOG/munged.log)"
await_up munged
slurmctld -f "$CONF" || fail "slurmctld failed ($LOG/slurmctld.log)"
await_up slurmctld
slurmd -f "$CONF" -N "$NODE" || fail "slurmd failed ($LOG/slurmd.log)"
await_up slurmd
if [ "$RESTD" = 1 ]; then
  # slurmrestd will not run as root; local auth over a unix socket, as user nobody.
  mkdir -p "$SOCK/rest"; chown nobody:nogroup "$SOCK/rest"; rm -f "$SOCK/rest/slurmrestd.sock"
  # Without slurmdbd only the v0.0.38 plugin loads (the default set also wants dbv0.0.38).
  setsid slurmrestd -f "$CONF" -u nobody -s openapi/v0.0.38 -a rest_auth/local "unix:$SOCK/rest/slurmrestd.sock" \
    < /dev/null >> "$LOG/slurmrestd.log" 2>&1 &
  echo $! > "$RUN/slurmrestd.pid"
  for _ in $(seq 50); do [ -S "$SOCK/rest/slurmrestd.sock" ] && break; sleep 0.1; done
  is_up slurmrestd || { tail -n 5 "$LOG/slurmrestd.log" >&2; fail "slurmrestd did not start"; }
fi
wait_schedulable || fail "cluster did not become schedulable"
write_env
