# slurm/env.sh - sourced (never run) by the sbatch scripts in slurm/: environment, threads, launcher, preemption.
#
# ENVIRONMENT KNOBS (set them before sbatch; sbatch exports the submitting shell's environment by default)
#   HPCDNN_HOME     the repository                       (default: $SLURM_SUBMIT_DIR: submit from the repo root)
#   HPCDNN_MODULES  modules to load first, e.g. "openmpi/5.0.5 cuda/12.4"           (default: none)
#   HPCDNN_VENV     virtualenv to activate, or "none"    (default: $HPCDNN_HOME/.venv when it exists)
#   PYTHON          the interpreter                      (default: python, from the venv/modules)
#   THREADS         threads per rank (torch, Numba, OpenMP, BLAS)       (default: $SLURM_CPUS_PER_TASK)
#   LAUNCHER        auto | srun | mpirun                 (default auto: srun when this Slurm has the MPI plugin
#                   the MPI needs - Open MPI: pmix, MPICH: pmi2 - else mpirun inside the allocation)
#   SRUN_MPI        srun's --mpi= type                   (default: pmix for Open MPI, pmi2 for MPICH)
#   SRUN_ARGS       extra srun options;  MPIRUN_ARGS  extra mpirun options
#   MAX_RESTARTS    stop requeueing a preempted run after this many preemptions (node failures not counted)
#                   (default 100)
#   HPCDNN_WATCH_LAUNCH  1: run the launcher under `hpcdnn launch`, which hears every rank's heartbeat and ends the
#                   job (exit 75, RUN_DIR/failed.json) when a rank or its node is lost; 0: the launcher alone  (default 1)
#   HEARTBEAT_TIMEOUT  seconds a rank may stay silent before the watcher calls it lost (--heartbeat_timeout) (default 60)
#   MAX_NODE_FAILURES  requeue a job that lost a node at most this many times, then let it fail        (default 3)
#   NODE_PROBE      1: after a lost rank, requeue only if its node fails a probe (`srun --overlap -w NODE true`); a
#                   rank that died on a node that answers (a crash, the OOM killer) fails the job as before;
#                   0: requeue on every lost rank (still at most MAX_NODE_FAILURES times)      (default 1)
#   NODE_PROBE_TIMEOUT  seconds the probe may take before the node counts as dead                 (default 30)
#   STOP_GRACE      seconds the launcher may keep running after the run wrote preempted.json or summary.json
#                   before the batch shell ends it (a rank or launcher hung in teardown must not cost the
#                   requeue or hold the allocation)                                         (default 60)
#
# WHAT A TRAINING SCRIPT GETS (hpcdnn_run)
#   * the launcher runs in the background; the batch shell traps USR1 (Slurm's --signal=B:USR1@lead) and TERM and
#     sends SIGUSR1 to the launcher, which forwards it to every rank (Open MPI 5's mpirun and srun both do); the
#     ranks finish their step, the root writes RUN_DIR/checkpoint.h5 and RUN_DIR/preempted.json, all exit 0;
#     SIGTERM is never passed on: Open MPI's mpirun kills its ranks ~1 s after a SIGTERM;
#   * a fresh RUN_DIR/preempted.json after the launcher returns with exit 0 and no fresh RUN_DIR/failed.json ->
#     `scontrol requeue $SLURM_JOB_ID` (the root writes it only once every rank, servers too, said it ends cleanly;
#     with a non-zero exit or a lost rank it is a crash: the job fails and the marker is removed); a launcher
#     still running STOP_GRACE s after preempted.json appeared (a rank hung in teardown) is ended first; one that
#     hangs STOP_GRACE s after the run wrote summary.json is ended and the job exits 0;
#     a signal that arrives before the launcher started requeues without starting it;
#   * the requeued job (SLURM_RESTART_COUNT > 0) finds RUN_DIR/checkpoint.h5 and passes --resume by itself;
#   * a rank that dies ends the job at once (python -m mpi4py aborts on an uncaught exception; mpirun and
#     srun --kill-on-bad-exit kill the rest), with the launcher's exit code (75 under the watcher) and no requeue;
#   * a lost node (HPCDNN_WATCH_LAUNCH=1): the watcher (hpcdnn/launch.py) names the lost rank, host and last step,
#     ends the launcher and exits 75 - also when the launcher exits 0 but the run did not finish; if a lost rank's
#     node fails the probe (NODE_PROBE), the job requeues and resumes from RUN_DIR/checkpoint.h5, at most
#     MAX_NODE_FAILURES times (counted in RUN_DIR/node_failures.log, apart from preemptions); otherwise the batch
#     script exits 75 and the job ends FAILED with the reason in its output. A run that did not finish and is not
#     requeued never exits 0.

