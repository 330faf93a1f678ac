#!/usr/bin/env bash
# slurm-down.sh - stop what tests/cluster/slurm-up.sh started, by its pid files only, and remove its state directory.
# Jobs are cancelled first, so no slurmstepd or job process is left behind; a step daemon that still runs in one of
# the virtual cluster's nodes afterwards is stopped by its pid (it belongs to this Slurm: nothing else runs slurmstepd
# inside these namespaces). Idempotent. Same environment as slurm-up.sh.
# Usage: slurm-down.sh [--keep]   (--keep: leave $STATE, with the config and the logs, for a look or a restart)
set -uo pipefail
NAME=${VCLUSTER_NAME:-hv}
STATE=${VCLUSTER_SLURM_DIR:-/tmp/hpcdnn-slurm-$NAME}
export SLURM_CONF=$STATE/slurm.conf

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {  # stop <expected comm> <pid>...: TERM to each (all at once: each takes ~2 s), KILL to those alive after 10 s
  local comm=$1 pid mine=() left
  shift
  for pid in "$@"; do
    kill -0 "$pid" 2>/dev/null || continue
    if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" != "$comm" ]; then echo "pid $pid is not $comm: leaving it alone"; continue; fi
    kill -TERM "$pid" && mine+=("$pid")
  done
  for _ in $(seq 100); do
    left=()
    for pid in "${mine[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
    [ ${#left[@]} = 0 ] && break
    sleep 0.1
  done
  for pid in "${left[@]}"; do echo "$comm: no exit after 10 s, SIGKILL $pid"; kill -KILL "$pid"; done
  [ ${#mine[@]} = 0 ] || echo "$comm: stopped (pid ${mine[*]})"
}

if [ -f "$SLURM_CONF" ] && alive "$STATE/slurmctld.pid"; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    echo "cancelling jobs: $(echo $jobs)"
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 30); do [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 1; done
  fi
fi

nodes=()
pids=()
for pf in "$STATE"/slurmd-*.pid; do
  [ -s "$pf" ] || continue
  n=${pf##*/slurmd-}
  nodes+=("${n%.pid}")
  pids+=("$(cat "$pf")")
done
stop slurmd "${pids[@]}"
rm -f "$STATE"/slurmd-*.pid
for n in "${nodes[@]}"; do  # step daemons that outlived their job (their node's slurmd is gone now)
  pids=()
  for pid in $(ip netns pids "$n" 2>/dev/null); do
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = slurmstepd ] && pids+=("$pid")
  done
  stop slurmstepd "${pids[@]}"
done
for pf in "$STATE/slurmctld.pid:slurmctld" "$STATE/munge/munged.pid:munged"; do
  [ -s "${pf%:*}" ] && stop "${pf#*:}" "$(cat "${pf%:*}")"
  rm -f "${pf%:*}"
done

if [ "${1:-}" != --keep ] && [ -d "$STATE" ]; then
  rm -rf "$STATE"
  echo "removed $STATE"
fi
exit 0
