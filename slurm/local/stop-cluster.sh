#!/usr/bin/env bash
# Stop the cluster that start-cluster.sh started in DIR: cancel its jobs, then end exactly the
# daemons whose PIDs it recorded under DIR/run (never by process name, so a site's own Slurm
# on the same machine is untouched). Safe to run when nothing is running.
#   slurm/local/stop-cluster.sh [DIR]     # DIR defaults to /tmp/hpcgate-slurm
set -uo pipefail

say() { printf '[slurm-local] %s\n' "$*" >&2; }
DIR=${1:-${HPCGATE_SLURM_DIR:-/tmp/hpcgate-slurm}}
RUN=$DIR/run
[ -d "$RUN" ] || { say "no cluster recorded in $DIR"; exit 0; }
export SLURM_CONF=$DIR/slurm.conf

live_pid() {  # live_pid NAME: print the recorded PID of NAME if that process still runs
  local pid state
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1"* ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ] && echo "$pid"
}

if live_pid slurmctld > /dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 50); do
      [ -z "$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

for d in slurmrestd slurmd slurmctld munged; do
  if pid=$(live_pid "$d"); then
    say "stopping $d (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do live_pid "$d" > /dev/null || break; sleep 0.1; done
    if live_pid "$d" > /dev/null; then say "$d ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null; fi
  fi
  rm -f "$RUN/$d.pid"
done
exit 0