hpcdnn_log() { echo "[hpcdnn-slurm $(date +%T)] $*" >&2; }
hpcdnn_die() { hpcdnn_log "ERROR: $*"; exit 2; }

# ------------------------------------------------------------------ signals that arrive before the launcher runs
_HPCDNN_PID=
_HPCDNN_SIGNAL=
_HPCDNN_TRAPPED=0
_hpcdnn_on_signal() {  # trap handler: remember, and ask the launcher (if any) to stop the ranks cleanly
  _HPCDNN_SIGNAL=$1
  _HPCDNN_TRAPPED=1
  if [ -n "$_HPCDNN_PID" ]; then
    hpcdnn_log "got SIG$1: SIGUSR1 to the launcher (pid $_HPCDNN_PID): ranks finish their step, checkpoint, exit"
    kill -USR1 "$_HPCDNN_PID" 2>/dev/null || true
  else
    hpcdnn_log "got SIG$1 before the launcher started"
  fi
}
trap '_hpcdnn_on_signal USR1' USR1
trap '_hpcdnn_on_signal TERM' TERM

# ------------------------------------------------------------------ software
HPCDNN_HOME=${HPCDNN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$HPCDNN_HOME/hpcdnn/train.py" ] \
  || hpcdnn_die "HPCDNN_HOME=$HPCDNN_HOME is not the hpcdnn repository: submit from the repository root or export HPCDNN_HOME=/path/to/hpcdnn"
if [ -n "${HPCDNN_MODULES:-}" ]; then
  if ! type module >/dev/null 2>&1; then
    for f in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
      [ -f "$f" ] && { source "$f"; break; }
    done
  fi
  # shellcheck disable=SC2086  # a list of module names
  module load $HPCDNN_MODULES || hpcdnn_die "module load $HPCDNN_MODULES failed"
fi
HPCDNN_VENV=${HPCDNN_VENV:-$HPCDNN_HOME/.venv}
if [ "$HPCDNN_VENV" != none ]; then
  [ -f "$HPCDNN_VENV/bin/activate" ] \
    || hpcdnn_die "no virtualenv at HPCDNN_VENV=$HPCDNN_VENV: run 'make install' in $HPCDNN_HOME, or set HPCDNN_VENV=none to use the modules' python"
  source "$HPCDNN_VENV/bin/activate"
fi
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1  # log lines reach the job's output file as they happen

# ------------------------------------------------------------------ threads: one rank per task, THREADS each
THREADS=${THREADS:-${SLURM_CPUS_PER_TASK:-0}}
if [ "$THREADS" -gt 0 ] 2>/dev/null; then
  export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS NUMBA_NUM_THREADS=$THREADS
fi
if [ "$(id -u)" = 0 ]; then  # CI runs as root; Open MPI refuses root without these
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# ------------------------------------------------------------------ launcher
hpcdnn_mpi_flavor() {  # openmpi | mpich | unknown, from the mpirun on PATH
  local v
  v=$(mpirun --version 2>&1 | head -5) || true
  case $v in
    *"Open MPI"*) echo openmpi ;;
    *HYDRA* | *MPICH*) echo mpich ;;
    *) echo unknown ;;
  esac
}

