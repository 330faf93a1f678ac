#!/usr/bin/env bash
# vcluster.sh - a virtual cluster on this one machine: N "nodes", each a network namespace with its own address
# and name, joined by a Linux bridge, every node's link optionally shaped with tbf. For tests and benchmarks that
# must cross a network stack (MPI over TCP between hosts, not shared memory). Root only.
#
#   vcluster.sh up [--nodes N] [--link-gbit R]   bring the cluster up (idempotent: re-running reshapes links)
#   vcluster.sh down                             kill every process inside the nodes, remove everything (idempotent)
#   vcluster.sh shape NODE R|off                 set one node's link rate (Gbit/s, both directions) while running
#   vcluster.sh link NODE up|down                take one node's link down (or back up)
#   vcluster.sh exec NODE CMD...                 run CMD as NODE: inside its namespace, with its hostname
#   vcluster.sh kill NODE                        SIGKILL every process inside NODE (a node failure)
#   vcluster.sh status                           nodes, addresses, link rates, processes
#
# Env: VCLUSTER_NAME (default hv: nodes hv1..hvN, bridge hv-br), VCLUSTER_SUBNET (default 10.77.0: node i is
# 10.77.0.(10+i)/24). Several clusters may coexist with distinct names and subnets. Node names go into /etc/hosts
# (lines marked "# vcluster NAME", removed by down) because MPI launchers address nodes by name.
# Traffic only ever goes to the addresses assigned here, inside namespaces created here.
set -euo pipefail

NAME=${VCLUSTER_NAME:-hv}
SUBNET=${VCLUSTER_SUBNET:-10.77.0}
BRIDGE=$NAME-br
MARK="# vcluster $NAME"

log() { echo "[vcluster $NAME] $*" >&2; }
die() { log "error: $*"; exit 1; }
nodes() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NAME}[0-9]+$" | sort -V || true; }
addr() { echo "$SUBNET.$((10 + ${1#"$NAME"}))"; }
hostveth() { echo "${1}-h"; }
known() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1" || die "no node $1 (running: $(nodes | xargs))"; }

shape_dev() {  # shape_dev <netns or -> <dev> <gbit|off>
  local ns=$1 dev=$2 rate=$3 run=()
  [ "$ns" = - ] || run=(ip netns exec "$ns")
  "${run[@]}" tc qdisc del dev "$dev" root 2>/dev/null || true
  [ "$rate" = off ] || [ "$rate" = 0 ] && return 0
  # burst must hold at least one timer tick of traffic at the rate (≥ rate/250 Hz); latency bounds the queue.
  local burst_kb
  burst_kb=$(awk -v r="$rate" 'BEGIN{b=r*1e9/8/250/1024; if (b<256) b=256; printf "%d", b}')
  "${run[@]}" tc qdisc add dev "$dev" root tbf rate "${rate}gbit" burst "${burst_kb}kb" latency 50ms
}

shape() {  # shape <node> <gbit|off>: both directions of the node's link
  shape_dev - "$(hostveth "$1")" "$2"
  shape_dev "$1" eth0 "$2"
}

up() {
  local n=4 rate=off
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) n=$2; shift 2 ;;
      --link-gbit) rate=$2; shift 2 ;;
      *) die "unknown option $1 (use --nodes N, --link-gbit R)" ;;
    esac
  done
  [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "--nodes must be 1..200, not $n"
  [ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
  local have
  have=$(nodes | wc -l)
  [ "$have" -le "$n" ] || { log "shrinking from $have to $n nodes"; down; }
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$SUBNET.1/24" dev "$BRIDGE"  # the host's own leg (the machine outside the nodes)
  ip link set "$BRIDGE" up
  local i node hv
  for i in $(seq 1 "$n"); do
    node=$NAME$i hv=$(hostveth "$node")
    if ! ip netns list | awk '{print $1}' | grep -qx "$node"; then
      ip netns add "$node"
    fi
    if ! ip link show "$hv" >/dev/null 2>&1; then
      ip link add "$hv" type veth peer name "$node-n"
      ip link set "$node-n" netns "$node"
      ip netns exec "$node" ip link set "$node-n" name eth0
    fi
    ip link set "$hv" master "$BRIDGE"
    ip link set "$hv" up
    ip netns exec "$node" ip addr replace "$(addr "$node")/24" dev eth0
    ip netns exec "$node" ip link set eth0 up
    ip netns exec "$node" ip link set lo up
    shape "$node" "$rate"
  done
  hosts_file
  log "up: $n nodes on $SUBNET.0/24 via $BRIDGE, links ${rate/off/unshaped}$([ "$rate" = off ] || echo ' Gbit/s')"
}

hosts_file() {  # /etc/hosts: one marked line per node (rewritten whole, so it always matches the nodes)
  local tmp
  exec 9>/tmp/vcluster-hosts.lock
  flock 9  # clusters of other names may rewrite /etc/hosts at the same time
  tmp=$(mktemp)
  grep -vF "$MARK" /etc/hosts > "$tmp" || true
  for node in $(nodes); do echo "$(addr "$node") $node $MARK" >> "$tmp"; done
  cat "$tmp" > /etc/hosts  # in place: /etc/hosts may be a bind mount that rename cannot replace
  rm -f "$tmp"
  exec 9>&-
}

kill_node() {  # every process inside the node's namespace
  local pids
  pids=$(ip netns pids "$1" 2>/dev/null | xargs) || true
  [ -z "$pids" ] || { log "killing on $1: $pids"; kill -KILL $pids 2>/dev/null || true; }
}

down() {
  local node
  for node in $(nodes); do
    kill_node "$node"
  done
  for node in $(nodes); do
    for _ in $(seq 50); do [ -z "$(ip netns pids "$node" 2>/dev/null)" ] && break; sleep 0.1; done
    ip link del "$(hostveth "$node")" 2>/dev/null || true
    ip netns del "$node"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  hosts_file
  log "down"
}

status() {
  local node
  ip -br addr show "$BRIDGE" 2>/dev/null || { echo "no cluster $NAME"; return 0; }
  for node in $(nodes); do
    printf '%s %s rate=%s pids=%s\n' "$node" "$(addr "$node")" \
      "$(tc qdisc show dev "$(hostveth "$node")" | grep -o 'rate [^ ]*' | head -1 | sed 's/rate //')" \
      "$(ip netns pids "$node" | xargs | tr ' ' ,)"
  done
}

cmd=${1:-}
shift || true
case $cmd in
  up) up "$@" ;;
  down) down ;;
  shape) known "$1"; shape "$1" "$2"; log "$1 link: $2" ;;
  link)
    known "$1"; ip link set "$(hostveth "$1")" "$2"; ip netns exec "$1" ip link set eth0 "$2"; log "$1 link $2" ;;
  exec) known "$1"; node=$1; shift; exec ip netns exec "$node" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$node" "$@" ;;
  kill) known "$1"; kill_node "$1" ;;
  status) status ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
