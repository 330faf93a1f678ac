#!/bin/bash
# het-agent.sh HOST COMMAND - Open MPI's (PRRTE's) remote launch agent for heterogeneous Slurm jobs.
#
# mpirun inside a hetjob sees only component 0's nodes (SLURM_JOB_NODELIST), and its own `srun` launch of the
# per-node daemons cannot span components. train_downpour_hetjob.sbatch therefore runs mpirun with
# `--prtemca plm ssh --prtemca plm_ssh_agent slurm/het-agent.sh`: PRRTE calls this script as it would call ssh,
# and it starts the daemon on HOST with `srun --het-group=G` into the component that owns HOST.
host=$1
shift
while [[ $host == -* ]]; do host=$1; shift; done  # tolerate ssh-style options before the host
for ((g = 0; g < ${SLURM_HET_SIZE:-1}; g++)); do
  var=SLURM_JOB_NODELIST_HET_GROUP_$g
  [ -n "${!var:-}" ] || var=SLURM_JOB_NODELIST
  if scontrol show hostnames "${!var}" | grep -qxF "$host"; then
    exec srun --het-group="$g" --nodelist="$host" --nodes=1 --ntasks=1 --overlap --mpi=none \
      --kill-on-bad-exit=1 /bin/sh -c "$*"
  fi
done
echo "het-agent.sh: host $host is in no component of job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NODELIST_HET_GROUP_0:-} ${SLURM_JOB_NODELIST_HET_GROUP_1:-})" >&2
exit 1