# hpcdnn_launcher: set HPCDNN_LAUNCH (an array: the launcher prefix for SLURM_NTASKS ranks) and HPCDNN_LAUNCHER.
# srun with the wrong --mpi type starts N singletons that each think they are alone (Open MPI under pmi2 does),
# so the type follows the MPI: pmix for Open MPI, pmi2 for MPICH.
hpcdnn_launcher() {
  local flavor want
  flavor=$(hpcdnn_mpi_flavor)
  case $flavor in openmpi) want=pmix ;; mpich) want=pmi2 ;; *) want= ;; esac
  SRUN_MPI=${SRUN_MPI:-$want}
  HPCDNN_LAUNCHER=${LAUNCHER:-auto}
  if [ "$HPCDNN_LAUNCHER" = auto ]; then
    HPCDNN_LAUNCHER=mpirun
    if [ -n "$SRUN_MPI" ] && srun --mpi=list 2>&1 | grep -qw "$SRUN_MPI"; then HPCDNN_LAUNCHER=srun; fi
  fi
  case $HPCDNN_LAUNCHER in
    srun)
      [ -n "$SRUN_MPI" ] || hpcdnn_die "LAUNCHER=srun: cannot tell the MPI from 'mpirun --version' ($flavor); set SRUN_MPI=pmix or pmi2"
      # shellcheck disable=SC2206  # SRUN_ARGS is a list of options
      HPCDNN_LAUNCH=(srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 ${SRUN_ARGS:-})
      ;;
    mpirun)
      if [ "$flavor" = openmpi ]; then
        # shellcheck disable=SC2206
        HPCDNN_LAUNCH=(mpirun -n "${SLURM_NTASKS:-1}" --bind-to none ${MPIRUN_ARGS:-})
      else
        # shellcheck disable=SC2206
        HPCDNN_LAUNCH=(mpirun -n "${SLURM_NTASKS:-1}" ${MPIRUN_ARGS:-})
      fi
      ;;
    *) hpcdnn_die "LAUNCHER=$HPCDNN_LAUNCHER is not one of auto, srun, mpirun" ;;
  esac
  HPCDNN_MPI=$flavor
}

# ------------------------------------------------------------------ training runs
# hpcdnn_train_args [--key=value ...]: set RUN_DIR and HPCDNN_ARGS (the `hpcdnn train` arguments) from the knobs
# CONFIG, DATA, RUN_DIR, EXTRA_ARGS and the script's own arguments; adds --resume when RUN_DIR has a checkpoint.
hpcdnn_train_args() {
  local a extra resume=auto
  # shellcheck disable=SC2206  # EXTRA_ARGS is a list of --key=value words
  extra=(${EXTRA_ARGS:-} "$@")
  for a in "${extra[@]}"; do  # the run directory must be known here: preempted.json decides the requeue
    case $a in
      --run_dir=* | --run-dir=*) RUN_DIR=${a#*=} ;;
      --run_dir | --run-dir) hpcdnn_die "write --run_dir=DIR (with '='), or set RUN_DIR" ;;
      --resume) resume=given ;;
    esac
  done
  RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-hpcdnn}-${SLURM_JOB_ID:-local}}
  HPCDNN_ARGS=(train --config "${CONFIG:-fashion_small}" --run_dir="$RUN_DIR")
  [ -n "${DATA:-}" ] && HPCDNN_ARGS+=(--data="$DATA")
  [ "$THREADS" -gt 0 ] 2>/dev/null && HPCDNN_ARGS+=(--threads="$THREADS")
  if [ $resume = auto ] && [ -f "$RUN_DIR/checkpoint.h5" ]; then
    HPCDNN_ARGS+=(--resume)
    hpcdnn_log "found $RUN_DIR/checkpoint.h5: resuming (restart ${SLURM_RESTART_COUNT:-0})"
  fi
  HPCDNN_ARGS+=("${extra[@]}")
}

