#!/bin/sh
# agent.sh - the "ssh" of the virtual cluster, for MPI launchers (PRRTE's plm_ssh_agent, Hydra's -launcher-exec):
#   agent.sh [ssh options] NODE COMMAND...
# runs COMMAND (a shell string, as ssh does) as NODE: inside its network namespace, with its own hostname.
while [ $# -gt 0 ]; do
  case $1 in
    -[1246AaCfGgKkMNnqsTtVvXxYy]) shift ;;  # ssh flags without a value
    -[BbcDEeFIiJLlmOoPpQRSWw]) shift 2 ;;   # ssh options with a value
    *) break ;;
  esac
done
node=$1
shift
exec ip netns exec "$node" unshare --uts sh -c 'hostname "$0"; eval "$*"' "$node" "$@"
