#!/usr/bin/env bash
# A Ray cluster of several nodes on this one machine: a head (Serve's controller, proxy and the
# Router; few CPUs) plus worker nodes that carry a `drafter` or a `verifier` custom resource,
# each a separate raylet started with `ray start --address=HEAD`. Then:
#
#   source /tmp/deer-local-cluster/env       # RAY_ADDRESS and RAY_AUTH_MODE for clients
#   serve deploy cluster/local/serve_config.yaml -a http://127.0.0.1:8275
#   serve status -a http://127.0.0.1:8275
#   curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
#        -d '{"prompt": "def add(a, b):", "max_tokens": 16}'
#   cluster/local/down.sh
#
# DEER_AUTOSCALING=1: node autoscaling with Ray's fake multi-node provider. The head runs the
# Ray autoscaler, which starts DEER_DRAFTER_NODES / DEER_VERIFIER_NODES worker nodes of each
# pool (min_workers), adds nodes (up to DEER_MAX_NODES_PER_POOL, default 2) when a replica
# needs a `drafter` or `verifier` unit no node has free, and removes nodes idle for
# DEER_IDLE_TIMEOUT_MINUTES (0.5).
#
# Every process it starts descends from one `ray start --block` per node, whose pid it writes
# under $DEER_LOCAL_STATE; down.sh ends exactly those process trees (never `ray stop`, which
# would also kill any other Ray instance on this machine).
#
# Settings (environment): DEER_LOCAL_STATE (/tmp/deer-local-cluster), DEER_RAY_PORT (6390),
# DEER_DASHBOARD_PORT (8275), DEER_HEAD_CPUS (1), DEER_DRAFTER_NODES (1), DEER_VERIFIER_NODES (1),
# DEER_NODE_CPUS (2), DEER_NODE_SLOTS (2: replicas of its pool a worker node can hold),
# DEER_OBJECT_STORE_BYTES (256 MiB per node), DEER_UP_TIMEOUT_S (600), DEER_DASHBOARD (true;
# `serve deploy` needs it), RAY_AUTH_MODE (token), RAY (the `ray` of .venv, else the one on PATH).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RAY=${RAY:-$REPO/.venv/bin/ray}
[ -x "$RAY" ] || RAY=$(command -v ray)
PY=$(dirname "$RAY")/python
[ -x "$PY" ] || PY=$(command -v python3)
STATE=${DEER_LOCAL_STATE:-/tmp/deer-local-cluster}
PORT=${DEER_RAY_PORT:-6390}
DASH_PORT=${DEER_DASHBOARD_PORT:-8275}
HEAD_CPUS=${DEER_HEAD_CPUS:-1}
DRAFTER_NODES=${DEER_DRAFTER_NODES:-1}
VERIFIER_NODES=${DEER_VERIFIER_NODES:-1}
NODE_CPUS=${DEER_NODE_CPUS:-2}
SLOTS=${DEER_NODE_SLOTS:-2}
TIMEOUT=${DEER_UP_TIMEOUT_S:-600}
DASHBOARD=${DEER_DASHBOARD:-true}
AUTOSCALING=${DEER_AUTOSCALING:-0}
MAX_NODES=${DEER_MAX_NODES_PER_POOL:-2}
IDLE_MIN=${DEER_IDLE_TIMEOUT_MINUTES:-0.5}
OBJECT_STORE=${DEER_OBJECT_STORE_BYTES:-268435456}