# hpcdnn_run COMMAND...: run a launcher command in the background and wait for it, passing SIGUSR1 on (see the
# top of this file); then requeue the job if the run stopped for a signal. Returns the launcher's exit code,
# or exits 0 after a requeue.
hpcdnn_run() {
  local rc start prev now marker="$RUN_DIR/preempted.json" crashed=""
  prev=$(_hpcdnn_step "$marker")  # the step the last preempted run of this RUN_DIR stopped at (if any)
  if [ -n "$_HPCDNN_SIGNAL" ]; then
    hpcdnn_log "SIG$_HPCDNN_SIGNAL arrived during setup: requeueing without starting (the checkpoint is unchanged)"
    hpcdnn_requeue
  fi
  start=$(date +%s)
  if [ "${HPCDNN_WATCH_LAUNCH:-1}" != 0 ]; then  # the watcher forwards the batch shell's signals to the launcher
    set -- "$(_hpcdnn_watch_python)" -m hpcdnn launch --heartbeat_timeout="${HEARTBEAT_TIMEOUT:-60}" -- "$@"
  fi
  hpcdnn_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $*"
  "$@" &
  _HPCDNN_PID=$!
  _HPCDNN_ENDED=0
  _hpcdnn_watch "$start"  # returns once the launcher has exited (or was ended after STOP_GRACE)
  while :; do
    _HPCDNN_TRAPPED=0
    wait "$_HPCDNN_PID"
    rc=$?
    [ "$_HPCDNN_TRAPPED" = 1 ] || break  # a trapped signal interrupts `wait`: wait again for the real exit code
  done
  _HPCDNN_PID=
  # a preemption: a fresh marker, and the launcher exited 0 (or was ended by _hpcdnn_watch after the marker) with
  # no lost rank; a marker with anything else is a crash the launcher ended (it SIGTERMs the survivors): no requeue
  if _hpcdnn_fresh "$marker" "$start" && { [ "$rc" != 0 ] && [ "$_HPCDNN_ENDED" != 1 ] || _hpcdnn_fresh "$RUN_DIR/failed.json" "$start"; }; then
    hpcdnn_log "ERROR: the run left $marker but the launcher exited $rc$(_hpcdnn_fresh "$RUN_DIR/failed.json" "$start" \
      && echo " and the watcher lost a rank ($RUN_DIR/failed.json)"): a crash, not a preemption: not requeueing"
    rm -f "$marker"  # not a preemption: the checkpoint stays for a resubmission with RUN_DIR=$RUN_DIR
    crashed=1
  elif _hpcdnn_fresh "$marker" "$start"; then
    now=$(_hpcdnn_step "$marker")
    hpcdnn_log "stopped by a signal at step ${now:-?} (launcher exit $rc)"
    if [ -n "$prev" ] && [ -n "$now" ] && [ "$now" -le "$prev" ]; then
      hpcdnn_log "ERROR: no progress since the last restart (stopped at step $now again): the signal comes too early -"
      hpcdnn_log "raise --time or lower the --signal lead; not requeueing. Resubmit with RUN_DIR=$RUN_DIR to resume."
      exit 1
    fi
    hpcdnn_requeue
  fi
  if [ "$rc" = 75 ] && [ "${HPCDNN_WATCH_LAUNCH:-1}" != 0 ] && _hpcdnn_fresh "$RUN_DIR/failed.json" "$start"; then
    _hpcdnn_lost  # requeues, or exits 75
  fi
  if [ "$_HPCDNN_ENDED" = 1 ] && _hpcdnn_fresh "$RUN_DIR/summary.json" "$start"; then
    hpcdnn_log "the run had finished (RUN_DIR/summary.json) before its launcher was ended: exit 0"
    return 0
  fi
  [ -n "$_HPCDNN_SIGNAL" ] && [ -z "$crashed" ] && hpcdnn_log "SIG$_HPCDNN_SIGNAL arrived but the run left no $marker (launcher exit $rc): not requeueing"
  hpcdnn_log "launcher exited $rc"
  return "$rc"
}

