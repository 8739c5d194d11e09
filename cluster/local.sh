#!/usr/bin/env bash
# A Ray cluster of one head and N worker nodes on this machine: loopback only, one temp dir per
# node, token authentication on.
#
#   cluster/local.sh up [N]        # start head + N workers (default 1)
#   eval "$(cluster/local.sh env)" # RAY_ADDRESS and the token settings for `ray job submit`
#   cluster/local.sh status
#   cluster/local.sh kill-worker I # SIGKILL worker node I (a node crash, for tests and demos)
#   cluster/local.sh down
#
# Settings (environment): DISTMEM_CLUSTER_DIR (state, logs and the token; default
# ${TMPDIR:-/tmp}/distmem-cluster-$USER), DISTMEM_CLUSTER_PORT (GCS, default 6390),
# DISTMEM_DASHBOARD_PORT (dashboard and job submission, default 8275), DISTMEM_NODE_CPUS (logical
# CPUs per node, default 2). The token lives only in $DISTMEM_CLUSTER_DIR/auth_token (mode 600);
# nothing here prints it.
set -euo pipefail

STATE=${DISTMEM_CLUSTER_DIR:-${TMPDIR:-/tmp}/distmem-cluster-${USER:-$(id -un)}}
PORT=${DISTMEM_CLUSTER_PORT:-6390}
DASHBOARD_PORT=${DISTMEM_DASHBOARD_PORT:-8275}
CPUS=${DISTMEM_NODE_CPUS:-2}
HOST=127.0.0.1
TOKEN="$STATE/auth_token"
NODE="$(cd "$(dirname "$0")" && pwd)/ray_node.py"

die() { echo "local.sh: $*" >&2; exit 1; }
command -v ray >/dev/null || die "ray is not on PATH (pip install the project first)"

node_env() {  # every node and every client uses the cluster's own token
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # loopback addresses everywhere (see ray_node.py)
  unset RAY_AUTH_TOKEN RAY_ADDRESS
}

# distinct agent/metrics ports per node: several nodes share this machine's loopback
node_ports() {
  local base=$((PORT + 100 + 10 * $1))
  echo "--dashboard-agent-listen-port=$base --dashboard-agent-grpc-port=$((base + 1))" \
       "--runtime-env-agent-port=$((base + 2)) --metrics-export-port=$((base + 3))"
}

# Node addresses stay on loopback: nodes start through cluster/ray_node.py, which keeps Ray from
# replacing 127.0.0.1 by the host's outward address.
start_node() {  # start_node NAME ARGS...: a blocking `ray start` in its own process group
  local name=$1; shift
  mkdir -p "$STATE/$name"
  setsid nohup python "$NODE" start --block --node-ip-address=$HOST --temp-dir="$STATE/$name" --num-cpus="$CPUS" \
    --disable-usage-stats "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}

alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for DESCRIPTION COMMAND...: up to 90 s
  local what=$1; shift
  for _ in $(seq 180); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "timed out waiting for $what (logs in $STATE)"
}

stop_node() {  # TERM, then KILL, the node's process group
  local name=$1 pid
  [ -f "$STATE/$name.pid" ] || return 0
  pid=$(cat "$STATE/$name.pid")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$STATE/$name.pid"
}

cmd=${1:-}
case "$cmd" in
  up)
    workers=${2:-1}
    [[ "$workers" =~ ^[0-9]+$ ]] || die "up: N must be a number of worker nodes, got '$workers'"
    alive head && die "a cluster is already up (cluster/local.sh down first)"
    mkdir -p "$STATE" && chmod 700 "$STATE"
    if [ ! -s "$TOKEN" ]; then
      (umask 077 && python -c "import secrets; print(secrets.token_hex(32))" >"$TOKEN")
    fi
    node_env
    start_node head --head --port="$PORT" --include-dashboard=true --dashboard-host=$HOST \
      --dashboard-port="$DASHBOARD_PORT" $(node_ports 0)
    wait_for "the head node" python -c "import socket; socket.create_connection(('$HOST', $PORT), 2)"
    wait_for "the dashboard" python -c "import socket; socket.create_connection(('$HOST', $DASHBOARD_PORT), 2)"
    for i in $(seq "$workers"); do
      start_node "worker-$i" --address="$HOST:$PORT" $(node_ports "$i")
    done
    echo "$workers" >"$STATE/workers"
    python "$NODE" wait-nodes "$HOST:$PORT" $((workers + 1)) >/dev/null 2>&1 ||
      die "the worker nodes did not join (logs in $STATE)"
    cat <<EOF
Ray cluster up: 1 head + $workers worker node(s) on $HOST, $CPUS CPUs each, token authentication on.
  GCS address      $HOST:$PORT
  job submission   http://$HOST:$DASHBOARD_PORT (dashboard bound to $HOST only)
  token            in $TOKEN (mode 600; not printed)
Submit a job from the repository root:
  eval "\$(cluster/local.sh env)"
  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
      python -m jobs.omniglot --preset quick --data \$PWD/../shared/data/omniglot
Stop it: cluster/local.sh down
EOF
    ;;
  env)
    alive head || die "no cluster is up (cluster/local.sh up)"
    echo "export RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN"
    ;;
  status)
    alive head || { echo "down"; exit 3; }
    node_env
    python "$NODE" status --address="$HOST:$PORT"
    ;;
  kill-worker)
    name="worker-${2:?kill-worker needs a worker number}"
    alive "$name" || die "$name is not running"
    kill -KILL -- "-$(cat "$STATE/$name.pid")"
    rm -f "$STATE/$name.pid"
    echo "killed $name"
    ;;
  down)
    for f in "$STATE"/worker-*.pid; do [ -e "$f" ] && stop_node "$(basename "$f" .pid)"; done
    stop_node head
    rm -f "$STATE/workers"
    echo "cluster down (logs kept in $STATE)"
    ;;
  *)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$cmd" ] || [ "$cmd" = help ] || exit 2
    ;;
esac