if compgen -G "$STATE/*.pid" >/dev/null; then
  for f in "$STATE"/*.pid; do
    if kill -0 "$(cat "$f")" 2>/dev/null; then
      echo "up.sh: a cluster is already running (state in $STATE); run down.sh first" >&2
      exit 1
    fi
  done
fi
mkdir -p "$STATE"
rm -f "$STATE"/*.pid "$STATE"/address
TEMP="$STATE/ray"   # this cluster's sessions, logs and sockets (short: socket paths are limited)
# the address Ray itself detects for this host (Ray rewrites 127.0.0.1 to it for clients)
IP=${DEER_NODE_IP:-$("$PY" -c "import ray._private.services as s; print(s.get_node_ip_address())")}

# The replicas import `deployments` and `deer_serve` from this checkout, installed or not; the
# raylets pass their environment on to the workers they start.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0
# Ray 2.60 authenticates every client with a token (~/.ray/auth_token, or RAY_AUTH_TOKEN /
# RAY_AUTH_TOKEN_PATH); clients of this cluster (serve deploy, ray.init) need the same
# RAY_AUTH_MODE, which up.sh writes to $STATE/env: `source /tmp/deer-local-cluster/env`.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] \
    && [ ! -s "$HOME/.ray/auth_token" ]; then
  "$RAY" get-auth-token --generate >/dev/null   # `ray start` does not make one itself
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# a loaded machine starts Ray's agents slowly; the default wait (~15 s) kills the raylet
export RAY_agent_register_timeout_ms=${RAY_agent_register_timeout_ms:-180000}
export RAY_DASHBOARD_STARTUP_TIMEOUT_S=${RAY_DASHBOARD_STARTUP_TIMEOUT_S:-300}
# Serve's autoscaler counts each replica's ongoing requests as the replica reports them, not as
# the callers' handles do: with Ray 2.60 on this machine a driver's handle reports for one
# deployment could stay missing for minutes under load (total_num_requests 0) while another
# deployment's arrived; the replicas' own reports (which also carry the busy fractions the
# ratio policy reads) were always there. Requests queued in handles still count.
export RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE=${RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE:-0}

# ports 0: random free ports, so several raylets (and other Ray instances) share this host
COMMON=(--temp-dir "$TEMP" --min-worker-port 0 --max-worker-port 0
        --object-store-memory "$OBJECT_STORE"
        --dashboard-agent-listen-port 0 --disable-usage-stats --block)

start() {  # name, ray start args...
  local name=$1; shift
  setsid "$RAY" start "$@" "${COMMON[@]}" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}

wait_nodes() {  # expected alive nodes
  "$PY" - "$1" "$IP:$PORT" "$TIMEOUT" "$STATE" <<'PYEOF'
import glob, os, sys, time
import ray
want, address, timeout, state = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
deadline = time.time() + timeout

def check_started():  # every `ray start --block` still running?
    for f in glob.glob(os.path.join(state, "*.pid")):
        try:
            os.kill(int(open(f).read()), 0)
        except ProcessLookupError:
            print(f"up.sh: {os.path.basename(f)[:-4]} exited, see {f[:-4]}.log", file=sys.stderr)
            sys.exit(1)

while True:
    check_started()
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"up.sh: no Ray at {address}: {e}")
        time.sleep(2)
while True:
    check_started()
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        for n in alive:
            res = {k: v for k, v in n["Resources"].items()
                   if k in ("CPU", "GPU", "drafter", "verifier")}
            print(f"up.sh: node {n['NodeID'][-12:]} {res}")
        break
    if time.time() > deadline:
        sys.exit(f"up.sh: {len(alive)} of {want} nodes after {timeout:.0f} s")
    time.sleep(2)
PYEOF
}

# On a loaded machine a raylet can miss Ray's fixed 30 s registration wait and exit; a node
# that does is started again (DEER_START_ATTEMPTS times). Nodes start one at a time.
ATTEMPTS=${DEER_START_ATTEMPTS:-3}
n=0
node() {  # name, ray start args...
  local name=$1 i; shift
  n=$((n + 1))
  for i in $(seq 1 "$ATTEMPTS"); do
    start "$name" "$@"
    if wait_nodes "$n"; then return 0; fi
    kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null && break   # running but not joined: give up
    echo "up.sh: $name failed to start (attempt $i of $ATTEMPTS)" >&2
    cp "$STATE/$name.log" "$STATE/$name.attempt-$i.log"
  done
  echo "up.sh: $name did not join, see $STATE/$name*.log" >&2
  "$HERE/down.sh"
  exit 1
}

echo "up.sh: head on $IP:$PORT (dashboard :$DASH_PORT), state in $STATE"
HEAD_ARGS=(--head --port "$PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0
           --include-dashboard "$DASHBOARD" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT")
if [ "$AUTOSCALING" = 1 ]; then
  # Ray's fake multi-node provider: the autoscaler on the head starts (and stops) worker
  # nodes as local raylets, exactly as it would launch cloud instances, between each pool's
  # min_workers and max_workers, removing nodes idle for idle_timeout_minutes.
  cat >"$STATE/autoscaling.yaml" <<YAML
cluster_name: deer-local
max_workers: $((2 * MAX_NODES))
idle_timeout_minutes: $IDLE_MIN
upscaling_speed: 1.0
provider:
  type: fake_multinode
  gcs_address: "$IP:$PORT"
  use_node_id_as_ip: true
  disable_node_updaters: true
  disable_launch_config_check: true
available_node_types:
  ray.head.default:
    resources: {CPU: $HEAD_CPUS}
    node_config: {}
    max_workers: 0
  drafter_node:
    resources: {CPU: $NODE_CPUS, drafter: $SLOTS, object_store_memory: $OBJECT_STORE}
    node_config: {}
    min_workers: $DRAFTER_NODES
    max_workers: $MAX_NODES
  verifier_node:
    resources: {CPU: $NODE_CPUS, verifier: $SLOTS, object_store_memory: $OBJECT_STORE}
    node_config: {}
    min_workers: $VERIFIER_NODES
    max_workers: $MAX_NODES
head_node_type: ray.head.default
auth: {}
docker: {}
initialization_commands: []
setup_commands: []
head_setup_commands: []
worker_setup_commands: []
head_start_ray_commands: []
worker_start_ray_commands: []
file_mounts: {}
cluster_synced_files: []
file_mounts_sync_continuously: false
rsync_exclude: []
rsync_filter: []
YAML
  export RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1
  node head "${HEAD_ARGS[@]}" --autoscaling-config "$STATE/autoscaling.yaml"
  n=$((1 + DRAFTER_NODES + VERIFIER_NODES))
  wait_nodes "$n" || { echo "up.sh: the autoscaler did not start the min_workers" >&2;
                       "$HERE/down.sh"; exit 1; }
else
  node head "${HEAD_ARGS[@]}"
  for i in $(seq 1 "$DRAFTER_NODES"); do
    node "drafter-$i" --address "$IP:$PORT" --num-cpus "$NODE_CPUS" --num-gpus 0 \
      --resources "{\"drafter\": $SLOTS}"
  done
  for i in $(seq 1 "$VERIFIER_NODES"); do
    node "verifier-$i" --address "$IP:$PORT" --num-cpus "$NODE_CPUS" --num-gpus 0 \
      --resources "{\"verifier\": $SLOTS}"
  done
fi
echo "$IP:$PORT" >"$STATE/address"
printf 'export RAY_ADDRESS=%s RAY_AUTH_MODE=%s\n' "$IP:$PORT" "$RAY_AUTH_MODE" >"$STATE/env"
echo "up.sh: $n nodes up; source $STATE/env; serve deploy CONFIG -a http://127.0.0.1:$DASH_PORT"