# _hpcdnn_watch START: poll the launcher (once a second) until it exits. A run's last act is RUN_DIR/preempted.json
# (stopped: the checkpoint is complete) or RUN_DIR/summary.json (finished); if the launcher outlives either by
# STOP_GRACE seconds (a rank or the launcher itself hung in teardown), end it: SIGUSR2 (forwarded to the ranks, which
# dump their Python stacks), SIGTERM, and SIGKILL 10 s later; _HPCDNN_ENDED=1 then.
_hpcdnn_watch() {
  local start=$1 since="" last i
  while kill -0 "$_HPCDNN_PID" 2>/dev/null; do
    if [ -z "$since" ]; then
      for last in "$RUN_DIR/preempted.json" "$RUN_DIR/summary.json"; do
        _hpcdnn_fresh "$last" "$start" && { since=$(date +%s); break; }
      done
    fi
    if [ -n "$since" ] && [ $(($(date +%s) - since)) -ge "${STOP_GRACE:-60}" ]; then
      hpcdnn_log "the launcher is still running ${STOP_GRACE:-60} s after the run left $last: ending it (STOP_GRACE);"
      hpcdnn_log "SIGUSR2 first: every hpcdnn rank still alive prints its Python stacks below"
      _HPCDNN_ENDED=1
      kill -USR2 "$_HPCDNN_PID" 2>/dev/null
      sleep 3
      kill -TERM "$_HPCDNN_PID" 2>/dev/null
      for i in 1 2 3 4 5 6 7 8 9 10; do
        kill -0 "$_HPCDNN_PID" 2>/dev/null || return 0
        sleep 1
      done
      kill -KILL -- $(pgrep -P "$_HPCDNN_PID" | sed 's/^/-/') 2>/dev/null  # the watcher's launcher and its group
      kill -KILL "$_HPCDNN_PID" 2>/dev/null
      return 0
    fi
    sleep 1
  done
}

_hpcdnn_fresh() { [ -f "$1" ] && [ "$(stat -c %Y "$1")" -ge "$2" ]; }  # MARKER written since START (epoch s)

_hpcdnn_step() { [ -f "$1" ] && sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$1" | head -1; }

hpcdnn_requeue() {  # requeue this preempted job (it restarts with --resume) and end the batch script
  local preempted=$((${SLURM_RESTART_COUNT:-0} - $(_hpcdnn_node_failures)))
  if [ "$preempted" -ge "${MAX_RESTARTS:-100}" ]; then
    hpcdnn_log "ERROR: preempted and requeued $preempted times (MAX_RESTARTS=${MAX_RESTARTS:-100}): not requeueing;"
    hpcdnn_log "resubmit with RUN_DIR=$RUN_DIR to continue from its checkpoint"
    exit 1
  fi
  _hpcdnn_requeue_now
}

_hpcdnn_requeue_now() {
  hpcdnn_log "scontrol requeue $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)) resumes from $RUN_DIR/checkpoint.h5)"
  scontrol requeue "$SLURM_JOB_ID" || hpcdnn_die "scontrol requeue $SLURM_JOB_ID failed: resubmit the same script with RUN_DIR=$RUN_DIR to resume"
  exit 0
}

# ------------------------------------------------------------------ lost ranks and nodes (hpcdnn launch exited 75)
_hpcdnn_watch_python() {  # the watcher's interpreter: the venv's, not $PYTHON (which may be a wrapper around the ranks)
  if [ "$HPCDNN_VENV" != none ] && [ -x "$HPCDNN_VENV/bin/python" ]; then echo "$HPCDNN_VENV/bin/python"; else echo "$PYTHON"; fi
}

_hpcdnn_node_failures() {  # how many times this job was requeued after losing a node (RUN_DIR/node_failures.log)
  local n
  n=$(grep -c "^job ${SLURM_JOB_ID:-none} " "$RUN_DIR/node_failures.log" 2>/dev/null)
  echo "${n:-0}"
}

# _hpcdnn_lost: the watcher lost a rank and wrote RUN_DIR/failed.json. Requeue (resuming from the last checkpoint)
# when a lost rank's node is dead or unreachable, at most MAX_NODE_FAILURES times in this job; otherwise exit 75,
# so the job ends FAILED: a rank that died on a node that still answers is a crash a restart would repeat.
_hpcdnn_lost() {
  local failed="$RUN_DIR/failed.json" hosts host dead="" count
  hosts=$("$(_hpcdnn_watch_python)" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["hosts"]))' "$failed")
  hpcdnn_log "the run lost rank(s) on ${hosts:-?} (hpcdnn launch exited 75; $failed says which and why)"
  if [ "${NODE_PROBE:-1}" = 0 ]; then
    dead=${hosts:-?}
  elif [ -z "$hosts" ]; then
    hpcdnn_log "ERROR: the run did not finish and no lost rank named its node ($failed): not requeueing."
    exit 75
  else
    for host in $hosts; do _hpcdnn_node_alive "$host" || dead+="${dead:+ }$host"; done
  fi
  if [ -z "$dead" ]; then
    hpcdnn_log "ERROR: node(s) ${hosts:-?} still answer: a rank died (a crash, the OOM killer, a kill), no node was lost:"
    hpcdnn_log "not requeueing (NODE_PROBE=0 would). Resubmit with RUN_DIR=$RUN_DIR to resume from its checkpoint."
    exit 75
  fi
  count=$(_hpcdnn_node_failures)
  if [ "$count" -ge "${MAX_NODE_FAILURES:-3}" ]; then
    hpcdnn_log "ERROR: lost node(s) $dead: node failure $((count + 1)) of this job, more than MAX_NODE_FAILURES=${MAX_NODE_FAILURES:-3}:"
    hpcdnn_log "not requeueing; the job fails. Check the nodes, then resubmit with RUN_DIR=$RUN_DIR to resume."
    exit 75
  fi
  echo "job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} $(date +%FT%T) lost node(s) $dead" >> "$RUN_DIR/node_failures.log"
  hpcdnn_log "lost node(s) $dead: node failure $((count + 1)) of at most MAX_NODE_FAILURES=${MAX_NODE_FAILURES:-3}: requeueing"
  _hpcdnn_requeue_now
}

# _hpcdnn_node_alive HOST: does the job's node HOST (a hostname, as the ranks report it) still run a job step?
_hpcdnn_node_alive() {
  local host=$1 g=0 list node het=() out
  while :; do
    if [ -n "${SLURM_HET_SIZE:-}" ]; then
      [ "$g" -lt "$SLURM_HET_SIZE" ] || break
      list=$(eval echo "\${SLURM_JOB_NODELIST_HET_GROUP_$g:-}")
      het=(--het-group="$g")
    else
      [ "$g" = 0 ] || break
      list=${SLURM_JOB_NODELIST:-}
    fi
    g=$((g + 1))
    node=$(scontrol show hostnames "$list" 2>/dev/null | grep -x -m1 -e "$host" -e "${host%%.*}") \
      || node=$(scontrol show node -o "$list" 2>/dev/null | grep -m1 "NodeHostName=$host " | sed 's/^NodeName=\([^ ]*\).*/\1/') \
      || continue
    [ -n "$node" ] || continue
    if out=$(timeout "${NODE_PROBE_TIMEOUT:-30}" srun "${het[@]}" --overlap --mpi=none --nodes=1 --ntasks=1 --nodelist="$node" true 2>&1); then
      hpcdnn_log "node $node ($host) answers (srun --overlap -w $node true)"
      return 0
    fi
    hpcdnn_log "node $node ($host) is lost: srun --overlap -w $node true failed or took over ${NODE_PROBE_TIMEOUT:-30} s: $(tail -n 2 <<<"$out" | tr -s "\n" " ")"
    return 1
  done
  hpcdnn_log "host $host is not a node of this job (SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-?}): counting it as lost"
  return 1
}

# hpcdnn_train [--key=value ...]: the whole job for the homogeneous topologies: one launcher, SLURM_NTASKS ranks.
hpcdnn_train() {
  hpcdnn_launcher
  if [ "${HPCDNN_WATCH_LAUNCH:-1}" != 0 ] && [ "$HPCDNN_LAUNCHER" = mpirun ] && [ "$HPCDNN_MPI" = openmpi ]; then
    HPCDNN_LAUNCH+=(-x HPCDNN_WATCH)  # Open MPI's mpirun passes on only the variables it is told (srun and Hydra: all)
  fi
  hpcdnn_train_args "$@"
  mkdir -p "$RUN_DIR"
  hpcdnn_run "${HPCDNN_LAUNCH[@]}" "$PYTHON" -m mpi4py -m hpcdnn "${HPCDNN_ARGS[@]}"
}
